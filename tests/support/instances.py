"""Small received MR instances for the tests of the C-STORE handler's decisions (dicom_node.ingest.identity)."""

from __future__ import annotations

import zlib

import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from dicom_node.ingest.identity import InstanceIdentity, RejectedInstance, read_identity
from dicom_node.statuses import StoreStatus

STUDY, SERIES, SOP = "1.2.826.0.1.3680043.8.498.10", "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12"
MiB = 1024 * 1024


def part10_file(meta: FileMetaDataset, body: bytes) -> bytes:
    """A Part 10 file's bytes: preamble, ``DICM``, *meta* as written by pydicom, then *body* as it is."""
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + body


def pydicom_test_file(name: str) -> str:
    """The path of one of pydicom's bundled test files (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), f"pydicom's test file {name} is not installed"
    return path


def mr(**values: object) -> Dataset:
    """A received MR instance's header (no pixel data needed for the decisions)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, SOP
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260110", "101500", "ACC-1"
    ds.Modality = "MR"
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "Doe^Jane", "PID-1", "HOSP"
    ds.PatientBirthDate, ds.PatientSex = "19500101", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.SeriesNumber, ds.SeriesDescription = 3, "t1_mprage"
    ds.SamplesPerPixel, ds.Rows, ds.Columns, ds.BitsAllocated = 1, 256, 256, 16
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    """*ds* encoded in *syntax* (deflated for the deflated syntax), without file meta information."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != ExplicitVRBigEndian
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    raw = buffer.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return deflater.compress(raw) + deflater.flush()
    return raw


#: One transfer syntax per reading path: the one-pass scan (explicit, implicit, deflated) and pydicom.
PATHS = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


def read(ds: Dataset, syntax: str = ExplicitVRLittleEndian, context: str = MRImageStorage,
         max_pixel_bytes: int | None = None) -> tuple[InstanceIdentity, bool]:
    """:func:`read_identity` of *ds* encoded in *syntax*."""
    return read_identity(encode(ds, syntax), syntax, context, max_pixel_bytes)


def refused(ds: Dataset, syntax: str = ExplicitVRLittleEndian, context: str = MRImageStorage,
            max_pixel_bytes: int | None = None) -> tuple[StoreStatus, str]:
    """The status and reason *ds* is refused with (the test fails if it is accepted)."""
    with pytest.raises(RejectedInstance) as caught:
        read(ds, syntax, context, max_pixel_bytes)
    return caught.value.status, caught.value.reason
