"""What the HTTP side reads, handed from the node's composition root to the app and its views."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.ops.health import Readiness
from dicom_node.ops.metrics import NodeCollector
from dicom_node.settings import Settings


@dataclass
class OpsContext:
    """What the HTTP side reads: settings, database sessions, readiness checks, the metrics collector."""

    settings: Settings
    sessions: sessionmaker[Session]
    readiness: Readiness
    collector: NodeCollector
    #: Replays dead deliveries (ids) and returns how many were put back; default: the outbox's.
    retry: Callable[[list[int]], int] | None = None
