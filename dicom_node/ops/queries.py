"""Read-only queries for administrators: the CLI's ``runs`` commands and the admin view.

Nothing here creates a database, a directory or a table: :func:`open_existing`
refuses a SQLite file that is not there, and :func:`check_schema` a schema that
``dicom-node db upgrade`` has not brought to the latest revision.  Patient IDs are
read only where the caller asks for them (``with_patient=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from core.errors import NodeError
from dicom_node.db.models import AssociationLog, Delivery, DeliveryState, Run, Study
from dicom_node.db.session import Database, make_engine, make_sessionmaker

#: Characters of a run id shown by the CLI and the admin view (any unique prefix is accepted).
SHORT_ID = 8

STAGES = ("created_at", "started_at", "selected_at", "converted_at", "preprocessed_at", "notes_joined_at",
          "inferred_at", "report_built_at", "finished_at")


def masked_url(url: str) -> str:
    """A database or broker URL with its password replaced by ``***``."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 -- not a SQLAlchemy URL (e.g. amqp://): mask by hand
        head, sep, tail = url.partition("://")
        if sep and "@" in tail:
            creds, _, host = tail.rpartition("@")
            user = creds.split(":", 1)[0]
            return f"{head}://{user}:***@{host}" if ":" in creds else url
        return url
    return parsed.render_as_string(hide_password=True)


def open_existing(url: str) -> Database:
    """Open the database at *url* without creating anything.

    Raises
    ------
    NodeError
        A SQLite file that does not exist (nothing was recorded there yet).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(str(parsed.database))
        if not path.is_file():
            raise NodeError(f"no database at {path}: nothing recorded there yet (wrong --data-dir or "
                            "--database-url? `dicom-node db upgrade` or the node's first start creates it)")
    engine = make_engine(url)
    return Database(engine, make_sessionmaker(engine))


def check_schema(engine: Engine) -> None:
    """Raise :class:`NodeError` when the node's tables are missing (a schema never migrated)."""
    missing = {"runs", "studies", "deliveries", "associations"} - set(inspect(engine).get_table_names())
    if missing:
        raise NodeError(f"the database at {masked_url(str(engine.url))} has no table {', '.join(sorted(missing))}: "
                        "run `dicom-node db upgrade`")


@dataclass(frozen=True)
class RunFilter:
    """Filters of the runs list (all optional, combined with AND)."""

    state: str | None = None
    outcome: str | None = None
    accession: str | None = None
    study_uid: str | None = None
    id_prefix: str | None = None
    limit: int = 50


@dataclass(frozen=True)
class RunRow:
    """One line of the runs list."""

    id: str
    short_id: str
    created_at: datetime
    state: str
    outcome: str | None
    predicted_class: str | None
    accession_number: str | None
    study_instance_uid: str
    patient_id: str | None
    seconds: float | None

    def as_json(self) -> dict[str, Any]:
        """JSON-friendly dict (``patient_id`` only when it was read)."""
        data = {"id": self.id, "short_id": self.short_id, "created_at": self.created_at.isoformat(),
                "state": self.state, "outcome": self.outcome, "predicted_class": self.predicted_class,
                "accession_number": self.accession_number, "study_instance_uid": self.study_instance_uid,
                "seconds": self.seconds}
        if self.patient_id is not None:
            data["patient_id"] = self.patient_id
        return data


def list_runs(sessions: sessionmaker[Session], filters: RunFilter, *, with_patient: bool = False) -> list[RunRow]:
    """Runs, newest first, matching *filters*."""
    query = select(Run, Study).join(Study, Run.study_id == Study.id)
    if filters.state:
        query = query.where(Run.state == filters.state)
    if filters.outcome:
        query = query.where(Run.outcome == filters.outcome)
    if filters.accession:
        query = query.where(Study.accession_number == filters.accession)
    if filters.study_uid:
        query = query.where(Study.study_instance_uid == filters.study_uid)
    if filters.id_prefix:
        query = query.where(Run.id.startswith(filters.id_prefix.lower(), autoescape=True))
    query = query.order_by(Run.created_at.desc(), Run.id).limit(max(1, filters.limit))
    rows = []
    with sessions() as session:
        for run, study in session.execute(query).all():
            seconds = None
            if run.finished_at and run.started_at:
                seconds = round((run.finished_at - run.started_at).total_seconds(), 1)
            rows.append(RunRow(run.id, run.id[:SHORT_ID], run.created_at, run.state, run.outcome,
                               run.predicted_class, study.accession_number, study.study_instance_uid,
                               study.patient_id if with_patient else None, seconds))
    return rows


