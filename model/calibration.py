"""Calibration: expected calibration error, reliability diagrams, temperature scaling.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T`` fitted
by minimising the negative log-likelihood on a validation split (subjects held out
of training, never the test subjects).  It changes the probabilities, never the
predicted class.  ``T`` is stored with the trained model (the adapter file's
metadata and ``run.json``) and applied by evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

logger = logging.getLogger(__name__)

#: Bins of the expected calibration error and the reliability diagram.
N_BINS = 10
#: Search interval of log T.
LOG_T_BOUNDS = (-3.0, 3.0)


def nll(logits: np.ndarray, labels: np.ndarray | Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    logp = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL on a validation set.

    Parameters
    ----------
    logits : numpy.ndarray
        (N, C) raw logits.
    labels : numpy.ndarray
        (N,) class indices.

    Returns
    -------
    float
        ``T`` in [e^-3, e^3]; 1.0 when there are fewer than two scans.
    """
    if len(labels) < 2:
        return 1.0
    res = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def calibration_bins(probabilities: np.ndarray, labels: np.ndarray,
                     n_bins: int = N_BINS) -> list[dict[str, float]]:
    """Top-label confidence bins: count, mean confidence and accuracy in each.

    Parameters
    ----------
    probabilities : numpy.ndarray
        (N, C).
    labels : numpy.ndarray
        (N,) class indices.
    n_bins : int
        Equal-width bins over [0, 1].

    Returns
    -------
    list of dict
        One per bin: ``lo``, ``hi``, ``count``, ``confidence``, ``accuracy`` (NaN when empty).
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == np.asarray(labels)) if len(probs) else np.zeros(0, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = which == b
        n = int(sel.sum())
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "confidence": float(confidence[sel].mean()) if n else float("nan"),
                    "accuracy": float(correct[sel].mean()) if n else float("nan")})
    return out


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE: the count-weighted mean of |accuracy - confidence| over the bins (0 for no scans)."""
    bins = calibration_bins(probabilities, labels, n_bins)
    total = sum(b["count"] for b in bins)
    if not total:
        return 0.0
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]) / total)


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T)."""
    return np.asarray(softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def plot_reliability(named: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]], path: Path) -> Path:
    """Reliability diagrams, one panel per run: accuracy against confidence, before and after T.

    Parameters
    ----------
    named : Mapping
        Run name to ``(logits (N, C), labels (N,), _unused, temperature)``.
    path : Path
        PNG file.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(named), figsize=(4.4 * len(named), 4.2), squeeze=False)
    for ax, (name, (logits, labels, _, temperature)) in zip(axes[0], named.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for t, colour, what in ((1.0, "tab:blue", "raw"), (temperature, "tab:orange", f"T = {temperature:.2f}")):
            probs = apply_temperature(logits, t)
            bins = [b for b in calibration_bins(probs, labels) if b["count"]]
            ece = expected_calibration_error(probs, labels)
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color=colour,
                    label=f"{what} (ECE {ece:.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} (n={len(labels)})")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
