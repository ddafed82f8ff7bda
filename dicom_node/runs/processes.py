"""The embedded executor in worker processes (``processing.isolation = "process"``, the default).

Why processes: preprocessing (antspyx: N4, registration) holds Python's GIL
for seconds at a time (up to 13 s measured).  As threads of the listener's
process, runs stalled pynetdicom's threads and C-STORE answers; a worker
process has its own interpreter.

Design
------
``processing.workers`` processes, started with ``spawn`` (the listener has
threads and database connections that a fork would copy).  Each builds its
:class:`~dicom_node.runs.context.RunContext` once -- its own database engine and
the model -- and answers ``ready``, or why it could not start (the node then
refuses to start with that message).  The node hands one run id at a time to
an idle worker over that worker's own pipe; the worker runs
:func:`~dicom_node.runs.claims.run_guarded` (claim, process; an exception marks
the run failed, as with threads) and answers ``done``.

One pipe per worker, not a shared queue as in
:class:`concurrent.futures.ProcessPoolExecutor`: a worker that dies (OOM
killer, a crash in native code, SIGKILL) takes nothing down but itself, and the
node knows which run it held.  That run goes back to the queue, as the runs of
a killed node do at its restart: ``attempts`` counts the claims, so a run that
kills its worker every time gets the "not analysed: processing was
interrupted" report from its fourth claim on and ends failed only if that is
lost too, several times (:data:`~dicom_node.runs.claims.MAX_ATTEMPTS`,
:data:`~dicom_node.runs.claims.REPORT_ONLY_CLAIMS`).  Another worker is started in the
dead one's place.

Workers die with the node: each asks Linux for SIGKILL when its parent goes
(``prctl(PR_SET_PDEATHSIG)``), then checks that the parent is still there.  The
kernel ties that signal to the parent *thread*, so every worker is started by
the one keeper thread, which lives as long as the executor.  A node killed with
SIGKILL thus leaves no orphan to finish a run that its restart does again.
Workers ignore SIGINT (Ctrl-C reaches the whole process group; the node
decides) and on SIGTERM finish the run in progress before they exit.

A spawned process starts without logging configuration: the node's (root
level, levels of named loggers, handlers to stderr, stdout and files) is
captured at start-up (:class:`~dicom_node.runs.worker.LogConfig`) and
applied in every worker, whose stderr is the node's.  The worker's side is
:mod:`dicom_node.runs.worker`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler before ours (handlers run last-in, first-out)
import os
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import NodeError
from dicom_node.runs.claims import oldest_queued, requeue
from dicom_node.runs.worker import LogConfig, worker_main
from dicom_node.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds the node waits at start-up for its workers to load the model.
READY_TIMEOUT_S = 600.0
#: After a worker failed to start: first wait before the next try, and the longest.
RESTART_BACKOFF_S = (2.0, 120.0)

_live: set[ProcessExecutor] = set()
_live_lock = threading.Lock()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(eq=False)
class _Worker:
    """The node's view of one worker process."""

    process: BaseProcess
    conn: Connection
    claim_id: str | None = None  # its ``runs.claimed_by`` once ready
    run_id: str | None = None
    error: str | None = None
    eof: bool = False
    stopping: bool = False

    @property
    def ready(self) -> bool:
        return self.claim_id is not None


