"""Webhook notifications against a local HTTP receiver: signed, retried, once per event, no patient data."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, inspect, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from alembic import command
from core.errors import ConfigError
from dicom_node.cli.localpacs import free_port, wait_for
from dicom_node.db.models import Delivery, Notification, Run, RunState, Study, utcnow
from dicom_node.db.session import Database, alembic_config, make_engine, make_sessionmaker, open_database
from dicom_node.ops.metrics import NodeCollector, make_registry
from dicom_node.ops.views import effective_config
from dicom_node.outbox import notify
from dicom_node.outbox.delivery import retry_deliveries
from dicom_node.outbox.notify import Notifier
from dicom_node.scheduler import Scheduler
from dicom_node.settings import Settings, load_settings
from tests.conftest import make_settings
from tests.ops.seed import PATIENT_ID, RUN_NA, seed
from tests.support.postgres import postgres_schema
from tests.support.webhooks import Received, WebhookReceiver, webhook_receiver

__all__ = ["postgres_schema", "webhook_receiver"]

SECRET = "s3cret-for-the-tests-0123456789"
ADMIN = "https://node.example.org/admin"
PATIENT_NAME = "Doe^Jane"


class Clock:
    """A controlled "now" (aware, UTC) the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def hook_settings(tmp_path: Path, url: str, **hook: Any) -> Settings:
    webhook = {"name": "alerts", "url": url, "secret": SECRET, "initial_backoff_s": 10.0, "max_backoff_s": 600.0,
               "timeout_s": 5.0, **hook}
    return make_settings(tmp_path, **{"notifications.webhooks": [webhook], "notifications.admin_url": ADMIN})


def add_run(sessions: sessionmaker[Session], state: str, *, outcome: str | None, finished: datetime | None = None,
            error_reason: str | None = None, error_stage: str | None = None) -> tuple[str, str]:
    """A finished run of a study with patient data; returns (run id, study UID)."""
    now = utcnow()
    study_uid = f"2.25.{uuid.uuid4().int}"
    run_id = str(uuid.uuid4())
    with sessions.begin() as session:
        study = Study(study_instance_uid=study_uid, patient_id="NOTIFY-PID-4711", accession_number="NOTIFY-ACC-9",
                      first_received_at=now, last_received_at=now)
        session.add(study)
        session.flush()
        session.add(Run(id=run_id, study_id=study.id, state=state, outcome=outcome, created_at=now,
                        finished_at=finished or now, error_reason=error_reason, error_stage=error_stage))
    return run_id, study_uid


def rows(sessions: sessionmaker[Session]) -> list[Notification]:
    with sessions() as session:
        return list(session.scalars(select(Notification).order_by(Notification.id)).all())


