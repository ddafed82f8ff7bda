"""Scale-out: studies per hour with 1, 2 and 4 Celery worker processes, and the Celery path's overhead.

Run ``python -m benchmarks.bench_scaleout`` (``make bench-scaleout``).  Needs the
machine's RabbitMQ (``amqp://guest:guest@127.0.0.1:5672//``) and PostgreSQL
(``postgresql+psycopg://postgres@127.0.0.1:5432/test``; a private schema per
measurement, dropped afterwards); a private queue per measurement.

Throughput: a listener-only node receives ``--studies`` synthetic studies
(Colin27 T1 MPRAGE plus a localizer, sent with storescu) while its scheduler is
held; then N workers (``dicom-node worker``, one process each, the demo model)
are started and ready, the scheduler is released, and the runs are timed from
the first claim to the last finish.  Studies/hour = studies / that span * 3600.
The work is CPU-bound (N4, registration): compare the scaling with the cores.

Overhead: one localizer-only study ("not analysed" in about a second: all
the plumbing, no preprocessing) through the local executor and through Celery
(one warm worker), ``--repeats`` times each; the latency from run creation to
the run's end, median.

The helpers (worker processes, settings, synthetic studies) are shared with
``tests/runs/test_scaleout_workers.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kombu import Connection
from sqlalchemy import create_engine, select, text

from dicom_node.app import Node
from dicom_node.cli.localpacs import wait_for
from dicom_node.db.models import Run
from dicom_node.db.session import upgrade
from dicom_node.settings import PROJECT_ROOT, Settings, load_settings
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series

BROKER_URL = os.environ.get("DICOM_NODE_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get("DICOM_NODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
FINISHED = ("succeeded", "not_analysed", "failed")


@contextmanager
def private_schema(admin_url: str = POSTGRES_URL) -> Iterator[str]:
    """A migrated schema of its own in PostgreSQL; yields its URL, drops it afterwards."""
    schema = f"so_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url)
    with admin.begin() as conn:
        conn.execute(text(f'create schema "{schema}"'))
    url = f"{admin_url}?options=-csearch_path%3D{schema}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'drop schema "{schema}" cascade'))
        admin.dispose()


@contextmanager
def private_queue(broker_url: str = BROKER_URL) -> Iterator[str]:
    """A queue name of its own on the broker, deleted afterwards."""
    name = f"dicom-node.test.{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        with Connection(broker_url) as conn:
            conn.default_channel.queue_delete(name)


def cluster_settings(root: Path, database_url: str, model: Path, *, executor: str = "celery",
                     destinations: Sequence[dict[str, Any]] = ()) -> Settings:
    """Settings shared by the listener and its workers (one data directory: the shared storage)."""
    return load_settings(environ={}, overrides={
        "storage.data_dir": str(root / "node"),
        "storage.fsync": False,
        "network.port": 0,
        "network.allowed_calling_ae_titles": ["SCANNER"],
        "completeness.quiet_period_s": 1.0,
        "completeness.poll_interval_s": 0.2,
        "database.url": database_url,
        "processing.executor": executor,
        "processing.broker_url": BROKER_URL,
        "model.path": str(model),
        "destinations": list(destinations),
    })


def worker_environment(settings: Settings) -> dict[str, str]:
    """The environment that gives a ``dicom-node worker`` the same settings as *settings*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_NODE_")}
    env.update({
        "DICOM_NODE_STORAGE__DATA_DIR": str(settings.data_dir),
        "DICOM_NODE_DATABASE__URL": settings.database_url,
        "DICOM_NODE_MODEL__PATH": str(settings.model_path),
        "DICOM_NODE_MODEL__DEVICE": settings.model.device,
        "DICOM_NODE_PROCESSING__EXECUTOR": "celery",
        "DICOM_NODE_PROCESSING__BROKER_URL": settings.processing.broker_url,
        "DICOM_NODE_PROCESSING__REGISTRATION": settings.processing.registration,
        "DICOM_NODE_DESTINATIONS": json.dumps([d.model_dump() for d in settings.destinations]),
    })
    return env


