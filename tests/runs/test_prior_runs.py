"""Full runs with volumetry and the prior study: storescu -> node -> Orthanc as Q/R SCP and destination.

The studies of tests/support/prior.py are real brains (Colin27 at 1.5 mm; the current
studies with hippocampi shrunk and ventricles grown).  Node A measures volumes (the
method's cheap settings: 4 mm working grid, no hippocampal refinement) and analyses R1 (no
prior of its own), then R2, whose run reuses R1's; node B (no volumetry) analyses G2, whose
prior is only in Orthanc (C-GET), and N2, whose prior Orthanc cannot send.  The SRs are read
back from Orthanc by their codes and checked with dciodvfy.  Runs are processed in the test's
process (``processing.isolation = "thread"``), so the log check sees the node's records too.
"""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node.app import Node
from dicom_node.db.models import Run, RunState, Study
from model.types import CLASSES
from tests.conftest import require_tool
from tests.support.node import dciodvfy_errors, node_settings, send
from tests.support.prior import (
    PRIOR_VOLUME,
    RELATIVE_CHANGE_PER_YEAR,
    PriorPacs,
    Written,
    brain_pacs,
    brains,
    evidence_sop_uids,
    group_numbers,
    no_patient_data_in_prior_logs,
    prior_settings,
    probability_changes,
    study_run,
    study_sr,
    write_study,
)
from tests.support.sr_content import impression_class

__all__ = ["brain_pacs", "no_patient_data_in_prior_logs"]  # the module's Orthanc and the autouse log check

pytestmark = pytest.mark.slow

#: The volumetry of node A: the method's cheap settings (the defaults take about three times as long).
CHEAP_VOLUMETRY = {"volumetry.enabled": True, "volumetry.working_spacing_mm": 4.0,
                   "volumetry.hippocampal_refinement": False}


@pytest.fixture(scope="module")
def currents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Written]:
    """The current studies R2, G2, N2 (deformed Colin27)."""
    root = tmp_path_factory.mktemp("current-studies")
    return {key: write_study(root, key) for key in ("R2", "G2", "N2")}


def start_node(root: Path, pacs: PriorPacs, model: Path, **overrides: object) -> Node:
    settings = node_settings(root, pacs.orthanc, model, **prior_settings(pacs, **{
        "processing.isolation": "thread", "processing.n4": False, **overrides}))
    node = Node(settings)
    node.start()
    return node


@pytest.fixture(scope="module")
def node_b(tmp_path_factory: pytest.TempPathFactory, brain_pacs: PriorPacs, demo_model: Path) -> Iterator[Node]:
    """A node without volumetry that retrieves priors by C-GET."""
    node = start_node(tmp_path_factory.mktemp("node-b"), brain_pacs, demo_model)
    yield node
    node.stop()


def probabilities(run: Run) -> dict[str, float]:
    return {"AD": float(run.prob_ad or 0), "MCI": float(run.prob_mci or 0), "CN": float(run.prob_cn or 0)}


