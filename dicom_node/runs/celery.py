"""The Celery application of the node, built from the settings (never at import time).

The listener publishes a run id to a queue; a worker (``dicom-node worker``)
runs :func:`handle_run`, i.e. :func:`dicom_node.runs.processing.process_run` under
the run's lock (see :mod:`dicom_node.runs.executors` for the claim protocol).

Delivery guarantees come from the configuration: late acknowledgement
(``task_acks_late``) and ``task_reject_on_worker_lost``, so that a worker
killed mid-run leaves the message to the broker; prefetch 1 so that a worker
holds only the run it is processing; publisher confirms so that a run marked
as published is in the broker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task

from dicom_node.db.session import Database
from dicom_node.runs.claims import BUSY_RETRY_S, ClaimRefusedError, RunLocks, require_shared_database, run_guarded
from dicom_node.runs.worker import bootstrap
from dicom_node.settings import Settings

logger = logging.getLogger(__name__)

TASK_NAME = "dicom_node.process_run"
DEFAULT_QUEUE = "dicom-node.runs"


def celery_config(settings: Settings, queue: str) -> dict[str, Any]:
    """The Celery configuration of the node (broker from ``processing.broker_url``)."""
    return {
        "broker_url": settings.processing.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"confirm_publish": True},
        "task_default_queue": queue,
        "task_routes": {TASK_NAME: {"queue": queue}},
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 1, "interval_max": 2},
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_enable_remote_control": True,
    }


@dataclass
class _Loaded:
    db: Database
    locks: RunLocks
    execute: Any  # Callable[[str], None]


class WorkerRuntime:
    """What a worker process needs -- database, model, run locks -- built once per process.

    Built lazily on first use and again in a forked child (prefork pool): every
    process loads the model exactly once, and no engine crosses a fork.

    Parameters
    ----------
    settings : Settings
        Node settings (the same file as the listener's: destinations, model, storage).
    """

    def __init__(self, settings: Settings) -> None:
        require_shared_database(settings.database_url)
        self.settings = settings
        self._pid: int | None = None
        self._loaded: _Loaded | None = None

    def get(self) -> _Loaded:
        """This process's runtime (built on first call)."""
        if self._loaded is None or self._pid != os.getpid():
            settings = self.settings
            db, context, execute = bootstrap(settings)
            self._loaded = _Loaded(db=db, locks=RunLocks(settings.database_url), execute=execute)
            self._pid = os.getpid()
            logger.info("worker process %d ready: model %s on %s", self._pid, context.predictor.info.name,
                        settings.model.device)
        return self._loaded

    def close(self) -> None:
        """Release the database and the run locks."""
        if self._loaded is not None and self._pid == os.getpid():
            self._loaded.locks.close()
            self._loaded.db.engine.dispose()
        self._loaded = None


def handle_run(runtime: WorkerRuntime, run_id: str) -> float | None:
    """Process one run as a worker; returns seconds to retry after, or None when done.

    Parameters
    ----------
    runtime : WorkerRuntime
        This process's database, model and locks.
    run_id : str
        The run.

    Returns
    -------
    float or None
        ``None``: the run was processed, or had ended already (acknowledge).
        A number: a live worker holds the run; retry after that many seconds.
    """
    loaded = runtime.get()
    with loaded.locks.hold(run_id) as held:
        if not held:
            logger.info("run %s is held by a live worker; retrying in %.0f s", run_id, BUSY_RETRY_S)
            return BUSY_RETRY_S
        try:
            run_guarded(run_id, loaded.execute, loaded.db.sessions)
        except ClaimRefusedError as exc:
            if not exc.finished:
                return BUSY_RETRY_S
            logger.info("run %s had ended already (%s); nothing to do", run_id, exc.state)
    return None


def make_celery_app(settings: Settings, *, queue: str | None = None, runtime: WorkerRuntime | None = None) -> Celery:
    """The node's Celery application.

    Parameters
    ----------
    settings : Settings
        Node settings.
    queue : str, optional
        The queue of runs (default :data:`DEFAULT_QUEUE`).
    runtime : WorkerRuntime, optional
        The worker's runtime; only workers need one (built lazily when omitted).

    Returns
    -------
    Celery
        The application, with the task :data:`TASK_NAME` registered.
    """
    app = Celery("dicom_node", set_as_current=False)
    app.conf.update(celery_config(settings, queue or DEFAULT_QUEUE))
    holder: list[WorkerRuntime] = []

    @app.task(name=TASK_NAME, bind=True, max_retries=None)
    def process_run_task(task: Task, run_id: str) -> None:
        if not holder:
            holder.append(runtime or WorkerRuntime(settings))
        retry_in = handle_run(holder[0], run_id)
        if retry_in is not None:
            raise task.retry(countdown=retry_in)

    return app
