"""Claims, takeovers and locks of runs (the protocol is described in :mod:`dicom_node.runs.executors`).

A run is processed by whoever claims it with one atomic ``UPDATE``; a worker holds a PostgreSQL advisory
lock while it processes, so that a run is taken over only from a holder that is really gone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

from sqlalchemy import Connection, create_engine, or_, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.errors import ConfigError, NodeError, Outcome, audit_traceback
from dicom_node.db.models import Run, RunState, utcnow

if TYPE_CHECKING:

    pass

logger = logging.getLogger(__name__)

if TYPE_CHECKING:

    pass


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

    ``traceback`` (:func:`~core.errors.audit_traceback`) goes to the run's record
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


def require_shared_database(url: str) -> None:
    """Refuse a database that workers on several machines cannot share (Celery needs PostgreSQL)."""
    if make_url(url).get_backend_name() != "postgresql":
        raise ConfigError("processing.executor = 'celery' needs a database shared by all workers: "
                          "set database.url to PostgreSQL (postgresql+psycopg://...)")


def requeue(sessions: sessionmaker[Session], run_id: str | None = None, claimed_by: str | None = None) -> int:
    """Put ``running`` runs back in the queue; returns how many.

    Without *run_id*: every such run (at start-up, runs left by a stop or a
    crash).  With it: that run, and only while *claimed_by* still holds it (a
    worker that died during the run; a run another worker took over is left alone).
    """
    condition = [Run.state == RunState.RUNNING.value]
    if run_id is not None:
        condition += [Run.id == run_id, Run.claimed_by == claimed_by]
    with sessions.begin() as session:
        result = session.execute(
            update(Run).where(*condition).values(state=RunState.QUEUED.value, claimed_by=None, claimed_at=None)
            .execution_options(synchronize_session=False))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


def oldest_queued(sessions: sessionmaker[Session], limit: int, *, exclude: Collection[str] = (),
                  unpublished: bool = False) -> list[str]:
    """Ids of the oldest queued runs, at most *limit*: what every executor hands out next.

    *exclude*: runs already handed to a worker; *unpublished*: only runs not yet
    sent to a broker (``claimed_by`` empty; the Celery executor marks published ones).
    """
    query = select(Run.id).where(Run.state == RunState.QUEUED.value)
    if exclude:
        query = query.where(Run.id.not_in(list(exclude)))
    if unpublished:
        query = query.where(Run.claimed_by.is_(None))
    with sessions() as session:
        return list(session.scalars(query.order_by(Run.created_at).limit(limit)).all())
