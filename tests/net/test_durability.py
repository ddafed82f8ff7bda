"""Acknowledged means kept: durable before Success, a graceful stop, and start-up reconciliation.

Under PS3.4 a Success status means the SCP has stored the instance, so neither
how an association ends (see also the abort tests of ``tests/net/test_ingest.py``) nor
how the node stops may lose it.
"""

from __future__ import annotations

import os
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from sqlalchemy import create_engine, func, select, text, update

from core.errors import Outcome
from dicom_node.cli.localpacs import LocalOrthanc, wait_for
from dicom_node.db.models import AssociationLog, Instance, Run, Series, Study
from dicom_node.db.session import make_engine
from dicom_node.ingest import spool as spool_module
from dicom_node.ingest.completeness import complete_quiet_series, create_runs
from dicom_node.ingest.reconcile import reconcile_spool
from dicom_node.ingest.recorder import Recorder
from dicom_node.ingest.spool import Spool
from dicom_node.net.requestor import associate
from dicom_node.statuses import StoreStatus
from tests.conftest import POSTGRES_URL, make_settings
from tests.support.edge import edge_server, ended, mr_series, no_patient_data_in_logs, storescu

__all__ = ["no_patient_data_in_logs"]


# ----- durable before Success ------------------------------------------------------------------
def test_sqlite_connections_of_the_node_commit_with_synchronous_full(tmp_path: Path) -> None:
    with edge_server(make_settings(tmp_path)) as server:
        connection = server.recorder.engine.raw_connection()
        try:
            cursor = connection.cursor()
            cursor.execute("PRAGMA synchronous")
            row = cursor.fetchone()
            assert row is not None
            synchronous = row[0]
            cursor.execute("PRAGMA journal_mode")
            row = cursor.fetchone()
            assert row is not None
            journal = row[0]
        finally:
            connection.close()
    assert (synchronous, journal) == (2, "wal")  # 2 = FULL: the log is fsynced at every commit


@pytest.mark.postgres
def test_postgres_sessions_commit_synchronously_whatever_the_url_says() -> None:
    engine = make_engine(f"{POSTGRES_URL}?options=-csynchronous_commit%3Doff%20-capplication_name%3Dedge")
    try:
        with engine.connect() as conn:
            values = conn.execute(text("select current_setting('synchronous_commit'), "
                                       "current_setting('application_name')")).one()
    finally:
        engine.dispose()
    assert tuple(values) == ("on", "edge")  # the URL's other options are kept


