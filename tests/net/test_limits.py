"""The edge's refusals, timeouts and bounds against real peers (pynetdicom, DCMTK, raw sockets).

- instances that cannot be read are refused before Success: a SOP class sent on
  another class's presentation context, a data set truncated inside its pixel
  data, an element whose length runs past the end;
- no peer can stall the listener: idle and half-sent connections time out and
  hold no association slot another peer needs;
- no PDU or instance can make the node allocate what its peer declares.
"""

from __future__ import annotations

import copy
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.cli.localpacs import wait_for
from dicom_node.db.models import AssociationLog, Instance, Rejection
from dicom_node.net.requestor import associate
from dicom_node.statuses import StoreStatus
from tests.conftest import make_settings
from tests.support.edge import echoscu, edge_server, mr_series, no_patient_data_in_logs, raw_socket, storescu
from tests.support.instances import part10_file
from tests.support.tls import pki, tls_args, tls_settings

__all__ = ["no_patient_data_in_logs", "pki"]  # the autouse log check applies here too; the test PKI

T = TypeVar("T")
#: ``network.dimse_path``: the node's lean C-STORE path and pynetdicom's public API are bounded alike.
DIMSE_PATHS = ["lean", "public"]


def _part10(path: Path, sop_instance: UID, syntax: UID, body: bytes) -> Path:
    """A Part 10 file around an encoded data set, whatever the data set holds."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    path.write_bytes(part10_file(meta, body))
    return path


def _body(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (after its file meta group)."""
    data = path.read_bytes()
    return data[132 + 12 + int.from_bytes(data[140:144], "little"):]


def _refusals(server: object) -> list[Rejection]:
    with server.recorder.sessions() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(Rejection)).all())


def _stored(server: object) -> int:
    with server.recorder.sessions() as session:  # type: ignore[attr-defined]
        return len(session.scalars(select(Instance)).all())


@pytest.mark.parametrize("context", [CTImageStorage, Verification])
def test_store_on_another_sop_classs_context_is_refused(tmp_path: Path, context: str) -> None:
    """An MR C-STORE on a CT (or Verification) presentation context: 0x0122, recorded; was Success."""
    path = mr_series(tmp_path / "in", slices=1)[0]
    syntax = ExplicitVRLittleEndian if context == CTImageStorage else ImplicitVRLittleEndian
    ds = dcmread(path)
    with edge_server(make_settings(tmp_path)) as server:
        ae = AE(ae_title="SCANNER")
        ae.requested_contexts = [build_context(context, [syntax])]
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        assert assoc.is_established
        try:
            # the peer sends MR on the context the node accepted for *context* (as a faulty SCU would)
            (accepted,) = assoc.accepted_contexts
            accepted._abstract_syntax = MRImageStorage
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        assert status.Status == StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED
        assert f"presentation context {accepted.context_id}" in status.ErrorComment
        (refusal,) = _refusals(server)
        assert refusal.status == StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED and context in refusal.reason
        assert _stored(server) == 0
        assert echoscu(server.port) == 0


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("damage", ["cut-inside-pixel-data", "length-past-the-end"])
def test_unreadable_data_sets_are_refused_before_success(tmp_path: Path, syntax: UID, damage: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A data set cut inside Pixel Data, or an element longer than what follows: 0xC000 with the reason."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the file's bytes as they are
    source = dcmread(mr_series(tmp_path / "in", slices=1)[0])
    whole = tmp_path / "whole.dcm"
    source.file_meta.TransferSyntaxUID = syntax
    source.save_as(whole, enforce_file_format=True)
    body = _body(whole)
    if damage == "cut-inside-pixel-data":
        body = body[:-100]
        tag = "(7FE0,0010)"
    else:  # a private element declaring 4 KiB, of which 4 bytes follow
        element = (b"\x09\x00\x10\x10" + (b"\x00\x10\x00\x00" if syntax == ImplicitVRLittleEndian
                                             else b"UN\x00\x00\x00\x10\x00\x00"))
        position = body.index(b"\xe0\x7f\x10\x00")  # before Pixel Data, in tag order
        body = body[:position] + element + b"abcd"
        tag = "(0009,1010)"
    path = _part10(tmp_path / "damaged.dcm", source.SOPInstanceUID, syntax, body)
    with edge_server(make_settings(tmp_path)) as server:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, syntax)
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(path)
            good = assoc.send_c_store(whole)
        finally:
            assoc.release()
        assert status.Status == StoreStatus.CANNOT_UNDERSTAND
        assert "truncated data set" in status.ErrorComment
        (refusal,) = _refusals(server)
        assert refusal.status == StoreStatus.CANNOT_UNDERSTAND and tag in refusal.reason
        assert good.Status == StoreStatus.SUCCESS and _stored(server) == 1


