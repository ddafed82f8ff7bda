"""When a study gets a run, what it supersedes, why it is not analysed, and whether its input was lossy.

The rows are written here as the edge and the scheduler leave them, so each
rule of :func:`create_runs` is checked on its own.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import Outcome
from dicom_node.db.models import Instance, Run, Series, Study
from dicom_node.db.session import Database
from dicom_node.ingest.completeness import create_runs, incomplete_reason, study_input_lossy

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def add_study(session: Session, *, needs_run: bool = True) -> Study:
    study = Study(study_instance_uid=generate_uid(), first_received_at=T0, last_received_at=T0, needs_run=needs_run)
    session.add(study)
    session.flush()
    return study


def add_series(session: Session, study: Study, *, state: str = "complete", count: int = 3,
               number: int | None = 3, description: str | None = "t1", record: dict[str, Any] | None = None) -> Series:
    series = Series(series_instance_uid=generate_uid(), study_id=study.id, series_number=number,
                    series_description=description, state=state, instance_count=count, first_received_at=T0,
                    last_received_at=T0, completeness=record)
    session.add(series)
    session.flush()
    return series


def add_instance(session: Session, series: Series, *, lossy: bool = False, quarantined: bool = False) -> None:
    uid = generate_uid()
    session.add(Instance(sop_instance_uid=uid, sop_class_uid=MRImageStorage, series_id=series.id,
                         transfer_syntax_uid=ExplicitVRLittleEndian, calling_ae_title="SCANNER",
                         peer_address="127.0.0.1", spool_path=f"/spool/{uid}.dcm", size_bytes=1, sha256="0" * 64,
                         received_at=T0, lossy=lossy, quarantined=quarantined))


def add_run(session: Session, study: Study, state: str, minutes: int) -> str:
    run_id = str(uuid.uuid4())
    session.add(Run(id=run_id, study_id=study.id, state=state, created_at=T0 + timedelta(minutes=minutes)))
    return run_id


def one_run(database: Database, run_id: str) -> Run:
    with database.sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run


def needs_run(database: Database, study_id: int) -> bool:
    with database.sessions() as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.needs_run


def test_a_study_whose_series_are_all_closed_gets_one_queued_run(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study)
        add_series(session, study, number=4)
        study_id = study.id
    [run_id] = create_runs(database.sessions)
    run = one_run(database, run_id)
    assert (run.study_id, run.state, run.outcome, run.error_reason, run.supersedes_run_id) == (
        study_id, "queued", None, None, None)
    assert not needs_run(database, study_id)
    assert create_runs(database.sessions) == []                    # nothing new: no second run


def test_a_study_with_a_series_still_receiving_waits(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study)
        add_series(session, study, state="receiving", number=5)
        other = add_study(session)                                 # another study is not held up
        add_series(session, other)
        study_id, other_id = study.id, other.id
    [run_id] = create_runs(database.sessions)
    assert one_run(database, run_id).study_id == other_id
    assert needs_run(database, study_id)


def test_a_study_without_anything_new_gets_no_run(database: Database) -> None:
    with database.sessions.begin() as session:
        add_series(session, add_study(session, needs_run=False))
    assert create_runs(database.sessions) == []


def test_while_a_run_is_running_the_new_one_waits_and_the_study_keeps_its_flag(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study)
        running = add_run(session, study, "running", 0)
        study_id = study.id
    assert create_runs(database.sessions) == []
    assert needs_run(database, study_id)
    with database.sessions.begin() as session:
        run = session.get(Run, running)
        assert run is not None
        run.state = "succeeded"
    [second] = create_runs(database.sessions)
    assert one_run(database, second).supersedes_run_id == running


def test_a_queued_run_reads_everything_so_no_second_run_is_made(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study)
        add_run(session, study, "queued", 0)
        study_id = study.id
    assert create_runs(database.sessions) == []
    assert not needs_run(database, study_id)
    with database.sessions() as session:
        assert len(session.scalars(select(Run).where(Run.study_id == study_id)).all()) == 1


def test_the_new_run_supersedes_the_latest_finished_run(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study)
        add_run(session, study, "succeeded", 0)
        latest = add_run(session, study, "failed", 20)
        add_run(session, study, "not_analysed", 10)
        other = add_study(session, needs_run=False)
        add_run(session, other, "succeeded", 30)                  # another study's run is not superseded
    [run_id] = create_runs(database.sessions)
    assert one_run(database, run_id).supersedes_run_id == latest


def test_a_series_closed_incomplete_makes_a_not_analysed_run_saying_which(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study, number=3, description="t1_mprage",
                   record={"complete": False, "reason": "5 of 6 images received (ImagesInAcquisition)"})
        add_series(session, study, number=None, description=None,
                   record={"complete": False, "reason": "slice gap", "timed_out": True})
        add_series(session, study, number=7, record={"complete": True, "reason": None})
        add_series(session, study, number=8, count=0, record={"complete": False, "reason": "empty"})
        add_series(session, study, number=9, record=None)
        study_id = study.id
    expected = ("incomplete series: series 3 (t1_mprage): 5 of 6 images received (ImagesInAcquisition); "
                "series ? (no description): slice gap")
    with database.sessions() as session:
        reason = incomplete_reason(session, study_id)
    assert reason == expected
    [run_id] = create_runs(database.sessions)
    run = one_run(database, run_id)
    assert (run.outcome, run.error_reason, run.state) == (Outcome.INCOMPLETE_SERIES.value, expected, "queued")


def test_series_number_zero_is_named(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study, number=0, description="", record={"complete": False, "reason": "gap"})
        study_id = study.id
    with database.sessions() as session:
        assert incomplete_reason(session, study_id) == "incomplete series: series 0 (no description): gap"


def test_no_incomplete_series_means_no_reason(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study, record={"complete": True, "reason": "geometry not checkable (ValueError)"})
        study_id = study.id
    with database.sessions() as session:
        assert incomplete_reason(session, study_id) is None


def test_study_input_lossy_counts_kept_instances_of_that_study_only(database: Database) -> None:
    with database.sessions.begin() as session:
        clean, lossy, quarantined, other = (add_study(session) for _ in range(4))
        add_instance(session, add_series(session, clean))
        series = add_series(session, lossy)
        add_instance(session, series)
        add_instance(session, series, lossy=True)
        add_instance(session, add_series(session, quarantined), lossy=True, quarantined=True)
        add_instance(session, add_series(session, other), lossy=True)
        ids = clean.id, lossy.id, quarantined.id
    with database.sessions() as session:
        assert [study_input_lossy(session, study_id) for study_id in ids] == [False, True, False]


def test_a_held_study_does_not_hold_up_the_next_one(database: Database) -> None:
    with database.sessions.begin() as session:
        running = add_study(session)                              # first in line: its run is running
        add_series(session, running)
        add_run(session, running, "running", 0)
        queued = add_study(session)                               # second: its run is queued
        add_series(session, queued)
        add_run(session, queued, "queued", 0)
        fresh = add_study(session)                                # third: nothing in the way
        add_series(session, fresh)
        fresh_id = fresh.id
    [run_id] = create_runs(database.sessions)
    assert one_run(database, run_id).study_id == fresh_id


def test_incomplete_reasons_are_the_study_s_own_and_count_single_instance_series(database: Database) -> None:
    with database.sessions.begin() as session:
        study = add_study(session)
        add_series(session, study, number=2, count=1, record={"complete": False, "reason": "1 of 160 images"})
        other = add_study(session, needs_run=False)
        add_series(session, other, number=5, record={"complete": False, "reason": "not ours"})
        study_id = study.id
    with database.sessions() as session:
        assert incomplete_reason(session, study_id) == "incomplete series: series 2 (t1): 1 of 160 images"
