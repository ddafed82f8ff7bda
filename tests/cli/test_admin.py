"""The administrator's command line: --version, per-command flags, runs list/show, one-line errors, JSON logs."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.cli.main import build_parser, configure_logging, main
from dicom_node.db.session import open_database
from dicom_node.logformat import JSON_FORMAT, JsonFormatter, make_formatter
from tests.ops.seed import RUN_NA, RUN_OK, seed


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory with a migrated database and the seeded runs."""
    directory = tmp_path / "node"
    db = open_database(f"sqlite:///{directory / 'node.sqlite3'}")
    seed(db.sessions)
    db.engine.dispose()
    return directory


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("DICOM_NODE_")]:
        monkeypatch.delenv(name)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "dicom-node 0.1.0"


def test_each_command_has_only_its_own_flags(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--port", "104", "--workers", "2", "--log-level", "debug"])
    assert (args.port, args.workers, args.log_level) == (104, 2, "DEBUG")
    for argv in (["runs", "list", "--port", "104"], ["db", "upgrade", "--workers", "2"],
                 ["check", "x", "--database-url", "sqlite://"], ["runs", "show", "x", "--model", "m"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "unrecognized arguments" in capsys.readouterr().err
    assert parser.parse_args(["runs", "list", "--data-dir", "d", "--log-level", "Warning"]).log_level == "WARNING"


def test_read_only_commands_create_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           clean_env: None) -> None:
    fresh = tmp_path / "fresh"
    for argv in (["runs", "list"], ["runs", "show", "abc"], ["deliveries", "list"]):
        assert main([*argv, "--data-dir", str(fresh)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"dicom-node: error: no database at {fresh / 'node.sqlite3'}") and err.count("\n") == 1
    assert not fresh.exists()


def test_runs_list_filters_json_and_short_ids(data_dir: Path, capsys: pytest.CaptureFixture[str],
                                              clean_env: None) -> None:
    assert main(["runs", "list", "--data-dir", str(data_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].split()[:2] == ["run", "created"]
    assert lines[-1].startswith("a1b2c3d4  ") and "ACC-OPS-1" in lines[-1] and "OPS-PID" not in "".join(lines)
    assert main(["runs", "list", "--data-dir", str(data_dir), "--state", "not_analysed", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["short_id"], r["outcome"], r["accession_number"]) for r in records] == [
        (RUN_NA, "a1b2ffff", "no_suitable_series", "ACC-OPS-2")]
    assert "patient_id" not in records[0]
    assert main(["runs", "list", "--data-dir", str(data_dir), "--accession", "ACC-OPS-2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["runs", "list", "--data-dir", str(data_dir), "--id", "A1B2", "--json"]) == 0
    assert {r["short_id"] for r in json.loads(capsys.readouterr().out)} == {"a1b2c3d4", "a1b2ffff"}


def test_runs_show_by_prefix(data_dir: Path, capsys: pytest.CaptureFixture[str], clean_env: None) -> None:
    assert main(["runs", "show", "a1b2c3", "--data-dir", str(data_dir)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["run"] == RUN_OK and record["predicted_class"] == "CN"
    assert main(["runs", "show", "a1b2", "--data-dir", str(data_dir)]) == 2
    assert "ambiguous" in capsys.readouterr().err
    assert main(["runs", "show", "ffff", "--data-dir", str(data_dir)]) == 2
    assert capsys.readouterr().err == "dicom-node: error: no run ffff\n"


def test_deliveries_retry_unknown_id_fails(data_dir: Path, capsys: pytest.CaptureFixture[str],
                                          clean_env: None) -> None:
    assert main(["deliveries", "retry", "999", "--data-dir", str(data_dir)]) == 1
    captured = capsys.readouterr()
    assert "0 delivery(ies)" in captured.out and captured.err == "dicom-node: error: no delivery: 999\n"


def test_unreachable_database_is_one_line(capsys: pytest.CaptureFixture[str], clean_env: None) -> None:
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql+psycopg://node:secret-pw@127.0.0.1:{port}/node"
    assert main(["db", "upgrade", "--database-url", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "secret-pw" not in err
    assert err.startswith(f"dicom-node: error: database postgresql+psycopg://node:***@127.0.0.1:{port}/node: ")
    assert "Connection refused" in err


def test_port_in_use_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_env: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--data-dir", str(tmp_path / "n")]) == 2
    assert capsys.readouterr().err == (f"dicom-node: error: cannot listen on 127.0.0.1:{port} (network.port): "
                                       "address already in use\n")
    assert not (tmp_path / "n").exists()


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    for handler in saved[0]:
        root.removeHandler(handler)
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])


def test_json_logging(root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    for handler in list(root_logging.handlers):  # pytest's own, added for the test's call
        root_logging.removeHandler(handler)
    configure_logging("debug".upper(), "json")
    logging.getLogger("dicom_node.test").info("run %s finished", "r-1", extra={"run_id": "r-1",
                                                                                 "study_uid": "1.2.3"})
    logging.getLogger("dicom_node.test").debug("plain")
    lines = capsys.readouterr().err.splitlines()
    first, second = (json.loads(line) for line in lines)
    assert {k: first[k] for k in ("level", "logger", "message", "run_id", "study_uid")} == {
        "level": "INFO", "logger": "dicom_node.test", "message": "run r-1 finished", "run_id": "r-1",
        "study_uid": "1.2.3"}
    assert first["time"].endswith("+00:00") and second["message"] == "plain" and "run_id" not in second
    # a worker process rebuilds the same formatter from the captured format string
    [handler] = root_logging.handlers
    assert handler.formatter is not None and handler.formatter._fmt == JSON_FORMAT
    assert isinstance(make_formatter(JSON_FORMAT), JsonFormatter)
    configure_logging("INFO", "text")  # replaces its own handler
    assert len(root_logging.handlers) == 1 and not isinstance(root_logging.handlers[0].formatter, JsonFormatter)
