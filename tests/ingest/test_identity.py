"""The C-STORE handler's accept/refuse decisions on a received data set, each on its own.

Every case encodes a small MR data set here and reads it the way the handler
does (:func:`read_identity`: the one-pass scan for little endian, pydicom for
big endian), and must be refused with the named DIMSE status and reason, or
accepted with the identity it carries.
"""

from __future__ import annotations

import datetime
import zlib

import pytest
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    CTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
)

from dicom_node.ingest.identity import (
    LOSSLESS_TRANSFER_SYNTAXES,
    LOSSY_TRANSFER_SYNTAXES,
    MAX_INFLATED_BYTES,
    Header,
    InstanceIdentity,
    RejectedInstance,
    check_copied_attributes,
    check_inflated_size,
    check_pixel_size,
    check_uid,
    decode_dataset,
    identify,
    is_lossy,
    read_identity,
    transfer_syntaxes,
)
from dicom_node.statuses import StoreStatus
from tests.support.instances import PATHS, SERIES, SOP, STUDY, MiB, encode, mr, read, refused

#: The refused values are invalid on purpose; pydicom warns when the test writes them.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:The value length",
                                        "ignore:Unknown encoding")


@pytest.mark.parametrize("syntax", PATHS)
def test_an_mr_instance_is_accepted_with_its_identity(syntax: str) -> None:
    ident, lossy = read(mr(), syntax)
    assert ident == InstanceIdentity(
        sop_class_uid=MRImageStorage, sop_instance_uid=SOP, series_instance_uid=SERIES, study_instance_uid=STUDY,
        modality="MR", series_number=3, series_description="t1_mprage", patient_id="PID-1",
        issuer_of_patient_id="HOSP", accession_number="ACC-1", study_date=datetime.date(2026, 1, 10))
    assert lossy is False


@pytest.mark.parametrize("syntax", PATHS)
def test_absent_optional_attributes_are_none(syntax: str) -> None:
    ds = mr(SeriesNumber=None, SeriesDescription=None, PatientID=None, IssuerOfPatientID=None,
            AccessionNumber=None, StudyDate=None, SpecificCharacterSet=None)
    ident, _ = read(ds, syntax)
    assert (ident.series_number, ident.series_description, ident.patient_id, ident.issuer_of_patient_id,
            ident.accession_number, ident.study_date) == (None, None, None, None, None, None)


@pytest.mark.parametrize("syntax", PATHS)
def test_empty_optional_attributes_are_none(syntax: str) -> None:
    ds = mr(SeriesNumber="", SeriesDescription="", PatientID="", AccessionNumber="", StudyDate="")
    ident, _ = read(ds, syntax)
    assert (ident.series_number, ident.series_description, ident.patient_id, ident.accession_number,
            ident.study_date) == (None, None, None, None, None)


def test_an_enhanced_mr_instance_is_accepted() -> None:
    ident, _ = read(mr(SOPClassUID=EnhancedMRImageStorage), context=EnhancedMRImageStorage)
    assert ident.sop_class_uid == EnhancedMRImageStorage


