"""A seeded PDU-level fuzzer: raw TCP to the node, below anything a DICOM toolkit would send.

:mod:`tests.chaos.fuzz` damages data sets and lets pynetdicom carry them; here
the upper layer protocol itself is broken (PS3.8 section 9): each case opens a
plain socket to the node on 127.0.0.1, writes PDUs built by hand and records what
the node did, within a bounded time (every read has a deadline):

- ``truncated``: a PDU cut short (the header declares more than is sent), then
  end of stream, or silence (the connection is *parked* and must be closed by
  the node within its ACSE or network timeout);
- ``oversized``: every PDU type with a declared length far past any limit (up to
  2**32 - 1), before and after association;
- ``unknown-type``: PDU type bytes 0x00 and 0x08..0xFF;
- ``out-of-order``: P-DATA-TF, A-RELEASE-RQ, A-ASSOCIATE-AC/RJ before any association;
- ``unknown-context``: P-DATA-TF on a presentation context that was not accepted;
- ``command-without-data``: a C-STORE-RQ announcing a data set that never comes
  (or announcing none); ``data-without-command``: data set fragments first;
- ``release-mid-transfer``: A-RELEASE-RQ between a C-STORE's fragments;
- ``second-associate``: another A-ASSOCIATE-RQ on an established association;
- ``byte-flips``: random bytes changed in a valid association and C-STORE stream;
- ``valid-store``: clean C-STOREs, interleaved with the rest, which must be answered
  Success; after most cases on an established association a valid C-STORE follows
  the damage in the same association too.

Every instance the node answers with Success, in any case, is recorded; at the end
each must be in the node's database and spool ("no acknowledged instance lost").
Every few cases a legitimate pynetdicom SCU must get its C-ECHO answered promptly.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import func
from sqlalchemy import select as sql_select

from dicom_node.cli.localpacs import LocalOrthanc
from dicom_node.db.models import AssociationLog, Instance
from dicom_node.db.session import Database
from tests.chaos.fuzz import base_dataset
from tests.chaos.node_process import NODE_AE, SCANNER_AE, NodeProcess, echo_ok
from tests.chaos.scenarios import Findings, node_db

#: PDU type bytes (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF",
             5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}
#: Presentation contexts this fuzzer proposes: MR Image Storage and Verification.
STORE_CX, ECHO_CX = 1, 3
#: Our maximum PDU length (the node's responses are split to fit).
OUR_MAX_PDU = 16384
#: Largest PDU this fuzzer reads from the node (it never sends more than OUR_MAX_PDU).
_READ_LIMIT = 1 << 20
#: The Verification SOP Class UID (PS3.4 A.4).
Verification = "1.2.840.10008.1.1"
#: The application context name (PS3.7 A.2.1).
_APP_CONTEXT = b"1.2.840.10008.3.1.1.1"
_IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.10.1389.99"
#: The case kinds and how often each is drawn.
KINDS: dict[str, int] = {
    "truncated": 14, "oversized": 12, "unknown-type": 10, "out-of-order": 5, "unknown-context": 8,
    "command-without-data": 8, "data-without-command": 6, "release-mid-transfer": 8, "second-associate": 6,
    "byte-flips": 13, "valid-store": 10,
}


# ----- encoding ---------------------------------------------------------------
def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte big-endian length, body."""
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii").ljust(16, b" ")


def associate_rq(calling: str = SCANNER_AE, called: str = NODE_AE, max_pdu: int = OUR_MAX_PDU) -> bytes:
    """An A-ASSOCIATE-RQ proposing MR Image Storage (explicit VR LE) and Verification (PS3.8 9.3.2)."""
    contexts = b"".join(
        _item(0x20, bytes([cx_id, 0, 0, 0]) + _item(0x30, uid.encode()) + _item(0x40, ts.encode()))
        for cx_id, uid, ts in ((STORE_CX, MRImageStorage, ExplicitVRLittleEndian),
                               (ECHO_CX, Verification, ImplicitVRLittleEndian)))
    user = _item(0x50, _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _IMPLEMENTATION_UID))
    fixed = struct.pack(">HH", 1, 0) + _ae(called) + _ae(calling) + bytes(32)
    return pdu(ASSOCIATE_RQ, fixed + _item(0x10, _APP_CONTEXT) + contexts + user)


