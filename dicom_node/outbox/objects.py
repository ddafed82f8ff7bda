"""The objects a run writes: SR and PDF (UIDs from :mod:`structured_reports.uids`) and the validation gate.

Called by :mod:`dicom_node.runs.processing` at the end of every run.  The rules:

- Every UID is derived from the run's identity (study, analysed series, input
  hash, model weights hash, plus the outcome of a "not analysed" run and the
  notes used), so a replay writes the same objects again.  When an earlier run
  already wrote an object with the same SOP Instance UID, its file is re-sent
  byte for byte instead of a rebuilt one (same UID must mean same content).
- A run that supersedes an earlier one (``runs.supersedes_run_id``) references
  the earlier SR in its PredecessorDocumentsSequence.
- Every object passes ``dciodvfy`` (and ``dsrdump`` for the SR) before it is
  written to the outbox; an invalid object is kept as ``<kind>.dcm.invalid``
  for the administrators and never queued.
"""

from __future__ import annotations

import datetime
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.db.models import Run
from dicom_node.settings import Settings
from structured_reports.pdf import build_pdf
from structured_reports.sr import build_sr
from structured_reports.types import KeySlice, ReportError, ReportInput
from structured_reports.uids import object_uids
from structured_reports.validate import ValidatorUnavailableError, validate_dataset, validate_file

logger = logging.getLogger(__name__)


ObjectKind = Literal["sr", "pdf"]


#: Series Numbers of the node's series (fixed, never random).
SR_SERIES_NUMBER = 9001


PDF_SERIES_NUMBER = 9002


#: File names in ``<outbox>/<run id>/``.
OBJECT_FILES: dict[str, str] = {"sr": "sr.dcm", "pdf": "pdf.dcm"}


#: Suffix of objects that failed validation (kept for inspection, never sent).
INVALID_SUFFIX = ".invalid"


@dataclass(frozen=True)
class WrittenObject:
    """One object of a run and what the validation gate said about it.

    Attributes
    ----------
    kind : {"sr", "pdf"}
        Which object.
    sop_instance_uid : str
        Its SOP Instance UID.
    path : Path or None
        The outbox file; None when the object failed validation (not sent).
    errors, warnings : list[str]
        The validators' messages.
    reused : bool
        True when the file is an earlier run's identical object.
    """

    kind: str
    sop_instance_uid: str
    path: Path | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reused: bool = False

    @property
    def ok(self) -> bool:
        """True when the object passed validation and is in the outbox."""
        return self.path is not None

    def record(self) -> dict[str, Any]:
        """The JSON entry of ``runs.validation_messages``."""
        return {"object": self.kind, "sop_instance_uid": self.sop_instance_uid, "ok": self.ok,
                "reused": self.reused, "errors": self.errors, "warnings": self.warnings}


def read_predecessor(settings: Settings, session: Session, run_id: str) -> pydicom.Dataset | None:
    """The SR of the run this run supersedes, read from that run's outbox; None if there is none."""
    run = session.get(Run, run_id)
    if run is None or run.supersedes_run_id is None:
        return None
    path = settings.outbox_dir / run.supersedes_run_id / OBJECT_FILES["sr"]
    if not path.is_file():
        logger.warning("run %s supersedes run %s, whose SR %s is missing", run_id, run.supersedes_run_id, path)
        return None
    return pydicom.dcmread(path)


def _earlier_file(settings: Settings, session: Session, run_id: str, kind: str, sop_uid: str) -> Path | None:
    """The outbox file of an earlier run that wrote the same object (a replay), if any."""
    column = Run.report_sop_instance_uid if kind == "sr" else Run.pdf_sop_instance_uid
    for earlier in session.scalars(select(Run.id).where(column == sop_uid, Run.id != run_id)).all():
        path = settings.outbox_dir / earlier / OBJECT_FILES[kind]
        if path.is_file():
            return path
    return None


