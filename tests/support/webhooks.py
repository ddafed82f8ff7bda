"""A local webhook receiver: HTTP on 127.0.0.1 (a free port) that records POSTs and answers scripted statuses."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass(frozen=True)
class Received:
    """One request as the receiver got it (header names lower-case)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class WebhookReceiver:
    """Records every request; answers the statuses in :attr:`statuses` in order, then 200.

    A 3xx answer carries ``Location: /elsewhere`` (a client that follows redirects would show up there).
    """

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.statuses: list[int] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with receiver._lock:
                    receiver.requests.append(Received(self.command, self.path,
                                                      {k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            do_POST = _serve  # noqa: N815 -- http.server's naming
            do_GET = _serve  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # quiet
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The URL to configure as the webhook."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/dicom-node"

    def received(self) -> list[Received]:
        """A copy of the requests so far."""
        with self._lock:
            return list(self.requests)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A running :class:`WebhookReceiver`."""
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()
