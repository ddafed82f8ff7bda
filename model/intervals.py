"""Bootstrap 95 % intervals for per-class and macro F1 and one-vs-rest AUC.

The test set holds several scans of some subjects, so scans are not independent:
the bootstrap resamples *subjects* (all of a subject's scans together), with a
seeded generator.  Intervals are percentile intervals (2.5 %, 97.5 %); a
replicate in which a class is absent (or is the only one) gives no AUC for it and
is left out of that metric's interval (the number of replicates used is reported).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

from model.types import CLASSES

logger = logging.getLogger(__name__)

#: Bootstrap replicates by default.
N_BOOTSTRAP = 1000


def point_metrics(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Per-class F1 and one-vs-rest AUC, their macro means (NaN where undefined).

    Parameters
    ----------
    y_true : numpy.ndarray
        (N,) class indices.
    probabilities : numpy.ndarray
        (N, C); the prediction is the arg-max.

    Returns
    -------
    dict
        ``f1 AD``, ..., ``macro f1``, ``auc AD``, ..., ``macro auc``.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(probabilities).argmax(axis=1)
    out: dict[str, float] = {}
    f1s, aucs = [], []
    for i, c in enumerate(CLASSES):
        positive = y_true == i
        tp = float(np.sum(positive & (y_pred == i)))
        denominator = float(positive.sum() + (y_pred == i).sum())
        f1s.append(2 * tp / denominator if denominator else 0.0)
        aucs.append(auc_one_vs_rest(positive, probabilities[:, i]))
        out[f"f1 {c}"] = f1s[-1]
    out["macro f1"] = float(np.mean(f1s))
    out.update({f"auc {c}": a for c, a in zip(CLASSES, aucs, strict=True)})
    out["macro auc"] = float(np.mean(aucs)) if not np.isnan(aucs).any() else float("nan")
    return out


def auc_one_vs_rest(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged; NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_intervals(y_true: Sequence[int] | np.ndarray, probabilities: np.ndarray, groups: Sequence[str], *,
                        n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Point estimates and subject-level bootstrap 95 % intervals.

    Parameters
    ----------
    y_true : sequence of int or numpy.ndarray
        (N,) class indices.
    probabilities : numpy.ndarray
        (N, C) class probabilities.
    groups : sequence of str
        (N,) subject of each scan (resampled together).
    n_boot : int
        Replicates.
    seed : int
        Seed of the resampling.

    Returns
    -------
    dict
        Metric name (see :func:`point_metrics`) to ``{"value", "low", "high", "replicates"}``.
    """
    y = np.asarray(y_true)
    probs = np.asarray(probabilities, dtype=np.float64)
    point = point_metrics(y, probs)
    subjects = sorted(set(groups))
    rows_of = {s: np.flatnonzero(np.asarray(groups) == s) for s in subjects}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot if subjects else 0):
        drawn = rng.integers(0, len(subjects), size=len(subjects))
        idx = np.concatenate([rows_of[subjects[d]] for d in drawn])
        for k, v in point_metrics(y[idx], probs[idx]).items():
            if not np.isnan(v):
                samples[k].append(v)
    out: dict[str, dict[str, Any]] = {}
    for k, value in point.items():
        values = np.asarray(samples[k])
        low, high = (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))) if len(values) \
            else (float("nan"), float("nan"))
        out[k] = {"value": value, "low": low, "high": high, "replicates": len(values)}
    return out


def format_interval(entry: dict[str, Any]) -> str:
    """``0.67 [0.55, 0.78]`` (``n/a`` where undefined)."""
    if np.isnan(entry["value"]):
        return "n/a"
    if np.isnan(entry["low"]):
        return f"{entry['value']:.2f}"
    return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"
