"""``dicom-node cohort prepare`` on scanner-like DICOM studies (tests/support/corpus.py) and a NIfTI file.

The studies go through the node's own selection, conversion and preprocessing with
the node's own settings; ``train`` then refuses the manifest under another serving
configuration.  Affordable corpus sizes (about 1.35 mm voxels), volumes pooled to 64^3.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.cli.main import main
from dicom_node.cli.model import serving_preprocessing
from dicom_node.runs.processing import PREPROCESSING_VERSION
from dicom_node.settings import load_settings
from model.dataset import check_preprocessing, read_manifest
from model.errors import ModelInputError
from model.labels import parse_label_map, read_labels


def test_prepare_runs_the_nodes_stages_and_tables_failures(scanner_cohort: tuple[Path, Path, str]) -> None:
    out, root, identity = scanner_cohort
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [r["scan_id"] for r in rows] == ["S1", "S2"]
    assert [r["label"] for r in rows] == ["AD", "MCI"]  # converters: Dementia -> AD, EMCI -> MCI
    assert rows[1]["scan_date"] == "2024-03-02"
    assert {r["preprocessing_version"] for r in rows} == {identity}
    t1_uid = {str(dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in (root / "dicom").rglob("t1/*")}
    assert {rows[0]["series_instance_uid"]} == t1_uid  # the node's rules chose the T1, not the localizer
    assert rows[1]["series_instance_uid"] == ""  # NIfTI: no selection
    failures = {r["scan_id"]: r for r in csv.DictReader((out / "failures.csv").open())}
    assert set(failures) == {"S3", "S4"}
    assert failures["S3"]["stage"] == "selection" and failures["S3"]["outcome"] == "no_suitable_series"
    assert failures["S4"]["stage"] == "input" and "does not exist" in failures["S4"]["reason"]
    volumes = [np.load(out / r["volume"]) for r in rows]
    for v in volumes:
        assert v.shape == (64, 64, 64) and v.dtype == np.float32
        assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0 and float(v.mean()) > 0.02
    # the DICOM study (the node's selection + conversion inside prepare) and its NIfTI give the same volume
    assert np.array_equal(volumes[0], volumes[1])


def test_second_run_comes_from_the_cache(scanner_cohort: tuple[Path, Path, str]) -> None:
    out, _, _ = scanner_cohort
    info = json.loads((out / "cohort.json").read_text())
    assert info["prepared"] == 2 and info["failed"] == 2
    assert info["cached"] == 3  # 2 volumes + the node's refusal of S3; a missing path is tried again
    assert info["labels"] == {"AD": 1, "MCI": 1, "CN": 0}


def test_preprocessing_version_is_the_serving_configurations(scanner_cohort: tuple[Path, Path, str]) -> None:
    out, _, identity = scanner_cohort
    settings = load_settings(environ={})
    assert identity == serving_preprocessing(settings) and identity.startswith(PREPROCESSING_VERSION + "+")
    samples = read_manifest(out / "manifest.csv")
    assert check_preprocessing(samples, identity) == identity
    other = serving_preprocessing(load_settings(environ={}, overrides={"processing.n4": False}))
    assert other != identity
    with pytest.raises(ModelInputError, match="not preprocessed as the node"):
        check_preprocessing(samples, other)


def test_train_and_evaluate_refuse_another_serving_preprocessing(scanner_cohort: tuple[Path, Path, str],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out, root, _ = scanner_cohort
    monkeypatch.setenv("DICOM_NODE_PROCESSING__N4", "false")
    assert main(["train", str(out / "manifest.csv"), "--out", str(root / "run"), "--demo-base",
                 "--no-progress"]) == 2
    assert "not preprocessed as the node preprocesses" in capsys.readouterr().err
    assert not (root / "run" / "run.json").exists()


def test_unversioned_manifest_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject_id,volume,note,label\nA,a.npy,,AD\n", encoding="utf-8")
    with pytest.raises(ModelInputError, match="'not recorded': 1 scan"):
        check_preprocessing(read_manifest(manifest), "1.0+abc")


def test_labels_file_names_every_bad_row(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("scan_id,subject_id,label,scan_date,path\n"
                      "A,P1,AD,2024-01-01,x\nA,P2,FTD,2024-01-01,y\nC,,CN,01/02/2024,z\n", encoding="utf-8")
    with pytest.raises(ModelInputError) as err:
        read_labels(labels)
    text = str(err.value)
    assert "2 bad row(s)" in text
    assert "line 3: label 'FTD'" in text and "scan_id repeats line 2" in text
    assert "line 4: subject_id is empty" in text and "scan_date '01/02/2024'" in text
    rows = read_labels(_ok(tmp_path), parse_label_map(["FTD=AD"]))
    assert [r.label for r in rows] == ["AD", "CN"]


def _ok(tmp_path: Path) -> Path:
    path = tmp_path / "ok.csv"
    path.write_text("scan_id,subject_id,label,scan_date,path\nA,P1,FTD,2024-01-01,x\nB,P1,nc,2024-06-01,y\n",
                    encoding="utf-8")
    return path