def release_rq() -> bytes:
    """An A-RELEASE-RQ."""
    return pdu(RELEASE_RQ, bytes(4))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0, element, len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set (implicit VR LE, group length first) from (element, value) pairs."""
    body = b"".join(_element(e, v) for e, v in elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body


def store_command(message_id: int, sop_instance_uid: str, data_set_type: int = 0x0000) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1); *data_set_type* 0x0101 announces no data set."""
    return command_set([(0x0002, _uid(MRImageStorage)), (0x0100, struct.pack("<H", 0x0001)),
                        (0x0110, struct.pack("<H", message_id)), (0x0700, struct.pack("<H", 0)),
                        (0x0800, struct.pack("<H", data_set_type)), (0x1000, _uid(sop_instance_uid))])


def echo_command(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 9.3.5.1)."""
    return command_set([(0x0002, _uid(Verification)), (0x0100, struct.pack("<H", 0x0030)),
                        (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101))])


def p_data(context_id: int, value: bytes, *, command: bool, last: bool = True) -> bytes:
    """One P-DATA-TF PDU carrying one PDV (PS3.8 9.3.5, E.2)."""
    header = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return pdu(P_DATA, struct.pack(">LBB", len(value) + 2, context_id, header) + value)


def data_fragments(context_id: int, data: bytes, fragment: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying a data set in fragments of *fragment* bytes."""
    starts = range(0, len(data), fragment)
    return [p_data(context_id, data[s:s + fragment], command=False, last=s + fragment >= len(data)) for s in starts]


