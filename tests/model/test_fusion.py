"""The numbers-only late fusion solved exactly after training (model.fusion)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch.nn import functional

from dicom_node.cli.main import main
from model.cohort import CohortConfig, generate_cohort
from model.dataset import read_manifest
from model.demo import build_demo_base
from model.feed import build_inputs
from model.fusion import C, image_logits_of, refit_note_fusion, solve
from model.initialise import fit_note_numbers


def _data(n: int = 172, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    """A problem shaped like the model's: five numbers (one nearly a copy of another), 15 % missing, indicators."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    x = rng.normal(0.0, 1.0, (n, 5)) + np.eye(3, 5)[labels] * 3.0
    x[:, 3] = 0.9 * x[:, 0] + rng.normal(0.0, 0.2, n)
    missing = rng.random((n, 5)) < 0.15
    return torch.tensor(np.concatenate([np.where(missing, 0.0, x), missing.astype(float)], axis=1)), \
        torch.tensor(labels)


def test_without_offset_it_is_scikit_learns_logistic_regression() -> None:
    z, labels = _data()
    weight, bias = solve(z, torch.zeros(len(z), 3, dtype=torch.float64), labels, 3)
    reference = LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(z.numpy(), labels.numpy())
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-5)  # converged, not merely close
    got = torch.softmax(z @ weight.t() + bias, dim=-1).numpy()
    np.testing.assert_allclose(got, reference.predict_proba(z.numpy()), atol=1e-5)


def test_with_an_offset_it_is_the_penalised_optimum_and_leans_on_the_offset() -> None:
    z, labels = _data()
    offset = 4.0 * functional.one_hot(labels, 3).double()  # an offset that already knows the labels
    weight, bias = solve(z, offset, labels, 3)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    objective = C * functional.cross_entropy(offset + z @ w.t() + b, labels, reduction="sum") + 0.5 * (w ** 2).sum()
    objective.backward()
    assert w.grad is not None and b.grad is not None
    assert float(w.grad.abs().max()) < 1e-5 and float(b.grad.abs().max()) < 1e-5  # stationary: the optimum
    alone, _ = solve(z, torch.zeros_like(offset), labels, 3)
    assert float(weight.norm()) < 0.5 * float(alone.norm())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_cohort(tmp_path_factory.mktemp("fusion") / "cohort", CohortConfig(n_subjects=14, size=32, seed=7))


def test_the_solution_is_written_into_the_two_layers(cohort: Path) -> None:
    torch.manual_seed(0)
    model = build_demo_base(32, seed=0, use_note=True, note_numbers=True)
    samples = read_manifest(cohort)
    inputs = build_inputs(model, samples, "mri+note")
    rows = list(range(len(samples)))
    fit_note_numbers(model, inputs, rows)
    assert model.note_numbers is not None and inputs.note_numbers is not None
    with torch.no_grad():
        z = model.note_numbers.standardise(inputs.note_numbers).double()
    offset = image_logits_of(model, inputs, rows, 4)
    expected_w, expected_b = solve(z, offset, inputs.labels.long(), 3)
    batch = inputs.batch(rows)
    with torch.no_grad():
        trained = model(batch.volume, **batch.model_kwargs())
    assert trained.fused_logits is not None
    info = refit_note_fusion(model, inputs, rows, batch_size=4)
    assert info is not None and info["scans"] == len(samples) and info["C"] == C
    assert info["train_cross_entropy_before"] == pytest.approx(
        float(functional.cross_entropy(trained.fused_logits.double(), inputs.labels.long())), abs=1e-5)
    assert info["train_cross_entropy_after"] <= info["train_cross_entropy_before"]
    with torch.no_grad():
        out = model(batch.volume, **batch.model_kwargs())
    assert out.fused_logits is not None
    want = offset + z @ expected_w.t() + expected_b
    torch.testing.assert_close(out.fused_logits.double(), want, atol=1e-4, rtol=1e-4)
    assert info["train_cross_entropy_after"] == pytest.approx(
        float(functional.cross_entropy(want, inputs.labels.long())), abs=1e-5)


