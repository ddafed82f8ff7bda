"""Accepting one received instance: check it, spool it, record it.

This is the work behind the C-STORE handler.  It never decodes pixel data: the
encoded dataset is written to the spool as it arrived (fsynced when
``storage.fsync``) and recorded in the database before the handler answers
Success.  The recorder uses SQLAlchemy Core with cached study/series ids, so an
instance costs one lookup and three small statements in one transaction.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import threading
import zlib
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path

from pydicom import Dataset
from pydicom.charset import python_encoding
from pydicom.multival import MultiValue
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
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
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from sqlalchemy import Connection, Engine, bindparam, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Instance, Rejection, Series, SeriesState, Study
from dicom_node.settings import Settings
from dicom_node.statuses import StoreStatus
from pipeline.errors import ConfigError, InvalidInstanceError

logger = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage})
#: Transfer syntaxes always negotiated: uncompressed, deflated and the lossless compressed ones.
LOSSLESS_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless, HTJ2KLossless,
    HTJ2KLosslessRPCL,
)
#: Negotiated only with ``storage.accept_lossy`` (JPEG 2000 and HTJ2K "either" syntaxes included).
LOSSY_TRANSFER_SYNTAXES: tuple[str, ...] = (JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, HTJ2K)
_ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless})
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(UTC)


def transfer_syntaxes(accept_lossy: bool) -> list[str]:
    """The transfer syntaxes the Storage SCP accepts, preferred first."""
    return list(LOSSLESS_TRANSFER_SYNTAXES) + (list(LOSSY_TRANSFER_SYNTAXES) if accept_lossy else [])


def is_lossy(ds: Dataset, transfer_syntax_uid: str) -> bool:
    """True when the instance is (or once was) lossy compressed.

    A lossy-only transfer syntax, or ``LossyImageCompression == "01"`` (which
    the standard requires once any lossy compression was applied, including in
    JPEG 2000 and HTJ2K, which may be either).
    """
    return transfer_syntax_uid in _ALWAYS_LOSSY or str(ds.get("LossyImageCompression", "") or "").strip() == "01"


def _meta_element(tag_element: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB") else b" "
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, tag_element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_element, vr, len(value)) + value


def part10_bytes(dataset: bytes, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
                 source_ae_title: str) -> bytes:
    """The DICOM file of an encoded dataset: preamble, ``DICM``, File Meta Information, dataset.

    Equivalent to pynetdicom's ``event.encoded_dataset()`` but without building
    a pydicom Dataset for the file meta (this is on the C-STORE hot path).
    The dataset bytes are written as received, in their transfer syntax.
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class_uid.encode("ascii")),
        _meta_element(0x0003, b"UI", sop_instance_uid.encode("ascii")),
        _meta_element(0x0010, b"UI", transfer_syntax_uid.encode("ascii")),
        _meta_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii")),
        _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
        _meta_element(0x0016, b"AE", source_ae_title.encode("ascii", "replace")[:16]),
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"".join((b"\x00" * 128, b"DICM", group_length, body, dataset))


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


def check_copied_attributes(ds: Dataset) -> None:
    """Refuse an instance whose patient/study attributes could not be copied into a report.

    Reports file under the source's patient and study, so these values must
    decode with a known character set, be single-valued and fit their VR.
    Reasons name the attribute, never its value.

    Raises
    ------
    RejectedInstance
        With Cannot Understand, naming the attribute.
    """
    charsets = ds.get("SpecificCharacterSet")
    values = [] if charsets is None else (list(charsets) if isinstance(charsets, MultiValue) else [charsets])
    for value in values:
        if str(value).strip() and str(value).strip() not in python_encoding:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, "SpecificCharacterSet names an unknown character set")
    for keyword, limit, kind in _COPIED:
        try:
            value = ds.get(keyword)
        except Exception as exc:  # any decoding failure of untrusted bytes
            raise RejectedInstance(
                StoreStatus.CANNOT_UNDERSTAND, f"{keyword} cannot be decoded ({type(exc).__name__})"
            ) from exc
        if value is None or value == "":
            continue
        if isinstance(value, MultiValue):
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} has more than one value")
        text = str(value)
        if len(text) > limit:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} is longer than its VR allows")
        if kind == "DA" and _parse_da(text) is None:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, f"{keyword} is not a valid date")


#: A deflated data set may not inflate beyond this (a deflate bomb is refused before decoding).
MAX_INFLATED_BYTES = 256 * 1024 * 1024


