"""Clinical notes from the node's database or from an external SQL database through a column mapping."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from core.errors import ConfigError
from dicom_node.db.notes import ExternalNotes, NodeNotes, make_notes_source
from dicom_node.db.session import Database
from dicom_node.settings import Settings, load_settings
from pipeline.notes import choose_notes
from tests.conftest import POSTGRES_URL

MAPPING = {"patient_id": "pid", "issuer_of_patient_id": "issuer", "accession_number": "acc",
           "note_date": "written_on", "note_type": "kind", "text": "body", "note_id": "nid"}
ROWS = [
    ("n1", "P1", "HOSP", "ACC-9", date(2026, 10, 1), "memory clinic", "first"),
    ("n2", "P1", "HOSP", None, date(2026, 11, 1), "neurology", "second"),
    ("n3", "P1", "HOSP", None, date(2020, 1, 1), "old", "too old"),
    ("n4", "P2", "HOSP", None, date(2026, 11, 1), "neurology", "someone else"),
]


def _fill(url: str, table: str, connect_args: dict[str, str] | None = None) -> None:
    engine = create_engine(url, connect_args=connect_args or {})
    with engine.begin() as conn:
        conn.execute(text(f"create table {table} (nid varchar(16), pid varchar(64), issuer varchar(64), "
                          "acc varchar(64), written_on date, kind varchar(64), body text)"))
        for row in ROWS:
            conn.execute(text(f"insert into {table} values (:a, :b, :c, :d, :e, :f, :g)"),
                         dict(zip("abcdefg", row, strict=True)))
    engine.dispose()


def _settings(url: str, table: str) -> Settings:
    return load_settings(environ={}, overrides={"notes.source": "external", "notes.url": url,
                                                "notes.table": table, "notes.columns": MAPPING})


def _check(source: ExternalNotes) -> None:
    notes = source.for_patient("P1")
    assert {n.note_id for n in notes} == {"n1", "n2", "n3"}
    chosen = choose_notes(notes, patient_id="P1", issuer="HOSP", study_date=date(2026, 11, 20),
                          accession_number="ACC-9", window_days=365)
    assert [n.note_id for n in chosen] == ["n1", "n2"]  # the study's accession first, the old note left out


def test_external_sqlite_notes_with_column_mapping(tmp_path: Path, database: Database) -> None:
    url = f"sqlite:///{tmp_path / 'ehr.sqlite3'}"
    _fill(url, "ehr_notes")
    source = make_notes_source(_settings(url, "ehr_notes").notes, database.sessions)
    assert isinstance(source, ExternalNotes)
    _check(source)


@pytest.fixture
def postgres_notes_table() -> Iterator[str]:
    schema = f"ehr_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    _fill(POSTGRES_URL, f'"{schema}".notes')
    yield schema
    with admin.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
    admin.dispose()


@pytest.mark.postgres
def test_external_postgres_notes_in_a_schema(postgres_notes_table: str, database: Database) -> None:
    source = ExternalNotes(_settings(POSTGRES_URL, f"{postgres_notes_table}.notes").notes)
    _check(source)
    source.engine.dispose()


def test_node_notes_are_the_default(settings: Settings, database: Database) -> None:
    assert isinstance(make_notes_source(settings.notes, database.sessions), NodeNotes)
    assert NodeNotes(database.sessions).for_patient("nobody") == []


def test_external_source_needs_a_url() -> None:
    with pytest.raises(ConfigError, match=r"notes\.url is required"):
        load_settings(environ={"DICOM_NODE_NOTES__SOURCE": "external"})
