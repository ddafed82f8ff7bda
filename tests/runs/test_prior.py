"""The comparison with the prior study (dicom_node/runs/prior.py) against a real Orthanc, the analysis stood in for.

Orthanc holds the priors of tests/support/prior.py (small series).  Each test calls
``compare_with_prior`` as a run does; conversion and preprocessing of a retrieved prior
are stood in for (the full runs of tests/runs/test_prior_runs.py do them for real), so
these tests check the query, the reuse rules, the C-GET and C-MOVE retrieval and the note
of every failure, in seconds.
"""

from __future__ import annotations

import datetime
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn, cast

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.cli.localpacs import free_port
from dicom_node.db.models import Instance, Run, RunState, Series, Study, utcnow
from dicom_node.db.session import Database, open_database
from dicom_node.ingest.recorder import Recorder
from dicom_node.ingest.spool import Spool
from dicom_node.net.qr import PriorStudyClient
from dicom_node.net.scp import StorageServer
from dicom_node.runs import prior as prior_module
from dicom_node.runs.context import RunContext
from dicom_node.runs.prior import CurrentStudy, PriorOutcome, compare_with_prior
from model.inference import Predictor
from pipeline.preprocess import Preprocessed
from pipeline.preprocess_config import PreprocessConfig
from pipeline.select import SelectionRules
from tests.conftest import make_settings
from tests.support.prior import (
    NO_RETRIEVE_AE,
    STUDIES,
    PriorPacs,
    no_patient_data_in_prior_logs,
    prior_pacs,
    prior_settings,
)
from tests.support.reports import MODEL, PREDICTION

__all__ = ["no_patient_data_in_prior_logs", "prior_pacs"]  # the autouse log check and the module's Orthanc

CURRENT_DATE = datetime.date(2025, 3, 10)


def current(key: str, **changes: Any) -> CurrentStudy:
    header = STUDIES[key]
    values = {"study_instance_uid": header.study_instance_uid, "patient_id": header.patient_id,
              "issuer": header.issuer_of_patient_id, "study_date": CURRENT_DATE, **changes}
    return CurrentStudy(**values)


class Node:
    """A node's database and run context (no listener) with the analysis of a prior stood in for."""

    def __init__(self, tmp_path: Path, pacs: PriorPacs, **overrides: object) -> None:
        self.settings = make_settings(tmp_path, **prior_settings(pacs, **overrides))
        self.db: Database = open_database(self.settings.database_url)
        self.predicted: list[Any] = []

        def predict(volume: Any, note: str | None) -> Any:
            self.predicted.append(volume.shape)
            return PREDICTION

        self.ctx = RunContext(settings=self.settings, sessions=self.db.sessions,
                              predictor=cast(Predictor, SimpleNamespace(info=MODEL, predict=predict)),
                              rules=SelectionRules(requirements=(), scores=()),  # the small series will do
                              preprocess_config=PreprocessConfig(),
                              prior_client=PriorStudyClient(self.settings))
        self.workdir = self.settings.work_dir / "run-1"

    def compare(self, key: str, **changes: Any) -> PriorOutcome:
        return compare_with_prior(self.ctx, "run-1", current(key, **changes), self.workdir)

    def add_run(self, key: str, weights: str, series_uid: str, sop_uids: tuple[str, ...] = (),
                volumes_note: str | None = None) -> str:
        """A succeeded run of study *key* (as if the node had analysed it), with its instances recorded."""
        header, now, run_id = STUDIES[key], utcnow(), str(uuid.uuid4())
        with self.db.sessions.begin() as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == header.study_instance_uid)).first()
            if study is None:
                study = Study(study_instance_uid=header.study_instance_uid, patient_id=header.patient_id,
                              study_date=datetime.date(2023, 1, 15), first_received_at=now, last_received_at=now)
                session.add(study)
                session.flush()
                series = Series(series_instance_uid=series_uid, study_id=study.id, first_received_at=now,
                                last_received_at=now)
                session.add(series)
                session.flush()
                for n, uid in enumerate(sop_uids):
                    session.add(Instance(sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                                         series_id=series.id, transfer_syntax_uid="1.2.840.10008.1.2.1",
                                         calling_ae_title="SCANNER", peer_address="127.0.0.1",
                                         spool_path=f"/spool/{n}.dcm", size_bytes=1, sha256="0" * 64,
                                         received_at=now))
            session.add(Run(id=run_id, study_id=study.id, state=RunState.SUCCEEDED.value, created_at=now,
                            finished_at=now, series_instance_uid=series_uid, model_weights_sha256=weights,
                            prob_ad=0.2, prob_mci=0.3, prob_cn=0.5, volumes_note=volumes_note))
        return run_id


