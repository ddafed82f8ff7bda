"""The quiet period and the incomplete limit, measured against a clock the test controls.

``complete_quiet_series`` reads the time once per call (``utcnow``); the test
replaces that clock, writes the series' rows and spooled headers itself, and
moves the clock to just before and exactly at each limit.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Instance, Series, Study
from dicom_node.db.session import Database
from dicom_node.ingest import completeness
from dicom_node.ingest.completeness import Verdict, complete_quiet_series

T0 = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
QUIET_S = 30.0
LIMIT_S = 600.0
JUST = timedelta(milliseconds=1)


@dataclass
class Clock:
    """The time ``complete_quiet_series`` sees."""

    now: datetime = T0
    reads: list[datetime] = field(default_factory=list)

    def __call__(self) -> datetime:
        self.reads.append(self.now)
        return self.now

    def at(self, seconds: float) -> None:
        self.now = T0 + timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    fake = Clock()
    monkeypatch.setattr(completeness, "utcnow", fake)
    yield fake


@dataclass
class Spooled:
    """One series written as the edge leaves it: header files and rows."""

    sessions: sessionmaker[Session]
    directory: Path
    series_id: int = 0
    count: int = 0

    def add(self, positions: list[float], at: datetime) -> None:
        """Spool one instance per slice position and record them, the last one arriving *at*."""
        with self.sessions.begin() as session:
            series = session.get(Series, self.series_id)
            assert series is not None
            for z in positions:
                uid = generate_uid()
                path = self.directory / f"{uid}.dcm"
                _header(uid, z).save_as(path, enforce_file_format=True)
                session.add(Instance(sop_instance_uid=uid, sop_class_uid=MRImageStorage, series_id=self.series_id,
                                     transfer_syntax_uid=ExplicitVRLittleEndian, calling_ae_title="SCANNER",
                                     peer_address="127.0.0.1", spool_path=str(path), size_bytes=path.stat().st_size,
                                     sha256="0" * 64, received_at=at))
            series.instance_count += len(positions)
            series.last_received_at = at
            self.count = series.instance_count

    def row(self) -> Series:
        with self.sessions() as session:
            series = session.get(Series, self.series_id)
            assert series is not None
            return series

    def completeness(self) -> dict[str, Any]:
        """The series row's completeness verdict, which the caller expects to be there."""
        verdict = self.row().completeness
        assert verdict is not None
        return verdict


def _header(sop_uid: UID, z: float) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, z]
    return ds


def _spool(database: Database, tmp_path: Path, positions: list[float], at: datetime = T0) -> Spooled:
    directory = tmp_path / "spool" / uuid.uuid4().hex
    directory.mkdir(parents=True)
    with database.sessions.begin() as session:
        study = Study(study_instance_uid=generate_uid(), first_received_at=at, last_received_at=at, needs_run=True)
        session.add(study)
        session.flush()
        series = Series(series_instance_uid=generate_uid(), study_id=study.id, series_number=3,
                        series_description="t1", state="receiving", instance_count=0, first_received_at=at,
                        last_received_at=at)
        session.add(series)
        session.flush()
        series_id = int(series.id)
    spooled = Spooled(database.sessions, directory, series_id)
    spooled.add(positions, at)
    return spooled


EVEN = [2.0 * i for i in range(6)]
GAP = [0.0, 2.0, 4.0, 8.0, 10.0]  # the slice at 6 mm is missing


def test_a_complete_series_closes_exactly_when_the_quiet_period_has_passed(
        database: Database, tmp_path: Path, clock: Clock) -> None:
    series = _spool(database, tmp_path, EVEN)
    clock.at(QUIET_S - 0.001)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    row = series.row()
    assert row.state == "receiving" and row.completeness is None and row.completed_at is None
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    row = series.row()
    assert row.state == "complete"
    assert row.completed_at is not None and row.completed_at.replace(tzinfo=UTC) == T0 + timedelta(seconds=QUIET_S)
    assert row.completeness == {"complete": True, "reason": None, "expected_count": None, "checked_count": 6}
    clock.at(QUIET_S + 3600)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0  # closed once


