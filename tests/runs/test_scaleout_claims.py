"""Scale-out building blocks: the atomic claim, takeover of a dead worker's run, the listener's publishing.

Real PostgreSQL (a private schema per test) and the real RabbitMQ of the machine (a private queue per test).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.errors import ConfigError, NodeError
from dicom_node.app import Node
from dicom_node.cli.main import build_parser, settings_from_args
from dicom_node.db.models import Run, RunState, Study, utcnow
from dicom_node.db.session import open_database, upgrade
from dicom_node.runs.celery import WorkerRuntime, handle_run
from dicom_node.runs.claims import (
    ATTEMPT_LIMIT,
    ENQUEUED,
    MAX_ATTEMPTS,
    ClaimRefusedError,
    RunLocks,
    claim_run,
    lock_key,
    worker_id,
)
from dicom_node.runs.executors import CeleryExecutor
from tests.conftest import POSTGRES_URL, make_settings

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """URL of a private, migrated schema in the machine's PostgreSQL."""
    schema = f"so_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    upgrade(url)
    yield url
    with admin.begin() as conn:
        conn.execute(text(f'drop schema "{schema}" cascade'))
    admin.dispose()


@pytest.fixture
def sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    db = open_database(pg_url, migrate=False)
    yield db.sessions
    db.engine.dispose()


@pytest.fixture
def queue() -> Iterator[str]:
    """A private queue name on the machine's RabbitMQ, deleted afterwards."""
    name = f"dicom-node.test.{uuid.uuid4().hex[:12]}"
    yield name
    with Connection(BROKER_URL) as conn:
        conn.default_channel.queue_delete(name)


def add_run(sessions: sessionmaker[Session], state: RunState = RunState.QUEUED, **values: object) -> str:
    run_id = str(uuid.uuid4())
    with sessions.begin() as session:
        study = Study(study_instance_uid=f"1.2.826.0.1.3680043.10.1389.{uuid.uuid4().int % 10**12}",
                      first_received_at=utcnow(), last_received_at=utcnow(), needs_run=False)
        session.add(study)
        session.flush()
        session.add(Run(id=run_id, study_id=study.id, state=state.value, created_at=utcnow(), **values))
    return run_id


def load(sessions: sessionmaker[Session], run_id: str) -> Run:
    with sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run


