"""Liveness and readiness of the node (``/healthz``, ``/readyz``).

Readiness is a list of named checks, each answering ``ok`` and a short
``detail`` (never patient data): the database answers, the spool is writable,
free disk is above ``storage.free_space_reserve_mb``, the DICOM listener is
open, the run workers are alive and, where this process loads one, the model is
loaded.  Informational checks (``critical=False``: the last delivery to each
destination, ``destination:<name>``, and its last periodic C-ECHO, ``echo:<name>``,
:mod:`dicom_node.ops.echo`) are shown but never make the node unready: a PACS that
does not answer does not stop the node receiving, and the outbox retries.  Each
check has a time limit, so that a database that does not answer makes
``/readyz`` say so instead of hanging.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import Delivery
from dicom_node.ops.echo import EchoProbe, EchoResult
from dicom_node.runs.executors import CeleryExecutor, LocalExecutor, RunExecutor
from dicom_node.runs.processes import ProcessExecutor
from dicom_node.settings import Settings

#: Seconds one check may take before it counts as failed.
CHECK_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class CheckResult:
    """One readiness check."""

    name: str
    ok: bool
    detail: str
    critical: bool = True


Check = Callable[[], CheckResult | list[CheckResult]]


def database_check(sessions: sessionmaker[Session]) -> Check:
    """The database answers a query."""
    def check() -> CheckResult:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return CheckResult("database", True, "reachable")
    return check


def spool_check(settings: Settings) -> Check:
    """A file can be created (and removed) in the spool directory."""
    def check() -> CheckResult:
        with tempfile.NamedTemporaryFile(dir=settings.spool_dir, prefix=".readyz-"):
            pass
        return CheckResult("spool", True, f"writable: {settings.spool_dir}")
    return check


def disk_check(settings: Settings) -> Check:
    """Free disk of the spool above the reserve below which C-STOREs are refused."""
    def check() -> CheckResult:
        free_mb = shutil.disk_usage(settings.spool_dir).free // (1024 * 1024)
        reserve = settings.storage.free_space_reserve_mb
        return CheckResult("disk", free_mb > reserve, f"{free_mb} MB free, reserve {reserve} MB")
    return check


def listener_check(port: Callable[[], int]) -> Check:
    """The DICOM listener is open (``port`` raises while it is not)."""
    def check() -> CheckResult:
        try:
            return CheckResult("listener", True, f"listening on port {port()}")
        except Exception:  # noqa: BLE001 -- not started yet, or stopped
            return CheckResult("listener", False, "not listening")
    return check


def workers_check(executor: Callable[[], RunExecutor | None], settings: Settings) -> Check:
    """The run workers are alive (worker processes ready, the thread pool open, or Celery: not ours)."""
    def check() -> CheckResult:
        current = executor()
        if current is None:
            return CheckResult("workers", False, "starting (loading the model)")
        if isinstance(current, ProcessExecutor):
            alive, wanted = len(current.worker_pids()), current.workers
            return CheckResult("workers", alive >= wanted, f"{alive} of {wanted} worker process(es) ready")
        if isinstance(current, LocalExecutor):
            broken = getattr(current.pool, "_shutdown", False) or getattr(current.pool, "_broken", False)
            return CheckResult("workers", not broken, f"{current.workers} worker thread(s)"
                               + (" (pool shut down)" if broken else ""))
        if isinstance(current, CeleryExecutor):
            return CheckResult("workers", True, f"celery: runs processed by `dicom-node worker` "
                               f"(queue {current.queue})", critical=False)
        return CheckResult("workers", True, type(current).__name__)
    return check


def model_check(identity: Callable[[], dict[str, str] | None], settings: Settings) -> Check:
    """The model is loaded where this process (or its worker processes) loads one."""
    def check() -> CheckResult:
        if settings.processing.executor == "celery":
            return CheckResult("model", True, "not loaded by the listener (celery workers load it)", critical=False)
        loaded = identity()
        if not loaded:
            return CheckResult("model", False, f"not loaded yet ({settings.model_path})")
        return CheckResult("model", True, " ".join(f"{k}={v}" for k, v in loaded.items() if v))
    return check


def destinations_check(sessions: sessionmaker[Session], settings: Settings) -> Check:
    """Informational: the last delivery attempt to each destination (its C-ECHO: :func:`echo_check`)."""
    def check() -> list[CheckResult]:
        last = (select(Delivery.destination, func.max(Delivery.last_attempt_at))
                .where(Delivery.last_attempt_at.is_not(None)).group_by(Delivery.destination))
        with sessions() as session:
            when = {name: at for name, at in session.execute(last).all()}
            results = []
            for dest in settings.destinations:
                at = when.get(dest.name)
                if at is None:
                    results.append(CheckResult(f"destination:{dest.name}", True, "no delivery attempted yet",
                                               critical=False))
                    continue
                row = session.execute(select(Delivery.last_status, Delivery.failure_class).where(
                    Delivery.destination == dest.name, Delivery.last_attempt_at == at).limit(1)).one()
                ok = row.last_status is not None and (row.last_status == 0 or row.failure_class == "warning")
                status = "-" if row.last_status is None else f"0x{row.last_status:04X}"
                results.append(CheckResult(f"destination:{dest.name}", ok,
                                           f"last delivery {at.isoformat(timespec='seconds')}: status {status}"
                                           + (f" ({row.failure_class})" if row.failure_class else ""),
                                           critical=False))
        return results
    return check


def echo_check(probe: EchoProbe) -> Check:
    """Informational: the last periodic C-ECHO of each destination (none when the probe is off)."""
    def check() -> list[CheckResult]:
        if not probe.enabled:
            return []
        results = probe.results()
        return [CheckResult(f"echo:{dest.name}", results[dest.name].ok, results[dest.name].detail, critical=False)
                if dest.name in results else
                CheckResult(f"echo:{dest.name}", True, "no C-ECHO yet", critical=False)
                for dest in probe.settings.destinations]
    return check


class Readiness:
    """Runs the readiness checks, each within :data:`CHECK_TIMEOUT_S`.

    Parameters
    ----------
    checks : sequence of callables
        Each returns one :class:`CheckResult` or a list of them.
    """

    def __init__(self, checks: Sequence[Check]) -> None:
        self.checks = list(checks)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")
        self._lock = threading.Lock()

    def run(self) -> tuple[bool, list[CheckResult]]:
        """All checks; the first item is True when every critical check passed."""
        with self._lock:
            futures = [(check, self._pool.submit(check)) for check in self.checks]
            results: list[CheckResult] = []
            for check, future in futures:
                name = getattr(check, "__qualname__", "check").split(".")[0].removesuffix("_check")
                try:
                    value = future.result(timeout=CHECK_TIMEOUT_S)
                except FutureTimeout:
                    value = CheckResult(name, False, f"no answer within {CHECK_TIMEOUT_S:.0f} s")
                except Exception as exc:  # noqa: BLE001 -- a failed check is a result, not an error
                    value = CheckResult(name, False, f"{type(exc).__name__}: {_first_line(exc)}")
                results.extend(value if isinstance(value, list) else [value])
        return all(r.ok for r in results if r.critical), results

    def close(self) -> None:
        """Stop the checks' threads (a check still running is left to end)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [""])[0][:200]


def as_json(ready: bool, results: list[CheckResult],
            echoes: dict[str, EchoResult] | None = None) -> dict[str, Any]:
    """The ``/readyz`` body: status, checks and (with *echoes*) the last C-ECHO of each destination."""
    body: dict[str, Any] = {"status": "ready" if ready else "not ready",
                            "checks": {r.name: asdict(r) for r in results}}
    if echoes is not None:
        body["echo"] = {name: result.as_json() for name, result in sorted(echoes.items())}
    return body
