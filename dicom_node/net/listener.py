"""The listener's accept loop: timeouts from the first byte, TLS off the loop, a share per peer.

pynetdicom's ``ThreadedAssociationServer`` accepts connections in one thread
and leaves them without a socket timeout; with TLS it also runs the handshake
in that thread.  So one idle TLS connection blocks every new client, a peer
that sends part of an A-ASSOCIATE-RQ holds its association slot for ever, and
ten such connections fill ``network.max_associations``.
:class:`EdgeAssociationServer` changes three steps and nothing else:

- every accepted socket gets ``network.acse_timeout_s`` as its timeout at once
  (the association raises it to ``network_timeout_s`` once established, see
  :mod:`dicom_node.net.reactors`);
- with TLS the socket is wrapped without a handshake, which then runs in the
  connection's own thread under that timeout: a peer that stalls it holds only
  its own thread, and is closed when the timeout passes;
- a peer address with ``network.max_associations_per_peer`` connections open
  (negotiating or established) has further ones closed at once, so that idle or
  half-open connections from one host cannot take the slots of the others.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import ssl
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)


class EdgeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the node's accept rules (see the module).

    Set :attr:`accept_timeout_s`, :attr:`per_peer_limit` and :attr:`tls_context`
    before serving.
    """

    #: Timeout of an accepted socket until its association is established (s).
    accept_timeout_s: float = 30.0
    #: Connections one peer address may hold open at a time.
    per_peer_limit: int = 10
    #: The listener's TLS context; None for plain TCP.
    tls_context: ssl.SSLContext | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: collections.defaultdict[str, set[Any]] = collections.defaultdict(set)  # not yet started
        self._pending_lock = threading.Lock()
        self._handshaking: set[ssl.SSLSocket] = set()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection: timeout set at once, TLS wrapped but not yet negotiated."""
        assert self.socket is not None
        client, address = self.socket.accept()
        client.settimeout(self.accept_timeout_s)
        if self.tls_context is not None:
            try:
                client = self.tls_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            except (OSError, ValueError):
                client.close()
                raise OSError("TLS wrap failed") from None
        return client, address

    def _open_from(self, host: str) -> int:
        pending = self._pending.get(host, set())
        live = sum(1 for assoc in self.active_associations
                   if str(getattr(assoc.requestor, "address", "")) == host
                   and not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)  # winding down: no slot
                   and getattr(getattr(assoc.dul, "socket", None), "socket", None) not in pending)
        return live + len(pending)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse a connection from a peer address that holds ``per_peer_limit`` already."""
        host = str(client_address[0])
        with self._pending_lock:
            if self._open_from(host) >= self.per_peer_limit:
                logger.warning("connection from %s closed: %d connection(s) from that address already open "
                               "(network.max_associations_per_peer)", host, self.per_peer_limit)
                return False
            self._pending[host].add(request)
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's thread: the TLS handshake (under the accept timeout), then pynetdicom's handler."""
        host = str(client_address[0])
        try:
            if isinstance(request, ssl.SSLSocket):
                with self._pending_lock:
                    self._handshaking.add(request)
                try:
                    request.do_handshake()
                except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
                    logger.warning("TLS handshake with %s failed (%s); connection closed", host,
                                   type(exc).__name__ if isinstance(exc, TimeoutError) else exc)
                    self.shutdown_request(request)
                    return
                finally:
                    with self._pending_lock:
                        self._handshaking.discard(request)
            super().process_request_thread(request, client_address)
        finally:
            with self._pending_lock:  # the association thread now counts (or the connection is gone)
                self._pending[host].discard(request)
                if not self._pending[host]:
                    del self._pending[host]

    def server_close(self) -> None:
        """Close the listener; handshakes still in progress end at once (their threads are joined)."""
        with self._pending_lock:
            stalled = list(self._handshaking)
        for sock in stalled:
            with contextlib.suppress(OSError):  # already closed by its peer
                sock.shutdown(socket.SHUT_RDWR)
        super().server_close()


def start_listener(ae: AE, address: tuple[str, int], handlers: list[Any], *, accept_timeout_s: float,
                   per_peer_limit: int, tls_context: ssl.SSLContext | None) -> EdgeAssociationServer:
    """``ae.start_server(address, block=False, ...)`` with :class:`EdgeAssociationServer`.

    Returns the running server (stopped by its ``shutdown()`` or ``ae.shutdown()``).
    """
    server = ae.make_server(address, evt_handlers=handlers, server_class=EdgeAssociationServer)
    assert isinstance(server, EdgeAssociationServer)
    server.accept_timeout_s = accept_timeout_s
    server.per_peer_limit = per_peer_limit
    server.tls_context = tls_context
    thread = threading.Thread(target=server.serve_forever, name="EdgeAcceptor", daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
