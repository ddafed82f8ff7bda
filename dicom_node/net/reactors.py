"""Low-latency reactors for pynetdicom acceptor associations.

pynetdicom (3.x) polls: its DUL thread sleeps 1 ms whenever a loop found
nothing to do, and the association thread sleeps 1 ms before every look for a
DIMSE message.  A C-STORE of a small instance therefore waits 1-3 ms in
sleeps, which caps one association at a few hundred instances per second
whatever the handler does.  :func:`install` replaces both loops of one
acceptor association, before it starts, with event-driven equivalents:

- the DUL thread waits in ``select`` on the peer socket *and* a wake-up socket
  that is written whenever the association queues a primitive to send (the
  C-STORE response), so it reacts to either at once;
- the association thread blocks on the DIMSE message queue instead of sleeping;
- given a store function, the DUL thread reads the PDUs of the established
  association itself and serves C-STORE-RQ messages on the lean path of
  :mod:`dicom_node.net.dimse` (no pynetdicom objects, no hand-over between
  threads); every other PDU and message goes to pynetdicom as before.

Both loops keep pynetdicom's logic step for step (state machine, ARTIM and idle
timers, release and abort handling); idle, each wakes every
:data:`IDLE_WAIT_S` to check its timers.

No PDU can stall or exhaust the association: until it is established every
read is bounded by the ACSE timeout (a half-sent A-ASSOCIATE-RQ closes the
connection when it passes), afterwards by the network timeout, each PDU as a
whole (a peer trickling bytes gets at most twice that); a PDU is refused
before anything is allocated when it is longer than the negotiated maximum
(P-DATA-TF) or :data:`MAX_CONTROL_PDU` (any other), and the association
aborted.  The same bounds hold for the PDUs pynetdicom reads itself
(:func:`_bounded_recv`: association set-up, and every PDU with
``network.dimse_path = "public"``, where a data set growing past
``storage.max_dataset_bytes`` while it is received aborts the association).
They rely on pynetdicom internals, so the node pins ``pynetdicom>=3,<4``,
:func:`install` refuses an association whose internals differ (it is then
served by the stock loops, and the node logs it) and a test pins that every
internal it uses is there on the installed version.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import A_ABORT_RQ

from dicom_node.net.dimse import ProtocolError, Spill, StoreAssembler, StoreFunction, p_data_pdus
from dicom_node.net.requestor import checkpoint, turn_ended

logger = logging.getLogger(__name__)

#: How long an idle loop waits before checking its timers again.
IDLE_WAIT_S = 0.01
#: Longest PDU other than P-DATA-TF read (an A-ASSOCIATE-RQ proposing 128 contexts is about 20 KiB).
MAX_CONTROL_PDU = 256 * 1024


class _WakingQueue(queue.Queue[Any]):
    """The DUL's to-provider queue: every put wakes the DUL thread."""

    def __init__(self, wake: socket.socket) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        with contextlib.suppress(OSError):  # a wake-up is already pending, or the DUL is gone
            self._wake.send(b"\0")


#: The private attributes of pynetdicom's DUL provider that :func:`install` relies on (pinned by a test).
PYNETDICOM_DUL_INTERNALS = ("to_provider_queue", "event_queue", "_is_transport_event", "_process_recv_primitive",
                            "state_machine", "artim_timer", "_idle_timer", "_kill_thread", "_decode_pdu",
                            "_recv_pdu", "to_user_queue")
#: The private attributes of pynetdicom's Association that the reactors rely on (pinned by a test).
PYNETDICOM_ASSOCIATION_INTERNALS = ("_reactor_checkpoint", "_is_paused", "_kill", "_serve_request", "_run_reactor",
                                    "_dul_ready")


#: Called when a peer is cut off for a bound (the association, the reason); the node records it.
RefusalHook = Callable[[Any, str], None]


@dataclass
class _Receipt:
    """What :func:`_bounded_recv` knows of the PDU stream of one association."""

    max_dataset_bytes: int | None
    on_refusal: RefusalHook | None
    #: The PDU type whose body the next read is (set by the header read before it).
    body_of: int | None = None
    #: Data set bytes of the C-STORE being received so far.
    dataset_bytes: int = 0


