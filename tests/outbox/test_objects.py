"""The objects a run writes, driven through ``process_run`` with the analysis stubbed.

A small spooled study (5 header-only MR instances, :class:`tests.support.reports.Study5`)
is recorded in a real SQLite database; ``_analyse`` is replaced by a stub returning a prediction or raising
``NotAnalysed``, so every test exercises the real ``_finish``: SR and PDF built,
validated with dciodvfy/dsrdump, written to the outbox, deliveries per destination.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from core.errors import NotAnalysed, Outcome
from dicom_node.db.audit import run_record
from dicom_node.db.models import RunState, Study
from dicom_node.outbox import objects as reports
from dicom_node.outbox.objects import INVALID_SUFFIX
from dicom_node.runs import processing as processing
from dicom_node.runs.context import RunContext
from model.inference import Predictor
from model.types import ModelInfo, Prediction
from pipeline.registration import default_template_path
from structured_reports.keyslices import key_slices
from structured_reports.sr import NOT_ANALYSED_PREFIX
from structured_reports.types import DISCLAIMER, NotesUsed
from tests.conftest import require_tool
from tests.support.reports import MODEL, WRITTEN, Study5, analysed, outbox
from tests.support.sr import make_mr_series

REASONS = {
    Outcome.NO_SUITABLE_SERIES: "no suitable 3D T1 series (localizer only)",
    Outcome.INCOMPLETE_SERIES: "series incomplete: 120 of 176 expected instances",
    Outcome.QC_FAILED: "slices too thick: measured 5 mm, limit 1.5 mm",
    Outcome.PROCESSING_ERROR: "processing error: conversion failed",
}
def refused(outcome: Outcome) -> Callable[..., Any]:
    def analyse(*_: Any) -> tuple[str, Prediction, NotesUsed]:
        raise NotAnalysed(outcome, REASONS[outcome])
    return analyse


@pytest.fixture
def study(tmp_path: Path) -> Iterator[Study5]:
    made = Study5(tmp_path)
    yield made
    made.db.engine.dispose()


def dsrdump(path: Path) -> str:
    return subprocess.run([require_tool("dsrdump"), "+Pl", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_analysed_run_writes_valid_sr_and_pdf_and_queues_them_per_destination(study: Study5) -> None:
    run = study.run(analysed)

    assert run.state == RunState.SUCCEEDED.value
    sr, pdf = pydicom.dcmread(outbox(study, run, "sr")), pydicom.dcmread(outbox(study, run, "pdf"))
    assert (sr.Modality, pdf.Modality) == ("SR", "DOC")
    assert sr.StudyInstanceUID == pdf.StudyInstanceUID == study.study_uid
    assert sr.PatientID == pdf.PatientID == study.series[0].PatientID
    assert (run.report_sop_instance_uid, run.pdf_sop_instance_uid) == (sr.SOPInstanceUID, pdf.SOPInstanceUID)
    assert [(m["object"], m["ok"], m["errors"]) for m in run.validation_messages or []] == [
        ("sr", True, []), ("pdf", True, [])]
    assert study.deliveries(run.id) == [("both", "pdf"), ("both", "sr"), ("pdfonly", "pdf"), ("sronly", "sr")]
    record = run_record(study.settings, run.id)
    assert record["pdf_sop_instance_uid"] == pdf.SOPInstanceUID and record["validation"][0]["ok"] is True


def test_source_of_measurement_is_one_line_and_evidence_lists_every_instance(study: Study5) -> None:
    run = study.run(analysed)
    path = outbox(study, run, "sr")
    dump = dsrdump(path)
    assert dump.count("Source of Measurement") == 1
    assert 'Analysed series 3 "t1_mprage_sag_p2_iso" (5 images)' in dump
    evidence = pydicom.dcmread(path).CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {item.ReferencedSOPInstanceUID for series in evidence.ReferencedSeriesSequence
                  for item in series.ReferencedSOPSequence}
    assert referenced == {ds.SOPInstanceUID for ds in study.series}


def test_a_study_sent_to_a_profile_ae_goes_to_that_profile_s_destinations(study: Study5) -> None:
    with study.db.sessions.begin() as session:
        row = session.get(Study, study.study_id)
        assert row is not None
        row.called_ae_title = "RESEARCH"
    run = study.run(analysed)
    assert study.deliveries(run.id) == [("pdfonly", "pdf")]


@pytest.mark.parametrize("outcome", list(Outcome))
def test_each_not_analysed_reason_yields_a_valid_sr_saying_why(study: Study5, outcome: Outcome) -> None:
    run = study.run(refused(outcome))

    assert run.state == RunState.NOT_ANALYSED.value and run.outcome == outcome.value
    assert all(m["ok"] for m in run.validation_messages or []), run.validation_messages
    dump = dsrdump(outbox(study, run, "sr"))
    assert NOT_ANALYSED_PREFIX + REASONS[outcome] in dump and DISCLAIMER in dump
    assert "Probability" not in dump
    assert outbox(study, run, "pdf").is_file()


def test_replay_writes_byte_identical_objects_with_the_same_uids(study: Study5) -> None:
    first, again = study.run(analysed), study.run(analysed)

    assert again.report_sop_instance_uid == first.report_sop_instance_uid
    assert again.pdf_sop_instance_uid == first.pdf_sop_instance_uid
    for kind in ("sr", "pdf"):
        assert outbox(study, again, kind).read_bytes() == outbox(study, first, kind).read_bytes()
    assert [m["reused"] for m in again.validation_messages or []] == [True, True]


def test_refusal_and_result_on_the_same_input_never_share_a_uid(study: Study5) -> None:
    failed, succeeded = study.run(refused(Outcome.PROCESSING_ERROR)), study.run(analysed)
    assert failed.report_sop_instance_uid != succeeded.report_sop_instance_uid
    assert failed.pdf_sop_instance_uid != succeeded.pdf_sop_instance_uid


def test_superseding_sr_references_its_predecessor(study: Study5) -> None:
    earlier = study.run(analysed)
    late = make_mr_series(6)[5]  # a late instance of the same series changes the input
    late.StudyInstanceUID, late.SeriesInstanceUID = study.study_uid, study.series_uid
    study.add_instance(late)

    later = study.run(analysed, supersedes=earlier.id)

    assert later.report_sop_instance_uid != earlier.report_sop_instance_uid
    sr = pydicom.dcmread(outbox(study, later, "sr"))
    predecessors = [(series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID, study_item.StudyInstanceUID)
                    for study_item in sr.PredecessorDocumentsSequence
                    for series in study_item.ReferencedSeriesSequence]
    assert predecessors == [(earlier.report_sop_instance_uid, study.study_uid)]
    assert "supersedes the earlier report of" in dsrdump(outbox(study, later, "sr"))
    assert all(m["ok"] for m in later.validation_messages or [])


def test_an_invalid_object_is_not_queued_and_the_run_shows_why(study: Study5,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real_build_pdf = reports.build_pdf

    def broken_pdf(*args: Any, **kwargs: Any) -> Dataset:
        ds = real_build_pdf(*args, **kwargs)
        del ds.MIMETypeOfEncapsulatedDocument  # a Type 1 attribute
        return cast(Dataset, ds)

    monkeypatch.setattr(reports, "build_pdf", broken_pdf)
    run = study.run(analysed)

    assert run.state == RunState.FAILED.value
    assert run.report_sop_instance_uid is not None and run.pdf_sop_instance_uid is None
    assert study.deliveries(run.id) == [("both", "sr"), ("sronly", "sr")]
    pdf_check = next(m for m in run.validation_messages or [] if m["object"] == "pdf")
    assert not pdf_check["ok"] and any("MIMETypeOfEncapsulatedDocument" in e for e in pdf_check["errors"])
    assert not outbox(study, run, "pdf").exists()
    assert outbox(study, run, "pdf").with_name("pdf.dcm" + INVALID_SUFFIX).is_file()
    record = run_record(study.settings, run.id)
    assert record["state"] == "failed" and "pdf failed DICOM validation" in record["reason"]


def test_key_slices_show_the_brain_with_the_template_outline() -> None:
    image = nibabel.load(str(default_template_path()))
    assert isinstance(image, nibabel.Nifti1Image)
    template = np.asarray(image.dataobj, dtype=np.float32)
    registered = np.ascontiguousarray(template.transpose(2, 1, 0)[:, ::-1, ::-1])  # RAS (x, y, z) -> (D, H, W)
    slices = key_slices(registered, default_template_path())

    assert [s.image.shape for s in slices] == [(233, 197), (189, 197), (189, 233)]
    for key in slices:
        assert key.outline is not None and 0.1 < key.outline.mean() < 0.9
        assert np.array_equal(key.image > 0, key.outline)  # the template registered to itself
        assert key.image.min() >= 0.0 and key.image.max() <= 1.0


def test_key_slices_are_oriented_the_radiological_way() -> None:
    marker = np.zeros((189, 233, 197), dtype=np.float32)  # (D, H, W) = (inferior->superior, A->P, R->L)
    marker[60:, :126, 98:] = 1.0  # a superior, anterior, left block crossing all three planes
    axial, coronal, sagittal = (s.image for s in key_slices(marker, default_template_path()))

    assert axial[0, -1] == 1 and axial[-1, 0] == 0  # anterior up, patient's left on the viewer's right
    assert coronal[0, -1] == 1 and coronal[-1, 0] == 0  # superior up, patient's left on the right
    assert sagittal[0, 0] == 1 and sagittal[-1, -1] == 0  # superior up, anterior on the left


def test_every_object_written_here_passes_dciodvfy() -> None:
    files = sorted(path for root in WRITTEN for path in root.rglob("*.dcm"))
    assert len(files) >= 20, files
    for path in files:
        result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], (path, errors)


def test_a_study_sent_to_a_profile_with_its_own_model_is_analysed_and_reported_with_it(study: Study5) -> None:
    research = ModelInfo(name="Brain-Adapter research", version="0.1-research", weights_sha256="cd" * 32,
                         demonstration=True, parameters={"preset": "research"})
    study.ctx.profile_predictors = {"RESEARCH": cast(Predictor, SimpleNamespace(info=research))}
    used: list[str] = []

    def analysed_with(ctx: RunContext, run_id: str, by_series: dict[str, Any], progress: Any) -> Any:
        used.append(ctx.predictor.info.name)
        return analysed(ctx, run_id, by_series, progress)

    first = study.run(analysed_with)  # sent to the node's own AE title: the node's model
    with study.db.sessions.begin() as session:
        row = session.get(Study, study.study_id)
        assert row is not None
        row.called_ae_title = "RESEARCH"
    second = study.run(analysed_with, supersedes=first.id)
    assert used == ["Brain-Adapter", "Brain-Adapter research"]
    assert (first.model_name, first.model_weights_sha256) == ("Brain-Adapter", "ab" * 32)
    assert (second.model_name, second.model_weights_sha256) == ("Brain-Adapter research", "cd" * 32)
    assert study.ctx.predictor.info is MODEL  # the shared context is not changed by a run
