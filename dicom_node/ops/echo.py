"""A periodic C-ECHO of every configured destination, for ``/readyz``, ``/metrics`` and the admin view.

:class:`EchoProbe` runs in a background thread of ``dicom-node serve`` (started
and stopped with the HTTP side, :class:`dicom_node.ops.http.HttpServer`): every
``http.echo_interval_s`` seconds (0: never) it C-ECHOes each destination with the
node's one C-ECHO (:func:`dicom_node.net.scu.echo`: the node's AE title,
timeouts and TLS files) and keeps the last result per destination in memory.

A destination that does not answer is shown, never made a readiness failure:
the node still receives and records studies, and the outbox retries its
deliveries (docs/operations.md).  The round trip is the whole verification:
connect (and TLS handshake), associate, C-ECHO, release.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dicom_node.net.scu import SendResult, echo
from dicom_node.settings import Destination, Settings
from dicom_node.statuses import FailureClass

logger = logging.getLogger(__name__)

#: Seconds :meth:`EchoProbe.stop` waits for a C-ECHO in flight (its timeouts are the node's, up to minutes).
STOP_WAIT_S = 5.0

Echo = Callable[[Destination, Settings], SendResult]


@dataclass(frozen=True)
class EchoResult:
    """The last C-ECHO of one destination.

    Attributes
    ----------
    destination : str
        The destination's name (``destinations[].name``).
    ok : bool
        The peer answered Success (0x0000).
    status : int or None
        The C-ECHO response status; None when no response came.
    category : str or None
        Why it failed (:class:`~dicom_node.statuses.FailureClass` value, e.g. ``connection_refused``).
    error : str or None
        One line saying what happened (no patient data: host, port, statuses).
    at : datetime
        When the C-ECHO started (UTC).
    rtt_ms : float
        Milliseconds from connecting to the release.
    """

    destination: str
    ok: bool
    status: int | None
    category: str | None
    error: str | None
    at: datetime
    rtt_ms: float

    def as_json(self) -> dict[str, Any]:
        """The result as ``/readyz`` shows it."""
        return {"ok": self.ok, "status": None if self.status is None else f"0x{self.status:04X}",
                "category": self.category, "error": self.error,
                "at": self.at.isoformat(timespec="seconds"), "rtt_ms": round(self.rtt_ms, 1)}

    @property
    def detail(self) -> str:
        """One line for the readiness check and the admin view."""
        when = self.at.isoformat(timespec="seconds")
        if self.ok:
            return f"C-ECHO {when}: status 0x0000 in {self.rtt_ms:.0f} ms"
        return f"C-ECHO {when}: {self.error or 'failed'} ({self.category or 'failure'}) after {self.rtt_ms:.0f} ms"


def echo_once(destination: Destination, settings: Settings, send: Echo = echo) -> EchoResult:
    """C-ECHO *destination* once and time it.

    Parameters
    ----------
    destination : Destination
        The peer.
    settings : Settings
        The node's settings (AE title, timeouts, TLS files).
    send : callable
        The C-ECHO (default :func:`dicom_node.net.scu.echo`).

    Returns
    -------
    EchoResult
        What the peer answered, or why it did not.
    """
    at = datetime.now(UTC)
    started = time.perf_counter()
    try:
        result = send(destination, settings)
    except Exception as exc:  # noqa: BLE001 -- a probe that raised is a failed probe, shown, not fatal
        logger.warning("C-ECHO of destination %s raised %s", destination.name, type(exc).__name__)
        result = SendResult(None, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}", None)
        category: str | None = FailureClass.LOCAL_ERROR.value
    else:
        category = result.failure.value if result.failure is not None else None
    rtt_ms = (time.perf_counter() - started) * 1000.0
    ok = result.status == 0x0000
    if not ok and category is None:
        category = FailureClass.FAILURE_STATUS.value
    return EchoResult(destination.name, ok, result.status, None if ok else category, result.error, at, rtt_ms)


class EchoProbe:
    """C-ECHOes every destination every ``http.echo_interval_s`` seconds in a background thread.

    Parameters
    ----------
    settings : Settings
        ``destinations`` and ``http.echo_interval_s`` (0: the probe never runs).
    send : callable
        The C-ECHO (default :func:`dicom_node.net.scu.echo`; tests may pass another).
    """

    def __init__(self, settings: Settings, send: Echo = echo) -> None:
        self.settings = settings
        self.interval_s = settings.http.echo_interval_s
        self._send = send
        self._results: dict[str, EchoResult] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rounds = 0
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """True when there is something to probe and an interval to do it at."""
        return self.interval_s > 0 and bool(self.settings.destinations)

    @property
    def rounds(self) -> int:
        """How many rounds (every destination once) have ended."""
        with self._lock:
            return self._rounds

    def results(self) -> dict[str, EchoResult]:
        """The last result of each configured destination that was probed, by name."""
        with self._lock:
            return dict(self._results)

    def probe_all(self) -> None:
        """One round: C-ECHO each destination in turn and keep the results."""
        for destination in self.settings.destinations:
            if self._stop.is_set():
                return
            result = echo_once(destination, self.settings, self._send)
            with self._lock:
                previous = self._results.get(destination.name)
                self._results[destination.name] = result
            # logged when it changes, not every round
            if not result.ok and (previous is None or previous.ok):
                logger.warning("destination %s does not answer C-ECHO: %s (%s)", destination.name, result.error,
                               result.category)
            elif result.ok and previous is not None and not previous.ok:
                logger.info("destination %s answers C-ECHO again", destination.name)
        with self._lock:
            self._rounds += 1

    def start(self) -> None:
        """Start the thread (a round at once, then every interval); nothing when not :attr:`enabled`."""
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="echo-probe", daemon=True)
        self._thread.start()
        logger.info("C-ECHO of %d destination(s) every %.0f s", len(self.settings.destinations), self.interval_s)

    def stop(self) -> None:
        """Stop the thread; a C-ECHO in flight is waited for up to :data:`STOP_WAIT_S` (then left to end)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=STOP_WAIT_S)
            if thread.is_alive():
                logger.info("C-ECHO in flight left to end on its own timeout")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_all()
            except Exception:  # this thread must live: one bad round is logged, the next one runs
                logger.exception("C-ECHO round failed")
            self._stop.wait(self.interval_s)
