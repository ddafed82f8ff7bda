"""Issue #15's "done when": a site's path from M3D-CLIP and labelled scanner DICOM to a calibrated model.

``model import-m3d-clip`` on a checkpoint in the published layout (the tiny layout of
the committed fixture: M3D's key names, small sizes), ``cohort prepare`` on
scanner-like DICOM with a subject whose diagnosis converts (CN, then MCI), ``train
--lora 2`` on that base, ``evaluate`` with bootstrap intervals and calibration, and
``model export`` to the node's predictor.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dicom_node.cli.main import main
from model.inference import Predictor
from model.types import CLASSES
from tests.support.corpus import write_variant
from tests.support.m3d_clip import write_m3d_clip_folder

#: A second scanner's study, so that the cohort holds two different brains.
OTHER_STUDY = "ge_ax_bravo_172_implicit"

#: subject, label as the site writes it, scan date, note, study (A: the shared fixture's, B: OTHER_STUDY)
ROWS = [
    ("C01", "CN", "2021-05-03", "MMSE 29/30. No complaints.", "A"),  # converts: CN ...
    ("C01", "MCI", "2024-06-10", "MMSE 26/30; his wife notices repeated questions.", "B"),  # ... then MCI
    ("P02", "AD", "2024-01-09", "MMSE 19/30, CDR-SB 5.0.", "A"),
    ("P03", "Dementia", "2024-01-12", "", "B"),
    ("P04", "AD", "2024-02-02", "MMSE 18/30.", "B"),
    ("P05", "AD", "2024-02-20", "CDR-SB 6.5.", "A"),
    ("P06", "EMCI", "2024-03-01", "MMSE 27/30.", "A"),
    ("P07", "LMCI", "2024-03-08", "", "B"),
    ("P08", "MCI", "2024-03-15", "Word-finding pauses for a year.", "A"),
    ("P09", "NC", "2024-04-01", "MMSE 30/30.", "B"),
    ("P10", "CN", "2024-04-03", "", "A"),
    ("P11", "CN", "2024-04-09", "MMSE 29/30.", "B"),
    ("P12", "MCI", "2024-04-22", "MMSE 25/30.", "B"),
]


@pytest.mark.slow
def test_import_prepare_train_lora_evaluate_serve(scanner_cohort: tuple[Path, Path, str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cohort, inputs, identity = scanner_cohort
    study_a = next((inputs / "dicom").iterdir())
    write_variant(OTHER_STUDY, tmp_path / "dicom")
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["scan_id", "subject_id", "label", "scan_date", "note", "path"])
        for k, (subject, label, date, note, study) in enumerate(ROWS):
            path = study_a if study == "A" else tmp_path / "dicom" / OTHER_STUDY
            writer.writerow([f"X{k:02d}", subject, label, date, note, str(path)])
    prepared = tmp_path / "cohort"
    shutil.copytree(cohort, prepared)  # the fixture's cache: study A is not preprocessed again
    assert main(["cohort", "prepare", str(labels), "--out", str(prepared), "--size", "64", "--no-progress"]) == 0
    manifest = prepared / "manifest.csv"
    rows = list(csv.DictReader(manifest.open()))
    assert len(rows) == len(ROWS) and {r["preprocessing_version"] for r in rows} == {identity}
    assert [r["label"] for r in rows if r["subject_id"] == "C01"] == ["CN", "MCI"]

    src, text_config, _ = write_m3d_clip_folder(tmp_path / "M3D-CLIP", "tiny")
    base = tmp_path / "base"
    assert main(["model", "import-m3d-clip", str(src), "--out", str(base), "--text-config", str(text_config),
                 "--input-size", "64"]) == 0

    run = tmp_path / "run"
    assert main(["train", str(manifest), "--out", str(run), "--base", str(base), "--lora", "2", "--epochs", "2",
                 "--batch-size", "4", "--test-fraction", "0.3", "--val-fraction", "0.2", "--no-progress"]) == 0
    summary = json.loads((run / "run.json").read_text())
    split = summary["split"]
    assert ("C01" in split["test_subjects"]) + ("C01" in split["train_subjects"]) \
        + ("C01" in split["validation_subjects"]) == 1  # both of the converter's scans on one side
    assert summary["lora"]["rank"] == 2 and (run / "lora" / "adapter_config.json").is_file()
    assert summary["base"]["kind"] == "dir" and split["validation_scans"] >= 2
    assert summary["temperature"] > 0 and summary["calibration"]["validation_scans"] == split["validation_scans"]

    capsys.readouterr()
    assert main(["evaluate", str(run), "--out", str(tmp_path / "eval"), "--bootstrap", "50"]) == 0
    table = capsys.readouterr().out
    assert "ECE raw" in table and "macro F1" in table
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    result = next(iter(metrics.values()))
    assert result["metrics"]["n"] == split["test_scans"]
    interval = result["intervals"]["macro f1"]
    assert interval["low"] <= interval["value"] <= interval["high"]
    assert result["calibration"]["temperature"] == pytest.approx(summary["temperature"])
    assert (tmp_path / "eval" / "calibration.png").stat().st_size > 0

    served = tmp_path / "served"
    assert main(["model", "export", str(run), "--out", str(served)]) == 0
    predictor = Predictor.load(served)
    assert predictor.temperature == summary["temperature"] and predictor.info.demonstration is True
    assert main(["model", "export", str(run), "--out", str(tmp_path / "validated"), "--clinical"]) == 0
    assert Predictor.load(tmp_path / "validated").info.demonstration is False
    volume = np.load(prepared / rows[0]["volume"]).astype(np.float32)
    prediction = predictor.predict(volume, rows[0]["note"])
    assert tuple(prediction.probabilities) == CLASSES and sum(prediction.probabilities.values()) == pytest.approx(1)
