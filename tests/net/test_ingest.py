"""The edge's ingest against real peers: allow-list, profiles, limits, aborts, duplicates, concurrency.

The helpers shared with the other edge tests (:func:`~tests.support.edge.mr_series`,
:func:`~tests.support.edge.edge_server`, :func:`~tests.support.edge.storescu`) and the
check that no test patient's name or ID reaches the logs are in :mod:`tests.support.edge`.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.cli.localpacs import wait_for
from dicom_node.db.models import Instance, Rejection, Run, Series, Study
from dicom_node.ingest.completeness import complete_quiet_series, create_runs
from dicom_node.net.requestor import associate
from dicom_node.net.scp import StorageServer
from dicom_node.outbox.routing import destinations_for
from dicom_node.statuses import StoreStatus
from tests.conftest import make_settings, require_tool
from tests.support.edge import (
    associations,
    echoscu,
    edge_server,
    ended,
    finish_run,
    mr_series,
    no_patient_data_in_logs,
    raw_socket,
    storescu,
)

__all__ = ["no_patient_data_in_logs"]  # the autouse log check applies here


def test_allow_list_host_pin_profiles_and_association_log(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **{
        "network.allowed_calling_ae_titles": ["SCANNER", "PINNED@10.11.12.13", "LOCAL@localhost"],
        "network.profiles": [{"ae_title": "AD_RESEARCH", "destinations": ["research"]}],
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                         {"name": "research", "ae_title": "RPACS", "host": "127.0.0.1", "port": 105}],
    })
    with edge_server(settings) as server:
        port = server.port
        assert echoscu(port, calling="STRANGER") != 0
        assert echoscu(port, calling="PINNED") != 0          # right title, wrong host
        assert echoscu(port, calling="SCANNER", called="WRONG_AE") != 0
        assert echoscu(port, calling="LOCAL") == 0            # pinned to localhost, calls from 127.0.0.1
        result = storescu(port, mr_series(tmp_path / "s", 0, 3), called="AD_RESEARCH")
        assert result.stdout.count("Received Store Response (Success)") + result.stderr.count(
            "Received Store Response (Success)") == 3, result.stderr
        rows = ended(server, 5)
        with server.recorder.sessions() as session:
            study = session.scalars(select(Study)).one()
            refusals = session.scalars(select(Rejection.reason)).all()
    assert [(r.calling_ae_title, r.outcome) for r in rows] == [
        ("STRANGER", "rejected"), ("PINNED", "rejected"), ("SCANNER", "rejected"), ("LOCAL", "released"),
        ("SCANNER", "released")]
    assert rows[1].reason == "calling AE title not allowed from this host"
    assert rows[2].reason == "called AE title is not one of this node's AE titles"
    assert rows[4].called_ae_title == "AD_RESEARCH" and rows[4].instances_stored == 3
    assert rows[4].ended_at is not None
    assert rows[4].peer_address.startswith("127.0.0.1:") and rows[4].ended_at >= rows[4].started_at
    assert len(refusals) == 3 and all(r.startswith("association rejected") for r in refusals)
    assert study.called_ae_title == "AD_RESEARCH"
    assert [d.name for d in destinations_for(settings, study.called_ae_title)] == ["research"]
    assert [d.name for d in destinations_for(settings, "AD_NODE")] == ["pacs", "research"]


def test_association_limit_and_free_disk_reserve(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **{"network.max_associations": 1, "storage.free_space_reserve_mb": 0})
    files = mr_series(tmp_path / "s", 1, 3)
    with edge_server(settings) as server:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        held = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        assert held.is_established
        assert echoscu(server.port) != 0                      # over network.max_associations
        assert held.send_c_store(dcmread(files[0])).Status == StoreStatus.SUCCESS
        server.reserve_bytes = server.spool.free_bytes() * 2  # the disk "fills up"
        assert held.send_c_store(dcmread(files[1])).Status == StoreStatus.OUT_OF_RESOURCES
        held.release()
        wait_for(lambda: len([r for r in associations(server) if r.ended_at]) == 2, 20, "two ended associations")
        assert echoscu(server.port) != 0                      # refused at association time now
        rows = ended(server, 3)
        with server.recorder.sessions() as session:
            stored = session.scalars(select(Instance.sop_instance_uid)).all()
    assert [r.reason for r in rows if r.outcome == "rejected"] == [
        "too many associations (network.max_associations)", "free disk below storage.free_space_reserve_mb"]
    assert stored == [dcmread(files[0]).SOPInstanceUID]
    assert not any(server.spool.root.rglob(f"{dcmread(files[1]).SOPInstanceUID}.dcm"))


def _kept(server: StorageServer) -> tuple[list[Instance], Series, Study]:
    with server.recorder.sessions() as session:
        return (list(session.scalars(select(Instance)).all()), session.scalars(select(Series)).one(),
                session.scalars(select(Study)).one())


def test_aborted_association_keeps_its_acknowledged_instances(tmp_path: Path) -> None:
    """PS3.4: Success means stored.  An abort after two C-STOREs keeps both; a re-send completes the series."""
    files = mr_series(tmp_path / "s", 2, 4)
    with edge_server(make_settings(tmp_path)) as server:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        for path in files[:2]:
            assert assoc.send_c_store(dcmread(path)).Status == StoreStatus.SUCCESS
        assoc.abort()
        [row] = ended(server, 1)
        instances, series, study = _kept(server)
        assert row.outcome == "aborted" and row.instances_stored == 2
        assert "2 acknowledged instance(s) kept" in (row.reason or "")
        assert len(instances) == 2 and not any(i.quarantined for i in instances)
        assert all(Path(i.spool_path).is_relative_to(server.spool.root) and Path(i.spool_path).exists()
                   for i in instances)
        assert not server.spool.quarantine.exists() or not list(server.spool.quarantine.rglob("*.dcm"))
        assert series.instance_count == 2 and study.needs_run
        result = storescu(server.port, files)                  # the scanner sends the series again
        assert result.returncode == 0, result.stderr
        complete_quiet_series(server.recorder.sessions, 0)
        [run_id] = create_runs(server.recorder.sessions)
        instances, series, _ = _kept(server)
        with server.recorder.sessions() as session:
            run = session.get(Run, run_id)
    assert len(instances) == 4 and series.instance_count == 4 and series.state == "complete"
    assert run is not None and run.outcome is None


def test_storescu_abort_keeps_the_whole_series_and_it_is_processed(tmp_path: Path) -> None:
    """DCMTK's storescu ``--abort``: every instance acknowledged, then A-ABORT; the series is complete."""
    files = mr_series(tmp_path / "s", 4, 5)
    with edge_server(make_settings(tmp_path)) as server:
        result = storescu(server.port, files, extra=("--abort",))
        assert result.returncode == 0, result.stderr
        [row] = ended(server, 1)
        assert complete_quiet_series(server.recorder.sessions, 0) == 1
        [run_id] = create_runs(server.recorder.sessions)
        instances, series, _ = _kept(server)
        with server.recorder.sessions() as session:
            run = session.get(Run, run_id)
    assert row.outcome == "aborted" and row.instances_stored == 5
    assert len(instances) == 5 and not any(i.quarantined for i in instances)
    assert series.state == "complete" and run is not None and run.outcome is None