def install(assoc: Any, store: StoreFunction | None = None, max_dataset_bytes: int | None = None,
            on_refusal: RefusalHook | None = None, spill: Spill | None = None) -> bool:
    """Give an acceptor association the event-driven, bounded loops; call from ``EVT_CONN_OPEN``.

    With *store*, C-STORE requests of the established association are served by
    it on the lean path (:mod:`dicom_node.net.dimse`) instead of pynetdicom's
    ``EVT_C_STORE`` handler; data sets over *max_dataset_bytes* are not kept
    (see :class:`~dicom_node.net.dimse.StoreAssembler`), and large ones go to
    disk as they arrive (*spill*).  Without *store*, a data set that grows past
    *max_dataset_bytes* while pynetdicom receives it aborts the association,
    after *on_refusal* was told why.  Returns False (stock loops kept) when
    pynetdicom's internals are not as expected.
    """
    dul = assoc.dul
    needed = PYNETDICOM_DUL_INTERNALS
    if dul.is_alive() or not all(hasattr(dul, name) for name in needed) or not all(
            hasattr(assoc, name) for name in PYNETDICOM_ASSOCIATION_INTERNALS):
        return False
    if not dul.to_provider_queue.empty() or getattr(dul.socket, "recv", None) is None:
        return False
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    dul.to_provider_queue = _WakingQueue(writer)
    dul.socket._edge_receipt = _Receipt(None if store is not None else max_dataset_bytes, on_refusal)
    dul.socket.recv = types.MethodType(_bounded_recv, dul.socket)
    lane = _StoreLane(dul, store, max_dataset_bytes, spill) if store is not None else None
    dul._target = lambda: _dul_reactor(dul, reader, writer, lane)
    assoc._run_reactor = types.MethodType(_assoc_reactor, assoc)
    return True


def _phase_timeout(assoc: Any) -> float | None:
    """The timeout of a read now: ACSE until the association is established, network afterwards."""
    if assoc.is_established:
        return assoc.network_timeout
    return assoc.acse_timeout


