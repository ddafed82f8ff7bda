"""The note's numbers (model.notenumbers): one parser for the baseline and the model, the standardisation
fitted on training scans and carried to evaluation and serving, notes without numbers, old configurations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional

import model.baseline as baseline_module
from dicom_node.cli.main import main
from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter
from model.cohort import CohortConfig, generate_cohort
from model.dataset import Sample, read_manifest
from model.demo import BaseSpec, build_demo_base
from model.evaluate import load_run
from model.feed import build_inputs, predict
from model.finetune import trainable_state
from model.inference import Predictor, init_trained_demo_model
from model.notenumbers import NOTE_FEATURES, NoteNumbers, note_number_matrix, parse_note
from model.text import packaged_minilm_path
from model.vit import ViTConfig

NAN = math.nan

#: Hand-written notes and the numbers a reader takes from them (age, education, MMSE, CDR-SB, complaints).
NOTES: list[tuple[str, tuple[float, float, float, float, float]]] = [
    ("71-year-old woman, 12 years of education. Occasional memory complaints, reported by the spouse. "
     "MMSE 26/30, CDR-SB 1.5.", (71, 12, 26, 1.5, 1)),
    ("Patient: 80-year-old man with 18 years of schooling. History: frequent memory complaints (reported by a son). "
     "Cognitive testing: MMSE 21/30; CDR sum of boxes 4.0.", (80, 18, 21, 4.0, 2)),
    ("Age 66, woman. Education 9 years. No memory complaints, reported by the patient. MMSE score 30 of 30. "
     "CDR-SB 0.0.", (66, 9, 30, 0.0, 0)),
    ("Aged 77; Mini-Mental State Examination: 24. Global CDR 1.", (77, NAN, 24, NAN, NAN)),
    ("Seen today with her daughter; walks unaided, sleeps well.", (NAN, NAN, NAN, NAN, NAN)),
    ("68 yo man, MMSE 35/30 (typing error), CDR-SB 25.", (68, NAN, NAN, NAN, NAN)),  # out of range: absent
]

FAST_VIT = ViTConfig(img_size=(4, 32, 32), patch_size=(2, 8, 8), hidden_size=32, mlp_dim=64, num_layers=1,
                     num_heads=4)


def _served_volume(path: Path) -> np.ndarray:
    """A 32^3 cohort volume as the node's 256^3 input (each voxel repeated 8 times: the demo model pools it back)."""
    small = np.load(path).astype(np.float32)
    return np.repeat(np.repeat(np.repeat(small, 8, axis=0), 8, axis=1), 8, axis=2)


