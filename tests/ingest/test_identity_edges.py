"""The C-STORE handler's decisions on a received data set: the edges the cases of test_identity.py leave open.

Each test pins a decision of :mod:`dicom_node.ingest.identity` that a mutant
survived the other tests with (docs/mutation.md): text in the data set's
character set, values at the ends of their ranges, the status of every
refusal, and the data sets the one-pass scan leaves to pydicom.
"""

from __future__ import annotations

import datetime
import struct
import zlib

import pytest
from pydicom import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
)

from dicom_node.ingest.header import scan_elements
from dicom_node.ingest.identity import (
    Header,
    RejectedInstance,
    check_copied_attributes,
    check_inflated_size,
    check_pixel_size,
    decode_dataset,
    identify,
    read_identity,
)
from dicom_node.statuses import StoreStatus
from tests.support.instances import PATHS, SOP, MiB, encode, mr, read, refused

#: The refused values are invalid on purpose; pydicom warns when the test writes them.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length",
                                        "ignore:Unknown encoding")


#: Text in the data set's character set: Latin-1, and UTF-8 (which a Latin-1 reading would garble).
NON_ASCII = {"PatientName": "Müller^Jürgen", "PatientID": "PÄT-1", "IssuerOfPatientID": "Spital Zürich",
             "AccessionNumber": "ÄCC-1", "SeriesDescription": "Schädel t1", "StudyDescription": "Gehirn ärztlich"}


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
@pytest.mark.parametrize("syntax", PATHS)
def test_text_in_the_data_sets_character_set_is_accepted_and_decoded(syntax: str, charset: str) -> None:
    ident, _ = read(mr(SpecificCharacterSet=charset, **NON_ASCII), syntax)
    assert (ident.patient_id, ident.issuer_of_patient_id, ident.accession_number, ident.series_description) == (
        "PÄT-1", "Spital Zürich", "ÄCC-1", "Schädel t1")


@pytest.mark.parametrize("syntax", PATHS)
def test_a_japanese_name_with_code_extensions_is_accepted(syntax: str) -> None:
    # PS3.5 H.3.1: ISO 2022 IR 87 with escape sequences inside the value
    ident, _ = read(mr(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientName="Yamada^Tarou=山田^太郎"), syntax)
    assert ident.patient_id == "PID-1"


@pytest.mark.parametrize("syntax", PATHS)
def test_values_keep_their_own_characters_at_the_ends(syntax: str) -> None:
    ident, _ = read(mr(PatientID="XPIDX", AccessionNumber="XACCX"), syntax)
    assert (ident.patient_id, ident.accession_number) == ("XPIDX", "XACCX")
    assert refused(mr(Modality="XA"), syntax) == (StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                                  "Modality is 'XA', not 'MR'")


@pytest.mark.parametrize("syntax", PATHS)
def test_a_long_series_description_is_cut_to_its_vr(syntax: str) -> None:
    assert read(mr(SeriesDescription="d" * 70), syntax)[0].series_description == "d" * 64


@pytest.mark.parametrize("syntax", PATHS)
def test_study_dates_in_every_month_and_only_of_eight_digits(syntax: str) -> None:
    assert read(mr(StudyDate="20261110"), syntax)[0].study_date == datetime.date(2026, 11, 10)
    assert refused(mr(StudyDate="2026111"), syntax) == (StoreStatus.CANNOT_UNDERSTAND, "StudyDate is not a valid date")


@pytest.mark.parametrize("syntax", PATHS)
def test_an_absent_attribute_does_not_end_the_checks(syntax: str) -> None:
    assert refused(mr(PatientName=None, StudyDate="20261340"), syntax) == (StoreStatus.CANNOT_UNDERSTAND,
                                                                          "StudyDate is not a valid date")


def test_a_multi_valued_element_of_a_parsed_data_set_is_refused() -> None:
    with pytest.raises(RejectedInstance, match=r"^PatientID has more than one value$"):
        check_copied_attributes(mr(PatientID=["A", "B"]))


