"""The model card written with every trained model (``MODEL_CARD.md`` in the run folder).

Written for the clinician and the person who deploys the model: what it is, what
it was trained and tested on, how well it did with 95 % intervals, how well its
probabilities are calibrated, and what it must not be used for.  Built from the
run's summary (``run.json``) only, so it can be rewritten from any finished run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from model.dataset import SYNTHETIC
from model.types import CLASSES

logger = logging.getLogger(__name__)

MODEL_CARD_FILE = "MODEL_CARD.md"


def _ci(entry: dict[str, Any] | None) -> str:
    if not entry or entry["value"] is None or math.isnan(entry["value"]):
        return "n/a"
    if math.isnan(entry["low"]):
        return f"{entry['value']:.2f}"
    return f"{entry['value']:.2f} ({entry['low']:.2f}-{entry['high']:.2f})"


def model_card(summary: dict[str, Any]) -> str:
    """The model card of a run, as Markdown.

    Parameters
    ----------
    summary : dict
        The run's ``run.json``.

    Returns
    -------
    str
        The card.
    """
    config, split = summary["config"], summary["split"]
    metrics, intervals, cal = summary["test_metrics"], summary.get("test_intervals", {}), summary["calibration"]
    preprocessing = summary.get("preprocessing_version", "")
    synthetic = preprocessing == SYNTHETIC
    base = summary["base"]
    base_text = "the seeded demonstration base (random frozen ViT, MiniLM text tower)" if base.get("kind") == "demo" \
        else f"the model directory {base.get('path', '')}"
    status = "**Demonstration only: trained on synthetic data, not for clinical use.**" if synthetic else \
        "**Research use only.** Not a medical device; its output is not a diagnosis."
    lines = [
        "# Model card: Brain-Adapter (AD / MCI / CN)", "", status, "",
        "## Model", "",
        f"* Architecture: Brain-Adapter (arXiv 2501.16282): 3D adapter + frozen M3D-CLIP-style ViT, projections, "
        f"image head{' and fusion head over the clinical note' if config['inputs'] != 'mri' else ''}.",
        f"* Base: {base_text}; base weights SHA-256 `{summary['base_weights_sha256']}`.",
        f"* Preset {config['preset']}, inputs `{config['inputs']}`; trainable parameters: "
        + ", ".join(f"{k} {v:,}" for k, v in summary["trainable_parameters"].items()) + ".",
        f"* Input: the node's preprocessed volume {'x'.join(map(str, summary['input_shape']))} "
        f"(preprocessing `{preprocessing or 'not recorded'}`).",
        "* A scan without a note is classified by the image-only head (in training, evaluation and inference).",
        f"* Output: probabilities of {', '.join(CLASSES)} after temperature scaling (T = "
        f"{summary.get('temperature', 1.0):.3f}, fitted on the validation subjects).", "",
        "## Data", "",
        f"* Manifest SHA-256 `{summary['manifest_sha256']}`"
        + (" (synthetic cohort, `dicom-node synth cohort`)." if synthetic else "."),
        f"* Split by subject, stratified by label (seed {config['seed']}): "
        f"{len(split['train_subjects'])} training subjects ({split['train_scans']} scans), "
        f"{len(split.get('validation_subjects', []))} validation ({split.get('validation_scans', 0)}), "
        f"{len(split['test_subjects'])} test ({split['test_scans']}).",
    ]
    for part, counts in split.get("labels", {}).items():
        notes = split.get("notes", {}).get(part, 0)
        lines.append(f"* {part}: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + f"; {notes} with a note.")
    lines += ["", "## Performance on the held-out test subjects", "",
              f"{metrics['n']} scans. 95 % intervals: subject-level bootstrap "
              f"({next(iter(intervals.values()))['replicates'] if intervals else 0} replicates).", "",
              "| class | precision | sensitivity | F1 (95 % CI) | one-vs-rest AUC (95 % CI) | n |",
              "|---|---:|---:|---:|---:|---:|"]
    for c in CLASSES:
        m = metrics[c]
        lines.append(f"| {c} | {m['precision']:.2f} | {m['sensitivity']:.2f} | {_ci(intervals.get(f'f1 {c}'))} "
                     f"| {_ci(intervals.get(f'auc {c}'))} | {m['support']} |")
    lines += [f"| macro | {metrics['macro avg']['precision']:.2f} | {metrics['macro avg']['sensitivity']:.2f} "
              f"| {_ci(intervals.get('macro f1'))} | {_ci(intervals.get('macro auc'))} | {metrics['n']} |",
              f"| accuracy | {metrics['accuracy']:.2f} | | | | |", "",
              "## Calibration", "",
              f"Expected calibration error on the test subjects (10 bins, top class): {cal['ece_raw']:.3f} before, "
              f"{cal['ece_calibrated']:.3f} after temperature scaling (T = {cal['temperature']:.3f}, fitted on "
              f"{cal.get('validation_scans', 0)} validation scans). `dicom-node evaluate` draws the reliability "
              "diagram (`calibration.png`).", "",
              "## Limitations", "",
              "* Small test sets give wide intervals: read the intervals, not the point values.",
              "* Valid only for volumes preprocessed by the node's preprocessing named above; `train` and "
              "`evaluate` refuse other manifests, and the node must serve with the same settings.",
              "* Trained and tested on one cohort; performance on other scanners, sites and populations is unknown "
              "until measured there.",
              "* The classes are research categories; a probability is not a diagnosis.", ""]
    if synthetic:
        lines.insert(-1, "* The training data are synthetic (one real brain, simulated atrophy and notes): the "
                         "figures say the code learns, nothing about patients.")
    return "\n".join(lines)


def write_model_card(path: Path, summary: dict[str, Any]) -> Path:
    """Write :func:`model_card` to ``path``."""
    Path(path).write_text(model_card(summary), encoding="utf-8")
    return Path(path)
