"""One run: from the spooled study to a validated report in the outbox.

``process_run(run_id, ctx)`` is the whole processing of a run, so the local
worker pool and any other executor call the same code.  Every stage time is
recorded; every refusal becomes a "not analysed" report with its reason.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import ClinicalNote as NoteRow
from dicom_node.db.models import Delivery, DeliveryState, Instance, Run, RunState, Series, Study
from dicom_node.ingest import utcnow
from dicom_node.settings import Settings
from model.inference import Predictor
from model.types import Prediction
from pipeline.convert import convert_series
from pipeline.errors import NodeError, NotAnalysed, Outcome
from pipeline.notes import ClinicalNote, choose_notes, format_note_text
from pipeline.preprocess import PreprocessConfig, preprocess
from pipeline.select import SelectionRules, SeriesCandidate, select_series
from structured_reports.sr import build_sr
from structured_reports.types import DeviceInfo, NotesUsed, ReportInput
from structured_reports.uids import UidKind, derive_uid
from structured_reports.validate import validate_dataset

logger = logging.getLogger(__name__)

PREPROCESSING_VERSION = "1.0"
SR_SERIES_NUMBER = 9001


@dataclass
class RunContext:
    """What a run needs, built once at start-up by the composition root."""

    settings: Settings
    sessions: sessionmaker[Session]
    predictor: Predictor
    rules: SelectionRules
    preprocess_config: PreprocessConfig
    software_version: str = "0.1.0"


@dataclass
class _Progress:
    """Stage timings and intermediate facts of one run."""

    seconds: dict[str, float] = field(default_factory=dict)
    stamps: dict[str, Any] = field(default_factory=dict)


@contextmanager
def _stage(progress: _Progress, name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    progress.seconds[name] = round(time.perf_counter() - start, 3)
    progress.stamps[f"{name}_at"] = utcnow()


def _update(sessions: sessionmaker[Session], run_id: str, **values: Any) -> None:
    with sessions.begin() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise NodeError(f"run {run_id} disappeared")
        for key, value in values.items():
            setattr(run, key, value)


def _study_headers(session: Session, study_id: int) -> dict[str, list[tuple[Path, Dataset]]]:
    """Headers (no pixels) of every spooled instance of a study, by series UID."""
    rows = session.execute(
        select(Series.series_instance_uid, Instance.spool_path)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .order_by(Series.series_number, Instance.id)
    ).all()
    by_series: dict[str, list[tuple[Path, Dataset]]] = {}
    for series_uid, spool_path in rows:
        path = Path(spool_path)
        by_series.setdefault(series_uid, []).append((path, dcmread(path, stop_before_pixels=True)))
    return by_series


def _input_hash(session: Session, series_uid: str) -> str:
    digests = session.scalars(
        select(Instance.sha256).join(Series).where(Series.series_instance_uid == series_uid).order_by(Instance.sop_instance_uid)
    ).all()
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _notes_for(session: Session, study: Study, window_days: int) -> list[ClinicalNote]:
    if not study.patient_id:
        return []
    rows = session.scalars(select(NoteRow).where(NoteRow.patient_id == study.patient_id)).all()
    notes = [
        ClinicalNote(
            note_id=str(row.id),
            patient_id=row.patient_id,
            issuer_of_patient_id=row.issuer_of_patient_id,
            accession_number=row.accession_number,
            note_date=row.note_date,
            note_type=row.note_type,
            text=row.text,
        )
        for row in rows
    ]
    return choose_notes(
        notes,
        patient_id=study.patient_id,
        issuer=study.issuer_of_patient_id,
        study_date=study.study_date or date.today(),
        accession_number=study.accession_number,
        window_days=window_days,
    )


def _device(ctx: RunContext) -> DeviceInfo:
    dev = ctx.settings.device
    return DeviceInfo(
        name=dev.name,
        manufacturer=dev.manufacturer,
        model_name=dev.model_name,
        serial_number=dev.serial_number,
        device_uid=ctx.settings.device_uid,
        software_version=ctx.software_version,
    )


def _analyse(
    ctx: RunContext, run_id: str, by_series: dict[str, list[tuple[Path, Dataset]]], progress: _Progress
) -> tuple[str, Prediction, NotesUsed]:
    """Select, convert, preprocess, join notes, infer; returns (series UID, prediction, notes used)."""
    sessions = ctx.sessions
    with _stage(progress, "selected"):
        candidates = [SeriesCandidate(uid, [ds for _, ds in items]) for uid, items in by_series.items()]
        selection = select_series(candidates, ctx.rules)
    chosen = selection.chosen.series_instance_uid
    _update(
        sessions, run_id, series_instance_uid=chosen, selection=[_decision_json(d) for d in selection.decisions],
        selected_at=progress.stamps["selected_at"],
    )
    with sessions() as session:
        _update(sessions, run_id, input_sha256=_input_hash(session, chosen))
    workdir = ctx.settings.work_dir / run_id
    workdir.mkdir(parents=True, exist_ok=True)
    with _stage(progress, "converted"):
        nifti = convert_series([p for p, _ in by_series[chosen]], workdir / "input.nii.gz")
    _update(sessions, run_id, converted_at=progress.stamps["converted_at"])
    with _stage(progress, "preprocessed"):
        pre = preprocess(nifti, ctx.preprocess_config)
    progress.seconds.update({f"preprocess.{k}": round(v, 3) for k, v in pre.stage_seconds.items()})
    _update(sessions, run_id, preprocessed_at=progress.stamps["preprocessed_at"], qc=_json_floats(pre.qc))
    with _stage(progress, "notes_joined"), sessions() as session:
        study = session.scalar(select(Study).join(Run).where(Run.id == run_id))
        if study is None:
            raise NodeError(f"run {run_id} has no study")
        notes = _notes_for(session, study, ctx.settings.processing.note_window_days)
    _update(
        sessions, run_id, notes_joined_at=progress.stamps["notes_joined_at"],
        notes_used=[{"id": n.note_id, "date": n.note_date.isoformat(), "type": n.note_type} for n in notes],
    )
    with _stage(progress, "inferred"):
        prediction = ctx.predictor.predict(pre.volume, format_note_text(notes) if notes else None)
    _update(sessions, run_id, inferred_at=progress.stamps["inferred_at"])
    return chosen, prediction, NotesUsed(tuple(n.note_date for n in notes))


def _decision_json(decision: Any) -> dict[str, Any]:
    return {
        "series_instance_uid": decision.series_instance_uid,
        "description": decision.description,
        "modality": decision.modality,
        "score": decision.score,
        "accepted": decision.accepted,
        "reasons": list(decision.reasons),
    }


def _json_floats(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, (int, float)) else str(v)) for k, v in values.items()}


def process_run(run_id: str, ctx: RunContext) -> None:
    """Process one run end to end and queue its report for delivery.

    Parameters
    ----------
    run_id : str
        The run to process (state ``queued`` or ``running`` after a restart).
    ctx : RunContext
        Settings, database and the loaded model.
    """
    sessions = ctx.sessions
    with sessions.begin() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise NodeError(f"no run {run_id}")
        run.state = RunState.RUNNING.value
        run.started_at = utcnow()
        run.attempts += 1
        study = session.get(Study, run.study_id)
        if study is None:
            raise NodeError(f"run {run_id} has no study")
        study_uid = study.study_instance_uid
        created_at = run.created_at
        sequence = session.scalar(select(func.count(Run.id)).where(Run.study_id == run.study_id, Run.created_at <= run.created_at)) or 1
        by_series = _study_headers(session, run.study_id)
    logger.info("run %s started for study %s", run_id, study_uid)
    progress = _Progress()
    prediction: Prediction | None = None
    not_analysed: tuple[Outcome, str] | None = None
    chosen: str | None = None
    notes_used = NotesUsed()
    state = RunState.SUCCEEDED
    try:
        chosen, prediction, notes_used = _analyse(ctx, run_id, by_series, progress)
    except NotAnalysed as exc:
        not_analysed, state = (exc.outcome, exc.reason), RunState.NOT_ANALYSED
        if exc.outcome is Outcome.NO_SUITABLE_SERIES and getattr(exc, "decisions", None):
            _update(sessions, run_id, selection=[_decision_json(d) for d in exc.decisions])  # type: ignore[attr-defined]
    except NodeError as exc:
        not_analysed, state = (Outcome.PROCESSING_ERROR, f"processing error: {exc}"), RunState.NOT_ANALYSED
    except Exception as exc:  # noqa: BLE001 - a bug must still give the radiologist an answer
        logger.exception("run %s failed unexpectedly", run_id)
        not_analysed = (Outcome.PROCESSING_ERROR, f"processing error ({type(exc).__name__})")
        state = RunState.NOT_ANALYSED
    _finish(ctx, run_id, study_uid, sequence, created_at, by_series, chosen, prediction, not_analysed, notes_used,
            progress, state)


def _finish(
    ctx: RunContext,
    run_id: str,
    study_uid: str,
    sequence: int,
    created_at: datetime,
    by_series: dict[str, list[tuple[Path, Dataset]]],
    chosen: str | None,
    prediction: Prediction | None,
    not_analysed: tuple[Outcome, str] | None,
    notes_used: NotesUsed,
    progress: _Progress,
    state: RunState,
) -> None:
    """Build, validate and queue the report; record the outcome."""
    sessions = ctx.sessions
    info = ctx.predictor.info
    sources = [ds for _, ds in by_series[chosen]] if chosen else [ds for items in by_series.values() for _, ds in items]
    with sessions() as session:
        input_hash = _input_hash(session, chosen) if chosen else hashlib.sha256(
            "".join(sorted(by_series)).encode()).hexdigest()
    report = ReportInput(
        run_id=run_id,
        device=_device(ctx),
        model=info,
        preprocessing_version=PREPROCESSING_VERSION,
        notes=notes_used,
        prediction=prediction,
        not_analysed=not_analysed,
    )
    identity = (study_uid, chosen or "no series selected", input_hash, info.weights_sha256)
    error: str | None = None
    outbox = ctx.settings.outbox_dir / run_id
    with _stage(progress, "report_built"):
        sr = build_sr(
            sources,
            report,
            series_instance_uid=str(derive_uid(*identity, UidKind.SR_SERIES)),
            sop_instance_uid=str(derive_uid(*identity, UidKind.SR_INSTANCE)),
            series_number=SR_SERIES_NUMBER,
            instance_number=sequence,
            content_datetime=created_at,
        )
        outbox.mkdir(parents=True, exist_ok=True)
        validation = validate_dataset(sr, outbox)
    sr_path = outbox / "sr.dcm"
    if validation.ok:
        sr.save_as(sr_path, enforce_file_format=True)
    else:
        error = "report failed DICOM validation: " + "; ".join(validation.errors[:10])
        state = RunState.FAILED
        logger.error("run %s: report failed validation (%d errors)", run_id, len(validation.errors))
    values: dict[str, Any] = {
        "state": state.value,
        "finished_at": utcnow(),
        "report_built_at": progress.stamps.get("report_built_at"),
        "stage_seconds": progress.seconds,
        "model_name": info.name,
        "model_version": info.version,
        "model_weights_sha256": info.weights_sha256,
        "report_sop_instance_uid": str(sr.SOPInstanceUID) if validation.ok else None,
    }
    if prediction is not None:
        probs = prediction.probabilities
        values.update(prob_ad=float(probs["AD"]), prob_mci=float(probs["MCI"]), prob_cn=float(probs["CN"]),
                      predicted_class=prediction.predicted_class, used_note=prediction.used_note)
    if not_analysed is not None:
        values.update(outcome=not_analysed[0].value, error_reason=not_analysed[1])
    if error is not None:
        values.update(outcome=Outcome.PROCESSING_ERROR.value, error_reason=error)
    with sessions.begin() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise NodeError(f"run {run_id} disappeared")
        for key, value in values.items():
            setattr(run, key, value)
        if validation.ok:
            now = utcnow()
            for dest in ctx.settings.destinations:
                session.add(Delivery(run_id=run_id, destination=dest.name, sop_instance_uid=str(sr.SOPInstanceUID),
                                     object_path=str(sr_path), created_at=now, next_attempt_at=now,
                                     state=DeliveryState.PENDING.value, attempts=0))
    shutil.rmtree(ctx.settings.work_dir / run_id, ignore_errors=True)
    logger.info("run %s finished: %s", run_id, values.get("predicted_class") or values.get("outcome"))

