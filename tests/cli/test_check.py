"""``dicom-node check PATH...``: the offline site check (selection, conversion, preprocessing, QC, key slices).

Two full preprocessing runs in all (the in-process check and the subprocess); the other cases stop
before preprocessing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from pydicom import dcmread

from dicom_node.cli.check import CheckUsageError, png_name, run_check
from dicom_node.cli.main import main
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series
from tests.conftest import make_settings

PATIENT = StudyHeader(
    patient_name="Sitecheck^Testpatient", patient_id="CHECK-PID-2718", patient_birth_date="19450505",
    patient_sex="F", study_instance_uid="1.2.826.0.1.3680043.10.1389.77.1", study_date="20261101",
    study_time="090000", accession_number="CHECK-ACC-1",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def brain() -> tuple[np.ndarray, np.ndarray]:
    return load_reference_brain("colin27")


@pytest.fixture(scope="module")
def t1_study(tmp_path_factory: pytest.TempPathFactory, brain: tuple[np.ndarray, np.ndarray]) -> Path:
    """A scanner's export: a sagittal 1 mm MPRAGE, a localizer, a DICOMDIR and a file that is not DICOM."""
    root = tmp_path_factory.mktemp("export")
    volume, affine = brain
    write_mr_series(volume, affine, root / "t1", study=PATIENT, series_number=3, orientation="sagittal")
    write_mr_series(volume, affine, root / "loc", study=PATIENT, series_number=1, kind="localizer")
    (root / "README.txt").write_text("exported by the scanner\n")
    (root / "DICOMDIR").write_bytes(b"\0" * 256)
    return root


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The node's data directory for this test; the check must not create it (no database, no spool)."""
    path = tmp_path / "node"
    monkeypatch.setenv("DICOM_NODE_STORAGE__DATA_DIR", str(path))
    return path


def _no_patient_data(text: str) -> None:
    for value in (PATIENT.patient_name, "Sitecheck", PATIENT.patient_id, PATIENT.accession_number,
                  PATIENT.patient_birth_date):
        assert value not in text


def _series_block(out: str, number: int) -> str:
    """The lines of one series in the text report: its header line and the indented lines under it."""
    match = re.search(rf"^  series {number} .*\n(?:      .*\n)*", out, re.MULTILINE)
    assert match, out
    return match.group(0)


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 30_000
    image = imread(path)
    assert image.ndim == 3 and image.shape[:2] == (440, 1000) and image.shape[2] in (3, 4)
    grey = image[..., :3].mean(axis=2)
    assert grey.std() > 0.1  # brain slices on black, not a blank page
    assert (grey < 0.05).mean() > 0.05 and (grey > 0.95).mean() > 0.05