def encode_dataset(ds: Dataset) -> bytes:
    """A data set in explicit VR little endian, no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def decode_command(raw: bytes) -> dict[int, int | str]:
    """Status (0000,0900), command field and affected SOP instance of a response command set."""
    values: dict[int, int | str] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        value = raw[pos + 8:pos + 8 + length]
        pos += 8 + length
        if group == 0 and element in (0x0100, 0x0120, 0x0900) and length == 2:
            values[element] = struct.unpack("<H", value)[0]
        elif group == 0 and element == 0x1000:
            values[element] = value.rstrip(b"\0 ").decode("ascii", "replace")
    return values


# ----- the peer ---------------------------------------------------------------
@dataclass
class Exchange:
    """What the node sent back in one case, until it closed the connection or the deadline passed."""

    pdus: list[int] = field(default_factory=list)
    #: (status, affected SOP instance UID) of every C-STORE-RSP received.
    store_responses: list[tuple[int, str]] = field(default_factory=list)
    echo_answered: bool = False
    closed: bool = False
    timed_out: bool = False

    @property
    def outcome(self) -> str:
        """answered / aborted / closed / timed out (what the node did)."""
        if ABORT in self.pdus:
            return "aborted"
        if self.timed_out:
            return "timed out"
        return "answered" if self.pdus else "closed"


class RawPeer:
    """A plain TCP connection to the node; every read is bounded by a deadline."""

    def __init__(self, port: int, read_timeout_s: float) -> None:
        self.read_timeout_s = read_timeout_s
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=read_timeout_s)
        self._command = bytearray()

    def send(self, data: bytes) -> bool:
        """Send; False when the node already closed (reset or broken pipe)."""
        try:
            self.sock.sendall(data)
        except OSError:
            return False
        return True

    def half_close(self) -> None:
        """End of stream to the node; reading goes on."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def _recv_exact(self, size: int, deadline: float) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(min(65536, size - len(data)))
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def read_pdu(self, deadline: float) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or None when the node closed the connection.

        Raises
        ------
        TimeoutError
            Nothing complete arrived before *deadline* (``time.monotonic()``).
        """
        header = self._recv_exact(6, deadline)
        if header is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", header)
        if length > _READ_LIMIT:
            raise ValueError(f"node sent a PDU of type 0x{pdu_type:02X} declaring {length} bytes")
        body = self._recv_exact(length, deadline)
        return None if body is None else (pdu_type, body)

    def associate(self, exchange: Exchange) -> bool:
        """Send a valid A-ASSOCIATE-RQ; True when the node accepted both contexts."""
        if not self.send(associate_rq()):
            exchange.closed = True
            return False
        return self.expect(exchange, ASSOCIATE_AC)

    def expect(self, exchange: Exchange, wanted: int) -> bool:
        """Read PDUs until one of type *wanted* (True), or an abort, close or timeout (False)."""
        deadline = time.monotonic() + self.read_timeout_s
        while True:
            if not self._read_one(exchange, deadline):
                return False
            if exchange.pdus[-1] == wanted:
                return True
            if exchange.pdus[-1] in (ABORT, ASSOCIATE_RJ):
                return False

    def drain(self, exchange: Exchange, timeout_s: float) -> None:
        """Read everything until the node closes the connection or *timeout_s* passes."""
        deadline = time.monotonic() + timeout_s
        while self._read_one(exchange, deadline):
            pass

    def _read_one(self, exchange: Exchange, deadline: float) -> bool:
        try:
            got = self.read_pdu(deadline)
        except TimeoutError:
            exchange.timed_out = True
            return False
        if got is None:
            exchange.closed = True
            return False
        pdu_type, body = got
        exchange.pdus.append(pdu_type)
        if pdu_type == P_DATA:
            self._responses(body, exchange)
        return True

    def _responses(self, body: bytes, exchange: Exchange) -> None:
        pos = 0
        while pos + 6 <= len(body):
            length, _, header = struct.unpack_from(">LBB", body, pos)
            value = body[pos + 6:pos + 4 + length]
            pos += 4 + max(length, 2)
            if not header & 0x01:
                continue
            self._command += value
            if header & 0x02:
                values = decode_command(bytes(self._command))
                self._command.clear()
                if values.get(0x0100) == 0x8001:
                    exchange.store_responses.append((int(values.get(0x0900, -1)), str(values.get(0x1000, ""))))
                elif values.get(0x0100) == 0x8030 and values.get(0x0900) == 0:
                    exchange.echo_answered = True


# ----- the cases --------------------------------------------------------------
@dataclass
class Instances:
    """Valid MR instances to send, each with a fresh SOP Instance UID (one study per fuzz run)."""

    seed: int
    count: int = 0
    study_uid: str = ""
    series_uid: str = ""

    def __post_init__(self) -> None:
        self.study_uid = generate_uid(entropy_srcs=[f"pdu-fuzz-study-{self.seed}"])
        self.series_uid = generate_uid(entropy_srcs=[f"pdu-fuzz-series-{self.seed}"])

    def next(self) -> tuple[str, bytes]:
        """(SOP Instance UID, encoded data set) of the next instance."""
        self.count += 1
        ds = base_dataset(random.Random(self.seed * 100_003 + self.count), size=16)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"pdu-fuzz-{self.seed}-{self.count}"])
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_uid
        ds.SeriesDescription, ds.ImageType = "pdu fuzz localizer", ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.InstanceNumber = self.count
        ds.ImagePositionPatient = [0.0, 0.0, float(self.count)]
        return str(ds.SOPInstanceUID), encode_dataset(ds)


@dataclass
class Case:
    """One fuzz case: its kind, a description of the bytes, what the node did."""

    index: int
    kind: str
    detail: str = ""
    outcome: str = ""
    #: The node kept a connection open past the bound, or another rule was broken.
    problem: str | None = None
    #: A parked (silent) connection the node must close by itself.
    parked: RawPeer | None = None


@dataclass
class CaseContext:
    """What every case needs."""

    port: int
    rng: random.Random
    instances: Instances
    #: Bound on any one wait for the node (above its ACSE and network timeouts, with room).
    bound_s: float
    #: SOP Instance UID -> case index, for every C-STORE answered Success.
    acked: dict[str, int] = field(default_factory=dict)
    #: SOP Instance UIDs sent by valid-store cases and not answered Success.
    valid_refused: list[str] = field(default_factory=list)


def _record(ctx: CaseContext, case: Case, exchange: Exchange) -> None:
    for status, uid in exchange.store_responses:
        if status == 0:
            ctx.acked[uid] = case.index


def _store_messages(ctx: CaseContext, rng: random.Random, message_id: int) -> tuple[str, list[bytes]]:
    uid, data = ctx.instances.next()
    fragment = rng.choice((len(data), 512, 2048, 4000))
    return uid, [p_data(STORE_CX, store_command(message_id, uid), command=True), *data_fragments(STORE_CX, data,
                                                                                                  fragment)]


def _established(ctx: CaseContext, case: Case, body: Callable[[RawPeer, Exchange], object], *,
                 follow_up: bool) -> None:
    """Associate, send *body*'s damage, then (optionally) a valid C-STORE and A-RELEASE-RQ; read to the end."""
    peer = RawPeer(ctx.port, ctx.bound_s)
    exchange = Exchange()
    try:
        if not peer.associate(exchange):
            case.outcome = f"association refused ({exchange.outcome})"
            case.problem = f"valid A-ASSOCIATE-RQ not accepted: PDUs {exchange.pdus}"
            return
        exchange.pdus.clear()
        body(peer, exchange)
        if follow_up:
            _, messages = _store_messages(ctx, ctx.rng, 999)
            peer.send(b"".join(messages) + release_rq())
        peer.half_close()
        peer.drain(exchange, ctx.bound_s)
        case.outcome = exchange.outcome
        if exchange.timed_out:
            case.problem = f"node neither answered nor closed within {ctx.bound_s:.0f} s"
        _record(ctx, case, exchange)
    finally:
        peer.close()


