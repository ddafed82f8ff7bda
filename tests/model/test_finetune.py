"""Tests of the trainable-part declaration, LoRA (peft) and adapter files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter
from model.errors import ModelLoadError
from model.finetune import (
    apply_lora,
    load_adapter_file,
    lora_config,
    merge_lora,
    save_adapter_file,
    trainable_parameter_counts,
    trainable_state,
)
from model.vit import ViTConfig

FAST = BrainAdapterConfig(
    vit=ViTConfig(img_size=(8, 64, 64), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4),
    embed_dim=16,
    use_note=False,
    input_size=(64, 64, 64),
    adapter_channels=2,
)
BASE_SHA = "a" * 64


def _model(seed: int = 0) -> BrainAdapter:
    torch.manual_seed(seed)
    return BrainAdapter(FAST)


def test_trainable_counts_grow_with_presets() -> None:
    counts = trainable_parameter_counts(FAST, None)
    assert counts["FPM"] < counts["TLP"] < counts["BRAIN_ADAPTER"]
    full = trainable_parameter_counts(BrainAdapterConfig(vit=ViTConfig.m3d(), use_note=False), None)
    # image head 768*3+3; TLP adds mm_vision_proj 768*768+768 and logit_scale.
    assert full["FPM"] == 2307
    assert full["TLP"] == 2307 + 590_592 + 1
    assert full["BRAIN_ADAPTER"] < 10_000_000


def test_plain_adapter_file_roundtrip_and_base_check(tmp_path: Path) -> None:
    trained = _model(0)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.5)
    path = save_adapter_file(trained, tmp_path / "adapter.safetensors", base_weights_sha256=BASE_SHA,
                             preset=Preset.BRAIN_ADAPTER)
    fresh = _model(0)
    load_adapter_file(fresh, path, base_weights_sha256=BASE_SHA)
    for name, tensor in trainable_state(trained).items():
        assert torch.equal(trainable_state(fresh)[name], tensor)
    with pytest.raises(ModelLoadError, match=r"was trained on base weights 'a{64}', not on the loaded base 'b{64}'"):
        load_adapter_file(_model(0), path, base_weights_sha256="b" * 64)
    other = BrainAdapter(replace(FAST, preset=Preset.TLP))
    with pytest.raises(ModelLoadError, match="does not match the model's trainable parameters"):
        load_adapter_file(other, path, base_weights_sha256=BASE_SHA)


def test_lora_declares_modules_to_save_and_merges_back(tmp_path: Path) -> None:
    model = _model(0)
    config = lora_config(model, rank=4)
    assert set(config.modules_to_save) == {"image_head", "mm_vision_proj", "adapter"}
    wrapped = apply_lora(model, rank=4)
    names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert any("lora_A" in n and "attn.qkv" in n for n in names)
    assert any(n.endswith("logit_scale") for n in names)
    assert not any("linear1" in n for n in names)
    volume = torch.rand(2, 1, 64, 64, 64)
    out = wrapped(volume)
    model.loss(out, torch.tensor([0, 1])).backward()
    lora_b = dict(wrapped.named_parameters())["base_model.model.vision_encoder.blocks.0.attn.qkv.lora_B.default.weight"]
    assert lora_b.grad is not None
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
        expected = wrapped(volume).logits
    path = save_adapter_file(wrapped, tmp_path / "lora.safetensors", base_weights_sha256=BASE_SHA,
                             preset=Preset.BRAIN_ADAPTER)
    again = apply_lora(_model(0), rank=4)
    load_adapter_file(again, path, base_weights_sha256=BASE_SHA)
    with torch.no_grad():
        torch.testing.assert_close(again(volume).logits, expected)
    merged = merge_lora(wrapped)
    plain = _model(1)
    plain.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(volume).logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rank must be positive"):
        lora_config(plain, rank=0)
