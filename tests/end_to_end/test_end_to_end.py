"""The whole node: storescu → node (SQLite, spool, model) → SR in Orthanc, validated by dciodvfy."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.app import Node
from dicom_node.cli.localpacs import LocalOrthanc, wait_for
from dicom_node.db.audit import STAGES, run_record
from dicom_node.db.models import Run, RunState, Study, utcnow
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series
from tests.conftest import require_tool
from tests.support.node import dciodvfy_errors, finished_run, node_settings, received_sr, send
from tests.support.sr_content import impression_class

PATIENT = StudyHeader(
    patient_name="Endtoend^Testpatient", patient_id="E2E-PID-4711", patient_birth_date="19440101",
    patient_sex="M", study_instance_uid="1.2.826.0.1.3680043.10.1389.99.1", study_date="20261101",
    study_time="090000", accession_number="E2E-ACC-1",
)


@pytest.fixture(scope="module")
def t1_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sagittal 1 mm MPRAGE of Colin27 plus a localizer."""
    root = tmp_path_factory.mktemp("study")
    volume, affine = load_reference_brain("colin27")
    write_mr_series(volume, affine, root / "t1", study=PATIENT, series_number=3, orientation="sagittal")
    write_mr_series(volume, affine, root / "loc", study=PATIENT, series_number=1, kind="localizer")
    return root


@pytest.fixture
def node(tmp_path: Path, orthanc: LocalOrthanc, demo_model: Path) -> Iterator[Node]:
    running = Node(node_settings(tmp_path, orthanc, demo_model))
    running.start()
    yield running
    running.stop()


def test_t1_series_in_structured_report_out(node: Node, orthanc: LocalOrthanc, t1_study: Path,
                                            tmp_path: Path) -> None:
    send(node, t1_study)
    sr_path = received_sr(orthanc, tmp_path)
    sr = dcmread(sr_path)
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == PATIENT.study_instance_uid and sr.PatientID == PATIENT.patient_id
    assert dciodvfy_errors(sr_path) == []
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", str(sr_path)], capture_output=True, text=True,
                          check=True).stdout
    assert "Probability" in dump and "Demonstration model, not for clinical use" in dump

    run = finished_run(node)
    assert run.state == RunState.SUCCEEDED.value
    # Orthanc has the SR as soon as it answers; the node records the answer right after: wait for that record
    def sr_recorded() -> dict | None:
        rec = run_record(node.settings, run.id)
        return rec if any(d["object"] == "sr" and d["state"] != "pending" for d in rec["deliveries"]) else None

    record = wait_for(sr_recorded, 30, "the SR delivery to be recorded")
    assert all(record["stages"][stage] != "-" for stage in STAGES), record["stages"]
    assert {"converted", "preprocessed", "inferred", "report_built"} <= set(record["stage_seconds"])
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-6
    assert impression_class(sr) == record["predicted_class"]  # the SR's coded conclusion, not a substring
    assert record["predicted_class"] == max(record["probabilities"], key=record["probabilities"].get)
    sr_deliveries = [d for d in record["deliveries"] if d["object"] == "sr"]  # the PDF may still be on its way
    assert sr_deliveries == [{"destination": "pacs", "object": "sr", "state": "sent", "attempts": 1,
                              "last_status": "0x0000", "last_error": None, "sent_at": sr_deliveries[0]["sent_at"]}]
    chosen = [d for d in record["series_selection"] if d["accepted"]]
    assert [d["description"] for d in chosen] == ["t1_mprage_sag_p2_iso"]


def test_study_without_t1_gets_a_not_analysed_report(node: Node, orthanc: LocalOrthanc, t1_study: Path,
                                                     tmp_path: Path) -> None:
    send(node, t1_study / "loc")
    sr_path = received_sr(orthanc, tmp_path, 60)
    assert dciodvfy_errors(sr_path) == []
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", str(sr_path)], capture_output=True, text=True,
                          check=True).stdout
    assert "Not analysed" in dump and "no suitable 3D T1 series" in dump
    run = finished_run(node)
    assert run.state == RunState.NOT_ANALYSED.value and run.outcome == "no_suitable_series"


def test_restart_resumes_an_unfinished_run(tmp_path: Path, orthanc: LocalOrthanc, demo_model: Path,
                                           t1_study: Path) -> None:
    settings = node_settings(tmp_path, orthanc, demo_model)
    first = Node(settings)
    first.server.start()  # listener only: the run must not start before the "crash"
    send(first, t1_study / "loc")
    first.server.stop()
    with first.db.sessions.begin() as session:  # what a crash mid-run leaves behind
        study = session.scalars(select(Study)).one()
        study.needs_run = False
        session.add(Run(id=str(uuid.uuid4()), study_id=study.id, state=RunState.RUNNING.value,
                        created_at=utcnow(), started_at=utcnow()))
    first.stop()  # never started its scheduler: nothing processed

    second = Node(settings)
    second.start()
    try:
        received_sr(orthanc, tmp_path, 60)
        run = finished_run(second)
        assert run.state == RunState.NOT_ANALYSED.value and run.attempts == 1
    finally:
        second.stop()
