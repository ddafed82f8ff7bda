"""What the HTTP side reads, handed from the node's composition root to the app and its views."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.ops.echo import EchoProbe
from dicom_node.ops.health import Readiness
from dicom_node.ops.metrics import NodeCollector
from dicom_node.ops.modelinfo import ModelIdentity
from dicom_node.settings import Settings


@dataclass
class OpsContext:
    """What the HTTP side reads: settings, database sessions, readiness checks, the metrics collector, C-ECHOs."""

    settings: Settings
    sessions: sessionmaker[Session]
    readiness: Readiness
    collector: NodeCollector
    #: Replays dead deliveries (ids) and returns how many were put back; default: the outbox's.
    retry: Callable[[list[int]], int] | None = None
    #: The periodic C-ECHO of the destinations (started and stopped with the HTTP server).
    echo: EchoProbe | None = None
    #: The model's identity where the node's worker processes load it (read ahead at start).
    model: ModelIdentity | None = None
