"""Tests of the native 3D ViT (M3D-CLIP vision encoder)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.vit import PatchRearrange, SelfAttention, ViT3D, ViTConfig

TINY = ViTConfig(img_size=(8, 32, 32), patch_size=(4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=2, num_heads=4)


def _published_vision_keys(num_layers: int) -> set[str]:
    keys = {
        "cls_token",
        "patch_embedding.position_embeddings",
        "patch_embedding.patch_embeddings.1.weight",
        "patch_embedding.patch_embeddings.1.bias",
        "norm.weight",
        "norm.bias",
    }
    for i in range(num_layers):
        keys |= {
            f"blocks.{i}.norm1.weight",
            f"blocks.{i}.norm1.bias",
            f"blocks.{i}.attn.qkv.weight",
            f"blocks.{i}.attn.out_proj.weight",
            f"blocks.{i}.attn.out_proj.bias",
            f"blocks.{i}.norm2.weight",
            f"blocks.{i}.norm2.bias",
            f"blocks.{i}.mlp.linear1.weight",
            f"blocks.{i}.mlp.linear1.bias",
            f"blocks.{i}.mlp.linear2.weight",
            f"blocks.{i}.mlp.linear2.bias",
        }
    return keys


def test_full_config_matches_published_keys_shapes_and_count() -> None:
    with torch.device("meta"):
        vit = ViT3D(ViTConfig.m3d())
    state = vit.state_dict()
    assert set(state) == _published_vision_keys(12)
    assert sum(t.numel() for t in state.values()) == 87_389_184
    assert state["patch_embedding.patch_embeddings.1.weight"].shape == (768, 1024)
    assert state["patch_embedding.position_embeddings"].shape == (1, 2048, 768)
    assert state["blocks.0.attn.qkv.weight"].shape == (2304, 768)
    assert state["cls_token"].shape == (1, 1, 768)


def test_small_config_keeps_input_contract() -> None:
    cfg = ViTConfig.small()
    assert cfg.img_size == (32, 256, 256)
    vit = ViT3D(cfg).eval()
    with torch.no_grad():
        out = vit(torch.rand(1, 1, 32, 256, 256))
    assert out.shape == (1, 1 + cfg.n_patches, cfg.hidden_size)


def test_patch_rearrange_is_raster_order_depth_slowest() -> None:
    x = torch.randn(2, 1, 8, 32, 32)
    patches = PatchRearrange((4, 16, 16))(x)
    assert patches.shape == (2, 8, 1024)
    index = 0
    for d in range(2):
        for h in range(2):
            for w in range(2):
                block = x[:, 0, d * 4:(d + 1) * 4, h * 16:(h + 1) * 16, w * 16:(w + 1) * 16]
                torch.testing.assert_close(patches[:, index], block.reshape(2, -1), rtol=0, atol=0)
                index += 1


def test_attention_matches_explicit_softmax() -> None:
    torch.manual_seed(0)
    attn = SelfAttention(32, 4).eval()
    x = torch.randn(2, 9, 32)
    q, k, v = attn.qkv(x).reshape(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) * 8**-0.5).softmax(dim=-1)
    expected = attn.out_proj((weights @ v).transpose(1, 2).reshape(2, 9, 32))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected, rtol=1e-5, atol=1e-6)


def test_cls_token_first_without_position_embedding() -> None:
    torch.manual_seed(0)
    vit = ViT3D(TINY).eval()
    x = torch.rand(1, 1, 8, 32, 32)
    with torch.no_grad():
        vit.cls_token.normal_()
        vit.patch_embedding.position_embeddings.normal_()
        seq = torch.cat((vit.cls_token, vit.patch_embedding(x)), dim=1)
        for blk in vit.blocks:
            seq = blk(seq)
        torch.testing.assert_close(vit(x), vit.norm(seq))


def test_gradient_checkpointing_gives_same_gradients() -> None:
    torch.manual_seed(0)
    plain = ViT3D(TINY)
    ckpt = ViT3D(replace(TINY, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 8, 32, 32)
    plain(x)[:, 0].sum().backward()
    ckpt.train()(x)[:, 0].sum().backward()
    w1 = dict(plain.named_parameters())["blocks.0.attn.qkv.weight"].grad
    w2 = dict(ckpt.named_parameters())["blocks.0.attn.qkv.weight"].grad
    assert w1 is not None and w2 is not None
    torch.testing.assert_close(w1, w2)


def test_wrong_input_shape_is_refused() -> None:
    vit = ViT3D(TINY)
    with pytest.raises(ValueError, match=r"ViT3D expects \(B, 1, 8, 32, 32\)"):
        vit(torch.rand(1, 1, 8, 32, 16))


def test_config_validation_and_roundtrip() -> None:
    with pytest.raises(ValueError, match="must tile"):
        ViTConfig(img_size=(30, 256, 256))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ViTConfig(hidden_size=100, num_heads=12)
    assert ViTConfig.from_dict(ViTConfig.small().to_dict()) == ViTConfig.small()
