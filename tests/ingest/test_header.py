"""The one-pass header scan agrees with pydicom, and gives way to it on anything unusual.

Test data: pydicom's own test files (``pydicom.data``: MR, CT, RT plan with
nested sequences, JPEG 2000 with encapsulated pixel data, the character set
files of PS3.5 annex H-K) and data sets built here.
"""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from dicom_node.ingest.header import TruncatedDataSetError, check_extent, scan_elements
from dicom_node.ingest.identity import RejectedInstance, decode_dataset, identify, is_lossy, read_identity
from tests.support.instances import pydicom_test_file

WANTED = frozenset(int(Tag(k)) for k in ("SpecificCharacterSet", "PatientName", "PatientID", "StudyInstanceUID",
                                         "SeriesInstanceUID", "SOPInstanceUID", "Modality", "StudyDate",
                                         "LossyImageCompression", "SeriesNumber"))
#: pydicom's test files installed with it (others are downloaded on demand, and there is no network here).
FILES = ["MR_small.dcm", "CT_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "nested_priv_SQ.dcm",
         "reportsi.dcm"]


def _encoded(ds: Dataset, implicit: bool) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _body(path: str) -> tuple[bytes, bool]:
    """The data set bytes of a test file (after its file meta) and whether it is explicit VR."""
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    with open(path, "rb") as handle:
        data = handle.read()
    pos = 132 if data[128:132] == b"DICM" else 0
    while data[pos:pos + 2] == b"\x02\x00":  # file meta elements: explicit VR little endian
        long_vr = data[pos + 4:pos + 6] in (b"OB", b"UN", b"UT", b"SQ", b"OW")
        length = int.from_bytes(data[pos + 8:pos + 12] if long_vr else data[pos + 6:pos + 8], "little")
        pos += (12 if long_vr else 8) + length
    return data[pos:], not syntax.is_implicit_VR


@pytest.mark.parametrize("name", FILES)
def test_scan_matches_pydicom_on_its_test_files(name: str) -> None:
    path = pydicom_test_file(name)
    raw, explicit = _body(path)
    found = scan_elements(raw, explicit, WANTED)
    assert found is not None
    reference = dcmread(path)
    for tag in WANTED:
        element = reference.get_item(tag)
        expected = None if element is None else element.value
        if isinstance(expected, bytes) or expected is None:
            assert found.get(tag) == expected, hex(tag)
        else:  # a value pydicom already decoded (SpecificCharacterSet): compare the text, not only its presence
            values = [expected] if isinstance(expected, str) else list(expected)
            assert found[tag].decode("ascii").rstrip(" \0").split("\\") == [str(v) for v in values], hex(tag)


@pytest.mark.parametrize("implicit", [True, False])
def test_undefined_length_sequences_are_walked(implicit: bool) -> None:
    ds = Dataset()
    ds.PatientName, ds.PatientID = "Seq^Test", "SEQ-1"
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "T-A0100", "SRT"
    item = Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    item.ConceptNameCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, item])
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "MR"
    for element in (ds["ReferencedImageSequence"], item["ConceptNameCodeSequence"]):
        element.is_undefined_length = True
    for each in (item, inner):
        each.is_undefined_length_sequence_item = True
    raw = _encoded(ds, implicit)
    assert b"\xfe\xff\xdd\xe0" in raw  # a sequence delimitation item is really there
    found = scan_elements(raw, not implicit, WANTED)
    assert found is not None
    assert found[int(Tag("PatientID"))] == b"SEQ-1 "
    assert found[int(Tag("Modality"))] == b"MR"
    assert found[int(Tag("StudyInstanceUID"))].rstrip(b"\0").decode() == ds.StudyInstanceUID


@pytest.mark.parametrize("cut", [1, 7, 30, 200])
def test_truncated_or_overlong_data_sets_are_refused(cut: int) -> None:
    """pydicom reads a truncated value without a word: the scan refuses it, naming the element."""
    raw, explicit = _body(pydicom_test_file("MR_small.dcm"))
    # MR_small.dcm ends with (FFFC,FFFC) Data Set Trailing Padding, after its pixel data
    with pytest.raises(TruncatedDataSetError, match=r"element \((7FE0,0010|FFFC,FFFC)\) runs past the end"):
        scan_elements(raw[:-cut], explicit, WANTED)
    with pytest.raises(TruncatedDataSetError, match="element header"):
        scan_elements(raw + b"\x00" * 3, explicit, WANTED)
    with pytest.raises(RejectedInstance, match=r"truncated data set: value length of element"):
        read_identity(raw[:-cut], ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian, MRImageStorage)


