"""The systemd health check (``python -m dicom_node.ops.probe``) against the node's real HTTP side, with a
``systemctl`` stand-in on PATH that records what it is asked: restart after repeated failures, only where a
restart helps, never while the unit is starting or stopped."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from core.errors import NodeError
from dicom_node.cli.localpacs import free_port
from dicom_node.db.session import Database, open_database
from dicom_node.ops import probe
from dicom_node.ops.http import HttpServer, build_http_server
from dicom_node.runs.executors import RunExecutor
from dicom_node.settings import Settings, load_settings
from tests.conftest import make_settings

UNIT = "dicom-node.service"


def any_executor() -> RunExecutor:
    """An executor of no known kind: the workers check passes (its kind is not looked at)."""
    return cast(RunExecutor, object())


class Systemctl:
    """A ``systemctl`` on PATH: ``is-active`` answers as told, ``show`` gives the unit's start, calls logged."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.log = root / "calls"
        bin_dir = root / "bin"
        bin_dir.mkdir(parents=True)
        script = bin_dir / "systemctl"
        script.write_text(f"""#!/bin/sh
echo "$*" >> {self.log}
case "$1" in
  is-active) exit "$(cat {root}/active)" ;;
  show) cat {root}/entered ;;
esac
exit 0
""")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        self.set(active=True, started_s_ago=3600)

    def set(self, *, active: bool, started_s_ago: float = 3600) -> None:
        (self.root / "active").write_text("0" if active else "3")
        entered = time.clock_gettime(time.CLOCK_MONOTONIC) - started_s_ago
        (self.root / "entered").write_text(f"{max(1, int(entered * 1e6))}\n")

    def restarts(self) -> list[str]:
        calls = self.log.read_text().splitlines() if self.log.exists() else []
        return [c for c in calls if "restart" in c]


@pytest.fixture
def systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Systemctl:
    return Systemctl(tmp_path / "systemd", monkeypatch)


def serve(settings: Settings, db: Database, *, listening: bool) -> HttpServer:
    def port() -> int:
        if not listening:
            raise NodeError("not running")
        return 11112
    server = build_http_server(settings, db.sessions, listener_port=port, executor=any_executor,
                               model_identity=lambda: {"name": "m"})
    server.start()
    return server


@pytest.fixture
def node_settings(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path, **{"storage.free_space_reserve_mb": 1, "http.metrics_cache_s": 0})
    settings.spool_dir.mkdir(parents=True)
    return settings


@pytest.fixture
def not_listening(node_settings: Settings) -> Iterator[HttpServer]:
    db = open_database(node_settings.database_url)
    server = serve(node_settings, db, listening=False)
    yield server
    server.stop()
    db.engine.dispose()


def run(url: str, state: Path, *extra: str) -> int:
    return probe.main(["--url", url, "--unit", UNIT, "--state-file", str(state), "--restart-after", "3", *extra])


def test_url_comes_from_the_node_settings(tmp_path: Path) -> None:
    assert probe.readyz_url(Settings()) == "http://127.0.0.1:8042/readyz"
    shipped = load_settings(Path(__file__).resolve().parents[2] / "config" / "node.toml", environ={})
    assert probe.readyz_url(shipped) == "http://127.0.0.1:8042/readyz"
    assert probe.readyz_url(make_settings(tmp_path, **{"http.bind_address": "0.0.0.0", "http.port": 9042})) \
        == "http://127.0.0.1:9042/readyz"
    assert probe.readyz_url(make_settings(tmp_path, **{"http.bind_address": "::", "http.port": 9042})) \
        == "http://[::1]:9042/readyz"
    with pytest.raises(NodeError, match=r"^http\.port is 0"):
        probe.readyz_url(make_settings(tmp_path))
    with pytest.raises(NodeError, match=r"^http\.enabled is false"):
        probe.readyz_url(make_settings(tmp_path, **{"http.enabled": False, "http.port": 8042}))


def test_ready_resets_the_count(node_settings: Settings, tmp_path: Path, systemctl: Systemctl,
                                capsys: pytest.CaptureFixture[str]) -> None:
    db = open_database(node_settings.database_url)
    server = serve(node_settings, db, listening=True)
    state = tmp_path / "state" / "failures"
    state.parent.mkdir()
    state.write_text("2\n")
    try:
        assert run(server.url + "/readyz", state) == 0
    finally:
        server.stop()
        db.engine.dispose()
    assert state.read_text() == "0\n" and systemctl.restarts() == []
    assert capsys.readouterr().out.startswith("ready (")


def test_listener_down_three_times_restarts_the_unit(not_listening: HttpServer, tmp_path: Path,
                                                     systemctl: Systemctl, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "failures"
    url = not_listening.url + "/readyz"
    assert run(url, state) == 1 and state.read_text() == "1\n"
    out = capsys.readouterr()
    assert '"listener"' in out.out and "failing: listener" in out.err and "failure 1 of 3" in out.err
    assert run(url, state) == 1 and state.read_text() == "2\n" and systemctl.restarts() == []
    assert run(url, state) == 1
    assert systemctl.restarts() == [f"--no-block restart {UNIT}"] and state.read_text() == "0\n"
    assert f"restarting {UNIT}" in capsys.readouterr().err


def test_database_down_is_not_restarted(tmp_path: Path, node_settings: Settings, systemctl: Systemctl,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy import create_engine

    from dicom_node.db.session import make_sessionmaker

    engine = create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'node.sqlite3'}")
    server = serve(node_settings, Database(engine, make_sessionmaker(engine)), listening=False)
    state = tmp_path / "failures"
    try:
        codes = [run(server.url + "/readyz", state) for _ in range(4)]
    finally:
        server.stop()
    assert codes == [1, 1, 1, 1] and systemctl.restarts() == [] and state.read_text() == "4\n"
    assert "a restart does not mend database" in capsys.readouterr().err


def test_no_answer_restarts(tmp_path: Path, systemctl: Systemctl, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "failures"
    url = f"http://127.0.0.1:{free_port()}/readyz"
    assert [run(url, state) for _ in range(3)] == [1, 1, 1]
    assert systemctl.restarts() == [f"--no-block restart {UNIT}"]
    assert "no answer" in capsys.readouterr().err


def test_starting_and_stopped_units_are_not_counted(not_listening: HttpServer, tmp_path: Path,
                                                    systemctl: Systemctl, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "failures"
    url = not_listening.url + "/readyz"
    systemctl.set(active=True, started_s_ago=20)
    assert [run(url, state, "--grace", "300") for _ in range(4)] == [0, 0, 0, 0]
    assert "grace 300 s" in capsys.readouterr().out and not state.exists() and systemctl.restarts() == []
    systemctl.set(active=False)
    state.write_text("2\n")
    assert run(url, state) == 0 and state.read_text() == "0\n"
    assert f"{UNIT} is not active: not probed" in capsys.readouterr().out


def test_the_module_runs_as_the_unit_runs_it(tmp_path: Path, not_listening: HttpServer) -> None:
    """``python -m dicom_node.ops.probe`` with the node's settings file (its http.port), as in the unit."""
    config = tmp_path / "node.toml"
    config.write_text(f"[http]\nport = {not_listening.port}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env["DICOM_NODE_CONFIG"] = str(config)
    done = subprocess.run([sys.executable, "-m", "dicom_node.ops.probe"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert '"listener"' in done.stdout and "failing: listener" in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[http]\nport = 0\n")
    env["DICOM_NODE_CONFIG"] = str(bad)
    done = subprocess.run([sys.executable, "-m", "dicom_node.ops.probe"], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and done.stderr.startswith("dicom-node probe: error: http.port is 0")
