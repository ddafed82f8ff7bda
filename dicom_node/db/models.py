"""The node's tables (SQLAlchemy 2 declarative).  Alembic owns the schema.

Patient-level columns (PatientID, AccessionNumber, note text) live here only
because the database is the audited record; they never reach the logs.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID_LEN = 64


class Base(DeclarativeBase):
    """Declarative base with a stable constraint naming convention."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class SeriesState(StrEnum):
    """Completeness of a received series."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class RunState(StrEnum):
    """Life cycle of a run."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    NOT_ANALYSED = "not_analysed"
    FAILED = "failed"


class DeliveryState(StrEnum):
    """Life cycle of one object to one destination."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class Study(Base):
    """A study some of whose instances were received."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[date | None] = mapped_column(Date)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    needs_run: Mapped[bool] = mapped_column(default=False)
    called_ae_title: Mapped[str | None] = mapped_column(String(16))

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A received series and its completeness."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING.value)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expected_count: Mapped[int | None] = mapped_column(Integer)
    completeness: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class AssociationLog(Base):
    """One association, as the administrators audit it."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    called_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    tls: Mapped[bool] = mapped_column(default=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_refused: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str | None] = mapped_column(String(16))  # released | aborted | rejected
    reason: Mapped[str | None] = mapped_column(Text)


class Instance(Base):
    """One received SOP instance, as written to the spool."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LEN))
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LEN))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), index=True)
    #: Set only by earlier versions, which quarantined aborted associations; restored at start-up.
    quarantined: Mapped[bool] = mapped_column(default=False)
    lossy: Mapped[bool] = mapped_column(default=False)
    #: When start-up found the spooled file gone (acknowledged but lost); cleared when it is received again.
    file_missing_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    series: Mapped[Series] = relationship(back_populates="instances")


class Rejection(Base):
    """An instance the node refused, with the status it answered and why."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


class Run(Base):
    """One analysis of a study, audited stage by stage."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), default=RunState.QUEUED.value, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    selected_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    converted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    preprocessed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    notes_joined_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    inferred_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    report_built_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stage_seconds: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    series_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    selection: Mapped[list[Any] | None] = mapped_column(JSON)
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    qc: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    notes_used: Mapped[list[Any] | None] = mapped_column(JSON)
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_weights_sha256: Mapped[str | None] = mapped_column(String(64))
    prob_ad: Mapped[float | None] = mapped_column(Float)
    prob_mci: Mapped[float | None] = mapped_column(Float)
    prob_cn: Mapped[float | None] = mapped_column(Float)
    predicted_class: Mapped[str | None] = mapped_column(String(8))
    used_note: Mapped[bool | None] = mapped_column()
    outcome: Mapped[str | None] = mapped_column(String(32))
    error_reason: Mapped[str | None] = mapped_column(Text)
    report_sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    supersedes_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"))
    input_lossy: Mapped[bool | None] = mapped_column()
    validation_messages: Mapped[list[Any] | None] = mapped_column(JSON)
    pdf_sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: Stage the run stopped in when not analysed or failed (``selected``, ``converted``, ... ``report_built``).
    error_stage: Mapped[str | None] = mapped_column(String(32))
    #: Traceback of a failure: frames and exception types, messages only of the node's own errors (no patient data).
    error_traceback: Mapped[str | None] = mapped_column(Text)
    #: The study's volumes (:func:`dicom_node.runs.analysis.volumes_record`: millilitres, method, QC), or None.
    volumes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: Why there are no volumes (volumetry failed or refused), for the report and the audit; None when measured or off.
    volumes_note: Mapped[str | None] = mapped_column(Text)
    #: The prior study compared with (None: none found, or the comparison is off).
    prior_study_uid: Mapped[str | None] = mapped_column(String(UID_LEN))
    #: The node's run of the prior study whose result was reused (None: the prior was retrieved and analysed).
    prior_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"))
    #: Why there is no comparison with a prior ("no prior study in the PACS ...", "prior study not retrievable: ...").
    prior_note: Mapped[str | None] = mapped_column(Text)
    #: The prior's result as compared (:meth:`dicom_node.runs.prior.PriorOutcome.columns`): series, date, how it
    #: was had, probabilities, volumes, stage times.
    prior: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    deliveries: Mapped[list[Delivery]] = relationship(back_populates="run")


class Delivery(Base):
    """One object to send to one destination, with its attempts."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_state_next", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LEN))
    object_path: Mapped[str] = mapped_column(String(512))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    object_kind: Mapped[str] = mapped_column(String(8), default="sr")
    failure_class: Mapped[str | None] = mapped_column(String(32))
    history: Mapped[list[Any] | None] = mapped_column(JSON)

    run: Mapped[Run] = relationship(back_populates="deliveries")


class NotificationState(StrEnum):
    """Life cycle of one webhook notification."""

    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class Notification(Base):
    """One event for one webhook: the durable outbox of :mod:`dicom_node.outbox.notify`.

    ``subject_id`` is the run id (``run.*`` events) or the delivery id
    (``delivery.dead_lettered``, ``<id>/<n>`` after *n* replays); the unique
    key makes an event notified once per webhook, whichever node found it.
    """

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("event", "subject_id", "webhook", name="uq_notifications_event_subject_webhook"),
        Index("ix_notifications_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(64))
    webhook: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default=NotificationState.PENDING.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: HTTP status of the last attempt (None: no answer).
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ClinicalNote(Base):
    """A clinical note of a patient, joined to studies at run time."""

    __tablename__ = "clinical_notes"
    __table_args__ = (Index("ix_clinical_notes_patient", "patient_id", "note_date"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    external_id: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    note_date: Mapped[date] = mapped_column(Date)
    note_type: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(UTC)

