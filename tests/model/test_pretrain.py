"""Tests of the self-supervised pretraining of the demonstration base's vision side (model.pretrain)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model.augment import AnatomySampler, AugmentConfig
from model.cohort import CohortConfig, anatomy, generate_cohort, subject_volume
from model.demo import (
    PRETRAIN_INFO_FILE,
    BaseSpec,
    build_demo_base,
    load_vision_file,
    state_sha256,
    tensors_sha256,
    vision_state,
)
from model.errors import ModelInputError, ModelLoadError
from model.evaluate import load_run
from model.inference import Predictor, init_trained_demo_model
from model.initialise import whiten
from model.pretrain import VISION_FILE, PretrainConfig, nt_xent, pretrain
from model.train import TrainConfig, export_demo, train
from model.vit import TransformerBlock

NO_AUGMENT = AugmentConfig(rotation_deg=0.0, scale=0.0, shift=0.0, bias=0.0, gamma=0.0, noise=(0.0, 0.0))
TINY = PretrainConfig(size=32, steps=3, batch_size=4, warmup=1, threads=1, seed=7)


@pytest.fixture(scope="module")
def anat32():
    return anatomy("mni152", 32)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain")
    pretrain(TINY, out, model=build_demo_base(32, seed=0, use_note=False))
    return out


def test_without_acquisition_changes_a_healthy_view_is_the_reference(anat32) -> None:
    sampler = AnatomySampler(anat32, NO_AUGMENT, torch.Generator().manual_seed(0))
    view = sampler.views(torch.zeros(1), torch.zeros(1))[0, 0].numpy()
    expected = anat32.reference / anat32.reference.max()
    np.testing.assert_allclose(view, expected, atol=1e-5)


class _NoNuisance:
    """A numpy Generator stand-in whose draws are the distributions' centres: no pose, bias or noise."""

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None):
        return loc if size is None else np.full(size, loc)

    def uniform(self, low: float = 0.0, high: float = 1.0, size: int | None = None) -> float:
        return low


def test_the_sampler_draws_the_cohorts_anatomy(anat32) -> None:
    # the cohort's own generator, its acquisition switched off, against the sampler's, likewise
    expected = subject_volume(anat32, 0.5, 0.4, _NoNuisance())  # type: ignore[arg-type]
    sampler = AnatomySampler(anat32, NO_AUGMENT, torch.Generator().manual_seed(0))
    view = sampler.views(torch.tensor([0.5]), torch.tensor([0.4]))[0, 0].numpy()
    np.testing.assert_allclose(view, expected, atol=1e-4)
    assert float(np.abs(expected - anat32.reference / anat32.reference.max()).max()) > 0.1  # atrophy is visible


def test_ventricle_enlargement_darkens_the_ventricles_and_hippocampal_loss_the_temporal_lobes(anat32) -> None:
    sampler = AnatomySampler(anat32, NO_AUGMENT, torch.Generator().manual_seed(0))
    views = sampler.views(torch.tensor([0.0, 0.7, 0.0]), torch.tensor([0.0, 0.0, 0.6]))[:, 0].numpy()
    grid = np.indices(views.shape[1:])

    def ball(site: str) -> np.ndarray:
        centre, radius = anat32.sites[site][:3], anat32.sites[site][3]
        return ((grid - centre[:, None, None, None]) ** 2).sum(0) <= radius ** 2

    ventricles = ball("ventricle_left") | ball("ventricle_right")
    hippocampi = ball("hippocampus_left") | ball("hippocampus_right")
    healthy, enlarged, shrunk = views
    assert enlarged[ventricles].mean() < healthy[ventricles].mean() - 0.02
    assert shrunk[hippocampi].mean() < healthy[hippocampi].mean() - 0.02
    # each change stays where it belongs: far from both, the volumes agree
    far = ~(ventricles | hippocampi | ball("mtl_left") | ball("mtl_right"))
    assert abs(enlarged[far].mean() - healthy[far].mean()) < 0.02


def test_two_acquisitions_of_one_anatomy_differ_and_stay_in_range(anat32) -> None:
    sampler = AnatomySampler(anat32, AugmentConfig(), torch.Generator().manual_seed(3))
    ventricle, hippocampus = sampler.anatomies(2)
    views = sampler.views(ventricle, hippocampus, copies=2)
    assert views.shape == (4, 1, 32, 32, 32)
    assert float(views.min()) >= 0.0 and math.isclose(float(views.amax(dim=(1, 2, 3, 4)).min()), 1.0, rel_tol=1e-5)
    assert float((views[0] - views[2]).abs().mean()) > 1e-3  # acquisition 1 vs 2 of anatomy 0


def test_nt_xent_is_log_of_the_other_views_when_everything_looks_alike() -> None:
    z = torch.ones(5, 8)
    assert math.isclose(float(nt_xent(z, z, 0.2)), math.log(9), rel_tol=1e-6)
    # orthogonal samples, identical views: partner at cosine 1, the 8 others at 0
    distinct = torch.eye(5, 8) * 10
    assert math.isclose(float(nt_xent(distinct, distinct, 0.2)), math.log(1 + 8 * math.exp(-1 / 0.2)), rel_tol=1e-5)


