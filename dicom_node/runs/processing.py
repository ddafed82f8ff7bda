"""One run: from the spooled study to a validated report in the outbox.

``process_run(run_id, ctx)`` is the whole processing of a run, so the local
worker pool and any other executor call the same code.  Every stage time is
recorded; every refusal becomes a "not analysed" report with its reason.

A failure (a :class:`~core.errors.NodeError` that is not a refusal, or any
other exception: a bug) is a "not analysed" report too, outcome
``processing_error``: the radiologist reads in plain words which step could not
be done; the run's audit record keeps the stage and a traceback without patient
data (:func:`~core.errors.audit_traceback`), and so does the log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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

from core.errors import ConfigError, NodeError, NotAnalysed, Outcome, audit_traceback
from dicom_node.db.models import Delivery, DeliveryState, Instance, Run, RunState, Series, Study, utcnow
from dicom_node.ingest.completeness import study_input_lossy
from dicom_node.outbox.objects import write_objects
from dicom_node.outbox.routing import routes
from dicom_node.runs.analysis import measure, notes_for, volumes_record
from dicom_node.runs.context import RunContext
from dicom_node.runs.prior import CurrentStudy, PriorOutcome, compare_with_prior
from model.types import Prediction
from pipeline.convert import convert_series
from pipeline.notes import ClinicalNote, format_note_text
from pipeline.preprocess import Preprocessed, preprocess
from pipeline.qc import qc_checks
from pipeline.registration import default_template_path
from pipeline.select import SeriesCandidate, select_series
from pipeline.volumetry import Volumes
from structured_reports.keyslices import key_slices
from structured_reports.texts import processing_failure_text
from structured_reports.types import DeviceInfo, KeySlice, NotesUsed, ReportInput, SeriesRequirement
from structured_reports.uids import run_identity

logger = logging.getLogger(__name__)


PREPROCESSING_VERSION = "1.0"


@dataclass
class _Progress:
    """Stage timings and intermediate facts of one run."""

    seconds: dict[str, float] = field(default_factory=dict)
    stamps: dict[str, Any] = field(default_factory=dict)
    key_slices: list[KeySlice] = field(default_factory=list)
    #: The preprocessing's QC values (for the report; the run's record gets them with the preprocessing write).
    qc: dict[str, float] = field(default_factory=dict)
    #: The stage running, or the last one begun (its result being recorded); ``started`` before the first.
    stage: str = "started"
    #: Audit columns gathered since the last write; recorded by the next one (the end of the run at the latest).
    pending: dict[str, Any] = field(default_factory=dict)
    #: The study's volumes, or None and why (volumetry off: None and "").
    volumes: Volumes | None = None
    volumes_note: str = ""
    #: The comparison with the prior study (``prior.enabled`` off: an empty outcome).
    prior: PriorOutcome = field(default_factory=PriorOutcome)

    def record(self, **values: Any) -> None:
        """Keep audit columns for the next write of the run's record."""
        self.pending.update(values)

    def take(self) -> dict[str, Any]:
        """The audit columns gathered so far, cleared."""
        values, self.pending = self.pending, {}
        return values


@dataclass(frozen=True)
class _Failure:
    """Where a run stopped, for its audit record (``error_stage``, ``error_traceback``)."""

    stage: str
    traceback: str | None = None

    def columns(self) -> dict[str, Any]:
        """The run's audit columns for this failure."""
        return {"error_stage": self.stage, "error_traceback": self.traceback}


def _failed(run_id: str, stage: str, exc: Exception) -> tuple[_Failure, str]:
    """Record-ready failure and the radiologist's sentence for an exception that stopped a run.

    The log gets the run id, the stage and :func:`audit_traceback` (no patient data),
    never the message of an exception that is not ours.
    """
    failure = _Failure(stage, audit_traceback(exc))
    logger.error("run %s failed in stage %s (%s):\n%s", run_id, stage, type(exc).__name__, failure.traceback)
    return failure, processing_failure_text(stage, run_id, configuration=isinstance(exc, ConfigError))


@contextmanager
def _stage(progress: _Progress, name: str) -> Iterator[None]:
    progress.stage = name
    start = time.perf_counter()
    yield
    progress.seconds[name] = round(time.perf_counter() - start, 3)
    progress.stamps[f"{name}_at"] = utcnow()


