"""The outbox: send due deliveries, record the real status, retry with backoff, dead-letter.

Each delivery row is one object for one destination.  Every attempt is
appended to ``deliveries.history`` (time, DIMSE status, failure class, error).
Transient failures (association rejected transiently, Out of Resources,
timeouts, connection refused, aborts) are retried with exponential backoff and
jitter, capped at ``delivery.max_backoff_s``; permanent ones (association
rejected permanently, other failure statuses, an unreadable object) go to the
dead-letter state at once, as does a delivery that used up
``delivery.max_attempts``.  Administrators list and replay dead letters with
``dicom-node deliveries list|retry``.  The outbox lives in the database, so it
survives a restart of the node.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError
from dicom_node.db.models import Delivery, DeliveryState, utcnow
from dicom_node.net.scu import SendResult, send_file
from dicom_node.settings import Destination, Settings
from dicom_node.statuses import FailureClass

logger = logging.getLogger(__name__)

Sender = Callable[[Path, Destination, Settings], SendResult]


def backoff_seconds(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with +-20 % jitter, capped at ``delivery.max_backoff_s``."""
    cfg = settings.delivery
    base = min(cfg.max_backoff_s, cfg.initial_backoff_s * (2 ** max(0, attempts - 1)))
    return min(cfg.max_backoff_s, base * (0.8 + 0.4 * (rng or random).random()))


def _lease_seconds(settings: Settings) -> float:
    net = settings.network
    return net.acse_timeout_s + net.dimse_timeout_s + 30.0


def deliver_due(sessions: sessionmaker[Session], settings: Settings, sender: Sender = send_file) -> int:
    """Attempt every pending delivery whose time has come; return how many were attempted."""
    now = utcnow()
    with sessions() as session:
        due = session.scalars(
            select(Delivery.id)
            .where(Delivery.state == DeliveryState.PENDING.value, Delivery.next_attempt_at <= now)
            .order_by(Delivery.next_attempt_at)
        ).all()
    attempted = 0
    for delivery_id in due:
        attempted += attempt(sessions, settings, delivery_id, sender)
    return attempted


def _claim(sessions: sessionmaker[Session], settings: Settings, delivery_id: int) -> bool:
    """Take a due delivery by moving its next attempt past the send (safe with several workers)."""
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(update(Delivery).where(
            Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING.value,
            Delivery.next_attempt_at <= now,
        ).values(next_attempt_at=now + timedelta(seconds=_lease_seconds(settings))))
        return bool(result.rowcount)  # type: ignore[attr-defined]


def attempt(sessions: sessionmaker[Session], settings: Settings, delivery_id: int, sender: Sender = send_file) -> bool:
    """Send one due delivery once and record the outcome; False when it was not due (or taken)."""
    if not _claim(sessions, settings, delivery_id):
        return False
    with sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return False
        path, dest_name = Path(delivery.object_path), delivery.destination
    try:
        destination = settings.destination(dest_name)
        result = sender(path, destination, settings)
    except ConfigError as exc:
        result = SendResult(None, str(exc), FailureClass.LOCAL_ERROR)
    except (OSError, ValueError) as exc:
        result = SendResult(None, f"{type(exc).__name__}: {exc}", FailureClass.LOCAL_ERROR)
    _record(sessions, settings, delivery_id, dest_name, result)
    return True


def _record(sessions: sessionmaker[Session], settings: Settings, delivery_id: int, dest_name: str,
            result: SendResult) -> None:
    now = utcnow()
    failure = result.failure if not result.ok else None
    if not result.ok and failure is None:
        failure = FailureClass.LOCAL_ERROR
    with sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.last_status = result.status
        delivery.last_error = result.error
        delivery.failure_class = "warning" if result.warning else (failure.value if failure else None)
        entry: dict[str, Any] = {"at": now.isoformat(timespec="milliseconds"), "attempt": delivery.attempts,
                                 "status": None if result.status is None else f"0x{result.status:04X}",
                                 "class": delivery.failure_class, "error": result.error}
        delivery.history = [*(delivery.history or []), entry]
        if result.ok:
            delivery.state = DeliveryState.SENT.value
            delivery.sent_at = now
            log = logger.warning if result.warning else logger.info
            log("delivered %s to %s (status 0x%04X)", delivery.sop_instance_uid, dest_name, result.status or 0)
        elif failure is not None and failure.permanent:
            delivery.state = DeliveryState.DEAD.value
            logger.error("delivery %d to %s dead: permanent failure (%s): %s", delivery_id, dest_name,
                         failure.value, result.error)
        elif delivery.attempts >= settings.delivery.max_attempts:
            delivery.state = DeliveryState.DEAD.value
            logger.error("delivery %d to %s dead after %d attempts: %s", delivery_id, dest_name,
                         delivery.attempts, result.error)
        else:
            delay = backoff_seconds(delivery.attempts, settings)
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            logger.warning("delivery %d to %s failed (%s: %s); retry in %.1f s", delivery_id, dest_name,
                           failure.value if failure else "?", result.error, delay)


@dataclass(frozen=True)
class DeliveryView:
    """One delivery as administrators list it."""

    id: int
    run_id: str
    destination: str
    object_kind: str
    state: str
    attempts: int
    last_status: int | None
    failure_class: str | None
    last_error: str | None
    next_attempt_at: datetime | None
    history: list[Any]


def list_deliveries(sessions: sessionmaker[Session], state: str | None = None, limit: int = 100) -> list[DeliveryView]:
    """Deliveries, newest first, optionally only those in *state* (``pending``, ``sent``, ``dead``)."""
    query = select(Delivery).order_by(Delivery.created_at.desc(), Delivery.id.desc()).limit(limit)
    if state:
        query = query.where(Delivery.state == state)
    with sessions() as session:
        return [DeliveryView(d.id, d.run_id, d.destination, d.object_kind, d.state, d.attempts, d.last_status,
                             d.failure_class, d.last_error,
                             d.next_attempt_at if d.state == DeliveryState.PENDING.value else None,
                             list(d.history or []))
                for d in session.scalars(query).all()]


def retry_deliveries(sessions: sessionmaker[Session], ids: Sequence[int] = (), *, all_dead: bool = False) -> int:
    """Replay dead (or pending) deliveries now: attempts restart from zero, the history is kept.

    Parameters
    ----------
    ids : sequence of int
        Deliveries to replay.
    all_dead : bool
        Replay every dead delivery.

    Returns
    -------
    int
        How many deliveries were put back in the queue.
    """
    now = utcnow()
    query = select(Delivery).where(Delivery.state != DeliveryState.SENT.value)
    if not all_dead:
        query = query.where(Delivery.id.in_(list(ids)))
    else:
        query = query.where(Delivery.state == DeliveryState.DEAD.value)
    with sessions.begin() as session:
        rows = session.scalars(query).all()
        for delivery in rows:
            delivery.history = [*(delivery.history or []), {"at": now.isoformat(timespec="milliseconds"),
                                                            "event": "replayed", "after_attempts": delivery.attempts}]
            delivery.state = DeliveryState.PENDING.value
            delivery.attempts = 0
            delivery.next_attempt_at = now
        count = len(rows)
    if count:
        logger.info("%d delivery(ies) replayed by an administrator", count)
    return count
