"""The whole retry schedule of a delivery, on a clock and a jitter source the test controls.

A scripted sender answers each attempt; the clock the outbox reads (``utcnow``)
and the random numbers of its jitter are the test's, so every delay is known:
``min(max_backoff, initial * 2 ** (attempt - 1)) * (0.8 + 0.4 * u)``, capped at
``max_backoff``, until ``max_attempts`` failures make the delivery a dead letter.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, text
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError
from dicom_node.db.models import Delivery, Run, RunState, Study
from dicom_node.db.session import Database, open_database
from dicom_node.net.scu import SendResult
from dicom_node.outbox import delivery as outbox
from dicom_node.outbox.delivery import attempt, backoff_seconds, deliver_due, list_deliveries, retry_deliveries
from dicom_node.settings import Destination, Settings
from dicom_node.statuses import FailureClass
from tests.conftest import make_settings

T0 = datetime(2026, 2, 1, 8, 0, 0, tzinfo=UTC)
REFUSED = SendResult(None, "connection refused", FailureClass.CONNECTION_REFUSED)
SUCCESS = SendResult(0x0000, None)


def settings_for(tmp_path: Path, max_attempts: int = 5, initial: float = 2.0, cap: float = 10.0) -> Settings:
    return make_settings(tmp_path, **{
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11113}],
        "delivery.max_attempts": max_attempts, "delivery.initial_backoff_s": initial,
        "delivery.max_backoff_s": cap, "network.acse_timeout_s": 5, "network.dimse_timeout_s": 7})


class Uniform(random.Random):
    """The jitter source: the values ``random()`` returns, in turn."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)
        self.calls = 0

    def random(self) -> float:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return value


@dataclass
class Outbox:
    """A database with one queued delivery, a controlled clock and a scripted peer."""

    db: Database
    settings: Settings
    delivery_id: int
    now: datetime = T0
    answers: list[SendResult] = field(default_factory=list)
    sent: list[tuple[Path, str]] = field(default_factory=list)

    def clock(self) -> datetime:
        return self.now

    def sender(self, path: Path, destination: Destination, settings: Settings) -> SendResult:
        assert settings is self.settings
        self.sent.append((path, destination.name))
        return self.answers.pop(0)

    def deliver(self, at_s: float) -> int:
        self.now = T0 + timedelta(seconds=at_s)
        return deliver_due(self.db.sessions, self.settings, self.sender)

    def row(self) -> Delivery:
        with self.db.sessions() as session:
            row = session.get(Delivery, self.delivery_id)
            assert row is not None
            return row

    def due_in(self) -> float:
        """Seconds from the last attempt to the next."""
        row = self.row()
        assert row.last_attempt_at is not None
        return (row.next_attempt_at - row.last_attempt_at).total_seconds()


def queue(db: Database, destination: str = "pacs", path: str = "/outbox/run/sr.dcm") -> int:
    with db.sessions.begin() as session:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", first_received_at=T0, last_received_at=T0)
        session.add(study)
        session.flush()
        run = Run(id=str(uuid.uuid4()), study_id=study.id, state=RunState.SUCCEEDED.value, created_at=T0,
                  finished_at=T0)
        session.add(run)
        session.flush()
        row = Delivery(run_id=run.id, destination=destination, sop_instance_uid="2.25.1", object_path=path,
                       created_at=T0, next_attempt_at=T0)
        session.add(row)
        session.flush()
        return int(row.id)


MakeOutbox = Callable[..., Outbox]


@pytest.fixture
def make_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeOutbox]:
    databases: list[Database] = []

    def make(jitter: Uniform, **settings: float) -> Outbox:
        config = settings_for(tmp_path / str(len(databases)), **settings)  # type: ignore[arg-type]
        db = open_database(config.database_url)
        databases.append(db)
        box = Outbox(db, config, queue(db))
        monkeypatch.setattr(outbox, "utcnow", box.clock)
        monkeypatch.setattr(outbox, "random", jitter)
        return box

    yield make
    for db in databases:
        db.engine.dispose()