def check_inflated_size(raw: bytes, limit: int = MAX_INFLATED_BYTES) -> None:
    """Refuse a Deflated Explicit VR Little Endian data set that inflates past *limit*.

    Raises
    ------
    RejectedInstance
        With Out of Resources when the inflated size exceeds the limit.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    chunk = raw
    while chunk:
        total += len(inflater.decompress(chunk, 16 * 1024 * 1024))
        if total > limit:
            raise RejectedInstance(StoreStatus.OUT_OF_RESOURCES,
                                   f"deflated data set inflates past {limit // (1024 * 1024)} MiB")
        chunk = inflater.unconsumed_tail


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
    sop_class = check_uid(ds.get("SOPClassUID"), "SOPClassUID")
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
    modality = str(ds.get("Modality", "") or "")
    if modality != "MR":
        raise RejectedInstance(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Modality is {modality!r}, not 'MR'")
    check_copied_attributes(ds)
    number = ds.get("SeriesNumber")
    description = ds.get("SeriesDescription")
    return InstanceIdentity(
        sop_class_uid=sop_class,
        sop_instance_uid=check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
        series_instance_uid=check_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        study_instance_uid=check_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID"),
        modality=modality,
        series_number=int(number) if number not in (None, "") else None,
        series_description=str(description)[:64] if description else None,
        patient_id=str(ds.get("PatientID", "") or "")[:64] or None,
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or "")[:64] or None,
        accession_number=str(ds.get("AccessionNumber", "") or "")[:64] or None,
        study_date=_parse_da(ds.get("StudyDate")),
    )


class Spool:
    """The spool directory: ``<study uid>/<series uid>/<sop uid>.dcm``.

    Parameters
    ----------
    root : Path
        The spool directory (created).
    fsync : bool
        Flush each file to disk before it is recorded (``storage.fsync``).
    quarantine : Path, optional
        Where instances of aborted associations are moved (same layout).
    """

    def __init__(self, root: Path, *, fsync: bool = True, quarantine: Path | None = None) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.quarantine = (quarantine or self.root.parent / "quarantine").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._dirs: set[Path] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> Spool:
        """The spool of ``storage.spool_dir`` with ``storage.fsync`` and ``storage.quarantine_dir``."""
        return cls(settings.spool_dir, fsync=settings.storage.fsync, quarantine=settings.quarantine_dir)

    def path_for(self, ident: InstanceIdentity) -> Path:
        """The file of an instance; UIDs were checked, so they are safe names."""
        path = self.root / ident.study_instance_uid / ident.series_instance_uid / f"{ident.sop_instance_uid}.dcm"
        if self.root not in path.resolve().parents:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, "instance path escapes the spool")
        return path

    def free_bytes(self) -> int:
        """Free space on the spool's file system."""
        return int(shutil.disk_usage(self.root).free)

    def write(self, path: Path, data: bytes) -> None:
        """Write *data* atomically (temporary file, fsync when configured, rename)."""
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(parent)
        tmp = parent / f".{path.name}.{threading.get_ident()}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def quarantine_path(self, spooled: Path) -> Path:
        """Where a spooled file goes when its association was aborted."""
        try:
            relative = spooled.resolve().relative_to(self.root)
        except ValueError:
            relative = Path(spooled.name)
        return self.quarantine / relative


@dataclass(frozen=True)
class Peer:
    """Who sent an instance."""

    calling_ae_title: str
    address: str


@dataclass(frozen=True)
class Prior:
    """What the database holds for a SOP Instance UID already received."""

    sha256: str
    quarantined: bool


class Duplicate(StrEnum):
    """What to do with a received instance given the duplicate policy."""

    NEW = "new"            # never seen, or only in quarantine
    IGNORE = "ignore"      # identical re-send: acknowledged, nothing written
    REPLACE = "replace"    # overwrite the stored instance
    REJECT = "reject"      # refused with Duplicate SOP Instance


def duplicate_decision(policy: str, prior: Prior | None, digest: str) -> Duplicate:
    """Apply ``storage.duplicate_policy`` to a received instance.

    ``ignore_identical``: an identical re-send (same SHA-256) is acknowledged and
    ignored; changed content replaces the stored instance.  ``replace``: every
    re-send overwrites.  ``reject``: every re-send is refused (0x0111).
    An instance held only in quarantine is always accepted as new.
    """
    if prior is None or prior.quarantined:
        return Duplicate.NEW
    if policy == "reject":
        return Duplicate.REJECT
    if policy == "ignore_identical" and prior.sha256 == digest:
        return Duplicate.IGNORE
    return Duplicate.REPLACE