# ----- timeouts and a fair share of the listener --------------------------------------------------------------
#: Where the misbehaving peers connect from (a second loopback address: another host, for the node).
ATTACKER = "127.0.0.2"


def _connect(port: int, source: str = ATTACKER) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _half_associate_rq() -> bytes:
    """The first 16 bytes of an A-ASSOCIATE-RQ that declares 200 (type, reserved, length, version, ...)."""
    return b"\x01\x00" + struct.pack(">L", 200) + b"\x00\x01\x00\x00" + b"AD_NODE "[:6]


def _closed_by_node(sock: socket.socket, within_s: float) -> float:
    """Seconds until the node closed *sock* (EOF or reset); fails after *within_s*."""
    start = time.monotonic()
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the node kept the connection open for more than {within_s} s")
    return time.monotonic() - start


def _timed(call: Callable[[], T]) -> tuple[T, float]:
    start = time.monotonic()
    return call(), time.monotonic() - start


def test_idle_and_half_sent_connections_do_not_stall_the_listener(tmp_path: Path) -> None:
    """10 idle connections and 10 half-sent A-ASSOCIATE-RQs from one host; echoscu and storescu from another."""
    files = mr_series(tmp_path / "in", slices=3)
    settings = make_settings(tmp_path, **{"network.acse_timeout_s": 20, "network.max_associations": 10,
                                          "network.max_associations_per_peer": 4})
    with edge_server(settings) as server:
        idle = [_connect(server.port) for _ in range(10)]
        half = [_connect(server.port) for _ in range(10)]
        for sock in half:
            sock.sendall(_half_associate_rq())
        try:
            code, took = _timed(lambda: echoscu(server.port))
            assert code == 0 and took < 10, took
            result, took = _timed(lambda: storescu(server.port, files))
            assert result.returncode == 0 and result.stderr.count("(Success)") == 3, result.stderr
            assert took < 15, took
            # the node kept at most max_associations_per_peer of the twenty, and closed the others at once
            closed = sum(1 for sock in idle + half if _still_open(sock) is False)
            assert closed >= 16, closed
        finally:
            for sock in idle + half:
                sock.close()
        assert _stored(server) == 3


def _still_open(sock: socket.socket) -> bool:
    """False once the node closed *sock* (waits briefly for the close to arrive)."""
    sock.settimeout(2)
    try:
        return sock.recv(1) != b""
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False


def test_half_sent_associate_rq_times_out_with_the_acse_timeout(tmp_path: Path) -> None:
    """A peer that sends 16 bytes of an A-ASSOCIATE-RQ is disconnected after network.acse_timeout_s."""
    settings = make_settings(tmp_path, **{"network.acse_timeout_s": 1.5})
    with edge_server(settings) as server:
        sock = _connect(server.port, source="127.0.0.1")
        sock.sendall(_half_associate_rq())
        took = _closed_by_node(sock, within_s=15)
        assert 1.0 < took < 8, took
        assert echoscu(server.port) == 0


