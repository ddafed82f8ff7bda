"""When a series is complete, and when a study gets a run.

C-STORE never says "the series is done".  A series is complete when no
instance arrived for ``completeness.quiet_period_s`` **and** its content says
so (:func:`evaluate_series`): within each image orientation the slice
positions are evenly spaced along the slice normal with no gap, every position
has the same number of images (echoes, phases), and the image count reaches
``ImagesInAcquisition`` (per acquisition) where the scanner sent it; a
multi-frame instance must hold ``NumberOfFrames`` frames.  A series that stays
incomplete for ``completeness.incomplete_limit_s`` after its last instance is
closed as incomplete, with the reason; the study's run then ends "not
analysed: incomplete series".

A study whose series are all closed and which received something new gets one
run.  A run created while an earlier run of the study is queued is not needed
(the queued run reads everything when it starts); while one is running, the new
run waits for it.  A new run ``supersedes`` the study's latest finished run, so
its report replaces the earlier one.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core.errors import Outcome
from dicom_node.db.models import Instance, Run, RunState, Series, SeriesState, Study, utcnow

logger = logging.getLogger(__name__)

POSITION_TOLERANCE_MM = 0.01
SPACING_TOLERANCE = 0.1
_HEADER_TAGS = ["ImageOrientationPatient", "ImagePositionPatient", "ImagesInAcquisition", "AcquisitionNumber",
                "NumberOfFrames", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"]
_FINISHED = (RunState.SUCCEEDED.value, RunState.NOT_ANALYSED.value, RunState.FAILED.value)


@dataclass(frozen=True)
class Verdict:
    """The content check of one series."""

    complete: bool
    reason: str | None
    expected_count: int | None

    def as_json(self, instance_count: int, **extra: Any) -> dict[str, Any]:
        """The ``series.completeness`` record."""
        return {"complete": self.complete, "reason": self.reason, "expected_count": self.expected_count,
                "checked_count": instance_count, **extra}


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n else None


def _frame_geometry(ds: Dataset) -> list[tuple[tuple[float, ...] | None, tuple[float, ...] | None]]:
    """(orientation, position) of every image of an instance (each frame of a multi-frame one)."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        return [(_floats(ds.get("ImageOrientationPatient"), 6), _floats(ds.get("ImagePositionPatient"), 3))]
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    shared_orient = shared[0].get("PlaneOrientationSequence")
    out = []
    for item in frames:
        orient_seq = item.get("PlaneOrientationSequence") or shared_orient
        pos_seq = item.get("PlanePositionSequence")
        orient = _floats(orient_seq[0].get("ImageOrientationPatient"), 6) if orient_seq else None
        pos = _floats(pos_seq[0].get("ImagePositionPatient"), 3) if pos_seq else None
        out.append((orient, pos))
    return out


def _check_stack(orientation: tuple[float, ...], positions: list[tuple[float, ...]]) -> str | None:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    distances = np.round(np.array([np.asarray(p) @ normal for p in positions]) / POSITION_TOLERANCE_MM)
    per_position = Counter(distances.tolist())
    counts = set(per_position.values())
    if len(counts) > 1:
        return (f"{len(per_position)} slice positions with between {min(counts)} and {max(counts)} images each "
                "(images missing at some positions)")
    unique = np.sort(np.array(list(per_position), dtype=np.float64)) * POSITION_TOLERANCE_MM
    if unique.size < 3:
        return None
    steps = np.diff(unique)
    spacing = float(np.median(steps))
    tol = max(POSITION_TOLERANCE_MM * 2, SPACING_TOLERANCE * spacing)
    bad = np.flatnonzero(np.abs(steps - spacing) > tol)
    if bad.size:
        n = int(bad[0])
        missing = round(steps[n] / spacing) - 1
        what = f"{missing} slice(s) missing" if missing >= 1 else "uneven spacing"
        return (f"slice gap of {steps[n]:.2f} mm after slice {n + 1} of {unique.size} where the spacing is "
                f"{spacing:.2f} mm ({what})")
    return None


def evaluate_series(headers: Sequence[Dataset]) -> Verdict:
    """Does the content of a series say it is complete?

    Parameters
    ----------
    headers : sequence of Dataset
        The series' instances, pixel data not needed.

    Returns
    -------
    Verdict
        Complete or not, the reason when not, and the expected image count.
    """
    stacks: dict[tuple[float, ...], list[tuple[float, ...]]] = defaultdict(list)
    images = 0
    for ds in headers:
        geometry = _frame_geometry(ds)
        frames = ds.get("NumberOfFrames")
        if frames not in (None, "") and ds.get("PerFrameFunctionalGroupsSequence") and int(frames) != len(geometry):
            return Verdict(False, f"a multi-frame instance declares {int(frames)} frames but describes "
                                  f"{len(geometry)}", None)
        images += len(geometry)
        for orient, pos in geometry:
            if orient is not None and pos is not None:
                stacks[tuple(round(v, 3) for v in orient)].append(pos)
    expected: int | None = None
    per_acq = {int(v) for ds in headers if (v := ds.get("ImagesInAcquisition")) not in (None, "")}
    if len(per_acq) == 1:
        acquisitions = {str(ds.get("AcquisitionNumber", "")) for ds in headers}
        expected = per_acq.pop() * max(1, len(acquisitions))
        if images < expected:
            return Verdict(False, f"{images} of {expected} images received (ImagesInAcquisition)", expected)
    for orientation, positions in stacks.items():
        reason = _check_stack(orientation, positions)
        if reason is not None:
            return Verdict(False, reason, expected)
    return Verdict(True, None, expected)


