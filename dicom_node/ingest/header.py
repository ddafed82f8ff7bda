"""A one-pass scan of an encoded data set for the few elements the C-STORE handler reads.

pydicom's ``read_dataset`` builds an element object for every attribute of
the data set (and copies the pixel data) before the handler reads a dozen
values.  :func:`scan_elements` walks the little-endian encoding once
(PS3.5 7.1: explicit and implicit VR, sequences and items of defined or
undefined length, PS3.5 7.5), keeps the raw values of the wanted top-level
elements and jumps over everything else, pixel data included.

It accepts only what it fully understands: the walk must end exactly at the
end of the data set, and every wanted element must be encoded as text.
Anything else -- a stray delimiter, a date encoded with VR AT, big endian --
returns None, and the caller falls back to pydicom, whose verdict on malformed
input stays the reference.

Except on truncation: pydicom reads a value whose length runs past the end of
the data set as whatever bytes are left, without a word, so a data set cut
inside its pixel data would be stored as if whole.  A data set that ends inside
an element header, a value, an item or an unterminated sequence raises
:class:`TruncatedDataSetError` (naming the element's tag, never a value);
:func:`check_extent` walks any data set, big endian too, for that alone.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from typing import TypeAlias

from pydicom.valuerep import VR

from core.errors import NodeError

#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 table 7.1-1).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
#: Every VR of PS3.5 table 6.2-1 (pydicom's list, without its "US or SS"-style ambiguities).
KNOWN_VRS = frozenset(vr.value for vr in VR if " or " not in vr.value)
#: VRs read as text (PS3.5 6.2); UN is read with the dictionary's VR.
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR",
                      "UT", "UN"})
_KNOWN_VRS = frozenset(vr.encode("ascii") for vr in KNOWN_VRS)
_TEXT_VRS = frozenset(vr.encode("ascii") for vr in TEXT_VRS)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
#: Wanted tags that may be binary (VR US, 2 bytes little endian): Samples per Pixel, Rows, Columns, Bits Allocated.
US_TAGS = frozenset({0x00280002, 0x00280010, 0x00280011, 0x00280100})
#: Deepest nesting of sequences walked (deeper: fall back to pydicom).
MAX_DEPTH = 16



class _UnsupportedEncodingError(NodeError):
    """Internal: the encoding is not one this scan accepts."""


class TruncatedDataSetError(NodeError):
    """The data set ends before an element, item or sequence it declares (a length past its end)."""


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


#: An encoded data set: bytes, or a view of a memory-mapped file (never read whole).
Buffer: TypeAlias = bytes | bytearray | memoryview

_LE = (struct.Struct("<HHL"), struct.Struct("<HH2sH"), struct.Struct("<L"))
_BE = (struct.Struct(">HHL"), struct.Struct(">HH2sH"), struct.Struct(">L"))


def scan_elements(raw: Buffer, explicit: bool, wanted: Collection[int]) -> dict[int, bytes] | None:
    """The raw values of the *wanted* top-level tags of a little-endian data set.

    Parameters
    ----------
    raw : bytes or memoryview
        The encoded data set (no preamble, no file meta information).
    explicit : bool
        Explicit VR (True) or implicit VR (False) little endian.
    wanted : collection of int
        Tags as ``group << 16 | element``; text, except :data:`US_TAGS` (VR US).

    Returns
    -------
    dict or None
        Tag -> value bytes for the wanted tags present; None when the data set
        is not well formed enough for this scan (use pydicom instead).

    Raises
    ------
    TruncatedDataSetError
        The data set ends inside an element, an item or a sequence.
    """
    found: dict[int, bytes] = {}
    try:
        end = _walk(raw, 0, len(raw), explicit, wanted, found, 0, _LE)
    except _UnsupportedEncodingError:
        return None
    return found if end == len(raw) else None


def check_extent(raw: Buffer, explicit: bool, little_endian: bool = True) -> None:
    """Check that every element, item and sequence of *raw* ends within it.

    For data sets :func:`scan_elements` leaves to pydicom (big endian, an
    unknown VR, deep nesting): a truncation found before the walk gives up is
    still reported; anything else unusual is left to pydicom.

    Raises
    ------
    TruncatedDataSetError
        The data set ends inside an element, an item or a sequence.
    """
    try:
        _walk(raw, 0, len(raw), explicit, None, {}, 0, _LE if little_endian else _BE)
    except _UnsupportedEncodingError:
        return


def _element_header(raw: Buffer, pos: int, explicit: bool,
                    codec: tuple[struct.Struct, struct.Struct, struct.Struct]) -> tuple[int, int, int, bytes | None]:
    """(tag, value length, position of the value, explicit VR or None) of the element at *pos*."""
    group, element, length = codec[0].unpack_from(raw, pos)
    tag = group << 16 | element
    if group == 0xFFFE or not explicit:  # items and delimiters never carry a VR
        return tag, length, pos + 8, None
    _, _, vr, short = codec[1].unpack_from(raw, pos)
    if vr in _LONG_VRS:
        if len(raw) - pos < 12:
            raise TruncatedDataSetError(f"data set ends inside the header of element {_tag_text(tag)}")
        (long_length,) = codec[2].unpack_from(raw, pos + 8)
        return tag, long_length, pos + 12, vr
    if vr not in _KNOWN_VRS:
        raise _UnsupportedEncodingError("not a known VR")
    return tag, short, pos + 8, vr


def _walk(raw: Buffer, pos: int, end: int, explicit: bool, wanted: Collection[int] | None,
          found: dict[int, bytes], depth: int, codec: tuple[struct.Struct, struct.Struct, struct.Struct]) -> int:
    """Walk elements from *pos* to *end*.

    Returns the position after the last element, or, when an item delimiter
    ended the walk (inside an item of undefined length), minus the position
    after that delimiter.
    """
    if depth > MAX_DEPTH:
        raise _UnsupportedEncodingError("sequences nested too deep")
    while pos < end:
        if end - pos < 8:
            raise TruncatedDataSetError("data set ends inside an element header")
        tag, length, value, vr = _element_header(raw, pos, explicit, codec)
        if tag == _ITEM_END:
            if depth == 0 or length != 0:
                raise _UnsupportedEncodingError("stray item delimiter")
            return -(value)  # negative: ended by an item delimiter
        if tag in (_ITEM, _SEQUENCE_END):
            raise _UnsupportedEncodingError("stray item")
        if wanted is not None and depth == 0 and tag in wanted and (
                length == _UNDEFINED or (vr is not None and vr not in _TEXT_VRS
                                         and not (vr == b"US" and tag in US_TAGS))):
            # a wanted attribute encoded as something other than text (e.g. a date as AT):
            # pydicom reads it with that VR later, so pydicom must judge it now
            raise _UnsupportedEncodingError("a wanted element is not encoded as text")
        if length == _UNDEFINED:
            # a sequence (SQ, or UN/implicit holding one) or encapsulated pixel data: items up to a delimiter
            pos = _skip_items(raw, value, end, explicit, depth + 1, codec, tag)
            continue
        if length > end - value:
            raise TruncatedDataSetError(f"value length of element {_tag_text(tag)} runs past the end of the data set")
        if wanted is not None and depth == 0 and tag in wanted:
            found[tag] = bytes(raw[value:value + length])
        pos = value + length
    return pos


def _skip_items(raw: Buffer, pos: int, end: int, explicit: bool, depth: int,
                codec: tuple[struct.Struct, struct.Struct, struct.Struct], owner: int) -> int:
    """Skip the items of an undefined-length value; returns the position after its sequence delimiter."""
    while True:
        if end - pos < 8:
            raise TruncatedDataSetError(f"data set ends inside element {_tag_text(owner)} (no sequence delimiter)")
        group, element, length = codec[0].unpack_from(raw, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise _UnsupportedEncodingError("not an item")
        if length != _UNDEFINED:
            if length > end - pos:
                raise TruncatedDataSetError(f"an item of element {_tag_text(owner)} runs past the end of the data set")
            pos += length
            continue
        after = _walk(raw, pos, end, explicit, None, {}, depth, codec)
        if after >= 0:
            raise TruncatedDataSetError(f"data set ends inside an item of element {_tag_text(owner)}")
        pos = -after
