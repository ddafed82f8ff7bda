"""``network.dimse_path = "public"``: C-STOREs through pynetdicom's public API, same result as the lean path.

The same series (and one refused instance) goes with DCMTK's ``storescu`` to a node on
the lean path and to a node on the public path (``EVT_C_STORE`` with
``STORE_RECV_CHUNKED_DATASET``): both must record the same instances, write
byte-identical spool files and name the same refusal.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pynetdicom import _config
from sqlalchemy import select

from dicom_node.db.models import Instance, Rejection
from dicom_node.server import StorageServer
from dicom_node.statuses import StoreStatus
from tests.conftest import make_settings
from tests.test_edge_ingest import edge_server, ended, mr_series, no_patient_data_in_logs, storescu

__all__ = ["no_patient_data_in_logs"]  # the edge tests' autouse check: no patient data in any log record

LOSSY_REFUSED = "lossy-compressed input refused (storage.accept_lossy is false)"


Received = tuple[str, dict[str, bytes], list[str], list[tuple[int, str]]]


def _receive(root: Path, path: str, files: list[Path]) -> Received:
    """Send *files* to a node on *path*: storescu's output, spool files, recorded UIDs, refusals."""
    settings = make_settings(root, **{"network.dimse_path": path, "storage.accept_lossy": False})
    with edge_server(settings) as server:
        assert _config.STORE_RECV_CHUNKED_DATASET is (path == "public")
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
