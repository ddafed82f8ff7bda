"""A seeded generator of malformed and adversarial DICOM files.

Each case is a Part 10 file whose file meta is valid enough to be sent (so the
node, not the sender, meets the damage) and whose data set is broken in one of
the ways a hospital network produces or an attacker tries: flipped bytes,
truncation, lengths past the end, wrong VRs, huge declared dimensions, pixel
data not matching Rows x Columns x frames, path characters and ``..`` in UIDs
and strings, non-ASCII and very long values, deeply nested sequences and
deflate bombs.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tests.support.instances import part10_file


@dataclass(frozen=True)
class FuzzCase:
    """One malformed file and what was done to it."""

    index: int
    family: str
    path: Path
    sop_instance_uid: str


def base_dataset(rng: random.Random, size: int = 32) -> Dataset:
    """A small, valid MR instance (the material every mutation starts from)."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(rng.random())])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[str(rng.random())])
    ds.Modality = "MR"
    ds.PatientName = "Fuzz^Patient"
    ds.PatientID = "FUZZ-0001"
    ds.PatientBirthDate = "19500101"
    ds.StudyDate = "20261101"
    ds.SeriesNumber = 7
    ds.InstanceNumber = 1
    ds.SeriesDescription = "t1_mprage_fuzz"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(size * size, dtype=np.uint16).tobytes()
    return ds


