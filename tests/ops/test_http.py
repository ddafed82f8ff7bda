"""The HTTP side on a free port: health, readiness, Prometheus metrics, admin pages and the admin token."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from core.errors import NodeError
from dicom_node.db.models import Delivery
from dicom_node.db.session import Database, open_database
from dicom_node.ops.http import HttpServer, bind_socket, build_http_server
from dicom_node.settings import Settings
from tests.conftest import make_settings
from tests.ops.seed import PATIENT_ID, RUN_OK, seed
from tests.support.http import get

TOKEN = "test-admin-token-0123456789"


def start(settings: Settings, db: Database, *, executor: Any = None, listening: bool = True) -> HttpServer:
    def port() -> int:
        if not listening:
            raise NodeError("not running")
        return 11112
    server = build_http_server(settings, db.sessions, listener_port=port, executor=lambda: executor,
                               model_identity=lambda: {"name": "brain-adapter-demo", "version": "0.1"})
    server.start()
    return server


@pytest.fixture
def ops_settings(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path, **{"http.admin_token": TOKEN, "http.metrics_cache_s": 0,
                                          "database.url": "postgresql+psycopg://node:s3cret-pw@127.0.0.1:1/x",
                                          "storage.free_space_reserve_mb": 1})
    return settings


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[HttpServer, Database]]:
    settings = make_settings(tmp_path, **{"http.admin_token": TOKEN, "http.metrics_cache_s": 0,
                                          "storage.free_space_reserve_mb": 1})
    settings.spool_dir.mkdir(parents=True)
    db = open_database(settings.database_url)
    seed(db.sessions)
    server = start(settings, db, executor=object())
    yield server, db
    server.stop()
    db.engine.dispose()


def test_healthz_and_readyz_ready(served: tuple[HttpServer, Database]) -> None:
    server, _ = served
    assert get(server.url + "/healthz")[:2] == (200, '{"status":"alive"}')
    status, body, _ = get(server.url + "/readyz")
    checks = json.loads(body)["checks"]
    assert status == 200, body
    assert {name: c["ok"] for name, c in checks.items() if c["critical"]} == {
        "database": True, "spool": True, "disk": True, "listener": True, "workers": True, "model": True}
    assert checks["listener"]["detail"] == "listening on port 11112"
    assert "name=brain-adapter-demo" in checks["model"]["detail"]


def test_readyz_not_ready_while_starting_and_without_database(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **{"http.metrics_cache_s": 0, "storage.free_space_reserve_mb": 1})
    settings.spool_dir.mkdir(parents=True)
    missing = Database(*_unreachable(tmp_path))
    server = start(settings, missing, executor=None, listening=False)
    try:
        status, body, _ = get(server.url + "/readyz")
        checks = json.loads(body)["checks"]
        assert status == 503
        assert json.loads(body)["status"] == "not ready"
        assert checks["database"]["ok"] is False and "OperationalError" in checks["database"]["detail"]
        assert checks["workers"] == {"name": "workers", "ok": False, "detail": "starting (loading the model)",
                                     "critical": True}
        assert checks["listener"]["ok"] is False
        assert checks["spool"]["ok"] is True
        status, body, _ = get(server.url + "/metrics")
        assert status == 200 and "dicom_node_database_up 0.0" in body
    finally:
        server.stop()


def _unreachable(tmp_path: Path) -> tuple[Any, Any]:
    from sqlalchemy import create_engine

    from dicom_node.db.session import make_sessionmaker

    engine = create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'node.sqlite3'}")
    return engine, make_sessionmaker(engine)


def test_metrics_are_read_from_the_database(served: tuple[HttpServer, Database]) -> None:
    server, _ = served
    status, body, headers = get(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples[("dicom_node_instances_received_total", ())] == 3
    assert samples[("dicom_node_instances_refused_total", (("status", "0x0122"),))] == 1
    assert samples[("dicom_node_associations_total", (("outcome", "released"),))] == 1
    assert samples[("dicom_node_associations_total", (("outcome", "aborted"),))] == 1
    assert samples[("dicom_node_runs", (("outcome", "analysed"), ("state", "succeeded")))] == 1
    assert samples[("dicom_node_runs", (("outcome", "no_suitable_series"), ("state", "not_analysed")))] == 1
    assert samples[("dicom_node_queue_depth", ())] == 1
    assert 80 <= samples[("dicom_node_queue_oldest_age_seconds", ())] < 600
    assert samples[("dicom_node_deliveries", (("state", "dead"),))] == 1
    assert samples[("dicom_node_deliveries", (("state", "sent"),))] == 1
    assert samples[("dicom_node_dead_letters", ())] == 1
    assert samples[("dicom_node_run_stage_seconds_count", (("stage", "selected"),))] == 2
    assert samples[("dicom_node_run_stage_seconds_bucket", (("le", "30.0"), ("stage", "preprocessed")))] == 0
    assert samples[("dicom_node_run_stage_seconds_bucket", (("le", "60.0"), ("stage", "preprocessed")))] == 1
    assert samples[("dicom_node_run_stage_seconds_sum", (("stage", "converted"),))] == 3.0
    assert samples[("dicom_node_model_info", (("name", "brain-adapter-demo"), ("source", "loaded"),
                                              ("version", "0.1"), ("weights_sha256", "")))] == 1
    # and the model the most recent finished run used, whichever process ran it
    assert samples[("dicom_node_model_info", (("name", "brain-adapter-demo"), ("source", "last_run"),
                                              ("version", "0.1"), ("weights_sha256", "ab" * 32)))] == 1
    assert samples[("dicom_node_database_up", ())] == 1
    assert PATIENT_ID not in body and "ACC-OPS" not in body


def test_runs_page_filters_and_patient_ids_only_for_admins(served: tuple[HttpServer, Database]) -> None:
    server, _ = served
    status, body, _ = get(server.url + "/runs")
    assert status == 200
    assert body.count('href="/runs/') == 3 and "a1b2c3d4" in body and "ACC-OPS-1" in body
    assert PATIENT_ID not in body
    body = get(server.url + "/runs?" + urllib.parse.urlencode({"state": "succeeded"}))[1]
    assert body.count('href="/runs/') == 1 and RUN_OK in body
    body = get(server.url + "/runs?accession=ACC-OPS-2")[1]
    assert body.count('href="/runs/') == 2 and RUN_OK not in body
    body = get(server.url + "/runs?id=a1b2")[1]
    assert body.count('href="/runs/') == 2
    body = get(server.url + "/runs", {"Authorization": f"Bearer {TOKEN}"})[1]
    assert PATIENT_ID in body
    assert PATIENT_ID not in get(server.url + "/runs", {"Authorization": "Bearer wrong-token-000000000"})[1]


def test_run_page_by_prefix(served: tuple[HttpServer, Database]) -> None:
    server, _ = served
    status, _, headers = get(server.url + "/runs/a1b2c3")
    assert status == 303 and headers["Location"] == f"/runs/{RUN_OK}"
    status, body, _ = get(server.url + f"/runs/{RUN_OK}")
    assert status == 200
    for expected in ("t1_mprage_sag", "+2 T1 protocol name", "template_correlation", "N-17", "2026-10-01",
                     "brain-adapter-demo", "0xA700", "out_of_resources", "preprocessed"):
        assert expected in body, expected
    assert PATIENT_ID not in body
    assert get(server.url + "/runs/a1b2")[0] == 404  # ambiguous
    assert get(server.url + "/runs/zzzz")[0] == 404


def test_dead_letter_retry_needs_the_admin_token(served: tuple[HttpServer, Database]) -> None:
    server, db = served
    with db.sessions() as session:
        dead_id = session.scalars(select(Delivery.id).where(Delivery.state == "dead")).one()
    url = f"{server.url}/dead-letters/{dead_id}/retry"
    assert get(url, data=b"csrf=x")[0] == 403
    assert "admin only" in get(server.url + "/dead-letters")[1]
    # log in with the token: a cookie, then the form's CSRF value
    status, _, headers = get(server.url + "/login", data=urllib.parse.urlencode({"token": TOKEN}).encode())
    assert status == 303
    cookie = headers["Set-Cookie"].split(";")[0]
    assert TOKEN not in cookie and "SameSite=strict" in headers["Set-Cookie"]
    page = get(server.url + "/dead-letters", {"Cookie": cookie})[1]
    csrf = page.split('name="csrf" value="')[1].split('"')[0]
    assert get(url, {"Cookie": cookie}, data=b"csrf=forged")[0] == 403
    status, _, headers = get(url, {"Cookie": cookie}, data=f"csrf={csrf}".encode())
    assert status == 303 and headers["Location"] == f"/dead-letters?replayed={dead_id}%3A1"
    with db.sessions() as session:
        row = session.get(Delivery, dead_id)
        assert row is not None and row.state == "pending" and row.attempts == 0
    assert get(f"{server.url}/dead-letters/999/retry", {"Authorization": f"Bearer {TOKEN}"}, data=b"")[0] == 404
    assert get(server.url + "/login", data=b"token=wrong")[2]["Location"] == "/login?failed=1"


def test_config_page_masks_secrets(tmp_path: Path, ops_settings: Settings) -> None:
    ops_settings.spool_dir.mkdir(parents=True)
    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    server = start(ops_settings, db)
    try:
        body = get(server.url + "/config")[1]
    finally:
        server.stop()
        db.engine.dispose()
    assert "http.admin_token" in body and TOKEN not in body and "*** (set)" in body
    assert "s3cret-pw" not in body and "postgresql+psycopg://node:***@127.0.0.1:1/x" in body
    assert "guest:***@" in body  # the broker URL's password


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        expected = rf"^cannot listen on 127.0.0.1:{port} \(http.port\): address already in use$"
        with pytest.raises(NodeError, match=expected):
            bind_socket("127.0.0.1", port)
    finally:
        taken.close()