def text_values(path: Path) -> str:
    return subprocess.run([require_tool("dsrdump"), "+Pl", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_a_prior_the_node_analysed_is_reused_and_the_report_gives_the_changes(
        tmp_path: Path, brain_pacs: PriorPacs, currents: dict[str, Written], demo_model: Path) -> None:
    r1, r2 = brain_pacs.studies["R1"], currents["R2"]
    node = start_node(tmp_path, brain_pacs, demo_model, **CHEAP_VOLUMETRY)
    try:
        send(node, r1.directory)
        first = study_run(node, r1.study_uid)
        send(node, r2.directory)
        second = study_run(node, r2.study_uid)
        r1_sr = study_sr(brain_pacs.orthanc, r1.study_uid, tmp_path / "r1.dcm")
        r2_sr = study_sr(brain_pacs.orthanc, r2.study_uid, tmp_path / "r2.dcm")
    finally:
        node.stop()
    # R1: measured, and no prior of its own ('no prior'): the run succeeds all the same.
    assert first.state == RunState.SUCCEEDED.value and first.volumes is not None and first.volumes_note is None
    assert first.prior_note is not None and first.prior_note.startswith(
        "no prior study in the PACS (0 prior studies within 10 years"), first.prior_note
    assert (first.prior_study_uid, first.prior_run_id, first.prior) == (None, None, None)
    assert dciodvfy_errors(r1_sr) == []
    assert "Comparison with a prior study: no prior study in the PACS" in text_values(r1_sr)

    # R2: R1's run reused (nothing retrieved), its volumes and probabilities compared.
    assert second.state == RunState.SUCCEEDED.value and second.volumes is not None
    assert (second.prior_study_uid, second.prior_run_id, second.prior_note) == (r1.study_uid, first.id, None)
    assert second.prior is not None and second.prior["source"] == "reused"
    assert "prior.retrieve" not in second.prior["seconds"]
    assert second.stage_seconds is not None and {"volumes_measured", "prior_compared"} <= set(second.stage_seconds)
    assert dciodvfy_errors(r2_sr) == []
    sr = dcmread(r2_sr)
    years = (datetime.date(2025, 3, 10) - datetime.date(2023, 1, 15)).days / 365.25
    before, after = first.volumes, second.volumes
    for structure in ("hippocampus_left", "lateral_ventricles"):
        numbers = group_numbers(sr, structure)
        key = f"{structure}_ml"
        assert numbers[PRIOR_VOLUME] == pytest.approx(before[key], abs=0.001)
        rate = 100 * (after[key] - before[key]) / before[key] / years
        assert numbers[RELATIVE_CHANGE_PER_YEAR] == pytest.approx(rate, abs=1e-3), structure
    # The direction and about the size of the known deformation (cheap settings recover about 2/3 of it).
    expected = brains()[3]
    measured = {s: after[f"{s}_ml"] / before[f"{s}_ml"] - 1 for s in expected}
    assert measured["hippocampus_left"] < expected["hippocampus_left"] / 2 < 0, (measured, expected)
    assert measured["lateral_ventricles"] > expected["lateral_ventricles"] / 2 > 0, (measured, expected)
    assert probability_changes(sr) == pytest.approx(
        {c: probabilities(second)[c] - probabilities(first)[c] for c in CLASSES}, abs=1e-3)
    assert evidence_sop_uids(sr, r1.study_uid) == set(r1.sop_uids)
    assert impression_class(sr) == second.predicted_class


def test_a_prior_only_in_the_pacs_is_retrieved_by_c_get_and_analysed(
        node_b: Node, brain_pacs: PriorPacs, currents: dict[str, Written], tmp_path: Path) -> None:
    g1, g2 = brain_pacs.studies["G1"], currents["G2"]
    send(node_b, g2.directory)
    run = study_run(node_b, g2.study_uid)
    sr_path = study_sr(brain_pacs.orthanc, g2.study_uid, tmp_path / "g2.dcm")
    assert run.state == RunState.SUCCEEDED.value
    assert (run.prior_study_uid, run.prior_run_id, run.prior_note) == (g1.study_uid, None, None)
    assert run.prior is not None and run.prior["source"] == "get"
    assert run.prior["series_instance_uid"] == g1.series_uid and run.prior["instances"] == len(g1.sop_uids)
    assert run.prior["study_date"] == "2023-06-01" and run.prior["volumes"] is None  # node B: no volumetry
    assert {"prior.query", "prior.retrieve", "prior.analysis"} <= set(run.prior["seconds"])
    assert run.volumes is None and run.volumes_note is None
    # The prior went through the run's scratch only: no spool file, no study row, no run of its own.
    assert not (node_b.settings.work_dir / run.id).exists()
    assert not (node_b.settings.spool_dir / g1.study_uid).exists()
    with node_b.db.sessions() as session:
        assert session.scalars(select(Study.study_instance_uid).where(
            Study.study_instance_uid == g1.study_uid)).all() == []
    assert dciodvfy_errors(sr_path) == []
    sr = dcmread(sr_path)
    prior_probabilities = run.prior["probabilities"]
    assert set(prior_probabilities) == set(CLASSES) and sum(prior_probabilities.values()) == pytest.approx(1)
    assert probability_changes(sr) == pytest.approx(
        {c: probabilities(run)[c] - prior_probabilities[c] for c in CLASSES}, abs=1e-3)
    assert evidence_sop_uids(sr, g1.study_uid) == set(g1.sop_uids)


def test_a_prior_the_pacs_cannot_send_leaves_the_study_analysed_with_the_reason(
        node_b: Node, brain_pacs: PriorPacs, currents: dict[str, Written], tmp_path: Path) -> None:
    n1, n2 = brain_pacs.studies["N1"], currents["N2"]
    send(node_b, n2.directory)
    run = study_run(node_b, n2.study_uid)
    sr_path = study_sr(brain_pacs.orthanc, n2.study_uid, tmp_path / "n2.dcm")
    assert run.state == RunState.SUCCEEDED.value and run.predicted_class in CLASSES
    assert run.prior_study_uid == n1.study_uid and run.prior_run_id is None and run.prior is None
    assert run.prior_note is not None and run.prior_note.startswith("prior study not retrievable: C-GET "), \
        run.prior_note
    assert dciodvfy_errors(sr_path) == []
    sr = dcmread(sr_path)
    assert impression_class(sr) == run.predicted_class  # nothing of the study's own result is lost
    assert probability_changes(sr) == {}
    assert "Comparison with a prior study: prior study not retrievable: C-GET" in text_values(sr_path)
