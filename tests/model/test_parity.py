"""Numerical parity of :class:`model.vit.ViT3D` with MONAI 1.3's ViT (M3D-CLIP's encoder).

MONAI 1.3.x and einops are test-only dependencies, usually in a separate virtual
environment (they pin numpy < 2); the test skips where they are not importable.
MONAI 1.4+ changed these classes, so other versions are skipped too.
"""

from __future__ import annotations

import pytest
import torch

from model.vit import ViT3D, ViTConfig

monai = pytest.importorskip("monai", reason="MONAI 1.3.x (test-only parity dependency) is not installed")
if not monai.__version__.startswith("1.3."):
    pytest.skip(f"parity needs MONAI 1.3.x, found {monai.__version__}", allow_module_level=True)
pytest.importorskip("einops", reason="einops (needed by MONAI's ViT) is not installed")

TOLERANCE = 1e-5


def _monai_vit(cfg: ViTConfig) -> torch.nn.Module:
    from monai.networks.nets import ViT

    net = ViT(
        in_channels=cfg.in_channels,
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        proj_type="perceptron",
        classification=True,
        qkv_bias=False,
        dropout_rate=0.0,
    )
    # M3D-CLIP's copy of this class has no classification head; without it MONAI
    # returns the final-LayerNorm'ed sequence.
    del net.classification_head
    return net.eval()


@pytest.mark.parametrize("cfg", [ViTConfig.small(), ViTConfig.m3d()], ids=["small", "m3d-full"])
def test_vit_matches_monai_1_3(cfg: ViTConfig) -> None:
    torch.manual_seed(0)
    ours = ViT3D(cfg).eval()
    with torch.no_grad():  # make the CLS token and norms non-trivial
        ours.cls_token.normal_(std=0.02)
        ours.norm.weight.uniform_(0.5, 1.5)
    reference = _monai_vit(cfg)
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert set(reference.state_dict()) == set(ours.state_dict())
    x = torch.rand(1, 1, *cfg.img_size)
    with torch.no_grad():
        expected, _ = reference(x)
        got = ours(x)
    diff = (got - expected).abs().max().item()
    print(f"parity {cfg.hidden_size}x{cfg.num_layers}: max abs diff {diff:.3e}")
    assert got.shape == expected.shape == (1, 1 + cfg.n_patches, cfg.hidden_size)
    assert diff < TOLERANCE
