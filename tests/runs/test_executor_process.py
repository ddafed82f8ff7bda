"""The node's worker processes (``processing.isolation = "process"``, the default), with real Nodes.

Runs are processed outside the listener's process; a wrong model path stops
start-up with the worker's message; a worker killed mid-run costs one attempt
of its run, is replaced, and the node goes on; workers log where the node logs
and die with a node killed by SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from sqlalchemy import select

from core.errors import NodeError
from dicom_node.app import Node
from dicom_node.cli.localpacs import free_port, wait_for
from dicom_node.db.models import Run, RunState
from dicom_node.runs.processes import ProcessExecutor
from dicom_node.settings import Settings
from model.inference import init_demo_model
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series
from tests.conftest import make_settings
from tests.support.node import send

PATIENTS = [
    StudyHeader(patient_name=f"Workers^Testpatient{n}", patient_id=f"WRK-PID-{n:04d}", patient_birth_date="19450505",
                patient_sex="M", study_instance_uid=f"1.2.826.0.1.3680043.10.1389.99.7{n}", study_date="20261103",
                study_time="080000", accession_number=f"WRK-ACC-{n}")
    for n in (1, 2)
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_demo_model(tmp_path_factory.mktemp("model") / "demo", trained=False)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patient 1: a sagittal 1 mm MPRAGE of Colin27 (``t1``); patient 2: a localizer only (``loc``)."""
    root = tmp_path_factory.mktemp("studies")
    volume, affine = load_reference_brain("colin27")
    write_mr_series(volume, affine, root / "t1", study=PATIENTS[0], series_number=3, orientation="sagittal")
    write_mr_series(volume, affine, root / "loc", study=PATIENTS[1], series_number=1, kind="localizer")
    return root


def settings_for(tmp_path: Path, model: Path) -> Settings:
    return make_settings(tmp_path, **{"model.path": str(model), "processing.registration": "AffineFast",
                                      "processing.n4": False})


@pytest.fixture
def node(tmp_path: Path, model: Path) -> Iterator[Node]:
    running = Node(settings_for(tmp_path, model))
    running.start()
    try:
        yield running
    finally:
        running.stop()


def runs(node: Node) -> list[Run]:
    with node.db.sessions() as session:
        return list(session.scalars(select(Run).order_by(Run.created_at)).all())


def pid_of(claimed_by: str | None) -> int:
    """The process id in ``runs.claimed_by`` (``host:pid:token``)."""
    assert claimed_by is not None
    return int(claimed_by.split(":")[1])


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no PPid for {pid}")


def gone(pid: int) -> bool:
    """True when *pid* no longer runs (ended, or a zombie nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_runs_are_processed_in_a_worker_process_of_the_node(node: Node, studies: Path) -> None:
    executor = node.scheduler.executor
    assert isinstance(executor, ProcessExecutor)
    assert node.context is None and node.predictor is None
    with pytest.raises(NodeError, match="worker processes"):
        node.execute("any")
    (worker,) = executor.worker_pids()
    assert worker != os.getpid() and parent_of(worker) == os.getpid()

    send(node, studies / "loc")
    (run,) = cast("list[Run]", wait_for(lambda: (done := runs(node)) and done[0].finished_at is not None and done,
                                        60, "the run to finish"))
    assert run.state == RunState.NOT_ANALYSED.value and run.outcome == "no_suitable_series"
    assert pid_of(run.claimed_by) == worker
    node.stop()
    wait_for(lambda: gone(worker), 30, "the worker to end with the node")


def test_thread_isolation_processes_runs_in_the_nodes_own_process(tmp_path: Path, model: Path,
                                                                   studies: Path) -> None:
    node = Node(make_settings(tmp_path, **{"model.path": str(model), "processing.isolation": "thread"}))
    assert node.context is not None and node.predictor is not None
    node.start()
    try:
        send(node, studies / "loc")
        (run,) = cast("list[Run]", wait_for(lambda: (done := runs(node)) and done[0].finished_at is not None
                                            and done, 60, "the run to finish"))
        assert run.outcome == "no_suitable_series" and pid_of(run.claimed_by) == os.getpid()
    finally:
        node.stop()


def test_a_wrong_model_path_stops_start_up_with_the_workers_message(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, **{"model.path": str(tmp_path / "no-model-here")})
    with pytest.raises(NodeError, match=r"run worker process could not start: model directory does not exist: "
                                        + re.escape(str(tmp_path / "no-model-here"))):
        Node(settings)
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_its_run_done_again(node: Node, studies: Path) -> None:
    executor = node.scheduler.executor
    assert isinstance(executor, ProcessExecutor)
    send(node, studies / "t1")

    def running() -> Run | None:
        found = [r for r in runs(node) if r.state == RunState.RUNNING.value and r.claimed_by]
        return found[0] if found else None

    first = wait_for(running, 60, "the T1 run to be claimed", 0.05)
    killed = pid_of(first.claimed_by)
    os.kill(killed, signal.SIGKILL)  # mid-run: conversion and preprocessing take seconds
    run = cast(Run, wait_for(lambda: (r := next(x for x in runs(node) if x.id == first.id)).finished_at is not None
                             and r, 240, "the run to be done again by a new worker"))
    assert run.state == RunState.SUCCEEDED.value and run.predicted_class is not None, run.error_reason
    assert run.attempts == 2
    replacement = pid_of(run.claimed_by)
    assert replacement not in (killed, os.getpid()) and executor.worker_pids() == [replacement]

    send(node, studies / "loc")  # the node goes on serving
    other = wait_for(lambda: [r for r in runs(node) if r.id != first.id and r.finished_at is not None], 60,
                     "the next study's run")
    assert other[0].outcome == "no_suitable_series" and pid_of(other[0].claimed_by) == replacement


@pytest.mark.slow
def test_workers_log_to_the_node_log_and_die_with_a_killed_node(tmp_path: Path, model: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update({"DICOM_NODE_STORAGE__DATA_DIR": str(tmp_path / "node"), "DICOM_NODE_NETWORK__PORT": str(free_port()),
                "DICOM_NODE_HTTP__PORT": "0", "DICOM_NODE_MODEL__PATH": str(model), "DICOM_NODE_DESTINATIONS": "[]",
                "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "node.log"
    with open(log_path, "wb") as log:
        node = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        ready = cast("re.Match[str]", wait_for(lambda: node.poll() is None and re.search(
            r"run worker (\d+) ready: model ", log_path.read_text()), 180, "a worker to be ready"))
        worker = int(ready.group(1))
        assert worker != node.pid and parent_of(worker) == node.pid  # its own line, in the node's log
        wait_for(lambda: "listening as" in log_path.read_text(), 60, "the node to listen")
        node.kill()
        node.wait()
        wait_for(lambda: gone(worker), 30, "the worker to die with the node")
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
