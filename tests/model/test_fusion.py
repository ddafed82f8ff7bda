"""The numbers-only late fusion solved exactly after training (model.fusion)."""

from __future__ import annotations

import json
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


def _data(n: int = 90, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    z = rng.normal(0.0, 1.0, (n, 4)) + np.eye(3, 4)[labels] * 1.5
    return torch.tensor(z), torch.tensor(labels)


def test_without_offset_it_is_scikit_learns_logistic_regression() -> None:
    z, labels = _data()
    weight, bias = solve(z, torch.zeros(len(z), 3, dtype=torch.float64), labels, 3)
    reference = LogisticRegression(C=C, tol=1e-10, max_iter=10_000).fit(z.numpy(), labels.numpy())
    np.testing.assert_allclose(weight.numpy(), reference.coef_, atol=1e-4)
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
    info = refit_note_fusion(model, inputs, rows, batch_size=4)
    assert info is not None and info["scans"] == len(samples) and info["C"] == C
    assert info["train_cross_entropy_after"] <= info["train_cross_entropy_before"]
    batch = inputs.batch(rows)
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