def _unassociated(ctx: CaseContext, case: Case, data: bytes, *, park: bool = False) -> None:
    """Send *data* on a fresh connection; then end of stream (or silence, parked) and read to the end."""
    peer = RawPeer(ctx.port, ctx.bound_s)
    exchange = Exchange()
    peer.send(data)
    if park:
        case.parked, case.outcome = peer, "parked"
        return
    try:
        peer.half_close()
        peer.drain(exchange, ctx.bound_s)
        case.outcome = exchange.outcome
        if exchange.timed_out:
            case.problem = f"node neither answered nor closed within {ctx.bound_s:.0f} s"
    finally:
        peer.close()


def _declared(rng: random.Random) -> int:
    return rng.choice((0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 256 * 1024 + 1, 1_048_576 + 7, 1 << 30,
                       rng.randrange(1 << 20, 1 << 32)))


def case_truncated(ctx: CaseContext, case: Case) -> None:
    """A PDU cut short; then end of stream or silence (parked: the node's timeout must close it)."""
    rng = ctx.rng
    park = rng.random() < 0.25
    if rng.random() < 0.5:
        whole = associate_rq()
        cut = rng.randrange(0, len(whole))
        case.detail = f"A-ASSOCIATE-RQ, {cut} of {len(whole)} bytes{', then silence' if park else ''}"
        _unassociated(ctx, case, whole[:cut], park=park)
        return
    _, messages = _store_messages(ctx, rng, 1)
    whole = rng.choice((messages[0], messages[-1], release_rq(), pdu(ABORT, bytes(4))))
    cut = rng.randrange(1, len(whole))
    case.detail = f"{PDU_NAMES[whole[0]]} after association, {cut} of {len(whole)} bytes"
    if park:
        peer = RawPeer(ctx.port, ctx.bound_s)
        exchange = Exchange()
        if peer.associate(exchange):
            peer.send(whole[:cut])
            case.parked, case.outcome, case.detail = peer, "parked", case.detail + ", then silence"
        else:
            peer.close()
            case.problem = f"valid A-ASSOCIATE-RQ not accepted: PDUs {exchange.pdus}"
        return
    _established(ctx, case, lambda peer, _: peer.send(whole[:cut]), follow_up=False)


def _before_or_after_association(ctx: CaseContext, case: Case, data: bytes) -> None:
    """Send *data* on a fresh connection or on an established association (a coin toss)."""
    rng = ctx.rng
    if rng.random() < 0.5:
        case.detail += ", before association"
        _unassociated(ctx, case, data)
    else:
        case.detail += ", after association"
        _established(ctx, case, lambda peer, _: peer.send(data), follow_up=rng.random() < 0.5)


