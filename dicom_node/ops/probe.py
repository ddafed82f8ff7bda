"""The systemd health check: probe ``/readyz`` once; restart the node's unit after repeated failures.

Run by ``dicom-node-health.service`` (every minute, ``dicom-node-health.timer``)::

    python -m dicom_node.ops.probe --unit dicom-node.service --state-file /var/lib/dicom-node-health/failures

The URL comes from the node's own settings (``http.bind_address`` and
``http.port`` of ``$DICOM_NODE_CONFIG`` and the environment, as ``dicom-node
serve`` reads them; a wildcard bind is probed on the loopback), so it cannot
drift from the node's.  A probe that is answered 200 resets the count of
consecutive failures kept in ``--state-file``.  After ``--restart-after``
consecutive failures the probe runs ``systemctl --no-block restart UNIT`` --
only where a restart can help: the node does not answer at all (hung, or its
HTTP side died), or a failing critical check is one of :data:`RESTARTABLE`
(listener, worker processes, model) while none of :data:`EXTERNAL` (database,
spool, disk reserve) fails: a node whose database or disk is down is not
helped by a restart, which would only drop the associations in flight.  For
``--grace`` seconds after the unit (re)started, not ready counts as starting
(the worker processes load the model).

Exit status: 0 ready (or the unit not running, or starting), 1 not ready
(the health unit shows failed: hook alerting on it with ``OnFailure=``),
2 a configuration error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import NodeError
from dicom_node.settings import Settings, load_settings

#: Critical checks whose failure a restart of the node can mend.
RESTARTABLE = frozenset({"listener", "workers", "model"})
#: Critical checks that fail for reasons outside the node: no restart.
EXTERNAL = frozenset({"database", "spool", "disk"})
#: Default consecutive failures before a restart, seconds of grace after a start, HTTP timeout.
RESTART_AFTER = 3
GRACE_S = 300.0
TIMEOUT_S = 10.0


def readyz_url(settings: Settings) -> str:
    """The node's ``/readyz`` URL as a local probe reaches it (a wildcard bind on the loopback)."""
    if not settings.http.enabled:
        raise NodeError("http.enabled is false: the node serves no /readyz to probe")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104 -- mapping, not binding
        settings.http.bind_address, settings.http.bind_address)
    if settings.http.port == 0:
        raise NodeError("http.port is 0 (any free port): set a fixed port to probe the node")
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.http.port}/readyz"


@dataclass(frozen=True)
class Probe:
    """What one GET of ``/readyz`` found."""

    answered: bool
    ready: bool
    failing: tuple[str, ...]
    text: str

    @property
    def restart_helps(self) -> bool:
        """True when a restart of the node can mend what failed."""
        if not self.answered:
            return True
        failing = set(self.failing)
        return bool(failing & RESTARTABLE) and not failing & EXTERNAL


def probe(url: str, timeout_s: float = TIMEOUT_S) -> Probe:
    """GET *url* once.

    Parameters
    ----------
    url : str
        The ``/readyz`` URL.
    timeout_s : float
        Seconds to wait for the answer.

    Returns
    -------
    Probe
        Whether it answered, whether ready, the failing critical checks and the body (or the error).
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 -- http URL of our settings
            return Probe(True, response.status == 200, (), response.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            checks = json.loads(text)["checks"]
            failing = tuple(sorted(name for name, c in checks.items() if c.get("critical") and not c.get("ok")))
        except (ValueError, KeyError, TypeError, AttributeError):
            failing = ()
        return Probe(True, False, failing, text)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Probe(False, False, (), f"no answer from {url}: {reason}")


def _systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False, timeout=30)


def unit_active_for(unit: str) -> float | None:
    """Seconds *unit* has been active, or None when it is not active."""
    if _systemctl("is-active", "--quiet", unit).returncode != 0:
        return None
    shown = _systemctl("show", "--property=ActiveEnterTimestampMonotonic", "--value", unit).stdout.strip()
    try:
        entered_us = int(shown)
    except ValueError:
        return float("inf")  # unknown: no grace
    return max(0.0, time.clock_gettime(time.CLOCK_MONOTONIC) - entered_us / 1e6)


class FailureCount:
    """Consecutive failed probes, kept in a file between the timer's runs (none: every failure is the first)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def read(self) -> int:
        """The count so far."""
        if self.path is None:
            return 0
        try:
            return max(0, int(self.path.read_text(encoding="utf-8").strip() or 0))
        except (FileNotFoundError, ValueError):
            return 0

    def write(self, count: int) -> None:
        """Store *count*."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"{count}\n", encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    """The probe's arguments."""
    parser = argparse.ArgumentParser(prog="python -m dicom_node.ops.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="the node's settings file (default $DICOM_NODE_CONFIG)")
    parser.add_argument("--url", help="probe this URL instead of the one of the settings")
    parser.add_argument("--unit", help="the node's systemd unit (dicom-node.service); without: never restart")
    parser.add_argument("--state-file", type=Path, help="where the count of consecutive failures is kept")
    parser.add_argument("--restart-after", type=int, default=RESTART_AFTER,
                        help=f"consecutive failures before a restart (default {RESTART_AFTER}; 0: never)")
    parser.add_argument("--grace", type=float, default=GRACE_S,
                        help="seconds after the unit started when not ready counts as starting "
                             f"(default {GRACE_S:.0f})")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds to wait for /readyz")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Probe once; see the module's docstring for the exit status."""
    args = build_parser().parse_args(argv)
    try:
        url = args.url or readyz_url(load_settings(args.config))
    except NodeError as exc:
        print(f"dicom-node probe: error: {exc}", file=sys.stderr)
        return 2
    count = FailureCount(args.state_file)
    active_for = unit_active_for(args.unit) if args.unit else float("inf")
    if active_for is None:
        print(f"{args.unit} is not active: not probed (its Restart= handles a crash)")
        count.write(0)
        return 0
    found = probe(url, args.timeout)
    if found.ready:
        print(f"ready ({url})")
        count.write(0)
        return 0
    print(found.text)
    why = f"failing: {', '.join(found.failing) or 'unknown'}" if found.answered else "no answer"
    if active_for < args.grace:
        print(f"not ready yet ({why}); {args.unit} started {active_for:.0f} s ago (grace {args.grace:.0f} s)")
        return 0
    failures = count.read() + 1
    if args.unit and args.restart_after > 0 and failures >= args.restart_after:
        if found.restart_helps:
            print(f"not ready {failures} times in a row ({why}): restarting {args.unit}", file=sys.stderr)
            restarted = _systemctl("--no-block", "restart", args.unit)
            if restarted.returncode != 0:
                print(f"systemctl restart {args.unit} failed: {restarted.stderr.strip()}", file=sys.stderr)
            failures = 0
        else:
            print(f"not ready {failures} times in a row ({why}): not restarting {args.unit}, "
                  f"a restart does not mend {', '.join(sorted(set(found.failing) & EXTERNAL))}", file=sys.stderr)
    else:
        print(f"not ready ({why}); failure {failures} of {args.restart_after} before a restart", file=sys.stderr)
    count.write(failures)
    return 1


if __name__ == "__main__":
    sys.exit(main())
