"""The outbox: send due deliveries, record the real status, retry with backoff."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Delivery, DeliveryState
from dicom_node.ingest import utcnow
from dicom_node.sender import SendResult, send_file
from dicom_node.settings import Destination, Settings

logger = logging.getLogger(__name__)

Sender = Callable[[Path, Destination, Settings], SendResult]


def backoff_seconds(attempts: int, settings: Settings, rng: random.Random | None = None) -> float:
    """Exponential backoff with +-20 % jitter, capped at ``delivery.max_backoff_s``."""
    cfg = settings.delivery
    base = min(cfg.max_backoff_s, cfg.initial_backoff_s * (2 ** max(0, attempts - 1)))
    return base * (0.8 + 0.4 * (rng or random).random())


def deliver_due(sessions: sessionmaker[Session], settings: Settings, sender: Sender = send_file) -> int:
    """Attempt every pending delivery whose time has come; return how many were attempted."""
    now = utcnow()
    with sessions() as session:
        due = session.scalars(
            select(Delivery.id)
            .where(Delivery.state == DeliveryState.PENDING.value, Delivery.next_attempt_at <= now)
            .order_by(Delivery.next_attempt_at)
        ).all()
    for delivery_id in due:
        attempt(sessions, settings, delivery_id, sender)
    return len(due)


def attempt(sessions: sessionmaker[Session], settings: Settings, delivery_id: int, sender: Sender = send_file) -> None:
    """Send one delivery once and record the outcome."""
    with sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state != DeliveryState.PENDING.value:
            return
        path, dest_name = Path(delivery.object_path), delivery.destination
    try:
        destination = settings.destination(dest_name)
        result = sender(path, destination, settings)
    except (OSError, ValueError) as exc:
        result = SendResult(None, f"{type(exc).__name__}: {exc}")
    now = utcnow()
    with sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            return
        delivery.attempts += 1
        delivery.last_attempt_at = now
        delivery.last_status = result.status
        delivery.last_error = result.error
        if result.ok:
            delivery.state = DeliveryState.SENT.value
            delivery.sent_at = now
            logger.info("delivered %s to %s (status 0x%04X)", delivery.sop_instance_uid, dest_name, result.status or 0)
        elif delivery.attempts >= settings.delivery.max_attempts:
            delivery.state = DeliveryState.DEAD.value
            logger.error("delivery %d to %s dead after %d attempts: %s", delivery_id, dest_name,
                         delivery.attempts, result.error)
        else:
            delay = backoff_seconds(delivery.attempts, settings)
            delivery.next_attempt_at = now + timedelta(seconds=delay)
            logger.warning("delivery %d to %s failed (%s); retry in %.0f s", delivery_id, dest_name, result.error, delay)
