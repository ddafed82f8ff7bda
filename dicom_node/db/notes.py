"""Where clinical notes come from: the node's own database or a hospital SQL database.

The external store is read through a configured table and column mapping
(``[notes]`` in ``config/node.toml``); only the rows of the study's patient are
fetched, and the choice of notes (window, accession preference) is
:func:`pipeline.notes.choose_notes`.
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from typing import Protocol

from sqlalchemy import Engine, column, create_engine, select, table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import NodeError
from dicom_node.db.models import ClinicalNote as NoteRow
from dicom_node.settings import NotesSettings
from pipeline.notes import ClinicalNote

logger = logging.getLogger(__name__)


class NotesSource(Protocol):
    """Something that lists a patient's clinical notes."""

    def for_patient(self, patient_id: str) -> list[ClinicalNote]:
        """All notes of *patient_id* (the caller chooses among them)."""


class NodeNotes:
    """Notes imported into the node's database (``dicom-node notes import``)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def for_patient(self, patient_id: str) -> list[ClinicalNote]:
        """Notes of the patient from the ``clinical_notes`` table."""
        with self.sessions() as session:
            rows = session.scalars(select(NoteRow).where(NoteRow.patient_id == patient_id)).all()
        return [
            ClinicalNote(note_id=str(row.id), patient_id=row.patient_id,
                         issuer_of_patient_id=row.issuer_of_patient_id, accession_number=row.accession_number,
                         note_date=row.note_date, note_type=row.note_type, text=row.text)
            for row in rows
        ]


def _as_date(value: object) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


class ExternalNotes:
    """Notes read from another SQL database through a table and column mapping.

    Parameters
    ----------
    cfg : NotesSettings
        URL, table and the column names.
    engine : Engine, optional
        An engine to use instead of one made from ``cfg.url`` (tests).
    """

    def __init__(self, cfg: NotesSettings, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self.engine = engine or create_engine(cfg.url, pool_pre_ping=True)
        cols = cfg.columns
        names = [cols.patient_id, cols.note_date, cols.text, cols.note_id, cols.issuer_of_patient_id,
                 cols.accession_number, cols.note_type]
        schema, _, name = cfg.table.rpartition(".")
        self._table = table(name, *(column(n) for n in names if n), schema=schema or None)

    def for_patient(self, patient_id: str) -> list[ClinicalNote]:
        """Notes of the patient from the external table."""
        cols = self.cfg.columns
        t = self._table.c
        query = select(self._table).where(t[cols.patient_id] == patient_id)
        try:
            with self.engine.connect() as conn:
                rows = conn.execute(query).mappings().all()
        except SQLAlchemyError as exc:
            raise NodeError(f"external notes database unavailable ({type(exc).__name__})") from exc
        notes = []
        for row in rows:
            try:
                notes.append(ClinicalNote(
                    note_id=str(row[cols.note_id]) if cols.note_id else None,
                    patient_id=str(row[cols.patient_id]),
                    issuer_of_patient_id=str(row[cols.issuer_of_patient_id] or "") or None
                    if cols.issuer_of_patient_id else None,
                    accession_number=str(row[cols.accession_number] or "") or None
                    if cols.accession_number else None,
                    note_date=_as_date(row[cols.note_date]),
                    note_type=str(row[cols.note_type] or "") if cols.note_type else "clinical note",
                    text=str(row[cols.text] or ""),
                ))
            except ValueError:
                logger.warning("external note skipped: unreadable date in column %s", cols.note_date)
        return notes


def make_notes_source(cfg: NotesSettings, sessions: sessionmaker[Session]) -> NotesSource:
    """The configured notes source."""
    if cfg.source == "external":
        return ExternalNotes(cfg)
    return NodeNotes(sessions)