class ProcessExecutor:
    """The embedded default: ``workers`` worker processes of the node (see the module docstring).

    Parameters
    ----------
    settings : Settings
        Node settings; each worker builds its run context from them.
    sessions : sessionmaker
        The node's database sessions (dispatch and lost runs).
    workers : int
        Worker processes, i.e. runs processed in parallel.
    log_config : LogConfig, optional
        Logging of the workers (default: this process's, captured now).
    ready_timeout_s : float
        How long start-up waits for the workers.

    Raises
    ------
    NodeError
        A worker could not start (e.g. no model at ``model.path``): the message says why.
    """

    resumes_running_runs = True

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], workers: int, *,
                 log_config: LogConfig | None = None, ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.settings = settings
        self.sessions = sessions
        self.workers = workers
        self.log_config = log_config or LogConfig.capture()
        self.model_name: str | None = None
        self._mp = multiprocessing.get_context("spawn")
        self._cond = threading.Condition()
        self._pool: list[_Worker] = []
        self._lost: list[tuple[str, str]] = []  # (run id, claimed_by) of runs whose worker died
        self._closing = False
        self._starting = True  # a failure now fails start-up; later it is retried
        self._start_error: str | None = None
        self._backoff_s = 0.0
        self._next_spawn = 0.0
        self._wake_r, self._wake_w = self._mp.Pipe(duplex=False)
        self._keeper = threading.Thread(target=self._keep, name="run-workers", daemon=True)
        with _live_lock:
            _live.add(self)
        self._keeper.start()
        self._await_ready(ready_timeout_s)

    # ----- the scheduler's side --------------------------------------------
    def dispatch(self) -> int:
        """Requeue runs of dead workers, then hand the oldest queued runs to idle workers."""
        self._requeue_lost()
        with self._cond:
            idle = [w for w in self._pool if w.ready and w.run_id is None and not w.stopping and not w.eof]
            busy = [w.run_id for w in self._pool if w.run_id is not None]
        if not idle:
            return 0
        queued = oldest_queued(self.sessions, len(idle), exclude=busy)
        handed = 0
        with self._cond:
            for worker, run_id in zip(idle, queued, strict=False):
                if worker not in self._pool or worker.run_id is not None or worker.stopping or worker.eof:
                    continue
                try:
                    worker.conn.send(("run", run_id))
                except OSError:  # it is dying; the keeper will see it
                    continue
                worker.run_id = run_id
                handed += 1
        return handed

    def shutdown(self, wait: bool) -> None:
        """Stop the workers: with *wait* after their runs in progress, else at once (runs resume at restart)."""
        with self._cond:
            self._closing = True
            if not wait:
                for worker in self._pool:
                    worker.process.kill()
                    worker.stopping = True
        self._wake()
        if self._keeper is not threading.current_thread():
            self._keeper.join()
        with _live_lock:
            _live.discard(self)
        try:
            self._requeue_lost()
        except SQLAlchemyError as exc:  # the scheduler's start-up requeue puts them back at the next start
            logger.warning("runs of lost workers not requeued now (%s)", type(exc).__name__)

    def worker_pids(self) -> list[int]:
        """Process ids of the workers that are ready."""
        with self._cond:
            return [w.process.pid for w in self._pool if w.ready and w.process.pid is not None]

    def _requeue_lost(self) -> None:
        with self._cond:
            lost, self._lost = self._lost, []
        for index, (run_id, claimed_by) in enumerate(lost):
            try:
                if requeue(self.sessions, run_id, claimed_by):
                    logger.warning("run %s back in the queue after losing its worker", run_id)
            except SQLAlchemyError:
                with self._cond:
                    self._lost[:0] = lost[index:]
                raise

    def _await_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._start_error is None and sum(w.ready for w in self._pool) < self.workers:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._start_error = f"not ready after {timeout_s:.0f} s"
                    break
                self._cond.wait(remaining)
            error = self._start_error
            self._starting = False
        if error is not None:
            self.shutdown(wait=False)
            raise NodeError(f"a run worker process could not start: {error}")
        logger.info("%d run worker process(es) ready (pid %s): model %s", self.workers,
                    ", ".join(map(str, self.worker_pids())), self.model_name)

    # ----- the keeper thread --------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # closed: the keeper has ended
            self._wake_w.send_bytes(b"!")

    def _keep(self) -> None:
        pause = threading.Event()
        while True:
            try:
                if not self._keep_once():
                    break
            except Exception:  # this thread must live: the workers die with it
                logger.exception("run worker keeper: unexpected error")
                pause.wait(1.0)
        self._wake_r.close()
        self._wake_w.close()

    def _keep_once(self) -> bool:
        """Start, stop and listen to workers once; False when all are gone after shutdown."""
        with self._cond:
            timeout: float | None = None
            if self._closing:
                self._wind_down()
                if not self._pool:
                    return False
            else:
                timeout = self._top_up()
            objects: list[Any] = [self._wake_r]
            for worker in self._pool:
                objects.append(worker.process.sentinel)
                if not worker.eof:
                    objects.append(worker.conn)
        ready = wait(objects, timeout)
        with self._cond:
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
            for worker in list(self._pool):
                if worker.conn in ready or worker.process.sentinel in ready:
                    self._service(worker)
            self._cond.notify_all()
        return True

    def _top_up(self) -> float | None:
        """Start workers up to the configured number; returns seconds until the next try, if one waits."""
        while len(self._pool) < self.workers:
            delay = self._next_spawn - time.monotonic()
            if delay > 0:
                return delay
            try:
                self._spawn()
            except OSError as exc:
                self._failed_start(f"could not start a process ({exc})")
        return None

    def _spawn(self) -> None:
        parent_conn, child_conn = self._mp.Pipe()
        process = self._mp.Process(target=worker_main, name="run-worker", daemon=True,
                                   args=(child_conn, self.settings, self.log_config, os.getpid()))
        process.start()
        child_conn.close()
        self._pool.append(_Worker(process, parent_conn))

    def _service(self, worker: _Worker) -> None:
        while not worker.eof and worker.conn.poll():
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                worker.eof = True
                break
            self._receive(worker, message)
        if not worker.process.is_alive():
            self._ended(worker)

    def _receive(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.claim_id, self.model_name = message[1], message[2]
            self._backoff_s = 0.0
        elif kind == "done" and worker.run_id == message[1]:
            worker.run_id = None
        elif kind == "error":
            worker.error = str(message[1])
            if self._starting:
                self._start_error = self._start_error or worker.error

    def _ended(self, worker: _Worker) -> None:
        worker.process.join()
        self._pool.remove(worker)
        worker.conn.close()
        pid, how = worker.process.pid, _exit_text(worker.process.exitcode)
        if worker.run_id is not None and worker.claim_id is not None:
            self._lost.append((worker.run_id, worker.claim_id))
            if worker.stopping:
                logger.warning("run worker %s stopped (%s) during run %s; the run will resume", pid, how,
                               worker.run_id)
            else:
                logger.error("run worker %s died (%s) during run %s; the run goes back to the queue and another "
                             "worker starts", pid, how, worker.run_id)
        elif worker.stopping or self._closing:
            logger.debug("run worker %s ended (%s)", pid, how)
        elif not worker.ready:
            self._failed_start(worker.error or f"it ended ({how}) before it was ready; see the log above")
        else:
            logger.error("run worker %s died (%s) while idle; another starts", pid, how)

    def _failed_start(self, reason: str) -> None:
        if self._starting:
            self._start_error = self._start_error or reason
            return
        first, longest = RESTART_BACKOFF_S
        self._backoff_s = min(max(self._backoff_s * 2, first), longest)
        self._next_spawn = time.monotonic() + self._backoff_s
        logger.error("a run worker could not start: %s; next try in %.0f s", reason, self._backoff_s)

    def _wind_down(self) -> None:
        """While closing: idle workers are told to stop, workers still loading are killed."""
        for worker in self._pool:
            if worker.stopping:
                continue
            if not worker.ready:
                worker.process.kill()
                worker.stopping = True
            elif worker.run_id is None:
                with contextlib.suppress(OSError):  # already gone
                    worker.conn.send(("stop",))
                worker.stopping = True


@atexit.register
def _kill_leftover_workers() -> None:
    """At interpreter exit: the workers of executors never shut down are killed, not waited for."""
    with _live_lock:
        executors = list(_live)
    for executor in executors:
        try:
            executor.shutdown(wait=False)
        except Exception:  # exiting anyway; the next start requeues their runs
            logger.exception("run workers not shut down at exit")
