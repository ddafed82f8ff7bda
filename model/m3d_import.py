"""``dicom-node model import-m3d-clip``: the published M3D-CLIP folder made into a training base.

The published folder (``GoodBaiBai88/M3D-CLIP`` on Hugging Face, written by M3D's
``train_CLIP.py`` with ``save_pretrained``) holds ``config.json`` (an
``M3DCLIPConfig``: ``model_type`` ``m3d_clip``, the ViT's ``img_size``,
``patch_size``, ``hidden_size``, ``mlp_dim``, ``num_layers``, ``num_heads``,
``pos_embed``, ...), the weights (``model.safetensors`` or ``pytorch_model.bin``)
and bert-base-uncased's tokenizer files.  Its text tower is bert-base-uncased,
whose configuration the folder does not hold (M3D loads it by name); pass
``text_config`` for another BERT.

:func:`import_m3d_clip` builds M3D-CLIP from that configuration, loads the weights
strictly (:func:`model.m3d_clip.clip_from_state`: every key, every shape, the
offending names in the error), and writes a model directory
(:mod:`model.checkpoint`) that ``dicom-node train --base`` and the node load: the
towers, projections and ``logit_scale`` transferred into a Brain-Adapter whose
adapter and heads are seeded and untrained.  The manifest's ``source`` records the
folder, its configuration and the SHA-256 of every file in it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from model.adapter_config import Preset
from model.checkpoint import load_weights, sha256_file
from model.errors import ModelLoadError
from model.m3d_clip import base_from_clip, bert_base_uncased_config, clip_from_state
from model.text import force_offline
from model.vit import ViTConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
#: Weights files of the published layout, in order of preference.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
#: ``M3DCLIPConfig`` defaults (M3D's ``LaMed/src/model/CLIP.py``) for keys a config.json may omit.
M3D_DEFAULTS: dict[str, Any] = {
    "in_channels": 1, "img_size": [32, 256, 256], "patch_size": [4, 16, 16], "hidden_size": 768,
    "mlp_dim": 3072, "num_layers": 12, "num_heads": 12, "pos_embed": "perceptron", "spatial_dims": 3,
}


def read_m3d_config(src: Path) -> tuple[ViTConfig, dict[str, Any]]:
    """Read an M3D-CLIP ``config.json`` and return the vision tower's sizes.

    Parameters
    ----------
    src : Path
        The M3D-CLIP folder.

    Returns
    -------
    tuple
        ``(vit_config, config)``: our :class:`ViTConfig` and the file's contents.

    Raises
    ------
    ModelLoadError
        When the file is missing, unreadable, of another model type, or describes a
        ViT other than M3D's (a ``pos_embed`` other than ``perceptron``, not 3D).
    """
    path = Path(src) / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(f"{src} is not an M3D-CLIP folder: no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("model_type", "m3d_clip") != "m3d_clip":
        kind = data.get("model_type") if isinstance(data, dict) else type(data).__name__
        raise ModelLoadError(f"{path} is not an M3D-CLIP configuration (model_type {kind!r}, expected 'm3d_clip')")
    cfg = {**M3D_DEFAULTS, **data}
    if cfg["pos_embed"] != "perceptron" or int(cfg["spatial_dims"]) != 3:
        raise ModelLoadError(f"{path}: only M3D's 3D ViT with pos_embed 'perceptron' is supported, got "
                             f"pos_embed {cfg['pos_embed']!r}, spatial_dims {cfg['spatial_dims']!r}")
    try:
        vit = ViTConfig(img_size=tuple(int(v) for v in cfg["img_size"]),  # type: ignore[arg-type]
                        patch_size=tuple(int(v) for v in cfg["patch_size"]),  # type: ignore[arg-type]
                        in_channels=int(cfg["in_channels"]), hidden_size=int(cfg["hidden_size"]),
                        mlp_dim=int(cfg["mlp_dim"]), num_layers=int(cfg["num_layers"]),
                        num_heads=int(cfg["num_heads"]))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: invalid ViT sizes: {exc}") from exc
    return vit, data


def read_m3d_weights(src: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """Read the folder's weights: ``model.safetensors``, else ``pytorch_model.bin``.

    Parameters
    ----------
    src : Path
        The M3D-CLIP folder.

    Returns
    -------
    tuple
        ``(state, file)``.

    Raises
    ------
    ModelLoadError
        When neither file is there (a sharded checkpoint is named as such) or the
        file cannot be read as a flat dictionary of tensors.
    """
    for name in WEIGHT_FILES:
        file = Path(src) / name
        if not file.is_file():
            continue
        if file.suffix == ".safetensors":
            return load_weights(file), file
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {file}: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelLoadError(f"{file} is not a state dict of tensors")
        return state, file
    sharded = sorted(p.name for p in Path(src).glob("*.index.json"))
    more = f" (a sharded checkpoint, {sharded[0]}, is not supported)" if sharded else ""
    raise ModelLoadError(f"no {' or '.join(WEIGHT_FILES)} in {src}{more}")


def text_tower_config(text_config: Path | None) -> Any:
    """The BERT configuration of the text tower: bert-base-uncased's, or a config.json file.

    Parameters
    ----------
    text_config : Path, optional
        A BERT ``config.json``; bert-base-uncased (transformers' defaults) when None.

    Returns
    -------
    transformers.BertConfig
        The configuration.

    Raises
    ------
    ModelLoadError
        When the file cannot be read as a BERT configuration.
    """
    if text_config is None:
        return bert_base_uncased_config()
    force_offline()
    from transformers import BertConfig

    try:
        return BertConfig.from_json_file(str(text_config))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the text tower configuration {text_config}: {exc}") from exc


def folder_hashes(src: Path) -> dict[str, str]:
    """SHA-256 of every file in a folder (recursively; ``.git`` and ``.cache`` left out), by relative path."""
    src = Path(src)
    files = sorted(p for p in src.rglob("*") if p.is_file()
                   and not {".git", ".cache"} & set(p.relative_to(src).parts))
    return {p.relative_to(src).as_posix(): sha256_file(p) for p in files}


def import_m3d_clip(src: Path, out_dir: Path, *, text_config: Path | None = None, input_size: int = 256,
                    preset: Preset = Preset.BRAIN_ADAPTER, use_note: bool = True, seed: int = 0,
                    name: str = "Brain-Adapter base (M3D-CLIP)", version: str | None = None) -> Path:
    """Write a base model directory from a local copy of the published M3D-CLIP folder.

    Parameters
    ----------
    src : Path
        The M3D-CLIP folder (``config.json``, weights, tokenizer files).
    out_dir : Path
        Destination model directory.
    text_config : Path, optional
        BERT ``config.json`` of the text tower; bert-base-uncased by default.
    input_size : int
        Edge of the cubic volume the base receives (256: the node's input); the ViT's
        ``img_size`` must be (``input_size / k``, ``input_size``, ``input_size``).
    preset : Preset
        Trainable parts recorded for training.
    use_note : bool
        Keep the text tower and a fusion head.
    seed : int
        Seed of the adapter and heads.
    name : str
        Model name recorded in the manifest.
    version : str, optional
        Model version; ``0.0.0+m3d-clip.<first 12 hex digits of the weights' SHA-256>`` by default.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ModelLoadError
        When the folder is incomplete, its weights do not match its configuration
        (missing, unexpected or mis-shaped keys are named) or the sizes do not fit
        ``input_size``.
    """
    src = Path(src)
    if not src.is_dir():
        raise ModelLoadError(f"M3D-CLIP folder does not exist: {src}")
    vit, m3d_config = read_m3d_config(src)
    bert = text_tower_config(text_config)
    state, weights = read_m3d_weights(src)
    hashes = folder_hashes(src)
    clip = clip_from_state(state, str(weights), vit_config=vit, text_config=bert, embed_dim=vit.hidden_size)
    source: dict[str, Any] = {
        "kind": "M3D-CLIP", "path": str(src.resolve()), "weights_file": weights.name, "config": m3d_config,
        "text_config": str(Path(text_config).resolve()) if text_config else "bert-base-uncased (transformers defaults)",
        "files_sha256": hashes,
    }
    if text_config is not None:
        source["text_config_sha256"] = sha256_file(Path(text_config))
    version = version or f"0.0.0+m3d-clip.{hashes[weights.name][:12]}"
    out = base_from_clip(clip, src, Path(out_dir), preset=preset, use_note=use_note, seed=seed, name=name,
                         version=version, input_size=(input_size,) * 3, source=source)
    logger.info("imported M3D-CLIP (%d tensors, %d files hashed) as %s", len(state), len(hashes), out)
    return out
