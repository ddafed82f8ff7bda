"""The lean C-STORE path: PDV routing, command coding, and real associations through it."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from dicom_node.db.models import Instance
from dicom_node.net.dimse import (
    ProtocolError,
    StoreAssembler,
    StoreRequest,
    decode_command,
    encode_store_response,
    p_data_pdus,
)
from dicom_node.net.reactors import PYNETDICOM_ASSOCIATION_INTERNALS, PYNETDICOM_DUL_INTERNALS
from dicom_node.net.requestor import associate
from dicom_node.statuses import StoreStatus
from tests.conftest import make_settings
from tests.support.edge import edge_server, mr_series


def _command(**values: object) -> bytes:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    encoded = encode(ds, True, True)
    assert encoded is not None
    return encoded


def _store_command(sop_instance: str, message_id: int = 7, data_set_type: int = 0x0000) -> bytes:
    return _command(AffectedSOPClassUID=MRImageStorage, CommandField=0x0001, MessageID=message_id,
                    Priority=0, CommandDataSetType=data_set_type, AffectedSOPInstanceUID=sop_instance)


def _pdv(context_id: int, header: int, value: bytes) -> bytes:
    return struct.pack(">LBB", len(value) + 2, context_id, header) + value


class _Recorder:
    def __init__(self, status: int = 0x0000, comment: str | None = None) -> None:
        self.requests: list[tuple[StoreRequest, bytes, str]] = []
        self.status, self.comment = status, comment

    def __call__(self, request: StoreRequest, ts_uid: str) -> tuple[int, str | None]:
        with request.dataset() as raw:
            self.requests.append((request, bytes(raw), ts_uid))
        return self.status, self.comment


def test_command_round_trip_matches_pydicom() -> None:
    uid = generate_uid()
    values = decode_command(_store_command(uid, message_id=513))
    assert values is not None
    assert values[0x0100] == 0x0001 and values[0x0110] == 513
    assert values[0x0002] == MRImageStorage and values[0x1000] == uid
    request = StoreRequest(context_id=1, message_id=513, sop_class_uid=MRImageStorage, sop_instance_uid=uid)
    response = read_dataset(BytesIO(encode_store_response(request, 0xA900, "SOPClassUID differs")), True, True)
    assert response.CommandField == 0x8001 and response.MessageIDBeingRespondedTo == 513
    assert response.Status == 0xA900 and response.ErrorComment == "SOPClassUID differs"
    assert response.AffectedSOPInstanceUID == uid and response.CommandDataSetType == 0x0101
    encoded = encode_store_response(request, 0x0000, None)
    ok = read_dataset(BytesIO(encoded), True, True)
    assert ok.CommandGroupLength == len(encoded) - 12
    assert "ErrorComment" not in ok


def test_fragmented_store_is_served_and_echo_is_handed_over() -> None:
    store = _Recorder()
    assembler = StoreAssembler({1: ExplicitVRLittleEndian, 3: ImplicitVRLittleEndian}, store)
    uid = generate_uid()
    command = _store_command(uid)
    # command split over two PDUs, data set over three PDVs
    passed, responses = assembler.feed(_pdv(1, 0x01, command[:10]))
    assert passed == [] and responses == []
    passed, responses = assembler.feed(_pdv(1, 0x03, command[10:]) + _pdv(1, 0x00, b"abcd"))
    assert passed == [] and responses == []
    passed, responses = assembler.feed(_pdv(1, 0x00, b"efgh") + _pdv(1, 0x02, b"ij"))
    assert passed == []
    assert [(r.sop_instance_uid, data, ts) for r, data, ts in store.requests] == [
        (uid, b"abcdefghij", ExplicitVRLittleEndian)]
    (context_id, response), = responses
    assert context_id == 1 and read_dataset(BytesIO(response), True, True).Status == 0x0000
    # a C-ECHO-RQ (no data set) goes to pynetdicom whole, and the next C-STORE is ours again
    echo = _pdv(3, 0x03, _command(AffectedSOPClassUID=Verification, CommandField=0x0030, MessageID=8,
                                  CommandDataSetType=0x0101))
    passed, responses = assembler.feed(echo)
    assert passed == [echo] and responses == []
    passed, responses = assembler.feed(_pdv(3, 0x03, _store_command(generate_uid(), 9)) + _pdv(3, 0x02, b"xy"))
    assert passed == [] and len(responses) == 1 and store.requests[-1][2] == ImplicitVRLittleEndian


def test_unknown_context_and_other_commands_go_to_pynetdicom_in_order() -> None:
    store = _Recorder()
    assembler = StoreAssembler({1: ExplicitVRLittleEndian}, store)
    first = _pdv(5, 0x01, _store_command(generate_uid())[:6])
    rest = _pdv(5, 0x03, _store_command(generate_uid())[6:])
    data = _pdv(5, 0x02, b"zz")
    assert assembler.feed(first) == ([], [])
    passed, _ = assembler.feed(rest + data)  # context 5 was not accepted: pynetdicom decides (it aborts)
    assert passed == [first, rest, data] and store.requests == []
    find = _pdv(1, 0x03, _command(AffectedSOPClassUID=MRImageStorage, CommandField=0x0020, MessageID=1,
                                  CommandDataSetType=0x0000))
    identifier = _pdv(1, 0x02, b"q")
    assert assembler.feed(find + identifier)[0] == [find, identifier]


@pytest.mark.parametrize(("pdu", "match"), [
    (b"\x00\x00\x00", "truncated"),
    (struct.pack(">LBB", 900, 1, 0x03) + b"xx", "past the end"),
    (_pdv(1, 0x02, b"data first"), "without a command"),
])
def test_malformed_pdvs_are_protocol_errors(pdu: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        StoreAssembler({1: ExplicitVRLittleEndian}, _Recorder()).feed(pdu)


def test_command_fragment_inside_a_data_set_is_a_protocol_error() -> None:
    assembler = StoreAssembler({1: ExplicitVRLittleEndian}, _Recorder())
    assembler.feed(_pdv(1, 0x03, _store_command(generate_uid())))
    with pytest.raises(ProtocolError, match="out of order"):
        assembler.feed(_pdv(1, 0x01, b"\x00\x00"))


def test_responses_fit_the_peers_maximum_pdu() -> None:
    command = bytes(range(200))
    pdus = p_data_pdus(1, command, max_pdu=64)
    assert all(len(pdu) - 6 <= 64 for pdu in pdus)
    values, headers = b"", []
    for pdu in pdus:
        length, context_id, header = struct.unpack_from(">LBB", pdu, 6)
        assert context_id == 1
        values += pdu[12:12 + length - 2]
        headers.append(header)
    assert values == command and headers[-1] == 0x03 and set(headers[:-1]) == {0x01}
    assert len(p_data_pdus(1, command, max_pdu=0)) == 1


def test_mixed_association_through_the_lean_path(tmp_path: Path) -> None:
    """pynetdicom as the peer: C-STORE, C-ECHO, a refused C-STORE (with its comment), C-STORE."""
    good = [dcmread(path) for path in mr_series(tmp_path / "series", slices=3)]
    wrong = good[2].copy()
    wrong.Modality = "CT"
    with edge_server(make_settings(tmp_path)) as server:
        ae = AE(ae_title="SCANNER")
        ae.requested_contexts = [build_context(MRImageStorage, [ExplicitVRLittleEndian]),
                                 build_context(Verification)]
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        assert assoc.is_established
        try:
            assert assoc.send_c_store(good[0]).Status == StoreStatus.SUCCESS
            assert assoc.send_c_echo().Status == 0x0000
            refused = assoc.send_c_store(wrong)
            assert refused.Status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
            assert "Modality" in refused.ErrorComment
            assert assoc.send_c_store(good[1]).Status == StoreStatus.SUCCESS
        finally:
            assoc.release()
        with server.recorder.sessions() as session:
            count = session.scalar(select(func.count()).select_from(Instance))
    assert count == 2


def test_pynetdicom_internals_the_edge_relies_on_are_there(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every private pynetdicom attribute of :mod:`dicom_node.net.reactors` exists on a real acceptor association.

    A pynetdicom upgrade that renames one fails here, not silently in production
    (where :func:`~dicom_node.net.reactors.install` would fall back to pynetdicom's unbounded loops).
    """
    seen: list[tuple[bool, bool]] = []

    def look(event: Any) -> None:
        assoc = event.assoc
        seen.append((all(hasattr(assoc.dul, name) for name in PYNETDICOM_DUL_INTERNALS),
                     all(hasattr(assoc, name) for name in PYNETDICOM_ASSOCIATION_INTERNALS)))

    with edge_server(make_settings(tmp_path)) as server:
        assert server._server is not None
        server._server.bind(evt.EVT_CONN_OPEN, look)
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(Verification)
        assoc = associate(ae, "127.0.0.1", server.port, ae_title="AD_NODE")
        assert assoc.is_established
        assoc.release()
    assert seen == [(True, True)]
    assert "internals differ" not in caplog.text
