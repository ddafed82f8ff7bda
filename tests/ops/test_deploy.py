"""deploy/: the systemd units (systemd-analyze verify; every ExecStart a real command with flags the CLI
accepts; the health check probing the node's own settings) and the compose file's commands."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicom_node.cli.main import build_parser
from dicom_node.ops import probe
from dicom_node.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
INSTALL = "/opt/dicom-node"  # where the units expect the checkout (docs/deployment.md)
UNITS = ["dicom-node.service", "dicom-node-listener.service", "dicom-node-worker@.service",
         "dicom-node-health.service", "dicom-node-health.timer"]
Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections of a unit file, each key with all its values (systemd allows repeated keys)."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {raw!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def environment(unit: Unit) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit["Service"].get("Environment", []):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            env[key] = val
    return env


def command_lines(unit: Unit, instance: str = "cpu") -> list[list[str]]:
    """ExecStartPre= and ExecStart= as argument lists, ${VAR} and %i/%S expanded as systemd would."""
    env = environment(unit)
    lines = []
    for key in ("ExecStartPre", "ExecStart"):
        for value in unit["Service"].get(key, []):
            for name, val in env.items():
                value = value.replace("${" + name + "}", val)
            value = value.replace("%i", instance).replace("%S", "/var/lib")
            lines.append(shlex.split(value.lstrip("-+!@:")))
    return lines


@pytest.fixture(scope="module")
def units() -> dict[str, Unit]:
    assert sorted(p.name for p in SYSTEMD.iterdir()) == sorted(UNITS)
    return {name: parse_unit(SYSTEMD / name) for name in UNITS}


def test_single_node_and_celery_units(units: dict[str, Unit]) -> None:
    single, listener = units["dicom-node.service"], units["dicom-node-listener.service"]
    assert command_lines(single)[-1] == [f"{INSTALL}/.venv/bin/dicom-node", "serve"]
    assert command_lines(listener)[-1] == [f"{INSTALL}/.venv/bin/dicom-node", "serve", "--executor", "celery"]
    assert single["Unit"]["Conflicts"] == ["dicom-node-listener.service"]
    assert listener["Unit"]["Conflicts"] == ["dicom-node.service"]
    for unit in (single, listener, units["dicom-node-worker@.service"]):
        assert unit["Service"]["User"] == ["dicom-node"] and unit["Service"]["UMask"] == ["0027"]
        assert environment(unit)["DICOM_NODE_CONFIG"] == "/etc/dicom-node/node.toml"
    # the single node lets its worker processes finish their runs on stop
    assert single["Service"]["KillMode"] == ["mixed"] and int(single["Service"]["TimeoutStopSec"][0]) >= 600


def test_every_command_is_a_real_command_the_cli_accepts(units: dict[str, Unit]) -> None:
    parser = build_parser()
    seen = set()
    for name, unit in units.items():
        for argv in command_lines(unit) if "Service" in unit else []:
            program, args = argv[0], argv[1:]
            assert program.startswith(f"{INSTALL}/.venv/bin/"), (name, argv)
            local = ROOT / program.removeprefix(INSTALL + "/")
            assert local.exists(), f"{name}: {program} does not exist in a `make setup` checkout"
            if program.endswith("/dicom-node"):
                parsed = parser.parse_args(args)  # every flag known (SystemExit otherwise)
                sub = getattr(parsed, f"{parsed.command}_command", None)
                path = [parsed.command, *([sub] if sub else [])]
                helped = subprocess.run([str(local), *path, "--help"], capture_output=True, text=True, timeout=120,
                                        check=False)
                assert helped.returncode == 0 and "usage: dicom-node" in helped.stdout, (name, helped.stderr)
                seen.add(" ".join(path))
            else:
                assert args[:2] == ["-m", "dicom_node.ops.probe"], (name, argv)
                probe.build_parser().parse_args(args[2:])
                helped = subprocess.run([sys.executable, *args[:2], "--help"], capture_output=True, text=True,
                                        timeout=60, check=False)
                assert helped.returncode == 0 and "--restart-after" in helped.stdout, helped.stderr
                seen.add("probe")
    assert seen == {"serve", "db upgrade", "worker", "probe"}


def test_health_check_probes_the_node_unit_and_its_settings(units: dict[str, Unit]) -> None:
    health = units["dicom-node-health.service"]
    argv = command_lines(health)[0]
    args = probe.build_parser().parse_args(argv[3:])
    assert args.unit == "dicom-node.service" and (SYSTEMD / args.unit).exists()
    assert args.url is None  # the URL comes from the node's settings file, the one the node unit reads
    assert environment(health)["DICOM_NODE_CONFIG"] == environment(units["dicom-node.service"])["DICOM_NODE_CONFIG"]
    assert health["Service"]["EnvironmentFile"] == units["dicom-node.service"]["Service"]["EnvironmentFile"]
    assert str(args.state_file) == "/var/lib/dicom-node-health/failures"
    assert health["Service"]["StateDirectory"] == ["dicom-node-health"]
    assert args.restart_after >= 2 and args.grace >= 60
    # the default settings and the shipped config/node.toml: the port and bind the node serves on
    assert probe.readyz_url(Settings()) == "http://127.0.0.1:8042/readyz"
    shipped = load_settings(ROOT / "config" / "node.toml", environ={})
    assert probe.readyz_url(shipped) == f"http://127.0.0.1:{shipped.http.port}/readyz"
    timer = units["dicom-node-health.timer"]
    assert timer["Install"]["WantedBy"] == ["timers.target"] and "Unit" not in timer["Timer"]  # same name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units as systemd reads them, with /opt/dicom-node pointing at this checkout (its executables exist)."""
    for name in UNITS:
        text = (SYSTEMD / name).read_text(encoding="utf-8").replace(INSTALL, str(ROOT))
        (tmp_path / name).write_text(text, encoding="utf-8")
    names = [name.replace("@.", "@cpu.") for name in UNITS]
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *names], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "dicom-node" in line]
    assert done.returncode == 0 and ours == [], done.stdout + done.stderr


def test_systemd_analyze_verify_finds_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: an unknown key and a missing executable are reported."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    broken = (SYSTEMD / "dicom-node.service").read_text().replace(INSTALL, "/nonexistent") + "\nRestartt=always\n"
    (tmp_path / "dicom-node.service").write_text(broken)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "dicom-node.service"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "is not executable" in done.stderr and "Restartt" in done.stderr


def test_compose_commands_parse_and_the_file_says_it_is_untested() -> None:
    text = (ROOT / "deploy" / "compose.yaml").read_text(encoding="utf-8")
    assert "UNTESTED" in text.split("\n\n")[0]
    compose = yaml.safe_load(text)
    parser = build_parser()
    assert parser.parse_args(compose["services"]["listener"]["command"]).executor == "celery"
    assert parser.parse_args(compose["services"]["worker"]["command"]).command == "worker"
    assert "not been run" in (ROOT / "docs" / "deployment.md").read_text(encoding="utf-8")
