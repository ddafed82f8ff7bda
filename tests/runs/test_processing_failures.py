"""A processing error is a bug, not an outcome: plain words for the radiologist, stage and traceback for the audit.

Runs go through the real ``process_run`` and ``_analyse`` on the small spooled study of
``tests/outbox/test_objects.py`` (:class:`tests.support.reports.Study5`; selection with relaxed
rules, since its 5 header-only instances are not a volume); one stage at a time is made to raise, with a message quoting
the patient's name and ID as a header value could.  The SR and PDF written to the outbox
are read back (content tree with pydicom, PDF text with pdftotext).
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn, cast

import numpy as np
import pydicom
import pytest

from core.errors import ConfigError, NodeError, Outcome, audit_traceback
from dicom_node.db.audit import run_record
from dicom_node.db.models import Run, RunState
from dicom_node.outbox import objects as reports
from dicom_node.runs import processing as processing
from dicom_node.runs.processing import process_run
from model.inference import Predictor
from pipeline.preprocess import Preprocessed
from pipeline.select import SelectionRules
from tests.conftest import require_tool
from tests.support.reports import MODEL, Study5, analysed, outbox, sr_texts

#: What a DICOM header could put into a library's exception message.
SECRET_NAME, SECRET_ID = "Test^Patient", "SR-TEST-0001"
BOOM = f"boom: invalid value {SECRET_NAME!r} for {SECRET_ID}"
RECORDED = "The failure was recorded for the node's administrators (run {run})."
SENTENCES = {
    "selected": "Not analysed: the series to analyse could not be chosen (series selection step failed). ",
    "converted": "Not analysed: the series could not be converted to a volume (conversion step failed). ",
    "preprocessed": "Not analysed: image preprocessing could not be completed. ",
    "notes_joined": "Not analysed: the clinical notes could not be looked up. ",
    "inferred": "Not analysed: the analysis model could not be run. ",
    "report_built": "Not analysed: the report could not be completed. ",
}
#: Python text the radiologist must never read (the patient's ID is in the PDF's header, rightly).
FORBIDDEN = ("ValueError", "RuntimeError", "KeyError", "ConfigError", "Error:", "Exception", "Traceback", ".py",
             "boom", "invalid value", "Rigid")


def boom(*_: Any, **__: Any) -> NoReturn:
    raise ValueError(BOOM)


def converted(_files: Any, out_path: Path) -> Path:
    out_path.write_bytes(b"")
    return out_path


def preprocessed(*_: Any, **__: Any) -> Preprocessed:
    return Preprocessed(volume=np.zeros((4, 4, 4), dtype=np.float32), stage_seconds={}, qc={"slices": 5.0},
                        registered=None)


#: Stage -> what to patch in ``dicom_node.runs.processing`` so that exactly this stage raises ``ValueError(BOOM)``.
BREAKS: dict[str, dict[str, Callable[..., Any]]] = {
    "selected": {"select_series": boom},
    "converted": {"convert_series": boom},
    "preprocessed": {"convert_series": converted, "preprocess": boom},
    "notes_joined": {"convert_series": converted, "preprocess": preprocessed, "_notes_for": boom},
    "inferred": {"convert_series": converted, "preprocess": preprocessed},  # and the predictor raises
}


@pytest.fixture
def study(tmp_path: Path) -> Iterator[Study5]:
    made = Study5(tmp_path)
    made.ctx.rules = SelectionRules(requirements=(), scores=())  # any MR series will do
    made.ctx.predictor = cast(Predictor, SimpleNamespace(info=MODEL, predict=boom))
    yield made
    made.db.engine.dispose()


def process(study: Study5, patches: dict[str, Callable[..., Any]]) -> Run:
    run_id = study.new_run()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in patches.items():
            patch.setattr(processing, name, value)
        process_run(run_id, study.ctx)
    with study.db.sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run


def pdf_text(path: Path, tmp_path: Path) -> str:
    ds = pydicom.dcmread(path)
    document = tmp_path / f"{path.parent.name}.pdf"
    document.write_bytes(bytes(ds.EncapsulatedDocument)[: ds.EncapsulatedDocumentLength])
    result = subprocess.run([require_tool("pdftotext"), str(document), "-"], capture_output=True, text=True,
                            check=True, timeout=60)
    return " ".join(result.stdout.split())


def assert_reported_in_plain_words(study: Study5, run: Run, sentence: str, tmp_path: Path) -> None:
    sr, pdf = sr_texts(outbox(study, run, "sr")), pdf_text(outbox(study, run, "pdf"), tmp_path)
    assert sentence in sr
    assert sentence in pdf
    for text in (sr, pdf, run.error_reason or ""):
        assert not [word for word in FORBIDDEN if word in text], text


@pytest.mark.parametrize("stage", list(BREAKS))
def test_an_unexpected_exception_in_a_stage_is_a_plain_words_report_and_an_audited_traceback(
        study: Study5, stage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        run = process(study, BREAKS[stage])

    assert (run.state, run.outcome) == (RunState.NOT_ANALYSED.value, Outcome.PROCESSING_ERROR.value)
    assert run.error_stage == stage
    trace = run.error_traceback or ""
    assert trace.startswith("Traceback (most recent call last):") and "ValueError" in trace
    assert 'in boom\n' in trace and "test_processing_failures.py" in trace  # the frame that raised
    assert "processing.py" in trace and "in _analyse\n" in trace
    assert SECRET_ID not in trace and SECRET_NAME not in trace and "invalid value" not in trace
    assert all(m["ok"] for m in run.validation_messages or []), run.validation_messages
    assert_reported_in_plain_words(study, run, SENTENCES[stage] + RECORDED.format(run=run.id), tmp_path)
    assert f"run {run.id} failed in stage {stage}" in caplog.text
    assert SECRET_ID not in caplog.text and SECRET_NAME not in caplog.text

    record = run_record(study.settings, run.id)
    assert (record["outcome"], record["error_stage"]) == ("processing_error", stage)
    assert record["error_traceback"] == trace


def test_a_configuration_error_tells_the_radiologist_that_the_administrators_must_act(
        study: Study5, tmp_path: Path) -> None:
    def misconfigured(*_: Any, **__: Any) -> NoReturn:
        raise ConfigError("registration 'Rigid': expected Affine, AffineFast or SyN")

    run = process(study, {"convert_series": converted, "preprocess": misconfigured})

    assert (run.outcome, run.error_stage) == ("processing_error", "preprocessed")
    assert "core.errors.ConfigError: registration 'Rigid': expected Affine" in (run.error_traceback or "")
    assert_reported_in_plain_words(
        study, run, "Not analysed: image preprocessing could not be completed. The node's configuration must be "
                    f"corrected by its administrators; the failure was recorded for them (run {run.id}).", tmp_path)


def test_a_refusal_keeps_its_reason_and_records_its_stage_without_traceback(study: Study5) -> None:
    study.ctx.rules = SelectionRules(requirements=(), scores=(), min_score=1.0)  # nothing scores: no series

    run = process(study, {})

    assert (run.outcome, run.error_stage, run.error_traceback) == ("no_suitable_series", "selected", None)
    assert "Not analysed: no suitable 3D T1 series (1 series considered)" in sr_texts(outbox(study, run, "sr"))


def test_a_result_whose_report_cannot_be_built_becomes_a_not_analysed_report(
        study: Study5, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build_pdf = reports.build_pdf

    def pdf_failing_with_a_result(sources: Any, report: Any, **kwargs: Any) -> Any:
        if report.prediction is not None:
            raise RuntimeError(BOOM)
        return real_build_pdf(sources, report, **kwargs)

    monkeypatch.setattr(reports, "build_pdf", pdf_failing_with_a_result)
    run = study.run(analysed)

    assert (run.state, run.outcome, run.error_stage) == ("not_analysed", "processing_error", "report_built")
    assert run.prob_ad is None and run.predicted_class is None
    assert "RuntimeError" in (run.error_traceback or "") and "in pdf_failing_with_a_result\n" in (
        run.error_traceback or "")
    assert_reported_in_plain_words(study, run, SENTENCES["report_built"] + RECORDED.format(run=run.id), tmp_path)
    assert "Probabilities" not in sr_texts(outbox(study, run, "sr"))


def test_a_not_analysed_report_that_cannot_be_built_fails_the_run_with_both_failures_recorded(
        study: Study5, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sr(*_: Any, **__: Any) -> NoReturn:
        raise KeyError(SECRET_ID)

    monkeypatch.setattr(reports, "build_sr", no_sr)
    run_id = study.new_run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(processing, "convert_series", boom)
        with pytest.raises(KeyError):
            process_run(run_id, study.ctx)
    with study.db.sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None
        assert run.error_stage == "report_built"
        trace = run.error_traceback or ""
    assert "KeyError" in trace and "in no_sr\n" in trace
    assert "earlier failure in stage converted:\nTraceback" in trace and "ValueError" in trace
    assert SECRET_ID not in trace and SECRET_NAME not in trace


def test_audit_traceback_keeps_frames_types_and_our_messages_only() -> None:
    def read_header() -> None:
        raise ValueError(BOOM)

    def convert() -> None:
        try:
            read_header()
        except ValueError as exc:
            raise NodeError("conversion of the series failed") from exc

    try:
        try:
            convert()
        except NodeError:
            header: dict[str, str] = {}
            header[SECRET_ID]  # a bug while handling it, its message the patient's ID
    except KeyError as exc:
        text = audit_traceback(exc)

    assert text.count("Traceback (most recent call last):") == 3
    assert "in read_header\n" in text and "in convert\n" in text
    assert "\nValueError (message withheld" in text
    assert "\ncore.errors.NodeError: conversion of the series failed\n" in text
    assert text.rstrip().endswith("KeyError (message withheld: not a node error, it may quote patient data)")
    assert "direct cause" in text and "During handling" in text
    assert "boom" not in text and "invalid value" not in text and SECRET_ID not in text