def test_spool_fsyncs_the_file_then_its_directory_and_new_directories(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[int, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        info = os.fstat(fd)
        synced.append((info.st_ino, stat.S_ISDIR(info.st_mode)))
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", recording_fsync)
    spool = Spool(tmp_path / "spool", fsync=True)
    first = spool.root / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    spool.write(first, (b"head", b"body"))
    inode = {p: p.stat().st_ino for p in (first, first.parent, first.parent.parent, spool.root)}
    # the new directories' entries (in the spool, in the study directory), the file, then its rename
    assert synced == [(inode[spool.root], True), (inode[first.parent.parent], True), (inode[first], False),
                      (inode[first.parent], True)]
    synced.clear()
    second = first.with_name("1.2.3.4.6.dcm")
    spool.write(second, b"x")
    assert synced == [(second.stat().st_ino, False), (inode[first.parent], True)]
    synced.clear()
    Spool(tmp_path / "unsynced", fsync=False).write(tmp_path / "unsynced" / "a" / "b.dcm", b"x")
    assert synced == []


# ----- a graceful stop -------------------------------------------------------------------------
def _association(port: int, calling: str = "SCANNER", ts: str = ExplicitVRLittleEndian) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(MRImageStorage, ts)
    return associate(ae, "127.0.0.1", port, ae_title="AD_NODE")


def _refused(port: int, calling: str = "SCANNER") -> bool:
    """True when a new association is refused (one that is still accepted is released at once)."""
    assoc = _association(port, calling)
    if assoc.is_established:
        assoc.release()
        return False
    return True


def test_stop_lets_an_association_in_flight_finish_then_aborts_the_idle_one(tmp_path: Path) -> None:
    files = mr_series(tmp_path / "s", 6, 4)
    idle_files = mr_series(tmp_path / "t", 7, 3)
    with edge_server(make_settings(tmp_path)) as server:
        port = server.port
        streaming, idle = _association(port), _association(port)
        assert streaming.send_c_store(dcmread(files[0])).Status == StoreStatus.SUCCESS
        for path in idle_files:
            assert idle.send_c_store(dcmread(path)).Status == StoreStatus.SUCCESS
        stopper = threading.Thread(target=server.stop, kwargs={"grace_s": 5.0})
        stopper.start()
        wait_for(lambda: _refused(port), 10, "the listener to close")   # no new associations once stopping
        for path in files[1:]:                            # the one in flight goes on and releases
            assert streaming.send_c_store(dcmread(path)).Status == StoreStatus.SUCCESS
        streaming.release()
        stopper.join(timeout=30)                          # the idle one is aborted after the grace period
        assert not stopper.is_alive() and not idle.is_established
        rows = {r.instances_stored: r for r in ended(server, 2) if r.instances_stored}
        sessions = server.recorder.sessions
        assert complete_quiet_series(sessions, 0) == 2
        runs = create_runs(sessions)
        with sessions() as session:
            kept = session.scalar(select(func.count(Instance.id)).where(Instance.quarantined.is_(False)))
            outcomes = {run.outcome for run in session.scalars(select(Run)).all()}
    assert rows[4].outcome == "released"
    assert rows[3].outcome == "aborted"
    assert rows[3].reason == ("aborted by the node stopping (network.shutdown_grace_s): "
                              "3 acknowledged instance(s) kept")
    assert kept == 7 and len(runs) == 2 and outcomes == {None}


def test_the_node_s_idle_timeout_keeps_what_the_association_delivered(tmp_path: Path) -> None:
    files = mr_series(tmp_path / "s", 9, 3)
    with edge_server(make_settings(tmp_path, **{"network.network_timeout_s": 1.0})) as server:
        assoc = _association(server.port)
        for path in files:
            assert assoc.send_c_store(dcmread(path)).Status == StoreStatus.SUCCESS
        [row] = ended(server, 1)                          # then silence: the node gives up on the peer
        assert complete_quiet_series(server.recorder.sessions, 0) == 1
        [run_id] = create_runs(server.recorder.sessions)
        with server.recorder.sessions() as session:
            kept = session.scalars(select(Instance)).all()
            run = session.get(Run, run_id)
    assert row.outcome == "aborted" and row.instances_stored == 3 and "3 acknowledged instance(s) kept" in (
        row.reason or "")
    assert len(kept) == 3 and not any(i.quarantined for i in kept) and run is not None and run.outcome is None


# ----- start-up reconciliation -----------------------------------------------------------------
@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose connections use an empty schema of their own."""
    admin = create_engine(POSTGRES_URL)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
    admin.dispose()


def _reconcile_after_a_hard_stop(tmp_path: Path, database_url: str | None) -> None:
    """Every kind of disagreement a crash or a hand can leave, then reconciliation, then a re-send."""
    overrides = {"database.url": database_url} if database_url else {}
    settings = make_settings(tmp_path, **overrides)
    files = mr_series(tmp_path / "s", 8, 5)
    uids = [str(dcmread(path).SOPInstanceUID) for path in files]
    with edge_server(settings) as server:
        assert storescu(server.port, files).returncode == 0
        ended(server, 1)
        spool, sessions = server.spool, server.recorder.sessions
        with sessions.begin() as session:
            rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance)).all()}
            series_id = rows[uids[0]].series_id
            # 0: renamed into the spool, the commit never happened (a crash in between)
            session.delete(rows[uids[0]])
            # 1: an earlier version quarantined it (its association was aborted)
            moved = spool.quarantine_path(Path(rows[uids[1]].spool_path))
            moved.parent.mkdir(parents=True)
            os.replace(rows[uids[1]].spool_path, moved)
            rows[uids[1]].quarantined, rows[uids[1]].spool_path = True, str(moved)
            session.execute(update(Series).where(Series.id == series_id).values(instance_count=3))
            session.execute(update(Study).values(needs_run=False))
            missing = Path(rows[uids[2]].spool_path)
        missing.unlink()                                   # 2: the file is gone
        series_dir = missing.parent
        (series_dir / f".{uids[3]}.dcm.1234.part").write_bytes(b"\0" * 300)   # a write cut short
        (series_dir / "1.2.840.999.dcm").write_bytes(b"not dicom")             # junk

        report = reconcile_spool(spool, Recorder(sessions))
        assert (report.partial_removed, report.recorded, report.set_aside, report.missing, report.restored) == (
            1, 1, 1, 1, 1)
        with sessions() as session:
            rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance)).all()}
            series = session.scalars(select(Series)).one()
            study = session.scalars(select(Study)).one()
        assert set(rows) == set(uids)
        assert rows[uids[0]].association_id is None and Path(rows[uids[0]].spool_path).exists()
        assert not rows[uids[1]].quarantined and Path(rows[uids[1]].spool_path).parent == series_dir
        assert Path(rows[uids[1]].spool_path).exists() and not moved.exists()
        assert rows[uids[2]].file_missing_at is not None
        assert [i for i in rows.values() if i.file_missing_at is not None] == [rows[uids[2]]]
        assert series.instance_count == 5 and series.state == "receiving" and study.needs_run
        assert not list(series_dir.glob(".*.part"))
        assert (spool.quarantine_path(series_dir / "1.2.840.999.dcm")).read_bytes() == b"not dicom"
        assert reconcile_spool(spool, Recorder(sessions)).clean   # nothing new the second time

        assert storescu(server.port, files).returncode == 0      # the scanner re-sends: the lost file is back
        with sessions() as session:
            again = session.scalars(select(Instance).where(Instance.sop_instance_uid == uids[2])).one()
        assert again.file_missing_at is None and Path(again.spool_path).exists()
        assert complete_quiet_series(sessions, 0) == 1
        [run_id] = create_runs(sessions)
        with sessions() as session:
            run = session.get(Run, run_id)
            assert run is not None and run.outcome is None
            assert session.scalars(select(Series)).one().instance_count == 5


def test_startup_reconciliation_on_sqlite(tmp_path: Path) -> None:
    _reconcile_after_a_hard_stop(tmp_path, None)


@pytest.mark.postgres
def test_startup_reconciliation_on_postgres(tmp_path: Path, postgres_url: str) -> None:
    _reconcile_after_a_hard_stop(tmp_path, postgres_url)


# ----- SIGTERM with a real node process --------------------------------------------------------
@pytest.mark.slow
def test_sigterm_keeps_every_acknowledged_instance_and_processes_it_after_restart(
        tmp_path: Path, orthanc: LocalOrthanc, demo_model: Path) -> None:
    from tests.chaos.node_process import NodeProcess
    from tests.chaos.scenarios import FINISHED, node_db
    from tests.chaos.traffic import make_study

    node = NodeProcess(tmp_path / "node", orthanc, demo_model,
                       extra_env={"DICOM_NODE_NETWORK__SHUTDOWN_GRACE_S": "3"})
    node.start()
    whole, streamed = make_study(tmp_path / "studies", 1, "quick"), make_study(tmp_path / "studies", 2, "quick")
    ts = str(dcmread(whole.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    idle, stream = _association(node.port, "CHAOS_SCANNER", ts), _association(node.port, "CHAOS_SCANNER", ts)
    for path in whole.files:                 # all sent, the association not yet released
        assert idle.send_c_store(path).Status == StoreStatus.SUCCESS
    half = len(streamed.files) // 2
    for path in streamed.files[:half]:
        assert stream.send_c_store(path).Status == StoreStatus.SUCCESS
    assert node._proc is not None
    node._proc.terminate()                   # SIGTERM mid-association
    wait_for(lambda: _refused(node.port, "CHAOS_SCANNER"), 20, "the node to stop accepting")
    for path in streamed.files[half:]:       # within the grace period the stream goes on
        assert stream.send_c_store(path).Status == StoreStatus.SUCCESS
    stream.release()
    assert node._proc.wait(timeout=120) == 0
    assert not idle.is_established           # aborted after the grace period
    node.start()
    db = node_db(node)
    try:
        sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (*whole.files, *streamed.files)}

        def finished() -> bool:
            with db.sessions() as session:
                return session.scalar(select(func.count(Run.id)).where(Run.state.in_(FINISHED))) == 2

        wait_for(finished, 300, "both studies to be processed after the restart")
        with db.sessions() as session:
            stored = set(session.scalars(select(Instance.sop_instance_uid).where(
                Instance.quarantined.is_(False), Instance.file_missing_at.is_(None))).all())
            outcomes = [run.outcome for run in session.scalars(select(Run)).all()]
            log = sorted((row.outcome or "", row.reason or "", row.instances_stored) for row in session.scalars(
                select(AssociationLog).where(AssociationLog.instances_stored > 0)))
    finally:
        db.engine.dispose()
        node.stop()
    assert stored == sent
    assert Outcome.INCOMPLETE_SERIES.value not in outcomes and len(outcomes) == 2
    assert log == [("aborted", f"aborted by the node stopping (network.shutdown_grace_s): {len(whole.files)} "
                               "acknowledged instance(s) kept", len(whole.files)),
                   ("released", "", len(streamed.files))]
