"""A local Orthanc as the receiving PACS, for the demo and the tests.

Orthanc (Debian package ``orthanc``) runs as a child process on free ports of
127.0.0.1 with its storage in a private directory; its REST API tells what it
received.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from core.errors import NodeError
from dicom_node.net.scu import echo
from dicom_node.settings import Destination

logger = logging.getLogger(__name__)

ORTHANC = "/usr/sbin/Orthanc"
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Poll *condition* until it returns a truthy value; raise after *timeout_s*."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise NodeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        pause.wait(interval_s)


def echo_ok(port: int, ae_title: str, calling_ae_title: str, host: str = "127.0.0.1") -> bool:
    """True when a DICOM peer on *host*:*port* answers C-ECHO with Success (no error logs while it is down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if sock.connect_ex((host, port)) != 0:
            return False
    peer = Destination(name="peer", ae_title=ae_title, host=host, port=port)
    return echo(peer, calling_ae_title=calling_ae_title).status == 0


class LocalOrthanc:
    """An Orthanc child process.

    Parameters
    ----------
    workdir : Path
        Private directory for its configuration, storage and log.
    ae_title : str
        Its AE title.
    modalities : Mapping, optional
        Orthanc's ``DicomModalities``: name to ``[AE title, host, port]``; the AE titles allowed to query and
        retrieve (C-FIND, C-MOVE, C-GET) and the C-MOVE destinations.  Default none (C-STORE and C-ECHO only).
    """

    def __init__(self, workdir: Path, ae_title: str = "PACS",
                 modalities: Mapping[str, tuple[str, str, int]] | None = None) -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        #: Orthanc's ``DicomModalities`` as written to its configuration: a ``[AE, host, port]`` list, or
        #: Orthanc's object form (``{"AET": ..., "AllowGet": ...}``) set by callers that need its options.
        self.modalities: Mapping[str, object] = {name: list(entry) for name, entry in (modalities or {}).items()}
        self.dicom_port = free_port()
        self.http_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60) -> None:
        """Start Orthanc and wait until its REST API answers."""
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "local-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "StableAge": 2,
            "DicomModalities": self.modalities,
        }
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        log = open(self.workdir / "orthanc.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self._proc = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self._alive, timeout_s, "Orthanc's REST API")
        logger.info("Orthanc %s listening on DICOM %d, HTTP %d", self.ae_title, self.dicom_port, self.http_port)

    def _alive(self) -> bool:
        if self._proc is not None and self._proc.poll() is not None:
            raise NodeError(f"Orthanc exited with code {self._proc.returncode}; see {self.workdir / 'orthanc.log'}")
        try:
            self.get("/system")
        except (urllib.error.URLError, ConnectionError, OSError):
            return False
        return True

    def stop(self) -> None:
        """Stop Orthanc."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _request(self, path: str, body: bytes | None = None, method: str = "GET", timeout: float = 30) -> bytes:
        # Only ever our own http://127.0.0.1 URL (self.url), never a value from outside.
        request = urllib.request.Request(self.url + path, data=body, method=method)  # noqa: S310
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return bytes(response.read())

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        return json.loads(self._request(path, timeout=10))

    def get_bytes(self, path: str) -> bytes:
        """GET a REST resource as bytes."""
        return self._request(path)

    def delete(self, path: str) -> None:
        """DELETE a REST resource."""
        self._request(path, method="DELETE")

    def find_instances(self, **query: str) -> list[dict[str, Any]]:
        """Instances matching a DICOM query (``/tools/find``), expanded."""
        body = json.dumps({"Level": "Instance", "Query": query, "Expand": True}).encode()
        return list(json.loads(self._request("/tools/find", body, "POST", 10)))

    def __enter__(self) -> LocalOrthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
