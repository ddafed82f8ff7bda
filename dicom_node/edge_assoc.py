"""The association log and the quarantine of aborted associations.

Every association is recorded (calling/called AE title, peer address, TLS,
start/end, instances stored and refused, outcome).  When an association ends
without an A-RELEASE (aborted by either side, or the connection dropped), the
instances it delivered are moved to the quarantine directory, flagged
``quarantined`` and left out of completeness and processing; re-sending them
later brings them back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import AssociationLog, Instance, Run, Series, Study
from dicom_node.ingest import Spool, utcnow

logger = logging.getLogger(__name__)


class Outcome:
    """Values of ``associations.outcome``."""

    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"


@dataclass(frozen=True)
class AssociationInfo:
    """Who opened an association."""

    calling_ae_title: str
    called_ae_title: str
    peer_address: str
    tls: bool


class AssociationJournal:
    """Writes the association log and quarantines aborted associations.

    Parameters
    ----------
    sessions : sessionmaker
        Database sessions.
    spool : Spool
        The spool (its ``quarantine`` directory receives the files).
    """

    def __init__(self, sessions: sessionmaker[Session], spool: Spool) -> None:
        self.sessions = sessions
        self.spool = spool

    def start(self, info: AssociationInfo) -> int:
        """Record a requested association; returns its log id."""
        with self.sessions.begin() as session:
            row = AssociationLog(
                calling_ae_title=info.calling_ae_title[:16], called_ae_title=info.called_ae_title[:16],
                peer_address=info.peer_address[:64], tls=info.tls, started_at=utcnow(),
                instances_stored=0, instances_refused=0,
            )
            session.add(row)
            session.flush()
            return int(row.id)

    def finish(self, log_id: int, outcome: str, reason: str | None, stored: int, refused: int) -> None:
        """Record how an association ended."""
        with self.sessions.begin() as session:
            session.execute(update(AssociationLog).where(AssociationLog.id == log_id).values(
                ended_at=utcnow(), outcome=outcome, reason=reason, instances_stored=stored,
                instances_refused=refused))

    def quarantine(self, log_id: int) -> int:
        """Move the instances of an aborted association to quarantine; returns how many."""
        with self.sessions.begin() as session:
            rows = session.execute(
                select(Instance.id, Instance.spool_path, Instance.series_id)
                .where(Instance.association_id == log_id, Instance.quarantined.is_(False))
            ).all()
            series_ids = {row[2] for row in rows}
            for instance_id, spool_path, _ in rows:
                source = Path(spool_path)
                target = self.spool.quarantine_path(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(source, target)
                except FileNotFoundError:
                    logger.warning("quarantine: spooled file of instance row %d is missing", instance_id)
                session.execute(update(Instance).where(Instance.id == instance_id).values(
                    quarantined=True, spool_path=str(target)))
            for series_id in series_ids:
                _recount(session, series_id)
        if rows:
            logger.warning("association %d aborted: %d instance(s) quarantined", log_id, len(rows))
        return len(rows)


def _recount(session: Session, series_id: int) -> None:
    """Series count without quarantined instances; the study needs a run only for new, kept data."""
    kept = session.scalar(select(func.count(Instance.id)).where(
        Instance.series_id == series_id, Instance.quarantined.is_(False))) or 0
    session.execute(update(Series).where(Series.id == series_id).values(instance_count=kept))
    study_id = session.scalar(select(Series.study_id).where(Series.id == series_id))
    last_run = session.scalar(select(func.max(Run.created_at)).where(Run.study_id == study_id))
    newer = select(Instance.id).join(Series).where(Series.study_id == study_id, Instance.quarantined.is_(False))
    if last_run is not None:
        newer = newer.where(Instance.received_at > last_run)
    needs_run = session.scalar(newer.limit(1)) is not None
    session.execute(update(Study).where(Study.id == study_id).values(needs_run=needs_run))