def _bounded_recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` (pynetdicom's reads of a PDU) under a deadline and size bounds.

    pynetdicom reads a PDU's 6-byte header, then its body.  Returns what was
    read; pynetdicom takes a short read as a closed connection (Evt17).
    """
    sock = self.socket
    receipt: _Receipt = self._edge_receipt
    body_of, receipt.body_of = receipt.body_of, None
    bytestream = bytearray()
    limit = 6 if body_of is None else _body_limit(self.assoc, body_of)
    if nr_bytes > limit:
        logger.error("PDU of %d bytes declared, longer than %d: connection closed", nr_bytes, limit)
        return bytestream
    timeout = _phase_timeout(self.assoc)
    deadline = None if timeout is None else time.monotonic() + timeout
    if timeout is not None and sock.gettimeout() != timeout:
        sock.settimeout(timeout)
    while len(bytestream) < nr_bytes:
        if deadline is not None and time.monotonic() > deadline:
            logger.error("PDU not received within %.0f s: connection closed", timeout)
            return bytestream
        chunk = sock.recv(min(65536, nr_bytes - len(bytestream)))
        if not chunk:
            return bytestream
        bytestream.extend(chunk)
    if body_of is None:
        if bytestream[0] in PDU_TYPES:
            receipt.body_of = bytestream[0]
    elif body_of == 0x04 and receipt.max_dataset_bytes is not None and not _count_dataset(receipt, bytestream):
        reason = (f"data set over storage.max_dataset_bytes "
                  f"({receipt.max_dataset_bytes / 2**20:g} MiB) while receiving")
        logger.error("%s: association aborted", reason)
        if receipt.on_refusal is not None:
            receipt.on_refusal(self.assoc, reason)
        _send_abort(self)
        return bytearray()
    return bytestream


#: PDU types of PS3.8 9.3 (any other is Evt19, its body never read).
PDU_TYPES = frozenset(range(0x01, 0x08))


def _body_limit(assoc: Any, pdu_type: int) -> int:
    """Longest PDU body read of *pdu_type*: our declared maximum (+6) for P-DATA-TF, :data:`MAX_CONTROL_PDU` else."""
    if pdu_type == 0x04:
        return (int(assoc.acceptor.maximum_length or 0) or MAX_CONTROL_PDU) + 6
    return MAX_CONTROL_PDU
_PDV_HEADER = struct.Struct(">LBB")


def _count_dataset(receipt: _Receipt, body: bytearray) -> bool:
    """Add the data set fragments of a P-DATA-TF body; False once the data set passes the bound.

    A command fragment starts a new message; the last data set fragment ends it.
    Malformed items are left to pynetdicom, which refuses them.
    """
    pos = 0
    while pos + 6 <= len(body):
        length, _, control = _PDV_HEADER.unpack_from(body, pos)
        if length < 2:
            return True
        if control & 0x01:
            receipt.dataset_bytes = 0
        else:
            receipt.dataset_bytes += length - 2
            if receipt.max_dataset_bytes is not None and receipt.dataset_bytes > receipt.max_dataset_bytes:
                receipt.dataset_bytes = 0
                return False
            if control & 0x02:
                receipt.dataset_bytes = 0
        pos += 4 + length
    return True


def _send_abort(sock: Any) -> None:
    """Send an A-ABORT (source: service provider) on *sock*, ignoring a connection already gone."""
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = 0x00
    with contextlib.suppress(Exception):  # the connection may be gone already
        sock.send(abort_pdu.encode())


def _wait(dul: Any, reader: socket.socket) -> None:
    """Block until the peer sent data, a primitive was queued, or the idle wait passed."""
    raw = getattr(dul.socket, "socket", None)
    if raw is None or raw.fileno() < 0:
        threading.Event().wait(IDLE_WAIT_S / 10)
        return
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return
    try:
        ready, _, _ = select.select([raw, reader], [], [], IDLE_WAIT_S)
    except (OSError, ValueError):
        return
    if reader in ready:
        try:
            while reader.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass


def _dul_reactor(dul: Any, reader: socket.socket, writer: socket.socket, lane: _StoreLane | None) -> None:
    """pynetdicom's ``DULServiceProvider.run_reactor`` with ``select`` instead of sleeping."""
    dul._idle_timer.start()
    idle = opened = False
    try:
        while True:
            if not dul.assoc._dul_ready.is_set():
                dul.assoc._dul_ready.set()
            if idle:
                _wait(dul, reader)
            if dul._kill_thread:
                break
            if dul.state_machine.current_state != "Sta1":
                opened = True
            elif opened:  # the connection ended (closed, aborted, timed out)
                _wake_acceptor(dul)
            if dul.artim_timer.expired:
                dul.event_queue.put("Evt18")
            try:
                if dul._process_recv_primitive():
                    pass
                elif lane is not None and lane.active():
                    if lane.read():
                        dul._idle_timer.restart()
                elif dul._is_transport_event():
                    dul._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - same recovery as pynetdicom's own reactor
                _hard_abort(dul, exc)
                return
            try:
                event = dul.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            try:
                dul.state_machine.do_action(event)
            except Exception as exc:  # noqa: BLE001 - e.g. pynetdicom's DIMSE decoding of a malformed command set
                _hard_abort(dul, exc)
                return
            idle = False
    finally:
        _wake_acceptor(dul)
        reader.close()
        writer.close()
        if lane is not None and lane.assembler is not None:
            lane.assembler.close()


def _hard_abort(dul: Any, exc: Exception) -> None:
    """pynetdicom's recovery from an exception in its reactor: A-ABORT, bypassing the state machine, and stop.

    pynetdicom 3.0.4 applies it to reading and sending only; an exception in a
    state machine action (``DT_2`` decoding a command set without
    CommandDataSetType raises AttributeError) killed its DUL thread and left the
    association thread, its slot and the connection waiting for ever.
    """
    logger.error("exception in the DUL reactor (%s); aborting the association", type(exc).__name__)
    _send_abort(dul.socket)
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False
    dul.assoc._kill = True
    dul._kill_thread = True
    # No state-machine transition follows (no EVT_CONN_CLOSE): tell the handlers, as Association.abort() does,
    # so that the association log row is finished.
    evt.trigger(dul.assoc, evt.EVT_ABORTED, {})


def _wake_acceptor(dul: Any) -> None:
    """End the association thread's wait for an A-ASSOCIATE-RQ that can no longer come.

    pynetdicom's acceptor thread waits up to the ACSE timeout for the request
    (``receive_pdu(wait=True, timeout=acse_timeout)``) even when the connection
    ended before one arrived (closed, aborted, an invalid PDU), and holds an
    association slot and one of the peer's (``network.max_associations_per_peer``)
    until then.  ``None`` is what that wait returns on timeout: the thread then
    closes the connection and ends at once, as on a timeout.
    """
    assoc = dul.assoc
    if getattr(dul, "_acceptor_woken", False) or not assoc.is_acceptor or assoc.requestor.primitive is not None:
        return
    if dul.to_user_queue.empty():
        dul._acceptor_woken = True
        dul.to_user_queue.put(None)


class _StoreLane:
    """The DUL side of the lean C-STORE path: reads PDUs of an established association."""

    def __init__(self, dul: Any, store: StoreFunction, max_dataset_bytes: int | None = None,
                 spill: Spill | None = None) -> None:
        self.dul = dul
        self.store = store
        self.max_dataset_bytes = max_dataset_bytes
        self.spill = spill
        self.assembler: StoreAssembler | None = None
        self.timeout: float | None = None

    def active(self) -> bool:
        """True while the association is established (state Sta6) on a plain or TLS socket."""
        return bool(self.dul.state_machine.current_state == "Sta6" and self.dul.socket is not None
                    and getattr(self.dul.socket, "socket", None) is not None)

    def _assembler(self) -> StoreAssembler:
        if self.assembler is None:
            contexts = {int(cx.context_id): str(cx.transfer_syntax[0]) for cx in self.dul.assoc.accepted_contexts}
            self.assembler = StoreAssembler(contexts, self.store, self.max_dataset_bytes, self.spill)
        return self.assembler

    def read(self) -> bool:
        """Read one PDU if the peer sent one; True when something was read (or the connection ended)."""
        dul = self.dul
        if not dul.socket.ready:
            return False
        raw = dul.socket.socket
        if self.timeout is None:  # established: the network timeout bounds every PDU from now on
            self.timeout = float(dul.assoc.network_timeout or 0) or None
            raw.settimeout(self.timeout)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            header = _recv_exact(raw, 6, deadline)
            if header is None:
                dul.event_queue.put("Evt17")  # transport connection closed
                return True
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type not in PDU_TYPES:
                logger.error("unknown PDU type 0x%02X received", pdu_type)
                dul.event_queue.put("Evt19")  # unrecognised PDU
                return True
            if length > _body_limit(dul.assoc, pdu_type):  # refused before a byte of it is allocated
                logger.error("PDU of type 0x%02X declares %d bytes, more than we accept", pdu_type, length)
                dul.event_queue.put("Evt19")
                return True
            body = _recv_exact(raw, length, deadline)
        except (OSError, TimeoutError) as exc:
            logger.error("connection lost while reading a PDU (%s)", type(exc).__name__)
            dul.event_queue.put("Evt17")
            return True
        if body is None:
            logger.error("connection closed before the entire PDU was received")
            dul.event_queue.put("Evt17")
            return True
        if pdu_type != 0x04:
            self._to_pynetdicom(header + body)
            return True
        try:
            passed, responses = self._assembler().feed(body)
        except ProtocolError as exc:
            logger.error("invalid P-DATA-TF PDU: %s; aborting the association", exc)
            dul.event_queue.put("Evt19")
            return True
        if passed:
            items = b"".join(passed)
            self._to_pynetdicom(struct.pack(">BBL", 0x04, 0, len(items)) + items)
        peer_max = int(dul.assoc.requestor.maximum_length or 0)
        for context_id, command in responses:
            for pdu in p_data_pdus(context_id, command, peer_max):
                dul.socket.send(pdu)
        return True

    def _to_pynetdicom(self, bytestream: bytes | bytearray) -> None:
        """What pynetdicom's ``_read_pdu_data`` does with a PDU it has read."""
        dul = self.dul
        try:
            pdu, event = dul._decode_pdu(bytearray(bytestream))
        except Exception as exc:  # noqa: BLE001 - pynetdicom's own rule: an undecodable PDU is Evt19
            logger.error("unable to decode the received PDU (%s)", type(exc).__name__)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)


def _recv_exact(sock: socket.socket, size: int, deadline: float | None = None) -> bytearray | None:
    """Exactly *size* bytes from *sock*, or None when the peer closed first.

    Raises
    ------
    TimeoutError
        The socket's timeout passed without data, or *deadline* (``time.monotonic()``) passed.
    """
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if deadline is not None and got and time.monotonic() > deadline:
            raise TimeoutError("PDU not complete within the network timeout")
        count = sock.recv_into(view[got:], size - got)
        if count == 0:
            return None
        got += count
    return buf


def _assoc_reactor(self: Any) -> None:
    """pynetdicom's acceptor ``Association._run_reactor``, blocking on the DIMSE queue instead of sleeping."""

    self._is_paused = False
    messages = self.dimse.msg_queue
    while not self._kill:
        if not checkpoint(self):  # a send_*() call took over after the wait: its response is its own
            continue
        try:
            context_id, msg = messages.get(timeout=IDLE_WAIT_S)
        except queue.Empty:
            context_id, msg = None, None
        if msg:
            self._serve_request(msg, context_id)
        if turn_ended(self):
            return
