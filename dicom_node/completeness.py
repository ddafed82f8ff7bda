"""When a series is complete, and when a study gets a run.

A series is complete after a quiet period with no new instance; a study whose
series are all complete and which received something new gets a run.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Run, RunState, Series, SeriesState, Study
from dicom_node.ingest import utcnow

logger = logging.getLogger(__name__)


def complete_quiet_series(sessions: sessionmaker[Session], quiet_period_s: float) -> int:
    """Mark series with no instance for the quiet period as complete."""
    now = utcnow()
    limit = now - timedelta(seconds=quiet_period_s)
    with sessions.begin() as session:
        result = session.execute(
            update(Series)
            .where(Series.state == SeriesState.RECEIVING.value, Series.last_received_at <= limit)
            .values(state=SeriesState.COMPLETE.value, completed_at=now)
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def create_runs(sessions: sessionmaker[Session]) -> list[str]:
    """Create a run for each study with new instances and no series still receiving."""
    created: list[str] = []
    with sessions.begin() as session:
        receiving = select(Series.study_id).where(Series.state == SeriesState.RECEIVING.value)
        studies = session.scalars(select(Study).where(Study.needs_run.is_(True), Study.id.not_in(receiving))).all()
        for study in studies:
            study.needs_run = False
            run = Run(id=str(uuid.uuid4()), study_id=study.id, state=RunState.QUEUED.value, created_at=utcnow())
            session.add(run)
            created.append(run.id)
            logger.info("run %s queued for study %s", run.id, study.study_instance_uid)
    return created
