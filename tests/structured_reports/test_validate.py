"""Tests of structured_reports.validate (dciodvfy and dsrdump wrappers)."""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest

from structured_reports import validate
from structured_reports.validate import (
    ValidationFailed,
    ValidatorUnavailableError,
    parse_dciodvfy,
    parse_dsrdump,
    require_valid,
    validate_dataset,
)
from tests.support.sr import build, make_mr_series, make_report

DCIODVFY_OUTPUT = """\
Comprehensive3DSR
Error - Missing attribute Type 1 Required Element=<CompletionFlag> Module=<SRDocumentGeneral>
Warning - Unrecognized defined term <M> for value 3 of attribute <Image Type>
Error - Unrecognized enumerated value <MAYBE> for value 1 of attribute <Verification Flag>
"""

DSRDUMP_LOG = """\
W: CompletionFlag (0040,a491) absent in SRDocumentGeneralModule (type 1)
E: Cannot add "inferred from CODE" to CONTAINER in Comprehensive 3D SR
F: dsrdump: error (Invalid by-value Relationship) parsing file: x.dcm
"""


@pytest.fixture(scope="module")
def sr() -> pydicom.Dataset:
    return build(make_mr_series(2), make_report())


def test_parse_dciodvfy_splits_errors_and_warnings() -> None:
    errors, warnings = parse_dciodvfy(DCIODVFY_OUTPUT)

    assert errors == [
        "Missing attribute Type 1 Required Element=<CompletionFlag> Module=<SRDocumentGeneral>",
        "Unrecognized enumerated value <MAYBE> for value 1 of attribute <Verification Flag>",
    ]
    assert warnings == ["Unrecognized defined term <M> for value 3 of attribute <Image Type>"]


def test_parse_dsrdump_splits_errors_and_warnings() -> None:
    errors, warnings = parse_dsrdump(DSRDUMP_LOG)

    assert len(errors) == 2
    assert errors[0].startswith("Cannot add")
    assert warnings == ["CompletionFlag (0040,a491) absent in SRDocumentGeneralModule (type 1)"]


def test_valid_sr_has_no_findings(sr: pydicom.Dataset, tmp_path: Path) -> None:
    result = validate_dataset(sr, workdir=tmp_path)

    assert result.ok
    assert (result.errors, result.warnings) == ([], [])
    assert list(tmp_path.iterdir()) == []


def test_broken_sr_raises_with_messages(sr: pydicom.Dataset, tmp_path: Path) -> None:
    broken = copy.deepcopy(sr)
    del broken.CompletionFlag
    broken.VerificationFlag = "MAYBE"
    broken.ContentSequence[0].RelationshipType = "INFERRED FROM"

    with pytest.raises(ValidationFailed, match="failed validation") as caught:
        require_valid(broken, workdir=tmp_path)

    errors = caught.value.errors
    assert any("dciodvfy:" in e and "CompletionFlag" in e for e in errors)
    assert any("dciodvfy:" in e and "Verification Flag" in e for e in errors)
    assert any("dsrdump:" in e and "Relationship" in e for e in errors)
    assert caught.value.sop_instance_uid == sr.SOPInstanceUID


def test_missing_checker_raises(
    sr: pydicom.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validate, "DCIODVFY", str(tmp_path / "no-such-dciodvfy"))
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(ValidatorUnavailableError, match="not installed"):
        validate_dataset(sr, workdir=tmp_path)
