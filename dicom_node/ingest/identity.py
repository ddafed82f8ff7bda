"""What the C-STORE handler checks in a received data set before it is spooled.

The identity of an instance (its UIDs, patient and study attributes) is read
from the data set's raw elements: values are decoded here, with the data set's
character set, only for the dozen attributes the node needs, instead of
through pydicom's general value conversion (which made up a third of the
C-STORE handler's time).  Untrusted bytes that do not decode, repeat or
overflow their VR are refused with a reason that names the attribute, never
its value.  Pixel data is never touched.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from io import BytesIO

from pydicom import Dataset
from pydicom.charset import convert_encodings, decode_bytes, python_encoding
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
)
from pydicom.valuerep import PN_DELIMS, TEXT_VR_DELIMS

from core.errors import InvalidInstanceError
from dicom_node.ingest.header import (
    KNOWN_VRS,
    TEXT_VRS,
    US_TAGS,
    Buffer,
    TruncatedDataSetError,
    check_extent,
    scan_elements,
)
from dicom_node.statuses import StoreStatus
from structured_reports.charset import report_character_set

ACCEPTED_SOP_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage})
_ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless})
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class RejectedInstance(InvalidInstanceError):  # noqa: N818 - name kept for callers
    """An instance refused with a specific DIMSE status."""

    def __init__(self, status: StoreStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_uid(value: object, keyword: str) -> str:
    """Return *value* as a UID string if it is a valid DICOM UID.

    A valid UID contains only digits and dots, so it is also a safe file name.

    Raises
    ------
    RejectedInstance
        When the UID is missing or malformed.
    """
    text = str(value or "").strip()
    if not text:
        raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} is missing")
    if len(text) > 64 or not _UID_RE.match(text):
        raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} is not a valid UID")
    return text


@dataclass(frozen=True)
class InstanceIdentity:
    """The identifying attributes of a received instance."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    accession_number: str | None
    study_date: date | None


def _parse_da(value: object) -> date | None:
    text = str(value or "").strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


#: Attributes our reports copy from the source: (keyword, maximum characters, kind).
_COPIED: tuple[tuple[str, int, str], ...] = (
    ("PatientName", 320, "PN"), ("PatientID", 64, "LO"), ("PatientBirthDate", 8, "DA"), ("PatientSex", 16, "CS"),
    ("StudyDate", 8, "DA"), ("StudyTime", 16, "TM"), ("AccessionNumber", 16, "SH"), ("StudyID", 16, "SH"),
    ("ReferringPhysicianName", 320, "PN"), ("StudyDescription", 64, "LO"), ("IssuerOfPatientID", 64, "LO"),
)
_SPECIFIC_CHARACTER_SET = 0x00080005
#: What the handler reads: the copied attributes, the identity, the lossy flag, the character set.
_SCANNED = frozenset(int(Tag(keyword)) for keyword in (
    *(keyword for keyword, _, _ in _COPIED), "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
    "StudyInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "LossyImageCompression",
    "SpecificCharacterSet", "NumberOfFrames")) | US_TAGS
#: VRs whose values are decoded with the data set's character set (the others are plain ASCII).
_CHARSET_KINDS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})


@functools.cache
def _tag(keyword: str) -> int:
    return int(Tag(keyword))