@pytest.mark.parametrize("path", DIMSE_PATHS)
def test_half_sent_pdu_times_out_with_the_network_timeout(tmp_path: Path, path: str) -> None:
    """An established association whose peer stops inside a P-DATA-TF PDU is ended after network_timeout_s."""
    settings = make_settings(tmp_path, **{"network.network_timeout_s": 1.5, "network.dimse_path": path})
    with edge_server(settings) as server:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        assert assoc.is_established
        try:
            raw = raw_socket(assoc)
            raw.sendall(b"\x04\x00" + struct.pack(">L", 1000) + b"\x00\x00\x03\xe6\x01\x03")  # 12 of 1006 bytes
            wait_for(lambda: not assoc.is_alive() or assoc.is_aborted, 15, "the node to end the association")
        finally:
            assoc.abort()
        assert echoscu(server.port) == 0


def test_idle_tls_connection_does_not_block_other_tls_clients(tmp_path: Path, pki: Path) -> None:
    """An idle TCP connection to the TLS listener (no ClientHello): TLS echoscu and storescu still succeed."""
    files = mr_series(tmp_path / "in", slices=2)
    with edge_server(tls_settings(tmp_path, pki, **{"network.acse_timeout_s": 20})) as server:
        idle = _connect(server.port)
        half = _connect(server.port)
        half.sendall(b"\x16\x03\x01\x02\x00")  # the start of a TLS record, never finished
        try:
            code, took = _timed(lambda: echoscu(server.port, extra=tls_args(pki, "scanner")))
            assert code == 0 and took < 10, took
            result = storescu(server.port, files, extra=tls_args(pki, "scanner"))
            assert result.returncode == 0 and result.stderr.count("(Success)") == 2, result.stderr
        except BaseException:
            idle.close()
            half.close()
            raise
        stopping = time.monotonic()
    try:
        assert time.monotonic() - stopping < 10  # stopping ends the stalled handshakes, does not wait them out
    finally:
        idle.close()
        half.close()


def test_stalled_tls_handshake_is_closed_with_the_acse_timeout(tmp_path: Path, pki: Path) -> None:
    with edge_server(tls_settings(tmp_path, pki, **{"network.acse_timeout_s": 1.5})) as server:
        sock = _connect(server.port, source="127.0.0.1")
        took = _closed_by_node(sock, within_s=15)
        assert 1.0 < took < 8, took


