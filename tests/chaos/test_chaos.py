"""The short version of the reliability harness (the full one: `make chaos`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.cli.localpacs import LocalOrthanc
from model.inference import init_demo_model
from tests.chaos.pdu_fuzz import pdu_fuzz
from tests.chaos.scenarios import (
    crash_safety,
    database_outage,
    hostile_input,
    load,
    pacs_outage,
    scan_logs_for_phi,
)
from tests.chaos.traffic import PHI_NAME_PREFIX

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_demo_model(tmp_path_factory.mktemp("chaos-model") / "demo", trained=False)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[LocalOrthanc]:
    orthanc = LocalOrthanc(tmp_path / "orthanc")
    orthanc.start()
    yield orthanc
    orthanc.stop()


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, pacs: LocalOrthanc, model: Path) -> None:
    findings = crash_safety(tmp_path, pacs, model, kills=3, t1_every=3, max_gap_s=4.0)
    assert findings.ok, (findings.problems, findings.figures)
    assert findings.figures["instances lost"] == 0 and findings.figures["runs stuck"] == 0
    assert findings.figures["duplicate reports in PACS"] == 0
    logs = scan_logs_for_phi([tmp_path / "crash" / "node.log"], [(PHI_NAME_PREFIX, "CHAOS-PID-")])
    assert logs.ok, logs.problems


def test_sigterm_restarts_under_load_lose_nothing(tmp_path: Path, pacs: LocalOrthanc, model: Path) -> None:
    findings = crash_safety(tmp_path, pacs, model, kills=3, t1_every=3, max_gap_s=4.0, graceful=True)
    assert findings.ok, (findings.problems, findings.figures)
    assert findings.figures["instances lost"] == 0 and findings.figures["runs stuck"] == 0
    assert findings.figures["duplicate reports in PACS"] == 0 and findings.figures["node starts"] == 4


def test_malformed_input_is_refused_or_stored_harmlessly(tmp_path: Path, pacs: LocalOrthanc, model: Path) -> None:
    findings = hostile_input(tmp_path, pacs, model, count=60)
    assert findings.ok, (findings.problems, findings.figures)
    assert findings.figures["crashes"] == 0
    assert findings.figures["good instances during fuzzing"] > 0


def test_pdu_fuzz_keeps_the_node_serving(tmp_path: Path, pacs: LocalOrthanc, model: Path) -> None:
    findings = pdu_fuzz(tmp_path, pacs, model, count=100, seed=4242)
    assert findings.ok, (findings.problems, findings.figures)
    assert findings.figures["still serving"] and findings.figures["node starts"] == 1
    assert findings.figures["instances acknowledged"] > 0 and findings.figures["instances lost"] == 0


def test_reports_wait_out_a_pacs_outage(tmp_path: Path, pacs: LocalOrthanc, model: Path) -> None:
    findings = pacs_outage(tmp_path, pacs, model, down_s=3)
    assert findings.ok, (findings.problems, findings.figures)
    assert findings.figures["max attempts"] >= 2


def test_parallel_senders_lose_nothing(tmp_path: Path, pacs: LocalOrthanc, model: Path) -> None:
    findings = load(tmp_path, pacs, model, senders=4, duration_s=10, t1_every=1000)
    assert findings.ok, (findings.problems, findings.figures)
    assert findings.figures["instances lost"] == 0 and findings.figures["studies"] >= 4


@pytest.mark.postgres
def test_database_outage_is_survived(tmp_path: Path, pacs: LocalOrthanc, model: Path) -> None:
    from tests.conftest import POSTGRES_URL

    findings = database_outage(tmp_path, pacs, model, postgres_url=POSTGRES_URL, down_s=3)
    assert findings.ok, (findings.problems, findings.figures)
    answers = findings.figures["answers while the database was down"]
    # Stored safely or refused cleanly (Out of Resources / Processing Failure), never a dropped association.
    assert set(answers) <= {"success", "0xA700", "0x0110"}, answers
