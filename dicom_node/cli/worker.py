"""``dicom-node worker``: a Celery worker that processes runs (executor ``celery``).

Each worker process loads the model once, at start-up, from the settings (the
same configuration file as the listener's), then takes runs from the queue
one at a time.  ``--workers N`` starts N processes (prefork pool); the default,
one, runs in the worker's own process (solo pool).  SIGTERM finishes the run in
progress, then stops; SIGKILL leaves the run to another worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from typing import Any

from dicom_node.settings import Settings

logger = logging.getLogger(__name__)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``worker`` sub-command."""
    worker = sub.add_parser("worker", parents=[common],
                            help="process runs from the broker (processing.executor = celery)")
    worker.add_argument("--queue", help="queue to take runs from (default dicom-node.runs)")
    worker.add_argument("--name", help="Celery node name (default dicom-node-<pid>@<host>)")


def dispatch(args: argparse.Namespace, settings: Settings) -> int | None:
    """Run the ``worker`` command; None for other commands."""
    if args.command != "worker":
        return None
    return run_worker(settings, queue=args.queue, name=args.name, log_level=args.log_level)


def run_worker(settings: Settings, *, queue: str | None = None, name: str | None = None,
               log_level: str = "INFO") -> int:
    """Start a Celery worker with ``processing.workers`` processes; returns its exit code.

    Parameters
    ----------
    settings : Settings
        Node settings (database must be PostgreSQL; broker from ``processing.broker_url``).
    queue : str, optional
        The queue (default ``dicom-node.runs``).
    name : str, optional
        The Celery node name.
    log_level : str
        Log level of the worker.

    Returns
    -------
    int
        The worker's exit code.
    """
    from celery.signals import worker_process_init, worker_process_shutdown

    from dicom_node.runs.celery import DEFAULT_QUEUE, WorkerRuntime, make_celery_app

    runtime = WorkerRuntime(settings)
    queue = queue or DEFAULT_QUEUE
    app = make_celery_app(settings, queue=queue, runtime=runtime)
    processes = settings.processing.workers
    if processes == 1:
        runtime.get()  # load the model now: a wrong path stops start-up, the first run does not wait
    else:
        worker_process_init.connect(lambda **_: runtime.get(), weak=False)
        worker_process_shutdown.connect(lambda **_: runtime.close(), weak=False)
    logger.info("worker: queue %s, %d process(es), database and broker from the settings", queue, processes)
    worker = app.Worker(
        hostname=name or f"dicom-node-{os.getpid()}@{socket.gethostname()}",
        pool_cls="solo" if processes == 1 else "prefork",
        concurrency=processes,
        queues=[queue],
        loglevel=log_level,
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    try:
        worker.start()
    finally:
        runtime.close()
    return int(getattr(worker, "exitcode", 0) or 0)
