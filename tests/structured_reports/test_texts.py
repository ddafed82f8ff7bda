"""The small facts of a report: age at the study, sex, what series the node needs, QC values with limits."""

from __future__ import annotations

import math

import pytest
from pydicom.dataset import Dataset

from pipeline.preprocess_config import PreprocessConfig
from pipeline.qc import qc_checks
from pipeline.select import DEFAULT_RULES_PATH, Rule, SelectionRules, load_rules
from structured_reports.texts import age_at_study, qc_value_text, received_text, sex_text
from structured_reports.types import SeriesRequirement
from tests.support.sr import received_study


def header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"PatientAge": "076Y"}, "76 years"),
        ({"PatientAge": "001Y"}, "1 year"),
        ({"PatientAge": "011M"}, "11 months"),
        ({"PatientAge": "003W"}, "3 weeks"),
        ({"PatientAge": "005D", "PatientBirthDate": "19480101", "StudyDate": "20240101"}, "5 days"),  # AS first
        ({"PatientBirthDate": "19480304", "StudyDate": "20240304"}, "76 years"),  # the birthday
        ({"PatientBirthDate": "19480305", "StudyDate": "20240304"}, "75 years"),  # the day before
        ({"PatientBirthDate": "20220810", "StudyDate": "20240304"}, "18 months"),  # a small child
        ({"PatientAge": "", "PatientBirthDate": "19480229", "StudyDate": "20240228"}, "75 years"),
        ({"PatientBirthDate": "19480304"}, "not given"),
        pytest.param({"PatientBirthDate": "2024", "StudyDate": "20240304"}, "not given",
                     marks=pytest.mark.filterwarnings("ignore:Invalid value for VR DA")),
        ({"PatientBirthDate": "20250101", "StudyDate": "20240304"}, "not given"),  # born after the study
        ({}, "not given"),
    ],
)
def test_age_at_study(values: dict[str, str], expected: str) -> None:
    assert age_at_study(header(**values)) == expected


@pytest.mark.parametrize(("sex", "expected"), [("F", "female"), ("M", "male"), ("O", "other"), ("", "not given"),
                                               ("X", "not given")])
def test_sex_in_words(sex: str, expected: str) -> None:
    assert sex_text(header(PatientSex=sex)) == expected


def test_the_shipped_rules_and_default_limits_need_100_slices_of_at_most_1_5_mm() -> None:
    need = SeriesRequirement.from_config(load_rules(DEFAULT_RULES_PATH), PreprocessConfig())
    assert (need.min_slices, need.max_slice_thickness_mm) == (100, 1.5)


def test_the_stricter_of_rules_and_preprocessing_limits_is_what_the_node_needs() -> None:
    rules = SelectionRules(requirements=(
        Rule(name="at least 160 slices", attributes=("@images",), range=(160.0, math.inf)),
        Rule(name="thin slices", attributes=("SliceThickness",), range=(0.3, 1.2)),
        Rule(name="short TE", attributes=("EchoTime",), range=(0.5, 10.0)),  # not about slices
    ), scores=())
    assert SeriesRequirement.from_config(rules, PreprocessConfig()) == SeriesRequirement(160, 1.2)
    strict = PreprocessConfig(min_slices=200, max_slice_thickness_mm=1.0)
    assert SeriesRequirement.from_config(rules, strict) == SeriesRequirement(200, 1.0)
    assert SeriesRequirement.from_config(None, strict) == SeriesRequirement(200, 1.0)


def test_qc_checks_take_their_limits_from_the_configuration_in_one_order() -> None:
    config = PreprocessConfig(min_slices=150, max_slice_thickness_mm=1.2, min_correlation=0.6, min_coverage=0.9,
                              min_wm_gm_ratio=1.1)
    checks = qc_checks({"wm_gm_ratio": 1.05, "slices": 176.0, "slice_thickness_mm": 1.25}, config)

    assert [(c.key, c.limit, c.ok) for c in checks] == [
        ("slices", 150.0, True), ("slice_thickness_mm", 1.2, False), ("wm_gm_ratio", 1.1, False)]
    assert [qc_value_text(c) for c in checks] == [
        "slices 176 (at least 150)",
        "slice thickness 1.25 mm (at most 1.2 mm, OUTSIDE THE LIMIT)",
        "WM/GM ratio 1.050 (at least 1.1, OUTSIDE THE LIMIT)",
    ]


def test_the_check_command_reads_the_same_limits_table() -> None:
    from dicom_node.cli import check
    from pipeline import qc

    assert not hasattr(check, "QC_LIMITS")  # one definition, in pipeline.qc
    assert [q.config_field for q in qc.QC_LIMITS] == [
        "min_slices", "max_slice_thickness_mm", "min_correlation", "min_coverage", "min_wm_gm_ratio"]


def test_received_series_are_listed_in_series_order_with_modality_and_count() -> None:
    assert received_text(received_study()) == (
        'Received: series 1 "localizer" (MR, 3 images); series 2 "t2_tse_tra" (MR, 2 images).')
