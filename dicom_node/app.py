"""The composition root: builds the node's parts from the settings.

The processing stack (torch, antspyx, the model) is imported only where runs
are processed -- in worker processes by default -- so that the listener's
process stays small and starts quickly.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

from core.errors import NodeError
from dicom_node.db.session import open_database
from dicom_node.ingest.reconcile import reconcile_spool
from dicom_node.ingest.recorder import Recorder
from dicom_node.ingest.spool import Spool
from dicom_node.net.scp import StorageServer
from dicom_node.ops.http import HttpServer, build_http_server
from dicom_node.runs.context import build_run_context
from dicom_node.runs.executors import CeleryExecutor, LocalExecutor, RunExecutor
from dicom_node.runs.processes import ProcessExecutor
from dicom_node.scheduler import Scheduler
from dicom_node.settings import Settings

if TYPE_CHECKING:
    from dicom_node.runs.context import RunContext
    from model.inference import Predictor


logger = logging.getLogger(__name__)


class Node:
    """The running node: listener, scheduler and worker pool.

    Everything heavy (database, model) is created here, at start-up, from the
    validated settings; a wrong model path stops start-up with a clear error.
    By default (``processing.isolation = "process"``) runs are processed by
    ``processing.workers`` worker processes of the node, each with its own
    model (:mod:`dicom_node.runs.processes`): the node waits here until
    they are ready, and :attr:`context` and :attr:`predictor` stay None.  With
    ``"thread"`` the node loads the model itself and processes runs in
    threads.  With ``processing.executor = "celery"`` the node only receives,
    records, enqueues and delivers: it loads no model, ``dicom-node worker``
    processes.

    Worker processes are started with ``spawn``, which imports the main module
    again: a script that creates a Node must do so under
    ``if __name__ == "__main__":``.

    Parameters
    ----------
    settings : Settings
        Node settings.
    queue : str, optional
        Celery executor only: the queue runs are sent to (default ``dicom-node.runs``).
    """

    def __init__(self, settings: Settings, *, queue: str | None = None) -> None:
        self.settings = settings
        for directory in (settings.spool_dir, settings.work_dir, settings.outbox_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.db = open_database(settings.database_url)
        self.context: RunContext | None = None
        self.predictor: Predictor | None = None
        self.server = StorageServer(settings, Spool.from_settings(settings), Recorder(self.db.sessions))
        # The HTTP side (health, metrics, admin view) starts before the model loads: /readyz says "starting".
        self.http: HttpServer | None = None
        if settings.http.enabled:
            self.http = build_http_server(
                settings, self.db.sessions, listener_port=lambda: self.server.port,
                executor=lambda: getattr(getattr(self, "scheduler", None), "executor", None),
                model_identity=self.model_identity)
            try:
                self.http.start()
            except BaseException:
                self.db.engine.dispose()
                raise
        processing = settings.processing
        executor: RunExecutor
        try:
            if processing.executor == "celery":
                executor = CeleryExecutor(settings, self.db.sessions, queue=queue)
            elif processing.isolation == "thread":
                self.context = build_run_context(settings, self.db.sessions)
                self.predictor = self.context.predictor
                executor = LocalExecutor(self.execute, self.db.sessions, processing.workers)
            else:
                executor = ProcessExecutor(settings, self.db.sessions, processing.workers)
        except BaseException:
            if self.http is not None:
                self.http.stop()
            self.db.engine.dispose()
            raise
        self.scheduler = Scheduler(settings, self.db.sessions, executor)
        self._stopped = threading.Event()

    def model_identity(self) -> dict[str, str] | None:
        """The model this node or its worker processes loaded (for /readyz and /metrics), or None."""
        if self.predictor is not None:
            info = self.predictor.info
            return {"name": info.name, "version": info.version, "weights_sha256": info.weights_sha256}
        executor = getattr(getattr(self, "scheduler", None), "executor", None)
        if isinstance(executor, ProcessExecutor) and executor.model_name:
            return {"name": executor.model_name}
        return None

    def execute(self, run_id: str) -> None:
        """Process one run in this process (the threads of ``processing.isolation = "thread"`` call it)."""
        if self.context is None:
            if self.settings.processing.executor == "celery":
                raise NodeError("this node only receives (executor celery): runs are processed by "
                                "`dicom-node worker`")
            raise NodeError("runs are processed by the node's worker processes (processing.isolation = 'process')")
        from dicom_node.runs.processing import process_run

        process_run(run_id, self.context)

    def start(self) -> None:
        """Reconcile the spool with the database, then start processing and listening.

        Reconciliation (:func:`~dicom_node.ingest.reconcile.reconcile_spool`) runs
        before the listener opens: spool files without rows are recorded, rows
        without files marked, so that everything acknowledged before a stop is
        processed now.
        """
        reconcile_spool(self.server.spool, self.server.recorder)
        self.scheduler.start()
        self.server.start()

    def stop(self) -> None:
        """Stop listening, let associations in flight end, finish the runs in progress, release the database.

        Associations still open ``network.shutdown_grace_s`` after the
        listener closed are aborted; every instance they had been answered
        Success for is kept and processed (after a restart, if need be).
        """
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.network.shutdown_grace_s
        logger.info("stopping: no new associations; up to %.1f s for those in flight; finishing runs", grace)
        self.server.stop(grace_s=grace)
        self.scheduler.stop(wait_for_runs=True)
        if self.http is not None:
            self.http.stop()
        self.db.engine.dispose()
        logger.info("stopped")

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then stop cleanly."""
        stop_requested = threading.Event()

        def _on_signal(signum: int, _frame: FrameType | None) -> None:
            logger.info("received signal %d", signum)
            stop_requested.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        stop_requested.wait()
        self.stop()

