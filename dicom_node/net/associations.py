"""The association log.

Every association is recorded (calling/called AE title, peer address, TLS,
start/end, instances stored and refused, outcome).  How an association ends
never changes what it delivered: an instance answered Success is stored
(PS3.4), so the instances of an aborted or dropped association are kept,
counted and processed like any other; the log records the abort and how many
acknowledged instances it kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import AssociationLog, utcnow

logger = logging.getLogger(__name__)


class AssociationOutcome:
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
    """Writes the association log.

    Parameters
    ----------
    sessions : sessionmaker
        Database sessions.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

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