@pytest.mark.parametrize(("u", "delays"), [
    (0.5, [2.0, 4.0, 8.0, 10.0]),        # no jitter: doubling, then the cap
    (0.0, [1.6, 3.2, 6.4, 8.0]),         # the lowest jitter: 80 % of each step, the cap included
    (0.999, [2.3992, 4.7984, 9.5968, 10.0]),   # the highest: 120 %, never past the cap
])
def test_the_full_schedule_to_the_dead_letter(make_outbox: MakeOutbox, u: float, delays: list[float]) -> None:
    box = make_outbox(Uniform(u))
    box.answers = [REFUSED] * 5
    at = 0.0
    for number, delay in enumerate(delays, start=1):
        assert box.deliver(at) == 1
        row = box.row()
        assert (row.state, row.attempts, row.failure_class) == ("pending", number, "connection_refused")
        assert box.due_in() == pytest.approx(delay, abs=1e-6)
        at += delay
        assert box.deliver(at - 0.01) == 0                 # not due yet
    assert box.deliver(at) == 1                             # the fifth and last attempt
    row = box.row()
    assert (row.state, row.attempts) == ("dead", 5)
    assert row.history is not None
    assert [h["attempt"] for h in row.history] == [1, 2, 3, 4, 5]
    assert {h["class"] for h in row.history} == {"connection_refused"}
    assert {h["status"] for h in row.history} == {None}
    assert row.history[-1]["at"] == (T0 + timedelta(seconds=at)).isoformat(timespec="milliseconds")
    assert box.deliver(at + 3600) == 0                      # a dead letter is never tried again
    assert len(box.sent) == 5 and box.sent[0] == (Path("/outbox/run/sr.dcm"), "pacs")


def test_one_attempt_allowed_means_dead_at_the_first_transient_failure(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5), max_attempts=1)
    box.answers = [SendResult(0xA700, "out of resources", FailureClass.OUT_OF_RESOURCES)]
    assert box.deliver(0) == 1
    row = box.row()
    assert (row.state, row.attempts, row.last_status, row.failure_class) == ("dead", 1, 0xA700, "out_of_resources")
    assert row.history is not None
    assert row.history[0]["status"] == "0xA700"