@pytest.fixture
def node(tmp_path: Path, prior_pacs: PriorPacs) -> Iterator[Node]:
    made = Node(tmp_path, prior_pacs)
    yield made
    made.db.engine.dispose()


def _converted(files: list[Path], out_path: Path) -> Path:
    out_path.write_bytes(b"")
    return out_path


def _preprocessed(*_: Any, **__: Any) -> Preprocessed:
    return Preprocessed(volume=np.zeros((4, 4, 4), dtype=np.float32), qc={"slices": 121.0})


@pytest.fixture
def analysis_stood_in(monkeypatch: pytest.MonkeyPatch) -> list[list[Path]]:
    """Conversion and preprocessing of a prior stood in for; the files each conversion was given."""
    converted: list[list[Path]] = []

    def convert(files: list[Path], out_path: Path) -> Path:
        converted.append(list(files))
        return _converted(files, out_path)

    monkeypatch.setattr(prior_module, "convert_series", convert)
    monkeypatch.setattr(prior_module, "preprocess", _preprocessed)
    return converted


# ----- reuse -----------------------------------------------------------------------------------------------------
def test_a_prior_the_node_analysed_with_the_same_model_is_reused(
        node: Node, prior_pacs: PriorPacs, analysis_stood_in: list[list[Path]]) -> None:
    r1 = prior_pacs.studies["R1"]
    run_id = node.add_run("R1", MODEL.weights_sha256, r1.series_uid, r1.sop_uids)
    outcome = node.compare("R2")
    assert outcome.prior is not None and outcome.note == "" and outcome.source == "reused"
    assert (outcome.prior.run_id, outcome.prior.study_instance_uid, outcome.prior.series_instance_uid) == (
        run_id, r1.study_uid, r1.series_uid)
    assert outcome.prior.study_date == datetime.date(2023, 1, 15)
    assert outcome.prior.probabilities == {"AD": 0.2, "MCI": 0.3, "CN": 0.5}
    assert [uid for _, uid in outcome.prior.instances] == list(r1.sop_uids)
    assert outcome.prior.volumes is None  # volumetry off
    assert analysis_stood_in == [] and not node.workdir.exists()  # nothing retrieved, nothing analysed
    columns = outcome.columns(node.ctx)
    assert (columns["prior_study_uid"], columns["prior_run_id"], columns["prior_note"]) == (
        r1.study_uid, run_id, None)
    assert columns["prior"]["source"] == "reused" and columns["prior"]["instances"] == len(r1.sop_uids)


def test_a_prior_analysed_by_another_model_is_retrieved_by_c_get_and_analysed_again(
        node: Node, prior_pacs: PriorPacs, analysis_stood_in: list[list[Path]]) -> None:
    r1 = prior_pacs.studies["R1"]
    node.add_run("R1", "cd" * 32, r1.series_uid)
    outcome = node.compare("R2")
    assert outcome.prior is not None and outcome.note == "" and outcome.source == "get"
    assert outcome.prior.run_id is None
    # Every instance of the series came by C-GET into the run's scratch directory, and was analysed.
    assert {p.name for p in analysis_stood_in[0]} == {f"{uid}.dcm" for uid in r1.sop_uids}
    assert all(p.parent == node.workdir / "prior" for p in analysis_stood_in[0])
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in analysis_stood_in[0]} == set(
        r1.sop_uids)
    assert node.predicted == [(4, 4, 4)]
    assert [uid for _, uid in outcome.prior.instances] == list(r1.sop_uids)  # by InstanceNumber
    assert outcome.prior.probabilities == dict(PREDICTION.probabilities)
    assert outcome.prior.study_date == datetime.date(2023, 1, 15)
    assert {"prior.query", "prior.lookup", "prior.retrieve", "prior.analysis"} <= set(outcome.seconds)


