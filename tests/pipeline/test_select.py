"""Declarative series selection on synthetic studies (config/series_selection.toml)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from core.errors import ConfigError, NotAnalysed, Outcome
from pipeline.select import (
    DEFAULT_RULES_PATH,
    NoSuitableSeries,
    SelectionRules,
    SeriesCandidate,
    load_rules,
    select_series,
)
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series
from tests.support.instances import pydicom_test_file

STUDY = StudyHeader(patient_name="Test^Select", patient_id="S0001", patient_birth_date="19500101",
                    patient_sex="M", study_instance_uid="1.2.826.0.1.3680043.8.498.777",
                    study_date="20240110", study_time="080000", accession_number="ACC77")


@pytest.fixture(scope="module")
def brain() -> tuple[np.ndarray, np.ndarray]:
    """A 1 mm block of Colin27 (120 x 140 x 110 voxels) to keep series small."""
    volume, affine = load_reference_brain("colin27")
    aff = affine.copy()
    aff[:3, 3] = (affine @ np.array([30, 40, 40, 1]))[:3]
    return np.ascontiguousarray(volume[30:150, 40:180, 40:150]), aff


@pytest.fixture
def rules() -> SelectionRules:
    return load_rules(DEFAULT_RULES_PATH)


def _candidate(files: list[Path]) -> SeriesCandidate:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return SeriesCandidate(str(headers[0].SeriesInstanceUID), headers)


def _series(brain, tmp: Path, number: int, **kwargs: object) -> SeriesCandidate:
    volume, affine = brain
    files = write_mr_series(volume, affine, tmp / f"s{number}", study=STUDY, series_number=number,
                            **kwargs)  # type: ignore[arg-type]
    return _candidate(files)


@pytest.fixture(scope="module")
def negatives(brain, tmp_path_factory) -> list[SeriesCandidate]:
    tmp = tmp_path_factory.mktemp("neg")
    ct = pydicom.dcmread(pydicom_test_file("CT_small.dcm"), stop_before_pixels=True)
    return [
        _series(brain, tmp, 1, kind="localizer", voxel_mm=2.0),
        _series(brain, tmp, 3, kind="t2", voxel_mm=2.0),
        _series(brain, tmp, 4, kind="flair", orientation="sagittal"),
        SeriesCandidate(str(ct.SeriesInstanceUID), [ct]),
    ]


@pytest.mark.parametrize("vendor", ["SIEMENS", "GE", "PHILIPS"])
def test_picks_t1_among_negatives(brain, negatives, rules, tmp_path, vendor):
    t1 = _series(brain, tmp_path, 2, vendor=vendor, orientation="sagittal")
    selection = select_series([*negatives[:2], t1, *negatives[2:]], rules)
    assert selection.chosen is t1
    decisions = {d.series_instance_uid: d for d in selection.decisions}
    assert decisions[t1.series_instance_uid].accepted and decisions[t1.series_instance_uid].score >= 5
    assert [d.accepted for d in selection.decisions].count(True) == 1
    ct = decisions[negatives[3].series_instance_uid]
    assert ct.modality == "CT" and "rejected: modality is MR" in ct.reasons
    assert "rejected: 3D acquisition" in decisions[negatives[0].series_instance_uid].reasons
    flair = decisions[negatives[2].series_instance_uid]
    assert not flair.accepted and any("gradient echo" in r for r in flair.reasons)


def test_nothing_suitable_raises_with_decisions(negatives, rules):
    with pytest.raises(NotAnalysed, match="no suitable 3D T1 series") as info:
        select_series(negatives, rules)
    assert info.value.outcome is Outcome.NO_SUITABLE_SERIES
    assert isinstance(info.value, NoSuitableSeries)
    assert len(info.value.decisions) == 4 and not any(d.accepted for d in info.value.decisions)
    assert all(d.reasons for d in info.value.decisions)


def test_derived_reformat_rejected_and_rescan_preferred(brain, rules, tmp_path):
    first = _series(brain, tmp_path, 6)
    rescan = _series(brain, tmp_path, 7)
    mpr = _series(brain, tmp_path, 8)
    for ds in mpr.headers:
        ds.ImageType = ["DERIVED", "SECONDARY", "MPR"]
    selection = select_series([first, mpr, rescan], rules)
    assert selection.chosen is rescan
    by_uid = {d.series_instance_uid: d for d in selection.decisions}
    assert any("not chosen" in r for r in by_uid[first.series_instance_uid].reasons)
    assert any("original primary" in r for r in by_uid[mpr.series_instance_uid].reasons)


def test_too_few_slices_rejected(brain, rules, tmp_path):
    thin = _series(brain, tmp_path, 9, voxel_mm=2.0)  # 2 mm: too thick and < 100 slices
    with pytest.raises(NoSuitableSeries) as info:
        select_series([thin], rules)
    reasons = info.value.decisions[0].reasons
    assert "rejected: at least 100 slices" in reasons and "rejected: slice thickness at most 1.5 mm" in reasons


def test_custom_rules_orientation_and_errors(brain, tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text('[selection]\nmin_score = 1\n[[require]]\nname = "axial only"\nattribute = "@orientation"\n'
                    'equals = ["axial"]\n[[score]]\nattribute = "Modality"\nequals = "MR"\nscore = 1\n')
    rules = load_rules(path)
    axial = _series(brain, tmp_path, 10, orientation="axial", voxel_mm=3.0)
    oblique = _series(brain, tmp_path, 11, orientation="oblique", voxel_mm=3.0)
    selection = select_series([oblique, axial], rules)
    assert selection.chosen is axial
    assert selection.decisions[0].reasons == ["rejected: axial only"]
    path.write_text('[[require]]\nattribute = "SeriesDescription"\nregex = "(unclosed"\n')
    with pytest.raises(ConfigError, match=r"require\[0\]\.regex"):
        load_rules(path)
    path.write_text('[[score]]\nattribute = "Modality"\nequal = ["MR"]\n')
    with pytest.raises(ConfigError, match=r"score\[0\]: unknown key\(s\) \['equal'\]"):
        load_rules(path)
    with pytest.raises(ConfigError, match="series selection rules"):
        load_rules(tmp_path / "missing.toml")


def test_enhanced_multiframe_t1_selected(brain, rules, tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    volume, affine = brain
    files = write_mr_series(volume, affine, tmp_path / "t1", study=STUDY, series_number=12, vendor="PHILIPS")
    enhanced = LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(f) for f in files], series_instance_uid=pydicom.uid.generate_uid(), series_number=13,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    candidate = _candidate([path])
    assert "ScanningSequence" not in candidate.headers[0]  # only inside the shared functional groups
    selection = select_series([candidate], rules)
    assert selection.chosen is candidate and selection.decisions[0].score >= 5