# ----- bounds: nothing is allocated or kept because a peer declared it ---------------------------------------
def _peak_rss() -> int:
    """The process's peak resident set size (bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


def _established(port: int) -> Any:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = associate(ae, "127.0.0.1", port, ae_title="AD_NODE")
    assert assoc.is_established
    return assoc


@pytest.mark.parametrize("header", [
    b"\x05\x00\xff\xff\xff\xff",                        # an A-RELEASE-RQ declaring 4 GiB
    b"\x04\x00" + struct.pack(">L", 64 * 1024 * 1024),  # a P-DATA-TF over the negotiated maximum (1 MiB)
], ids=["release-rq-4GiB", "p-data-64MiB"])
@pytest.mark.parametrize("path", DIMSE_PATHS)
def test_overlong_pdu_aborts_without_allocating(tmp_path: Path, header: bytes, path: str) -> None:
    with edge_server(make_settings(tmp_path, **{"network.dimse_path": path})) as server:
        peak = _peak_rss()
        assoc = _established(server.port)
        try:
            raw_socket(assoc).sendall(header)
            wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 15, "the node to abort the association")
        finally:
            assoc.abort()
        assert _peak_rss() - peak < 256 * 1024 * 1024
        assert echoscu(server.port) == 0


def test_overlong_associate_rq_is_closed_without_allocating(tmp_path: Path) -> None:
    with edge_server(make_settings(tmp_path)) as server:
        peak = _peak_rss()
        sock = _connect(server.port, source="127.0.0.1")
        sock.sendall(b"\x01\x00\xff\xff\xff\xff" + b"\x00\x01" * 8)
        assert _closed_by_node(sock, within_s=15) < 10
        assert _peak_rss() - peak < 256 * 1024 * 1024
        assert echoscu(server.port) == 0


@pytest.mark.parametrize("path", DIMSE_PATHS)
def test_pixel_data_declaring_more_than_the_bound_is_refused_before_decoding(tmp_path: Path, path: str) -> None:
    """2 KB of JPEG-LS declaring 8192 x 8192 x 16 bits (128 MiB): 0xA700 with the reason, from the header alone."""
    source = dcmread(mr_series(tmp_path / "in", slices=1)[0])
    bomb = copy.deepcopy(source)
    bomb.Rows = bomb.Columns = 8192
    bomb.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(2048) + b"\xff\xd9"])
    bomb["PixelData"].VR = "OB"
    bomb.file_meta.TransferSyntaxUID = JPEGLSLossless
    bomb.SOPInstanceUID = generate_uid()
    settings = make_settings(tmp_path, **{"storage.max_pixel_bytes": 64 * 1024 * 1024, "network.dimse_path": path})
    with edge_server(settings) as server:
        ae = AE(ae_title="SCANNER")
        ae.requested_contexts = [build_context(MRImageStorage, [JPEGLSLossless]),
                                 build_context(MRImageStorage, [ExplicitVRLittleEndian])]
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        assert assoc.is_established
        try:
            refused = assoc.send_c_store(bomb)
            good = assoc.send_c_store(source)
        finally:
            assoc.release()
        assert refused.Status == StoreStatus.OUT_OF_RESOURCES, refused
        (refusal,) = _refusals(server)
        assert "128 MiB" in refusal.reason and "storage.max_pixel_bytes" in refusal.reason
        assert good.Status == StoreStatus.SUCCESS and _stored(server) == 1


def test_data_set_over_the_bound_is_refused_and_not_kept(tmp_path: Path) -> None:
    big, small = (dcmread(mr_series(tmp_path / f"in{n}", slices=1, size=size, series_number=n)[0])
                  for n, size in ((4, 256), (5, 24)))
    settings = make_settings(tmp_path, **{"storage.max_dataset_bytes": 64 * 1024})
    with edge_server(settings) as server:
        assoc = _established(server.port)
        try:
            refused = assoc.send_c_store(big)
            good = assoc.send_c_store(small)
        finally:
            assoc.release()
        assert refused.Status == StoreStatus.OUT_OF_RESOURCES
        assert "storage.max_dataset_bytes" in refused.ErrorComment
        (refusal,) = _refusals(server)
        assert refusal.status == StoreStatus.OUT_OF_RESOURCES
        assert good.Status == StoreStatus.SUCCESS and _stored(server) == 1


def test_data_set_over_the_bound_aborts_the_public_path_with_the_reason(tmp_path: Path) -> None:
    """pynetdicom cannot answer before the data set ends: the node aborts as it passes the bound, and records why."""
    big = dcmread(mr_series(tmp_path / "in", slices=1, size=256)[0])
    settings = make_settings(tmp_path, **{"storage.max_dataset_bytes": 64 * 1024, "network.dimse_path": "public"})
    with edge_server(settings) as server:
        assoc = _established(server.port)
        try:
            answer = assoc.send_c_store(big)
        finally:
            assoc.abort()
        assert "Status" not in answer and assoc.is_aborted
        (refusal,) = _refusals(server)
        assert refusal.status == StoreStatus.OUT_OF_RESOURCES
        assert refusal.sop_instance_uid == big.SOPInstanceUID
        assert refusal.reason == "data set over storage.max_dataset_bytes (0.0625 MiB) while receiving"
        wait_for(lambda: _association_reasons(server) != [None], 10, "the association log to be finished")
        assert _association_reasons(server) == [
            "data set over storage.max_dataset_bytes (0.0625 MiB) while receiving: 0 acknowledged instance(s) kept"]
        assert _stored(server) == 0 and list((server.spool.root / ".receiving").iterdir()) == []
        assert echoscu(server.port) == 0


def _association_reasons(server: object) -> list[str | None]:
    with server.recorder.sessions() as session:  # type: ignore[attr-defined]
        return list(session.scalars(select(AssociationLog.reason)).all())