def test_only_one_of_many_concurrent_claims_wins(sessions: sessionmaker[Session]) -> None:
    run_id = add_run(sessions, claimed_by=ENQUEUED)
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def contender() -> None:
        start.wait()
        try:
            claim_run(sessions, run_id)
            outcomes.append("claimed")
        except ClaimRefusedError as exc:
            outcomes.append(exc.state)

    threads = [threading.Thread(target=contender) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["claimed"] + ["running"] * 5
    run = load(sessions, run_id)
    assert (run.state, run.attempts, run.claimed_by) == ("running", 1, worker_id())
    assert run.started_at is not None and run.claimed_at is not None


def test_an_ended_run_is_not_claimed_again(sessions: sessionmaker[Session]) -> None:
    run_id = add_run(sessions, RunState.SUCCEEDED, attempts=1)
    with pytest.raises(ClaimRefusedError, match="it is succeeded") as refused:
        claim_run(sessions, run_id)
    assert refused.value.finished
    with pytest.raises(NodeError, match="no run"):
        claim_run(sessions, "no-such-run")


def test_a_running_run_is_taken_over_only_when_its_holder_is_gone(pg_url: str,
                                                                   sessions: sessionmaker[Session]) -> None:
    run_id = add_run(sessions, RunState.RUNNING, attempts=1, claimed_by="elsewhere:1:dead", claimed_at=utcnow())
    holder = create_engine(pg_url, poolclass=NullPool).connect()  # the first worker's session, holding the run's lock
    holder.execute(text("select pg_advisory_lock(:k)"), {"k": lock_key(run_id)})
    locks = RunLocks(pg_url)
    try:
        with pytest.raises(ClaimRefusedError, match="it is running"):
            claim_run(sessions, run_id)  # no lock held: never a takeover
        with locks.hold(run_id) as held:
            assert not held  # the holder lives: the task would retry later
        holder.close()  # the first worker dies: PostgreSQL releases its lock
        with locks.hold(run_id) as held:
            assert held
            claim_run(sessions, run_id)
        run = load(sessions, run_id)
        assert (run.state, run.attempts, run.claimed_by) == ("running", 2, worker_id())
    finally:
        holder.close()
        locks.close()


def test_a_run_lost_too_often_gets_report_only_claims(pg_url: str, sessions: sessionmaker[Session]) -> None:
    run_id = add_run(sessions, RunState.RUNNING, attempts=MAX_ATTEMPTS, claimed_by="elsewhere:1:dead")
    locks = RunLocks(pg_url)
    try:
        with locks.hold(run_id) as held:
            assert held
            claim_run(sessions, run_id)  # process_run sees attempts > MAX_ATTEMPTS: "not analysed" report only
    finally:
        locks.close()
    run = load(sessions, run_id)
    assert run.state == "running" and run.attempts == MAX_ATTEMPTS + 1 < ATTEMPT_LIMIT


def test_a_run_that_keeps_losing_its_worker_ends_failed(pg_url: str, sessions: sessionmaker[Session]) -> None:
    run_id = add_run(sessions, RunState.RUNNING, attempts=ATTEMPT_LIMIT, claimed_by="elsewhere:1:dead")
    locks = RunLocks(pg_url)
    try:
        with locks.hold(run_id) as held, pytest.raises(ClaimRefusedError, match="it is failed") as refused:
            assert held
            claim_run(sessions, run_id)
    finally:
        locks.close()
    assert refused.value.finished
    run = load(sessions, run_id)
    assert run.state == "failed"
    assert run.error_reason == f"the worker processing this run was lost {ATTEMPT_LIMIT} times"


def test_worker_task_acknowledges_ended_runs_and_retries_held_ones(tmp_path: Path, pg_url: str,
                                                                  sessions: sessionmaker[Session],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(tmp_path, **{"database.url": pg_url, "processing.executor": "celery"})
    runtime = WorkerRuntime(settings)
    processed: list[str] = []
    monkeypatch.setattr("dicom_node.runs.context.build_run_context", lambda settings, sessions: _FakeContext())

    def fake_process_run(run_id: str, _ctx: object) -> None:
        claim_run(sessions, run_id)
        processed.append(run_id)

    monkeypatch.setattr("dicom_node.runs.processing.process_run", fake_process_run)
    ended = add_run(sessions, RunState.NOT_ANALYSED, attempts=1)
    queued = add_run(sessions, claimed_by=ENQUEUED)
    held = add_run(sessions, RunState.RUNNING, attempts=1, claimed_by="elsewhere:1:alive")
    holder = create_engine(pg_url, poolclass=NullPool).connect()
    holder.execute(text("select pg_advisory_lock(:k)"), {"k": lock_key(held)})
    try:
        assert handle_run(runtime, ended) is None
        assert handle_run(runtime, queued) is None
        assert handle_run(runtime, held) == 30.0
    finally:
        holder.close()
        runtime.close()
    assert processed == [queued]


class _FakeContext:
    class predictor:  # noqa: N801 - mimics RunContext.predictor.info.name
        class info:  # noqa: N801
            name = "fake"


def test_listener_only_node_loads_no_model(tmp_path: Path, pg_url: str, queue: str) -> None:
    settings = make_settings(tmp_path, **{"database.url": pg_url, "processing.executor": "celery",
                                          "model.path": str(tmp_path / "no-model-here")})
    node = Node(settings, queue=queue)
    try:
        assert node.predictor is None and isinstance(node.scheduler.executor, CeleryExecutor)
        with pytest.raises(NodeError, match="only receives"):
            node.execute("any")
    finally:
        node.scheduler.executor.shutdown(wait=False)
        node.db.engine.dispose()
    sqlite = make_settings(tmp_path / "lite", **{"processing.executor": "celery"})
    with pytest.raises(ConfigError, match="needs a database shared by all workers"):
        Node(sqlite)


def test_listener_publishes_each_queued_run_once(tmp_path: Path, pg_url: str, sessions: sessionmaker[Session],
                                                 queue: str) -> None:
    settings = make_settings(tmp_path, **{"database.url": pg_url, "processing.executor": "celery",
                                          "processing.broker_url": BROKER_URL})
    runs = [add_run(sessions) for _ in range(3)]
    already = add_run(sessions, claimed_by=ENQUEUED)
    executor = CeleryExecutor(settings, sessions, queue=queue)
    try:
        assert executor.dispatch() == 3
        assert executor.dispatch() == 0
    finally:
        executor.shutdown(wait=True)
    with Connection(BROKER_URL) as conn:
        assert conn.default_channel.queue_declare(queue=queue, passive=True).message_count == 3
    with sessions() as session:
        marks = {row.id: row.claimed_by for row in session.execute(select(Run.id, Run.claimed_by))}
    assert {marks[r] for r in [*runs, already]} == {ENQUEUED}


def test_cli_has_worker_and_executor_flag() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--executor", "celery"])
    assert settings_from_args(args).processing.executor == "celery"
    args = parser.parse_args(["worker", "--queue", "q1", "--workers", "2"])
    assert (args.command, args.queue, settings_from_args(args).processing.workers) == ("worker", "q1", 2)