def _apply(session: Session, run_id: str, values: dict[str, Any]) -> None:
    run = session.get(Run, run_id)
    if run is None:
        raise NodeError(f"run {run_id} disappeared")
    for key, value in values.items():
        setattr(run, key, value)


def _update(sessions: sessionmaker[Session], run_id: str, **values: Any) -> None:
    with sessions.begin() as session:
        _apply(session, run_id, values)


@dataclass(frozen=True)
class _Inputs:
    """What the run read at its start: the study and the headers of its spooled instances."""

    study_uid: str
    #: The run's number among its study's runs (the objects' Instance Number).
    sequence: int
    created_at: datetime
    by_series: dict[str, list[tuple[Path, Dataset]]]
    #: The study's keys for joining clinical notes.
    patient_id: str | None = None
    issuer: str | None = None
    study_date: date | None = None
    accession_number: str | None = None


def _study_headers(session: Session, study_id: int) -> dict[str, list[tuple[Path, Dataset]]]:
    """Headers (no pixels) of every spooled instance of a study, by series UID."""
    rows = session.execute(
        select(Series.series_instance_uid, Instance.spool_path)
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study_id, Instance.quarantined.is_(False))
        .order_by(Series.series_number, Instance.id)
    ).all()
    by_series: dict[str, list[tuple[Path, Dataset]]] = {}
    for series_uid, spool_path in rows:
        path = Path(spool_path)
        try:
            header = dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - one unreadable instance must not sink the study's run
            logger.warning("instance %s left out of the run: header unreadable (%s)", path.stem, type(exc).__name__)
            continue
        by_series.setdefault(series_uid, []).append((path, header))
    return by_series


def _input_hash(session: Session, series_uid: str) -> str:
    digests = session.scalars(
        select(Instance.sha256)
        .join(Series)
        .where(Series.series_instance_uid == series_uid)
        .order_by(Instance.sop_instance_uid)
    ).all()
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _notes_for(ctx: RunContext, inputs: _Inputs) -> list[ClinicalNote]:
    return notes_for(ctx, inputs.patient_id, inputs.issuer, inputs.study_date, inputs.accession_number)


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