def _gate(kind: str, ds: pydicom.Dataset | None, source: Path | None, target: Path, sop_uid: str,
          reused: bool) -> WrittenObject:
    """Validate and write one object (a dataset, or an earlier file to copy) to ``target``."""
    errors: list[str] = ["nothing to validate"]
    warnings: list[str] = []
    try:
        if ds is not None:
            result = validate_dataset(ds, target.parent)
        elif source is not None:
            result = validate_file(source, is_sr=kind == "sr")
        else:
            result = None
    except ValidatorUnavailableError as exc:
        errors = [f"validator unavailable: {exc}"]
    else:
        if result is not None:
            errors, warnings = list(result.errors), list(result.warnings)
    if errors:
        invalid = target.with_name(target.name + INVALID_SUFFIX)
        if ds is not None:
            ds.save_as(invalid, enforce_file_format=True)
        logger.error("%s %s failed validation (%d errors); not queued", kind, sop_uid, len(errors))
        return WrittenObject(kind, sop_uid, None, errors, warnings, reused)
    if ds is not None:
        ds.save_as(target, enforce_file_format=True)
    elif source is not None:
        shutil.copyfile(source, target)
    return WrittenObject(kind, sop_uid, target, errors, warnings, reused)


def write_objects(
    settings: Settings,
    session: Session,
    run_id: str,
    sources: Sequence[pydicom.Dataset],
    report: ReportInput,
    identity: Sequence[str],
    *,
    instance_number: int,
    content_datetime: datetime.datetime,
    slices: Sequence[KeySlice] = (),
    kinds: Sequence[str] = ("sr", "pdf"),
) -> list[WrittenObject]:
    """Build, validate and write the run's objects to ``<outbox>/<run id>/``.

    Parameters
    ----------
    settings : Settings
        For the outbox directory.
    session : Session
        To find the predecessor and earlier identical objects.
    run_id : str
        The run.
    sources : Sequence[pydicom.Dataset]
        Headers of the analysed series (or of everything received when none was selected).
    report : ReportInput
        Result and provenance.
    identity : Sequence[str]
        :func:`run_identity` of the run.
    instance_number : int
        Instance Number of the objects.
    content_datetime : datetime.datetime
        Content Date/Time of the objects (the run's creation time).
    slices : Sequence[KeySlice], optional
        Key slices for the PDF.
    kinds : Sequence[str], optional
        Which objects to write.

    Returns
    -------
    list[WrittenObject]
        One entry per kind, valid or not.
    """
    outbox = settings.outbox_dir / run_id
    outbox.mkdir(parents=True, exist_ok=True)
    predecessor = read_predecessor(settings, session, run_id)
    sr_uid = object_uids(identity, "sr")[1]
    if predecessor is not None and str(predecessor.SOPInstanceUID) == sr_uid:
        predecessor = None  # the same object again: a replay, not a supersession
    written = []
    for kind in kinds:
        series_uid, sop_uid = object_uids(identity, kind)
        target = outbox / OBJECT_FILES[kind]
        earlier = _earlier_file(settings, session, run_id, kind, sop_uid)
        if earlier is not None:
            logger.info("run %s: %s %s was written before; re-sending the same file", run_id, kind, sop_uid)
            written.append(_gate(kind, None, earlier, target, sop_uid, reused=True))
            continue
        common: dict[str, Any] = {"series_instance_uid": series_uid, "sop_instance_uid": sop_uid,
                                  "instance_number": instance_number, "predecessor": predecessor,
                                  "content_datetime": content_datetime}
        ds: pydicom.Dataset
        try:
            if kind == "sr":
                ds = build_sr(sources, report, series_number=SR_SERIES_NUMBER, **common)
            else:
                ds = build_pdf(sources, report, series_number=PDF_SERIES_NUMBER, key_slices=slices, **common)
        except ReportError as exc:
            logger.error("run %s: %s %s could not be built; not queued", run_id, kind, sop_uid)
            written.append(WrittenObject(kind, sop_uid, None, [f"not built: {exc}"]))
            continue
        written.append(_gate(kind, ds, None, target, sop_uid, reused=False))
    return written