def case_oversized(ctx: CaseContext, case: Case) -> None:
    """Every PDU type with a huge declared length and a little of the body."""
    rng = ctx.rng
    pdu_type, declared = rng.randint(1, 7), _declared(rng)
    body = rng.randbytes(rng.choice((0, 6, 64, 4096, 65536)))
    data = struct.pack(">BBL", pdu_type, 0, declared) + body
    case.detail = f"{PDU_NAMES[pdu_type]} declaring {declared} bytes, {len(body)} sent"
    _before_or_after_association(ctx, case, data)


def case_unknown_type(ctx: CaseContext, case: Case) -> None:
    """PDU type bytes no standard defines."""
    rng = ctx.rng
    pdu_type = rng.choice((0x00, *range(0x08, 0x100)))
    body = rng.randbytes(rng.choice((0, 4, 68, 1000)))
    data = struct.pack(">BBL", pdu_type, rng.randrange(256), len(body)) + body
    case.detail = f"type 0x{pdu_type:02X}, {len(body)} bytes"
    _before_or_after_association(ctx, case, data)


def case_out_of_order(ctx: CaseContext, case: Case) -> None:
    """A well-formed PDU the node cannot expect before an association."""
    rng = ctx.rng
    _, messages = _store_messages(ctx, rng, 1)
    ac = associate_rq()
    choices = {"P-DATA-TF": messages[0], "A-RELEASE-RQ": release_rq(), "A-RELEASE-RP": pdu(RELEASE_RP, bytes(4)),
               "A-ASSOCIATE-AC": bytes([ASSOCIATE_AC]) + ac[1:],
               "A-ASSOCIATE-RJ": pdu(ASSOCIATE_RJ, bytes([0, 1, 1, 3])), "A-ABORT": pdu(ABORT, bytes(4))}
    name = rng.choice(sorted(choices))
    case.detail = f"{name} before A-ASSOCIATE-RQ"
    _unassociated(ctx, case, choices[name])


def case_unknown_context(ctx: CaseContext, case: Case) -> None:
    """A C-STORE or C-ECHO on a presentation context ID that was never accepted."""
    rng = ctx.rng
    context_id = rng.choice((0, 2, 5, 7, 127, 255, rng.randrange(9, 255, 2)))
    if rng.random() < 0.5:
        uid, data = ctx.instances.next()
        messages = [p_data(context_id, store_command(2, uid), command=True),
                    *data_fragments(context_id, data, rng.choice((len(data), 1024)))]
        case.detail = f"C-STORE-RQ on context {context_id}"
    else:
        messages = [p_data(context_id, echo_command(2), command=True)]
        case.detail = f"C-ECHO-RQ on context {context_id}"
    _established(ctx, case, lambda peer, _: peer.send(b"".join(messages)), follow_up=rng.random() < 0.7)


def case_command_without_data(ctx: CaseContext, case: Case) -> None:
    """A C-STORE-RQ whose data set never comes (next: another command or A-RELEASE-RQ), or announced as none."""
    rng = ctx.rng
    uid, _ = ctx.instances.next()
    if rng.random() < 0.4:
        case.detail = "C-STORE-RQ with CommandDataSetType 0x0101 (no data set)"
        command = p_data(STORE_CX, store_command(3, uid, 0x0101), command=True)
        _established(ctx, case, lambda peer, _: peer.send(command), follow_up=rng.random() < 0.7)
        return
    command = p_data(STORE_CX, store_command(3, uid), command=True)
    case.detail = "C-STORE-RQ, data set announced, next a new command"
    _established(ctx, case, lambda peer, _: peer.send(command), follow_up=True)


def case_data_without_command(ctx: CaseContext, case: Case) -> None:
    """Data set fragments with no command before them."""
    rng = ctx.rng
    _, data = ctx.instances.next()
    fragments = data_fragments(STORE_CX, data, rng.choice((len(data), 700)))
    case.detail = f"{len(fragments)} data set fragment(s), no command"
    _established(ctx, case, lambda peer, _: peer.send(b"".join(fragments)), follow_up=rng.random() < 0.5)


