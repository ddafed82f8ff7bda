"""A lean DIMSE path for C-STORE requests on an established association.

pynetdicom turns every P-DATA-TF PDU into objects (PDU, primitive, DIMSE
message, pydicom command Dataset, service class, event) and hands each request
from its DUL thread to the association thread and the response back: about
3 ms per instance, more than DCMTK's ``storescp`` needs for the whole C-STORE.
:class:`StoreAssembler` takes the P-DATA-TF PDUs of an established association
first (PS3.8 9.3.5 and annex E: PDV items, message control header) and serves
C-STORE-RQ messages itself: it decodes the small command set (implicit VR
little endian, PS3.7 6.3.1), collects the data set fragments without copying,
calls the node's store function and encodes the C-STORE-RSP (PS3.7 9.3.1.2).

Every other message (C-ECHO, anything unexpected, a context ID that was not
accepted, a malformed PDV) is handed back to pynetdicom unchanged, in order, so
its behaviour stays the reference for everything but the C-STORE hot path.
Association set-up, release and abort never come here.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO

from core.errors import NodeError

logger = logging.getLogger(__name__)

#: CommandField of a C-STORE-RQ and a C-STORE-RSP (PS3.7 E.1-1).
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
#: CommandDataSetType: no data set follows (PS3.7 E.1-1).
NO_DATA_SET = 0x0101
#: Message control header bits (PS3.8 E.2).
_COMMAND = 0x01
_LAST = 0x02

# Command set tags (group 0000), as element numbers.
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_MESSAGE_ID_RESPONDED = 0x0120
_DATA_SET_TYPE = 0x0800
_STATUS = 0x0900
_ERROR_COMMENT = 0x0902
_AFFECTED_SOP_INSTANCE = 0x1000
_MOVE_ORIGINATOR_AE = 0x1030
_MOVE_ORIGINATOR_ID = 0x1031

_US_ELEMENTS = frozenset({_COMMAND_FIELD, _MESSAGE_ID, _DATA_SET_TYPE, 0x0700, _MOVE_ORIGINATOR_ID})
_UID_ELEMENTS = frozenset({_AFFECTED_SOP_CLASS, _AFFECTED_SOP_INSTANCE})
#: Longest command set we decode ourselves; anything larger goes to pynetdicom.
MAX_COMMAND_BYTES = 4096


@dataclass(frozen=True)
class Spill:
    """Where a data set goes while it is received once it passes *threshold* bytes (never held whole in memory)."""

    directory: Path
    threshold: int


@dataclass
class StoreRequest:
    """A C-STORE-RQ as received: its command and its data set, still encoded.

    The data set's fragments are held as views of the PDUs they came in until
    it passes the assembler's :class:`Spill` threshold; from then on it is
    written to an anonymous temporary file as it arrives.
    """

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    move_originator_ae_title: str | None = None
    fragments: list[memoryview] = field(default_factory=list)
    #: Bytes of the data set received so far.
    size: int = 0
    #: The data set grew past the assembler's bound: its fragments were dropped as they came.
    oversize: bool = False
    #: The data set so far, once it passed the spill threshold (an unnamed file, gone when closed).
    file: IO[bytes] | None = None

    def append(self, fragment: memoryview, spill: Spill | None) -> None:
        """Keep one data set fragment: in memory, or on disk once over *spill*'s threshold."""
        if self.file is None and spill is not None and self.size > spill.threshold:
            self.file = tempfile.TemporaryFile(dir=spill.directory)  # noqa: SIM115 - closed by discard()
            self.file.writelines(self.fragments)
            self.fragments.clear()
        if self.file is not None:
            self.file.write(fragment)
        else:
            self.fragments.append(fragment)

    def discard(self) -> None:
        """Drop what was received (an oversized data set, or an association that ended first)."""
        self.fragments.clear()
        if self.file is not None:
            self.file.close()
            self.file = None

    @contextlib.contextmanager
    def dataset(self) -> Iterator[bytes | memoryview]:
        """The encoded data set: one copy of the fragments, or a view of the memory-mapped file."""
        if self.file is None:
            yield b"".join(self.fragments)
            return
        self.file.flush()
        try:
            with mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
                    memoryview(mapped) as view:
                yield view
        finally:
            self.discard()


