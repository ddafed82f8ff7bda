"""Tests of the Brain-Adapter network: adapter, presets, heads, loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter, DepthAdapter
from model.text import TextEncoder, load_text_encoder, packaged_minilm_path
from model.vit import ViTConfig

#: A fast configuration: 64^3 input reduced to 8x64x64, 64 tokens.
FAST_VIT = ViTConfig(img_size=(8, 64, 64), patch_size=(4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=1,
                     num_heads=4)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return load_text_encoder(packaged_minilm_path())


def _config(preset: Preset, use_note: bool) -> BrainAdapterConfig:
    return BrainAdapterConfig(
        vit=FAST_VIT,
        text_encoder_path=str(packaged_minilm_path()) if use_note else "",
        embed_dim=16,
        preset=preset,
        use_note=use_note,
        input_size=(64, 64, 64),
        adapter_channels=2,
    )


def test_untrained_adapter_equals_average_pooling() -> None:
    torch.manual_seed(0)
    adapter = DepthAdapter(factor=8, channels=4)
    x = torch.rand(2, 1, 256, 32, 32)
    expected = functional.avg_pool3d(x, kernel_size=(8, 1, 1))
    assert expected.shape == (2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), expected, rtol=0, atol=0)
        expected_manual = x.reshape(2, 1, 32, 8, 32, 32).mean(dim=3)
        torch.testing.assert_close(adapter(x), expected_manual)


def test_trained_adapter_departs_from_pooling() -> None:
    torch.manual_seed(0)
    adapter = DepthAdapter(factor=8, channels=4)
    last = adapter.branch[-1]
    assert isinstance(last, nn.Conv3d)
    with torch.no_grad():
        last.weight.normal_()
        x = torch.rand(1, 1, 64, 16, 16)
        assert not torch.allclose(adapter(x), functional.avg_pool3d(x, kernel_size=(8, 1, 1)))


def test_full_input_contract_is_256_cubed_to_32x256x256() -> None:
    cfg = BrainAdapterConfig(vit=ViTConfig.small(), use_note=False)
    assert cfg.depth_factor == 8
    model = BrainAdapter(cfg)
    with torch.no_grad():
        assert model.adapter(torch.zeros(1, 1, 256, 256, 256)).shape == (1, 1, 32, 256, 256)


@pytest.mark.parametrize(
    ("preset", "trained"),
    [
        (Preset.FPM, {"image_head", "fusion_head"}),
        (Preset.TLP, {"image_head", "fusion_head", "mm_vision_proj", "mm_language_proj", "logit_scale"}),
        (Preset.BRAIN_ADAPTER,
         {"image_head", "fusion_head", "mm_vision_proj", "mm_language_proj", "logit_scale", "adapter"}),
    ],
)
def test_presets_freeze_towers_and_train_their_parts(
    preset: Preset, trained: set[str], minilm: TextEncoder
) -> None:
    model = BrainAdapter(_config(preset, use_note=True), minilm)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == trained
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert model.language_encoder is not None
    assert not any(p.requires_grad for p in model.language_encoder.parameters())
    assert model.trainable_parameter_count() == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_train_mode_keeps_frozen_towers_in_eval(minilm: TextEncoder) -> None:
    model = BrainAdapter(_config(Preset.BRAIN_ADAPTER, use_note=True), minilm).train()
    assert model.adapter.training
    assert not model.vision_encoder.training
    assert model.language_encoder is not None and not model.language_encoder.training


def test_loss_reaches_adapter_through_frozen_vit(minilm: TextEncoder) -> None:
    torch.manual_seed(0)
    model = BrainAdapter(_config(Preset.BRAIN_ADAPTER, use_note=True), minilm).train()
    volume = torch.rand(3, 1, 64, 64, 64)
    tokens = model.tokenize(["memory complaints", "", "normal cognition reported"])
    note_mask = torch.tensor([True, False, True])
    out = model(volume, tokens["input_ids"], tokens["attention_mask"], note_mask)
    assert out.fused_logits is not None
    torch.testing.assert_close(out.logits[1], out.image_logits[1])
    torch.testing.assert_close(out.logits[0], out.fused_logits[0])
    loss = model.loss(out, torch.tensor([0, 1, 2]))
    loss.backward()
    last = model.adapter.branch[-1]
    assert isinstance(last, nn.Conv3d)
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert model.logit_scale.grad is not None
    assert all(p.grad is None for p in model.vision_encoder.parameters())


def test_image_only_forward_has_no_note(minilm: TextEncoder) -> None:
    model = BrainAdapter(_config(Preset.TLP, use_note=True), minilm).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64, 64))
    assert out.fused_logits is None and out.text_embeds is None
    assert not out.note_mask.any()
    torch.testing.assert_close(out.logits, out.image_logits)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))


def test_model_without_text_tower() -> None:
    model = BrainAdapter(_config(Preset.BRAIN_ADAPTER, use_note=False))
    assert model.language_encoder is None and model.fusion_head is None
    with pytest.raises(RuntimeError, match="no text encoder"):
        model.tokenize(["a note"])
    out = model(torch.rand(2, 1, 64, 64, 64))
    loss = model.loss(out, torch.tensor([0, 2]))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_contrastive_loss_multiplies_logit_scale_directly() -> None:
    model = BrainAdapter(_config(Preset.TLP, use_note=False))
    img = functional.normalize(torch.randn(4, 16), dim=-1)
    txt = functional.normalize(torch.randn(4, 16), dim=-1)
    logits = model.logit_scale.detach() * img @ txt.t()
    target = torch.arange(4)
    expected = (functional.cross_entropy(logits, target) + functional.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(model.contrastive_loss(img, txt), expected)
    torch.testing.assert_close(model.logit_scale.detach(), torch.tensor(2.6592600))


def test_config_roundtrip_and_validation() -> None:
    cfg = _config(Preset.TLP, use_note=True)
    assert BrainAdapterConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="must reduce along D only"):
        BrainAdapterConfig(vit=FAST_VIT, use_note=False, input_size=(64, 32, 64))
    with pytest.raises(ValueError, match="needs a text_encoder_path"):
        BrainAdapterConfig(vit=ViTConfig.small(), use_note=True)


def test_mean_pooling_averages_the_note_tokens_and_ignores_padding(minilm: TextEncoder) -> None:
    config = BrainAdapterConfig(**{**_config(Preset.BRAIN_ADAPTER, True).__dict__, "text_pooling": "mean"})
    model = BrainAdapter(config, minilm).eval()
    note = "72-year-old woman. MMSE 24/30, CDR-SB 3.5."
    tokens = model.tokenize([note, note + " Frequent memory complaints, reported by the spouse."])
    assert bool((tokens["attention_mask"][0] == 0).any())  # the short note is padded
    with torch.no_grad():
        pooled = model.text_hidden(tokens["input_ids"], tokens["attention_mask"])
        alone = model.tokenize([note])
        states = minilm.model(**alone).last_hidden_state[0]
        single = model.text_hidden(alone["input_ids"], alone["attention_mask"])
    torch.testing.assert_close(pooled[0], states.mean(0), atol=1e-5, rtol=1e-5)  # every token, CLS and SEP too
    torch.testing.assert_close(pooled[0], single[0], atol=1e-5, rtol=1e-5)


def test_cls_pooling_is_the_first_token_and_the_default_of_saved_configurations(minilm: TextEncoder) -> None:
    config = _config(Preset.BRAIN_ADAPTER, True)
    saved = config.to_dict()
    del saved["text_pooling"]  # a model directory written before the field existed
    assert BrainAdapterConfig.from_dict(saved).text_pooling == "cls"
    model = BrainAdapter(config, minilm).eval()
    tokens = model.tokenize(["MMSE 29/30."])
    with torch.no_grad():
        first = minilm.model(**tokens).last_hidden_state[:, 0]
        torch.testing.assert_close(model.text_hidden(tokens["input_ids"], tokens["attention_mask"]), first)
    with pytest.raises(ValueError, match="text_pooling"):
        BrainAdapterConfig(**{**config.__dict__, "text_pooling": "max"})