def resolve_run_id(sessions: sessionmaker[Session], prefix: str) -> str:
    """The full id of the one run whose id starts with *prefix*.

    Raises
    ------
    NodeError
        No run, or several runs, start with *prefix*.
    """
    prefix = prefix.strip().lower()
    if not prefix:
        raise NodeError("give a run id or a prefix of one")
    with sessions() as session:
        found = session.scalars(select(Run.id).where(Run.id.startswith(prefix, autoescape=True)).limit(6)).all()
    if not found:
        raise NodeError(f"no run {prefix}")
    if len(found) > 1:
        shown = ", ".join(r[:12] for r in found[:5])
        raise NodeError(f"run id prefix {prefix!r} is ambiguous ({shown}{', ...' if len(found) > 5 else ''}): "
                        "give more characters")
    return found[0]


def _status(value: int | None) -> str | None:
    return None if value is None else f"0x{value:04X}"


def run_detail(sessions: sessionmaker[Session], run_id: str, *, with_patient: bool = False) -> dict[str, Any]:
    """Everything about one run, for its page: stages, selection, QC, notes, model, deliveries with attempts."""
    with sessions() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise NodeError(f"no run {run_id}")
        study = session.get(Study, run.study_id)
        deliveries = session.scalars(select(Delivery).where(Delivery.run_id == run_id).order_by(Delivery.id)).all()
        timeline = [(name.removesuffix("_at"), getattr(run, name)) for name in STAGES]
        return {
            "id": run.id, "short_id": run.id[:SHORT_ID], "state": run.state, "outcome": run.outcome,
            "reason": run.error_reason, "error_stage": run.error_stage, "attempts": run.attempts,
            "claimed_by": run.claimed_by, "supersedes": run.supersedes_run_id,
            "study_instance_uid": study.study_instance_uid if study else None,
            "accession_number": study.accession_number if study else None,
            "patient_id": (study.patient_id if study else None) if with_patient else None,
            "timeline": [(stage, at) for stage, at in timeline if at is not None],
            "stage_seconds": dict(run.stage_seconds or {}),
            "series_instance_uid": run.series_instance_uid, "selection": list(run.selection or []),
            "qc": dict(run.qc or {}), "notes_used": list(run.notes_used or []),
            "model": {"name": run.model_name, "version": run.model_version, "weights_sha256": run.model_weights_sha256},
            "probabilities": {"AD": run.prob_ad, "MCI": run.prob_mci, "CN": run.prob_cn},
            "predicted_class": run.predicted_class, "used_note": run.used_note, "input_lossy": run.input_lossy,
            "report_sop_instance_uid": run.report_sop_instance_uid, "pdf_sop_instance_uid": run.pdf_sop_instance_uid,
            "deliveries": [{"id": d.id, "destination": d.destination, "object": d.object_kind, "state": d.state,
                            "attempts": d.attempts, "last_status": _status(d.last_status),
                            "failure_class": d.failure_class, "last_error": d.last_error, "sent_at": d.sent_at,
                            "history": list(d.history or [])} for d in deliveries],
        }


def associations(sessions: sessionmaker[Session], limit: int = 100) -> list[AssociationLog]:
    """The association log, newest first."""
    with sessions() as session:
        return list(session.scalars(select(AssociationLog).order_by(AssociationLog.started_at.desc(),
                                                                    AssociationLog.id.desc()).limit(limit)).all())


def dead_letters(sessions: sessionmaker[Session], limit: int = 200) -> list[dict[str, Any]]:
    """Dead deliveries, newest first, with their run's short id and accession."""
    query = (select(Delivery, Study.accession_number).join(Run, Delivery.run_id == Run.id)
             .join(Study, Run.study_id == Study.id).where(Delivery.state == DeliveryState.DEAD.value)
             .order_by(Delivery.last_attempt_at.desc(), Delivery.id.desc()).limit(limit))
    with sessions() as session:
        return [{"id": d.id, "run_id": d.run_id, "short_id": d.run_id[:SHORT_ID], "accession_number": accession,
                 "destination": d.destination, "object": d.object_kind, "attempts": d.attempts,
                 "last_status": _status(d.last_status), "failure_class": d.failure_class,
                 "last_error": d.last_error, "last_attempt_at": d.last_attempt_at}
                for d, accession in session.execute(query).all()]


def replayable_ids(sessions: sessionmaker[Session], ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Split delivery *ids* into (replayable, already sent, unknown)."""
    with sessions() as session:
        found = session.execute(select(Delivery.id, Delivery.state).where(Delivery.id.in_(ids))).all()
    states = {delivery_id: state for delivery_id, state in found}
    sent = [i for i in ids if states.get(i) == DeliveryState.SENT.value]
    unknown = [i for i in ids if i not in states]
    return [i for i in ids if i in states and i not in sent], sent, unknown

