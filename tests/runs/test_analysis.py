"""Volumes in a run (dicom_node/runs/analysis.py): measured and recorded, or a note, never a failed run.

Runs go through the real ``process_run`` on the spooled study of :class:`tests.support.reports.Study5`;
conversion and preprocessing are stood in for (its instances are header-only) and so is the volumetry
where a test needs given volumes or a given failure.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NoReturn, cast

import numpy as np
import pytest

from core.errors import ConfigError, NodeError, NotAnalysed, Outcome
from dicom_node.db.models import Run, RunState
from dicom_node.runs import analysis, processing
from dicom_node.runs.analysis import same_method, volumes_from_record, volumes_record
from dicom_node.runs.context import normative_table, volumetry_config
from dicom_node.runs.processing import process_run
from dicom_node.settings import load_settings
from model.inference import Predictor
from pipeline.preprocess import Preprocessed
from pipeline.select import SelectionRules
from pipeline.volumetry import Volumes, VolumetryConfig, algorithm_name
from tests.conftest import make_settings
from tests.support.reports import MODEL, PREDICTION, Study5, outbox, sr_texts

SECRET = "Volumetest^Secret"
VOLUMES = Volumes(hippocampus_left_ml=3.4, hippocampus_right_ml=3.3, lateral_ventricles_ml=24.5, grey_matter_ml=612.0,
                  white_matter_ml=480.0, intracranial_ml=1450.0, algorithm="x",
                  qc={"correlation": 0.93, "seconds": 50.0})


def _converted(_files: Any, out_path: Path) -> Path:
    out_path.write_bytes(b"")
    return out_path


def _preprocessed(*_: Any, **__: Any) -> Preprocessed:
    return Preprocessed(volume=np.zeros((4, 4, 4), dtype=np.float32), qc={"slices": 5.0}, registered=None)


@pytest.fixture
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Study5]:
    made = Study5(tmp_path)
    made.ctx.rules = SelectionRules(requirements=(), scores=())  # any MR series will do
    made.ctx.predictor = cast(Predictor, SimpleNamespace(info=MODEL, predict=lambda volume, note: PREDICTION))
    made.ctx.volumetry = VolumetryConfig()
    monkeypatch.setattr(processing, "convert_series", _converted)
    monkeypatch.setattr(processing, "preprocess", _preprocessed)
    yield made
    made.db.engine.dispose()


def process(study: Study5) -> Run:
    run_id = study.new_run()
    process_run(run_id, study.ctx)
    with study.db.sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None
        return run


def test_a_volumetry_that_cannot_be_done_is_a_note_and_the_run_succeeds(study: Study5) -> None:
    run = process(study)  # the stand-in preprocessing keeps no registered volume: volumetry refuses it
    assert (run.state, run.predicted_class) == (RunState.SUCCEEDED.value, "AD")
    assert run.volumes is None
    assert run.volumes_note == ("volumes not measured: volumetry could not be done (volumetry needs affine "
                                "preprocessing with keep_registered (registered volume and template_to_native))")
    assert run.stage_seconds is not None and "volumes_measured" in run.stage_seconds
    assert all(m["ok"] for m in run.validation_messages or []), run.validation_messages
    assert f"Brain volumes: {run.volumes_note}" in sr_texts(outbox(study, run, "sr"))


def test_a_volumetry_qc_refusal_is_a_note_with_its_reason(study: Study5, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*_: Any, **__: Any) -> NoReturn:
        raise NotAnalysed(Outcome.QC_FAILED, "volumetry: atlas registration failed (correlation): measured 0.41, "
                                             "limit 0.6")

    monkeypatch.setattr(analysis, "measure_volumes", refused)
    run = process(study)
    assert run.state == RunState.SUCCEEDED.value
    assert run.volumes_note == ("volumes not measured: volumetry: atlas registration failed (correlation): "
                                "measured 0.41, limit 0.6")


def test_a_bug_in_volumetry_is_a_note_and_a_logged_traceback_without_its_message(
        study: Study5, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def bug(*_: Any, **__: Any) -> NoReturn:
        raise RuntimeError(SECRET)

    monkeypatch.setattr(analysis, "measure_volumes", bug)
    with caplog.at_level(logging.DEBUG):
        run = process(study)
    assert (run.state, run.volumes) == (RunState.SUCCEEDED.value, None)
    assert run.volumes_note == "volumes not measured: volumetry failed (RuntimeError; see the node's log)"
    assert f"run {run.id}: volumetry of the study failed (RuntimeError)" in caplog.text
    assert "Traceback (most recent call last)" in caplog.text and SECRET not in caplog.text
    assert SECRET not in sr_texts(outbox(study, run, "sr"))


def test_measured_volumes_are_recorded_and_change_the_reports_uids(
        study: Study5, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analysis, "measure_volumes", lambda *_a, **_k: VOLUMES)
    first = process(study)
    assert first.state == RunState.SUCCEEDED.value and first.volumes_note is None
    assert first.volumes is not None and first.volumes["hippocampus_left_ml"] == 3.4
    assert first.volumes["method"]["working_spacing_mm"] == 2.0 and first.volumes["qc"]["correlation"] == 0.93
    assert volumes_from_record(first.volumes) == VOLUMES
    monkeypatch.setattr(analysis, "measure_volumes",
                        lambda *_a, **_k: dataclasses.replace(VOLUMES, qc={"correlation": 0.93, "seconds": 51.0}))
    again = process(study)
    assert again.report_sop_instance_uid == first.report_sop_instance_uid  # the time taken is not content
    monkeypatch.setattr(analysis, "measure_volumes",
                        lambda *_a, **_k: dataclasses.replace(VOLUMES, hippocampus_left_ml=3.2))
    second = process(study)
    assert second.report_sop_instance_uid != first.report_sop_instance_uid  # other content, other object
    study.ctx.volumetry = None
    third = process(study)
    assert third.volumes is None and third.volumes_note is None  # volumetry off: no volumes, no note
    assert third.stage_seconds is not None and "volumes_measured" not in third.stage_seconds


def test_the_volumes_record_and_its_method() -> None:
    config = VolumetryConfig(working_spacing_mm=4.0, local_iterations=())
    record = volumes_record(dataclasses.replace(VOLUMES, algorithm=algorithm_name()), config)
    assert volumes_from_record(record).hippocampus_left_ml == 3.4
    assert same_method(record, config)
    assert not same_method(record, VolumetryConfig())  # measured otherwise: not comparable
    assert not same_method({**record, "algorithm": "pipeline.volumetry 0"}, config)
    with pytest.raises(NodeError, match=r"stored volumes unreadable \(KeyError\)"):
        volumes_from_record({"algorithm": "x"})


# ----- settings ----------------------------------------------------------------------------------------------------
def test_volumetry_is_on_in_the_product_and_off_in_the_tests_settings(tmp_path: Path) -> None:
    assert load_settings(environ={}).volumetry.enabled is True
    assert make_settings(tmp_path).volumetry.enabled is False
    assert volumetry_config(make_settings(tmp_path)) is None
    config = volumetry_config(make_settings(tmp_path, **{
        "volumetry.enabled": True, "volumetry.working_spacing_mm": 4, "volumetry.hippocampal_refinement": False}))
    assert config is not None and (config.working_spacing_mm, config.local_iterations) == (4.0, ())
    assert volumetry_config(make_settings(tmp_path, **{"volumetry.enabled": True})) == VolumetryConfig()


def test_a_node_without_the_atlas_does_not_start_with_volumetry_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import volumetry

    monkeypatch.setattr(volumetry, "ATLAS_DIR", tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"^invalid setting volumetry\.enabled: atlas file\(s\) ch2\.nii\.gz, "
                                          r"ch2bet\.nii\.gz, aal\.nii\.gz missing in .*nowhere \(Debian package "
                                          r"mricron-data\)"):
        volumetry_config(make_settings(tmp_path, **{"volumetry.enabled": True}))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"volumetry.working_spacing_mm": 0.5}, r"volumetry\.working_spacing_mm: Input should be greater"),
    ({"volumetry.normative_table": "/nonexistent/norms.csv"}, r"volumetry\.normative_table: .*no such file"),
    ({"volumetry.enabled": True, "processing.registration": "SyN"},
     r"volumetry\.enabled needs processing\.registration Affine or AffineFast"),
    ({"volumetry.speed": "fast"}, r"volumetry\.speed: Extra inputs are not permitted"),
])
def test_invalid_volumetry_settings_are_refused_with_the_key(
        tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_settings(tmp_path, **overrides)


def test_the_normative_table_is_read_at_start_up_and_a_bad_one_names_the_key(tmp_path: Path) -> None:
    good = tmp_path / "norms.csv"
    good.write_text("# source: test cohort\nstructure,sex,age_min,age_max,mean_ml,sd_ml\n"
                    "hippocampus_left,any,60,90,3.6,0.5\n", encoding="utf-8")
    table = normative_table(make_settings(tmp_path, **{"volumetry.enabled": True,
                                                       "volumetry.normative_table": str(good)}))
    assert table is not None and table.source == "test cohort" and len(table.rows) == 1
    # Volumetry off: the table is not read.
    assert normative_table(make_settings(tmp_path, **{"volumetry.normative_table": str(good)})) is None
    bad = tmp_path / "bad.csv"
    bad.write_text("structure,sex\nhippocampus_left,any\n", encoding="utf-8")
    settings = make_settings(tmp_path, **{"volumetry.enabled": True, "volumetry.normative_table": str(bad)})
    with pytest.raises(ConfigError, match=r"^invalid setting volumetry\.normative_table: .*bad\.csv"):
        normative_table(settings)