class Header:
    """Text values of a received data set, decoded from raw bytes on demand.

    Parameters
    ----------
    source : Dataset or mapping
        The data set as read by :func:`decode_dataset` (raw, undecoded
        elements), or the raw values found by :func:`~dicom_node.ingest.header.scan_elements`.

    Raises
    ------
    RejectedInstance
        The Specific Character Set names an unknown character set.
    """

    def __init__(self, source: Dataset | Mapping[int, bytes]) -> None:
        self.source = source
        names = [name.strip() for name in self._charset_names()]
        for name in names:
            if name and name not in python_encoding:
                raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND,
                                       "SpecificCharacterSet names an unknown character set")
        try:
            report_character_set(names)
        except ValueError as exc:  # highdicom could not write the report: refuse now, not at report time
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND,
                                   f"SpecificCharacterSet cannot be carried into a report ({exc})") from exc
        self.encodings = convert_encodings(names or None)

    def _charset_names(self) -> list[str]:
        if isinstance(self.source, Dataset):
            charsets = self.source.get("SpecificCharacterSet")
            if charsets is None:
                return []
            return [str(n) for n in charsets] if isinstance(charsets, MultiValue) else [str(charsets)]
        raw = self.source.get(_SPECIFIC_CHARACTER_SET)
        if not raw:
            return []
        try:
            return raw.decode("ascii").rstrip(" \0").split("\\")
        except UnicodeDecodeError as exc:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND,
                                   "SpecificCharacterSet cannot be decoded (UnicodeDecodeError)") from exc

    def _value(self, tag: int) -> bytes | DataElement | None:
        if not isinstance(self.source, Dataset):
            return self.source.get(tag)
        element = self.source.get_item(tag)
        if element is None:
            return None
        if isinstance(element, RawDataElement):
            if element.VR is not None and element.VR not in TEXT_VRS:
                # e.g. a date sent with VR AT: pydicom would read tags, and reports copy what pydicom reads
                raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND,
                                       f"{keyword_for_tag(element.tag)} is encoded with VR {element.VR}, not as text")
            return element.value or b""
        if isinstance(element, DataElement):
            return element
        raise TypeError("not a data element")  # a sequence item where a value belongs

    def text(self, keyword: str, kind: str) -> str | None:
        """The single value of *keyword* as text ("" when empty, None when absent).

        Raises
        ------
        RejectedInstance
            The value does not decode or has more than one value.
        """
        try:
            value = self._value(_tag(keyword))
            if value is None:
                return None
            if isinstance(value, DataElement):
                multiple = isinstance(value.value, MultiValue)
                text = "" if value.value is None else str(value.value)
            elif not value:
                return ""
            else:
                if kind in _CHARSET_KINDS:
                    text = decode_bytes(value, self.encodings, PN_DELIMS if kind == "PN" else TEXT_VR_DELIMS)
                    text = text.rstrip(" \0")
                else:
                    text = value.decode("ascii").strip(" \0")
                multiple = "\\" in text
        except RejectedInstance:
            raise
        except Exception as exc:  # any decoding failure of untrusted bytes
            raise RejectedInstance(
                StoreStatus.CANNOT_UNDERSTAND, f"{keyword} cannot be decoded ({type(exc).__name__})"
            ) from exc
        if multiple:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} has more than one value")
        return text


def check_copied_attributes(source: Dataset | Header) -> None:
    """Refuse an instance whose patient/study attributes could not be copied into a report.

    Reports file under the source's patient and study, so these values must
    decode with a known character set, be single-valued and fit their VR.
    Reasons name the attribute, never its value.

    Raises
    ------
    RejectedInstance
        With Cannot Understand, naming the attribute.
    """
    header = source if isinstance(source, Header) else Header(source)
    for keyword, limit, kind in _COPIED:
        text = header.text(keyword, kind)
        if not text:
            continue
        if len(text) > limit:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} is longer than its VR allows")
        if kind == "DA" and _parse_da(text) is None:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} is not a valid date")


#: A deflated data set may not inflate beyond this (a deflate bomb is refused before decoding).
MAX_INFLATED_BYTES = 256 * 1024 * 1024


