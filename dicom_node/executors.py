"""Who processes a run -- the node's own thread pool or Celery workers -- and the claim of a run.

Both executors call the same function of a run id,
:func:`dicom_node.processing.process_run`, through :func:`run_guarded`.

Claim protocol
--------------
A run is processed by whoever *claims* it.  ``process_run`` starts with
:func:`claim_run`, one atomic ``UPDATE``::

    UPDATE runs SET state='running', claimed_by=<worker>, claimed_at=now,
                    started_at=now, attempts=attempts+1
     WHERE id=<run> AND state='queued'

so of two workers that receive the same run, exactly one wins; the other gets
:class:`ClaimRefusedError`.

A worker killed mid-run leaves its run ``running``.  With Celery the task is
acknowledged late (after ``process_run`` returns), so the broker hands the
message to another worker.  That worker may take the run over only if its
previous holder is really gone -- a redelivery alone does not prove it (a
worker cut off from the broker but not from the database still works on the
run).  Liveness is what the database itself knows: a worker processes a run
while holding a PostgreSQL *advisory lock* on it (:class:`RunLocks`), on a
connection of its own.  PostgreSQL releases that lock the moment the
holder's session ends -- process killed, machine gone (TCP keepalive), network
cut -- and never while it lives, whatever the holder is doing (a long stage
holding Python's GIL cannot make a live worker look dead, as a heart-beat
thread could).  So the rule is:

* the lock is free and the run ``queued``: claim it (normal case);
* the lock is free and the run ``running``: its holder is dead, take it over
  (``attempts`` counts the takeovers; after :data:`MAX_ATTEMPTS` the run is
  marked failed instead, so a study that kills every worker cannot loop);
* the lock is taken: a live worker has the run; retry later (the task is
  re-published with a countdown, so the message stays in the broker until the
  run has ended);
* the run has ended (succeeded, not analysed, failed): nothing to do, the
  message is acknowledged.

A repeated run is harmless anyway: report UIDs derive from the study, the
series, the input hash and the weights, so a rerun writes the same SR.

The listener marks a run it has published with ``claimed_by = '(enqueued)'``
so that it is published once; a worker's claim replaces the mark.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Connection, create_engine, or_, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from dicom_node.db.models import Run, RunState
from dicom_node.ingest import utcnow
from pipeline.errors import ConfigError, NodeError, Outcome, audit_traceback

if TYPE_CHECKING:
    from celery import Celery

    from dicom_node.settings import Settings

logger = logging.getLogger(__name__)

#: ``claimed_by`` of a queued run the listener has published to the broker.
ENQUEUED = "(enqueued)"
#: Claims of one run (first claim plus takeovers) before it is marked failed.
MAX_ATTEMPTS = 3
#: After MAX_ATTEMPTS lost workers, further claims only write the "not analysed: processing was interrupted"
#: report, so that the radiologist is told.  That takes a few seconds and reads no pixel data, but the chaos
#: harness (a SIGKILL every few seconds) still lost a single report-only claim in 2 of 92 studies, which then
#: ended failed without a report: so it gets this many tries before the run ends failed.
REPORT_ONLY_CLAIMS = 5
ATTEMPT_LIMIT = MAX_ATTEMPTS + REPORT_ONLY_CLAIMS
#: Seconds before a task retries a run that a live worker holds.
BUSY_RETRY_S = 30.0
#: Runs the Celery executor publishes per scheduler tick.
PUBLISH_BATCH = 200

TERMINAL_STATES = frozenset({RunState.SUCCEEDED.value, RunState.NOT_ANALYSED.value, RunState.FAILED.value})

_held_lock: ContextVar[str | None] = ContextVar("dicom_node_held_run_lock", default=None)
_identity: tuple[int, str] | None = None
_identity_lock = threading.Lock()


class ClaimRefusedError(NodeError):
    """The run was not claimed: it has ended, or a live worker holds it.

    Parameters
    ----------
    run_id : str
        The run.
    state : str
        Its state when the claim was refused.
    """

    def __init__(self, run_id: str, state: str) -> None:
        super().__init__(f"run {run_id} not claimed: it is {state}")
        self.run_id = run_id
        self.state = state

    @property
    def finished(self) -> bool:
        """True when the run has ended (nothing left to do)."""
        return self.state in TERMINAL_STATES


def worker_id() -> str:
    """This process's identity in ``runs.claimed_by``: ``host:pid:token`` (new after a fork)."""
    global _identity
    pid = os.getpid()
    with _identity_lock:
        if _identity is None or _identity[0] != pid:
            _identity = (pid, f"{socket.gethostname()}:{pid}:{uuid.uuid4().hex[:8]}")
        return _identity[1]


