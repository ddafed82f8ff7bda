"""Native 3D Vision Transformer, key-for-key and numerically M3D-CLIP's vision encoder.

The module reproduces MONAI 1.3's ``ViT(proj_type="perceptron", classification=True,
qkv_bias=False)`` without its classification head, which is the architecture of
M3D-CLIP's ``vision_encoder``.  State-dict keys are exactly those of the
published checkpoint (``cls_token``, ``patch_embedding.position_embeddings``,
``patch_embedding.patch_embeddings.1.weight``, ``blocks.{i}.attn.qkv.weight``, ...),
so a checkpoint loads with ``strict=True``.

Differences to MONAI are purely computational: the patch rearrangement is a
reshape/permute instead of ``einops``, and attention uses
:func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViTConfig:
    """Sizes of the 3D ViT.

    Parameters
    ----------
    img_size : tuple of int
        Input volume size (D, H, W); D is the slice axis.
    patch_size : tuple of int
        Patch size (pD, pH, pW); each must divide the matching ``img_size``.
    in_channels : int
        Number of input channels.
    hidden_size : int
        Token width.
    mlp_dim : int
        Hidden width of each block's MLP.
    num_layers : int
        Number of transformer blocks.
    num_heads : int
        Attention heads; must divide ``hidden_size``.
    layer_norm_eps : float
        Epsilon of every LayerNorm.
    gradient_checkpointing : bool
        Recompute block activations in the backward pass (training memory);
        has no effect on results or in inference.
    """

    img_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    in_channels: int = 1
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-5
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        """Validate the sizes.

        Raises
        ------
        ValueError
            When a patch does not tile the image or heads do not divide the width.
        """
        if len(self.img_size) != 3 or len(self.patch_size) != 3:
            raise ValueError("img_size and patch_size must have three entries (D, H, W)")
        for im, p in zip(self.img_size, self.patch_size, strict=True):
            if p <= 0 or im % p != 0:
                raise ValueError(f"patch_size {self.patch_size} must tile img_size {self.img_size}")
        if self.hidden_size % self.num_heads != 0:
            raise ValueError("hidden_size must be divisible by num_heads")

    @classmethod
    def m3d(cls) -> ViTConfig:
        """Return the published M3D-CLIP ViT-B configuration (87,389,184 parameters)."""
        return cls()

    @classmethod
    def small(cls) -> ViTConfig:
        """Return a small configuration with the same input contract (32x256x256).

        Used by tests and by the demonstration model: 256 tokens of 8x32x32 voxels,
        width 64, two blocks.
        """
        return cls(patch_size=(8, 32, 32), hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Number of patches along (D, H, W)."""
        d, h, w = (i // p for i, p in zip(self.img_size, self.patch_size, strict=True))
        return d, h, w

    @property
    def n_patches(self) -> int:
        """Number of patch tokens (the CLS token excluded)."""
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """Number of values in one flattened patch."""
        return self.in_channels * math.prod(self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary of the configuration."""
        d = asdict(self)
        d["img_size"] = list(self.img_size)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ViTConfig:
        """Build a configuration from :meth:`to_dict`'s output.

        Parameters
        ----------
        data : Mapping
            Keys as the dataclass fields.

        Returns
        -------
        ViTConfig
            The configuration.
        """
        values = dict(data)
        img = values.pop("img_size", cls.img_size)
        patch = values.pop("patch_size", cls.patch_size)
        return cls(img_size=tuple(int(v) for v in img),  # type: ignore[arg-type]
                   patch_size=tuple(int(v) for v in patch),  # type: ignore[arg-type]
                   **values)


class PatchRearrange(nn.Module):
    """Cut (B, C, D, H, W) into raster-ordered patches flattened as (pD, pH, pW, C).

    Equivalent to einops ``"b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)"``;
    it has no parameters (index 0 of MONAI's ``patch_embeddings`` Sequential).

    Parameters
    ----------
    patch_size : tuple of int
        Patch size (pD, pH, pW).
    """

    def __init__(self, patch_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rearrange a volume batch into patch vectors.

        Parameters
        ----------
        x : torch.Tensor
            (B, C, D, H, W).

        Returns
        -------
        torch.Tensor
            (B, n_patches, pD * pH * pW * C).
        """
        b, c, d, h, w = x.shape
        p1, p2, p3 = self.patch_size
        x = x.reshape(b, c, d // p1, p1, h // p2, p2, w // p3, p3)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, (d // p1) * (h // p2) * (w // p3), p1 * p2 * p3 * c)


class PatchEmbedding(nn.Module):
    """Perceptron patch embedding plus learned position embedding.

    Parameters
    ----------
    config : ViTConfig
        Sizes.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.patch_embeddings = nn.Sequential(
            PatchRearrange(config.patch_size), nn.Linear(config.patch_dim, config.hidden_size)
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.n_patches, config.hidden_size))
        nn.init.trunc_normal_(self.position_embeddings, mean=0.0, std=0.02, a=-2.0, b=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed patches.

        Parameters
        ----------
        x : torch.Tensor
            (B, C, D, H, W).

        Returns
        -------
        torch.Tensor
            (B, n_patches, hidden).
        """
        return self.patch_embeddings(x) + self.position_embeddings


class SelfAttention(nn.Module):
    """Multi-head self-attention with a bias-free qkv projection.

    Parameters
    ----------
    hidden_size : int
        Token width.
    num_heads : int
        Number of heads.
    """

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.qkv = nn.Linear(hidden_size, hidden_size * 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend.

        Parameters
        ----------
        x : torch.Tensor
            (B, N, hidden).

        Returns
        -------
        torch.Tensor
            (B, N, hidden).
        """
        b, n, c = x.shape
        # qkv output is laid out as (qkv, head, head_dim), as MONAI's rearrange reads it.
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    """Two-layer MLP with exact GELU (keys ``linear1``/``linear2``).

    Parameters
    ----------
    hidden_size : int
        Token width.
    mlp_dim : int
        Inner width.
    """

    def __init__(self, hidden_size: int, mlp_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(hidden_size, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, hidden_size)
        self.fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP.

        Parameters
        ----------
        x : torch.Tensor
            (..., hidden).

        Returns
        -------
        torch.Tensor
            (..., hidden).
        """
        return self.linear2(self.fn(self.linear1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block.

    Parameters
    ----------
    config : ViTConfig
        Sizes.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.mlp = MLP(config.hidden_size, config.mlp_dim)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config.hidden_size, config.num_heads)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x : torch.Tensor
            (B, N, hidden).

        Returns
        -------
        torch.Tensor
            (B, N, hidden).
        """
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """M3D-CLIP's 3D ViT encoder.

    Parameters
    ----------
    config : ViTConfig
        Sizes; :meth:`ViTConfig.m3d` for the published encoder.

    Notes
    -----
    The output is the final-LayerNorm'ed token sequence (B, 1 + n_patches, hidden),
    CLS token first.  M3D-CLIP uses token 0 as the image feature.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = PatchEmbedding(config)
        self.blocks = nn.ModuleList([TransformerBlock(config) for _ in range(config.num_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode a volume batch.

        Parameters
        ----------
        x : torch.Tensor
            (B, in_channels, D, H, W) matching ``config.img_size``.

        Returns
        -------
        torch.Tensor
            (B, 1 + n_patches, hidden), CLS token first.

        Raises
        ------
        ValueError
            When the input shape does not match the configuration.
        """
        expected = (self.config.in_channels, *self.config.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ViT3D expects (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        x = self.patch_embedding(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        use_ckpt = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return self.norm(x)


def _init_weights(m: nn.Module) -> None:
    """Initialise as MONAI does (truncated normal linear weights, zero biases, unit norms)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, mean=0.0, std=0.02, a=-2.0, b=2.0)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)
