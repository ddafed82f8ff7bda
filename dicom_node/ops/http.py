"""The HTTP side of ``dicom-node serve``: a FastAPI app served by uvicorn in a thread of the node.

:class:`HttpServer` binds its socket in :meth:`HttpServer.start` (so a port in
use stops start-up at once, with a one-line message naming ``http.port``),
then serves ``/healthz``, ``/readyz``, ``/metrics`` and the admin view
(:mod:`dicom_node.ops.views`) until :meth:`HttpServer.stop`.  The periodic
C-ECHO of the destinations (:mod:`dicom_node.ops.echo`) starts and stops with it.  uvicorn's access
log is off: query strings (an accession number in a filter) are not logged.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, RedirectResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.orm import Session, sessionmaker

from core.errors import NodeError
from dicom_node.ops import health
from dicom_node.ops.context import OpsContext
from dicom_node.ops.echo import EchoProbe
from dicom_node.ops.health import as_json
from dicom_node.ops.metrics import NodeCollector, make_registry
from dicom_node.ops.modelinfo import ModelIdentity
from dicom_node.ops.views import add_views
from dicom_node.runs.executors import RunExecutor
from dicom_node.settings import Settings

logger = logging.getLogger(__name__)

#: Seconds :meth:`HttpServer.start` waits for uvicorn to serve.
START_TIMEOUT_S = 15.0


def create_app(ctx: OpsContext) -> FastAPI:
    """The FastAPI application: health, readiness, metrics, admin view."""
    app = FastAPI(title="dicom-node", docs_url=None, redoc_url=None, openapi_url=None)
    registry = make_registry(ctx.collector)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive and serving HTTP."""
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Every critical check passed (200), or not (503); the body lists each check and the last C-ECHOs."""
        ready, results = ctx.readiness.run()
        echoes = ctx.echo.results() if ctx.echo is not None and ctx.echo.enabled else None
        return JSONResponse(as_json(ready, results, echoes), status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        """The node's figures in the Prometheus text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    add_views(app, ctx)
    return app


def bind_socket(host: str, port: int, key: str = "http.port") -> socket.socket:
    """A listening TCP socket on *host*:*port*; a port in use is a one-line :class:`NodeError`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise NodeError(f"cannot listen on {host}:{port} ({key}): {why}") from exc
    return sock


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the node handles SIGTERM/SIGINT itself
        return None


class HttpServer:
    """uvicorn serving :func:`create_app` in a background thread.

    Parameters
    ----------
    ctx : OpsContext
        What the app reads.
    """

    def __init__(self, ctx: OpsContext) -> None:
        self.ctx = ctx
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with ``http.port = 0``)."""
        if self._sock is None:
            raise NodeError("the HTTP server is not running")
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8042``."""
        host = self.ctx.settings.http.bind_address
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def start(self) -> None:
        """Bind, then serve in a thread; returns once uvicorn serves (or raises NodeError); start the C-ECHOs."""
        cfg = self.ctx.settings.http
        self._sock = bind_socket(cfg.bind_address, cfg.port)
        config = uvicorn.Config(create_app(self.ctx), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = _Server(config)
        server, sock = self._server, self._sock
        self._thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                                        name="http", daemon=True)
        self._thread.start()
        stopped = threading.Event()
        for _ in range(int(START_TIMEOUT_S / 0.05)):
            if server.started or not self._thread.is_alive():
                break
            stopped.wait(0.05)
        if not server.started:
            self.stop()
            raise NodeError(f"the HTTP server did not start on {cfg.bind_address}:{cfg.port}")
        logger.info("HTTP (health, metrics, admin view) on %s", self.url)
        if self.ctx.model is not None:
            self.ctx.model.prime()
        if self.ctx.echo is not None:
            self.ctx.echo.start()

    def stop(self) -> None:
        """Stop the C-ECHOs and serving, and close the socket."""
        if self.ctx.echo is not None:
            self.ctx.echo.stop()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self.ctx.readiness.close()
        self._server, self._thread, self._sock = None, None, None


def build_http_server(settings: Settings, sessions: sessionmaker[Session], *, listener_port: Callable[[], int],
                      executor: Callable[[], RunExecutor | None],
                      model_identity: Callable[[], dict[str, str] | None]) -> HttpServer:
    """The node's HTTP server with its readiness checks and metrics collector (not started).

    Parameters
    ----------
    settings : Settings
        Node settings (``http.*``).
    sessions : sessionmaker
        The node's database sessions.
    listener_port : callable
        The DICOM listener's port; raises while it is not listening.
    executor : callable
        The run executor, or None while it is starting (loading the model).
    model_identity : callable
        The model loaded by this node (name, version, weights) or the name its worker processes
        loaded (the rest is read from ``model.path``: :mod:`dicom_node.ops.modelinfo`), or None.
    """
    model = ModelIdentity(settings, model_identity)
    probe = EchoProbe(settings)
    checks = [
        health.database_check(sessions), health.spool_check(settings), health.disk_check(settings),
        health.listener_check(listener_port), health.workers_check(executor, settings),
        health.model_check(model, settings), health.destinations_check(sessions, settings),
        health.echo_check(probe),
    ]
    collector = NodeCollector(sessions, settings.http.metrics_cache_s, model, probe.results)
    return HttpServer(OpsContext(settings, sessions, health.Readiness(checks), collector, echo=probe, model=model))