def test_a_prior_without_volumes_of_this_method_is_analysed_again(
        node: Node, prior_pacs: PriorPacs, analysis_stood_in: list[list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.volumetry import VolumetryConfig

    node.ctx.volumetry = VolumetryConfig(working_spacing_mm=4.0)
    monkeypatch.setattr(prior_module, "measure", lambda *_args, **_kw: (None, "volumes not measured: test"))
    r1 = prior_pacs.studies["R1"]
    node.add_run("R1", MODEL.weights_sha256, r1.series_uid)  # analysed before volumetry: no volumes, no note
    outcome = node.compare("R2")
    assert outcome.prior is not None and outcome.source == "get" and outcome.prior.run_id is None
    assert outcome.volumes_note == "volumes not measured: test"
    assert outcome.columns(node.ctx)["prior"]["volumes_note"] == "volumes not measured: test"


def test_a_reused_prior_that_could_not_be_measured_keeps_its_reason(
        node: Node, prior_pacs: PriorPacs, analysis_stood_in: list[list[Path]]) -> None:
    from pipeline.volumetry import VolumetryConfig

    node.ctx.volumetry = VolumetryConfig(working_spacing_mm=4.0)
    r1 = prior_pacs.studies["R1"]
    run_id = node.add_run("R1", MODEL.weights_sha256, r1.series_uid, r1.sop_uids,
                          volumes_note="volumes not measured: brain mask too small")
    outcome = node.compare("R2")
    assert outcome.prior is not None and outcome.source == "reused" and outcome.prior.run_id == run_id
    assert outcome.prior.volumes is None and analysis_stood_in == []  # measuring again would fail again
    assert outcome.volumes_note == "volumes not measured: brain mask too small"
    assert outcome.columns(node.ctx)["prior"]["volumes_note"] == "volumes not measured: brain mask too small"


def test_a_retrieved_prior_has_its_volumes_measured_by_the_runs_method(
        node: Node, analysis_stood_in: list[list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.volumetry import Volumes, VolumetryConfig

    node.ctx.volumetry = VolumetryConfig(working_spacing_mm=4.0)
    volumes = Volumes(hippocampus_left_ml=3.5, hippocampus_right_ml=3.4, lateral_ventricles_ml=22.0,
                      grey_matter_ml=620.0, white_matter_ml=480.0, intracranial_ml=1450.0, algorithm="x")
    monkeypatch.setattr(prior_module, "measure", lambda *_args, **_kw: (volumes, ""))
    outcome = node.compare("G2")
    assert outcome.prior is not None and outcome.prior.volumes == volumes and outcome.volumes_note == ""
    record = outcome.columns(node.ctx)["prior"]
    assert record["volumes"]["hippocampus_left_ml"] == 3.5 and record["volumes"]["method"]["working_spacing_mm"] == 4
    assert record["volumes_note"] is None and record["source"] == "get"


# ----- retrieval by C-MOVE through the node's own listener -------------------------------------------------------
def test_c_move_brings_the_prior_through_the_listener_without_a_run_of_its_own(
        tmp_path: Path, prior_pacs: PriorPacs, analysis_stood_in: list[list[Path]]) -> None:
    made = Node(tmp_path, prior_pacs, **{"prior.retrieve": "move", "network.port": prior_pacs.node_port,
                                         "network.allowed_calling_ae_titles": [prior_pacs.orthanc.ae_title]})
    server = StorageServer(made.settings, Spool.from_settings(made.settings), Recorder(made.db.sessions))
    server.start()
    try:
        outcome = made.compare("G2")
    finally:
        server.stop()
    g1 = prior_pacs.studies["G1"]
    assert outcome.prior is not None and outcome.note == "" and outcome.source == "move"
    assert {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in analysis_stood_in[0]} == set(
        g1.sop_uids)
    assert all(made.settings.spool_dir in p.parents for p in analysis_stood_in[0])  # received like any study
    with made.db.sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == g1.study_uid)).one()
        assert study.needs_run is False  # analysed in this run, not queued for one of its own
        assert session.scalars(select(Run)).all() == []
    made.db.engine.dispose()


# ----- every failure is a note -----------------------------------------------------------------------------------
def test_no_prior_in_the_pacs(node: Node) -> None:
    outcome = node.compare("Z2")
    assert outcome.prior is None and outcome.study_instance_uid is None
    assert outcome.note == "no prior study in the PACS (0 prior studies within 10 years, none with a candidate T1 " \
                           "series)"
    assert outcome.columns(node.ctx) == {"prior_study_uid": None, "prior_run_id": None, "prior_note": outcome.note,
                                         "prior": None}


def test_a_study_without_patient_id_is_not_compared(node: Node) -> None:
    outcome = node.compare("R2", patient_id=None)
    assert outcome.note == "no prior study looked for: the study has no PatientID or no StudyDate"


def test_a_prior_the_pacs_cannot_send_is_not_retrievable(node: Node, prior_pacs: PriorPacs) -> None:
    outcome = node.compare("N2")  # N1 is Secondary Capture: no C-GET context of the node takes it
    n1 = prior_pacs.studies["N1"]
    assert outcome.prior is None and outcome.study_instance_uid == n1.study_uid
    assert outcome.note.startswith("prior study not retrievable: C-GET "), outcome.note
    assert re.search(r": 0 completed, [1-9][0-9]* failed", outcome.note), outcome.note  # Orthanc stops at the first
    assert not list((node.workdir / "prior").glob("*.dcm"))


@pytest.mark.parametrize("method", ["get", "move"])
def test_a_pacs_that_refuses_the_retrieve(tmp_path: Path, prior_pacs: PriorPacs, method: str) -> None:
    made = Node(tmp_path, prior_pacs, **{"network.ae_title": NO_RETRIEVE_AE, "prior.retrieve": method})
    outcome = made.compare("G2")
    made.db.engine.dispose()
    assert outcome.prior is None and outcome.study_instance_uid == prior_pacs.studies["G1"].study_uid
    assert outcome.note.startswith("prior study not retrievable: the PACS refused ("), outcome.note
    assert f"C-{method.upper()}" in outcome.note, outcome.note


def test_a_pacs_that_refuses_the_query(tmp_path: Path, prior_pacs: PriorPacs) -> None:
    made = Node(tmp_path, prior_pacs, **{"network.ae_title": "STRANGER"})
    outcome = made.compare("R2")
    made.db.engine.dispose()
    assert outcome.note == ("no prior study looked for: the PACS refused (PACS ended the association instead of "
                            "answering the C-FIND (is this node's AE title allowed to use it?))")


def test_a_pacs_that_is_down(tmp_path: Path, prior_pacs: PriorPacs) -> None:
    made = Node(tmp_path, prior_pacs, **{"prior.pacs.port": free_port()})
    outcome = made.compare("R2")
    made.db.engine.dispose()
    assert outcome.note.startswith("no prior study looked for: the PACS did not answer (connection to "
                                   "PACS@127.0.0.1:"), outcome.note


def test_a_prior_that_is_not_analysable_and_a_bug_are_notes(
        node: Node, monkeypatch: pytest.MonkeyPatch, analysis_stood_in: list[list[Path]]) -> None:
    from core.errors import NotAnalysed, Outcome

    def refused(*_: Any, **__: Any) -> NoReturn:
        raise NotAnalysed(Outcome.QC_FAILED, "template correlation: measured 0.2, limit 0.5")

    monkeypatch.setattr(prior_module, "preprocess", refused)
    assert node.compare("G2").note == "prior study not analysed: template correlation: measured 0.2, limit 0.5"

    def bug(*_: Any, **__: Any) -> NoReturn:
        raise KeyError(STUDIES["G2"].patient_name)  # a message that is not ours reaches neither note nor log

    monkeypatch.setattr(prior_module, "preprocess", bug)
    note = node.compare("G2").note
    assert note == "prior study not compared: processing error (KeyError; see the node's log)"


def test_the_comparison_is_off_without_a_client(node: Node) -> None:
    node.ctx.prior_client = None
    assert node.compare("R2") == PriorOutcome()
    assert PriorOutcome().columns(node.ctx) == {"prior_study_uid": None, "prior_run_id": None, "prior_note": None,
                                                "prior": None}

