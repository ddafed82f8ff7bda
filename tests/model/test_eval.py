"""Tests of evaluation (model.evaluate, ``dicom-node evaluate``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from dicom_node.cli.main import main
from model.cohort import CohortConfig, generate_cohort
from model.evaluate import classification_metrics, format_table
from model.train import TrainConfig, train
from model.types import CLASSES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("eval")
    manifest = generate_cohort(root / "cohort", CohortConfig(n_subjects=16, size=32, seed=7))
    run = train(TrainConfig(manifest=str(manifest), out_dir=str(root / "run"), inputs="mri+note", epochs=1,
                            batch_size=4, progress=False, demo_base=True))
    return [run, run]  # one run shown twice: side-by-side columns without a second training


def test_metrics_match_hand_computed_values() -> None:
    ad, mci, cn = (CLASSES.index(c) for c in ("AD", "MCI", "CN"))
    m = classification_metrics([ad, ad, mci, cn], [ad, mci, mci, cn])
    assert m["AD"] == {"precision": 1.0, "sensitivity": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["MCI"]["precision"] == 0.5 and m["MCI"]["sensitivity"] == 1.0
    assert m["accuracy"] == 0.75
    assert m["macro avg"]["sensitivity"] == pytest.approx((0.5 + 1 + 1) / 3)
    table = format_table({"x": m})
    assert "| AD | 1.00 | 0.50 | 0.67 |" in table and "weighted avg" in table


def test_evaluate_cli_prints_table_and_writes_figures(runs: list[Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    status = main(["evaluate", *map(str, runs), "--out", str(out), "--names", "MRI", "MRI+note"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "MRI PRE" in printed and "MRI+note F1" in printed
    for row in ("| AD |", "| CN |", "| MCI |", "| macro avg |", "| weighted avg |"):
        assert row in printed
    for name in ("confusion.png", "tsne.png", "calibration.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads((out / "metrics.json").read_text())["MRI"]
    macro = metrics["intervals"]["macro f1"]
    assert macro["low"] <= macro["value"] <= macro["high"] and macro["replicates"] == 1000
    assert macro["value"] == pytest.approx(metrics["metrics"]["macro avg"]["f1"])
    assert "| run | F1 AD | F1 MCI | F1 CN | macro F1 |" in printed and "ECE calibrated (T)" in printed
    # the baseline on the same split, once for the two columns that share it, in the output and in metrics.json
    summary = json.loads((runs[0] / "run.json").read_text())
    fitted = summary["split"]["train_scans"] + summary["split"]["validation_scans"]
    scored = summary["split"]["test_scans"]
    assert "| baseline | split of | fitted / scored scans | F1 AD |" in printed
    for row in ("MRI features", "note numbers", "both"):
        assert printed.count(f"| {row} | MRI, MRI+note | {fitted} / {scored} | ") == 1
    written = json.loads((out / "metrics.json").read_text())
    baseline = written["MRI"]["baseline"]
    assert written["MRI+note"]["baseline"] == baseline
    assert (baseline["train_scans"], baseline["evaluated_scans"]) == (fitted, scored)
    both = baseline["results"]["both"]["intervals"]["macro f1"]
    assert both["low"] <= both["value"] <= both["high"] and both["replicates"] == 1000


def test_evaluate_says_why_the_baseline_is_skipped(runs: list[Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    summary = json.loads((runs[0] / "run.json").read_text())
    manifest = Path(summary["config"]["manifest"])
    moved = tmp_path / "run"
    shutil.copytree(runs[0], moved)
    summary["config"]["manifest"] = str(tmp_path / "gone" / "manifest.csv")  # the run's training data is gone
    (moved / "run.json").write_text(json.dumps(summary))
    status = main(["evaluate", str(moved), "--out", str(tmp_path / "report"), "--manifest", str(manifest),
                   "--bootstrap", "20"])
    printed = capsys.readouterr().out
    assert status == 0 and "| macro avg |" in printed
    assert "baseline skipped for mri+note: the run's training scans: manifest not found" in printed
    skipped = json.loads((tmp_path / "report" / "metrics.json").read_text())["mri+note"]["baseline"]
    assert skipped["skipped"].startswith("the run's training scans: manifest not found")


def test_training_stores_the_temperature_and_writes_a_model_card(runs: list[Path]) -> None:
    summary = json.loads((runs[0] / "run.json").read_text())
    with safe_open(str(runs[0] / "adapter.safetensors"), framework="pt") as fh:
        assert float(fh.metadata()["temperature"]) == pytest.approx(summary["temperature"])
    assert summary["split"]["validation_scans"] > 0 and summary["preprocessing_version"] == "synthetic"
    assert not set(summary["split"]["validation_subjects"]) & set(summary["split"]["test_subjects"])
    card = (runs[0] / "MODEL_CARD.md").read_text()
    assert "not for clinical use" in card and f"T = {summary['temperature']:.3f}" in card
    assert "| macro |" in card and "95 % intervals: subject-level bootstrap (1000 replicates)" in card