def _analyse(ctx: RunContext, run_id: str, inputs: _Inputs, progress: _Progress) -> tuple[str, Prediction, NotesUsed]:
    """Select, convert, preprocess, measure volumes, join notes, infer, compare with the prior study.

    Returns (series UID, prediction, notes used); the volumes and the comparison go to *progress*.  The run's
    record is written twice here, once the series is chosen and once it is preprocessed (the long stages, so the
    admin view shows where a run is); the later stages' columns go with the end of the run.
    """
    sessions, by_series = ctx.sessions, inputs.by_series
    with _stage(progress, "selected"):
        candidates = [SeriesCandidate(uid, [ds for _, ds in items]) for uid, items in by_series.items()]
        selection = select_series(candidates, ctx.rules)
    chosen = selection.chosen.series_instance_uid
    with sessions.begin() as session:
        _apply(session, run_id, {
            "series_instance_uid": chosen, "selection": [_decision_json(d) for d in selection.decisions],
            "selected_at": progress.stamps["selected_at"], "input_sha256": _input_hash(session, chosen)})
    workdir = ctx.settings.work_dir / run_id
    with _stage(progress, "converted"):
        workdir.mkdir(parents=True, exist_ok=True)
        nifti = convert_series([p for p, _ in by_series[chosen]], workdir / "input.nii.gz")
    progress.record(converted_at=progress.stamps["converted_at"])
    with _stage(progress, "preprocessed"):
        pre = preprocess(nifti, ctx.preprocess_config)
    progress.seconds.update({f"preprocess.{k}": round(v, 3) for k, v in pre.stage_seconds.items()})
    progress.record(preprocessed_at=progress.stamps["preprocessed_at"], qc=_json_floats(pre.qc))
    progress.qc = dict(pre.qc)
    _update(sessions, run_id, **progress.take())
    progress.key_slices = _key_slices(ctx, run_id, pre)
    if ctx.volumetry is not None:
        with _stage(progress, "volumes_measured"):
            progress.volumes, progress.volumes_note = measure(ctx, run_id, pre)
        progress.record(volumes=volumes_record(progress.volumes, ctx.volumetry) if progress.volumes else None,
                        volumes_note=progress.volumes_note or None)
    with _stage(progress, "notes_joined"):
        notes = _notes_for(ctx, inputs)
    progress.record(
        notes_joined_at=progress.stamps["notes_joined_at"],
        notes_used=[{"id": n.note_id, "date": n.note_date.isoformat(), "type": n.note_type} for n in notes],
    )
    with _stage(progress, "inferred"):
        prediction = ctx.predictor.predict(pre.volume, format_note_text(notes) if notes else None)
    progress.record(inferred_at=progress.stamps["inferred_at"])
    if ctx.prior_client is not None:
        with _stage(progress, "prior_compared"):
            progress.prior = compare_with_prior(ctx, run_id, CurrentStudy(
                inputs.study_uid, inputs.patient_id, inputs.issuer, inputs.study_date), workdir)
        progress.seconds.update(progress.prior.seconds)
        progress.record(**progress.prior.columns(ctx))
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

    The run's story, top to bottom: claim it; read its study (one transaction); analyse it (two writes); build,
    validate and queue its objects (one read, one write).  A refusal or a failure anywhere still ends in a
    "not analysed" report.

    Parameters
    ----------
    run_id : str
        The run to process (state ``queued`` or ``running`` after a restart).
    ctx : RunContext
        Settings, database and the loaded model.
    """
    from dicom_node.runs.claims import MAX_ATTEMPTS, claim_run

    claim_run(ctx.sessions, run_id)  # atomic: queued -> running (ClaimRefusedError when ended or held elsewhere)
    inputs, called_ae, refusal = _start(ctx, run_id, MAX_ATTEMPTS)
    predictor = ctx.predictor_for(called_ae)
    logger.info("run %s started for study %s (model %s)", run_id, inputs.study_uid, predictor.info.name)
    if predictor is not ctx.predictor:
        ctx = dataclasses.replace(ctx, predictor=predictor)  # this run uses its profile's model throughout
    progress = _Progress()
    result = _run_analysis(ctx, run_id, inputs, refusal, progress)
    try:
        _finish(ctx, run_id, inputs, result, progress)
    except Exception as exc:
        failure, reason = _report_failed(run_id, exc, result.failure)
        # In the audit record whatever happens next, with the stages' columns not yet written.
        _update(ctx.sessions, run_id, **{**progress.pending, **failure.columns()})
        if result.prediction is None:  # a "not analysed" report failed: another would too (the run is marked failed)
            raise
        # The result's report failed: the radiologist still gets a "not analysed" report saying so.
        progress.key_slices = []
        _finish(ctx, run_id, inputs, _Result(result.chosen, None, (Outcome.PROCESSING_ERROR, reason), NotesUsed(),
                                             RunState.NOT_ANALYSED, failure), progress)


def _start(ctx: RunContext, run_id: str, max_attempts: int) -> tuple[_Inputs, str | None, NotAnalysed | None]:
    """Read what the run needs from its study, in one transaction; a refusal known before any analysis."""
    with ctx.sessions.begin() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise NodeError(f"no run {run_id}")
        study = session.get(Study, run.study_id)
        if study is None:
            raise NodeError(f"run {run_id} has no study")
        sequence = session.scalar(
            select(func.count(Run.id)).where(Run.study_id == run.study_id, Run.created_at <= run.created_at)
        ) or 1
        inputs = _Inputs(study.study_instance_uid, sequence, run.created_at, _study_headers(session, run.study_id),
                         patient_id=study.patient_id, issuer=study.issuer_of_patient_id,
                         study_date=study.study_date, accession_number=study.accession_number)
        refusal: NotAnalysed | None = None
        if run.outcome == Outcome.INCOMPLETE_SERIES.value and run.error_reason:
            # Edge (completeness): a run created for a study with a series closed incomplete is not analysed.
            refusal = NotAnalysed(Outcome.INCOMPLETE_SERIES, run.error_reason)
        elif run.attempts > max_attempts:  # crashed the node or its worker every time: say so, don't try again
            refusal = NotAnalysed(Outcome.PROCESSING_ERROR, f"processing was interrupted {max_attempts} times "
                                                            "(the node or its worker stopped each time)")
        run.input_lossy = study_input_lossy(session, run.study_id)
        return inputs, study.called_ae_title, refusal


def _run_analysis(
    ctx: RunContext, run_id: str, inputs: _Inputs, refusal: NotAnalysed | None, progress: _Progress
) -> _Result:
    """The analysis, or why there is none: a refusal for the radiologist, or a failure in plain words."""
    try:
        if refusal is not None:
            raise refusal
        chosen, prediction, notes_used = _analyse(ctx, run_id, inputs, progress)
        return _Result(chosen, prediction, None, notes_used, RunState.SUCCEEDED)
    except NotAnalysed as exc:  # a refusal, its reason written for the radiologist
        if exc.outcome is Outcome.NO_SUITABLE_SERIES and getattr(exc, "decisions", None):
            progress.record(selection=[_decision_json(d) for d in exc.decisions])  # type: ignore[attr-defined]
        return _Result(None, None, (exc.outcome, exc.reason), NotesUsed(), RunState.NOT_ANALYSED,
                       _Failure(progress.stage))
    except Exception as exc:  # noqa: BLE001 - our NodeError or a bug: still an answer, in plain words
        failure, reason = _failed(run_id, progress.stage, exc)
        return _Result(None, None, (Outcome.PROCESSING_ERROR, reason), NotesUsed(), RunState.NOT_ANALYSED, failure)


def _report_failed(run_id: str, exc: Exception, earlier: _Failure | None) -> tuple[_Failure, str]:
    """:func:`_failed` for the report stage, the record also keeping an earlier failure of the run."""
    failure, reason = _failed(run_id, "report_built", exc)
    if earlier is None:
        return failure, reason
    before = f":\n{earlier.traceback}" if earlier.traceback else " (not analysed; no traceback)\n"
    text = f"{failure.traceback}\nThis happened while reporting an earlier failure in stage {earlier.stage}{before}"
    return _Failure(failure.stage, text), reason


@dataclass(frozen=True)
class _Result:
    """What the analysis gave: a prediction, or why the study was not analysed."""

    chosen: str | None
    prediction: Prediction | None
    not_analysed: tuple[Outcome, str] | None
    notes_used: NotesUsed
    state: RunState
    #: Where the run stopped, for the audit record (None when it did not fail).
    failure: _Failure | None = None


def _finish(ctx: RunContext, run_id: str, inputs: _Inputs, result: _Result, progress: _Progress) -> None:
    """Build, validate and queue the SR and the PDF; record the outcome (and where the run stopped, if it failed)."""
    study_uid, sequence, created_at, by_series = inputs.study_uid, inputs.sequence, inputs.created_at, inputs.by_series
    chosen, prediction, not_analysed = result.chosen, result.prediction, result.not_analysed
    notes_used, state, failure = result.notes_used, result.state, result.failure
    progress.stage = "report_built"
    sessions = ctx.sessions
    info = ctx.predictor.info
    sources = [ds for _, ds in by_series[chosen]] if chosen else [ds for items in by_series.values() for _, ds in items]
    report = ReportInput(
        run_id=run_id,
        device=_device(ctx),
        model=info,
        preprocessing_version=PREPROCESSING_VERSION,
        notes=notes_used,
        prediction=prediction,
        not_analysed=not_analysed,
        qc=qc_checks(progress.qc, ctx.preprocess_config) if prediction is not None else (),
        requirement=SeriesRequirement.from_config(ctx.rules, ctx.preprocess_config),
        normative=ctx.normative,
        **(_comparisons(progress) if prediction is not None else {}),
    )
    with _stage(progress, "report_built"), sessions() as session:
        input_hash = _input_hash(session, chosen) if chosen else hashlib.sha256(
            "".join(sorted(by_series)).encode()).hexdigest()
        notes_rows = progress.pending.get("notes_used", []) if prediction is not None else []
        identity = run_identity(study_uid, chosen, input_hash, info.weights_sha256, notes=notes_rows,
                                preprocessing=report.preprocessing_version,
                                outcome=not_analysed[0].value if not_analysed is not None else None)
        if prediction is not None:
            identity = (*identity, *_comparison_identity(ctx, progress))
        written = write_objects(ctx.settings, session, run_id, sources, report, identity,
                                instance_number=sequence, content_datetime=created_at, slices=progress.key_slices)
        destinations, routing_error = routes(ctx.settings, session, run_id)
    by_kind = {obj.kind: obj for obj in written}
    invalid = [obj for obj in written if not obj.ok]
    values: dict[str, Any] = {
        **progress.pending,  # the stages' columns not yet written
        "state": (RunState.FAILED if invalid or routing_error else state).value,
        "finished_at": utcnow(),
        "report_built_at": progress.stamps.get("report_built_at"),
        "stage_seconds": progress.seconds,
        "model_name": info.name,
        "model_version": info.version,
        "model_weights_sha256": info.weights_sha256,
        "report_sop_instance_uid": by_kind["sr"].sop_instance_uid if by_kind["sr"].ok else None,
        "pdf_sop_instance_uid": by_kind["pdf"].sop_instance_uid if by_kind["pdf"].ok else None,
        "validation_messages": [obj.record() for obj in written],
    }
    if prediction is not None:
        probs = prediction.probabilities
        values.update(prob_ad=float(probs["AD"]), prob_mci=float(probs["MCI"]), prob_cn=float(probs["CN"]),
                      predicted_class=prediction.predicted_class, used_note=prediction.used_note)
    if not_analysed is not None:
        values.update(outcome=not_analysed[0].value, error_reason=not_analysed[1])
    if failure is not None:
        values.update(failure.columns())
    if invalid:
        values["error_reason"] = "; ".join(
            f"{obj.kind} failed DICOM validation, not sent: " + "; ".join(obj.errors[:5]) for obj in invalid)
        if not by_kind["sr"].ok:
            values["outcome"] = Outcome.PROCESSING_ERROR.value
    if routing_error is not None:
        values["error_reason"] = "; ".join(filter(None, [values.get("error_reason"), routing_error]))
    with sessions.begin() as session:
        _apply(session, run_id, values)
        now = utcnow()
        for dest_name, kinds in destinations:
            for kind in kinds:
                obj = by_kind.get(kind)
                if obj is None or obj.path is None:
                    continue
                session.add(Delivery(run_id=run_id, destination=dest_name, sop_instance_uid=obj.sop_instance_uid,
                                     object_path=str(obj.path), object_kind=kind, created_at=now,
                                     next_attempt_at=now, state=DeliveryState.PENDING.value, attempts=0))
    progress.take()
    shutil.rmtree(ctx.settings.work_dir / run_id, ignore_errors=True)
    logger.info("run %s finished: %s", run_id, values.get("predicted_class") or values.get("outcome"))


def _comparisons(progress: _Progress) -> dict[str, Any]:
    """The report's volumes and comparison with the prior (each with its note)."""
    return {"volumes": progress.volumes, "volumes_note": progress.volumes_note, "prior": progress.prior.prior,
            "prior_note": progress.prior.note}