def verify(request: Received, secret: str = SECRET) -> dict[str, Any]:
    """Check the signature as a receiver would (independently of the node's code); return the payload."""
    timestamp = request.headers["x-dicomnode-timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + request.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["x-dicomnode-signature"], f"sha256={expected}")
    assert request.headers["content-type"] == "application/json"
    payload: dict[str, Any] = json.loads(request.body)
    assert request.headers["x-dicomnode-event"] == payload["event"]
    assert request.headers["x-dicomnode-delivery"] == str(payload["notification_id"])
    return payload


# ----- settings ---------------------------------------------------------------------------------------------------
def test_webhook_settings_are_validated_naming_the_key(tmp_path: Path) -> None:
    good = {"name": "a", "url": "https://hooks.example.org/x", "secret": SECRET}
    with pytest.raises(ConfigError, match=r"notifications\.webhooks\.0\.url: .*http:// or https://"):
        make_settings(tmp_path, **{"notifications.webhooks": [{**good, "url": "ftp://hooks.example.org/x"}]})
    with pytest.raises(ConfigError, match=r"notifications\.webhooks\.0\.secret: .*at least 16"):
        make_settings(tmp_path, **{"notifications.webhooks": [{**good, "secret": "short"}]})
    with pytest.raises(ConfigError, match=r"notifications\.webhooks\.0\.events\.0: Input should be"):
        make_settings(tmp_path, **{"notifications.webhooks": [{**good, "events": ["run.succeeded"]}]})
    with pytest.raises(ConfigError, match=r"notifications\.webhooks\.0\.timeout_s: .*greater than 0"):
        make_settings(tmp_path, **{"notifications.webhooks": [{**good, "timeout_s": 0}]})
    with pytest.raises(ConfigError, match=r"notifications\.webhooks: .*unique"):
        make_settings(tmp_path, **{"notifications.webhooks": [good, good]})
    with pytest.raises(ConfigError, match=r"notifications\.admin_url: "):
        make_settings(tmp_path, **{"notifications.admin_url": "node.example.org"})
    hook = make_settings(tmp_path, **{"notifications.webhooks": [good]}).notifications.webhooks[0]
    assert hook.events == ("run.failed", "run.not_analysed", "delivery.dead_lettered")
    assert (hook.timeout_s, hook.max_attempts) == (10.0, 8)


def test_webhooks_come_from_the_environment_and_their_secrets_are_never_shown(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[storage]\ndata_dir = "var"\n')
    hooks = [{"name": "chat", "url": "https://chat.example.org/hooks/T0KEN-IN-PATH?k=v", "secret": SECRET,
              "events": ["delivery.dead_lettered"], "max_attempts": 3}]
    settings = load_settings(config, environ={"DICOM_NODE_NOTIFICATIONS__WEBHOOKS": json.dumps(hooks),
                                              "DICOM_NODE_NOTIFICATIONS__LOOKBACK_H": "6"})
    hook = settings.notifications.webhooks[0]
    assert (hook.name, hook.events, hook.max_attempts, settings.notifications.lookback_h) == (
        "chat", ("delivery.dead_lettered",), 3, 6.0)
    assert hook.secret.get_secret_value() == SECRET and hook.url.endswith("T0KEN-IN-PATH?k=v")
    shown = " ".join(f"{k}={v}" for k, v in effective_config(settings)) + repr(settings)
    shown += json.dumps(settings.model_dump(mode="json"))
    assert SECRET not in shown and "T0KEN" not in shown
    assert "https://chat.example.org/***" in shown


# ----- events and payloads ----------------------------------------------------------------------------------------
def test_seeded_not_analysed_run_and_dead_letter_are_posted_signed_without_patient_data(
        tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    settings = hook_settings(tmp_path, webhook_receiver.url)
    db = open_database(settings.database_url)
    seed(db.sessions)   # a not-analysed run, a succeeded run with a dead pdf delivery, a queued run
    clock = Clock()
    assert Notifier(settings, db.sessions, clock=clock).run_once() == (2, 2)
    got = {r.headers["x-dicomnode-event"]: r for r in webhook_receiver.received()}
    assert set(got) == {"run.not_analysed", "delivery.dead_lettered"}
    for request in got.values():
        assert request.method == "POST" and request.path == "/hooks/dicom-node"
        assert abs(int(request.headers["x-dicomnode-timestamp"]) - clock.now.timestamp()) < 2
        for phi in (PATIENT_ID, "OPS-PID", "ACC-OPS"):      # the seeded studies' patient ID and accession numbers
            assert phi.encode() not in request.body
    run = verify(got["run.not_analysed"])
    assert run["run"]["id"] == RUN_NA and run["run"]["outcome"] == "no_suitable_series"
    assert run["run"]["study_instance_uid"] == "1.2.826.0.1.3680043.10.1389.42.2"
    assert run["run"]["url"] == f"{ADMIN}/runs/{RUN_NA}"
    assert run["node"] == {"ae_title": "AD_NODE", "device_name": "AD_NODE"}
    dead = verify(got["delivery.dead_lettered"])
    assert dead["delivery"]["failure_class"] == "out_of_resources" and dead["delivery"]["last_status"] == "0xA700"
    assert dead["delivery"]["object_kind"] == "pdf" and dead["delivery"]["url"] == f"{ADMIN}/dead-letters"
    assert [(r.state, r.attempts, r.last_status) for r in rows(db.sessions)] == [("sent", 1, 200)] * 2
    db.engine.dispose()


def test_failed_run_is_posted_once_without_its_reason_text(tmp_path: Path,
                                                          webhook_receiver: WebhookReceiver) -> None:
    settings = hook_settings(tmp_path, webhook_receiver.url)
    db = open_database(settings.database_url)
    run_id, study_uid = add_run(db.sessions, RunState.FAILED.value, outcome="processing_error",
                                error_stage="report_built", error_reason=f"sr failed validation: {PATIENT_NAME}")
    notifier = Notifier(settings, db.sessions)
    notifier.run_once()
    notifier.run_once()                                       # a second pass
    Notifier(settings, db.sessions).run_once()                # another node on the same database
    [request] = webhook_receiver.received()
    payload = verify(request)
    assert payload["event"] == "run.failed"
    assert payload["run"] | {"created_at": None, "finished_at": None} == {
        "id": run_id, "study_instance_uid": study_uid, "state": "failed", "outcome": "processing_error",
        "error_stage": "report_built", "attempts": 0, "url": f"{ADMIN}/runs/{run_id}",
        "created_at": None, "finished_at": None}
    for phi in (PATIENT_NAME, "Doe", "NOTIFY-PID", "NOTIFY-ACC", "validation"):
        assert phi.encode() not in request.body
    assert len(rows(db.sessions)) == 1
    db.engine.dispose()


def test_events_are_filtered_per_webhook_and_old_history_is_not_replayed(
        tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    settings = hook_settings(tmp_path, webhook_receiver.url, events=["run.failed"])
    db = open_database(settings.database_url)
    add_run(db.sessions, RunState.NOT_ANALYSED.value, outcome="qc_failed")           # not subscribed
    add_run(db.sessions, RunState.SUCCEEDED.value, outcome="analysed")               # no event
    add_run(db.sessions, RunState.FAILED.value, outcome="processing_error",
            finished=utcnow() - timedelta(hours=25))                                 # before the lookback window
    recent, _ = add_run(db.sessions, RunState.FAILED.value, outcome="processing_error")
    assert Notifier(settings, db.sessions).run_once() == (1, 1)
    [request] = webhook_receiver.received()
    assert verify(request)["run"]["id"] == recent
    db.engine.dispose()


# ----- retries -------------------------------------------------------------------------------------------------------
def test_retried_with_growing_backoff_until_the_receiver_answers(tmp_path: Path,
                                                                 webhook_receiver: WebhookReceiver) -> None:
    settings = hook_settings(tmp_path, webhook_receiver.url, max_attempts=5)
    db = open_database(settings.database_url)
    add_run(db.sessions, RunState.NOT_ANALYSED.value, outcome="no_suitable_series")
    webhook_receiver.statuses.extend([500, 500])
    clock = Clock()
    notifier = Notifier(settings, db.sessions, clock=clock, rng=random.Random(7))
    delays = []
    assert notifier.run_once() == (1, 1)
    for expected_attempts in (1, 2):
        [row] = rows(db.sessions)
        assert (row.state, row.attempts, row.last_status, row.last_error) == ("pending", expected_attempts, 500,
                                                                            "HTTP 500")
        assert row.last_attempt_at is not None
        delays.append((aware(row.next_attempt_at) - aware(row.last_attempt_at)).total_seconds())
        clock.advance(delays[-1] - 0.5)
        assert notifier.send_due() == 0                       # not due yet: nothing sent
        clock.advance(1.0)
        assert notifier.send_due() == 1
    [row] = rows(db.sessions)
    assert (row.state, row.attempts, row.last_status, row.last_error) == ("sent", 3, 200, None)
    assert row.sent_at is not None and aware(row.sent_at) == clock.now
    assert 8.0 <= delays[0] <= 12.0 and 16.0 <= delays[1] <= 24.0   # 10 s then 20 s, +-20 % jitter
    requests = webhook_receiver.received()
    assert len(requests) == 3
    assert len({r.body for r in requests}) == 1               # the same event, the same body each time
    assert {r.headers["x-dicomnode-delivery"] for r in requests} == {str(row.id)}
    for request in requests:
        verify(request)
    db.engine.dispose()


def test_dead_after_max_attempts_logged_and_counted(tmp_path: Path, webhook_receiver: WebhookReceiver,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    settings = hook_settings(tmp_path, webhook_receiver.url, max_attempts=3, initial_backoff_s=1.0,
                             max_backoff_s=1.5)
    db = open_database(settings.database_url)
    add_run(db.sessions, RunState.FAILED.value, outcome="processing_error")
    webhook_receiver.statuses.extend([503, 503, 503, 200])
    clock = Clock()
    notifier = Notifier(settings, db.sessions, clock=clock)
    notifier.run_once()
    delays = []
    with caplog.at_level(logging.ERROR, logger="dicom_node.outbox.notify"):
        for _ in range(5):
            [row] = rows(db.sessions)
            if row.state == "pending":
                delays.append((aware(row.next_attempt_at) - aware(row.last_attempt_at or clock.now)).total_seconds())
            clock.advance(60)
            notifier.send_due()
    [row] = rows(db.sessions)
    assert (row.state, row.attempts, row.last_status) == ("dead", 3, 503)
    assert len(webhook_receiver.received()) == 3
    assert max(delays) <= 1.5                                 # capped at max_backoff_s
    assert "dead after 3 attempt(s): HTTP 503" in caplog.text and "alerts" in caplog.text
    body = generate_latest(make_registry(NodeCollector(db.sessions, cache_s=0))).decode()
    samples = {(s.name, s.labels.get("state")): s.value for f in text_string_to_metric_families(body)
               for s in f.samples if s.name == "dicom_node_notifications"}
    assert samples == {("dicom_node_notifications", "pending"): 0.0, ("dicom_node_notifications", "sent"): 0.0,
                       ("dicom_node_notifications", "dead"): 1.0}
    db.engine.dispose()


def test_unreachable_receiver_is_retried_and_the_node_keeps_going(tmp_path: Path) -> None:
    settings = hook_settings(tmp_path, f"http://127.0.0.1:{free_port()}/hook")   # nothing listens there
    db = open_database(settings.database_url)
    add_run(db.sessions, RunState.FAILED.value, outcome="processing_error")
    add_run(db.sessions, RunState.NOT_ANALYSED.value, outcome="qc_failed")
    assert Notifier(settings, db.sessions).run_once() == (2, 2)
    for row in rows(db.sessions):
        assert (row.state, row.attempts, row.last_status) == ("pending", 1, None)
        assert "ConnectionRefusedError" in (row.last_error or "")
        assert aware(row.next_attempt_at) > utcnow()
    db.engine.dispose()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


def test_every_request_has_a_timeout(tmp_path: Path, silent_port: int) -> None:
    settings = hook_settings(tmp_path, f"http://127.0.0.1:{silent_port}/hook", timeout_s=0.3)
    db = open_database(settings.database_url)
    add_run(db.sessions, RunState.FAILED.value, outcome="processing_error")
    started = time.monotonic()
    Notifier(settings, db.sessions).run_once()
    assert time.monotonic() - started < 5
    [row] = rows(db.sessions)
    assert row.state == "pending" and "timed out" in (row.last_error or "")
    db.engine.dispose()


def test_redirects_are_not_followed_and_removed_webhooks_end_dead(tmp_path: Path,
                                                                  webhook_receiver: WebhookReceiver) -> None:
    settings = hook_settings(tmp_path, webhook_receiver.url)
    db = open_database(settings.database_url)
    add_run(db.sessions, RunState.FAILED.value, outcome="processing_error")
    webhook_receiver.statuses.append(302)
    Notifier(settings, db.sessions).run_once()
    assert [r.path for r in webhook_receiver.received()] == ["/hooks/dicom-node"]
    [row] = rows(db.sessions)
    assert (row.state, row.last_status) == ("pending", 302)
    with db.sessions.begin() as session:
        session.execute(update(Notification).where(Notification.id == row.id).values(next_attempt_at=utcnow()))
    renamed = make_settings(tmp_path, **{"notifications.webhooks": [
        {"name": "other", "url": webhook_receiver.url, "secret": SECRET, "events": ["delivery.dead_lettered"]}]})
    Notifier(renamed, db.sessions).send_due()
    [row] = rows(db.sessions)
    assert (row.state, row.last_error) == ("dead", "webhook no longer configured")
    assert len(webhook_receiver.received()) == 1
    db.engine.dispose()


def test_a_replayed_dead_letter_that_dies_again_is_notified_again(tmp_path: Path,
                                                                   webhook_receiver: WebhookReceiver) -> None:
    settings = hook_settings(tmp_path, webhook_receiver.url, events=["delivery.dead_lettered"])
    db = open_database(settings.database_url)
    run_id, _ = add_run(db.sessions, RunState.SUCCEEDED.value, outcome="analysed")
    now = utcnow()
    with db.sessions.begin() as session:
        delivery = Delivery(run_id=run_id, destination="pacs", sop_instance_uid="2.25.1", object_path="/x/sr.dcm",
                            state="dead", attempts=8, failure_class="connection_refused", created_at=now,
                            next_attempt_at=now, last_attempt_at=now)
        session.add(delivery)
        session.flush()
        delivery_id = delivery.id
    notifier = Notifier(settings, db.sessions)
    notifier.run_once()
    assert retry_deliveries(db.sessions, [delivery_id]) == 1
    notifier.run_once()                                       # pending again: no event
    with db.sessions.begin() as session:                    # it dies again
        session.execute(update(Delivery).where(Delivery.id == delivery_id).values(state="dead",
                                                                                 last_attempt_at=utcnow()))
    notifier.run_once()
    notifier.run_once()
    assert [r.subject_id for r in rows(db.sessions)] == [str(delivery_id), f"{delivery_id}/1"]
    assert [verify(r)["delivery"]["id"] for r in webhook_receiver.received()] == [delivery_id, delivery_id]
    db.engine.dispose()


def test_dead_letters_already_notified_do_not_hide_newer_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               webhook_receiver: WebhookReceiver) -> None:
    monkeypatch.setattr(notify, "BATCH", 2)                   # pages of 2 instead of 100
    settings = hook_settings(tmp_path, webhook_receiver.url, events=["delivery.dead_lettered"])
    db = open_database(settings.database_url)
    run_id, _ = add_run(db.sessions, RunState.SUCCEEDED.value, outcome="analysed")

    def dead_letter() -> None:
        now = utcnow()
        with db.sessions.begin() as session:
            session.add(Delivery(run_id=run_id, destination="pacs", sop_instance_uid="2.25.2", object_path="/x",
                                 state="dead", attempts=1, failure_class="rejected_permanent", created_at=now,
                                 next_attempt_at=now, last_attempt_at=now))
    for _ in range(5):
        dead_letter()
    notifier = Notifier(settings, db.sessions)
    assert notifier.scan() == 5 and notifier.scan() == 0
    dead_letter()
    assert notifier.scan() == 1
    assert [notifier.send_due() for _ in range(4)] == [2, 2, 2, 0]
    assert len(webhook_receiver.received()) == 6
    db.engine.dispose()


# ----- the node's loop ---------------------------------------------------------------------------------------------
def test_the_scheduler_sends_notifications(tmp_path: Path, webhook_receiver: WebhookReceiver) -> None:
    settings = hook_settings(tmp_path, webhook_receiver.url)
    db = open_database(settings.database_url)
    run_id, _ = add_run(db.sessions, RunState.NOT_ANALYSED.value, outcome="incomplete_series")
    scheduler = Scheduler(settings, db.sessions, lambda _run_id: None)
    try:
        scheduler.tick()
        [request] = wait_for(webhook_receiver.received, 10, "the webhook POST", 0.05)
        assert verify(request)["run"]["id"] == run_id
        wait_for(lambda: rows(db.sessions)[0].state == "sent", 10, "the row to be sent", 0.05)
    finally:
        scheduler.stop()
    db.engine.dispose()


def test_a_node_without_webhooks_starts_no_thread(settings: Settings, database: Database) -> None:
    notifier = Notifier(settings, database.sessions)
    notifier.tick()
    assert not [t for t in threading.enumerate() if t.name.startswith("notify")]
    notifier.close()


# ----- the migration, SQLite and PostgreSQL --------------------------------------------------------------------------
def _migration_down_and_up(engine: Engine) -> None:
    cfg = alembic_config(str(engine.url))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    assert "notifications" in inspect(engine).get_table_names()
    sessions = make_sessionmaker(engine)
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)

    def row() -> Notification:
        return Notification(event="run.failed", subject_id="r1", webhook="w", payload={"event": "run.failed"},
                            next_attempt_at=now, created_at=now)
    with sessions.begin() as session:
        session.add(row())
    with pytest.raises(IntegrityError, match=r"(?i)unique"), sessions.begin() as session:
        session.add(row())                                    # the same event for the same webhook
    with sessions() as session:
        stored = session.scalars(select(Notification)).one()
        assert (stored.state, stored.attempts, stored.payload) == ("pending", 0, {"event": "run.failed"})
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0004")
    assert "notifications" not in inspect(engine).get_table_names()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.check(cfg)


def test_notifications_table_migrates_down_and_up_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'n.sqlite3'}")
    _migration_down_and_up(engine)
    engine.dispose()


@pytest.mark.postgres
def test_notifications_table_migrates_down_and_up_on_postgres(postgres_schema: Engine) -> None:
    _migration_down_and_up(postgres_schema)


@pytest.mark.postgres
def test_a_pass_on_postgres(tmp_path: Path, postgres_schema: Engine, webhook_receiver: WebhookReceiver) -> None:
    cfg = alembic_config(str(postgres_schema.url))
    with postgres_schema.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    sessions = make_sessionmaker(postgres_schema)
    seed(sessions)
    settings = hook_settings(tmp_path, webhook_receiver.url)
    assert Notifier(settings, sessions).run_once() == (2, 2)
    assert Notifier(settings, sessions).run_once() == (0, 0)
    assert sorted(verify(r)["event"] for r in webhook_receiver.received()) == ["delivery.dead_lettered",
                                                                              "run.not_analysed"]
