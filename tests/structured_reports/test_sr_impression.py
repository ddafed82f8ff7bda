"""The class an SR concludes is its coded Impression, read from the encoded content tree."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import Dataset

from core.errors import Outcome
from model.types import Prediction
from structured_reports.types import NotesUsed
from tests.support.sr import build, make_mr_series, make_report
from tests.support.sr_content import CLASS_OF_CODE, FINDING, IMPRESSION, coded_items, impression_class


@pytest.fixture(scope="module")
def mr_series() -> list[Dataset]:
    return make_mr_series()


def encoded(sr: Dataset) -> Dataset:
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


PREDICTIONS = {
    "AD": {"AD": 0.62, "MCI": 0.27, "CN": 0.11},
    "MCI": {"AD": 0.30, "MCI": 0.45, "CN": 0.25},
    "CN": {"AD": 0.05, "MCI": 0.15, "CN": 0.80},
}


@pytest.mark.parametrize("label", list(PREDICTIONS))
def test_the_coded_impression_is_the_predicted_class(mr_series: list[Dataset], label: str) -> None:
    report = make_report(prediction=Prediction(dict(PREDICTIONS[label]), label, True))
    sr = encoded(build(mr_series, report))
    assert impression_class(sr) == label
    findings = coded_items(sr, FINDING)             # one class modifier per probability
    assert sorted(CLASS_OF_CODE[f] for f in findings) == ["AD", "CN", "MCI"]


def test_a_not_analysed_sr_has_no_impression(mr_series: list[Dataset]) -> None:
    report = make_report(not_analysed=(Outcome.QC_FAILED, "motion"), notes=NotesUsed())
    sr = encoded(build(mr_series, report))
    assert coded_items(sr, IMPRESSION) == []
    with pytest.raises(AssertionError, match="expected one coded Impression"):
        impression_class(sr)