def claim_run(sessions: sessionmaker[Session], run_id: str) -> str:
    """Claim *run_id* for this worker, atomically (see the module docstring).

    A ``running`` run is taken over only when the caller holds the run's lock
    (:meth:`RunLocks.hold`), i.e. when its previous holder is dead.

    Parameters
    ----------
    sessions : sessionmaker
        Database sessions.
    run_id : str
        The run.

    Returns
    -------
    str
        The worker id written to ``claimed_by``.

    Raises
    ------
    ClaimRefusedError
        The run has ended, or is held by another (live) worker, or was taken
        over :data:`ATTEMPT_LIMIT` times already (it is then marked failed).
    NodeError
        No such run.
    """
    me = worker_id()
    takeover = _held_lock.get() == run_id
    with sessions.begin() as session:
        before = session.execute(select(Run.state, Run.claimed_by, Run.attempts).where(Run.id == run_id)).one_or_none()
        if before is None:
            raise NodeError(f"no run {run_id}")
        now = utcnow()
        claimable = Run.state == RunState.QUEUED.value
        if takeover:
            claimable = or_(claimable, Run.state == RunState.RUNNING.value)
        result = session.execute(
            update(Run)
            .where(Run.id == run_id, claimable, Run.attempts < ATTEMPT_LIMIT)
            .values(state=RunState.RUNNING.value, claimed_by=me, claimed_at=now, started_at=now,
                    attempts=Run.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        claimed = int(result.rowcount or 0) == 1  # type: ignore[attr-defined]
        state, attempts = before.state, before.attempts
        if not claimed:  # the row as the winner (if any) left it
            state, attempts = session.execute(select(Run.state, Run.attempts).where(Run.id == run_id)).one()
        lost_too_often = attempts >= ATTEMPT_LIMIT and (
            state == RunState.QUEUED.value or (takeover and state == RunState.RUNNING.value))
        if not claimed and lost_too_often:
            session.execute(
                update(Run).where(Run.id == run_id).values(
                    state=RunState.FAILED.value, finished_at=now, outcome=Outcome.PROCESSING_ERROR.value,
                    error_reason=f"the worker processing this run was lost {attempts} times")
                .execution_options(synchronize_session=False)
            )
            state = RunState.FAILED.value
            logger.error("run %s failed: its worker was lost %d times", run_id, attempts)
    if not claimed:
        raise ClaimRefusedError(run_id, state)
    if before.state == RunState.RUNNING.value:
        logger.warning("run %s taken over from lost worker %s (attempt %d)", run_id, before.claimed_by,
                       before.attempts + 1)
    else:
        logger.info("run %s claimed by %s", run_id, me)
    return me


def mark_crashed(sessions: sessionmaker[Session], run_id: str, traceback: str | None = None) -> None:
    """A run whose processing raised: ``failed``, if this worker still holds it.

    ``traceback`` (:func:`~pipeline.errors.audit_traceback`) goes to the run's record
    unless processing recorded one itself, with its stage.
    """
    with sessions.begin() as session:
        run = session.get(Run, run_id)
        if run is not None and run.state == RunState.RUNNING.value and run.claimed_by in (None, worker_id()):
            run.state = RunState.FAILED.value
            run.finished_at = utcnow()
            run.error_reason = "internal error while processing (see the run's error traceback and the node log)"
            if run.error_traceback is None:
                run.error_traceback = traceback


def run_guarded(run_id: str, execute: Callable[[str], None], sessions: sessionmaker[Session]) -> None:
    """Call ``execute(run_id)``; a crash marks the run failed and the worker goes on.

    :class:`ClaimRefusedError` is not a crash: it propagates to the executor.
    """
    try:
        execute(run_id)
    except ClaimRefusedError:
        raise
    except Exception as exc:  # noqa: BLE001 - the worker must survive any run; logged without exception messages
        text = audit_traceback(exc)
        logger.error("run %s crashed (%s):\n%s", run_id, type(exc).__name__, text)
        mark_crashed(sessions, run_id, text)


def require_shared_database(url: str) -> None:
    """Refuse a database that workers on several machines cannot share (Celery needs PostgreSQL)."""
    if make_url(url).get_backend_name() != "postgresql":
        raise ConfigError("processing.executor = 'celery' needs a database shared by all workers: "
                          "set database.url to PostgreSQL (postgresql+psycopg://...)")


def lock_key(run_id: str) -> int:
    """The 64-bit advisory-lock key of a run."""
    digest = hashlib.sha256(b"dicom-node run " + run_id.encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class RunLocks:
    """PostgreSQL advisory locks on runs, held on one dedicated connection of this process.

    Parameters
    ----------
    url : str
        The PostgreSQL URL (the node's database).
    keepalive_s : int
        The server drops (and unlocks) a silent peer after about
        ``keepalive_s + 3 * 10`` seconds, e.g. a worker machine that lost power.
    """

    def __init__(self, url: str, keepalive_s: int = 30) -> None:
        require_shared_database(url)
        self._engine = create_engine(url, poolclass=NullPool)
        self._keepalive_s = keepalive_s
        self._conn: Connection | None = None

    def _connection(self) -> Connection:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                return self._conn
            except SQLAlchemyError:
                logger.warning("run-lock connection lost; reconnecting")
                self._conn.invalidate()
                self._conn = None
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(text(f"SET tcp_keepalives_idle = {int(self._keepalive_s)}"))
        conn.execute(text("SET tcp_keepalives_interval = 10"))
        conn.execute(text("SET tcp_keepalives_count = 3"))
        self._conn = conn
        return conn

    @contextmanager
    def hold(self, run_id: str) -> Iterator[bool]:
        """Try to lock *run_id*; yields whether this process now holds it (released at exit)."""
        key = lock_key(run_id)
        conn = self._connection()
        if not conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar():
            yield False
            return
        token = _held_lock.set(run_id)
        try:
            yield True
        finally:
            _held_lock.reset(token)
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            except SQLAlchemyError:
                logger.warning("run-lock connection lost while releasing %s (the lock went with it)", run_id)
                conn.invalidate()
                self._conn = None

    def close(self) -> None:
        """Close the lock connection (releases every lock)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._engine.dispose()


class RunExecutor(Protocol):
    """Where queued runs go; the scheduler calls :meth:`dispatch` on every tick."""

    #: Whether runs left ``running`` at start-up belong to this node (put back in the queue).
    resumes_running_runs: bool

    def dispatch(self) -> int:
        """Hand queued runs to workers; returns how many were handed over."""
        ...

    def shutdown(self, wait: bool) -> None:
        """Stop; with *wait*, let runs in progress finish."""
        ...


class LocalExecutor:
    """The embedded default: a thread pool of the node runs ``execute(run_id)``.

    Parameters
    ----------
    execute : callable
        ``execute(run_id)``, i.e. :func:`~dicom_node.processing.process_run` bound to a context.
    sessions : sessionmaker
        Database sessions.
    workers : int
        Runs processed in parallel.
    """

    resumes_running_runs = True

    def __init__(self, execute: Callable[[str], None], sessions: sessionmaker[Session], workers: int) -> None:
        self.execute = execute
        self.sessions = sessions
        self.workers = workers
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="run")
        self._inflight: dict[str, Future[None]] = {}

    def dispatch(self) -> int:
        """Submit the oldest queued runs to free threads."""
        for run_id, future in list(self._inflight.items()):
            if future.done():
                del self._inflight[run_id]
        free = self.workers - len(self._inflight)
        if free <= 0:
            return 0
        with self.sessions() as session:
            queued = session.scalars(
                select(Run.id).where(Run.state == RunState.QUEUED.value).order_by(Run.created_at).limit(free)
            ).all()
        submitted = 0
        for run_id in queued:
            if run_id not in self._inflight:
                self._inflight[run_id] = self.pool.submit(self._run, run_id)
                submitted += 1
        return submitted

    def _run(self, run_id: str) -> None:
        try:
            run_guarded(run_id, self.execute, self.sessions)
        except ClaimRefusedError as exc:
            logger.info("%s", exc)

    def shutdown(self, wait: bool) -> None:
        """Stop the pool."""
        self.pool.shutdown(wait=wait, cancel_futures=True)


class CeleryExecutor:
    """The listener's side of Celery: publish queued runs to the broker, once each.

    Parameters
    ----------
    settings : Settings
        Node settings (``processing.broker_url``; the database must be PostgreSQL).
    sessions : sessionmaker
        Database sessions.
    queue : str, optional
        The queue runs are sent to (default :data:`dicom_node.celery_app.DEFAULT_QUEUE`).
    """

    resumes_running_runs = False

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], queue: str | None = None) -> None:
        from dicom_node.celery_app import DEFAULT_QUEUE, make_celery_app

        require_shared_database(settings.database_url)
        self.sessions = sessions
        self.queue = queue or DEFAULT_QUEUE
        self.app: Celery = make_celery_app(settings, queue=self.queue)

    def dispatch(self) -> int:
        """Publish queued runs not yet published, then mark them ``(enqueued)``."""
        from kombu.exceptions import OperationalError

        from dicom_node.celery_app import TASK_NAME

        with self.sessions() as session:
            queued = session.scalars(
                select(Run.id).where(Run.state == RunState.QUEUED.value, Run.claimed_by.is_(None))
                .order_by(Run.created_at).limit(PUBLISH_BATCH)
            ).all()
        published = 0
        for run_id in queued:
            try:  # publish first: a crash before the mark re-publishes (harmless), never loses the run
                self.app.send_task(TASK_NAME, args=[run_id], queue=self.queue)
            except (OperationalError, OSError) as exc:
                logger.warning("broker unreachable, %d run(s) wait: %s", len(queued) - published, exc)
                break
            with self.sessions.begin() as session:
                session.execute(
                    update(Run).where(Run.id == run_id, Run.state == RunState.QUEUED.value, Run.claimed_by.is_(None))
                    .values(claimed_by=ENQUEUED, claimed_at=utcnow()).execution_options(synchronize_session=False)
                )
            published += 1
            logger.info("run %s sent to queue %s", run_id, self.queue)
        return published

    def shutdown(self, wait: bool) -> None:
        """Release the broker connections (runs belong to the workers)."""
        self.app.close()
