"""Tests of training (model.train, model.dataset) and of the committed demonstration model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from torch import nn

from model.cohort import CohortConfig, generate_cohort
from model.dataset import Sample, read_manifest, subject_split
from model.demo import build_demo_base, state_sha256
from model.errors import ModelInputError, ModelLoadError
from model.evaluate import load_run
from model.finetune import load_adapter_file
from model.inference import Predictor, init_demo_model
from model.train import TrainConfig, train
from model.types import CLASSES


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("cohort"), CohortConfig(n_subjects=14, size=32, seed=5))


def test_subject_split_keeps_each_subject_on_one_side() -> None:
    rng = np.random.default_rng(0)
    samples = [Sample(f"S{s:03d}", Path(f"{s}_{v}.npy"), "", s % 3) for s in range(60)
               for v in range(int(rng.integers(1, 4)))]
    train_idx, test_idx = subject_split(samples, 0.3, seed=1)
    train_subjects = {samples[i].subject_id for i in train_idx}
    test_subjects = {samples[i].subject_id for i in test_idx}
    assert not train_subjects & test_subjects
    assert sorted(train_idx + test_idx) == list(range(len(samples)))
    assert len(test_subjects) == 18  # 30 % of each class's 20 subjects
    assert {samples[i].label for i in test_idx} == {0, 1, 2}


def test_subject_split_rejects_bad_fraction() -> None:
    samples = [Sample("A", Path("a.npy"), "", 0), Sample("A", Path("b.npy"), "", 1)]
    with pytest.raises(ModelInputError, match="test_fraction"):
        subject_split(samples, 1.5, seed=0)


def test_a_subject_whose_diagnosis_changes_is_split_by_its_latest_scan() -> None:
    # 10 converters (CN at the first visit, AD at the second, listed latest-first) and 10 stable CN subjects
    ad, cn = CLASSES.index("AD"), CLASSES.index("CN")
    samples = []
    for s in range(10):
        samples += [Sample(f"P{s}", Path(f"p{s}b.npy"), "", ad, scan_date="2024-05-01"),
                    Sample(f"P{s}", Path(f"p{s}a.npy"), "", cn, scan_date="2021-02-01")]
    samples += [Sample(f"S{s}", Path(f"s{s}.npy"), "", cn, scan_date="2022-01-01") for s in range(10)]
    train_idx, test_idx = subject_split(samples, 0.3, seed=3)
    test_subjects = {samples[i].subject_id for i in test_idx}
    assert not test_subjects & {samples[i].subject_id for i in train_idx}
    # stratified by the latest label: 3 of the 10 converters (AD now) and 3 of the 10 stable CN subjects
    assert sum(s.startswith("P") for s in test_subjects) == 3
    assert sum(s.startswith("S") for s in test_subjects) == 3


def test_manifest_needs_its_columns(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("subject_id,volume,label\nA,a.npy,AD\n", encoding="utf-8")
    with pytest.raises(ModelInputError, match="note"):
        read_manifest(bad)


def test_train_checkpoints_and_resumes(manifest: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = TrainConfig(manifest=str(manifest), out_dir=str(run), inputs="mri+note", epochs=2, batch_size=4,
                         max_steps=2, progress=False, activation_checkpointing=True, demo_base=True)
    train(config)
    summary = json.loads((run / "run.json").read_text())
    assert (run / "checkpoint.pt").is_file() and (run / "adapter.safetensors").is_file()
    assert summary["steps"] == 2 and summary["finished"] is False
    assert set(summary["trainable_parameters"]) == {"adapter", "projections", "heads"}
    assert not set(summary["split"]["train_subjects"]) & set(summary["split"]["test_subjects"])

    train(TrainConfig(**{**config.__dict__, "max_steps": None, "resume": True}))
    summary = json.loads((run / "run.json").read_text())
    per_epoch = math.ceil(summary["split"]["train_scans"] / 4)
    assert summary["finished"] is True
    assert summary["steps"] == 2 * per_epoch
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert set(summary["test_metrics"]["macro avg"]) == {"precision", "sensitivity", "f1", "support"}
    model, _ = load_run(run)
    assert cast(nn.Conv3d, model.adapter.branch[-1]).weight.abs().sum() > 0  # the zero-initialised layer has moved


def test_training_needs_a_base_with_text_for_notes(manifest: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelInputError, match="inputs must be"):
        TrainConfig(manifest=str(manifest), out_dir=str(tmp_path), inputs="pet")


def test_trained_demo_model_accepts_the_node_input(tmp_path: Path) -> None:
    out = init_demo_model(tmp_path / "demo")
    predictor = Predictor.load(out)
    info = predictor.info
    assert info.demonstration is True and "synthetic" in info.name
    assert info.parameters["input_shape"] == "256x256x256"
    volume = np.random.default_rng(0).random((256, 256, 256), dtype=np.float32)
    prediction = predictor.predict(volume, "72-year-old woman, 16 years of education. MMSE 29/30, CDR-SB 0.0.")
    assert prediction.used_note is True
    assert tuple(prediction.probabilities) == CLASSES
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0)


def test_demo_parts_refuse_another_base() -> None:
    from model.demo import DEMO_DIR

    other = build_demo_base(64, seed=1, use_note=True, input_pool=4)
    with pytest.raises(ModelLoadError, match="trained on base weights"):
        load_adapter_file(other, DEMO_DIR / "adapter.safetensors", base_weights_sha256=state_sha256(other))
