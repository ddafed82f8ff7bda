"""The composition root: builds the node's parts from the settings."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from dicom_node.db.session import open_database
from dicom_node.ingest import Recorder, Spool
from dicom_node.processing import RunContext, process_run
from dicom_node.scheduler import Scheduler
from dicom_node.server import StorageServer
from dicom_node.settings import Settings
from model.inference import Predictor
from pipeline.preprocess import PreprocessConfig
from pipeline.select import load_rules

logger = logging.getLogger(__name__)


class Node:
    """The running node: listener, scheduler and worker pool.

    Everything heavy (database, model) is created here, at start-up, from the
    validated settings; a wrong model path stops start-up with a clear error.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        for directory in (settings.spool_dir, settings.work_dir, settings.outbox_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.db = open_database(settings.database_url)
        self.predictor = Predictor.load(settings.model_path, device=settings.model.device)
        self.context = RunContext(
            settings=settings,
            sessions=self.db.sessions,
            predictor=self.predictor,
            rules=load_rules(settings.series_rules_path),
            preprocess_config=PreprocessConfig(registration=settings.processing.registration),
        )
        self.server = StorageServer(settings, Spool(settings.spool_dir), Recorder(self.db.sessions))
        self.scheduler = Scheduler(settings, self.db.sessions, self.execute)
        self._stopped = threading.Event()

    def execute(self, run_id: str) -> None:
        """Process one run (the function every executor calls)."""
        process_run(run_id, self.context)

    def start(self) -> None:
        """Start listening and processing."""
        self.scheduler.start()
        self.server.start()

    def stop(self) -> None:
        """Stop listening, finish the runs in progress, release the database."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        logger.info("stopping: no new associations; finishing runs in progress")
        self.server.stop()
        self.scheduler.stop(wait_for_runs=True)
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
