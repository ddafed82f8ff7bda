"""The model's identity in /metrics and /readyz where the node's process loads no model: its worker processes
(read from the model directory they loaded) or Celery workers (the most recent finished run in the database)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from alembic import command
from dicom_node.app import Node
from dicom_node.db.models import Run, Study, utcnow
from dicom_node.db.session import alembic_config, make_sessionmaker, open_database
from dicom_node.ops import modelinfo
from dicom_node.ops.metrics import NodeCollector, make_registry
from dicom_node.ops.modelinfo import ModelIdentity, read_model_dir
from model import checkpoint
from model.inference import Predictor, init_demo_model
from tests.conftest import make_settings
from tests.support.http import get
from tests.support.postgres import postgres_schema

__all__ = ["postgres_schema"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_demo_model(tmp_path_factory.mktemp("model") / "demo", trained=False)


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> dict[str, str]:
    """What a worker reports having loaded: the predictor's own identity (it hashes the weights on load)."""
    info = Predictor.load(model_dir).info
    return {"name": info.name, "version": info.version, "weights_sha256": info.weights_sha256}


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_file_names_agree_with_the_model_package() -> None:
    assert (modelinfo.MANIFEST_FILE, modelinfo.WEIGHTS_FILE) == (checkpoint.MANIFEST_FILE, checkpoint.WEIGHTS_FILE)


def test_model_dir_read_without_loading_matches_what_a_worker_loads(model_dir: Path,
                                                                     loaded: dict[str, str]) -> None:
    assert read_model_dir(model_dir) == loaded
    with pytest.raises(FileNotFoundError, match=r"brain_adapter\.json"):
        read_model_dir(model_dir.parent / "nowhere")


def test_model_dir_with_a_temperature_read_without_loading_matches_what_a_worker_loads(
        model_dir: Path, tmp_path: Path) -> None:
    calibrated = tmp_path / "calibrated"
    shutil.copytree(model_dir, calibrated)
    manifest = calibrated / checkpoint.MANIFEST_FILE
    manifest.write_text(json.dumps({**json.loads(manifest.read_text(encoding="utf-8")), "temperature": 1.5}),
                        encoding="utf-8")
    info = Predictor.load(calibrated).info
    assert read_model_dir(model_dir)["weights_sha256"] != info.weights_sha256  # the temperature is in the identity
    assert read_model_dir(calibrated) == {"name": info.name, "version": info.version,
                                          "weights_sha256": info.weights_sha256}


def test_identity_by_mode(tmp_path: Path, model_dir: Path, loaded: dict[str, str]) -> None:
    process = make_settings(tmp_path, **{"model.path": str(model_dir)})
    assert ModelIdentity(process, lambda: None)() is None  # workers not ready yet
    assert ModelIdentity(process, lambda: {"name": loaded["name"]})() == loaded
    # the directory now holds another model than the workers reported: only what they said
    assert ModelIdentity(process, lambda: {"name": "other-model"})() == {"name": "other-model"}
    missing = make_settings(tmp_path, **{"model.path": str(tmp_path / "gone")})
    assert ModelIdentity(missing, lambda: {"name": loaded["name"]})() == {"name": loaded["name"]}
    thread = make_settings(tmp_path, **{"model.path": str(model_dir), "processing.isolation": "thread"})
    full = {"name": "n", "version": "v", "weights_sha256": "d" * 64}
    assert ModelIdentity(thread, lambda: full)() == full
    celery = make_settings(tmp_path, **{"model.path": str(model_dir), "processing.executor": "celery"})
    assert ModelIdentity(celery, lambda: None)() is None


@pytest.fixture
def process_node(tmp_path: Path, model_dir: Path) -> Iterator[Node]:
    settings = make_settings(tmp_path, **{"model.path": str(model_dir), "processing.workers": 1,
                                          "http.metrics_cache_s": 0, "storage.free_space_reserve_mb": 1})
    assert settings.processing.isolation == "process" and settings.processing.executor == "local"
    node = Node(settings)  # returns once the worker process has loaded the model
    node.start()
    yield node
    node.stop()


def test_worker_process_mode_exports_the_full_identity(process_node: Node, loaded: dict[str, str]) -> None:
    assert process_node.predictor is None  # the node's own process loaded no model
    assert process_node.http is not None
    samples = samples_of(get(process_node.http.url + "/metrics")[1])
    labels = (("name", loaded["name"]), ("source", "loaded"), ("version", loaded["version"]),
              ("weights_sha256", loaded["weights_sha256"]))
    assert samples[("dicom_node_model_info", labels)] == 1
    status, body, _ = get(process_node.http.url + "/readyz")
    model = json.loads(body)["checks"]["model"]
    assert status == 200, body
    assert model["ok"] is True and f"weights_sha256={loaded['weights_sha256']}" in model["detail"], body


def _seed_runs(sessions: sessionmaker[Session]) -> None:
    """Two finished runs (old model, then the current one) and a newer run still running."""
    now = utcnow()
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.826.0.1.3680043.10.1389.43.1", patient_id="MI-1",
                      first_received_at=now, last_received_at=now)
        s.add(study)
        s.flush()
        for n, (version, finished) in enumerate((("0.9", now - timedelta(hours=2)), ("1.0", now - timedelta(hours=1)),
                                                 ("2.0-running", None))):
            s.add(Run(id=f"00000000-0000-4000-8000-00000000000{n}", study_id=study.id,
                      state="succeeded" if finished else "running", created_at=now - timedelta(hours=3),
                      finished_at=finished, model_name="brain-adapter", model_version=version,
                      model_weights_sha256=version[0] * 64))


def _celery_samples(tmp_path: Path, sessions: sessionmaker[Session]) -> dict[tuple[str, tuple[tuple[str, str],
                                                                                              ...]], float]:
    settings = make_settings(tmp_path, **{"processing.executor": "celery"})
    collector = NodeCollector(sessions, 0, ModelIdentity(settings, lambda: None))
    from prometheus_client import generate_latest

    return samples_of(generate_latest(make_registry(collector)).decode())


def _expect_last_finished(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
    info = {labels: value for (name, labels), value in samples.items() if name == "dicom_node_model_info"}
    assert info == {(("name", "brain-adapter"), ("source", "last_run"), ("version", "1.0"),
                     ("weights_sha256", "1" * 64)): 1.0}


def test_celery_listener_exports_the_last_finished_run_model(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        _seed_runs(db.sessions)
        _expect_last_finished(_celery_samples(tmp_path, db.sessions))
    finally:
        db.engine.dispose()


@pytest.mark.postgres
def test_celery_listener_exports_the_last_finished_run_model_on_postgres(tmp_path: Path,
                                                                          postgres_schema: Engine) -> None:
    # PostgreSQL sorts NULL first in a descending order: the running run must not win there
    cfg = alembic_config(str(postgres_schema.url))
    with postgres_schema.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    sessions = make_sessionmaker(postgres_schema)
    _seed_runs(sessions)
    _expect_last_finished(_celery_samples(tmp_path, sessions))
