"""The five-seed table's reference rows (benchmarks/five_seeds.py): the generator's stage on a run's split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.five_seeds import REFERENCES, reference_results
from model.types import CLASSES

#: Latent stage around which each class is drawn (as model.cohort does: CN 0, MCI 0.5, AD 1).
CLASS_STAGE = {"CN": 0.0, "MCI": 0.5, "AD": 1.0}


def write_run(root: Path, *, spread: float, shuffle_stage: bool = False, with_stage: bool = True) -> Path:
    """A run folder whose manifest has 90 subjects, one scan each; 60 learned from, 30 tested."""
    rng = np.random.default_rng(7)
    labels = [CLASSES[i % 3] for i in range(90)]
    stages = np.array([CLASS_STAGE[label] for label in labels]) + rng.normal(0.0, spread, 90)
    if shuffle_stage:
        stages = rng.permutation(stages)
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject_id", "volume", "note", "label", *(["stage"] if with_stage else [])])
        for i, (label, stage) in enumerate(zip(labels, stages, strict=True)):
            note = f"Patient: 70-year-old. Cognitive testing: MMSE {25 + i % 5}/30."
            writer.writerow([f"S{i:03d}", f"v{i}.npy", note, label, *([f"{stage:.4f}"] if with_stage else [])])
    subjects = [f"S{i:03d}" for i in range(90)]
    run = root / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "config": {"manifest": str(manifest)},
        "split": {"train_subjects": subjects[:50], "validation_subjects": subjects[50:60],
                  "test_subjects": subjects[60:]}}), encoding="utf-8")
    return run


def f1_of(results: dict, key: str) -> float:
    """The point macro F1 of one reference row."""
    return float(results[REFERENCES[key]]["macro f1"]["value"])


def test_separable_stage_is_perfect(tmp_path: Path) -> None:
    results = reference_results(write_run(tmp_path, spread=0.02), n_boot=50)
    assert f1_of(results, "stage") == pytest.approx(1.0)
    interval = results[REFERENCES["stage"]]["macro f1"]
    assert interval["low"] <= interval["value"] <= interval["high"]


def test_overlapping_stage_is_imperfect_and_shuffled_is_near_chance(tmp_path: Path) -> None:
    overlap = reference_results(write_run(tmp_path / "a", spread=0.25), n_boot=50)
    assert 0.5 < f1_of(overlap, "stage") < 0.95
    shuffled = reference_results(write_run(tmp_path / "b", spread=0.02, shuffle_stage=True), n_boot=50)
    assert f1_of(shuffled, "stage") < 0.6
    assert set(shuffled) == set(REFERENCES.values())


def test_without_stage_no_reference(tmp_path: Path) -> None:
    assert reference_results(write_run(tmp_path, spread=0.02, with_stage=False), n_boot=50) == {}