def _meta(ds: Dataset, transfer_syntax: UID = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _body(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.file_meta = _meta(ds)
    dcmwrite(buffer, ds, enforce_file_format=True)
    raw = buffer.getvalue()
    # Skip preamble, prefix and file meta: the data set starts after the meta group.
    return raw[_meta_end(raw):]


def _meta_end(raw: bytes) -> int:
    offset = 132
    group_length = struct.unpack_from("<I", raw, offset + 8)[0]
    return offset + 12 + group_length


def _flip(rng: random.Random, ds: Dataset) -> bytes:
    body = bytearray(_body(ds))
    for _ in range(rng.randint(1, 24)):
        body[rng.randrange(len(body))] = rng.randrange(256)
    return bytes(body)


def _truncate(rng: random.Random, ds: Dataset) -> bytes:
    body = _body(ds)
    return body[: rng.randrange(1, len(body) - 1)]


def _element_offsets(body: bytes) -> list[int]:
    """Offsets of top-level explicit-VR element headers (best effort)."""
    offsets, pos = [], 0
    while pos + 8 <= len(body):
        offsets.append(pos)
        vr = body[pos + 4: pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR", b"SV", b"UV"):
            length = struct.unpack_from("<I", body, pos + 8)[0]
            pos += 12 + (0 if length == 0xFFFFFFFF else length)
        else:
            pos += 8 + struct.unpack_from("<H", body, pos + 6)[0]
    return offsets


def _bad_length(rng: random.Random, ds: Dataset) -> bytes:
    body = bytearray(_body(ds))
    offset = rng.choice(_element_offsets(bytes(body)))
    vr = bytes(body[offset + 4: offset + 6])
    if vr in (b"OB", b"OW", b"SQ", b"UT", b"UN"):
        struct.pack_into("<I", body, offset + 8, rng.choice([0xFFFFFFF0, 0x7FFFFFFF, len(body) * 4 + 2]))
    else:
        struct.pack_into("<H", body, offset + 6, rng.choice([0xFFFF, 0xFFFE, 0x8001]))
    return bytes(body)


def _wrong_vr(rng: random.Random, ds: Dataset) -> bytes:
    body = bytearray(_body(ds))
    for offset in rng.sample(_element_offsets(bytes(body)), k=3):
        body[offset + 4: offset + 6] = rng.choice([b"SQ", b"OB", b"FD", b"US", b"AT", b"ZZ", b"\x00\x00", b"UN"])
    return bytes(body)


def _huge_dimensions(rng: random.Random, ds: Dataset) -> bytes:
    ds.Rows = ds.Columns = 65535
    if rng.random() < 0.5:
        ds.NumberOfFrames = str(rng.choice([2**31 - 1, 99999999, 1000000]))
    return _body(ds)


def _pixel_mismatch(rng: random.Random, ds: Dataset) -> bytes:
    ds.PixelData = bytes(rng.randrange(256) for _ in range(rng.choice([0, 2, 17, 4096, 9000])))
    ds.BitsAllocated = rng.choice([16, 8, 32, 1, 12])
    return _body(ds)


_PATHS = ["../../../../etc/passwd", "1.2.3/../../x", "..", "/tmp/evil", "1.2.3\\..\\..\\x", "1.2.3\x00.4",
          "C:\\Windows\\x", "1.2.840.10008.../..", "%2e%2e%2f", "~root"]


def _path_uids(rng: random.Random, ds: Dataset) -> bytes:
    keyword = rng.choice(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    value = rng.choice(_PATHS)
    setattr(ds, keyword, value)
    ds.SeriesDescription = rng.choice(_PATHS)
    body = _body(ds)
    return body


def _long_values(rng: random.Random, ds: Dataset) -> bytes:
    ds.SpecificCharacterSet = rng.choice(["ISO_IR 192", "ISO_IR 100", "GB18030", "NOT A CHARSET", "ISO 2022 IR 87"])
    ds.PatientName = "Ω" * rng.choice([64, 5000, 30000])
    ds.SeriesDescription = "界" * rng.choice([10, 4000])
    ds.InstitutionName = "A" * 60000
    return _body(ds)


def _nested(rng: random.Random, ds: Dataset) -> bytes:
    # Written by hand: sequences of undefined length nested thousands deep (pydicom cannot write these).
    depth = rng.choice([100, 1000, 5000])
    sq_start = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item_start = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    nested = (sq_start + item_start) * depth + (item_end + sq_end) * depth
    body = _body(ds)
    # (0008,1140) sorts after (0008,0060) Modality and before (0010,...) patient elements.
    split = body.find(b"\x10\x00\x10\x00")
    return body[:split] + nested + body[split:]


def _missing_ids(rng: random.Random, ds: Dataset) -> bytes:
    for keyword in rng.sample(["SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"], k=2):
        delattr(ds, keyword)
    return _body(ds)


def _deflate_bomb(rng: random.Random, ds: Dataset) -> tuple[bytes, UID]:
    # A private OB element of hundreds of MB of zeros, deflated to a few hundred kB.
    size = rng.choice([300, 1024]) * 1024 * 1024
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    header = _body(ds)
    element = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, size)
    chunk = b"\x00" * (1024 * 1024)
    parts = [compressor.compress(header + element)]
    for _ in range(size // len(chunk)):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.flush())
    return b"".join(parts), DeflatedExplicitVRLittleEndian


MUTATIONS: dict[str, Callable[[random.Random, Dataset], bytes | tuple[bytes, UID]]] = {
    "flipped_bytes": _flip,
    "truncated": _truncate,
    "length_past_end": _bad_length,
    "wrong_vr": _wrong_vr,
    "huge_dimensions": _huge_dimensions,
    "pixel_mismatch": _pixel_mismatch,
    "path_in_uid": _path_uids,
    "non_ascii_long_values": _long_values,
    "deep_nesting": _nested,
    "missing_identifiers": _missing_ids,
    "deflate_bomb": _deflate_bomb,
}


def generate(out_dir: Path, count: int, seed: int = 1234) -> Iterator[FuzzCase]:
    """Write *count* malformed files to *out_dir*, cycling through the mutation families.

    Deflate bombs are rarer (every 50th case) since each costs a few hundred kB.
    """
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    families = [f for f in MUTATIONS if f != "deflate_bomb"]
    for index in range(count):
        family = "deflate_bomb" if index % 50 == 49 else families[index % len(families)]
        ds = base_dataset(rng)
        sop_uid = str(ds.SOPInstanceUID)
        meta = _meta(ds)
        result = MUTATIONS[family](rng, ds)
        if isinstance(result, tuple):
            body, meta.TransferSyntaxUID = result
        else:
            body = result
        path = out_dir / f"fuzz{index:05d}.dcm"
        path.write_bytes(part10_file(meta, body))
        yield FuzzCase(index, family, path, sop_uid)
