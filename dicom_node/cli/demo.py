"""``dicom-node demo``: the node's main job end to end on embedded defaults.

A T1 series made from a real brain (Colin27) is sent with DCMTK's ``storescu``
to the node, which runs on SQLite with a local spool; the Structured Report
comes back to a local Orthanc (the receiving PACS) and is printed with
``dsrdump`` together with the run's audit record.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from core.errors import NodeError
from dicom_node.cli.localpacs import LocalOrthanc, echo_ok, free_port, wait_for
from dicom_node.db.audit import run_record
from dicom_node.settings import Settings, load_settings
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series

logger = logging.getLogger(__name__)

SCANNER_AE = "DEMO_SCANNER"
DEMO_STUDY_UID = "1.2.826.0.1.3680043.10.1389.1.1"
DEMO_PATIENT = StudyHeader(
    patient_name="Demo^Patient",
    patient_id="DEMO0001",
    patient_birth_date="19480312",
    patient_sex="F",
    study_instance_uid=DEMO_STUDY_UID,
    study_date="20261120",
    study_time="101500",
    accession_number="ACC-DEMO-1",
)
DEMO_NOTE = {
    "note_id": "demo-note-1",
    "patient_id": "DEMO0001",
    "accession_number": "ACC-DEMO-1",
    "note_date": "2026-11-02",
    "note_type": "memory clinic",
    "text": "78-year-old woman, 12 years of education. Reports forgetting recent conversations for a year; "
            "MMSE 24/30. Independent in daily activities.",
}


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _make_study(directory: Path) -> list[Path]:
    volume, affine = load_reference_brain("colin27")
    files = write_mr_series(volume, affine, directory / "t1", study=DEMO_PATIENT, series_number=3,
                            orientation="sagittal", vendor="SIEMENS", kind="t1_mprage")
    files += write_mr_series(volume, affine, directory / "localizer", study=DEMO_PATIENT, series_number=1,
                             orientation="axial", vendor="SIEMENS", kind="localizer")
    return files


def _encapsulated_pdf(dicom_bytes: bytes) -> bytes:
    """The PDF inside an Encapsulated PDF instance (without the NUL that pads it to an even length)."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes))
    return bytes(ds.EncapsulatedDocument).rstrip(b"\x00")


def run_demo(base: Settings) -> int:
    """Run the demo; returns the process exit status."""
    root = (base.data_dir.parent / "demo").resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.monotonic()

    _banner("1. a T1 study from a real brain (Colin27) as DICOM")
    files = _make_study(root / "study")
    print(f"{len(files)} instances written under {root / 'study'}")

    _banner("2. the receiving PACS (Orthanc)")
    pacs = LocalOrthanc(root / "orthanc")
    pacs.start()
    node_port, http_port = free_port(), free_port()
    env = dict(os.environ)
    env.update({
        "DICOM_NODE_STORAGE__DATA_DIR": str(root / "node"),
        "DICOM_NODE_NETWORK__PORT": str(node_port),
        "DICOM_NODE_HTTP__PORT": str(http_port),
        "DICOM_NODE_NETWORK__ALLOWED_CALLING_AE_TITLES": SCANNER_AE,
        "DICOM_NODE_DESTINATIONS": json.dumps(
            [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}]),
        "DICOM_NODE_COMPLETENESS__QUIET_PERIOD_S": "3",
        "DICOM_NODE_MODEL__PATH": str(base.model_path),
    })
    node: subprocess.Popen[bytes] | None = None
    try:
        cli = [sys.executable, "-m", "dicom_node.cli"]
        if not (base.model_path / "brain_adapter.json").exists():
            _banner("3a. the demonstration model (trained on synthetic data; not for clinical use)")
            subprocess.run([*cli, "model", "init-demo"], env=env, check=True)
        notes = root / "notes.jsonl"
        notes.write_text(json.dumps(DEMO_NOTE) + "\n", encoding="utf-8")
        subprocess.run([*cli, "notes", "import", str(notes)], env=env, check=True)

        _banner("3. the node (SQLite, local spool)")
        log = open(root / "node.log", "wb")  # noqa: SIM115 - kept for the child's lifetime
        node = subprocess.Popen([*cli, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        settings = load_settings(environ=env)
        node_ae = settings.network.ae_title
        wait_for(lambda: node is not None and node.poll() is None and echo_ok(node_port, node_ae, SCANNER_AE),
                 120, "the node to answer C-ECHO")
        print(f"node {settings.network.ae_title} listening on 127.0.0.1:{node_port}; log: {root / 'node.log'}; "
              f"admin view and metrics: http://127.0.0.1:{http_port}/")

        _banner("4. the scanner sends the study (DCMTK storescu)")
        sent = subprocess.run(
            ["/usr/bin/storescu", "-aet", SCANNER_AE, "-aec", settings.network.ae_title, "+sd", "+r", "127.0.0.1",
             str(node_port), str(root / "study")],
            env={**env, "TCP_NODELAY": "1"}, capture_output=True, text=True, check=False)
        if sent.returncode != 0:
            raise NodeError(f"storescu failed: {sent.stderr.strip()}")
        print(f"sent {len(files)} instances")

        _banner("5. waiting for the Structured Report in the PACS")
        found = wait_for(lambda: pacs.find_instances(Modality="SR"), 300, "the SR to reach Orthanc", 1.0)
        sr_path = root / "received-sr.dcm"
        sr_path.write_bytes(pacs.get_bytes(f"/instances/{found[0]['ID']}/file"))
        study = pacs.get(f"/instances/{found[0]['ID']}/study")["MainDicomTags"]
        print(f"Orthanc filed the SR in the original study {study['StudyInstanceUID']}")
        documents = wait_for(lambda: pacs.find_instances(Modality="DOC"), 120, "the PDF to reach Orthanc", 1.0)
        pdf_path = root / "received-report.pdf"
        pdf_path.write_bytes(_encapsulated_pdf(pacs.get_bytes(f"/instances/{documents[0]['ID']}/file")))
        print(f"and the PDF report beside it (Encapsulated PDF): {pdf_path}")

        _banner("6. the SR as the radiologist reads it (dsrdump)")
        dump = subprocess.run(["/usr/bin/dsrdump", "+Pl", str(sr_path)], capture_output=True, text=True,
                              check=False)
        print(dump.stdout)

        _banner("7. the run's audit record")
        # Database access below reads the node's settings (same environment).
        from sqlalchemy import select

        from dicom_node.db.models import Run
        from dicom_node.db.session import open_database

        db = open_database(settings.database_url, migrate=False)
        with db.sessions() as session:
            run_id = session.scalars(select(Run.id).order_by(Run.created_at.desc())).first()
        db.engine.dispose()
        if run_id is None:
            raise NodeError("no run recorded")
        print(json.dumps(run_record(settings, run_id), indent=2))
    finally:
        if node is not None and node.poll() is None:
            node.terminate()
            node.wait(timeout=120)
        pacs.stop()
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s")
    return 0