@pytest.mark.slow
def test_t1_study_would_be_analysed(t1_study: Path, tmp_path: Path, data_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "pngs"
    status = main(["check", str(t1_study), "--out", str(out_dir)])
    captured = capsys.readouterr()
    assert status == 0, captured.out
    out = captured.out
    assert "192 file(s) read" in out and "190 DICOM instance(s), 1 study(ies), 2 series" in out
    assert "skipped: 1 DICOMDIR, 1 not DICOM" in out
    assert f"study {PATIENT.study_instance_uid}: 2 series" in out

    t1 = _series_block(out, 3)
    assert '"t1_mprage_sag_p2_iso"  MR  181 image(s)' in t1
    assert re.search(r"ACCEPTED \(score 7\): \+2 T1 protocol name", t1), t1
    localizer = _series_block(out, 1)
    assert '"localizer"  MR  9 image(s)' in localizer
    assert re.search(r"refused \(score 0\): rejected: 3D acquisition", localizer), localizer

    assert "converted: 181 x 217 x 181 voxels of 1 x 1 x 1 mm" in out
    qc = {m["label"].strip(): m for m in re.finditer(
        r"^    (?P<label>[A-Za-z/ ]+?)\s+(?P<value>[\d.]+)( mm)?\s+limit (?P<cmp>[<>]=) (?P<limit>[\d.]+)( mm)?\s+"
        r"(?P<verdict>ok|FAILED)$", out, re.MULTILINE)}
    assert set(qc) == {"slices", "slice thickness", "template correlation", "brain coverage", "WM/GM ratio"}
    assert all(m["verdict"] == "ok" for m in qc.values())
    assert qc["slices"]["value"] == "181" and qc["slices"]["limit"] == "100"
    assert float(qc["template correlation"]["value"]) >= 0.5 and qc["template correlation"]["limit"] == "0.5"
    assert qc["slice thickness"]["cmp"] == "<=" and qc["slice thickness"]["limit"] == "1.5"
    assert re.search(r"stage times: completeness [\d.]+ s, selection [\d.]+ s, conversion [\d.]+ s, "
                     r"preprocessing [\d.]+ s \(load [\d.]+ s, n4 [\d.]+ s, registration", out), out
    assert 'result: would be analysed: series 3 "t1_mprage_sag_p2_iso"' in out
    assert "summary: 1 of 1 study(ies) would be analysed" in out

    png = out_dir / png_name(PATIENT.study_instance_uid)
    assert f"key slices: {png}" in out
    _check_png(png)
    _no_patient_data(captured.out + captured.err)
    assert not data_dir.exists()  # no database, no spool


@pytest.mark.slow
def test_subprocess_json_summary(t1_study: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "pngs"
    env = {**os.environ, "DICOM_NODE_STORAGE__DATA_DIR": str(tmp_path / "node")}
    command = Path(sys.executable).parent / "dicom-node"
    result = subprocess.run([str(command), "check", str(t1_study), "--out", str(out_dir), "--json"],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["exit_status"] == 0 and summary["analysed"] == 1 and summary["not_analysed"] == 0
    assert summary["skipped"] == {"DICOMDIR": 1, "not DICOM": 1} and summary["instances"] == 190
    [study] = summary["studies"]
    assert study["analysed"] and study["preprocessed"] and study["reason"] is None
    by_description = {s["description"]: s for s in study["series"]}
    assert by_description["t1_mprage_sag_p2_iso"]["accepted"]
    assert study["chosen_series_instance_uid"] == by_description["t1_mprage_sag_p2_iso"]["series_instance_uid"]
    localizer = by_description["localizer"]
    assert not localizer["accepted"] and "rejected: 3D acquisition" in localizer["reasons"]
    assert set(study["qc"]) == {"slices", "slice_thickness_mm", "correlation", "coverage", "wm_gm_ratio"}
    assert all(q["ok"] for q in study["qc"].values())
    assert study["qc"]["coverage"]["limit"] == 0.95
    assert {"conversion", "preprocessing", "preprocessing.registration"} <= set(study["stage_seconds"])
    _check_png(Path(study["key_slices_png"]))
    _no_patient_data(result.stdout + result.stderr)
    assert not (tmp_path / "node").exists()


def test_localizer_only_is_not_analysed(tmp_path: Path, data_dir: Path, brain: tuple[np.ndarray, np.ndarray],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "export"
    write_mr_series(*brain, folder / "loc", study=PATIENT, series_number=1, kind="localizer")
    status = main(["check", str(folder), "--out", str(tmp_path / "pngs")])
    out = capsys.readouterr().out
    assert status == 1
    assert re.search(r"refused \(score 0\): rejected: 3D acquisition", _series_block(out, 1)), out
    assert "result: not analysed: no suitable 3D T1 series (1 series considered)" in out
    assert (f"not analysed: study {PATIENT.study_instance_uid}: no suitable 3D T1 series" in
            out.split("summary:")[1])
    assert "converted:" not in out and not (tmp_path / "pngs").exists()


def test_no_preprocess_stops_after_conversion(t1_study: Path, tmp_path: Path, data_dir: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["check", str(t1_study / "t1"), str(t1_study / "loc"), "--no-preprocess",
                   "--out", str(tmp_path / "pngs")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "converted: 181 x 217 x 181 voxels" in out and "QC (converted volume):" in out
    [stages] = re.findall(r"^  stage times: (.*)$", out, re.MULTILINE)
    assert "conversion" in stages and "preprocessing" not in stages and "template correlation" not in out
    assert "result: converted; preprocessing and image QC not run (--no-preprocess)" in out
    assert not (tmp_path / "pngs").exists()


def test_incomplete_series_is_not_analysed(t1_study: Path, tmp_path: Path, data_dir: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "export"
    shutil.copytree(t1_study, folder, ignore=shutil.ignore_patterns("MR003_0090.dcm"))
    status = main(["check", str(folder), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert status == 1 and summary["exit_status"] == 1
    [study] = summary["studies"]
    assert study["outcome"] == "incomplete_series"
    assert study["reason"] == ("incomplete series: series 3 (t1_mprage_sag_p2_iso): "
                               "180 of 181 images received (ImagesInAcquisition)")
    assert study["converted"] is None


def test_instances_the_node_would_refuse(tmp_path: Path, data_dir: Path, brain: tuple[np.ndarray, np.ndarray],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "export"
    for path in write_mr_series(*brain, folder, study=PATIENT, series_number=1, kind="localizer"):
        ds = dcmread(path)
        ds.Modality = "CT"
        ds.save_as(path)
    status = main(["check", str(folder)])
    out = capsys.readouterr().out
    assert status == 1
    assert "refused at C-STORE: 9 of 9 instance(s): 0xA900 Modality is 'CT', not 'MR'" in out
    assert "result: not analysed: the node would refuse every instance of the study at C-STORE" in out


def test_no_dicom_is_a_usage_error(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["check", str(empty)]) == 2
    assert "no DICOM instance found in 1 path(s) (0 file(s) read)" in capsys.readouterr().err

    (empty / "notes.txt").write_text("not an image\n")
    assert main(["check", str(empty), "--json"]) == 2
    captured = capsys.readouterr()
    assert "(1 file(s) read; skipped: 1 not DICOM)" in captured.err
    assert json.loads(captured.out)["exit_status"] == 2

    assert main(["check", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(CheckUsageError, match=r"no such file or folder: .*missing$"):
        run_check(make_settings(tmp_path), [tmp_path / "missing"])
    assert not data_dir.exists()
