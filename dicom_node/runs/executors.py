"""Who processes a run -- the node's own thread pool or Celery workers -- and the claim of a run.

Both executors call the same function of a run id,
:func:`dicom_node.runs.processing.process_run`, through :func:`run_guarded`.

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

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Run, RunState, utcnow
from dicom_node.runs.claims import ENQUEUED, ClaimRefusedError, oldest_queued, require_shared_database, run_guarded

if TYPE_CHECKING:
    from celery import Celery

    from dicom_node.settings import Settings


logger = logging.getLogger(__name__)


#: Runs the Celery executor publishes per scheduler tick.
PUBLISH_BATCH = 200


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
        ``execute(run_id)``, i.e. :func:`~dicom_node.runs.processing.process_run` bound to a context.
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
        queued = oldest_queued(self.sessions, free)
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
        The queue runs are sent to (default :data:`dicom_node.runs.celery.DEFAULT_QUEUE`).
    """

    resumes_running_runs = False

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], queue: str | None = None) -> None:
        from dicom_node.runs.celery import DEFAULT_QUEUE, make_celery_app

        require_shared_database(settings.database_url)
        self.sessions = sessions
        self.queue = queue or DEFAULT_QUEUE
        self.app: Celery = make_celery_app(settings, queue=self.queue)

    def dispatch(self) -> int:
        """Publish queued runs not yet published, then mark them ``(enqueued)``."""
        from kombu.exceptions import OperationalError

        from dicom_node.runs.celery import TASK_NAME

        queued = oldest_queued(self.sessions, PUBLISH_BATCH, unpublished=True)
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

