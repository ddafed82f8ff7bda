"""Evaluation of trained runs (``dicom-node evaluate``): the paper's table and two figures.

For each run the model is rebuilt from its base, the run's trained tensors are
loaded (refused unless the base weights' SHA-256 matches) and the run's held-out
subjects (or another manifest, refused unless preprocessed as the node serves)
are classified on the requested device, with the same note handling as training
and inference (:mod:`model.feed`).  Output: precision, sensitivity (recall) and
F1 for AD, CN and MCI with macro and weighted averages, one column group per run;
subject-level bootstrap 95 % intervals for per-class and macro F1 and
one-vs-rest AUC (:mod:`model.intervals`); calibration (expected calibration
error before and after the run's temperature, a reliability diagram,
:mod:`model.calibration`); a confusion-matrix PNG and a t-SNE PNG of the
embeddings the classifier sees (image embedding, or image and text embeddings
concatenated), coloured by true class.  Beside every run, on the same split, the baseline of
:mod:`model.baseline` (logistic regressions on image features, on the note's
numbers and on both), with the same intervals.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.baseline import format_baseline, run_baseline
from model.brain_adapter import BrainAdapter, Preset
from model.calibration import apply_temperature, calibration_bins, expected_calibration_error, plot_reliability
from model.dataset import Sample, check_preprocessing, read_manifest, subject_split
from model.demo import BaseSpec, build_base
from model.errors import ModelInputError
from model.feed import Predictions, build_inputs, predict
from model.finetune import load_trained_parts
from model.intervals import N_BOOTSTRAP, bootstrap_intervals, format_interval
from model.types import CLASSES

logger = logging.getLogger(__name__)

#: Row order of the paper's table.
TABLE_CLASSES = ("AD", "CN", "MCI")


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, Any]:
    """Per-class precision, sensitivity (recall), F1 and support; macro and weighted averages.

    Parameters
    ----------
    y_true, y_pred : sequence of int
        Class indices into :data:`model.types.CLASSES`.

    Returns
    -------
    dict
        ``{"AD": {...}, "MCI": {...}, "CN": {...}, "macro avg": {...},
        "weighted avg": {...}, "accuracy": float, "n": int}``; each inner dict has
        ``precision``, ``sensitivity``, ``f1`` and ``support``.
    """
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(CLASSES)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        name: {"precision": float(p[i]), "sensitivity": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(CLASSES)
    }
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                        zero_division=0)
        out[f"{avg} avg"] = {"precision": float(pa), "sensitivity": float(ra), "f1": float(fa),
                             "support": len(y_true)}
    out["accuracy"] = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0
    out["n"] = len(y_true)
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The paper's table, one column group (PRE, SEN, F1) per run.

    Parameters
    ----------
    results : dict
        Run name to :func:`classification_metrics` output.

    Returns
    -------
    str
        A Markdown table.
    """
    names = list(results)
    header = "| class | " + " | ".join(f"{n} PRE | {n} SEN | {n} F1" for n in names) + " |"
    rule = "|---|" + "---:|" * (3 * len(names))
    lines = [header, rule]
    for row in (*TABLE_CLASSES, "macro avg", "weighted avg"):
        cells = []
        for n in names:
            m = results[n][row]
            cells += [f"{m['precision']:.2f}", f"{m['sensitivity']:.2f}", f"{m['f1']:.2f}"]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| accuracy (n) | " + " | ".join(
        f"{results[n]['accuracy']:.2f} (n={results[n]['n']}) | | " for n in names) + " |")
    return "\n".join(lines)


