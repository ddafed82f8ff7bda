"""The objects a run writes: SR and PDF, their UIDs, key slices and the validation gate.

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
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.db.models import Run
from dicom_node.settings import Settings
from pipeline.errors import NodeError
from structured_reports.pdf import build_pdf
from structured_reports.sr import build_sr
from structured_reports.types import KeySlice, ReportError, ReportInput
from structured_reports.uids import UidKind, derive_uid
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

#: Key slices of the PDF: (axis of the DHW volume, MNI coordinate in mm, caption).
KEY_SLICE_PLANES: tuple[tuple[int, float, str], ...] = (
    (0, 8.0, "Axial, z = 8 mm (MNI)"),
    (1, -22.0, "Coronal, y = -22 mm (hippocampi)"),
    (2, -28.0, "Sagittal, x = -28 mm (left hippocampus)"),
)

_UID_KINDS: dict[str, tuple[UidKind, UidKind]] = {
    "sr": (UidKind.SR_SERIES, UidKind.SR_INSTANCE),
    "pdf": (UidKind.PDF_SERIES, UidKind.PDF_INSTANCE),
}


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


def run_identity(study_uid: str, chosen: str | None, input_hash: str, weights_sha256: str, *,
                 outcome: str | None = None, notes: Sequence[Any] = ()) -> tuple[str, ...]:
    """The parts every UID of a run is derived from.

    Parameters
    ----------
    study_uid, chosen, input_hash, weights_sha256 : str
        Study, analysed series (None: none selected), hash of the input and of the model weights.
    outcome : str or None, optional
        Outcome of a run that was not analysed: a refusal and a result on the same input must
        never share a UID.
    notes : Sequence, optional
        The notes used (``runs.notes_used``: ids and dates): other notes, other result.

    Returns
    -------
    tuple[str, ...]
        The identity (without the object kind).
    """
    identity = [study_uid, chosen or "no series selected", input_hash, weights_sha256]
    if outcome is not None:
        identity.append(f"not-analysed:{outcome}")
    if notes:
        identity.append("notes:" + hashlib.sha256(json.dumps(list(notes), sort_keys=True).encode()).hexdigest())
    return tuple(identity)


def object_uids(identity: Sequence[str], kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of one object kind of a run."""
    series_kind, instance_kind = _UID_KINDS[kind]
    return str(derive_uid(*identity, series_kind)), str(derive_uid(*identity, instance_kind))


def _template_dhw(template_path: Path) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """The template in the (D, H, W) = reversed-LPS order of :mod:`pipeline.preprocess`, and its
    voxel-to-RAS affine in that order."""
    image = nib.as_closest_canonical(nib.load(str(template_path)))
    ras = np.asarray(image.dataobj, dtype=np.float32)  # axes x (L->R), y (P->A), z (I->S)
    dhw = np.ascontiguousarray(ras.transpose(2, 1, 0)[:, ::-1, ::-1])
    nx, ny, _ = ras.shape
    # (d, h, w) -> (i, j, k) = (nx-1-w, ny-1-h, d), then the canonical affine.
    to_ijk = np.array([[0, 0, -1, nx - 1], [0, -1, 0, ny - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return dhw, np.asarray(image.affine, dtype=np.float64) @ to_ijk


def key_slices(registered: NDArray[np.float32], template_path: Path) -> list[KeySlice]:
    """Axial, coronal and sagittal slices of the registered brain with the template's outline.

    Parameters
    ----------
    registered : numpy.ndarray
        :attr:`pipeline.preprocess.Preprocessed.registered`: the subject on the template grid,
        (D, H, W) in reversed LPS order.
    template_path : Path
        The template it was registered to (brain-extracted: its non-zero voxels are the brain).

    Returns
    -------
    list[KeySlice]
        Slices oriented the radiological way (superior/anterior up, patient's right on the left),
        intensities scaled to [0, 1], each with the template brain as outline.

    Raises
    ------
    NodeError
        If the registered volume is not on the template grid.
    """
    template, affine = _template_dhw(template_path)
    if registered.shape != template.shape:
        raise NodeError(f"registered volume {registered.shape} is not on the template grid {template.shape}")
    brain = template > 0
    inside = registered[brain]
    top = float(np.percentile(inside, 99.5)) if inside.size else float(registered.max())
    scaled = np.clip(registered / top, 0.0, 1.0) if top > 0 else np.zeros_like(registered)
    ras_to_dhw = np.linalg.inv(affine)
    slices = []
    for axis, mm, title in KEY_SLICE_PLANES:
        point = np.zeros(4)
        point[3] = 1.0
        point[{0: 2, 1: 1, 2: 0}[axis]] = mm  # DHW axis 0 is z, 1 is y, 2 is x
        index = round(float((ras_to_dhw @ point)[axis]))
        index = min(max(index, 0), registered.shape[axis] - 1)
        image = np.take(scaled, index, axis=axis)
        outline = np.take(brain, index, axis=axis)
        if axis != 0:  # coronal/sagittal: D grows superior, show superior at the top
            image, outline = image[::-1], outline[::-1]
        slices.append(KeySlice(image=np.ascontiguousarray(image, dtype=np.float32),
                               outline=np.ascontiguousarray(outline), title=title))
    return slices


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