def test_a_new_instance_restarts_the_quiet_period(database: Database, tmp_path: Path, clock: Clock) -> None:
    series = _spool(database, tmp_path, EVEN[:3])
    clock.at(20)
    series.add(EVEN[3:], clock.now)                  # more slices 20 s later
    clock.at(20 + QUIET_S - 0.001)                   # 50 s after the first, 30 s less 1 ms after the last
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    assert series.row().state == "receiving"
    clock.at(20 + QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    assert series.completeness()["checked_count"] == 6


def test_each_series_has_its_own_quiet_period(database: Database, tmp_path: Path, clock: Clock) -> None:
    early = _spool(database, tmp_path, EVEN)
    late = _spool(database, tmp_path, EVEN, at=T0 + timedelta(seconds=10))
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    assert (early.row().state, late.row().state) == ("complete", "receiving")
    clock.at(QUIET_S + 10)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    assert late.row().state == "complete"


def test_an_incomplete_series_waits_for_the_incomplete_limit_then_closes_timed_out(
        database: Database, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    series = _spool(database, tmp_path, GAP)
    checks = _counting(monkeypatch)
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    row = series.row()
    assert row.state == "receiving" and row.completed_at is None
    reason = "slice gap of 4.00 mm after slice 3 of 5 where the spacing is 2.00 mm (1 slice(s) missing)"
    assert row.completeness == {"complete": False, "reason": reason, "expected_count": None, "checked_count": 5}
    assert checks == [5]
    clock.at(LIMIT_S - 0.001)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    assert checks == [5]                             # nothing new: not read again
    assert series.row().state == "receiving"
    clock.at(LIMIT_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    assert checks == [5, 5]
    row = series.row()
    assert row.state == "complete"
    assert row.completed_at is not None and row.completed_at.replace(tzinfo=UTC) == T0 + timedelta(seconds=LIMIT_S)
    assert row.completeness == {"complete": False, "reason": reason, "expected_count": None, "checked_count": 5,
                                "timed_out": True}


def test_the_incomplete_limit_counts_from_the_last_instance(database: Database, tmp_path: Path,
                                                             clock: Clock) -> None:
    series = _spool(database, tmp_path, GAP[:3])
    clock.at(100)
    series.add(GAP[3:], clock.now)
    clock.at(LIMIT_S)                                # 600 s after the first instance, 500 s after the last
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    assert series.row().state == "receiving"
    clock.at(100 + LIMIT_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    assert series.completeness()["timed_out"] is True


def test_the_missing_slice_arriving_late_completes_the_series(database: Database, tmp_path: Path,
                                                              clock: Clock) -> None:
    series = _spool(database, tmp_path, GAP)
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    clock.at(200)
    series.add([6.0], clock.now)
    clock.at(200 + QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    row = series.row()
    assert row.completeness == {"complete": True, "reason": None, "expected_count": None, "checked_count": 6}
    assert row.completed_at is not None
    assert row.completed_at.replace(tzinfo=UTC) == T0 + timedelta(seconds=200 + QUIET_S)


def test_an_instance_arriving_during_the_check_keeps_the_series_open(
        database: Database, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    series = _spool(database, tmp_path, EVEN[:5])
    read_headers = completeness._headers

    def late_arrival(paths: Any) -> list[Dataset]:
        headers = read_headers(paths)
        series.add([EVEN[5]], T0 + timedelta(seconds=QUIET_S))   # the edge records one more meanwhile
        return headers

    monkeypatch.setattr(completeness, "_headers", late_arrival)
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    row = series.row()
    assert row.state == "receiving" and row.instance_count == 6 and row.completeness is None


def test_a_series_whose_geometry_cannot_be_checked_closes_for_the_run_to_judge(
        database: Database, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    series = _spool(database, tmp_path, EVEN)

    def broken(headers: Any) -> Verdict:
        raise ValueError("untrusted header")

    monkeypatch.setattr(completeness, "evaluate_series", broken)
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    row = series.row()
    assert row.state == "complete"
    assert row.completeness == {"complete": True, "reason": "geometry not checkable (ValueError)",
                                "expected_count": None, "checked_count": 6}


def test_quarantined_and_unreadable_instances_are_left_out_of_the_check(
        database: Database, tmp_path: Path, clock: Clock) -> None:
    series = _spool(database, tmp_path, EVEN)
    with database.sessions.begin() as session:
        rows = session.scalars(select(Instance).where(Instance.series_id == series.series_id)
                               .order_by(Instance.id)).all()
        rows[2].quarantined = True                    # would leave a gap if it were read
        Path(rows[3].spool_path).write_bytes(b"not DICOM")
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    reason = series.completeness()["reason"]
    assert reason == "slice gap of 6.00 mm after slice 2 of 4 where the spacing is 2.00 mm (2 slice(s) missing)"


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the instances of each evaluated series."""
    checks: list[int] = []
    evaluate = completeness.evaluate_series

    def counting(headers: Any) -> Verdict:
        checks.append(len(headers))
        return evaluate(headers)

    monkeypatch.setattr(completeness, "evaluate_series", counting)
    return checks


def test_the_default_incomplete_limit_is_ten_minutes(database: Database, tmp_path: Path, clock: Clock) -> None:
    series = _spool(database, tmp_path, GAP)
    clock.at(600 - 0.001)
    assert complete_quiet_series(database.sessions, QUIET_S) == 0
    clock.at(600)
    assert complete_quiet_series(database.sessions, QUIET_S) == 1
    assert series.completeness()["timed_out"] is True


def test_closed_series_are_not_read_again(database: Database, tmp_path: Path, clock: Clock,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _spool(database, tmp_path, EVEN)
    checks = _counting(monkeypatch)
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    clock.at(QUIET_S + 1)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    assert checks == [6]


def test_every_quiet_series_is_considered_in_one_pass(database: Database, tmp_path: Path, clock: Clock,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    waiting = _spool(database, tmp_path, GAP)                   # checked once already, nothing new since
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    first = _spool(database, tmp_path, EVEN, at=T0 + timedelta(seconds=40))
    second = _spool(database, tmp_path, EVEN[:4], at=T0 + timedelta(seconds=40))
    checks = _counting(monkeypatch)
    clock.at(40 + QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 2   # both counted
    assert sorted(checks) == [4, 6] and waiting.row().state == "receiving"
    assert first.row().state == second.row().state == "complete"


def test_a_series_is_judged_by_its_own_instances(database: Database, tmp_path: Path, clock: Clock) -> None:
    complete = _spool(database, tmp_path, EVEN)
    gapped = _spool(database, tmp_path, GAP)                     # same arrival time and plane, other series
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    assert (complete.row().state, gapped.row().state) == ("complete", "receiving")
    assert complete.completeness()["checked_count"] == 6
    assert gapped.completeness()["reason"].startswith("slice gap of 4.00 mm")


def test_closing_one_series_leaves_a_twin_alone(database: Database, tmp_path: Path, clock: Clock) -> None:
    complete = _spool(database, tmp_path, EVEN[:5])
    twin = _spool(database, tmp_path, GAP)                       # same count (5), same last arrival
    assert complete.count == twin.count == 5
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 1
    assert twin.row().state == "receiving" and twin.completeness()["complete"] is False


@pytest.mark.parametrize("meanwhile", ["same time", "replaced", "closed elsewhere"])
def test_a_change_during_the_check_wins(database: Database, tmp_path: Path, clock: Clock,
                                        monkeypatch: pytest.MonkeyPatch, meanwhile: str) -> None:
    series = _spool(database, tmp_path, EVEN[:5])
    read_headers = completeness._headers
    elsewhere = T0 + timedelta(seconds=7)

    def change(paths: Any) -> list[Dataset]:
        headers = read_headers(paths)
        if meanwhile == "same time":                             # one more instance, same arrival stamp
            series.add([EVEN[5]], T0)
        else:
            with database.sessions.begin() as session:
                row = session.get(Series, series.series_id)
                assert row is not None
                if meanwhile == "replaced":                      # a resent instance: same count, later stamp
                    row.last_received_at = T0 + timedelta(seconds=1)
                else:                                            # another scheduler closed it
                    row.state, row.completed_at = "complete", elsewhere
        return headers

    monkeypatch.setattr(completeness, "_headers", change)
    clock.at(QUIET_S)
    assert complete_quiet_series(database.sessions, QUIET_S, LIMIT_S) == 0
    row = series.row()
    if meanwhile == "closed elsewhere":
        assert row.completed_at is not None
        assert row.completed_at.replace(tzinfo=UTC) == elsewhere and row.completeness is None
    else:
        assert row.state == "receiving" and row.completeness is None


def test_aware_keeps_an_offset_and_marks_naive_values_utc() -> None:
    plus_one = datetime(2026, 1, 5, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    assert completeness._aware(plus_one) is plus_one
    assert completeness._aware(datetime(2026, 1, 5, 10, 0)) == T0