def plot_confusion(named: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Confusion matrices (rows: true class, columns: predicted), one panel per run.

    Parameters
    ----------
    named : dict
        Run name to ``(y_true, y_pred)``.
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
    from sklearn.metrics import confusion_matrix

    order = [CLASSES.index(c) for c in TABLE_CLASSES]
    fig, axes = plt.subplots(1, len(named), figsize=(4.2 * len(named), 4), squeeze=False)
    for ax, (name, (y_true, y_pred)) in zip(axes[0], named.items(), strict=True):
        cm = confusion_matrix(y_true, y_pred, labels=order)
        ax.imshow(cm, cmap="Blues")
        for i in range(3):
            for j in range(3):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(3), TABLE_CLASSES)
        ax.set_yticks(range(3), TABLE_CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_tsne(named: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, seed: int = 0) -> Path:
    """t-SNE of the embeddings, coloured by true class, one panel per run.

    Parameters
    ----------
    named : dict
        Run name to ``(embeddings (N, E), y_true (N,))``.
    path : Path
        PNG file.
    seed : int
        t-SNE seed.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    colours = {"AD": "tab:red", "CN": "tab:green", "MCI": "tab:orange"}
    fig, axes = plt.subplots(1, len(named), figsize=(4.5 * len(named), 4.2), squeeze=False)
    for ax, (name, (emb, y_true)) in zip(axes[0], named.items(), strict=True):
        n = emb.shape[0]
        xy = TSNE(n_components=2, perplexity=float(max(2, min(30, (n - 1) // 3))), random_state=seed,
                  init="pca").fit_transform(emb.astype(np.float64)) if n > 3 else np.zeros((n, 2))
        for c in TABLE_CLASSES:
            sel = np.asarray(y_true) == CLASSES.index(c)
            ax.scatter(xy[sel, 0], xy[sel, 1], s=12, c=colours[c], label=c, alpha=0.8)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_run(run_dir: Path) -> tuple[BrainAdapter, dict[str, Any]]:
    """Rebuild a run's model: its base plus its trained tensors.

    Parameters
    ----------
    run_dir : Path
        Run folder written by :func:`model.train.train`.

    Returns
    -------
    tuple
        ``(model, summary)``, the model in eval mode.

    Raises
    ------
    ModelInputError
        When the folder is not a run.
    ModelLoadError
        When the trained tensors do not belong to the rebuilt base.
    """
    summary_path = Path(run_dir) / "run.json"
    if not summary_path.is_file():
        raise ModelInputError(f"not a training run (no run.json): {run_dir}")
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    model, digest = build_base(BaseSpec.from_dict(summary["base"]))
    model.config = replace(model.config, preset=Preset(summary["config"]["preset"]))
    model.apply_preset()
    model = load_trained_parts(model, Path(run_dir), base_weights_sha256=digest)  # adapter file or LoRA folder
    return model.eval(), summary


def _rows(summary: dict[str, Any], manifest: Path | None) -> tuple[list[Sample], list[int]]:
    """The scans to evaluate: a given manifest in full, or the run's own test subjects."""
    if manifest is not None:
        samples = read_manifest(manifest)
        return samples, list(range(len(samples)))
    config = summary["config"]
    samples = read_manifest(Path(config["manifest"]))
    _, test = subject_split(samples, config["test_fraction"], config["seed"])
    wanted = set(summary["split"]["test_subjects"])
    if {samples[i].subject_id for i in test} != wanted:
        raise ModelInputError("the run's manifest changed since training; pass --manifest explicitly")
    return samples, test


def _training_rows(summary: dict[str, Any]) -> list[Sample]:
    """The scans the run could learn from: its training and validation subjects in its own manifest.

    Raises
    ------
    ModelInputError
        When the run's manifest is missing or unreadable.
    """
    split = summary["split"]
    subjects = set(split["train_subjects"]) | set(split.get("validation_subjects", []))
    return [s for s in read_manifest(Path(summary["config"]["manifest"])) if s.subject_id in subjects]


def _baseline(summary: dict[str, Any], evaluated: Sequence[Sample], cache: dict[Any, dict[str, Any]],
              features: dict[Path, np.ndarray], *, seed: int, n_boot: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The baseline on a run's split (computed once per distinct split), and the split's key."""
    try:
        train = _training_rows(summary)
    except ModelInputError as exc:
        return ("unreadable", summary["config"]["manifest"]), {"skipped": f"the run's training scans: {exc}"}
    key = (tuple((str(s.volume), s.note, s.label, s.subject_id) for s in train),
           tuple((str(s.volume), s.note, s.label, s.subject_id) for s in evaluated))
    if key not in cache:
        cache[key] = run_baseline(train, evaluated, seed=seed, n_boot=n_boot, cache=features)
    return key, cache[key]


def assess(samples: Sequence[Sample], pred: Predictions, temperature: float, *, seed: int = 0,
           n_boot: int = N_BOOTSTRAP) -> dict[str, Any]:
    """Metrics, bootstrap intervals and calibration of predictions on labelled scans.

    Parameters
    ----------
    samples : sequence of Sample
        The scans (labels, subjects), in the order of ``pred``.
    pred : Predictions
        From :func:`model.feed.predict` (probabilities after ``temperature``).
    temperature : float
        The run's temperature.
    seed : int
        Bootstrap seed.
    n_boot : int
        Bootstrap replicates.

    Returns
    -------
    dict
        ``metrics`` (:func:`classification_metrics`), ``intervals``
        (:func:`model.intervals.bootstrap_intervals` on the calibrated
        probabilities) and ``calibration`` (temperature, ECE raw and calibrated,
        bins).
    """
    y_true = np.array([s.label for s in samples], dtype=np.int64)
    raw = apply_temperature(pred.logits, 1.0) if len(y_true) else pred.probabilities
    return {
        "metrics": classification_metrics(y_true.tolist(), pred.predicted.tolist()),
        "intervals": bootstrap_intervals(y_true, pred.probabilities, [s.subject_id for s in samples],
                                         n_boot=n_boot, seed=seed) if len(y_true) else {},
        "calibration": {"temperature": temperature, "ece_raw": expected_calibration_error(raw, y_true),
                        "ece_calibrated": expected_calibration_error(pred.probabilities, y_true),
                        "bins_calibrated": calibration_bins(pred.probabilities, y_true)},
    }


def format_intervals(results: dict[str, dict[str, Any]]) -> str:
    """Per-run F1 and AUC with 95 % intervals, and calibration, as a Markdown table.

    Parameters
    ----------
    results : dict
        Run name to :func:`assess` output.

    Returns
    -------
    str
        One row per run.
    """
    keys = ["f1 AD", "f1 MCI", "f1 CN", "macro f1", "auc AD", "auc MCI", "auc CN", "macro auc"]
    lines = ["| run | " + " | ".join(k.replace("f1", "F1").replace("auc", "AUC") for k in keys)
             + " | ECE raw | ECE calibrated (T) |", "|---|" + "---:|" * (len(keys) + 2)]
    for name, r in results.items():
        cal = r["calibration"]
        lines.append(f"| {name} | " + " | ".join(format_interval(r["intervals"][k]) if r["intervals"] else "n/a"
                                                  for k in keys)
                     + f" | {cal['ece_raw']:.3f} | {cal['ece_calibrated']:.3f} ({cal['temperature']:.2f}) |")
    return "\n".join(lines)


def evaluate_runs(run_dirs: Sequence[Path], out_dir: Path, *, manifest: Path | None = None,
                  names: Sequence[str] | None = None, batch_size: int = 8, device: str = "cpu",
                  preprocessing: str | None = None, n_boot: int = N_BOOTSTRAP,
                  seed: int = 0) -> tuple[str, dict[str, Any]]:
    """Evaluate runs side by side; write ``confusion.png``, ``tsne.png``, ``calibration.png``, ``metrics.json``.

    Each run's results carry ``baseline``: :func:`model.baseline.run_baseline` fitted on
    the run's training and validation subjects and scored on the scans the run is
    evaluated on (or ``{"skipped": reason}``); runs sharing a split share it.

    Parameters
    ----------
    run_dirs : sequence of Path
        Run folders.
    out_dir : Path
        Where the figures and the metrics go.
    manifest : Path, optional
        Evaluate on this whole manifest instead of each run's held-out subjects.
    names : sequence of str, optional
        Column names (default: ``inputs`` of each run, else the folder name).
    batch_size : int
        Batch size.
    device : str
        Torch device the models run on.
    preprocessing : str or None
        The serving configuration's preprocessing identity the manifest must carry
        (:func:`model.dataset.check_preprocessing`); None: not checked.
    n_boot : int
        Bootstrap replicates.
    seed : int
        Bootstrap seed.

    Returns
    -------
    tuple
        The Markdown tables (the paper's, then intervals and calibration, then the
        baseline) and the results by run name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    baselines: dict[Any, dict[str, Any]] = {}
    baseline_runs: dict[Any, list[str]] = {}
    features: dict[Path, np.ndarray] = {}
    confusion: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    tsne: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    reliability: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]] = {}
    for k, run_dir in enumerate(run_dirs):
        model, summary = load_run(Path(run_dir))
        model.to(torch.device(device))
        name = names[k] if names else f"{summary['config']['inputs']}"
        if name in results:
            name = f"{name} ({Path(run_dir).name})"
        samples, idx = _rows(summary, manifest)
        check_preprocessing(samples, preprocessing)
        chosen = [samples[i] for i in idx]
        inputs = build_inputs(model, chosen, summary["config"]["inputs"])
        temperature = float(summary.get("temperature", 1.0))
        pred = predict(model, inputs, list(range(len(chosen))), batch_size, temperature=temperature)
        results[name] = assess(chosen, pred, temperature, seed=seed, n_boot=n_boot)
        key, results[name]["baseline"] = _baseline(summary, chosen, baselines, features, seed=seed, n_boot=n_boot)
        baseline_runs.setdefault(key, []).append(name)
        y_true = np.array([s.label for s in chosen])
        confusion[name] = (y_true, pred.predicted)
        tsne[name] = (pred.embeddings, y_true)
        reliability[name] = (pred.logits, y_true, pred.probabilities, temperature)
        logger.info("evaluated %s on %d scans: macro F1 %.3f", name, len(chosen),
                    results[name]["metrics"]["macro avg"]["f1"])
    plot_confusion(confusion, out_dir / "confusion.png")
    plot_tsne(tsne, out_dir / "tsne.png")
    plot_reliability(reliability, out_dir / "calibration.png")
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    tables = format_table({n: r["metrics"] for n, r in results.items()}) + "\n\n" + format_intervals(results)
    tables += "\n\n" + format_baseline([(runs, results[runs[0]]["baseline"]) for runs in baseline_runs.values()])
    return tables, results