def _headers(paths: Sequence[str]) -> list[Dataset]:
    out: list[Dataset] = []
    for path in paths:
        try:
            out.append(dcmread(Path(path), stop_before_pixels=True, specific_tags=_HEADER_TAGS))
        except (OSError, InvalidDicomError) as exc:
            logger.warning("completeness: cannot read a spooled header (%s)", type(exc).__name__)
    return out


def complete_quiet_series(sessions: sessionmaker[Session], quiet_period_s: float,
                          incomplete_limit_s: float = 600.0) -> int:
    """Close series that are quiet and complete, or quiet past the incomplete limit.

    Parameters
    ----------
    sessions : sessionmaker
        Database sessions.
    quiet_period_s : float
        ``completeness.quiet_period_s``.
    incomplete_limit_s : float
        ``completeness.incomplete_limit_s``: a series still incomplete this long
        after its last instance is closed as incomplete.

    Returns
    -------
    int
        How many series were closed.
    """
    now = utcnow()
    limit = now - timedelta(seconds=quiet_period_s)
    with sessions() as session:
        quiet = session.execute(
            select(Series.id, Series.instance_count, Series.last_received_at, Series.completeness)
            .where(Series.state == SeriesState.RECEIVING.value, Series.last_received_at <= limit)
        ).all()
    closed = 0
    for series_id, count, last, record in quiet:
        timed_out = (now - _aware(last)).total_seconds() >= incomplete_limit_s
        if record and record.get("checked_count") == count and not record.get("complete") and not timed_out:
            continue  # nothing new since the last check
        with sessions() as session:
            paths = session.scalars(select(Instance.spool_path).where(
                Instance.series_id == series_id, Instance.quarantined.is_(False))).all()
        try:
            verdict = evaluate_series(_headers(paths))
        except Exception as exc:  # noqa: BLE001 - untrusted headers must not stop completeness of other series
            logger.warning("series row %d: geometry not checkable (%s); the run will judge it", series_id,
                           type(exc).__name__)
            verdict = Verdict(True, f"geometry not checkable ({type(exc).__name__})", None)
        values: dict[str, Any] = {"completeness": verdict.as_json(count), "expected_count": verdict.expected_count}
        if verdict.complete or timed_out:
            values.update(state=SeriesState.COMPLETE.value, completed_at=now)
            if not verdict.complete:
                values["completeness"] = verdict.as_json(count, timed_out=True)
        with sessions.begin() as session:
            result = session.execute(update(Series).where(
                Series.id == series_id, Series.instance_count == count, Series.last_received_at == last,
                Series.state == SeriesState.RECEIVING.value).values(**values))
            changed = int(result.rowcount or 0)  # type: ignore[attr-defined]
        if changed and "state" in values:
            closed += 1
            if not verdict.complete:
                logger.warning("series row %d closed incomplete after %.0f s: %s", series_id,
                               incomplete_limit_s, verdict.reason)
        elif changed:
            logger.info("series row %d quiet but incomplete: %s", series_id, verdict.reason)
    return closed


def _aware(value: Any) -> Any:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def incomplete_reason(session: Session, study_id: int) -> str | None:
    """Why the study's run cannot be analysed: a series closed incomplete; None if none was."""
    rows = session.execute(select(Series.series_number, Series.series_description, Series.completeness)
                           .where(Series.study_id == study_id, Series.instance_count > 0)).all()
    reasons = [f"series {number if number is not None else '?'} ({description or 'no description'}): "
               f"{record.get('reason')}"
               for number, description, record in rows if record and record.get("complete") is False]
    return "incomplete series: " + "; ".join(reasons) if reasons else None


def create_runs(sessions: sessionmaker[Session]) -> list[str]:
    """Create a run for each study with new instances and no series still receiving.

    The run supersedes the study's latest finished run; when a series of the
    study was closed incomplete, the run is created with outcome
    ``incomplete_series`` and the reason, which processing turns into a
    "not analysed" report.
    """
    created: list[str] = []
    with sessions.begin() as session:
        receiving = select(Series.study_id).where(Series.state == SeriesState.RECEIVING.value)
        studies = session.scalars(select(Study).where(Study.needs_run.is_(True), Study.id.not_in(receiving))).all()
        for study in studies:
            states = set(session.scalars(select(Run.state).where(
                Run.study_id == study.id, Run.state.in_((RunState.QUEUED.value, RunState.RUNNING.value)))).all())
            if RunState.RUNNING.value in states:
                continue  # a new run after this one finishes, superseding it
            study.needs_run = False
            if RunState.QUEUED.value in states:
                continue  # the queued run reads all instances when it starts
            previous = session.scalar(select(Run.id).where(Run.study_id == study.id, Run.state.in_(_FINISHED))
                                      .order_by(Run.created_at.desc()).limit(1))
            run = Run(id=str(uuid.uuid4()), study_id=study.id, state=RunState.QUEUED.value, created_at=utcnow(),
                      supersedes_run_id=previous)
            reason = incomplete_reason(session, study.id)
            if reason is not None:
                run.outcome, run.error_reason = Outcome.INCOMPLETE_SERIES.value, reason
            session.add(run)
            created.append(run.id)
            logger.info("run %s queued for study %s%s%s", run.id, study.study_instance_uid,
                        f", superseding run {previous}" if previous else "",
                        " (incomplete series)" if reason else "")
    return created


def study_input_lossy(session: Session, study_id: int) -> bool:
    """True when any kept (not quarantined) instance of the study was lossy compressed."""
    found = session.scalar(select(Instance.id).join(Series).where(
        Series.study_id == study_id, Instance.quarantined.is_(False), Instance.lossy.is_(True)).limit(1))
    return found is not None
