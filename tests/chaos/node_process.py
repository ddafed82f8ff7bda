"""The node as a separate process, to be killed and restarted, and its peers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.cli.localpacs import LocalOrthanc, free_port, wait_for
from dicom_node.cli.localpacs import echo_ok as local_echo_ok

SCANNER_AE = "CHAOS_SCANNER"
NODE_AE = "AD_NODE"


def _rss_kb(pid: int) -> int:
    """Resident set of a process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _children(pid: int) -> list[int]:
    """Child processes of *pid* (the node's run workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == str(pid):
            found.append(int(stat.parent.name))
    return found


def echo_ok(port: int, ae_title: str = NODE_AE, calling: str = SCANNER_AE) -> bool:
    """True when the node answers C-ECHO."""
    return local_echo_ok(port, ae_title, calling)


@dataclass
class NodeProcess:
    """``dicom-node serve`` in a child process with its own data directory.

    Parameters
    ----------
    root : Path
        Directory for data and logs.
    pacs : LocalOrthanc
        The destination of reports.
    model : Path
        Model directory.
    extra_env : Mapping[str, str]
        More ``DICOM_NODE_*`` settings.
    """

    root: Path
    pacs: LocalOrthanc
    model: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    starts: int = 0
    peak_rss_kb: int = 0
    _proc: subprocess.Popen[bytes] | None = None
    _sampler: threading.Thread | None = None

    @property
    def data_dir(self) -> Path:
        """The node's data directory."""
        return self.root / "node"

    @property
    def log_path(self) -> Path:
        """Where the node's log goes (appended across restarts)."""
        return self.root / "node.log"

    def env(self) -> dict[str, str]:
        """The environment the node runs with."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
        env.update({
            "DICOM_NODE_STORAGE__DATA_DIR": str(self.data_dir),
            "DICOM_NODE_NETWORK__PORT": str(self.port),
            "DICOM_NODE_HTTP__PORT": "0",
            "DICOM_NODE_NETWORK__AE_TITLE": NODE_AE,
            "DICOM_NODE_NETWORK__ALLOWED_CALLING_AE_TITLES": SCANNER_AE,
            "DICOM_NODE_DESTINATIONS": json.dumps(
                [{"name": "pacs", "ae_title": self.pacs.ae_title, "host": "127.0.0.1", "port": self.pacs.dicom_port}]),
            "DICOM_NODE_COMPLETENESS__QUIET_PERIOD_S": "1.5",
            "DICOM_NODE_COMPLETENESS__POLL_INTERVAL_S": "0.2",
            "DICOM_NODE_DELIVERY__INITIAL_BACKOFF_S": "0.5",
            "DICOM_NODE_DELIVERY__MAX_BACKOFF_S": "5",
            "DICOM_NODE_DELIVERY__MAX_ATTEMPTS": "1000",
            "DICOM_NODE_STORAGE__FREE_SPACE_RESERVE_MB": "64",
            "DICOM_NODE_MODEL__PATH": str(self.model),
            "DICOM_NODE_VOLUMETRY__ENABLED": "false",  # on in the product: about a minute more per run
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 120) -> None:
        """Start the node and wait until it answers C-ECHO."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve"], env=self.env(),
                                          stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        self._sampler = threading.Thread(target=self._sample, args=(self._proc,), daemon=True)
        self._sampler.start()
        wait_for(lambda: self._check_alive() and echo_ok(self.port), timeout_s, "the node to answer C-ECHO")

    def _check_alive(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise RuntimeError(f"node exited with code {code}; see {self.log_path}")
        return True

    def _sample(self, proc: subprocess.Popen[bytes]) -> None:
        """Peak memory of the node and its worker processes together (sum of resident sets, sampled)."""
        pause = threading.Event()
        while proc.poll() is None:
            total = sum(_rss_kb(pid) for pid in (proc.pid, *_children(proc.pid)))
            self.peak_rss_kb = max(self.peak_rss_kb, total)
            pause.wait(0.2)

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self._proc is None:
            return 0
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return int(self._proc.returncode)
