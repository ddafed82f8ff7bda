"""Accepting one received instance: check it, spool it, record it.

This is the work behind the C-STORE handler.  It never decodes pixel data: the
encoded dataset is written to the spool as it arrived, fsynced, and recorded in
the database before the handler answers Success.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

from pydicom import Dataset
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Instance, Rejection, Series, SeriesState, Study
from dicom_node.statuses import StoreStatus
from pipeline.errors import InvalidInstanceError

logger = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = frozenset({MRImageStorage, EnhancedMRImageStorage})
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(timezone.utc)


class RejectedInstance(InvalidInstanceError):
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
    """The spool directory: ``<study uid>/<series uid>/<sop uid>.dcm``."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, ident: InstanceIdentity) -> Path:
        """The file of an instance; UIDs were checked, so they are safe names."""
        path = (self.root / ident.study_instance_uid / ident.series_instance_uid / f"{ident.sop_instance_uid}.dcm")
        if self.root not in path.resolve().parents:
            raise RejectedInstance(StoreStatus.CANNOT_UNDERSTAND, "instance path escapes the spool")
        return path

    def write(self, path: Path, data: bytes) -> None:
        """Write *data* atomically (temporary file, fsync, rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{threading.get_ident()}.part")
        with open(tmp, "wb") as fh:
            fh.write(data)
            if self.fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)


@dataclass(frozen=True)
class Peer:
    """Who sent an instance."""

    calling_ae_title: str
    address: str


class Recorder:
    """Records received and rejected instances in the database."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        # One writer at a time keeps study/series upserts race-free in one process.
        self._lock = threading.Lock()

    def record_instance(self, ident: InstanceIdentity, peer: Peer, path: Path, data: bytes, ts_uid: str) -> bool:
        """Record a spooled instance; returns False for an identical re-send."""
        digest = hashlib.sha256(data).hexdigest()
        now = utcnow()
        with self._lock, self.sessions.begin() as session:
            existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == ident.sop_instance_uid))
            if existing is not None and existing.sha256 == digest:
                return False
            study = session.scalar(select(Study).where(Study.study_instance_uid == ident.study_instance_uid))
            if study is None:
                study = Study(
                    study_instance_uid=ident.study_instance_uid,
                    patient_id=ident.patient_id,
                    issuer_of_patient_id=ident.issuer_of_patient_id,
                    accession_number=ident.accession_number,
                    study_date=ident.study_date,
                    first_received_at=now,
                    last_received_at=now,
                )
                session.add(study)
            study.last_received_at = now
            study.needs_run = True
            series = session.scalar(select(Series).where(Series.series_instance_uid == ident.series_instance_uid))
            if series is None:
                series = Series(
                    series_instance_uid=ident.series_instance_uid,
                    study=study,
                    modality=ident.modality,
                    series_number=ident.series_number,
                    series_description=ident.series_description,
                    first_received_at=now,
                    last_received_at=now,
                    instance_count=0,
                )
                session.add(series)
            series.last_received_at = now
            series.state = SeriesState.RECEIVING.value
            series.completed_at = None
            if existing is None:
                series.instance_count += 1
                existing = Instance(sop_instance_uid=ident.sop_instance_uid, series=series)
                session.add(existing)
            existing.sop_class_uid = ident.sop_class_uid
            existing.transfer_syntax_uid = ts_uid
            existing.calling_ae_title = peer.calling_ae_title
            existing.peer_address = peer.address
            existing.spool_path = str(path)
            existing.size_bytes = len(data)
            existing.sha256 = digest
            existing.received_at = now
        return True

    def record_rejection(
        self, peer: Peer, status: int, reason: str, sop_class_uid: str | None, sop_instance_uid: str | None
    ) -> None:
        """Record a refused instance and the reason given."""
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
