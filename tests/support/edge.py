"""Helpers of the edge tests: small MR series of test patients, a running StorageServer, DCMTK peers.

Also the autouse check that no test patient's name or ID reaches the logs
(:func:`no_patient_data_in_logs`): it applies to the test modules that import it,
and to no others.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from pynetdicom.association import Association
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.cli.localpacs import wait_for
from dicom_node.db.models import AssociationLog, Run, RunState, utcnow
from dicom_node.db.session import open_database
from dicom_node.ingest.recorder import Recorder
from dicom_node.ingest.spool import Spool
from dicom_node.net.scp import StorageServer
from dicom_node.settings import Settings
from pipeline.synth import StudyHeader, write_mr_series
from tests.conftest import require_tool
from tests.support.logs import logs_free_of

#: Test patients of the edge tests; none of these strings may appear in any log record.
PATIENTS = [
    StudyHeader(patient_name=f"Edgetest^Patient{n}", patient_id=f"EDGE-PID-{n:04d}", patient_birth_date="19500101",
                patient_sex="F", study_instance_uid=f"1.2.826.0.1.3680043.10.1389.77.{n}", study_date="20260301",
                study_time="101010", accession_number=f"EDGE-ACC-{n}")
    for n in range(1, 17)
]
PHI = [s for p in PATIENTS for s in (p.patient_id, p.accession_number, p.patient_name, p.patient_name.split("^")[1])]


@pytest.fixture(autouse=True)
def no_patient_data_in_logs() -> Iterator[None]:
    """Every log record of the node (DEBUG) and pynetdicom (INFO) during a test is free of patient data."""
    with logs_free_of(PHI, debug=("dicom_node",)):
        yield


def mr_series(directory: Path, patient: int = 0, slices: int = 6, series_number: int = 3,
              drop: tuple[int, ...] = (), size: int = 24) -> list[Path]:
    """A small axial MR series (*size* x *size* in-plane, 2 mm slices) of test patient *patient*."""
    rng = np.random.default_rng(patient * 100 + series_number)
    volume = rng.uniform(10, 1000, (size, size, slices)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    files = write_mr_series(volume, affine, directory, study=PATIENTS[patient], series_number=series_number)
    for index in drop:
        files[index].unlink()
    return [f for n, f in enumerate(files) if n not in drop]


def raw_socket(assoc: Association) -> socket.socket:
    """The TCP socket under an established association, for writing bytes no SCU would send."""
    transport = assoc.dul.socket
    assert transport is not None and transport.socket is not None, "the association has no open socket"
    return transport.socket


@contextmanager
def edge_server(settings: Settings) -> Iterator[StorageServer]:
    """A running StorageServer with its own database under the settings' data directory."""
    db = open_database(settings.database_url)
    server = StorageServer(settings, Spool.from_settings(settings), Recorder(db.sessions))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        db.engine.dispose()


def storescu(port: int, files: list[Path], calling: str = "SCANNER", called: str = "AD_NODE",
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu (by full path) with TCP_NODELAY."""
    return subprocess.run(
        [require_tool("storescu"), "-v", *extra, "-aet", calling, "-aec", called, "127.0.0.1", str(port),
         *map(str, files)], capture_output=True, text=True, timeout=120, check=False, env={"TCP_NODELAY": "1"})


def echoscu(port: int, calling: str = "SCANNER", called: str = "AD_NODE", extra: tuple[str, ...] = ()) -> int:
    """DCMTK's echoscu; returns its exit code."""
    return subprocess.run([require_tool("echoscu"), *extra, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30, check=False).returncode


def finish_run(sessions: sessionmaker[Session], run_id: str) -> None:
    """What processing leaves behind: the run succeeded."""
    with sessions.begin() as session:
        run = session.get(Run, run_id)
        assert run is not None
        run.state, run.finished_at = RunState.SUCCEEDED.value, utcnow()


def associations(server: StorageServer) -> list[AssociationLog]:
    with server.recorder.sessions() as session:
        return list(session.scalars(select(AssociationLog).order_by(AssociationLog.id)).all())


def ended(server: StorageServer, count: int) -> list[AssociationLog]:
    """Wait until *count* associations are logged as ended (the log is written as they close)."""
    return wait_for(lambda: ((rows := associations(server)) and len([r for r in rows if r.ended_at]) >= count
                     and rows) or None, 20, f"{count} ended association(s)", 0.05)
