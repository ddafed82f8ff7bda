"""Webhook notifications: runs that failed or were not analysed, deliveries dead-lettered.

A durable outbox, like the deliveries': a pass (:meth:`Notifier.run_once`)
first *finds* events in the database -- runs that ended ``failed`` or
``not_analysed`` and deliveries in the dead-letter state during the last
``notifications.lookback_h`` hours -- and inserts one ``notifications`` row per
event and subscribed webhook (a unique key makes that once, whichever process
processed the run: node, worker process, Celery worker), then *sends* the due
rows: a JSON POST signed with the webhook's secret, retried with exponential
backoff and jitter up to the webhook's ``max_attempts``, then ``dead`` (logged,
counted in ``/metrics``).

Signature (see docs/operations.md): ``X-DicomNode-Signature: sha256=<hex>``,
the HMAC-SHA256, keyed with the secret's UTF-8 bytes, of the bytes
``<X-DicomNode-Timestamp> "." <raw body>``.

The payload holds UIDs, ids, states, outcome codes and stage names, never
patient data, nor the runs' ``error_reason`` text (it may quote header values
or validation messages): receivers follow the admin view's link for that.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Delivery, DeliveryState, Notification, NotificationState, Run, RunState, Study, utcnow
from dicom_node.settings import Settings, Webhook

logger = logging.getLogger(__name__)

RUN_EVENTS = {"run.failed": RunState.FAILED.value, "run.not_analysed": RunState.NOT_ANALYSED.value}
DEAD_LETTERED = "delivery.dead_lettered"
#: Least seconds between two background passes of :meth:`Notifier.tick`.
SCAN_INTERVAL_S = 2.0
#: Most events found, and most rows sent, per webhook and pass.
BATCH = 100


@dataclass(frozen=True)
class PostResult:
    """What one POST got: the HTTP status (None: no answer) and an error text of ours."""

    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True on a 2xx answer."""
        return self.status is not None and 200 <= self.status < 300


