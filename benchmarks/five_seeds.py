"""Five seeds of the synthetic-cohort results, with the baseline on each seed's split.

For every seed (default 0-4; the seed sets the subject split, the shuffles and the
initialisation of the seeded parts: ``--seed S --base-seed S``) this trains the
Brain-Adapter on MRI, on the note and on both with ``dicom-node train``, evaluates
the three runs with ``dicom-node evaluate`` (which fits the logistic-regression
baseline of :mod:`model.baseline` on the same split), and collects the held-out
macro F1 and macro AUC with their bootstrap 95 % intervals.  Writes, under ``--out``::

    seed<S>/<mri|note|mri+note>/   run folders (a finished run is reused, not retrained)
    seed<S>/eval/                  evaluate's metrics.json and figures
    five_seeds.json                every number of the table
    five_seeds.md                  the table: one row per model, one column per seed, mean and SD

Beside the models and the baseline, two reference rows show what this cohort allows: the
same logistic regression as the baseline (:func:`model.baseline.fit_predict`, same
training subjects, same test scans, same bootstrap) on the generator's latent disease
stage (the manifest's ``stage`` column written by :mod:`model.cohort`: the variable
behind every scan's atrophy, so no image model can know more about the label than
it), alone and with the note's five numbers.  They exist only for synthetic cohorts
and are left out when the manifest has no ``stage``.

Nothing here chooses anything: the recipe is fixed beforehand (the train arguments),
and the test subjects of each seed are only scored.

Usage::

    .venv/bin/python -m benchmarks.five_seeds --out var/five_seeds          # the cohort of README
    .venv/bin/python -m benchmarks.five_seeds --out var/five_seeds --seeds 0 1 --epochs 5
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.baseline import fit_predict
from model.intervals import N_BOOTSTRAP, bootstrap_intervals
from model.notenumbers import NOTE_FEATURES, parse_note
from model.types import CLASSES

logger = logging.getLogger(__name__)

#: The three input modes and their names in the table.
INPUTS = {"mri": "MRI", "note": "note", "mri+note": "MRI+note"}

#: The baseline's three feature sets (model.baseline.FEATURE_SETS) and their names in the table.
BASELINES = {"MRI features": "baseline: logistic regression, 7 MRI features",
             "note numbers": "baseline: logistic regression, 5 note numbers",
             "both": "baseline: logistic regression, both"}

#: The reference rows (generator columns) and their names in the table.
REFERENCES = {"stage": "reference: logistic regression, the generator's latent stage",
              "stage+note": "reference: logistic regression, latent stage + 5 note numbers"}

#: How the Brain-Adapter is trained on every seed (the committed demonstration recipe).
TRAIN_ARGS = ("--demo-base --demo-vision model/demo/vision.safetensors --note-numbers --epochs 20 "
              "--lr-projection 1e-3 --lr-head 1e-2")

#: The synthetic cohort of README.
COHORT_ARGS = "--subjects 240 --size 64 --seed 1"


def dicom_node(*args: str) -> None:
    """Run ``dicom-node`` with this interpreter; raise on failure."""
    cmd = [sys.executable, "-m", "dicom_node.cli.main", *args]
    logger.info("%s", shlex.join(["dicom-node", *args]))
    subprocess.run(cmd, check=True)


def finished(run: Path) -> bool:
    """Whether ``run`` holds a finished training run."""
    summary = run / "run.json"
    return summary.is_file() and bool(json.loads(summary.read_text(encoding="utf-8")).get("finished"))


def seed_results(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Macro F1 and macro AUC (value, low, high) of each model of one seed's ``metrics.json``."""
    rows: dict[str, dict[str, Any]] = {}
    for name in INPUTS.values():
        intervals = metrics[name]["intervals"]
        rows[f"Brain-Adapter, {name}"] = {"macro f1": intervals["macro f1"], "macro auc": intervals["macro auc"]}
    baseline = metrics[INPUTS["mri"]]["baseline"]
    for key, label in BASELINES.items():
        intervals = baseline["results"][key]["intervals"]
        rows[label] = {"macro f1": intervals["macro f1"], "macro auc": intervals["macro auc"]}
    return rows