def case_release_mid_transfer(ctx: CaseContext, case: Case) -> None:
    """A-RELEASE-RQ between the fragments of a C-STORE (then the rest of it, or nothing)."""
    rng = ctx.rng
    uid, data = ctx.instances.next()
    fragments = data_fragments(STORE_CX, data, 600)
    split = rng.randrange(0, len(fragments))
    rest = rng.random() < 0.5
    stream = (p_data(STORE_CX, store_command(4, uid), command=True) + b"".join(fragments[:split]) + release_rq()
              + (b"".join(fragments[split:]) if rest else b""))
    case.detail = f"A-RELEASE-RQ after {split} of {len(fragments)} fragments{', then the rest' if rest else ''}"
    _established(ctx, case, lambda peer, _: peer.send(stream), follow_up=False)


def case_second_associate(ctx: CaseContext, case: Case) -> None:
    """A second A-ASSOCIATE-RQ on an established association (optionally mid C-STORE)."""
    rng = ctx.rng
    uid, data = ctx.instances.next()
    mid = rng.random() < 0.5
    stream = (p_data(STORE_CX, store_command(5, uid), command=True) + data_fragments(STORE_CX, data, 1000)[0]
              if mid else b"") + associate_rq()
    case.detail = "A-ASSOCIATE-RQ on an established association" + (", mid C-STORE" if mid else "")
    _established(ctx, case, lambda peer, _: peer.send(stream), follow_up=rng.random() < 0.5)


def case_byte_flips(ctx: CaseContext, case: Case) -> None:
    """A valid association and C-STORE stream with random bytes changed."""
    rng = ctx.rng
    rq = bytearray(associate_rq())
    _, messages = _store_messages(ctx, rng, 6)
    rest = bytearray(b"".join(messages) + release_rq())
    flips = rng.randint(1, 8)
    in_rq = rng.random() < 0.3
    target = rq if in_rq else rest
    positions = sorted(rng.randrange(len(target)) for _ in range(flips))
    for position in positions:
        target[position] ^= rng.randrange(1, 256)
    case.detail = f"{flips} byte(s) changed in the {'A-ASSOCIATE-RQ' if in_rq else 'C-STORE stream'} at {positions}"
    peer = RawPeer(ctx.port, ctx.bound_s)
    exchange = Exchange()
    try:
        peer.send(bytes(rq))
        if peer.expect(exchange, ASSOCIATE_AC):
            peer.send(bytes(rest))
        peer.half_close()
        peer.drain(exchange, ctx.bound_s)
        case.outcome = exchange.outcome
        if exchange.timed_out:
            case.problem = f"node neither answered nor closed within {ctx.bound_s:.0f} s"
        _record(ctx, case, exchange)
    finally:
        peer.close()


def case_valid_store(ctx: CaseContext, case: Case) -> None:
    """1-3 clean C-STOREs and a release: each must be answered Success, the release confirmed."""
    rng = ctx.rng
    count = rng.randint(1, 3)
    peer = RawPeer(ctx.port, ctx.bound_s)
    exchange = Exchange()
    sent: list[str] = []
    try:
        if not peer.associate(exchange):
            case.outcome, case.problem = "refused", f"valid A-ASSOCIATE-RQ not accepted: PDUs {exchange.pdus}"
            return
        for number in range(count):
            uid, messages = _store_messages(ctx, rng, 10 + number)
            sent.append(uid)
            peer.send(b"".join(messages))
            if not peer.expect(exchange, P_DATA):
                break
        released = peer.send(release_rq()) and peer.expect(exchange, RELEASE_RP)
        _record(ctx, case, exchange)
        answered = {u for s, u in exchange.store_responses if s == 0}
        refused = [u for u in sent if u not in answered]
        ctx.valid_refused.extend(refused)
        case.detail = f"{count} C-STORE(s)"
        case.outcome = "answered" if released and not refused else exchange.outcome
        if refused or not released:
            case.problem = (f"valid C-STORE(s) not answered Success ({exchange.store_responses}) "
                            f"or release not confirmed (PDUs {exchange.pdus})")
    finally:
        peer.close()


