"""Two Celery worker processes behind a listener-only node, on the machine's RabbitMQ and PostgreSQL.

storescu -> listener (records, enqueues, delivers) -> RabbitMQ -> 2 x ``dicom-node worker`` -> SR in Orthanc.
A stream of studies is shared with no run done twice and none lost, also when one worker is SIGKILLed mid-run.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from benchmarks.bench_scaleout import (
    WorkerProcess,
    cluster_settings,
    private_queue,
    private_schema,
    send,
    write_study,
)
from dicom_node.app import Node
from dicom_node.cli.localpacs import LocalOrthanc, wait_for
from dicom_node.db.models import Delivery, Run, Study
from model.inference import init_demo_model
from tests.conftest import require_tool


@dataclass
class Cluster:
    node: Node
    workers: list[WorkerProcess]
    pacs: LocalOrthanc
    root: Path

    def runs(self) -> list[Run]:
        with self.node.db.sessions() as session:
            return list(session.scalars(select(Run)).all())

    def all_finished(self, count: int) -> list[Run] | None:
        runs = self.runs()
        return runs if len(runs) == count and all(r.finished_at for r in runs) else None

    def finished(self, run_id: str) -> Run | None:
        with self.node.db.sessions() as session:
            run = session.get(Run, run_id)
            return run if run is not None and run.finished_at is not None else None

    def finished_lines(self) -> Counter[str]:
        """How often each run was finished, from both workers' logs."""
        lines: Counter[str] = Counter()
        for worker in self.workers:
            lines.update(re.findall(r"run ([0-9a-f-]{36}) finished", worker.log()))
        return lines


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_tool("storescu")
    root = tmp_path_factory.mktemp("scaleout")
    model = init_demo_model(root / "model", trained=False)
    pacs = LocalOrthanc(root / "orthanc")
    pacs.start()
    with private_schema() as url, private_queue() as queue:
        settings = cluster_settings(root, url, model, destinations=[
            {"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}])
        node = Node(settings, queue=queue)
        workers = [WorkerProcess(settings, queue, root / f"worker{i}.log") for i in range(2)]
        try:
            node.start()
            wait_for(lambda: all(w.ready() for w in workers), 120, "both workers to be ready", 0.3)
            yield Cluster(node, workers, pacs, root)
        finally:
            for worker in workers:
                worker.stop()
            node.stop()
            pacs.stop()


def srs_in_pacs(pacs: LocalOrthanc, at_least: int = 0) -> list[str] | None:
    """Study UIDs of the SRs in the PACS, once there are *at_least* of them."""
    found = sorted(pacs.get(f"/instances/{i['ID']}/simplified-tags")["StudyInstanceUID"]
                  for i in pacs.find_instances(Modality="SR"))
    return found if len(found) >= at_least else None


def test_two_workers_share_a_stream_of_studies(cluster: Cluster) -> None:
    studies = [write_study(cluster.root / "stream", i, t1=False) for i in range(6)]
    send(cluster.node.server.port, cluster.node.settings.network.ae_title, studies)
    runs = wait_for(lambda: cluster.all_finished(6), 120, "six runs to finish", 0.3)
    assert {r.state for r in runs} == {"not_analysed"} and {r.attempts for r in runs} == {1}
    assert {(r.claimed_by or "").split(":")[1] for r in runs} == {str(w.pid) for w in cluster.workers}  # both
    assert cluster.finished_lines() == Counter({r.id: 1 for r in runs})  # each run finished exactly once
    uids = wait_for(lambda: srs_in_pacs(cluster.pacs, 6), 60, "six SRs in the PACS", 0.3)
    with cluster.node.db.sessions() as session:
        assert uids == sorted(session.scalars(select(Study.study_instance_uid)).all())
    assert_delivered_once(cluster, {r.id for r in runs})


def test_a_worker_killed_mid_run_leaves_the_run_to_the_other(cluster: Cluster) -> None:
    study = write_study(cluster.root / "killed", 99, t1=True)
    send(cluster.node.server.port, cluster.node.settings.network.ae_title, [study])
    mid_run = wait_for(
        lambda: next((r for r in cluster.runs() if r.converted_at and not r.finished_at), None), 120,
        "the T1 run to be mid-run (converted, preprocessing)", 0.2)
    study_uid = _uid(cluster, mid_run)
    victim = next(w for w in cluster.workers if f":{w.pid}:" in (mid_run.claimed_by or ""))
    survivor = next(w for w in cluster.workers if w is not victim)
    victim.kill()
    run = wait_for(lambda: cluster.finished(mid_run.id), 240, "the run to be finished by the other worker", 0.5)
    assert run.state == "succeeded" and run.predicted_class in ("AD", "MCI", "CN")
    assert run.attempts == 2 and f":{survivor.pid}:" in (run.claimed_by or "")
    assert "taken over from lost worker" in survivor.log()
    assert cluster.finished_lines()[run.id] == 1
    sop_uid = run.report_sop_instance_uid
    assert sop_uid
    wait_for(lambda: cluster.pacs.find_instances(SOPInstanceUID=sop_uid), 60, "its SR in the PACS")
    assert study_uid in (srs_in_pacs(cluster.pacs) or [])
    assert_delivered_once(cluster, {run.id})


def assert_delivered_once(cluster: Cluster, run_ids: set[str]) -> None:
    """Every run's objects are sent, each object once (a repeated run would have queued them twice)."""

    def sent() -> list[Delivery] | None:
        with cluster.node.db.sessions() as session:
            rows = list(session.scalars(select(Delivery).where(Delivery.run_id.in_(run_ids))).all())
        return rows if rows and all(d.state == "sent" for d in rows) else None

    deliveries = wait_for(sent, 60, "the reports to be delivered", 0.3)
    assert {d.run_id for d in deliveries} == run_ids
    assert set(Counter((d.run_id, d.object_kind) for d in deliveries).values()) == {1}


def _uid(cluster: Cluster, run: Run) -> str:
    with cluster.node.db.sessions() as session:
        study = session.get(Study, run.study_id)
        assert study is not None
        return study.study_instance_uid