#: The node's C-STORE service: a request and its transfer syntax in, (status, error comment) out.
StoreFunction = Callable[[StoreRequest, str], tuple[int, str | None]]


class _Route(Enum):
    """Who serves the message in progress: this module (LEAN) or pynetdicom (HANDED)."""

    LEAN = 1
    HANDED = 2


class ProtocolError(NodeError):
    """The peer broke the message rules of PS3.8 annex E; the association is aborted."""


def decode_command(raw: bytes) -> dict[int, int | str] | None:
    """The elements of a command set we need, or None when it is not one we serve.

    Parameters
    ----------
    raw : bytes
        The command set, implicit VR little endian, group 0000 only.
    """
    values: dict[int, int | str] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        if group != 0x0000 or length > end - pos:
            return None
        value = raw[pos:pos + length]
        pos += length
        if element in _US_ELEMENTS:
            if length != 2:
                return None
            values[element] = struct.unpack("<H", value)[0]
        elif element in _UID_ELEMENTS:
            try:
                values[element] = value.rstrip(b"\0 ").decode("ascii")
            except UnicodeDecodeError:
                return None
        elif element == _MOVE_ORIGINATOR_AE:
            values[element] = value.decode("ascii", "replace").strip()
    return values


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def encode_store_response(request: StoreRequest, status: int, comment: str | None) -> bytes:
    """The C-STORE-RSP command set for *request* (implicit VR little endian)."""
    body = [
        _element(_AFFECTED_SOP_CLASS, _uid(request.sop_class_uid)),
        _element(_COMMAND_FIELD, struct.pack("<H", C_STORE_RSP)),
        _element(_MESSAGE_ID_RESPONDED, struct.pack("<H", request.message_id)),
        _element(_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(_STATUS, struct.pack("<H", status)),
    ]
    if comment:
        text = comment.encode("ascii", "replace")[:64]
        body.append(_element(_ERROR_COMMENT, text + b" " if len(text) % 2 else text))
    body.append(_element(_AFFECTED_SOP_INSTANCE, _uid(request.sop_instance_uid)))
    payload = b"".join(body)
    return _element(0x0000, struct.pack("<L", len(payload))) + payload


def p_data_pdus(context_id: int, command: bytes, max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying *command* in PDVs that fit the peer's maximum PDU length."""
    room = len(command) if max_pdu <= 0 else max(1, max_pdu - 6)
    pdus = []
    for start in range(0, len(command), room):
        chunk = command[start:start + room]
        header = _COMMAND | (_LAST if start + room >= len(command) else 0)
        pdv = struct.pack(">LBB", len(chunk) + 2, context_id, header) + chunk
        pdus.append(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
    return pdus


class StoreAssembler:
    """Routes the PDV items of one association: C-STORE-RQ served here, the rest to pynetdicom.

    Parameters
    ----------
    transfer_syntaxes : dict
        Accepted presentation context ID -> its transfer syntax UID.
    store : callable
        The node's C-STORE service (:data:`StoreFunction`).
    max_dataset_bytes : int, optional
        Largest data set kept: the fragments of a larger one are dropped as they
        arrive and *store* gets the request with ``oversize`` set (and no data),
        to refuse it.  A data set handed to pynetdicom that grows past it is a
        protocol error (the association is aborted).
    spill : Spill, optional
        Data sets larger than its threshold go to its directory as they arrive.
    """

    def __init__(self, transfer_syntaxes: dict[int, str], store: StoreFunction,
                 max_dataset_bytes: int | None = None, spill: Spill | None = None) -> None:
        self.transfer_syntaxes = transfer_syntaxes
        self.store = store
        self.max_dataset_bytes = max_dataset_bytes
        self.spill = spill
        self._handed_bytes = 0
        self._route: _Route | None = None
        self._held: list[bytes] = []          # command PDV items of a message not routed yet
        self._command = bytearray()
        self._request: StoreRequest | None = None

    def feed(self, body: bytes | bytearray) -> tuple[list[bytes], list[tuple[int, bytes]]]:
        """Take one P-DATA-TF PDU's variable field (kept: data set fragments are views of it).

        Returns
        -------
        passed : list of bytes
            PDV items (length, context, header, value) for pynetdicom, in order.
        responses : list of (context ID, command set)
            C-STORE-RSP command sets to send, in order.

        Raises
        ------
        ProtocolError
            Malformed PDV items or messages out of order.
        """
        view = memoryview(body)
        passed: list[bytes] = []
        responses: list[tuple[int, bytes]] = []
        pos, end = 0, len(body)
        while pos < end:
            if end - pos < 6:
                raise ProtocolError("truncated PDV item")
            length, context_id, header = struct.unpack_from(">LBB", body, pos)
            if length < 2 or length > end - pos - 4:
                raise ProtocolError("PDV item length past the end of the PDU")
            item = view[pos:pos + 4 + length]
            value = view[pos + 6:pos + 4 + length]
            pos += 4 + length
            is_command, is_last = bool(header & _COMMAND), bool(header & _LAST)
            if self._route is _Route.HANDED:
                passed.append(bytes(item))
                if is_command:
                    self._command += value
                    if is_last and self._no_data_set_follows():
                        self._route = None
                else:
                    self._handed_bytes += len(value)
                    if self.max_dataset_bytes is not None and self._handed_bytes > self.max_dataset_bytes:
                        raise ProtocolError("data set over storage.max_dataset_bytes")
                    if is_last:
                        self._route = None
                continue
            if self._route is _Route.LEAN:
                request = self._request
                if request is None or is_command or context_id != request.context_id:
                    raise ProtocolError("data set fragment out of order")
                request.size += len(value)
                if self.max_dataset_bytes is not None and request.size > self.max_dataset_bytes:
                    request.oversize = True
                    request.discard()  # never held: the PDUs it came in are freed, a spilled file removed
                elif not request.oversize:
                    request.append(value, self.spill)
                if is_last:
                    responses.append(self._serve(request))
                continue
            # A new message: its command fragments are held until the command is complete.
            if not is_command:
                raise ProtocolError("data set fragment without a command")
            self._held.append(bytes(item))
            self._command += value
            if len(self._command) > MAX_COMMAND_BYTES:
                self._pass_held(passed)
            elif is_last:
                self._route_message(context_id, passed)
        return passed, responses

    def _no_data_set_follows(self) -> bool:
        values = decode_command(bytes(self._command)) or {}
        self._command.clear()
        return values.get(_DATA_SET_TYPE, NO_DATA_SET) == NO_DATA_SET

    def _pass_held(self, passed: list[bytes]) -> None:
        """Hand the message to pynetdicom from its first fragment on."""
        passed.extend(self._held)
        self._held.clear()
        self._route = _Route.HANDED
        self._handed_bytes = 0

    def close(self) -> None:
        """The association ended: drop a data set still being received."""
        if self._request is not None:
            self._request.discard()
            self._request = None

    def _route_message(self, context_id: int, passed: list[bytes]) -> None:
        values = decode_command(bytes(self._command))
        fast = (
            values is not None
            and values.get(_COMMAND_FIELD) == C_STORE_RQ
            and values.get(_DATA_SET_TYPE, NO_DATA_SET) != NO_DATA_SET
            and context_id in self.transfer_syntaxes
            and isinstance(values.get(_MESSAGE_ID), int)
            and isinstance(values.get(_AFFECTED_SOP_CLASS), str)
            and isinstance(values.get(_AFFECTED_SOP_INSTANCE), str)
        )
        if not fast or values is None:
            # pynetdicom decodes the command again; it is complete, so the message may end here
            self._pass_held(passed)
            if values is not None and values.get(_DATA_SET_TYPE, NO_DATA_SET) == NO_DATA_SET:
                self._route = None
            self._command.clear()
            return
        originator = values.get(_MOVE_ORIGINATOR_AE)
        self._request = StoreRequest(
            context_id=context_id, message_id=int(values[_MESSAGE_ID]),
            sop_class_uid=str(values[_AFFECTED_SOP_CLASS]), sop_instance_uid=str(values[_AFFECTED_SOP_INSTANCE]),
            move_originator_ae_title=str(originator) if originator else None,
        )
        self._held.clear()
        self._command.clear()
        self._route = _Route.LEAN

    def _serve(self, request: StoreRequest) -> tuple[int, bytes]:
        self._route, self._request = None, None
        try:
            status, comment = self.store(request, self.transfer_syntaxes[request.context_id])
        finally:
            request.discard()
        return request.context_id, encode_store_response(request, status, comment)