def reference_results(run: Path, *, n_boot: int = N_BOOTSTRAP, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Macro F1 and macro AUC of the reference rows on one run's split; empty without a ``stage`` column.

    Parameters
    ----------
    run : Path
        A finished run folder (its ``run.json`` names the manifest and the split).
    n_boot, seed : int
        Bootstrap replicates and seed (those of ``evaluate``, so the intervals compare).

    Returns
    -------
    dict
        :data:`REFERENCES` label to ``{"macro f1": ..., "macro auc": ...}`` (value, low, high).
    """
    summary = json.loads((run / "run.json").read_text(encoding="utf-8"))
    manifest = Path(summary["config"]["manifest"])
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "stage" not in rows[0]:
        return {}
    split = summary["split"]
    learned = set(split["train_subjects"]) | set(split.get("validation_subjects", []))
    tested = set(split["test_subjects"])

    def columns(row: dict[str, str], with_note: bool) -> list[float]:
        numbers = parse_note(row["note"] or "") if with_note else {}
        return [float(row["stage"]), *(numbers[c] for c in NOTE_FEATURES if with_note)]

    train = [r for r in rows if r["subject_id"] in learned]
    test = [r for r in rows if r["subject_id"] in tested]
    y_train = np.array([CLASSES.index(r["label"]) for r in train], dtype=np.int64)
    y_test = np.array([CLASSES.index(r["label"]) for r in test], dtype=np.int64)
    results: dict[str, dict[str, Any]] = {}
    for key, label in REFERENCES.items():
        with_note = key == "stage+note"
        x_train = np.array([columns(r, with_note) for r in train], dtype=np.float64)
        x_test = np.array([columns(r, with_note) for r in test], dtype=np.float64)
        intervals = bootstrap_intervals(y_test, fit_predict(x_train, y_train, x_test, seed=seed),
                                        [r["subject_id"] for r in test], n_boot=n_boot, seed=seed)
        results[label] = {"macro f1": intervals["macro f1"], "macro auc": intervals["macro auc"]}
    return results


def format_table(by_seed: dict[int, dict[str, dict[str, Any]]], metric: str = "macro f1") -> str:
    """Markdown: one row per model, one column per seed (value [95 % interval]), mean and SD over seeds."""
    seeds = sorted(by_seed)
    models = list(by_seed[seeds[0]])
    lines = [f"| model ({metric}, held-out subjects) | " + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | SD |", "|---|" + "---:|" * (len(seeds) + 2)]
    for model in models:
        values = [by_seed[s][model][metric]["value"] for s in seeds]
        cells = [f"{e['value']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"
                 for e in (by_seed[s][model][metric] for s in seeds)]
        lines.append(f"| {model} | " + " | ".join(cells)
                     + f" | {np.mean(values):.2f} | {np.std(values, ddof=1) if len(values) > 1 else 0.0:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate and tabulate; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cohort", type=Path, default=Path("var/cohort64"),
                        help=f"cohort folder (made with `synth cohort {COHORT_ARGS}` when it has no manifest)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, help="override the recipe's --epochs (quick checks)")
    parser.add_argument("--train-args", default=TRAIN_ARGS, help="arguments of every `dicom-node train`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    manifest = args.cohort / "manifest.csv"
    if not manifest.is_file():
        dicom_node("synth", "cohort", "--out", str(args.cohort), *shlex.split(COHORT_ARGS))
    train_args = shlex.split(args.train_args) + (["--epochs", str(args.epochs)] if args.epochs else [])
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for seed in args.seeds:
        root = args.out / f"seed{seed}"
        runs = []
        for inputs in INPUTS:
            run = root / inputs
            if not finished(run):
                dicom_node("train", str(manifest), "--out", str(run), "--inputs", inputs, "--seed", str(seed),
                           "--base-seed", str(seed), "--no-progress", *train_args)
            runs.append(str(run))
        dicom_node("evaluate", *runs, "--out", str(root / "eval"), "--names", *INPUTS.values())
        metrics = json.loads((root / "eval" / "metrics.json").read_text(encoding="utf-8"))
        by_seed[seed] = seed_results(metrics) | reference_results(root / "mri")
    table = format_table(by_seed) + "\n\n" + format_table(by_seed, "macro auc")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "five_seeds.json").write_text(json.dumps(
        {"train_args": train_args, "cohort": str(manifest), "seeds": args.seeds,
         "results": {str(k): v for k, v in by_seed.items()},
         "seconds": round(time.perf_counter() - started, 1)}, indent=2) + "\n", encoding="utf-8")
    (args.out / "five_seeds.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