Poster = Callable[[str, bytes, Mapping[str, str], float], PostResult]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a 3xx is a failed attempt
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post_json(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> PostResult:
    """POST *body* to *url*; *timeout_s* bounds connecting and every read.  Never raises for the network."""
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310 (http/https: settings)
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            response.read(65536)
            return PostResult(int(response.status))
    except urllib.error.HTTPError as exc:
        exc.close()
        return PostResult(exc.code, f"HTTP {exc.code}")
    except (OSError, http.client.HTTPException) as exc:  # URLError, refused, TimeoutError, reset, bad answer
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return PostResult(None, f"{type(reason).__name__}: {reason}")


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 keyed with *secret* of ``timestamp + "." + body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def backoff_seconds(attempts: int, hook: Webhook, rng: random.Random | None = None) -> float:
    """Exponential backoff after *attempts* failures, +-20 % jitter, capped at ``max_backoff_s``."""
    base = min(hook.max_backoff_s, hook.initial_backoff_s * (2 ** max(0, attempts - 1)))
    return min(hook.max_backoff_s, base * (0.8 + 0.4 * (rng or random).random()))


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat(timespec="seconds")


class Notifier:
    """Finds events, queues them per webhook and sends what is due.

    Parameters
    ----------
    settings : Settings
        Node settings (``notifications``, ``network.ae_title``, ``device.name``).
    sessions : sessionmaker
        Database sessions.
    poster : callable, optional
        ``poster(url, body, headers, timeout_s) -> PostResult`` (default :func:`post_json`).
    clock : callable, optional
        Aware "now" (default UTC now); tests pass a controlled one.
    rng : random.Random, optional
        Jitter of the backoff.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *, poster: Poster = post_json,
                 clock: Callable[[], datetime] = utcnow, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.poster = poster
        self.clock = clock
        self.rng = rng or random.Random()
        self._pool: ThreadPoolExecutor | None = None
        self._future: Future[None] | None = None
        self._last_pass = float("-inf")
        self._closing = threading.Event()

    # ----- driven by the scheduler --------------------------------------------------------------
    def tick(self) -> None:
        """Start a background pass unless one is running or the last began under :data:`SCAN_INTERVAL_S` ago."""
        if not self.settings.notifications.webhooks or self._closing.is_set():
            return
        now = time.monotonic()
        if (self._future is not None and not self._future.done()) or now - self._last_pass < SCAN_INTERVAL_S:
            return
        self._last_pass = now
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="notify")
        self._future = self._pool.submit(self._background)

    def _background(self) -> None:
        try:
            self.run_once()
        except Exception:  # logged; the next pass retries (the rows are durable)
            logger.exception("notification pass failed")

    def close(self) -> None:
        """Stop: a pass in progress ends after its current request."""
        self._closing.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    # ----- one pass -----------------------------------------------------------------------------
    def run_once(self) -> tuple[int, int]:
        """Find new events, then send the due rows; return (rows queued, rows attempted)."""
        return self.scan(), self.send_due()

    def scan(self) -> int:
        """Queue a row for every event of the lookback window not yet queued for a subscribed webhook."""
        hooks = self.settings.notifications.webhooks
        cutoff = self.clock() - timedelta(hours=self.settings.notifications.lookback_h)
        queued = 0
        for event, state in RUN_EVENTS.items():
            for hook in (h for h in hooks if event in h.events):
                queued += self._scan_runs(event, state, hook.name, cutoff)
        subscribed = [h.name for h in hooks if DEAD_LETTERED in h.events]
        if subscribed:
            queued += self._scan_dead_letters(subscribed, cutoff)
        return queued

    def _scan_runs(self, event: str, state: str, hook: str, cutoff: datetime) -> int:
        known = exists().where(Notification.event == event, Notification.subject_id == Run.id,
                               Notification.webhook == hook)
        query = (select(Run.id, Run.state, Run.outcome, Run.error_stage, Run.attempts, Run.created_at,
                        Run.finished_at, Study.study_instance_uid)
                 .join(Study, Study.id == Run.study_id)
                 .where(Run.state == state, func.coalesce(Run.finished_at, Run.created_at) >= cutoff, ~known)
                 .order_by(Run.created_at).limit(BATCH))
        with self.sessions() as session:
            rows = session.execute(query).all()
        return sum(self._queue(event, row.id, hook, {
            "event": event, "occurred_at": _iso(row.finished_at or row.created_at), "node": self._node(),
            "run": {"id": row.id, "study_instance_uid": row.study_instance_uid, "state": row.state,
                    "outcome": row.outcome, "error_stage": row.error_stage, "attempts": row.attempts,
                    "created_at": _iso(row.created_at), "finished_at": _iso(row.finished_at),
                    "url": self._link(f"/runs/{row.id}")},
        }) for row in rows)

    def _scan_dead_letters(self, hooks: list[str], cutoff: datetime) -> int:
        queued, after = 0, 0
        while True:  # pages by id: notified dead letters stay in the window and must not hide newer ones
            query = (select(Delivery, Study.study_instance_uid)
                     .join(Run, Run.id == Delivery.run_id).join(Study, Study.id == Run.study_id)
                     .where(Delivery.state == DeliveryState.DEAD.value, Delivery.id > after,
                            func.coalesce(Delivery.last_attempt_at, Delivery.created_at) >= cutoff)
                     .order_by(Delivery.id).limit(BATCH))
            with self.sessions() as session:
                found = [(d, uid) for d, uid in session.execute(query).all()]
                # A replayed dead letter that dies again is a new event: "<id>/<replays>".
                subjects = {d.id: f"{d.id}" + (f"/{n}" if (n := sum(h.get("event") == "replayed"
                                                                      for h in d.history or [])) else "")
                            for d, _ in found}
                known = {(subject, hook) for subject, hook in session.execute(
                    select(Notification.subject_id, Notification.webhook).where(
                        Notification.event == DEAD_LETTERED, Notification.subject_id.in_(subjects.values())))}
            for delivery, study_uid in found:
                subject = subjects[delivery.id]
                new = [hook for hook in hooks if (subject, hook) not in known]
                if new:
                    payload = self._dead_letter_payload(delivery, study_uid)
                    queued += sum(self._queue(DEAD_LETTERED, subject, hook, payload) for hook in new)
            if len(found) < BATCH:
                return queued
            after = found[-1][0].id

    def _dead_letter_payload(self, delivery: Delivery, study_uid: str) -> dict[str, Any]:
        status = None if delivery.last_status is None else f"0x{delivery.last_status:04X}"
        return {
            "event": DEAD_LETTERED, "occurred_at": _iso(delivery.last_attempt_at or delivery.created_at),
            "node": self._node(),
            "delivery": {"id": delivery.id, "destination": delivery.destination, "object_kind": delivery.object_kind,
                         "sop_instance_uid": delivery.sop_instance_uid, "attempts": delivery.attempts,
                         "failure_class": delivery.failure_class, "last_status": status,
                         "url": self._link("/dead-letters")},
            "run": {"id": delivery.run_id, "study_instance_uid": study_uid,
                    "url": self._link(f"/runs/{delivery.run_id}")},
        }

    def _node(self) -> dict[str, str]:
        return {"ae_title": self.settings.network.ae_title, "device_name": self.settings.device.name}

    def _link(self, path: str) -> str | None:
        base = self.settings.notifications.admin_url
        return base + path if base else None

    def _queue(self, event: str, subject: str, hook: str, payload: dict[str, Any]) -> int:
        now = self.clock()
        try:
            with self.sessions.begin() as session:
                session.add(Notification(event=event, subject_id=subject, webhook=hook, payload=payload,
                                         state=NotificationState.PENDING.value, attempts=0, next_attempt_at=now,
                                         created_at=now))
        except IntegrityError:  # queued meanwhile by another node sharing the database
            return 0
        logger.info("notification queued: %s %s for webhook %s", event, subject, hook)
        return 1

    def send_due(self) -> int:
        """POST every pending row whose time has come; return how many were attempted."""
        now = self.clock()
        with self.sessions() as session:
            due = session.scalars(select(Notification.id).where(
                Notification.state == NotificationState.PENDING.value, Notification.next_attempt_at <= now,
            ).order_by(Notification.next_attempt_at).limit(BATCH)).all()
        attempted = 0
        for row_id in due:
            if self._closing.is_set():
                break
            attempted += self._attempt(row_id)
        return attempted

    def _attempt(self, row_id: int) -> bool:
        now = self.clock()
        longest = max((h.timeout_s for h in self.settings.notifications.webhooks), default=0.0)
        with self.sessions.begin() as session:  # claim: move the next attempt past this one
            claimed = session.execute(update(Notification).where(
                Notification.id == row_id, Notification.state == NotificationState.PENDING.value,
                Notification.next_attempt_at <= now,
            ).values(next_attempt_at=now + timedelta(seconds=longest + 30.0)).execution_options(
                synchronize_session=False))
            row = session.get(Notification, row_id) if claimed.rowcount else None  # type: ignore[attr-defined]
            if row is None:
                return False
            hook = self.settings.notifications.webhook(row.webhook)
            event, payload = row.event, dict(row.payload)
        if hook is None:
            self._record(row_id, None, PostResult(None, "webhook no longer configured"))
            return True
        body = json.dumps({**payload, "notification_id": row_id}, sort_keys=True, separators=(",", ":")).encode()
        timestamp = str(int(self.clock().timestamp()))
        headers = {"Content-Type": "application/json", "User-Agent": "dicom-node-webhook/1",
                   "X-DicomNode-Event": event, "X-DicomNode-Delivery": str(row_id),
                   "X-DicomNode-Timestamp": timestamp,
                   "X-DicomNode-Signature": signature(hook.secret.get_secret_value(), timestamp, body)}
        self._record(row_id, hook, self.poster(hook.url, body, headers, hook.timeout_s))
        return True

    def _record(self, row_id: int, hook: Webhook | None, result: PostResult) -> None:
        now = self.clock()
        with self.sessions.begin() as session:
            row = session.get(Notification, row_id)
            if row is None:
                return
            row.attempts += 1
            row.last_attempt_at, row.last_status = now, result.status
            row.last_error = None if result.ok else (result.error or f"HTTP {result.status}")
            if result.ok:
                row.state, row.sent_at = NotificationState.SENT.value, now
                logger.info("notification %d (%s) sent to webhook %s (HTTP %d)", row_id, row.event, row.webhook,
                            result.status)
            elif hook is None or row.attempts >= hook.max_attempts:
                row.state = NotificationState.DEAD.value
                logger.error("notification %d (%s) to webhook %s dead after %d attempt(s): %s", row_id, row.event,
                             row.webhook, row.attempts, row.last_error)
            else:
                delay = backoff_seconds(row.attempts, hook, self.rng)
                row.next_attempt_at = now + timedelta(seconds=delay)
                logger.warning("notification %d (%s) to webhook %s failed (%s); retry in %.1f s", row_id,
                               row.event, row.webhook, row.last_error, delay)
