"""Tests of the Predictor on the seeded demonstration model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from model.adapter_config import BrainAdapterConfig
from model.brain_adapter import BrainAdapter
from model.checkpoint import WEIGHTS_FILE, save_model
from model.errors import ModelInputError, ModelLoadError
from model.inference import Predictor, init_demo_model
from model.types import CLASSES
from model.vit import ViTConfig

NOTE = "Daughter reports progressive forgetfulness over two years; independent in daily activities."


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=0, trained=False)


@pytest.fixture(scope="module")
def predictor(demo_dir: Path) -> Predictor:
    return Predictor.load(demo_dir)


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((256, 256, 256), dtype=np.float32)


def test_info_identifies_the_weights(predictor: Predictor, demo_dir: Path) -> None:
    info = predictor.info
    assert info.demonstration is True
    assert info.weights_sha256 == hashlib.sha256((demo_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert info.version == "0.0.0+demo.small.seed0"
    assert info.parameters["preset"] == "BRAIN_ADAPTER"
    assert info.parameters["input_shape"] == "256x256x256"
    assert info.parameters["encoder_input_shape"] == "32x256x256"
    assert "all-MiniLM-L6-v2" in info.parameters["text_encoder"]


def test_image_only_prediction_is_deterministic(predictor: Predictor, volume: np.ndarray) -> None:
    first = predictor.predict(volume, None)
    second = predictor.predict(volume.copy(), "   ")
    assert first == second
    assert first.used_note is False
    assert tuple(first.probabilities) == CLASSES
    assert sum(first.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert first.predicted_class == max(first.probabilities, key=first.probabilities.__getitem__)


def test_note_path_uses_packaged_minilm(predictor: Predictor, volume: np.ndarray) -> None:
    with_note = predictor.predict(volume, NOTE)
    assert with_note.used_note is True
    assert sum(with_note.probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert predictor.predict(volume, NOTE) == with_note
    other = predictor.predict(volume, "No cognitive complaints; normal neurological examination.")
    assert other.probabilities != with_note.probabilities
    assert with_note.probabilities != predictor.predict(volume, None).probabilities


def test_reloaded_model_answers_identically(predictor: Predictor, demo_dir: Path, volume: np.ndarray) -> None:
    again = Predictor.load(demo_dir)
    assert again.predict(volume, NOTE) == predictor.predict(volume, NOTE)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((256, 256, 256), dtype=np.float64), "must be float32"),
        (np.zeros((32, 256, 256), dtype=np.float32), r"must have shape \(256, 256, 256\)"),
        (np.full((256, 256, 256), 2.0, dtype=np.float32), r"must lie in \[0, 1\]"),
        (np.full((256, 256, 256), np.nan, dtype=np.float32), "NaN or infinite"),
        ([[0.0]], "must be a numpy array"),
    ],
)
def test_invalid_volume_is_refused(predictor: Predictor, bad: object, message: str) -> None:
    with pytest.raises(ModelInputError, match=message):
        predictor.predict(bad, None)  # type: ignore[arg-type]


def test_image_only_model_says_note_unused(tmp_path: Path, volume: np.ndarray) -> None:
    torch.manual_seed(1)
    model = BrainAdapter(BrainAdapterConfig(vit=ViTConfig.small(), embed_dim=16, use_note=False, adapter_channels=2))
    save_model(model, tmp_path / "mri_only", name="mri-only", version="1", demonstration=True)
    predictor = Predictor.load(tmp_path / "mri_only")
    assert "text_encoder" not in predictor.info.parameters
    result = predictor.predict(volume, NOTE)
    assert result.used_note is False
    assert result == predictor.predict(volume, None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_device_is_refused(demo_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        Predictor.load(demo_dir, device="cuda")
    with pytest.raises(ModelLoadError, match="invalid device 'gpu0'"):
        Predictor.load(demo_dir, device="gpu0")


def test_profiles_with_their_own_model_directory_load_each_directory_once(tmp_path: Path) -> None:
    from dicom_node.db.session import open_database
    from dicom_node.runs.context import build_run_context
    from tests.conftest import make_settings

    main = init_demo_model(tmp_path / "main", trained=False, seed=1)
    other = init_demo_model(tmp_path / "other", trained=False, seed=2)
    settings = make_settings(tmp_path, **{"model.path": str(main), "network.profiles": [
        {"ae_title": "RESEARCH", "model_path": str(other)},
        {"ae_title": "SAME", "model_path": str(main)},
        {"ae_title": "PLAIN"},
    ]})
    ctx = build_run_context(settings, open_database(settings.database_url).sessions)
    assert ctx.predictor_for("RESEARCH").info.weights_sha256 != ctx.predictor.info.weights_sha256
    assert ctx.predictor_for("SAME") is ctx.predictor
    assert ctx.predictor_for("PLAIN") is ctx.predictor and ctx.predictor_for(None) is ctx.predictor
    wrong = make_settings(tmp_path, **{"model.path": str(main), "network.profiles": [
        {"ae_title": "RESEARCH", "model_path": str(tmp_path / "missing")}]})
    with pytest.raises(ModelLoadError, match="missing"):
        build_run_context(wrong, open_database(wrong.database_url).sessions)