def check_inflated_size(raw: Buffer, limit: int = MAX_INFLATED_BYTES) -> None:
    """Refuse a Deflated Explicit VR Little Endian data set that inflates past *limit*.

    Raises
    ------
    RejectedInstance
        With Out of Resources when the inflated size exceeds the limit.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    chunk: Buffer = raw
    while chunk:
        total += len(inflater.decompress(chunk, 16 * 1024 * 1024))
        if total > limit:
            raise RejectedInstance(StoreStatus.OUT_OF_RESOURCES,
                                   f"deflated data set inflates past {limit // (1024 * 1024)} MiB")
        chunk = inflater.unconsumed_tail


_PIXEL_US = (("SamplesPerPixel", 1), ("Rows", 0), ("Columns", 0), ("BitsAllocated", 16))


def check_pixel_size(values: Mapping[str, int], limit: int) -> None:
    """Refuse an instance whose decoded pixel data would exceed *limit* bytes.

    Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated / 8, from
    the header: a few kilobytes of JPEG-LS can declare gigabytes, which a
    decoder would allocate.

    Raises
    ------
    RejectedInstance
        With Out of Resources, naming the size and the setting.
    """
    size = values["Rows"] * values["Columns"] * values["NumberOfFrames"] * values["SamplesPerPixel"]
    size = (size * values["BitsAllocated"] + 7) // 8
    if size > limit:
        raise RejectedInstance(StoreStatus.OUT_OF_RESOURCES,
                               f"pixel data decodes to {size // (1024 * 1024)} MiB, "
                               f"over storage.max_pixel_bytes ({limit // (1024 * 1024)} MiB)")


def _pixel_values(source: Dataset | Mapping[int, bytes], header: Header | None) -> dict[str, int]:
    """The image size attributes of a data set (absent: 1 frame, 1 sample, 16 bits, 0 rows)."""
    values: dict[str, int] = {}
    try:
        for keyword, default in _PIXEL_US:
            if isinstance(source, Dataset):
                value = source.get(keyword)
                values[keyword] = default if value is None or value == "" else int(value)
            else:
                raw = source.get(_tag(keyword))
                if raw is not None and len(raw) not in (0, 2):
                    raise ValueError("not a single US value")
                values[keyword] = int.from_bytes(raw, "little") if raw else default
        if isinstance(source, Dataset):
            frames = source.get("NumberOfFrames")
            values["NumberOfFrames"] = int(frames) if frames not in (None, "") else 1
        else:
            assert header is not None
            text = header.text("NumberOfFrames", "IS")
            values["NumberOfFrames"] = int(text) if text else 1
    except RejectedInstance:
        raise
    except Exception as exc:  # untrusted bytes
        raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND,
                               f"image size attributes cannot be decoded ({type(exc).__name__})") from exc
    if min(values.values()) < 0:
        raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, "NumberOfFrames is negative")
    return values


def decode_dataset(raw: Buffer, transfer_syntax_uid: str) -> Dataset:
    """The received data set, parsed lazily (values decode on access; pixel data stays encoded).

    A deflated data set is inflated here: call :func:`check_inflated_size` first.
    """
    syntax = UID(transfer_syntax_uid)
    if syntax == DeflatedExplicitVRLittleEndian:
        return read_dataset(BytesIO(zlib.decompress(raw, -zlib.MAX_WBITS)), False, True)
    return read_dataset(BytesIO(raw), syntax.is_implicit_VR, syntax.is_little_endian)


def identify(ds: Dataset, context_sop_class: str) -> InstanceIdentity:
    """Check the identifying attributes of *ds* and return them.

    Parameters
    ----------
    ds : Dataset
        The received dataset (pixel data is not touched).
    context_sop_class : str
        The Affected SOP Class UID of the C-STORE request.

    Raises
    ------
    RejectedInstance
        Not an MR image, UIDs missing or malformed, or a mismatch with the request.
    """
    for element in ds.elements():  # raw elements: nothing is converted here
        vr = getattr(element, "VR", None)
        if vr is not None and vr not in KNOWN_VRS:  # pydicom reads it, but no value of it converts later
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"element {Tag(element.tag)} has an unknown VR")
    return _identify(Header(ds), context_sop_class)


def read_identity(raw: Buffer, transfer_syntax_uid: str, context_sop_class: str,
                  max_pixel_bytes: int | None = None) -> tuple[InstanceIdentity, bool]:
    """:func:`identify` and :func:`is_lossy` of an encoded data set, read in one pass when possible.

    Little-endian data sets are scanned by :func:`~dicom_node.ingest.header.scan_elements`;
    any other, or one the scan does not accept, is read by pydicom.  A
    deflated data set must have passed :func:`check_inflated_size`.

    Raises
    ------
    RejectedInstance
        As :func:`identify`; Cannot Understand for a truncated data set (an
        element, item or sequence whose length runs past its end), which
        pydicom would read without a word; Out of Resources when the pixel data
        would decode to more than *max_pixel_bytes* (:func:`check_pixel_size`).
    """
    syntax = UID(transfer_syntax_uid)
    values = None
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            inflated = zlib.decompress(raw, -zlib.MAX_WBITS)
            values = scan_elements(inflated, True, _SCANNED)
            if values is None:
                check_extent(inflated, True)
        elif syntax.is_little_endian:
            values = scan_elements(raw, not syntax.is_implicit_VR, _SCANNED)
            if values is None:
                check_extent(raw, not syntax.is_implicit_VR)
        else:
            check_extent(raw, not syntax.is_implicit_VR, little_endian=False)
    except TruncatedDataSetError as exc:
        raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"truncated data set: {exc}") from exc
    if values is None:
        ds = decode_dataset(raw, transfer_syntax_uid)
        ident = identify(ds, context_sop_class)
        if max_pixel_bytes is not None:
            check_pixel_size(_pixel_values(ds, None), max_pixel_bytes)
        return ident, is_lossy(ds, transfer_syntax_uid)
    header = Header(values)
    lossy = transfer_syntax_uid in _ALWAYS_LOSSY or header.text("LossyImageCompression", "CS") == "01"
    ident = _identify(header, context_sop_class)
    if max_pixel_bytes is not None:
        check_pixel_size(_pixel_values(values, header), max_pixel_bytes)
    return ident, lossy


def _identify(header: Header, context_sop_class: str) -> InstanceIdentity:
    sop_class = check_uid(header.text("SOPClassUID", "UI"), "SOPClassUID")
    if sop_class != context_sop_class:
        raise RejectedInstance(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPClassUID of the dataset differs from the C-STORE request",
        )
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise RejectedInstance(
            StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED,
            f"SOP class {sop_class} is not MR Image Storage or Enhanced MR Image Storage",
        )
    modality = header.text("Modality", "CS") or ""
    if modality != "MR":
        raise RejectedInstance(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Modality is {modality!r}, not 'MR'")
    check_copied_attributes(header)
    number = header.text("SeriesNumber", "IS")
    description = header.text("SeriesDescription", "LO")
    return InstanceIdentity(
        sop_class_uid=sop_class,
        sop_instance_uid=check_uid(header.text("SOPInstanceUID", "UI"), "SOPInstanceUID"),
        series_instance_uid=check_uid(header.text("SeriesInstanceUID", "UI"), "SeriesInstanceUID"),
        study_instance_uid=check_uid(header.text("StudyInstanceUID", "UI"), "StudyInstanceUID"),
        modality=modality,
        series_number=int(number) if number else None,
        series_description=description[:64] if description else None,
        patient_id=(header.text("PatientID", "LO") or "")[:64] or None,
        issuer_of_patient_id=(header.text("IssuerOfPatientID", "LO") or "")[:64] or None,
        accession_number=(header.text("AccessionNumber", "SH") or "")[:64] or None,
        study_date=_parse_da(header.text("StudyDate", "DA")),
    )


def is_lossy(ds: Dataset, transfer_syntax_uid: str) -> bool:
    """True when the instance is (or once was) lossy compressed.

    A lossy-only transfer syntax, or ``LossyImageCompression == "01"`` (which
    the standard requires once any lossy compression was applied, including in
    JPEG 2000 and HTJ2K, which may be either).
    """
    return transfer_syntax_uid in _ALWAYS_LOSSY or str(ds.get("LossyImageCompression", "") or "").strip() == "01"


#: Transfer syntaxes always negotiated: uncompressed, deflated and the lossless compressed ones.
LOSSLESS_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless, HTJ2KLossless,
    HTJ2KLosslessRPCL,
)


#: Negotiated only with ``storage.accept_lossy`` (JPEG 2000 and HTJ2K "either" syntaxes included).
LOSSY_TRANSFER_SYNTAXES: tuple[str, ...] = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K)


def transfer_syntaxes(accept_lossy: bool) -> list[str]:
    """The transfer syntaxes the Storage SCP accepts, preferred first."""
    return list(LOSSLESS_TRANSFER_SYNTAXES) + (list(LOSSY_TRANSFER_SYNTAXES) if accept_lossy else [])

