"""The node's background loop: completeness, dispatch of queued runs (to a pluggable executor), delivery, webhooks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.session import CHECKPOINT_INTERVAL_S, checkpoint
from dicom_node.ingest.completeness import complete_quiet_series, create_runs
from dicom_node.outbox.delivery import deliver_due
from dicom_node.outbox.notify import Notifier
from dicom_node.runs.claims import requeue
from dicom_node.runs.executors import LocalExecutor, RunExecutor
from dicom_node.settings import Settings

logger = logging.getLogger(__name__)


class Scheduler:
    """Background loop: completeness, run dispatch to an executor, delivery.

    Parameters
    ----------
    settings : Settings
        Node settings.
    sessions : sessionmaker
        Database sessions.
    executor : RunExecutor or callable
        Where queued runs go (:class:`~dicom_node.runs.executors.LocalExecutor`,
        :class:`~dicom_node.runs.executors.CeleryExecutor`); a callable
        ``execute(run_id)`` gets a local pool of ``processing.workers`` threads.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 executor: RunExecutor | Callable[[str], None]) -> None:
        self.settings = settings
        self.sessions = sessions
        if callable(executor):
            executor = LocalExecutor(executor, sessions, settings.processing.workers)
        self.executor: RunExecutor = executor
        self._delivery_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delivery")
        self._delivering: Future[int] | None = None
        self.notifier = Notifier(settings, sessions)  # webhooks, in a thread of its own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._checkpointed_at = 0.0

    def start(self) -> None:
        """Resume unfinished runs (when they are this node's) and start the loop."""
        if self.executor.resumes_running_runs:
            count = requeue(self.sessions)
            if count:
                logger.info("resuming %d unfinished run(s)", count)
        self._thread.start()

    def stop(self, wait_for_runs: bool = True) -> None:
        """Stop the loop; let running runs finish when *wait_for_runs*."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.executor.shutdown(wait=wait_for_runs)
        self._delivery_pool.shutdown(wait=True, cancel_futures=True)
        self.notifier.close()

    def tick(self) -> None:
        """One pass of the loop (public for tests)."""
        complete_quiet_series(self.sessions, self.settings.completeness.quiet_period_s,
                              self.settings.completeness.incomplete_limit_s)
        create_runs(self.sessions)
        self.executor.dispatch()
        if self._delivering is None or self._delivering.done():
            self._delivering = self._delivery_pool.submit(deliver_due, self.sessions, self.settings)
        self.notifier.tick()
        now = time.monotonic()
        engine = self.sessions.kw.get("bind")
        if isinstance(engine, Engine) and now - self._checkpointed_at >= CHECKPOINT_INTERVAL_S:
            checkpoint(engine)
            self._checkpointed_at = now

    def _loop(self) -> None:
        interval = self.settings.completeness.poll_interval_s
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # e.g. database briefly unreachable; keep serving
                logger.exception("scheduler tick failed")
            self._stop.wait(interval)