def test_release_request_then_close_keeps_every_instance(tmp_path: Path) -> None:
    """A peer that sends A-RELEASE-RQ and closes the socket without waiting for the A-RELEASE-RP."""
    files = mr_series(tmp_path / "s", 5, 6)
    with edge_server(make_settings(tmp_path)) as server:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        for path in files:
            assert assoc.send_c_store(dcmread(path)).Status == StoreStatus.SUCCESS
        raw = raw_socket(assoc)
        raw.sendall(bytes.fromhex("05 00 00000004 00000000"))  # A-RELEASE-RQ, then gone
        raw.shutdown(socket.SHUT_RDWR)
        raw.close()
        wait_for(lambda: not assoc.is_alive(), 20, "the requestor's reactor to stop")
        [row] = ended(server, 1)
        assert complete_quiet_series(server.recorder.sessions, 0) == 1
        [run_id] = create_runs(server.recorder.sessions)
        instances, series, _ = _kept(server)
        with server.recorder.sessions() as session:
            run = session.get(Run, run_id)
    assert row.outcome in ("released", "aborted") and row.instances_stored == 6
    assert len(instances) == 6 and not any(i.quarantined for i in instances)
    assert series.state == "complete" and series.instance_count == 6
    assert run is not None and run.outcome is None


@pytest.mark.parametrize("policy", ["reject", "replace", "ignore_identical"])
def test_duplicate_policy(tmp_path: Path, policy: str) -> None:
    files = mr_series(tmp_path / "s", 3, 3)
    settings = make_settings(tmp_path, **{"storage.duplicate_policy": policy})
    with edge_server(settings) as server:
        sessions = server.recorder.sessions
        assert storescu(server.port, files).returncode == 0
        complete_quiet_series(sessions, 0)
        [first] = create_runs(sessions)
        finish_run(sessions, first)
        again = storescu(server.port, files)
        changed = dcmread(files[0])
        changed.SeriesDescription = "re-sent with a change"
        changed_path = tmp_path / "changed.dcm"
        changed.save_as(changed_path)
        third = storescu(server.port, [changed_path])
        complete_quiet_series(sessions, 0)
        runs = create_runs(sessions)
        with sessions() as session:
            row = session.scalars(select(Instance).where(Instance.sop_instance_uid == changed.SOPInstanceUID)).one()
            count = session.scalars(select(Series)).one().instance_count
    output = again.stdout + again.stderr + third.stdout + third.stderr
    assert count == 3
    if policy == "reject":
        assert output.count("Received Store Response (Unknown Status: 0x111)") == 2, output[-2000:]
        assert runs == [] and row.sha256 != _sha(changed_path)
        with sessions() as session:
            statuses = session.scalars(select(Rejection.status)).all()
        assert statuses == [StoreStatus.DUPLICATE_SOP_INSTANCE] * 2
    else:
        assert output.count("Received Store Response (Success)") == 4, output[-2000:]
        assert row.sha256 == _sha(changed_path)
        assert dcmread(row.spool_path).SeriesDescription == changed.SeriesDescription
        assert len(runs) == 1  # only the changed instance makes a new run; the identical re-send made none
        with sessions() as session:
            newest = session.get(Run, runs[0])
            assert newest is not None and newest.supersedes_run_id == first


