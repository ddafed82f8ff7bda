"""The periodic C-ECHO of the destinations against real Verification SCPs on 127.0.0.1 and a closed port:
results in memory, in /readyz (informational: the node stays ready), in /metrics and on the /config page."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.cli.localpacs import free_port, wait_for
from dicom_node.db.session import Database, open_database
from dicom_node.ops.echo import EchoProbe, echo_once
from dicom_node.ops.http import HttpServer, build_http_server
from dicom_node.runs.executors import RunExecutor
from dicom_node.settings import Settings
from tests.conftest import make_settings
from tests.support.http import get

FAILING_STATUS = 0xC001


def any_executor() -> RunExecutor:
    """An executor of no known kind: the workers check passes (its kind is not looked at)."""
    return cast(RunExecutor, object())


@dataclass
class Scp:
    """A Storage and Verification SCP on a free port that records the calling AE title of each C-ECHO."""

    ae_title: str
    status: int
    port: int = 0
    callers: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_echo(self, event: evt.Event) -> int:
        with self.lock:
            self.callers.append(event.assoc.requestor.ae_title)
        return self.status

    def count(self) -> int:
        with self.lock:
            return len(self.callers)


@pytest.fixture
def scps() -> Iterator[tuple[Scp, Scp]]:
    """A PACS answering Success and one answering C-ECHO with a failure status."""
    servers: list[ThreadedAssociationServer] = []
    made = []
    for title, status in (("PACS", 0x0000), ("GRUMPY", FAILING_STATUS)):
        scp = Scp(title, status)
        ae = AE(ae_title=title)
        ae.add_supported_context(Verification)
        ae.add_supported_context(MRImageStorage)
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, scp.on_echo)])
        assert server is not None
        scp.port = int(server.server_address[1])
        servers.append(server)
        made.append(scp)
    yield made[0], made[1]
    for running in servers:
        running.shutdown()


def settings_with(tmp_path: Path, pacs: Scp, grumpy: Scp, closed: int, **overrides: object) -> Settings:
    return make_settings(tmp_path, **{
        "destinations": [
            {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
            {"name": "grumpy", "ae_title": grumpy.ae_title, "host": "127.0.0.1", "port": grumpy.port},
            {"name": "closed", "ae_title": "NOBODY", "host": "127.0.0.1", "port": closed},
        ],
        "http.metrics_cache_s": 0, "storage.free_space_reserve_mb": 1, **overrides})


def test_one_round_records_status_category_time_and_round_trip(tmp_path: Path, scps: tuple[Scp, Scp]) -> None:
    pacs, grumpy = scps
    settings = settings_with(tmp_path, pacs, grumpy, free_port())
    probe = EchoProbe(settings)
    before = datetime.now(UTC)
    probe.probe_all()
    results = probe.results()
    assert probe.rounds == 1 and set(results) == {"pacs", "grumpy", "closed"}
    ok, failing, closed = results["pacs"], results["grumpy"], results["closed"]
    assert (ok.ok, ok.status, ok.category, ok.error) == (True, 0x0000, None, None)
    assert before <= ok.at <= datetime.now(UTC) and 0 < ok.rtt_ms < 10_000
    assert (failing.ok, failing.status, failing.category) == (False, FAILING_STATUS, "failure_status")
    assert failing.error == "C-ECHO status 0xC001"
    assert (closed.ok, closed.status, closed.category) == (False, None, "connection_refused")
    assert closed.error is not None and "refused or unreachable" in closed.error
    # as the node: its AE title, once per destination and round
    assert pacs.callers == [settings.network.ae_title] and grumpy.callers == [settings.network.ae_title]
    assert ok.as_json()["status"] == "0x0000" and failing.as_json()["status"] == "0xC001"
    assert closed.as_json()["status"] is None and closed.as_json()["category"] == "connection_refused"


def test_a_failing_destination_is_logged_when_it_starts_failing_not_every_round(
        tmp_path: Path, scps: tuple[Scp, Scp], caplog: pytest.LogCaptureFixture) -> None:
    pacs, grumpy = scps
    settings = settings_with(tmp_path, pacs, grumpy, free_port())
    probe = EchoProbe(settings)
    with caplog.at_level(logging.INFO, logger="dicom_node.ops.echo"):
        probe.probe_all()
        probe.probe_all()
    ours = [r.getMessage() for r in caplog.records if r.name == "dicom_node.ops.echo"]
    assert probe.rounds == 2
    assert sorted(m.split(" does not")[0] for m in ours) == ["destination closed", "destination grumpy"], ours
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "dicom_node.ops.echo")


def test_an_echo_that_raises_is_a_failed_result(tmp_path: Path, scps: tuple[Scp, Scp]) -> None:
    pacs, grumpy = scps
    settings = settings_with(tmp_path, pacs, grumpy, free_port())

    def broken(*_: object) -> object:
        raise OSError("certificate file missing")

    result = echo_once(settings.destinations[0], settings, broken)  # type: ignore[arg-type]
    assert (result.ok, result.status, result.category) == (False, None, "local_error")
    assert result.error == "OSError: certificate file missing"


@pytest.fixture
def served(tmp_path: Path, scps: tuple[Scp, Scp]) -> Iterator[tuple[HttpServer, Scp, Database]]:
    pacs, grumpy = scps
    settings = settings_with(tmp_path, pacs, grumpy, free_port(), **{"http.echo_interval_s": 0.3})
    settings.spool_dir.mkdir(parents=True)
    db = open_database(settings.database_url)
    server = build_http_server(settings, db.sessions, listener_port=lambda: 11112, executor=any_executor,
                               model_identity=lambda: {"name": "m", "version": "1", "weights_sha256": "c" * 64})
    server.start()
    yield server, pacs, db
    server.stop()
    db.engine.dispose()


def test_readyz_shows_the_last_echo_and_stays_ready(served: tuple[HttpServer, Scp, Database]) -> None:
    server, pacs, _ = served
    wait_for(lambda: pacs.count() >= 2, 30, "two rounds of C-ECHO (the probe repeats)")
    status, body, _ = get(server.url + "/readyz")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "ready", body
    assert set(answer["echo"]) == {"pacs", "grumpy", "closed"}
    assert answer["echo"]["pacs"]["ok"] is True and answer["echo"]["pacs"]["status"] == "0x0000"
    assert answer["echo"]["pacs"]["rtt_ms"] > 0
    assert datetime.fromisoformat(answer["echo"]["pacs"]["at"]) <= datetime.now(UTC)
    assert answer["echo"]["closed"] | {"at": None, "rtt_ms": None, "error": None} == {
        "ok": False, "status": None, "category": "connection_refused", "at": None, "rtt_ms": None, "error": None}
    assert answer["echo"]["grumpy"]["status"] == "0xC001"
    checks = answer["checks"]
    assert checks["echo:closed"]["ok"] is False and checks["echo:closed"]["critical"] is False
    assert "connection_refused" in checks["echo:closed"]["detail"]
    assert checks["echo:pacs"]["ok"] is True and "status 0x0000" in checks["echo:pacs"]["detail"]


def test_metrics_and_config_page_show_the_echoes(served: tuple[HttpServer, Scp, Database]) -> None:
    server, pacs, _ = served
    wait_for(lambda: server.ctx.echo is not None and server.ctx.echo.rounds >= 1, 30, "a round of C-ECHO")
    status, body, _ = get(server.url + "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert status == 200
    assert samples[("dicom_node_destination_echo_up", (("destination", "pacs"),))] == 1.0
    assert samples[("dicom_node_destination_echo_up", (("destination", "grumpy"),))] == 0.0
    assert samples[("dicom_node_destination_echo_up", (("destination", "closed"),))] == 0.0
    assert 0 < samples[("dicom_node_destination_echo_rtt_seconds", (("destination", "pacs"),))] < 10
    assert abs(samples[("dicom_node_destination_echo_timestamp_seconds", (("destination", "pacs"),))]
               - time.time()) < 60
    page = get(server.url + "/config")[1]
    assert 'id="destinations"' in page and f"PACS @ 127.0.0.1:{pacs.port}" in page
    assert "0x0000 (success)" in page and "connection_refused" in page and "failure_status 0xC001" in page
    assert 'id="checks"' in page and "echo:closed" in page


def test_stop_ends_the_probe(served: tuple[HttpServer, Scp, Database]) -> None:
    server, pacs, _ = served
    probe = server.ctx.echo
    assert probe is not None
    wait_for(lambda: pacs.count() >= 1, 30, "a C-ECHO")
    thread = probe._thread
    assert thread is not None and thread.is_alive()
    server.stop()
    assert not thread.is_alive()


def test_interval_zero_disables_the_probe(tmp_path: Path, scps: tuple[Scp, Scp]) -> None:
    pacs, grumpy = scps
    settings = settings_with(tmp_path, pacs, grumpy, free_port(), **{"http.echo_interval_s": 0})
    settings.spool_dir.mkdir(parents=True)
    db = open_database(settings.database_url)
    server = build_http_server(settings, db.sessions, listener_port=lambda: 11112, executor=any_executor,
                               model_identity=lambda: {"name": "m"})
    server.start()
    try:
        answer = json.loads(get(server.url + "/readyz")[1])
        metrics = get(server.url + "/metrics")[1]
    finally:
        server.stop()
        db.engine.dispose()
    assert server.ctx.echo is not None and server.ctx.echo._thread is None and server.ctx.echo.rounds == 0
    assert "echo" not in answer and not [name for name in answer["checks"] if name.startswith("echo:")]
    assert 'dicom_node_destination_echo_up{' not in metrics
    assert pacs.count() == 0


def test_echo_interval_is_validated(tmp_path: Path) -> None:
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"http\.echo_interval_s: Input should be greater than or equal to 0"):
        make_settings(tmp_path, **{"http.echo_interval_s": -1})
    assert make_settings(tmp_path).http.echo_interval_s == 60.0