def test_pretraining_changes_only_the_vision_side_and_is_reproducible(pretrained: Path, tmp_path: Path) -> None:
    info = json.loads((pretrained / PRETRAIN_INFO_FILE).read_text())
    state = load_file(str(pretrained / VISION_FILE))
    assert info["vision_sha256"] == tensors_sha256(state)
    assert set(info["probe"]) == {"ventricle_r2", "hippocampus_r2"}
    assert all(k.startswith(("adapter.", "vision_encoder.")) for k in state)
    seeded = build_demo_base(32, seed=0, use_note=False)
    before = vision_state(seeded)
    assert any(not torch.equal(before[k], state[k]) for k in state if k.startswith("vision_encoder."))
    # the adapter is not pretrained by default: it stays the plain depth reduction
    assert all(torch.equal(before[k], state[k]) for k in state if k.startswith("adapter."))
    again = tmp_path / "again"
    pretrain(TINY, again, model=build_demo_base(32, seed=0, use_note=False))
    assert json.loads((again / PRETRAIN_INFO_FILE).read_text())["vision_sha256"] == info["vision_sha256"]


def test_a_pretrained_vision_file_loads_into_a_fresh_base_and_changes_its_hash(pretrained: Path) -> None:
    model = build_demo_base(32, seed=0, use_note=False)
    seeded_sha = state_sha256(model)
    digest = load_vision_file(model, pretrained / VISION_FILE)
    assert state_sha256(model) != seeded_sha
    assert digest == json.loads((pretrained / PRETRAIN_INFO_FILE).read_text())["vision_sha256"]
    with pytest.raises(ModelLoadError, match="expected"):
        load_vision_file(build_demo_base(32, seed=0, use_note=False), pretrained / VISION_FILE,
                         expected_sha256="0" * 64)


def test_a_vision_file_of_another_size_is_refused(pretrained: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_vision_file(build_demo_base(64, seed=0, use_note=False), pretrained / VISION_FILE)
    with pytest.raises(ModelLoadError, match="no pretrained vision file"):
        load_vision_file(build_demo_base(32, seed=0, use_note=False), tmp_path / "missing.safetensors")


def test_bad_recipes_are_refused() -> None:
    with pytest.raises(ModelInputError, match="batch_size"):
        PretrainConfig(batch_size=1)
    with pytest.raises(ModelInputError, match="multiple of 32"):
        PretrainConfig(size=48)


def test_whitening_makes_the_projection_outputs_uncorrelated_with_unit_variance() -> None:
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + 3.0).float()
    proj = torch.nn.Linear(12, 6)
    with torch.no_grad():
        whiten(proj, feats)
        out = proj(feats).double().numpy()
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(6), atol=1e-3)
    # ordered by the variance they carry: the first output is the top principal component
    top = np.linalg.svd(feats.double().numpy() - feats.double().numpy().mean(0), full_matrices=False)[2][0]
    direction = proj.weight[0].detach().double().numpy()
    assert abs(float(direction @ top) / float(np.linalg.norm(direction))) == pytest.approx(1.0, abs=1e-4)


def test_whitening_with_fewer_samples_than_outputs_standardises_the_rest() -> None:
    feats = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    proj = torch.nn.Linear(10, 8)
    with torch.no_grad():
        whiten(proj, feats)
        out = proj(feats)
    torch.testing.assert_close(out.std(0), torch.ones(8), atol=1e-4, rtol=0)


def test_a_spec_written_before_pooling_and_pretraining_reads_as_it_was_trained() -> None:
    old = {"kind": "demo", "size": 64, "seed": 0, "use_note": True, "path": ""}
    spec = BaseSpec.from_dict(old)
    assert (spec.text_pooling, spec.vision, spec.vision_sha256) == ("cls", "", "")
    assert BaseSpec.from_dict(spec.to_dict()) == spec


def test_a_pretrained_vision_file_needs_the_demonstration_base(tmp_path: Path) -> None:
    with pytest.raises(ModelInputError, match="belongs to the demonstration base"):
        TrainConfig(manifest="m.csv", out_dir=str(tmp_path), base=str(tmp_path), demo_vision="vision.safetensors")


def test_train_on_the_pretrained_base_export_it_and_serve_it(pretrained: Path, tmp_path: Path) -> None:
    manifest = generate_cohort(tmp_path / "cohort", CohortConfig(n_subjects=14, size=32, seed=5))
    run = train(TrainConfig(manifest=str(manifest), out_dir=str(tmp_path / "run"), demo_base=True,
                            demo_vision=str(pretrained / VISION_FILE), epochs=1, batch_size=4, progress=False))
    summary = json.loads((run / "run.json").read_text())
    vision_sha = json.loads((pretrained / PRETRAIN_INFO_FILE).read_text())["vision_sha256"]
    assert summary["base"]["vision_sha256"] == vision_sha and summary["base"]["text_pooling"] == "mean"
    model, _ = load_run(run)  # rebuilt from the spec: the pretrained ViT, not the seeded one
    state = load_file(str(pretrained / VISION_FILE))
    first_block = cast(TransformerBlock, model.vision_encoder.blocks[0])
    assert torch.equal(first_block.attn.qkv.weight, state["vision_encoder.blocks.0.attn.qkv.weight"])
    assert model.config.text_pooling == "mean"

    demo = export_demo(run, tmp_path / "demo")
    info = json.loads((demo / "demo.json").read_text())
    assert info["base"]["vision"] == VISION_FILE and (demo / VISION_FILE).read_bytes() == (
        pretrained / VISION_FILE).read_bytes()
    assert (demo / PRETRAIN_INFO_FILE).is_file()
    predictor = Predictor.load(init_trained_demo_model(tmp_path / "served", demo))
    assert predictor.config.input_size == (256, 256, 256) and predictor.config.text_pooling == "mean"
    assert "pretrained" in predictor.info.version

    # another pretraining in its place: the parts were not trained on it, loading fails
    other = tmp_path / "other"
    pretrain(PretrainConfig(**{**TINY.__dict__, "seed": 8}), other, model=build_demo_base(32, seed=0, use_note=False))
    (demo / VISION_FILE).write_bytes((other / VISION_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="expected"):
        init_trained_demo_model(tmp_path / "served2", demo)