def test_truncated_big_endian_and_undefined_length_values_are_refused() -> None:
    raw, _ = _body(pydicom_test_file("MR_small_bigendian.dcm"))
    check_extent(raw, True, little_endian=False)
    with pytest.raises(RejectedInstance, match=r"truncated data set: .*\(7FE0,0010\)"):
        read_identity(raw[:-50], ExplicitVRBigEndian, MRImageStorage)
    encapsulated, explicit = _body(pydicom_test_file("JPEG2000.dcm"))
    with pytest.raises(TruncatedDataSetError, match="7FE0,0010"):  # no sequence delimiter / item cut
        scan_elements(encapsulated[:-20], explicit, WANTED)


def _mr(**values: object) -> Dataset:
    ds = dcmread(pydicom_test_file("MR_small.dcm"))
    ds.SOPClassUID = MRImageStorage
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("values", [
    {},
    {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jürgen", "LossyImageCompression": "01"},
    {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientName": "Yamada^Tarou=山田^太郎"},
    {"PatientID": "A\\B"},
    {"StudyDate": "20261340"},
    {"SpecificCharacterSet": "ISO_IR 999"},
    {"SpecificCharacterSet": "ISO 2022 IR 100", "PatientName": "Müller^Jürgen"},  # found by the chaos fuzzer
    {"Modality": "CT"},
])
def test_read_identity_agrees_with_the_pydicom_path(syntax: UID, values: dict[str, object]) -> None:
    ds = _mr(**values)
    buffer = BytesIO()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    raw = data[132 + 12 + int.from_bytes(data[140:144], "little"):]

    def reference() -> tuple[object, bool]:
        parsed = decode_dataset(raw, syntax)
        return identify(parsed, MRImageStorage), is_lossy(parsed, syntax)

    try:
        expected: object = reference()
    except RejectedInstance as exc:
        expected = exc.reason
    try:
        actual: object = read_identity(raw, syntax, MRImageStorage)
    except RejectedInstance as exc:
        actual = exc.reason
    assert actual == expected


def test_big_endian_is_read_by_pydicom() -> None:
    path = pydicom_test_file("MR_small_bigendian.dcm")
    raw, _ = _body(path)
    assert scan_elements(raw, True, WANTED) is None  # not little endian: no sensible walk
    reference = dcmread(path)
    with pytest.raises(RejectedInstance, match="SOPClassUID of the dataset differs"):
        read_identity(raw, ExplicitVRBigEndian, MRImageStorage + ".0")
    ident, lossy = read_identity(raw, ExplicitVRBigEndian, reference.SOPClassUID)
    assert ident.sop_instance_uid == reference.SOPInstanceUID and not lossy


@pytest.mark.parametrize("vr", [b"AT", b"OB", b"US"])
def test_a_wanted_attribute_with_a_non_text_vr_is_judged_by_pydicom(vr: bytes) -> None:
    """Found by the chaos fuzzer: a StudyDate sent with VR AT decodes as text but pydicom reads two tags."""
    ds = _mr(StudyDate="20261110")
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    raw = data[132 + 12 + int.from_bytes(data[140:144], "little"):]
    marker = b"\x08\x00\x20\x00DA\x08\x00"
    assert raw.count(marker) == 1
    if vr == b"OB":  # a long VR: reserved bytes and a 4-byte length
        raw = raw.replace(marker, b"\x08\x00\x20\x00OB\x00\x00\x08\x00\x00\x00")
    else:
        raw = raw.replace(marker, b"\x08\x00\x20\x00" + vr + b"\x08\x00")
    assert scan_elements(raw, True, WANTED) is None
    with pytest.raises(RejectedInstance) as reference:
        identify(decode_dataset(raw, ExplicitVRLittleEndian), MRImageStorage)
    with pytest.raises(RejectedInstance) as actual:
        read_identity(raw, ExplicitVRLittleEndian, MRImageStorage)
    assert actual.value.reason == reference.value.reason and "StudyDate" in actual.value.reason


def test_an_element_with_an_unknown_vr_is_refused_on_both_paths() -> None:
    """Found by the chaos fuzzer: an unknown VR passed ingest and made the run fail when headers were converted."""
    ds = _mr(StudyDescription="Brain")
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    raw = data[132 + 12 + int.from_bytes(data[140:144], "little"):]
    marker = b"\x08\x00\x30\x10LO"  # (0008,1030) Study Description
    assert raw.count(marker) == 1
    raw = raw.replace(marker, b"\x08\x00\x30\x10JS")
    assert scan_elements(raw, True, WANTED) is None
    with pytest.raises(RejectedInstance, match=r"\(0008,1030\) has an unknown VR"):
        read_identity(raw, ExplicitVRLittleEndian, MRImageStorage)