def test_a_retry_that_succeeds_is_sent_at_its_time(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    box.answers = [REFUSED, SUCCESS]
    box.deliver(0)
    assert box.deliver(2.0) == 1
    row = box.row()
    assert (row.state, row.attempts, row.last_status, row.failure_class) == ("sent", 2, 0, None)
    assert row.sent_at is not None and row.sent_at.replace(tzinfo=UTC) == T0 + timedelta(seconds=2)
    assert row.history is not None
    assert [h["status"] for h in row.history] == [None, "0x0000"]


def test_a_warning_is_delivered_and_says_so(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    box.answers = [SendResult(0xB000, None)]
    box.deliver(0)
    row = box.row()
    assert row.history is not None
    assert (row.state, row.attempts, row.failure_class, row.history[0]["status"]) == ("sent", 1, "warning", "0xB000")


@pytest.mark.parametrize("failure", [FailureClass.REJECTED_PERMANENT, FailureClass.FAILURE_STATUS,
                                     FailureClass.LOCAL_ERROR])
def test_a_permanent_failure_is_dead_at_once(make_outbox: MakeOutbox, failure: FailureClass) -> None:
    box = make_outbox(Uniform(0.5))
    box.answers = [SendResult(0xC000, "cannot understand", failure)]
    box.deliver(0)
    row = box.row()
    assert (row.state, row.attempts, row.failure_class, row.last_error) == ("dead", 1, failure.value,
                                                                            "cannot understand")


@pytest.mark.parametrize("failure", [FailureClass.REJECTED_TRANSIENT, FailureClass.OUT_OF_RESOURCES,
                                     FailureClass.TIMEOUT, FailureClass.CONNECTION_REFUSED, FailureClass.ABORTED])
def test_a_transient_failure_is_retried(make_outbox: MakeOutbox, failure: FailureClass) -> None:
    box = make_outbox(Uniform(0.5))
    box.answers = [SendResult(None, "later", failure)]
    box.deliver(0)
    row = box.row()
    assert (row.state, row.attempts, row.failure_class) == ("pending", 1, failure.value)
    assert row.next_attempt_at.replace(tzinfo=UTC) == T0 + timedelta(seconds=2)


def test_a_failure_without_a_class_is_a_local_error(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    box.answers = [SendResult(0xA900, "mismatch", None)]
    box.deliver(0)
    row = box.row()
    assert (row.state, row.failure_class, row.last_status) == ("dead", "local_error", 0xA900)


def test_a_sender_that_raises_records_a_local_error(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))

    def broken(path: Path, destination: Destination, settings: Settings) -> SendResult:
        raise OSError("disk gone")

    box.now = T0
    assert deliver_due(box.db.sessions, box.settings, broken) == 1
    row = box.row()
    assert (row.state, row.failure_class, row.last_error) == ("dead", "local_error", "OSError: disk gone")


def test_an_unknown_destination_is_a_dead_letter_naming_it(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    other = queue(box.db, destination="nowhere")
    box.now = T0
    assert attempt(box.db.sessions, box.settings, other, box.sender) is True
    with box.db.sessions() as session:
        row = session.get(Delivery, other)
        assert row is not None
        assert (row.state, row.failure_class) == ("dead", "local_error")
        assert "nowhere" in (row.last_error or "")
    assert box.sent == []
    with pytest.raises(ConfigError, match="nowhere"):
        box.settings.destination("nowhere")


def test_a_delivery_being_sent_is_not_taken_twice(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    taken: list[datetime] = []

    def slow(path: Path, destination: Destination, settings: Settings) -> SendResult:
        row = box.row()
        taken.append(row.next_attempt_at)
        assert attempt(box.db.sessions, box.settings, box.delivery_id, box.sender) is False  # another worker
        return SUCCESS

    box.now = T0
    assert attempt(box.db.sessions, box.settings, box.delivery_id, slow) is True
    lease = 5 + 7 + 30.0                               # ACSE + DIMSE timeouts + 30 s
    assert taken[0].replace(tzinfo=UTC) == T0 + timedelta(seconds=lease)
    assert box.row().state == "sent" and box.sent == []
    assert attempt(box.db.sessions, box.settings, 10_000, box.sender) is False  # no such delivery


@pytest.mark.parametrize(("attempts", "expected"), [(0, 2.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 32.0),
                                                    (6, 60.0), (40, 60.0)])
def test_backoff_doubles_from_the_initial_delay_up_to_the_cap(tmp_path: Path, attempts: int, expected: float) -> None:
    settings = settings_for(tmp_path, initial=2.0, cap=60.0)
    assert backoff_seconds(attempts, settings, Uniform(0.5)) == pytest.approx(expected)


def test_backoff_jitter_stays_within_20_percent_and_under_the_cap(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, initial=2.0, cap=60.0)
    rng = random.Random(19)
    for attempts in range(1, 12):
        base = min(60.0, 2.0 * 2 ** (attempts - 1))
        delays = [backoff_seconds(attempts, settings, rng) for _ in range(200)]
        assert min(delays) >= 0.8 * base and max(delays) <= min(60.0, 1.2 * base)
        if base < 50:                                  # the jitter really spreads (not a constant factor)
            assert max(delays) - min(delays) > 0.3 * base
    assert backoff_seconds(1, settings, Uniform(0.0)) == pytest.approx(1.6)
    assert backoff_seconds(1, settings, Uniform(1.0)) == pytest.approx(2.4)
    assert backoff_seconds(6, settings, Uniform(1.0)) == pytest.approx(60.0)


def test_replay_restarts_the_count_and_keeps_the_history(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5), max_attempts=1)
    box.answers = [REFUSED, SUCCESS]
    box.deliver(0)
    sent = queue(box.db)
    box.answers.insert(0, SUCCESS)
    assert box.deliver(1) == 1                              # the second delivery is sent; the first is dead
    assert [v.state for v in list_deliveries(box.db.sessions)] == ["sent", "dead"]
    assert [v.id for v in list_deliveries(box.db.sessions, "dead")] == [box.delivery_id]
    assert list_deliveries(box.db.sessions, "dead")[0].next_attempt_at is None
    assert len(list_deliveries(box.db.sessions, limit=1)) == 1
    box.now = T0 + timedelta(seconds=50)
    assert retry_deliveries(box.db.sessions, [box.delivery_id, sent]) == 1     # a sent one is not replayed
    row = box.row()
    assert (row.state, row.attempts) == ("pending", 0)
    assert row.next_attempt_at.replace(tzinfo=UTC) == box.now
    assert row.history is not None
    assert row.history[-1] == {"at": box.now.isoformat(timespec="milliseconds"), "event": "replayed",
                               "after_attempts": 1}
    pending = list_deliveries(box.db.sessions, "pending")[0]
    assert pending.next_attempt_at is not None
    assert retry_deliveries(box.db.sessions, all_dead=True) == 0
    assert box.deliver(50) == 1
    assert box.row().state == "sent" and box.row().attempts == 1


def test_due_deliveries_go_oldest_first_and_are_all_counted(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    later = queue(box.db, path="/outbox/later/sr.dcm")
    with box.db.sessions.begin() as session:
        for delivery_id, due in ((box.delivery_id, T0 + timedelta(seconds=5)), (later, T0 + timedelta(seconds=1))):
            row = session.get(Delivery, delivery_id)
            assert row is not None
            row.next_attempt_at = due
    box.answers = [SUCCESS, SUCCESS]
    assert box.deliver(4) == 1                                   # only the one due at 1 s
    assert box.deliver(5) == 1
    assert [path.parent.name for path, _ in box.sent] == ["later", "run"]
    again = [queue(box.db, path=f"/outbox/{n}/sr.dcm") for n in ("b", "a")]
    with box.db.sessions.begin() as session:
        for delivery_id, due in zip(again, (T0 + timedelta(seconds=7), T0 + timedelta(seconds=6)), strict=True):
            row = session.get(Delivery, delivery_id)
            assert row is not None
            row.next_attempt_at = due
    box.answers = [SUCCESS, SUCCESS]
    assert box.deliver(10) == 2
    assert [path.parent.name for path, _ in box.sent[2:]] == ["a", "b"]


def test_the_list_shows_newest_first_with_the_last_answer(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    older = queue(box.db)
    with box.db.sessions.begin() as session:
        row = session.get(Delivery, older)
        assert row is not None
        row.created_at = T0 - timedelta(hours=1)                 # a higher id, created earlier
    box.answers = [SendResult(0xA700, "busy", FailureClass.OUT_OF_RESOURCES)]
    assert attempt(box.db.sessions, box.settings, box.delivery_id, box.sender) is True
    views = list_deliveries(box.db.sessions)
    assert [v.id for v in views] == [box.delivery_id, older]
    first = views[0]
    assert (first.last_status, first.failure_class, first.last_error, first.attempts) == (
        0xA700, "out_of_resources", "busy", 1)
    assert [h["status"] for h in first.history] == ["0xA700"] and views[1].history == []
    assert first.next_attempt_at is not None and first.run_id and first.destination == "pacs"


def test_the_list_is_limited_to_a_hundred_by_default(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    for _ in range(100):
        queue(box.db)
    assert len(list_deliveries(box.db.sessions)) == 100
    assert len(list_deliveries(box.db.sessions, limit=101)) == 101


def test_replay_by_id_touches_only_the_named_and_all_dead_only_the_dead(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5), max_attempts=1)
    other_dead, pending = queue(box.db), queue(box.db)
    with box.db.sessions.begin() as session:
        for delivery_id in (box.delivery_id, other_dead):
            row = session.get(Delivery, delivery_id)
            assert row is not None
            row.state, row.attempts = "dead", 1
        waiting = session.get(Delivery, pending)
        assert waiting is not None
        waiting.next_attempt_at, waiting.attempts = T0 + timedelta(hours=1), 2
    box.now = T0 + timedelta(seconds=9)
    assert retry_deliveries(box.db.sessions, [box.delivery_id]) == 1
    states = {v.id: (v.state, v.attempts) for v in list_deliveries(box.db.sessions)}
    assert states == {box.delivery_id: ("pending", 0), other_dead: ("dead", 1), pending: ("pending", 2)}
    assert retry_deliveries(box.db.sessions, all_dead=True) == 1   # the other dead one, not the pending one
    states = {v.id: (v.state, v.attempts) for v in list_deliveries(box.db.sessions)}
    assert states[other_dead] == ("pending", 0) and states[pending] == ("pending", 2)
    assert retry_deliveries(box.db.sessions) == 0                   # no ids, not all: nothing


def test_a_dead_letter_is_not_sent_even_when_asked_directly(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    with box.db.sessions.begin() as session:
        row = session.get(Delivery, box.delivery_id)
        assert row is not None
        row.state = "dead"
    box.now = T0 + timedelta(seconds=1)
    assert attempt(box.db.sessions, box.settings, box.delivery_id, box.sender) is False
    assert box.sent == [] and box.row().attempts == 0


def test_due_deliveries_are_ordered_by_the_query_not_by_an_index(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    later = queue(box.db, path="/outbox/later/sr.dcm")
    with box.db.sessions.begin() as session:
        session.execute(text("DROP INDEX ix_deliveries_state_next"))  # a table scan returns rows by id
        for delivery_id, due in ((box.delivery_id, T0 + timedelta(seconds=2)), (later, T0 + timedelta(seconds=1))):
            row = session.get(Delivery, delivery_id)
            assert row is not None
            row.next_attempt_at = due
    box.answers = [SUCCESS, SUCCESS]
    assert box.deliver(3) == 2
    assert [path.parent.name for path, _ in box.sent] == ["later", "run"]


def test_a_delivery_removed_after_its_claim_is_not_counted(make_outbox: MakeOutbox,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    box = make_outbox(Uniform(0.5))
    claim = outbox._claim

    def claim_then_remove(sessions: sessionmaker[Session], settings: Settings, delivery_id: int) -> bool:
        claimed = claim(sessions, settings, delivery_id)
        with sessions.begin() as session:  # another worker's administrator removes it in between
            session.execute(delete(Delivery).where(Delivery.id == delivery_id))
        return claimed

    monkeypatch.setattr(outbox, "_claim", claim_then_remove)
    box.now = T0
    assert deliver_due(box.db.sessions, box.settings, box.sender) == 0
    assert box.sent == []


def test_a_success_is_no_failure_whatever_the_sender_attached(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    box.answers = [SendResult(0x0000, None, FailureClass.TIMEOUT)]
    box.deliver(0)
    row = box.row()
    assert row.history is not None
    assert (row.state, row.failure_class, row.history[0]["class"]) == ("sent", None, None)


def test_the_history_keeps_every_answer_and_error(make_outbox: MakeOutbox) -> None:
    box = make_outbox(Uniform(0.5))
    box.answers = [REFUSED, SUCCESS]
    box.deliver(0)
    box.deliver(2)
    history = box.row().history
    assert history is not None
    assert [(h["attempt"], h["status"], h["class"], h["error"]) for h in history] == [
        (1, None, "connection_refused", "connection refused"), (2, "0x0000", None, None)]
    assert history[0]["at"] == "2026-02-01T08:00:00.000+00:00"


def test_a_delivery_stored_with_a_warning_is_logged_as_a_warning(make_outbox: MakeOutbox,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    box = make_outbox(Uniform(0.5))
    queue(box.db, path="/outbox/clean/sr.dcm")
    box.answers = [SendResult(0xB000, None), SUCCESS]
    with caplog.at_level(logging.INFO, logger=outbox.__name__):
        box.deliver(0)
    delivered = [(r.levelno, r.getMessage().split(" (")[0]) for r in caplog.records if "delivered" in r.getMessage()]
    assert delivered == [(logging.WARNING, "delivered 2.25.1 to pacs"), (logging.INFO, "delivered 2.25.1 to pacs")]
