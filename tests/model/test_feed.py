"""One note path and one device: what reaches the model in training, evaluation and inference (model.feed).

Device checks run on a CPU-only machine with the ``meta`` device standing in for an
accelerator: a device-recording hook sees every tensor the model receives and stops
the run there, so an input left on the CPU is caught without needing a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import model.evaluate as evaluate_module
import model.feed as feed_module
import model.train as train_module
from model.brain_adapter import BrainAdapter
from model.checkpoint import save_model
from model.cohort import CohortConfig, generate_cohort
from model.dataset import VolumeStore
from model.demo import build_demo_base
from model.evaluate import evaluate_runs
from model.feed import Batch, Inputs, note_mask, predict, text_hidden_cache
from model.inference import Predictor
from model.train import TrainConfig, train

META = torch.device("meta")
NOTES = ["MMSE 24/30, CDR-SB 3.5.", "", "   ", "MMSE 29/30."]


class StopRecordingError(Exception):
    """Raised by the recorder once it has seen the model's inputs."""


class DeviceRecorder:
    """Records the device of every tensor entering the hooked modules, then stops the run."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, torch.device]] = []

    def hook(self, module: torch.nn.Module, name: str, *, stop: bool = True) -> None:
        def record(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            for key, value in [*enumerate(args), *kwargs.items()]:
                if isinstance(value, torch.Tensor):
                    self.seen.append((f"{name}:{key}", value.device))
            if stop:
                raise StopRecordingError

        module.register_forward_pre_hook(record, with_kwargs=True)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("cohort"), CohortConfig(n_subjects=10, size=32, seed=3))


@pytest.fixture
def base() -> Iterator[BrainAdapter]:
    yield build_demo_base(32, seed=0, use_note=True).eval()


def test_batch_moves_every_tensor() -> None:
    batch = Batch(torch.zeros(2, 1, 4, 4, 4, dtype=torch.float16), torch.zeros(2, 3), torch.ones(2, dtype=torch.bool),
                  torch.zeros(2, dtype=torch.long)).to(META)
    assert batch.text_hidden is not None and batch.note_mask is not None and batch.labels is not None
    assert [t.device for t in (batch.volume, batch.text_hidden, batch.note_mask, batch.labels)] == [META] * 4
    assert batch.volume.dtype == torch.float32


def test_note_tokens_reach_the_text_tower_on_its_device(base: BrainAdapter) -> None:
    base.to(META)
    recorder = DeviceRecorder()
    assert base.language_encoder is not None
    recorder.hook(base.language_encoder, "language_encoder")
    with pytest.raises(StopRecordingError):
        text_hidden_cache(base, NOTES)
    assert recorder.seen and {d for _, d in recorder.seen} == {META}


def test_training_batches_reach_the_model_on_its_device(cohort: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = DeviceRecorder()
    prepare = train_module.prepare_model

    def recorded(*args: Any, **kwargs: Any) -> Any:
        model, digest = prepare(*args, **kwargs)
        recorder.hook(model, "forward")
        return model, digest

    monkeypatch.setattr(train_module, "prepare_model", recorded)
    # the text tower on META cannot give values back; its own inputs are checked above
    monkeypatch.setattr(feed_module, "text_hidden_cache", lambda model, notes: torch.zeros(len(notes), 384))
    with pytest.raises(StopRecordingError):
        train(TrainConfig(manifest=str(cohort), out_dir=str(tmp_path), inputs="mri+note", epochs=1, batch_size=4,
                          device="meta", data_init=False, progress=False, demo_base=True))
    names = {n.split(":")[1] for n, _ in recorder.seen}
    assert names == {"0", "text_hidden", "note_mask"}  # the volume, the note states and the note mask
    assert {d for _, d in recorder.seen} == {META}


def test_evaluate_runs_on_the_requested_device(cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = train(TrainConfig(manifest=str(cohort), out_dir=str(tmp_path / "run"), inputs="mri+note", epochs=1,
                            batch_size=4, max_steps=1, progress=False, demo_base=True))
    recorder = DeviceRecorder()
    load = evaluate_module.load_run

    def recorded(run_dir: Path) -> Any:
        model, summary = load(run_dir)
        recorder.hook(model, "forward")
        return model, summary

    monkeypatch.setattr(evaluate_module, "load_run", recorded)
    monkeypatch.setattr(feed_module, "text_hidden_cache", lambda model, notes: torch.zeros(len(notes), 384))
    with pytest.raises(StopRecordingError):
        evaluate_runs([run], tmp_path / "eval", device="meta")
    assert recorder.seen and {d for _, d in recorder.seen} == {META}


def test_blank_notes_are_not_encoded_and_use_the_image_head(base: BrainAdapter, tmp_path: Path) -> None:
    assert note_mask(NOTES).tolist() == [True, False, False, True]
    recorder = DeviceRecorder()
    assert base.language_encoder is not None
    recorder.hook(base.language_encoder, "language_encoder", stop=False)
    text = text_hidden_cache(base, NOTES)
    assert len([n for n, _ in recorder.seen if n.endswith(":input_ids")]) == 1  # one forward, two notes
    assert text[1].abs().sum() == 0 and text[2].abs().sum() == 0 and text[0].abs().sum() > 0
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"v{i}.npy")
        np.save(paths[-1], rng.random((32, 32, 32), dtype=np.float32))
    inputs = Inputs(VolumeStore(paths, (32, 32, 32)), text, note_mask(NOTES), torch.zeros(4, dtype=torch.long))
    pred = predict(base, inputs, [0, 1, 2, 3], batch_size=4)
    with torch.no_grad():
        volumes = inputs.volumes.load([0, 1, 2, 3])
        image_only = torch.softmax(base.image_head(base.encode_image(volumes)), -1).numpy()
    np.testing.assert_allclose(pred.probabilities[[1, 2]], image_only[[1, 2]], atol=1e-6)
    assert np.abs(pred.probabilities[[0, 3]] - image_only[[0, 3]]).max() > 1e-4  # the notes were used
    # inference answers a blank note exactly as training and evaluation do
    predictor = Predictor.load(save_model(base, tmp_path / "model", name="t", version="0", demonstration=True))
    served = predictor.predict(np.load(paths[2]), "   ")
    assert served.used_note is False
    np.testing.assert_allclose([served.probabilities[c] for c in base.config.classes], pred.probabilities[2],
                               atol=1e-5)