@pytest.mark.parametrize("syntax", PATHS)
def test_empty_image_size_attributes_count_as_absent(syntax: str) -> None:
    ds = mr()
    ds.add_new("Rows", "US", None)
    ds.add_new("NumberOfFrames", "IS", None)
    read(ds, syntax, max_pixel_bytes=1)  # no rows: no pixel data to size


def test_empty_image_size_attributes_sent_as_text_count_as_absent() -> None:
    ds = mr(Rows=None, Columns=None)
    ds.add_new("Rows", "LO", "")
    ds.add_new("NumberOfFrames", "LO", "")
    read(ds, ExplicitVRBigEndian, max_pixel_bytes=1)


def _deflated(raw: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(raw) + deflater.flush()


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_a_one_byte_image_size_value_is_refused_by_the_scan(syntax: str) -> None:
    raw = encode(mr()).replace(b"\x28\x00\x10\x00US\x02\x00\x00\x01", b"\x28\x00\x10\x00US\x01\x00\x00")
    raw = _deflated(raw) if syntax == DeflatedExplicitVRLittleEndian else raw
    # the scan reads Rows itself (pydicom would fail on it with its own exception class)
    with pytest.raises(RejectedInstance, match=r"^image size attributes cannot be decoded \(ValueError\)$") as caught:
        read_identity(raw, syntax, MRImageStorage, MiB)
    assert caught.value.status is StoreStatus.CANNOT_UNDERSTAND


def test_the_limit_is_named_in_whole_mebibytes() -> None:
    values = {"Rows": 32768, "Columns": 32768, "NumberOfFrames": 1, "SamplesPerPixel": 1, "BitsAllocated": 16}
    with pytest.raises(RejectedInstance,
                       match=r"^pixel data decodes to 2048 MiB, over storage\.max_pixel_bytes \(1024 MiB\)$"):
        check_pixel_size(values, 1024 * MiB)


def test_a_deflate_bomb_is_measured_over_all_its_chunks() -> None:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(b"\0" * (40 * MiB)) + deflater.flush()  # inflated in chunks of 16 MiB
    check_inflated_size(bomb, limit=40 * MiB)
    with pytest.raises(RejectedInstance, match=r"^deflated data set inflates past 20 MiB$"):
        check_inflated_size(bomb, limit=20 * MiB)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_decode_dataset_reads_each_transfer_syntax(syntax: str) -> None:
    assert identify(decode_dataset(encode(mr(), syntax), syntax), MRImageStorage).sop_instance_uid == SOP


def _study_date_as_at(syntax: str) -> bytes:
    """An MR data set whose StudyDate is sent with VR AT: the one-pass scan gives way to pydicom."""
    raw = encode(mr(StudyDate="20261110")).replace(b"\x08\x00\x20\x00DA\x08\x00", b"\x08\x00\x20\x00AT\x08\x00")
    return _deflated(raw) if syntax == DeflatedExplicitVRLittleEndian else raw


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_a_data_set_the_scan_leaves_to_pydicom_is_still_checked_for_truncation(syntax: str) -> None:
    whole = _study_date_as_at(syntax)
    status, reason = refused_raw(whole, syntax)
    assert (status, reason) == (StoreStatus.CANNOT_UNDERSTAND, "StudyDate is encoded with VR AT, not as text")
    raw = encode(mr(StudyDate="20261110")).replace(b"\x08\x00\x20\x00DA\x08\x00", b"\x08\x00\x20\x00AT\x08\x00")
    cut = raw[:-3]
    cut = _deflated(cut) if syntax == DeflatedExplicitVRLittleEndian else cut
    status, reason = refused_raw(cut, syntax)
    assert status is StoreStatus.CANNOT_UNDERSTAND and reason.startswith("truncated data set: ")


def refused_raw(raw: bytes, syntax: str) -> tuple[StoreStatus, str]:
    with pytest.raises(RejectedInstance) as caught:
        read_identity(raw, syntax, MRImageStorage)
    return caught.value.status, caught.value.reason


def _nested(depth: int) -> Dataset:
    """Content sequences of undefined length nested *depth* deep."""
    item = Dataset()
    item.CodeMeaning = "deep"
    for _ in range(depth):
        outer = Dataset()
        outer.ContentSequence = [item]
        outer["ContentSequence"].is_undefined_length = True
        item.is_undefined_length_sequence_item = True
        item = outer
    return item


def test_a_lossy_syntax_is_lossy_when_pydicom_reads_the_data_set() -> None:
    ds = mr()
    ds.ContentSequence = _nested(20).ContentSequence  # deeper than the one-pass scan walks
    ds["ContentSequence"].is_undefined_length = True
    raw = encode(ds)
    assert scan_elements(raw, True, {0x00080016}) is None
    assert read_identity(raw, JPEGBaseline8Bit, MRImageStorage)[1] is True
    assert read_identity(raw, ExplicitVRLittleEndian, MRImageStorage)[1] is False


@pytest.mark.parametrize("syntax", PATHS)
def test_an_unknown_character_set_is_refused_even_when_it_ends_like_padding(syntax: str) -> None:
    assert refused(mr(SpecificCharacterSet="ISO_IR 100X"), syntax) == (
        StoreStatus.CANNOT_UNDERSTAND, "SpecificCharacterSet names an unknown character set")


def test_refusals_of_malformed_encodings_are_cannot_understand() -> None:
    with pytest.raises(RejectedInstance, match=r"^PatientID cannot be decoded \(UnicodeDecodeError\)$") as caught:
        Header({0x00100020: "Jür".encode("latin-1")}).text("PatientID", "UI")
    assert caught.value.status is StoreStatus.CANNOT_UNDERSTAND
    with pytest.raises(RejectedInstance, match=r"^SpecificCharacterSet cannot be decoded \(UnicodeDecodeError\)$") \
            as caught:
        Header({0x00080005: b"ISO_IR \xff"})
    assert caught.value.status is StoreStatus.CANNOT_UNDERSTAND
    raw = encode(mr(StudyDate="20261110")).replace(b"\x08\x00\x20\x00DA\x08\x00", b"\x08\x00\x20\x00AT\x08\x00")
    with pytest.raises(RejectedInstance) as caught:
        identify(decode_dataset(raw, ExplicitVRLittleEndian), MRImageStorage)
    assert caught.value.status is StoreStatus.CANNOT_UNDERSTAND
    unknown = encode(mr(StudyDescription="Brain")).replace(b"\x08\x00\x30\x10LO", b"\x08\x00\x30\x10JS")
    with pytest.raises(RejectedInstance, match=r"^element \(0008,1030\) has an unknown VR$") as caught:
        identify(decode_dataset(unknown, ExplicitVRLittleEndian), MRImageStorage)
    assert caught.value.status is StoreStatus.CANNOT_UNDERSTAND
    with pytest.raises(RejectedInstance, match=r"^truncated data set: ") as caught:
        read_identity(encode(mr())[:-3], ExplicitVRLittleEndian, MRImageStorage)
    assert caught.value.status is StoreStatus.CANNOT_UNDERSTAND


def test_a_character_set_padded_with_nul_is_known() -> None:
    header = Header({0x00080005: b"ISO_IR 100\0", 0x00100010: "Müller^Jürgen".encode("latin-1")})
    assert header.text("PatientName", "PN") == "Müller^Jürgen"


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (short VR form), padded to even length."""
    value += b" " * (len(value) % 2)
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def test_text_other_than_names_decodes_as_pydicom_reads_it() -> None:
    """Code extensions in a long string do not reset at ``^`` (a name delimiter only, PS3.5 6.1.2.5.3)."""
    charset, ident = b"ISO 2022 IR 13\\ISO 2022 IR 87", b"\x1b(BAB^\xb1"
    parsed = decode_dataset(_element(0x00080005, b"CS", charset) + _element(0x00100020, b"LO", ident),
                            ExplicitVRLittleEndian)
    parsed.decode()  # pydicom's own reading: the reference
    assert Header({0x00080005: charset, 0x00100020: ident}).text("PatientID", "LO") == parsed.PatientID == "AB^±"