class WorkerProcess:
    """``python -m dicom_node.cli worker`` as a child process, logging to a file.

    Parameters
    ----------
    settings : Settings
        The listener's settings (passed through the environment).
    queue : str
        The queue to take runs from.
    log_path : Path
        Where its stderr goes.
    """

    def __init__(self, settings: Settings, queue: str, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "worker", "--queue", queue, "--workers", "1"],
            cwd=PROJECT_ROOT, env=worker_environment(settings), stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        """Process id (also the pid in ``runs.claimed_by``)."""
        return self.process.pid

    def log(self) -> str:
        """Everything it has logged so far."""
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        """True once the worker consumes from its queue; raises if it died."""
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.pid} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        return " ready." in self.log()

    def kill(self) -> None:
        """SIGKILL (what a crash or the OOM killer does)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM: finish the run in progress, then exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._log.close()


def write_study(root: Path, index: int, *, t1: bool) -> Path:
    """A synthetic study (distinct UIDs per *index*): a localizer, plus a sagittal T1 MPRAGE when *t1*."""
    header = StudyHeader(
        patient_name=f"Scaleout^Patient{index}", patient_id=f"SO-{index:05d}", patient_birth_date="19500101",
        patient_sex="F", study_instance_uid=f"1.2.826.0.1.3680043.10.1389.77.{os.getpid()}.{index}",
        study_date="20261101", study_time="100000", accession_number=f"SO-ACC-{index}")
    out = root / f"study{index:04d}"
    volume, affine = load_reference_brain("colin27")
    write_mr_series(volume, affine, out / "loc", study=header, series_number=1, kind="localizer")
    if t1:
        write_mr_series(volume, affine, out / "t1", study=header, series_number=3, orientation="sagittal")
    return out


def send(port: int, ae_title: str, directories: Sequence[Path]) -> None:
    """C-STORE every file below *directories* with DCMTK's storescu."""
    result = subprocess.run(
        ["storescu", "-aet", "SCANNER", "-aec", ae_title, "+sd", "+r", "127.0.0.1", str(port),
         *[str(d) for d in directories]], capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)


def finished_runs(node: Node, expected: int) -> list[Run] | None:
    """All runs once *expected* of them have ended, else None."""
    with node.db.sessions() as session:
        runs = list(session.scalars(select(Run)).all())
    done = [r for r in runs if r.state in FINISHED]
    return runs if len(done) >= expected else None


def measure_workers(root: Path, model: Path, studies: Sequence[Path], workers: int) -> dict[str, float]:
    """Studies/hour with *workers* worker processes."""
    with private_schema() as url, private_queue() as queue:
        settings = cluster_settings(root / f"w{workers}", url, model)
        node = Node(settings, queue=queue)
        procs = [WorkerProcess(settings, queue, root / f"w{workers}-{i}.log") for i in range(workers)]
        try:
            node.server.start()
            send(node.server.port, settings.network.ae_title, studies)
            wait_for(lambda: all(p.ready() for p in procs), 300, "the workers to be ready", 0.5)
            node.scheduler.start()
            runs = wait_for(lambda: finished_runs(node, len(studies)), 3600, "all runs to finish", 0.5)
        finally:
            for proc in procs:
                proc.stop()
            node.stop()
    starts = [r.started_at for r in runs if r.started_at]
    ends = [r.finished_at for r in runs if r.finished_at]
    span = (max(ends) - min(starts)).total_seconds()
    states = sorted({r.state for r in runs})
    stages = [r.stage_seconds or {} for r in runs if r.state == "succeeded"]

    def median_stage(name: str) -> float:
        values = [float(st[name]) for st in stages if name in st]
        return round(statistics.median(values), 2) if values else float("nan")

    return {"workers": workers, "studies": len(runs), "span_s": round(span, 1),
            "studies_per_hour": round(len(runs) / span * 3600, 1), "states": ",".join(states),  # type: ignore[dict-item]
            "preprocess_s": median_stage("preprocessed"), "inference_s": median_stage("inferred")}