@pytest.mark.parametrize("syntax", PATHS)
@pytest.mark.parametrize(("change", "context", "status", "reason"), [
    ({}, EnhancedMRImageStorage, StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
     "SOPClassUID of the dataset differs from the C-STORE request"),
    ({"SOPClassUID": CTImageStorage}, CTImageStorage, StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED,
     f"SOP class {CTImageStorage} is not MR Image Storage or Enhanced MR Image Storage"),
    ({"Modality": "CT"}, MRImageStorage, StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Modality is 'CT', not 'MR'"),
    ({"Modality": None}, MRImageStorage, StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "Modality is '', not 'MR'"),
    ({"SOPClassUID": None}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND, "SOPClassUID is missing"),
    ({"SOPInstanceUID": None}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND, "SOPInstanceUID is missing"),
    ({"SeriesInstanceUID": "1.2.x"}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND,
     "SeriesInstanceUID is not a valid UID"),
    ({"StudyInstanceUID": None}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND, "StudyInstanceUID is missing"),
    ({"PatientID": "A\\B"}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND, "PatientID has more than one value"),
    ({"StudyDate": "20261340"}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND, "StudyDate is not a valid date"),
    ({"PatientBirthDate": "1950"}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND,
     "PatientBirthDate is not a valid date"),
    ({"PatientID": "P" * 65}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND, "PatientID is longer than its VR allows"),
    ({"AccessionNumber": "A" * 17}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND,
     "AccessionNumber is longer than its VR allows"),
    ({"SpecificCharacterSet": "ISO_IR 999"}, MRImageStorage, StoreStatus.CANNOT_UNDERSTAND,
     "SpecificCharacterSet names an unknown character set"),
])
def test_each_refusal_has_its_status_and_reason(syntax: str, change: dict[str, object], context: str,
                                                status: StoreStatus, reason: str) -> None:
    assert refused(mr(**change), syntax, context) == (status, reason)


@pytest.mark.parametrize("syntax", PATHS)
def test_values_at_their_vr_limits_are_accepted(syntax: str) -> None:
    ds = mr(PatientID="P" * 64, AccessionNumber="A" * 16, StudyDate="20240229", SeriesDescription="d" * 64)
    ident, _ = read(ds, syntax)
    assert ident.patient_id == "P" * 64 and ident.accession_number == "A" * 16
    assert ident.study_date == datetime.date(2024, 2, 29) and ident.series_description == "d" * 64


def test_a_uid_of_64_characters_is_valid_and_65_is_not() -> None:
    uid64 = "1." + "2" * 62
    assert check_uid(uid64, "SOPInstanceUID") == uid64
    assert check_uid(f" {uid64} ", "SOPInstanceUID") == uid64
    with pytest.raises(RejectedInstance, match="SOPInstanceUID is not a valid UID"):
        check_uid(uid64 + "3", "SOPInstanceUID")
    for bad in ("1.02.3", "1..2", ".1.2", "1.2.", "1.2.a", "../../etc"):
        with pytest.raises(RejectedInstance, match="X is not a valid UID") as caught:
            check_uid(bad, "X")
        assert caught.value.status is StoreStatus.CANNOT_UNDERSTAND
    assert check_uid("0.1.0", "X") == "0.1.0"
    with pytest.raises(RejectedInstance, match="X is missing"):
        check_uid(None, "X")
    with pytest.raises(RejectedInstance, match="X is missing"):
        check_uid("  ", "X")


@pytest.mark.parametrize("syntax", PATHS)
def test_the_lossy_flag(syntax: str) -> None:
    assert read(mr(LossyImageCompression="01"), syntax)[1] is True
    assert read(mr(LossyImageCompression="00"), syntax)[1] is False


@pytest.mark.parametrize("syntax", [JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless])
def test_lossy_only_syntaxes_are_lossy_whatever_the_header_says(syntax: str) -> None:
    ds = mr()
    assert is_lossy(ds, syntax) is True
    assert read_identity(encode(ds), ExplicitVRLittleEndian, MRImageStorage)[1] is False
    assert is_lossy(mr(LossyImageCompression="01"), JPEG2000Lossless) is True
    assert is_lossy(ds, JPEG2000) is False and is_lossy(ds, JPEGLSLossless) is False


@pytest.mark.parametrize("syntax", PATHS)
def test_pixel_data_larger_than_the_limit_is_refused(syntax: str) -> None:
    ds = mr(Rows=512, Columns=512, NumberOfFrames=4)              # 512 * 512 * 4 * 2 bytes = 2 MiB
    read(ds, syntax, max_pixel_bytes=2 * MiB)                     # exactly at the limit: accepted
    status, reason = refused(ds, syntax, max_pixel_bytes=2 * MiB - 1)
    assert status is StoreStatus.OUT_OF_RESOURCES
    assert reason == "pixel data decodes to 2 MiB, over storage.max_pixel_bytes (1 MiB)"
    read(ds, syntax)                                             # no limit: not checked


@pytest.mark.parametrize("syntax", PATHS)
def test_pixel_size_defaults_and_samples(syntax: str) -> None:
    rgb = mr(SamplesPerPixel=3, Rows=1024, Columns=1024, BitsAllocated=8)   # 3 MiB
    assert refused(rgb, syntax, max_pixel_bytes=3 * MiB - 1)[0] is StoreStatus.OUT_OF_RESOURCES
    read(rgb, syntax, max_pixel_bytes=3 * MiB)
    defaults = mr(SamplesPerPixel=None, BitsAllocated=None, Rows=1024, Columns=1024)   # 1 sample, 16 bits: 2 MiB
    assert refused(defaults, syntax, max_pixel_bytes=2 * MiB - 1)[0] is StoreStatus.OUT_OF_RESOURCES
    read(defaults, syntax, max_pixel_bytes=2 * MiB)
    no_image = mr(Rows=None, Columns=None)
    read(no_image, syntax, max_pixel_bytes=1)


def test_check_pixel_size_rounds_bits_up_to_bytes() -> None:
    values = {"Rows": 3, "Columns": 3, "NumberOfFrames": 1, "SamplesPerPixel": 1, "BitsAllocated": 1}
    check_pixel_size(values, 2)                                   # 9 bits: 2 bytes
    with pytest.raises(RejectedInstance, match="pixel data decodes to 0 MiB"):
        check_pixel_size(values, 1)


@pytest.mark.parametrize("syntax", PATHS)
def test_a_negative_frame_count_is_refused(syntax: str) -> None:
    assert refused(mr(NumberOfFrames=-1), syntax, max_pixel_bytes=MiB) == (
        StoreStatus.CANNOT_UNDERSTAND, "NumberOfFrames is negative")


def test_image_size_attributes_that_do_not_decode_are_refused() -> None:
    raw = encode(mr(NumberOfFrames=12)).replace(b"\x28\x00\x08\x00IS\x02\x0012", b"\x28\x00\x08\x00IS\x02\x00x1")
    assert b"IS\x02\x00x1" in raw
    with pytest.raises(RejectedInstance, match=r"image size attributes cannot be decoded \(ValueError\)"):
        read_identity(raw, ExplicitVRLittleEndian, MRImageStorage, MiB)
    ds = mr()
    wide = encode(ds).replace(b"\x28\x00\x10\x00US\x02\x00\x00\x01", b"\x28\x00\x10\x00US\x04\x00\x00\x01\x00\x00")
    assert wide != encode(ds)
    with pytest.raises(RejectedInstance, match="image size attributes cannot be decoded"):
        read_identity(wide, ExplicitVRLittleEndian, MRImageStorage, MiB)


def test_a_deflate_bomb_is_refused_before_it_inflates() -> None:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = deflater.compress(b"\0" * (3 * MiB)) + deflater.flush()
    check_inflated_size(bomb, limit=3 * MiB)                      # exactly at the limit
    with pytest.raises(RejectedInstance, match="deflated data set inflates past 2 MiB") as caught:
        check_inflated_size(bomb, limit=2 * MiB)
    assert caught.value.status is StoreStatus.OUT_OF_RESOURCES
    assert 256 * MiB == MAX_INFLATED_BYTES
    check_inflated_size(b"")


def test_a_copied_attribute_in_a_non_text_vr_is_refused() -> None:
    raw = encode(mr(StudyDate="20261110")).replace(b"\x08\x00\x20\x00DA\x08\x00", b"\x08\x00\x20\x00AT\x08\x00")
    with pytest.raises(RejectedInstance, match="StudyDate is encoded with VR AT, not as text"):
        identify(decode_dataset(raw, ExplicitVRLittleEndian), MRImageStorage)


def test_a_character_set_a_report_cannot_carry_is_refused() -> None:
    status, reason = refused(mr(SpecificCharacterSet="ISO 2022 IR 100", PatientName="Müller^Jürgen"))
    assert status is StoreStatus.CANNOT_UNDERSTAND
    assert reason.startswith("SpecificCharacterSet cannot be carried into a report")


def test_a_character_set_that_does_not_decode_is_refused() -> None:
    with pytest.raises(RejectedInstance, match=r"SpecificCharacterSet cannot be decoded \(UnicodeDecodeError\)"):
        Header({0x00080005: b"ISO_IR \xff"})


def test_text_values_decode_with_the_character_set() -> None:
    header = Header({0x00080005: b"ISO_IR 100", 0x00100010: "Müller^Jürgen ".encode("latin-1"),
                     0x00100020: b"PID-7\0", 0x00080060: b""})
    assert header.text("PatientName", "PN") == "Müller^Jürgen"
    assert header.text("PatientID", "LO") == "PID-7"
    assert header.text("Modality", "CS") == ""
    assert header.text("AccessionNumber", "SH") is None
    with pytest.raises(RejectedInstance, match=r"PatientID cannot be decoded \(UnicodeDecodeError\)"):
        Header({0x00100020: "Jür".encode("latin-1")}).text("PatientID", "UI")
    with pytest.raises(RejectedInstance, match="Modality has more than one value"):
        Header({0x00080060: b"MR\\CT"}).text("Modality", "CS")


def test_check_copied_attributes_accepts_a_pydicom_dataset() -> None:
    check_copied_attributes(mr())
    with pytest.raises(RejectedInstance, match="StudyID is longer than its VR allows"):
        check_copied_attributes(mr(StudyID="1" * 17))


def test_the_negotiated_transfer_syntaxes() -> None:
    assert transfer_syntaxes(False) == list(LOSSLESS_TRANSFER_SYNTAXES)
    assert transfer_syntaxes(True) == [*LOSSLESS_TRANSFER_SYNTAXES, *LOSSY_TRANSFER_SYNTAXES]
    assert transfer_syntaxes(False)[0] == ExplicitVRLittleEndian
    assert HTJ2K in LOSSY_TRANSFER_SYNTAXES and JPEGBaseline8Bit not in transfer_syntaxes(False)