class Recorder:
    """Records received and rejected instances in the database.

    The per-instance statements are built once and run on a plain Core
    connection (no ORM unit of work): one lookup before the write, one
    transaction of three statements after it.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            raise ConfigError("Recorder needs a sessionmaker bound to an Engine")
        self.engine: Engine = bind
        # One writer at a time keeps study/series upserts race-free in one process.
        self._lock = threading.Lock()
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        self._q_prior = select(Instance.sha256, Instance.quarantined).where(
            Instance.sop_instance_uid == bindparam("uid"))
        self._q_instance = select(Instance.id, Instance.quarantined).where(
            Instance.sop_instance_uid == bindparam("uid"))
        self._q_study = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
        self._q_series = select(Series.id).where(Series.series_instance_uid == bindparam("uid"))
        self._ins_instance = insert(Instance)
        self._upd_instance = update(Instance).where(Instance.id == bindparam("row_id"))
        self._upd_series = update(Series).where(Series.id == bindparam("series_id")).values(
            last_received_at=bindparam("now"), state=SeriesState.RECEIVING.value, completed_at=None,
            instance_count=Series.instance_count + bindparam("added"))
        self._upd_study = update(Study).where(Study.id == bindparam("study_id")).values(
            last_received_at=bindparam("now"), needs_run=True)
        self._upd_study_ae = update(Study).where(Study.id == bindparam("study_id")).values(
            last_received_at=bindparam("now"), needs_run=True, called_ae_title=bindparam("called"))

    def prior(self, sop_instance_uid: str) -> Prior | None:
        """The stored digest and quarantine flag of *sop_instance_uid*, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(self._q_prior, {"uid": sop_instance_uid}).first()
        return None if row is None else Prior(row[0], bool(row[1]))

    def _study_id(self, conn: Connection, ident: InstanceIdentity, now: datetime) -> int:
        cached = self._study_ids.get(ident.study_instance_uid)
        if cached is not None:
            return cached
        found = conn.scalar(self._q_study, {"uid": ident.study_instance_uid})
        if found is None:
            found = conn.scalar(insert(Study).values(
                study_instance_uid=ident.study_instance_uid, patient_id=ident.patient_id,
                issuer_of_patient_id=ident.issuer_of_patient_id, accession_number=ident.accession_number,
                study_date=ident.study_date, first_received_at=now, last_received_at=now, needs_run=False,
            ).returning(Study.id))
        return int(found)  # type: ignore[arg-type]

    def _series_id(self, conn: Connection, ident: InstanceIdentity, study_id: int, now: datetime) -> int:
        cached = self._series_ids.get(ident.series_instance_uid)
        if cached is not None:
            return cached
        found = conn.scalar(self._q_series, {"uid": ident.series_instance_uid})
        if found is None:
            found = conn.scalar(insert(Series).values(
                series_instance_uid=ident.series_instance_uid, study_id=study_id, modality=ident.modality,
                series_number=ident.series_number, series_description=ident.series_description,
                state=SeriesState.RECEIVING.value, first_received_at=now, last_received_at=now, instance_count=0,
            ).returning(Series.id))
        return int(found)  # type: ignore[arg-type]

    def record_instance(
        self, ident: InstanceIdentity, peer: Peer, path: Path, size: int, digest: str, ts_uid: str, *,
        changed: bool = True, association_id: int | None = None, called_ae_title: str | None = None,
        lossy: bool = False,
    ) -> None:
        """Record a spooled instance (insert, or update a replaced/quarantined one).

        Parameters
        ----------
        ident, peer : InstanceIdentity, Peer
            What was received and from whom.
        path, size, digest, ts_uid : Path, int, str, str
            The spooled file, its size, SHA-256 and transfer syntax.
        changed : bool
            False when the content is identical to what is stored (a ``replace``
            of the same bytes): the row is refreshed but the series is not
            re-opened and the study gets no new run.
        association_id : int, optional
            The association log row (for quarantine on abort).
        called_ae_title : str, optional
            Our AE title the sender called (picks the study's profile).
        lossy : bool
            The instance is lossy compressed.
        """
        now = utcnow()
        values = dict(
            sop_class_uid=ident.sop_class_uid, transfer_syntax_uid=ts_uid, calling_ae_title=peer.calling_ae_title[:16],
            peer_address=peer.address[:64], spool_path=str(path), size_bytes=size, sha256=digest, received_at=now,
            association_id=association_id, quarantined=False, lossy=lossy,
        )
        with self._lock, self.engine.begin() as conn:
            study_id = self._study_id(conn, ident, now)
            series_id = self._series_id(conn, ident, study_id, now)
            row = conn.execute(self._q_instance, {"uid": ident.sop_instance_uid}).first()
            if row is None:
                conn.execute(self._ins_instance, {"sop_instance_uid": ident.sop_instance_uid,
                                                  "series_id": series_id, **values})
                added, changed = 1, True
            else:
                conn.execute(self._upd_instance, {"row_id": row[0], "series_id": series_id, **values})
                added = 1 if row[1] else 0
                changed = changed or bool(row[1])
            if changed:
                conn.execute(self._upd_series, {"series_id": series_id, "now": now, "added": added})
                if called_ae_title:
                    conn.execute(self._upd_study_ae, {"study_id": study_id, "now": now,
                                                      "called": called_ae_title[:16]})
                else:
                    conn.execute(self._upd_study, {"study_id": study_id, "now": now})
        if len(self._series_ids) > 10_000:
            self._series_ids.clear()
            self._study_ids.clear()
        self._study_ids[ident.study_instance_uid] = study_id
        self._series_ids[ident.series_instance_uid] = series_id

    def record_rejection(
        self, peer: Peer, status: int, reason: str, sop_class_uid: str | None, sop_instance_uid: str | None
    ) -> None:
        """Record a refused instance or association and the reason given."""
        with self.sessions.begin() as session:
            session.add(
                Rejection(
                    received_at=utcnow(),
                    calling_ae_title=peer.calling_ae_title[:16],
                    peer_address=peer.address[:64],
                    sop_class_uid=(sop_class_uid or None) and sop_class_uid[:64],
                    sop_instance_uid=(sop_instance_uid or None) and sop_instance_uid[:64],
                    status=int(status),
                    reason=reason,
                )
            )