def _same(got: list[float], want: tuple[float, ...]) -> bool:
    return all((math.isnan(g) and math.isnan(w)) or g == w for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize(("note", "expected"), NOTES)
def test_parser_reads_the_numbers_a_reader_would(note: str, expected: tuple[float, ...]) -> None:
    parsed = parse_note(note)
    assert list(parsed) == list(NOTE_FEATURES)
    assert _same(list(parsed.values()), expected), parsed
    assert _same(note_number_matrix([note])[0].tolist(), expected)


def test_one_parser_for_the_baseline_and_the_model() -> None:
    assert baseline_module.parse_note is parse_note
    assert baseline_module.NOTE_FEATURES is NOTE_FEATURES
    assert np.isnan(note_number_matrix(["", None])).all()


def test_standardisation_uses_training_statistics_and_marks_missing_numbers() -> None:
    layer = NoteNumbers(2, 4)
    raw = torch.tensor([[70.0, 20.0], [80.0, NAN], [90.0, 30.0]])
    layer.fit(raw)
    # column 0: mean 80, sample SD 10; column 1: mean 25, sample SD of (20, 30) = 7.0710678
    torch.testing.assert_close(layer.center, torch.tensor([80.0, 25.0]))
    torch.testing.assert_close(layer.scale, torch.tensor([10.0, 50.0 ** 0.5]))
    got = layer.standardise(torch.tensor([[85.0, NAN], [NAN, 25.0 + 2 * 50.0 ** 0.5]]))
    torch.testing.assert_close(got, torch.tensor([[0.5, 0.0, 0.0, 1.0], [0.0, 2.0, 1.0, 0.0]]))
    never = NoteNumbers(2, 4)
    never.fit(torch.tensor([[NAN, 5.0], [NAN, 5.0]]))  # absent everywhere / constant: centre only
    torch.testing.assert_close(never.center, torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(never.scale, torch.tensor([1.0, 1.0]))


def _config(note_numbers: bool = True) -> BrainAdapterConfig:
    return BrainAdapterConfig(vit=FAST_VIT, text_encoder_path=str(packaged_minilm_path()), embed_dim=8,
                              input_size=(32, 32, 32), adapter_channels=2, max_text_length=64,
                              text_pooling="mean", note_numbers=note_numbers)


def test_configuration_defaults_keep_saved_models_and_bases_unchanged() -> None:
    saved = _config(note_numbers=False).to_dict()
    del saved["note_numbers"], saved["note_text"]  # a model directory written before the fields existed
    assert BrainAdapterConfig.from_dict(saved).note_numbers is False
    assert BrainAdapterConfig.from_dict(saved).note_text is True
    assert BrainAdapterConfig.from_dict(_config().to_dict()).note_numbers is True
    spec = BaseSpec(kind="demo", size=32, seed=0).to_dict()
    del spec["note_numbers"]
    assert BaseSpec.from_dict(spec).note_numbers is False
    with pytest.raises(ValueError, match="note_numbers=True needs use_note=True"):
        BrainAdapterConfig(vit=FAST_VIT, use_note=False, input_size=(32, 32, 32), note_numbers=True)
    plain = build_demo_base(32, seed=0, use_note=True)
    assert plain.note_numbers is None and plain.fusion_head is not None and plain.fusion_head.in_features == 128


@pytest.mark.parametrize("preset", list(Preset))
def test_the_number_layer_is_trained_in_every_preset_and_the_towers_stay_frozen(preset: Preset) -> None:
    model = build_demo_base(32, seed=0, use_note=True, note_numbers=True)
    model.config = BrainAdapterConfig(**{**model.config.__dict__, "preset": preset})
    model.apply_preset()
    assert model.note_numbers is not None and model.fusion_head is not None
    assert model.fusion_head.in_features == 64 and not model.config.note_text  # the numbers alone
    assert model.config.contrastive_weight == 0.0
    assert all(p.requires_grad for p in model.note_numbers.parameters())
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert model.language_encoder is not None
    assert not any(p.requires_grad for p in model.language_encoder.parameters())
    state = trainable_state(model)
    assert {"note_numbers.center", "note_numbers.scale", "note_numbers.proj.weight"} <= set(state)


def test_forward_needs_the_numbers_and_takes_a_note_without_any() -> None:
    base = build_demo_base(32, seed=0, use_note=True, note_numbers=True)
    notes = ["Seen today; walks unaided.", NOTES[0][0]]
    tokens = base.tokenize(notes)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="pass note_numbers"):
        base(x, tokens["input_ids"], tokens["attention_mask"])
    numbers = base.note_numbers_of(notes)
    with torch.no_grad():
        out = base(x, tokens["input_ids"], tokens["attention_mask"], note_numbers=numbers)
        assert out.fused_logits is not None and base.note_numbers is not None and base.fusion_head is not None
        # late fusion: the numbers' logits add to the image head's (the demonstration base reads no text there)
        note_logits = base.fusion_head(base.note_numbers(numbers))
    torch.testing.assert_close(out.fused_logits, out.image_logits + note_logits)
    assert bool(torch.isfinite(out.logits).all())
    assert not torch.equal(out.fused_logits[0], out.fused_logits[1])


def test_the_note_head_can_read_the_text_too_and_never_trains_the_image_side() -> None:
    from model.text import load_text_encoder

    torch.manual_seed(0)
    model = BrainAdapter(_config(), load_text_encoder(packaged_minilm_path()))
    assert model.config.note_text and model.fusion_head is not None and model.fusion_head.in_features == 2 * 8
    notes = [NOTES[0][0], NOTES[1][0], NOTES[2][0]]
    tokens = model.tokenize(notes)
    out = model(torch.rand(3, 1, 32, 32, 32), tokens["input_ids"], tokens["attention_mask"],
                note_numbers=model.note_numbers_of(notes))
    assert out.fused_logits is not None and out.text_embeds is not None and model.note_numbers is not None
    with torch.no_grad():
        note_logits = model.fusion_head(torch.cat([out.text_embeds, model.note_numbers(model.note_numbers_of(notes))],
                                                  dim=-1))
    torch.testing.assert_close(out.fused_logits, out.image_logits + note_logits)
    functional.cross_entropy(out.fused_logits, torch.tensor([0, 1, 2])).backward()
    assert model.image_head.weight.grad is None and model.adapter.branch[0].weight.grad is None
    assert model.fusion_head.weight.grad is not None and model.note_numbers.proj.weight.grad is not None
    with pytest.raises(ValueError, match="note_text=False needs note_numbers=True"):
        BrainAdapterConfig(**{**_config(note_numbers=False).__dict__, "note_text": False})


@pytest.fixture(scope="module")
def number_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny ``train --note-numbers`` run on the seeded demonstration base, exported as a demo folder."""
    root = tmp_path_factory.mktemp("notenumbers")
    manifest = generate_cohort(root / "cohort", CohortConfig(n_subjects=14, size=32, seed=7))
    run = root / "run"
    assert main(["train", str(manifest), "--out", str(run), "--demo-base", "--note-numbers", "--epochs", "1",
                 "--batch-size", "4", "--lr-head", "1e-1", "--no-progress", "--export-demo", str(root / "demo")]) == 0
    return manifest, run


def test_training_fits_the_standardisation_on_its_training_notes(number_run: tuple[Path, Path]) -> None:
    manifest, run = number_run
    summary = json.loads((run / "run.json").read_text())
    assert summary["base"]["note_numbers"] is True
    train_subjects = set(summary["split"]["train_subjects"])
    rows = [s for s in read_manifest(manifest) if s.subject_id in train_subjects]
    values = np.array([[parse_note(s.note)[k] for k in NOTE_FEATURES] for s in rows], dtype=np.float64)
    saved = load_file(str(run / "adapter.safetensors"))
    np.testing.assert_allclose(saved["note_numbers.center"].numpy(), np.nanmean(values, axis=0), rtol=1e-5)
    np.testing.assert_allclose(saved["note_numbers.scale"].numpy(), np.nanstd(values, axis=0, ddof=1), rtol=1e-5)
    model, _ = load_run(run)
    assert model.note_numbers is not None
    torch.testing.assert_close(model.note_numbers.center, saved["note_numbers.center"])


def test_serving_gives_the_evaluation_path_probabilities(number_run: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, run = number_run
    model, summary = load_run(run)
    temperature = float(summary["temperature"])
    sample = read_manifest(manifest)[0]
    no_numbers = Sample(sample.subject_id, sample.volume, "Seen today with her son; walks unaided.", sample.label)
    chosen = [sample, no_numbers]
    expected = predict(model, build_inputs(model, chosen, "mri+note"), [0, 1], temperature=temperature)

    model_dir = init_trained_demo_model(tmp_path / "served", run.parent / "demo")
    predictor = Predictor.load(model_dir)
    assert predictor.config.note_numbers and predictor.info.version.endswith(".notenumbers")
    assert "mmse" in predictor.info.parameters["note_numbers"]
    volume = _served_volume(sample.volume)
    for k, item in enumerate(chosen):
        served = predictor.predict(volume, item.note)
        assert served.used_note
        got = np.array([served.probabilities[c] for c in predictor.config.classes])
        np.testing.assert_allclose(got, expected.probabilities[k], atol=1e-5)
    assert predictor.model.note_numbers is not None and model.note_numbers is not None
    torch.testing.assert_close(predictor.model.note_numbers.scale, model.note_numbers.scale)  # saved and reused


def test_a_checkpoint_round_trip_gives_identical_probabilities(number_run: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, run = number_run
    sample = read_manifest(manifest)[1]
    volume = _served_volume(sample.volume)
    first = Predictor.load(init_trained_demo_model(tmp_path / "a", run.parent / "demo"))
    again = Predictor.load(init_trained_demo_model(tmp_path / "b", run.parent / "demo"))
    assert first.info.weights_sha256 == again.info.weights_sha256
    assert first.predict(volume, sample.note).probabilities == again.predict(volume, sample.note).probabilities
