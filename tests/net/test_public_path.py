"""Both DIMSE paths: same result, and no data set held whole in memory while it is received.

The same series (and one refused instance) goes with DCMTK's ``storescu`` to a node on
the lean path and to a node on the public path (``EVT_C_STORE`` with
``STORE_RECV_CHUNKED_DATASET``): both must record the same instances, write
byte-identical spool files and name the same refusal.  A large instance goes
through either path with a small traced-memory peak (it is spilled to disk as
it arrives), and a data set cut off in the middle leaves nothing behind.
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config
from pynetdicom.dsutils import encode
from sqlalchemy import select

from dicom_node.cli.localpacs import wait_for
from dicom_node.db.models import Instance, Rejection
from dicom_node.net.requestor import associate
from dicom_node.net.scp import StorageServer
from dicom_node.statuses import StoreStatus
from tests.conftest import make_settings
from tests.support.edge import edge_server, ended, mr_series, no_patient_data_in_logs, raw_socket, storescu

__all__ = ["no_patient_data_in_logs"]  # the edge tests' autouse check: no patient data in any log record

LOSSY_REFUSED = "lossy-compressed input refused (storage.accept_lossy is false)"


Received = tuple[str, dict[str, bytes], list[str], list[tuple[int, str]]]


def _receive(root: Path, path: str, files: list[Path]) -> Received:
    """Send *files* to a node on *path*: storescu's output, spool files, recorded UIDs, refusals."""
    settings = make_settings(root, **{"network.dimse_path": path, "storage.accept_lossy": False})
    with edge_server(settings) as server:
        assert _config.STORE_RECV_CHUNKED_DATASET  # whatever pynetdicom receives is streamed to a file
        result = storescu(server.port, files)
        ended(server, 1)
        spool = _spool(server)
        with server.recorder.sessions() as session:
            recorded = sorted(session.scalars(select(Instance.sop_instance_uid)).all())
            refusals = [(int(s), str(r)) for s, r in session.execute(select(Rejection.status, Rejection.reason))]
    return result.stdout + result.stderr, spool, recorded, refusals


def _spool(server: StorageServer) -> dict[str, bytes]:
    return {str(p.relative_to(server.spool.root)): p.read_bytes() for p in sorted(server.spool.root.rglob("*.dcm"))}


def test_public_path_stores_and_refuses_like_the_lean_path(tmp_path: Path) -> None:
    files = mr_series(tmp_path / "s", 6, 5)
    lossy = dcmread(files[-1])
    lossy.LossyImageCompression = "01"  # last: storescu stops at the first refusal
    lossy.save_as(files[-1])
    sent = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files[:-1])

    lean_out, lean_spool, lean_uids, lean_refusals = _receive(tmp_path / "lean", "lean", files)
    public_out, public_spool, public_uids, public_refusals = _receive(tmp_path / "public", "public", files)

    assert not _config.STORE_RECV_CHUNKED_DATASET  # pynetdicom's global is back to its default after stop()
    assert lean_uids == public_uids == sent
    assert len(public_spool) == len(sent)
    assert public_spool == lean_spool  # same files, byte for byte
    assert lean_refusals == public_refusals == [(StoreStatus.LOSSY_INPUT_REFUSED, LOSSY_REFUSED)]
    for output in (lean_out, public_out):
        assert "Received Store Response (Error: CannotUnderstand)" in output, output[-2000:]


def _receiving_files(server: StorageServer) -> list[str]:
    """Files of the node's receiving directory: named ones (pynetdicom's), and unnamed ones it holds open (spills)."""
    receiving = server.spool.root / ".receiving"
    named = [p.name for p in receiving.iterdir()]
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(str(receiving) + "/"):
            held.append(target)
    return named + held


@pytest.mark.parametrize("path", ["lean", "public"])
def test_large_data_set_is_received_on_disk_not_in_memory(tmp_path: Path, path: str) -> None:
    """An 18 MiB instance (storescu in another process): traced peak under 8 MiB, spool file byte-identical."""
    (big,) = mr_series(tmp_path / "in", slices=1, size=3072)
    settings = make_settings(tmp_path / "node", **{"network.dimse_path": path, "storage.spill_bytes": 1024 * 1024})
    with edge_server(settings) as server:
        tracemalloc.start()
        try:
            result = storescu(server.port, [big])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.returncode == 0 and "(Success)" in result.stderr, result.stderr[-2000:]
        assert peak < 8 * 1024 * 1024, f"{peak / 2**20:.1f} MiB traced while receiving 18 MiB"
        (stored,) = _spool(server).values()
        sent = big.read_bytes()
        assert stored[-len(_body(sent)):] == _body(sent)
        assert _receiving_files(server) == []


def _body(part10: bytes) -> bytes:
    return part10[132 + 12 + int.from_bytes(part10[140:144], "little"):]


def _p_data(context_id: int, header: int, value: bytes) -> bytes:
    pdv = struct.pack(">LBB", len(value) + 2, context_id, header) + value
    return b"\x04\x00" + struct.pack(">L", len(pdv)) + pdv


@pytest.mark.parametrize("path", ["lean", "public"])
def test_data_set_cut_off_by_an_abort_leaves_nothing_behind(tmp_path: Path, path: str) -> None:
    """A C-STORE whose data set stops after 2 MiB, then A-ABORT: no file left, nothing recorded, node serving."""
    settings = make_settings(tmp_path, **{"network.dimse_path": path, "storage.spill_bytes": 1024 * 1024})
    with edge_server(settings) as server:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        assert assoc.is_established
        command = Dataset()
        command.AffectedSOPClassUID, command.CommandField, command.MessageID = MRImageStorage, 0x0001, 1
        command.Priority, command.CommandDataSetType = 0, 0x0000
        command.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        sock = raw_socket(assoc)
        encoded = encode(command, True, True)
        assert encoded is not None
        sock.sendall(_p_data(1, 0x03, encoded))
        for _ in range(4):
            sock.sendall(_p_data(1, 0x00, bytes(512 * 1024)))
        wait_for(lambda: _receiving_files(server) != [], 15, "the data set to be received on disk")
        assoc.abort()
        wait_for(lambda: _receiving_files(server) == [], 15, "the partial data set to be removed")
        with server.recorder.sessions() as session:
            assert session.scalars(select(Instance)).all() == []
        result = storescu(server.port, mr_series(tmp_path / "s", 0, 2))
        assert result.returncode == 0 and result.stderr.count("(Success)") == 2, result.stderr[-2000:]