CASES: dict[str, Callable[[CaseContext, Case], None]] = {
    "truncated": case_truncated, "oversized": case_oversized, "unknown-type": case_unknown_type,
    "out-of-order": case_out_of_order, "unknown-context": case_unknown_context,
    "command-without-data": case_command_without_data, "data-without-command": case_data_without_command,
    "release-mid-transfer": case_release_mid_transfer, "second-associate": case_second_associate,
    "byte-flips": case_byte_flips, "valid-store": case_valid_store,
}


def kinds(count: int, seed: int) -> list[str]:
    """The kinds of *count* cases: every kind at least once (when count allows), the rest drawn by weight."""
    rng = random.Random(seed)
    chosen = list(KINDS)[:count]
    chosen += rng.choices(list(KINDS), weights=list(KINDS.values()), k=max(0, count - len(chosen)))
    rng.shuffle(chosen)
    return chosen


# ----- parked connections -----------------------------------------------------
def _closed_by_node(peer: RawPeer) -> bool:
    """True when the node closed (or aborted) a parked connection; reads what is there, never blocks."""
    try:
        while select.select([peer.sock], [], [], 0)[0]:
            if not peer.sock.recv(65536):
                return True
    except OSError:
        return True
    return False


@dataclass
class Parking:
    """Silent connections waiting to be closed by the node's timeouts (a few at a time, below the per-peer limit)."""

    bound_s: float
    capacity: int = 2
    slots: list[tuple[Case, float]] = field(default_factory=list)
    seconds_to_close: list[float] = field(default_factory=list)

    def add(self, case: Case) -> None:
        """Park *case*'s connection, first waiting for room."""
        while len(self.slots) >= self.capacity:
            self.poll(wait_for_one=True)
        self.slots.append((case, time.monotonic()))

    def poll(self, *, wait_for_one: bool = False) -> None:
        """Settle connections the node closed, or held past the bound; with *wait_for_one*, until one settles."""
        pause = threading.Event()
        while True:
            settled = []
            for case, since in self.slots:
                assert case.parked is not None
                held = time.monotonic() - since
                if _closed_by_node(case.parked):
                    case.outcome = "closed by the node's timeout"
                    self.seconds_to_close.append(held)
                elif held > self.bound_s:
                    case.outcome = "held open"
                    case.problem = f"node kept a silent connection open for more than {self.bound_s:.0f} s"
                else:
                    continue
                case.parked.close()
                case.parked = None
                settled.append((case, since))
            for item in settled:
                self.slots.remove(item)
            if settled or not wait_for_one or not self.slots:
                return
            pause.wait(0.05)