def _sha(path: Path) -> str:
    import hashlib

    from dicom_node.ingest.spool import part10_header

    ds = dcmread(path)
    raw = path.read_bytes()
    start = 132 + 12 + int.from_bytes(raw[140:144], "little")
    data = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID, "SCANNER") + raw[start:]
    return hashlib.sha256(data).hexdigest()


def test_resent_unchanged_series_makes_no_new_run(tmp_path: Path) -> None:
    files = mr_series(tmp_path / "s", 4, 4)
    with edge_server(make_settings(tmp_path)) as server:
        sessions = server.recorder.sessions
        assert storescu(server.port, files).returncode == 0
        complete_quiet_series(sessions, 0)
        [first] = create_runs(sessions)
        finish_run(sessions, first)
        assert storescu(server.port, files).returncode == 0
        complete_quiet_series(sessions, 0)
        assert create_runs(sessions) == []
        with sessions() as session:
            assert len(session.scalars(select(Run)).all()) == 1


def test_eight_concurrent_storescu_senders_lose_nothing(tmp_path: Path) -> None:
    batches = [mr_series(tmp_path / f"s{n}", n, 8) for n in range(8)]
    with edge_server(make_settings(tmp_path, **{"network.max_associations": 8})) as server:
        procs = [subprocess.Popen(
            [require_tool("storescu"), "-aet", "SCANNER", "-aec", "AD_NODE", "127.0.0.1", str(server.port),
             *map(str, batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"TCP_NODELAY": "1"})
            for batch in batches]
        codes = [p.wait(timeout=120) for p in procs]
        for p in procs:
            p.communicate()
        rows = ended(server, 8)
        with server.recorder.sessions() as session:
            recorded = set(session.scalars(select(Instance.sop_instance_uid)).all())
            counts = sorted(session.scalars(select(Series.instance_count)).all())
    sent = {dcmread(f, stop_before_pixels=True).SOPInstanceUID for batch in batches for f in batch}
    assert codes == [0] * 8
    assert recorded == sent and len(sent) == 64 and counts == [8] * 8
    assert [r.outcome for r in rows] == ["released"] * 8 and sum(r.instances_stored for r in rows) == 64
    assert all(Path(p).exists() for p in server.spool.root.rglob("*.dcm"))


def test_lossy_input_is_recorded_or_refused_by_setting(tmp_path: Path) -> None:
    files = mr_series(tmp_path / "s", 5, 3)
    for path in files[-1:]:  # last: storescu stops at the first refusal
        ds = dcmread(path)
        ds.LossyImageCompression = "01"
        ds.save_as(path)
    with edge_server(make_settings(tmp_path / "a", **{"storage.accept_lossy": True})) as server:
        assert storescu(server.port, files).returncode == 0
        with server.recorder.sessions() as session:
            lossy = {uid: flag for uid, flag in session.execute(select(Instance.sop_instance_uid, Instance.lossy))}
    assert sorted(lossy.values()) == [False, False, True]
    with edge_server(make_settings(tmp_path / "b", **{"storage.accept_lossy": False})) as server:
        result = storescu(server.port, files)
        with server.recorder.sessions() as session:
            refusals = session.execute(select(Rejection.status, Rejection.reason)).all()
            kept = session.scalars(select(Instance)).all()
    assert "Received Store Response (Error: CannotUnderstand)" in result.stdout + result.stderr, result.stderr
    assert [tuple(r) for r in refusals] == [(StoreStatus.LOSSY_INPUT_REFUSED,
                                             "lossy-compressed input refused (storage.accept_lossy is false)")]
    assert len(kept) == 2