def _comparison_identity(ctx: RunContext, progress: _Progress) -> tuple[str, ...]:
    """Parts of the objects' identity for the volumes and the prior: other content, other UIDs (none when off).

    Timings (``qc.seconds``, the prior's ``seconds``) are left out: the same input gives the same objects.
    """
    def timeless(record: Any) -> Any:
        if not isinstance(record, dict):
            return record
        return {k: ({q: v for q, v in value.items() if q != "seconds"} if k == "qc" and isinstance(value, dict)
                    else timeless(value)) for k, value in record.items() if k != "seconds"}

    values = {
        "volumes": (volumes_record(progress.volumes, ctx.volumetry)
                    if progress.volumes is not None and ctx.volumetry is not None else None),
        "volumes_note": progress.volumes_note or None,
        **({} if progress.prior == PriorOutcome() else progress.prior.columns(ctx)),
    }
    return tuple(f"{key}:" + hashlib.sha256(json.dumps(timeless(value), sort_keys=True).encode()).hexdigest()
                 for key, value in values.items() if value is not None)


def _key_slices(ctx: RunContext, run_id: str, pre: Preprocessed) -> list[KeySlice]:
    """Key slices with the template outline for the PDF; none (and a warning) if they cannot be made."""
    if pre.registered is None:
        return []
    try:
        return key_slices(pre.registered, ctx.preprocess_config.template_path or default_template_path())
    except (NodeError, OSError, ValueError) as exc:
        logger.warning("run %s: no key slices for the PDF (%s)", run_id, type(exc).__name__)
        return []

