"""The node's background loop: completeness, dispatch of queued runs, delivery."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.completeness import complete_quiet_series, create_runs
from dicom_node.db.models import Run, RunState
from dicom_node.delivery import deliver_due
from dicom_node.ingest import utcnow
from dicom_node.settings import Settings

logger = logging.getLogger(__name__)


def requeue_unfinished(sessions: sessionmaker[Session]) -> int:
    """At start-up: runs left ``running`` by a stop or crash go back to the queue."""
    with sessions.begin() as session:
        result = session.execute(
            update(Run).where(Run.state == RunState.RUNNING.value).values(state=RunState.QUEUED.value)
        )
        count = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if count:
        logger.info("resuming %d unfinished run(s)", count)
    return count


class Scheduler:
    """Background loop: completeness, run dispatch to a local worker pool, delivery.

    Parameters
    ----------
    settings : Settings
        Node settings.
    sessions : sessionmaker
        Database sessions.
    execute : callable
        ``execute(run_id)`` processes one run (e.g. :func:`dicom_node.processing.process_run`).
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], execute: Callable[[str], None]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.execute = execute
        self.pool = ThreadPoolExecutor(max_workers=settings.processing.workers, thread_name_prefix="run")
        self._delivery_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delivery")
        self._delivering: Future[int] | None = None
        self._inflight: dict[str, Future[None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        """Resume unfinished runs and start the loop."""
        requeue_unfinished(self.sessions)
        self._thread.start()

    def stop(self, wait_for_runs: bool = True) -> None:
        """Stop the loop; let running runs finish when *wait_for_runs*."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.pool.shutdown(wait=wait_for_runs, cancel_futures=True)
        self._delivery_pool.shutdown(wait=True, cancel_futures=True)

    def tick(self) -> None:
        """One pass of the loop (public for tests)."""
        complete_quiet_series(self.sessions, self.settings.completeness.quiet_period_s)
        create_runs(self.sessions)
        self._dispatch()
        if self._delivering is None or self._delivering.done():
            self._delivering = self._delivery_pool.submit(deliver_due, self.sessions, self.settings)

    def _dispatch(self) -> None:
        for run_id, future in list(self._inflight.items()):
            if future.done():
                del self._inflight[run_id]
        free = self.settings.processing.workers - len(self._inflight)
        if free <= 0:
            return
        with self.sessions() as session:
            queued = session.scalars(
                select(Run.id).where(Run.state == RunState.QUEUED.value).order_by(Run.created_at).limit(free)
            ).all()
        for run_id in queued:
            if run_id not in self._inflight:
                self._inflight[run_id] = self.pool.submit(self._run_safely, run_id)

    def _run_safely(self, run_id: str) -> None:
        try:
            self.execute(run_id)
        except Exception:  # noqa: BLE001 - the worker must survive any run
            logger.exception("run %s crashed", run_id)
            with self.sessions.begin() as session:
                run = session.get(Run, run_id)
                if run is not None and run.state == RunState.RUNNING.value:
                    run.state = RunState.FAILED.value
                    run.finished_at = utcnow()
                    run.error_reason = "internal error while processing (see node log)"

    def _loop(self) -> None:
        interval = self.settings.completeness.poll_interval_s
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - e.g. database briefly unreachable; keep serving
                logger.exception("scheduler tick failed")
            self._stop.wait(interval)