def test_other_models_are_left_as_they_are(cohort: Path) -> None:
    samples = read_manifest(cohort)
    text_model = build_demo_base(32, seed=0, use_note=True)  # the fusion head reads the text: no numbers
    assert refit_note_fusion(text_model, build_inputs(text_model, samples, "mri+note"), [0, 1]) is None
    numbers_model = build_demo_base(32, seed=0, use_note=True, note_numbers=True)
    mri = build_inputs(numbers_model, samples, "mri")  # no notes read
    before = numbers_model.fusion_head.weight.clone() if numbers_model.fusion_head is not None else None
    assert refit_note_fusion(numbers_model, mri, [0, 1]) is None
    assert before is not None and numbers_model.fusion_head is not None
    assert torch.equal(before, numbers_model.fusion_head.weight)


def test_image_logits_of_no_scans_is_empty(cohort: Path) -> None:
    model = build_demo_base(32, seed=0, use_note=True, note_numbers=True)
    empty = image_logits_of(model, build_inputs(model, read_manifest(cohort), "mri"), [], 4)
    assert empty.shape == (0, 3) and empty.dtype == torch.float64


def test_no_training_note_or_text_read_too_leaves_the_head(cohort: Path) -> None:
    from model.adapter_config import BrainAdapterConfig
    from model.brain_adapter import BrainAdapter
    from model.text import load_text_encoder, packaged_minilm_path
    from model.vit import ViTConfig

    samples = read_manifest(cohort)
    numbers_model = build_demo_base(32, seed=0, use_note=True, note_numbers=True)
    silent = [replace(s, note="") for s in samples]  # notes read, none written
    assert numbers_model.fusion_head is not None
    before = numbers_model.fusion_head.weight.clone()
    assert refit_note_fusion(numbers_model, build_inputs(numbers_model, silent, "mri+note"), [0, 1, 2]) is None
    assert torch.equal(before, numbers_model.fusion_head.weight)

    def model_with(embed_dim: int, note_text: bool) -> BrainAdapter:
        torch.manual_seed(0)
        vit = ViTConfig(img_size=(4, 32, 32), patch_size=(2, 8, 8), hidden_size=32, mlp_dim=64, num_layers=1,
                        num_heads=4)
        config = BrainAdapterConfig(vit=vit, text_encoder_path=str(packaged_minilm_path()), embed_dim=embed_dim,
                                    input_size=(32, 32, 32), adapter_channels=2, max_text_length=64,
                                    text_pooling="mean", note_numbers=True, note_text=note_text)
        return BrainAdapter(config, load_text_encoder(packaged_minilm_path()))

    reads_text = model_with(10, note_text=True)  # the head reads [text, numbers]: not a regression in z alone
    assert refit_note_fusion(reads_text, build_inputs(reads_text, samples, "mri+note"), [0, 1, 2]) is None
    exact_width = model_with(10, note_text=False)  # embed_dim = 2 x 5 numbers: just room for the identity
    assert refit_note_fusion(exact_width, build_inputs(exact_width, samples, "mri+note"), [0, 1, 2]) is not None
    narrow = model_with(8, note_text=False)
    assert refit_note_fusion(narrow, build_inputs(narrow, samples, "mri+note"), [0, 1, 2]) is None


@pytest.mark.parametrize("refit", [True, False])
def test_train_records_the_refit_and_can_leave_it_out(cohort: Path, tmp_path: Path, refit: bool) -> None:
    args = ["train", str(cohort), "--out", str(tmp_path / "run"), "--demo-base", "--note-numbers", "--epochs", "1",
            "--batch-size", "4", "--no-progress", *([] if refit else ["--no-refit-fusion"])]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["config"]["refit_fusion"] is refit
    if refit:
        assert summary["fusion_refit"]["scans"] == summary["split"]["train_scans"]
    else:
        assert summary["fusion_refit"] is None
