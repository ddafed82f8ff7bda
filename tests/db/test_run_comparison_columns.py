"""0006: the runs' volumes and prior-study columns migrate down and up on SQLite and PostgreSQL, rows kept."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, select, text
from sqlalchemy.orm import Session

from alembic import command
from dicom_node.db.models import Run, RunState, Study
from dicom_node.db.session import alembic_config, make_engine
from tests.support.postgres import postgres_schema

__all__ = ["postgres_schema"]  # a fresh PostgreSQL schema per test

COLUMNS = {"volumes", "volumes_note", "prior_study_uid", "prior_run_id", "prior_note", "prior"}


def _down_and_up(engine: Engine) -> None:
    def columns() -> set[str]:
        return {c["name"] for c in inspect(engine).get_columns("runs")}

    cfg = alembic_config(str(engine.url))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    assert columns() >= COLUMNS
    assert any(fk["constrained_columns"] == ["prior_run_id"] and fk["referred_table"] == "runs"
               for fk in inspect(engine).get_foreign_keys("runs"))
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with Session(engine) as session, session.begin():
        study = Study(study_instance_uid="1.2.3", first_received_at=now, last_received_at=now, needs_run=False)
        session.add(study)
        session.flush()
        session.add(Run(id="r0", study_id=study.id, created_at=now, state=RunState.SUCCEEDED.value,
                        volumes={"hippocampus_left_ml": 3.4, "method": {"working_spacing_mm": 2.0}}))
        session.flush()
        session.add(Run(id="r1", study_id=study.id, created_at=now, state=RunState.SUCCEEDED.value,
                        volumes_note="volumes not measured: x", prior_study_uid="1.2.4", prior_run_id="r0",
                        prior={"source": "reused", "probabilities": {"AD": 0.5}}))
    with Session(engine) as session:
        run = session.get(Run, "r1")
        assert run is not None
        assert (run.prior_run_id, run.prior, run.volumes_note) == (
            "r0", {"source": "reused", "probabilities": {"AD": 0.5}}, "volumes not measured: x")
        assert session.scalars(select(Run.volumes).where(Run.id == "r0")).one() == {
            "hippocampus_left_ml": 3.4, "method": {"working_spacing_mm": 2.0}}
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    assert not COLUMNS & columns()
    with engine.connect() as conn:
        assert conn.execute(text("select id, state from runs order by id")).all() == [
            ("r0", "succeeded"), ("r1", "succeeded")]
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    with Session(engine) as session:
        run = session.get(Run, "r1")
        assert run is not None and (run.volumes, run.prior_run_id, run.prior_note, run.prior) == (None, None, None,
                                                                                                  None)
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.check(cfg)  # models and migrations agree


def test_comparison_columns_migrate_down_and_up_on_sqlite(tmp_path: Path) -> None:
    _down_and_up(make_engine(f"sqlite:///{tmp_path / 'comparison.sqlite3'}"))


@pytest.mark.postgres
def test_comparison_columns_migrate_down_and_up_on_postgres(postgres_schema: Engine) -> None:
    _down_and_up(postgres_schema)