def measure_handoff(directory: Path) -> float:
    """Seconds to write (fsync) and read back the model's 256^3 float32 input: what a CPU/GPU split adds."""
    import numpy as np

    volume = np.random.default_rng(0).random((256, 256, 256), dtype=np.float32)
    path = directory / "handoff.npy"
    start = time.perf_counter()
    with path.open("wb") as handle:
        np.save(handle, volume)
        handle.flush()
        os.fsync(handle.fileno())
    back = np.load(path)
    seconds = time.perf_counter() - start
    path.unlink()
    if back.shape != volume.shape:
        raise RuntimeError("handoff round trip changed the volume")
    return round(seconds, 3)


def _latencies(node: Node, studies: Sequence[Path]) -> list[float]:
    latencies = []
    for count, study in enumerate(studies, start=1):
        send(node.server.port, node.settings.network.ae_title, [study])
        runs = wait_for(lambda n=count: finished_runs(node, n), 300, "the run to finish", 0.05)  # type: ignore[misc]
        last = max(runs, key=lambda r: r.created_at)
        if last.finished_at is not None:
            latencies.append((last.finished_at - last.created_at).total_seconds())
    return latencies


def measure_overhead(root: Path, model: Path, studies: Sequence[Path]) -> dict[str, float]:
    """Median latency (run created -> ended) of a quick run, local executor versus Celery."""
    result: dict[str, float] = {}
    with private_schema() as url:
        node = Node(cluster_settings(root / "local", url, model, executor="local"))
        node.start()
        try:
            result["local_s"] = statistics.median(_latencies(node, studies))
        finally:
            node.stop()
    with private_schema() as url, private_queue() as queue:
        settings = cluster_settings(root / "celery", url, model)
        node = Node(settings, queue=queue)
        worker = WorkerProcess(settings, queue, root / "overhead-worker.log")
        try:
            wait_for(worker.ready, 300, "the worker to be ready", 0.5)
            node.start()
            result["celery_s"] = statistics.median(_latencies(node, studies))
        finally:
            worker.stop()
            node.stop()
    result["overhead_s"] = round(result["celery_s"] - result["local_s"], 3)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures."""
    from model.inference import init_demo_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4, help="T1 studies per measurement (default 4)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default 1 2 4)")
    parser.add_argument("--repeats", type=int, default=5, help="quick runs for the overhead (default 5)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp:
        root = Path(tmp)
        model = init_demo_model(root / "model", trained=False)
        t1 = [write_study(root / "t1", i, t1=True) for i in range(args.studies)]
        quick = [write_study(root / "quick", 1000 + i, t1=False) for i in range(args.repeats)]
        print(f"cores: {os.cpu_count()}  studies per measurement: {args.studies} (T1 MPRAGE + localizer)")
        rows = []
        for workers in args.workers:
            row = measure_workers(root, model, t1, workers)
            rows.append(row)
            print(f"workers={workers}: {row['studies_per_hour']:.1f} studies/hour "
                  f"({row['studies']} runs in {row['span_s']:.1f} s; {row['states']})", flush=True)
        print(f"stage medians (1 worker): preprocessing {rows[0]['preprocess_s']} s, "
              f"inference {rows[0]['inference_s']} s; a CPU/GPU split would add a 64 MiB handoff: "
              f"{measure_handoff(root)} s (local disk) plus a broker hop", flush=True)
        base = rows[0]["studies_per_hour"]
        for row in rows:
            print(f"scaling workers={row['workers']}: x{row['studies_per_hour'] / base:.2f} "
                  f"(cores: {os.cpu_count()})")
        overhead = measure_overhead(root, model, quick)
        print(f"one quick run (median of {args.repeats}): local {overhead['local_s']:.3f} s, "
              f"celery {overhead['celery_s']:.3f} s, overhead {overhead['overhead_s']:+.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
