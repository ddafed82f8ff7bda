"""SR and PDF from a real run, in a real Orthanc: filed under the original study, never twice, valid, readable.

One node processes a Colin27 T1 series sent with storescu (the preprocessing uses
the fast settings ``processing.n4 = false``, ``registration = "AffineFast"``; the
reports do not depend on them), then replays the same study; Orthanc must hold
one SR and one PDF.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html import unescape
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.image import imread
from sqlalchemy import select

from dicom_node.app import Node
from dicom_node.cli.localpacs import LocalOrthanc, wait_for
from dicom_node.db.audit import run_record
from dicom_node.db.models import Delivery, DeliveryState, Run, Study, utcnow
from model.inference import init_demo_model
from model.types import CLASSES
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series
from structured_reports.concepts import CLASS_LABELS
from structured_reports.types import DISCLAIMER
from tests.conftest import make_settings, require_tool

PATIENT = StudyHeader(
    patient_name="Reports^Testpatient", patient_id="REP-PID-0815", patient_birth_date="19470305",
    patient_sex="F", study_instance_uid="1.2.826.0.1.3680043.10.1389.99.6", study_date="20261102",
    study_time="101500", accession_number="REP-ACC-6",
)
RUN_TIMEOUT_S = 150


@dataclass
class Delivered:
    """A node that processed the study twice, and the two runs."""

    node: Node
    pacs: LocalOrthanc
    first: Run
    replay: Run


def _finished(node: Node, run_id: str) -> Run | None:
    """The run once finished and all its deliveries are sent."""
    with node.db.sessions() as session:
        run = session.get(Run, run_id)
        if run is None or run.finished_at is None:
            return None
        deliveries = session.scalars(select(Delivery).where(Delivery.run_id == run_id)).all()
        if len(deliveries) != 2 or any(d.state != DeliveryState.SENT.value for d in deliveries):
            return None
        return run


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Delivered]:
    root = tmp_path_factory.mktemp("reports-node")
    volume, affine = load_reference_brain("colin27")
    write_mr_series(volume, affine, root / "study" / "t1", study=PATIENT, series_number=3, orientation="sagittal")
    model = init_demo_model(root / "model", trained=False)  # independent of the committed trained model
    pacs = LocalOrthanc(root / "orthanc")
    pacs.start()
    settings = make_settings(root, **{
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}],
        "model.path": str(model),
        "processing.registration": "AffineFast",
        "processing.n4": False,
    })
    node = Node(settings)
    node.start()
    try:
        to_pacs = _store(root / "study", pacs.ae_title, pacs.dicom_port)  # the scanner's copy in the PACS
        _check(_store(root / "study", settings.network.ae_title, node.server.port))
        _check(to_pacs)
        first_id = wait_for(lambda: _one_run(node), 30, "a run to be queued")
        first = wait_for(lambda: _finished(node, first_id), RUN_TIMEOUT_S, "the first run and its deliveries")
        replay_id = str(uuid.uuid4())
        with node.db.sessions.begin() as session:  # the same study, the same input, processed again
            study = session.scalars(select(Study)).one()
            session.add(Run(id=replay_id, study_id=study.id, state="queued", created_at=utcnow()))
        replay = wait_for(lambda: _finished(node, replay_id), RUN_TIMEOUT_S, "the replay and its deliveries")
        yield Delivered(node, pacs, first, replay)
    finally:
        node.stop()
        pacs.stop()


def _store(directory: Path, called_ae_title: str, port: int) -> subprocess.Popen[bytes]:
    """Start storescu sending *directory*, as a scanner does."""
    return subprocess.Popen(
        [require_tool("storescu"), "-aet", "SCANNER", "-aec", called_ae_title, "+sd", "+r", "127.0.0.1", str(port),
         str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _check(sending: subprocess.Popen[bytes]) -> None:
    _, stderr = sending.communicate(timeout=120)
    assert sending.returncode == 0, stderr.decode(errors="replace")


def _one_run(node: Node) -> str | None:
    with node.db.sessions() as session:
        return session.scalars(select(Run.id)).first()


def _orthanc_file(pacs: LocalOrthanc, modality: str, tmp_path: Path) -> Path:
    found = pacs.find_instances(Modality=modality)
    assert len(found) == 1, found
    path = tmp_path / f"{modality}.dcm"
    path.write_bytes(pacs.get_bytes(f"/instances/{found[0]['ID']}/file"))
    return path


def test_sr_and_pdf_are_filed_in_the_original_study_under_the_original_patient(delivered: Delivered) -> None:
    pacs = delivered.pacs
    studies = pacs.get("/studies")
    assert len(studies) == 1 and len(pacs.get("/patients")) == 1
    study = pacs.get(f"/studies/{studies[0]}")
    assert study["MainDicomTags"]["StudyInstanceUID"] == PATIENT.study_instance_uid
    assert pacs.get(f"/studies/{studies[0]}/patient")["MainDicomTags"]["PatientID"] == PATIENT.patient_id
    modalities = sorted(pacs.get(f"/series/{s}")["MainDicomTags"]["Modality"] for s in study["Series"])
    assert modalities == ["DOC", "MR", "SR"]
    record = run_record(delivered.node.settings, delivered.first.id)
    assert sorted(d["object"] for d in record["deliveries"]) == ["pdf", "sr"]
    assert all(d["last_status"] == "0x0000" for d in record["deliveries"])
    assert [(v["object"], v["ok"]) for v in record["validation"]] == [("sr", True), ("pdf", True)]


def test_replay_sends_identical_objects_and_orthanc_keeps_one_of_each(delivered: Delivered, tmp_path: Path) -> None:
    first, replay = delivered.first, delivered.replay
    assert replay.id != first.id
    assert (replay.report_sop_instance_uid, replay.pdf_sop_instance_uid) == (
        first.report_sop_instance_uid, first.pdf_sop_instance_uid)
    outbox = delivered.node.settings.outbox_dir
    for kind, modality in (("sr", "SR"), ("pdf", "DOC")):
        sent_twice = (outbox / first.id / f"{kind}.dcm").read_bytes()
        assert (outbox / replay.id / f"{kind}.dcm").read_bytes() == sent_twice
        kept = pydicom.dcmread(_orthanc_file(delivered.pacs, modality, tmp_path))  # Orthanc rewrites the file meta
        assert kept == pydicom.dcmread(outbox / first.id / f"{kind}.dcm")


def test_dsr2html_shows_the_class_the_probabilities_and_the_disclaimer(delivered: Delivered, tmp_path: Path) -> None:
    sr_path = _orthanc_file(delivered.pacs, "SR", tmp_path)
    page = unescape(subprocess.run([require_tool("dsr2html"), str(sr_path)], capture_output=True, text=True,
                                   check=True).stdout)
    run = delivered.first
    assert run.predicted_class is not None
    assert f"Most likely class: {CLASS_LABELS[run.predicted_class]}" in page
    probabilities = {"AD": run.prob_ad, "MCI": run.prob_mci, "CN": run.prob_cn}
    for label in CLASSES:
        assert f"{label} {probabilities[label]:.3f}" in page
    assert DISCLAIMER in page
    assert page.count("Source of Measurement") == 1


def test_pdf_first_page_renders_with_result_key_slices_and_disclaimer(delivered: Delivered, tmp_path: Path) -> None:
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(bytes(pydicom.dcmread(_orthanc_file(delivered.pacs, "DOC", tmp_path)).EncapsulatedDocument))
    subprocess.run([require_tool("pdftoppm"), "-png", "-r", "40", "-f", "1", "-l", "1", "-singlefile", str(pdf),
                    str(tmp_path / "page")], check=True, timeout=60)
    pixels = imread(str(tmp_path / "page.png"))[..., :3]
    ink = np.mean(pixels.min(axis=-1) < 0.9)
    assert pixels.std() > 0.05 and ink > 0.03, (pixels.std(), ink)  # not blank: text, chart and brain slices
    text = " ".join(subprocess.run([require_tool("pdftotext"), str(pdf), "-"], capture_output=True, text=True,
                                   check=True).stdout.split())
    assert "Axial, z = 8 mm (MNI)" in text and "outline of the template brain" in text
    predicted = delivered.first.predicted_class
    assert predicted is not None and "For research use only" in text
    assert f"Most likely class: {CLASS_LABELS[predicted]}." in text  # the conclusion, not any mention of a class


def test_every_object_the_node_wrote_passes_dciodvfy(delivered: Delivered) -> None:
    files = sorted(delivered.node.settings.outbox_dir.rglob("*.dcm"))
    assert len(files) == 4  # SR and PDF of each run
    for path in files:
        result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
        assert [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")] == []
