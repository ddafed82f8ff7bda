"""Series completeness from content, the incomplete limit, and runs for late instances."""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset, dcmread
from sqlalchemy import select

from core.errors import Outcome
from dicom_node.db.models import Run, Series
from dicom_node.ingest.completeness import complete_quiet_series, create_runs, evaluate_series
from tests.conftest import make_settings
from tests.support.edge import edge_server, finish_run, mr_series, no_patient_data_in_logs, storescu

__all__ = ["no_patient_data_in_logs"]


def _slice(z: float, orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0), **extra: object) -> Dataset:
    ds = Dataset()
    ds.ImageOrientationPatient = list(orientation)
    ds.ImagePositionPatient = [0.0, 0.0, z] if orientation[2] == 0 and orientation[5] == 0 else [z, 0.0, 0.0]
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def test_content_rules() -> None:
    even = [_slice(2.0 * i) for i in range(6)]
    assert evaluate_series(even).complete
    gap = evaluate_series(even[:2] + even[3:])
    assert not gap.complete and "1 slice(s) missing" in (gap.reason or "")
    short = evaluate_series([_slice(2.0 * i, ImagesInAcquisition=8) for i in range(6)])
    assert not short.complete and short.reason == "6 of 8 images received (ImagesInAcquisition)"
    assert evaluate_series([_slice(2.0 * i, ImagesInAcquisition=6) for i in range(6)]).expected_count == 6
    echoes = [_slice(2.0 * i) for i in range(4) for _ in range(2)]
    assert evaluate_series(echoes).complete
    broken = evaluate_series(echoes[:-1])
    assert not broken.complete and "images missing at some positions" in (broken.reason or "")
    localizer = [_slice(z, o) for o in ((1, 0, 0, 0, 1, 0), (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1))
                 for z in (-10.0, 0.0, 10.0)]
    assert evaluate_series(localizer).complete
    frames = Dataset()
    frames.NumberOfFrames = 3
    frames.PerFrameFunctionalGroupsSequence = [Dataset(), Dataset()]
    assert "declares 3 frames" in (evaluate_series([frames]).reason or "")


def test_incomplete_series_waits_then_ends_as_incomplete_run(tmp_path: Path) -> None:
    files = mr_series(tmp_path / "s", 9, 6, drop=(2,))
    with edge_server(make_settings(tmp_path)) as server:
        sessions = server.recorder.sessions
        assert storescu(server.port, files).returncode == 0
        assert complete_quiet_series(sessions, 0, incomplete_limit_s=3600) == 0
        assert create_runs(sessions) == []                       # waits for the missing slice
        with sessions() as session:
            series = session.scalars(select(Series)).one()
            assert series.completeness is not None
            assert series.state == "receiving" and series.completeness["complete"] is False
        assert complete_quiet_series(sessions, 0, incomplete_limit_s=0) == 1
        [run_id] = create_runs(sessions)
        with sessions() as session:
            run = session.get(Run, run_id)
            series = session.scalars(select(Series)).one()
    assert series.completeness is not None and run is not None
    assert series.completeness["timed_out"] is True
    assert run.outcome == Outcome.INCOMPLETE_SERIES.value
    assert run.error_reason == ("incomplete series: series 3 (t1_mprage_tra_p2_iso): 5 of 6 images received "
                                "(ImagesInAcquisition)")


def test_late_instance_makes_a_new_run_that_supersedes_the_finished_one(tmp_path: Path) -> None:
    files = mr_series(tmp_path / "s", 10, 6)
    for path in files:  # a scanner that does not send ImagesInAcquisition: spacing alone decides
        ds = dcmread(path)
        del ds.ImagesInAcquisition
        ds.save_as(path)
    with edge_server(make_settings(tmp_path)) as server:
        sessions = server.recorder.sessions
        assert storescu(server.port, files[:5]).returncode == 0
        assert complete_quiet_series(sessions, 0) == 1
        [first] = create_runs(sessions)
        with sessions.begin() as session:              # the run has started
            started = session.get(Run, first)
            assert started is not None
            started.state = "running"
        assert storescu(server.port, files[5:]).returncode == 0   # a late instance
        complete_quiet_series(sessions, 0)
        assert create_runs(sessions) == []             # waits for the running run
        finish_run(sessions, first)
        [second] = create_runs(sessions)
        with sessions() as session:
            run = session.get(Run, second)
            count = session.scalars(select(Series)).one().instance_count
    assert run is not None
    assert run.supersedes_run_id == first and run.outcome is None and count == 6
    assert dcmread(files[5]).InstanceNumber == 6
