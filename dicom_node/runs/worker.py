"""What runs inside a worker process of the local executor (see :mod:`dicom_node.runs.processes`).

:func:`worker_main` is the process's target: it makes the process die with
the node (:func:`die_with_parent`), applies the node's logging
(:class:`LogConfig`), builds the run context once -- its own database engine
and the model -- and answers ``ready`` (or ``error`` with the reason), then
processes the run ids the node sends, one at a time, answering ``done``.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import FrameType
from typing import TYPE_CHECKING

from core.errors import NodeError
from dicom_node.db.session import Database, open_database
from dicom_node.logformat import make_formatter
from dicom_node.runs.claims import ClaimRefusedError, run_guarded, worker_id
from dicom_node.settings import Settings

if TYPE_CHECKING:
    from dicom_node.runs.context import RunContext

logger = logging.getLogger(__name__)

#: ``prctl`` option: signal this process when its parent thread ends (linux/prctl.h).
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class HandlerSpec:
    """A logging handler a worker recreates: ``target`` is ``"stderr"``, ``"stdout"`` or a file path."""

    target: str
    level: int
    fmt: str | None
    datefmt: str | None


@dataclass(frozen=True)
class LogConfig:
    """The node's logging configuration, to apply in a spawned worker.

    Handlers other than plain stream handlers on stderr/stdout and file
    handlers (e.g. a test's in-memory collector) have no equivalent in another
    process and are left out.
    """

    root_level: int
    levels: tuple[tuple[str, int], ...]
    handlers: tuple[HandlerSpec, ...]

    @classmethod
    def capture(cls) -> LogConfig:
        """This process's configuration, now."""
        root = logging.getLogger()
        levels = tuple(sorted(
            (name, logger_.level) for name, logger_ in logging.root.manager.loggerDict.items()
            if isinstance(logger_, logging.Logger) and logger_.level != logging.NOTSET))
        specs = []
        for handler in root.handlers:
            target = _handler_target(handler)
            if target is not None:
                formatter = handler.formatter
                specs.append(HandlerSpec(target, handler.level, formatter._fmt if formatter else None,
                                         formatter.datefmt if formatter else None))
        return cls(root.level, levels, tuple(specs))

    def apply(self) -> None:
        """Configure this process's logging (replaces the root handlers)."""
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        for spec in self.handlers:
            handler: logging.Handler
            if spec.target == "stderr":
                handler = logging.StreamHandler(sys.stderr)
            elif spec.target == "stdout":
                handler = logging.StreamHandler(sys.stdout)
            else:
                handler = logging.FileHandler(spec.target, mode="a", encoding="utf-8")
            handler.setLevel(spec.level)
            handler.setFormatter(make_formatter(spec.fmt, spec.datefmt))  # logging.format = "json" too
            root.addHandler(handler)
        root.setLevel(self.root_level)
        for name, level in self.levels:
            logging.getLogger(name).setLevel(level)


def _handler_target(handler: logging.Handler) -> str | None:
    if isinstance(handler, logging.FileHandler):
        return handler.baseFilename
    if type(handler) is logging.StreamHandler:  # exact type: subclasses hold streams of their own
        stream = handler.stream
        if stream in (sys.stderr, sys.__stderr__):
            return "stderr"
        if stream in (sys.stdout, sys.__stdout__):
            return "stdout"
    return None


def die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent thread ends; exit now if the parent is gone already."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != parent_pid:  # the node died before we asked
        os._exit(1)


class _StopSignal:
    """SIGTERM in a worker: exit at once when idle, after the run in progress otherwise."""

    def __init__(self) -> None:
        self.busy = False
        self.requested = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True
        if not self.busy:
            raise SystemExit(0)


def bootstrap(settings: Settings) -> tuple[Database, RunContext, Callable[[str], None]]:
    """What every process that processes runs needs, built once: database, models and rules, the run function.

    The one start-up of the node's worker processes (:func:`worker_main`) and
    of Celery worker processes (:class:`~dicom_node.runs.celery.WorkerRuntime`):
    work and outbox directories, the database (never migrated here: the node
    owns the schema), :func:`~dicom_node.runs.context.build_run_context`.
    """
    from dicom_node.runs.context import build_run_context
    from dicom_node.runs.processing import process_run

    for directory in (settings.work_dir, settings.outbox_dir):
        directory.mkdir(parents=True, exist_ok=True)
    db = open_database(settings.database_url, migrate=False)
    try:
        context = build_run_context(settings, db.sessions)
    except BaseException:
        db.engine.dispose()
        raise
    return db, context, lambda run_id: process_run(run_id, context)


def worker_main(conn: Connection, settings: Settings, log_config: LogConfig, parent_pid: int) -> None:
    """A worker process: load once, then process the runs the node sends until told to stop."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = _StopSignal()
    signal.signal(signal.SIGTERM, stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # like ``dicom-node serve``: stacks to stderr
    log_config.apply()
    try:
        db, context, execute = bootstrap(settings)
    except Exception as exc:  # told to the node, which refuses to start with this message
        if not isinstance(exc, NodeError):
            logger.exception("run worker %d could not start", os.getpid())
        conn.send(("error", str(exc) if isinstance(exc, NodeError) else f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", worker_id(), context.predictor.info.name))
    logger.info("run worker %d ready: model %s on %s", os.getpid(), context.predictor.info.name,
                settings.model.device)
    try:
        while not stop.requested:
            try:
                message = conn.recv()
            except EOFError:  # the node closed our pipe
                break
            if message[0] != "run":
                break
            run_id = message[1]
            stop.busy = True
            try:
                run_guarded(run_id, execute, db.sessions)
            except ClaimRefusedError as exc:
                logger.info("%s", exc)
            conn.send(("done", run_id))
            stop.busy = False
    finally:
        db.engine.dispose()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)  # the interpreter's own teardown (torch, ITK) takes seconds and has nothing left to save