# ----- the scenario -----------------------------------------------------------
def pdu_fuzz(root: Path, pacs: LocalOrthanc, model: Path, *, count: int, seed: int = 4242,
             echo_every: int = 10, node_timeout_s: float = 3.0, memory_limit_mb: int = 1500,
             echo_limit_s: float = 5.0) -> Findings:
    """*count* seeded PDU-level cases against a node in its own process (see the module).

    Parameters
    ----------
    root, pacs, model
        As for the other scenarios.
    count : int
        Cases to run.
    seed : int
        Seed of the generator (the same seed, the same cases).
    echo_every : int
        A legitimate C-ECHO after every this many cases.
    node_timeout_s : float
        The node's ACSE and network timeouts (short, so that silent connections are settled quickly).
    memory_limit_mb : int
        Peak resident memory of the node (and its workers) allowed.
    echo_limit_s : float
        The longest a legitimate C-ECHO may take.
    """
    findings = Findings("PDU fuzz")
    node = NodeProcess(root / "pdu-fuzz", pacs, model, extra_env={
        "DICOM_NODE_NETWORK__ACSE_TIMEOUT_S": str(node_timeout_s),
        "DICOM_NODE_NETWORK__NETWORK_TIMEOUT_S": str(node_timeout_s),
    })
    node.start()
    db = node_db(node)
    bound_s = 2 * node_timeout_s + 5
    ctx = CaseContext(node.port, random.Random(seed), Instances(seed), bound_s)
    parking = Parking(bound_s)
    cases: list[Case] = []
    problems: list[str] = []
    echo_times: list[float] = []
    started = time.monotonic()
    try:
        for index, kind in enumerate(kinds(count, seed)):
            case = Case(index, kind)
            try:
                CASES[kind](ctx, case)
            except OSError as exc:  # connection refused and the like: the node is not serving
                case.outcome, case.problem = "connection failed", f"{type(exc).__name__}: {exc}"
            cases.append(case)
            if case.parked is not None:
                parking.add(case)
            parking.poll()
            if not node.alive:
                problems.append(f"node died on case {index} ({kind}: {case.detail})")
                node.start()
                ctx.port = node.port
            if (index + 1) % echo_every == 0 or index + 1 == count:
                began = time.monotonic()
                answered = echo_ok(node.port)
                echo_times.append(time.monotonic() - began)
                if not answered or echo_times[-1] > echo_limit_s:
                    problems.append(f"C-ECHO after case {index} {'took' if answered else 'failed after'} "
                                    f"{echo_times[-1]:.1f} s")
        while parking.slots:
            parking.poll(wait_for_one=True)
        outcomes: dict[str, Counter[str]] = {}
        for case in cases:
            outcomes.setdefault(case.kind, Counter())[case.outcome] += 1
        problems[:0] = [f"case {c.index} ({c.kind}: {c.detail}): {c.problem}" for c in cases if c.problem]
        elapsed = time.monotonic() - started
        with db.sessions() as session:
            stored = dict(session.execute(sql_select(Instance.sop_instance_uid, Instance.spool_path)).all())
        lost = sorted(uid for uid in ctx.acked if uid not in stored or not Path(stored[uid]).exists())
        if lost:
            problems.append(f"{len(lost)} acknowledged instance(s) missing from spool or database: "
                            f"{[(uid, ctx.acked[uid]) for uid in lost[:5]]}")
        open_associations = _wait_associations_ended(db, bound_s)
        if open_associations:
            problems.append(f"{open_associations} association(s) never ended in the association log")
        still_serving = echo_ok(node.port)
        if not still_serving:
            problems.append("node does not answer C-ECHO after the fuzzing")
        log = node.log_path.read_text(errors="replace")
        for symptom in ("Exception in thread", "MemoryError", "crashed"):
            if symptom in log:
                problems.append(f"node log shows '{symptom}' ({log.count(symptom)} times)")
        peak_mb = node.peak_rss_kb // 1024
        if peak_mb > memory_limit_mb:
            problems.append(f"peak memory {peak_mb} MB above {memory_limit_mb} MB")
        findings.problems.extend(problems)
        findings.figures.update({
            "cases": count, "seed": seed, "duration (s)": round(elapsed),
            "outcomes by kind": {k: dict(v) for k, v in sorted(outcomes.items())},
            "instances acknowledged": len(ctx.acked), "instances lost": len(lost),
            "silent connections closed by the node": len(parking.seconds_to_close),
            "longest silent connection held (s)": round(max(parking.seconds_to_close, default=0.0), 1),
            "legitimate C-ECHOs": len(echo_times), "slowest C-ECHO (s)": round(max(echo_times, default=0.0), 2),
            "node starts": node.starts, "still serving": still_serving, "peak memory (MB)": peak_mb,
        })
    finally:
        for case, _ in parking.slots:
            if case.parked is not None:
                case.parked.close()
        node.stop()
        db.engine.dispose()
    return findings


def _wait_associations_ended(db: Database, timeout_s: float) -> int:
    """Associations still without an end in the log after *timeout_s* (0 when all ended)."""
    pause = threading.Event()
    deadline = time.monotonic() + timeout_s
    while True:
        with db.sessions() as session:
            open_count = int(session.scalar(sql_select(func.count(AssociationLog.id)).where(
                AssociationLog.ended_at.is_(None))) or 0)
        if not open_count or time.monotonic() > deadline:
            return open_count
        pause.wait(0.2)
