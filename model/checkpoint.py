"""Model directory format: save, read and strictly load a :class:`BrainAdapter`.

A model directory holds::

    brain_adapter.json   manifest: format, name, version, demonstration flag,
                         text encoder folder (relative to the directory), the
                         BrainAdapterConfig and, when present, the calibration
                         ``temperature``, the ``trained`` parts on top of the
                         weights and the ``source`` (e.g. M3D-CLIP's files and hashes)
    model.safetensors    every weight of the model, frozen towers included, so the
                         file's SHA-256 identifies the whole network (the base, when
                         there are trained parts)
    text_encoder/        the text encoder's config.json and tokenizer files (no weights)
    adapter.safetensors  or lora/ (peft's format): trained parts of a run on this
                         base (``model.export``), bound to the base's SHA-256

Loading builds the architecture from the manifest (the text encoder from its
config alone) and loads ``model.safetensors`` with ``strict=True``; any mismatch is
reported as a :class:`model.errors.ModelLoadError` naming the offending keys.
Trained parts are then applied (refused unless made on exactly these base
weights) and the served probabilities are ``softmax(logits / temperature)``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter
from model.errors import ModelLoadError
from model.identity import MANIFEST_FILE, WEIGHTS_FILE, model_identity, sha256_file, trained_files
from model.text import load_text_encoder, save_text_encoder_files

logger = logging.getLogger(__name__)

TEXT_ENCODER_DIR = "text_encoder"
FORMAT = "brain-adapter-model"
FORMAT_VERSION = 1
#: Kinds of trained parts a model directory can carry on top of its weights.
TRAINED_KINDS = ("adapter", "lora")


@dataclass(frozen=True)
class ModelManifest:
    """Contents of ``brain_adapter.json``.

    Parameters
    ----------
    name : str
        Model name.
    version : str
        Model (checkpoint) version.
    demonstration : bool
        True for untrained or synthetic-data models.
    config : BrainAdapterConfig
        Architecture; ``text_encoder_path`` relative to the model directory
        unless absolute.
    temperature : float
        Calibration temperature applied to the logits when serving (1: none).
    trained : dict, optional
        Trained parts on top of ``model.safetensors``: ``kind`` (``adapter`` or
        ``lora``), ``path`` (relative), ``preset`` and ``base_weights_sha256``.
    source : dict, optional
        Where the weights came from (e.g. M3D-CLIP's folder and its files' SHA-256).
    """

    name: str
    version: str
    demonstration: bool
    config: BrainAdapterConfig
    temperature: float = 1.0
    trained: Mapping[str, str] | None = None
    source: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON document."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "demonstration": self.demonstration,
            "text_encoder_path": self.config.text_encoder_path,
            "config": self.config.to_dict(),
        }
        if self.temperature != 1.0:
            doc["temperature"] = self.temperature
        if self.trained is not None:
            doc["trained"] = dict(self.trained)
        if self.source is not None:
            doc["source"] = dict(self.source)
        return doc


def save_model(
    model: BrainAdapter, out_dir: Path, *, name: str, version: str, demonstration: bool,
    temperature: float = 1.0, trained: Mapping[str, str] | None = None, source: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model directory.

    Parameters
    ----------
    model : BrainAdapter
        The model.
    out_dir : Path
        Destination directory (created; existing files are overwritten).
    name, version : str
        Identity recorded in the manifest.
    demonstration : bool
        Mark the model as not for clinical use.
    temperature : float
        Calibration temperature to serve with (1: none).
    trained : Mapping, optional
        Trained parts the caller puts next to the weights (see :class:`ModelManifest`).
    source : Mapping, optional
        Provenance of the weights.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config
    if model.text_encoder is not None:
        save_text_encoder_files(model.text_encoder, out_dir / TEXT_ENCODER_DIR)
        config = config.with_text_encoder_path(TEXT_ENCODER_DIR)
    manifest = ModelManifest(name=name, version=version, demonstration=demonstration, config=config,
                             temperature=float(temperature), trained=trained, source=source)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # A single metadata key: safetensors writes metadata in hash-map order, and the
    # file's SHA-256 must depend on the tensors alone.
    save_file(state, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    logger.info("saved model %s %s to %s", name, version, out_dir)
    return out_dir


def read_manifest(model_dir: Path) -> ModelManifest:
    """Read and validate ``brain_adapter.json``.

    Parameters
    ----------
    model_dir : Path
        The model directory.

    Returns
    -------
    ModelManifest
        The manifest.

    Raises
    ------
    ModelLoadError
        When the directory or manifest is missing, unreadable or of another format.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory does not exist: {model_dir}")
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(f"not a model directory (no {MANIFEST_FILE}): {model_dir}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"unreadable {MANIFEST_FILE} in {model_dir}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a {FORMAT} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{path} has format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        config = BrainAdapterConfig.from_dict(data["config"])
        temperature = float(data.get("temperature", 1.0))
        trained = data.get("trained")
        if trained is not None:
            trained = {k: str(trained[k]) for k in ("kind", "path", "preset", "base_weights_sha256")}
            if trained["kind"] not in TRAINED_KINDS:
                raise ValueError(f"trained kind must be one of {TRAINED_KINDS}, got {trained['kind']!r}")
            Preset(trained["preset"])
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        return ModelManifest(
            name=str(data["name"]),
            version=str(data["version"]),
            demonstration=bool(data["demonstration"]),
            config=config,
            temperature=temperature,
            trained=trained,
            source=data.get("source"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"invalid manifest {path}: {exc}") from exc


def resolve_text_encoder_path(model_dir: Path, config: BrainAdapterConfig) -> Path:
    """Return the absolute text encoder folder of a model directory's config."""
    p = Path(config.text_encoder_path)
    return p if p.is_absolute() else Path(model_dir) / p


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Compare a state dict with a module's, key by key and shape by shape.

    Parameters
    ----------
    module : torch.nn.Module
        The target module.
    state : Mapping
        The checkpoint's tensors.
    source : str
        Checkpoint path, for the message.

    Raises
    ------
    ModelLoadError
        Listing (up to five of each) missing keys, unexpected keys and shape mismatches.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise ModelLoadError(f"checkpoint {source} does not match the model architecture; " + "; ".join(problems))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    dict
        Tensor name to tensor (CPU).

    Raises
    ------
    ModelLoadError
        When the file is missing or not a readable safetensors file.
    """
    if not Path(path).is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read weights file {path}: {exc}") from exc


def strict_load(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Check then load a state dict with ``strict=True``.

    Parameters
    ----------
    module : torch.nn.Module
        Target.
    state : Mapping
        Tensors.
    source : str
        Checkpoint path, for messages.

    Raises
    ------
    ModelLoadError
        On any key or shape mismatch.
    """
    check_state_dict(module, state, source)
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:  # dtype or other incompatibility not caught above
        raise ModelLoadError(f"checkpoint {source} cannot be loaded: {exc}") from exc


def apply_trained(model: BrainAdapter, model_dir: Path, trained: Mapping[str, str],
                  base_sha256: str) -> tuple[BrainAdapter, dict[str, str]]:
    """Apply a model directory's trained parts to its loaded base.

    Parameters
    ----------
    model : BrainAdapter
        The base, its weights loaded.
    model_dir : Path
        The model directory.
    trained : Mapping
        The manifest's ``trained`` entry.
    base_sha256 : str
        SHA-256 of the loaded base weights.

    Returns
    -------
    tuple
        ``(model, files)``: the model with the trained parts (LoRA merged) and the
        trained files' SHA-256 by relative path.

    Raises
    ------
    ModelLoadError
        When the parts were made on other base weights, are missing or do not fit.
    """
    from model.finetune import load_adapter_file, load_lora

    if trained["base_weights_sha256"] != base_sha256:
        raise ModelLoadError(
            f"the trained parts in {model_dir} were made on base weights {trained['base_weights_sha256']!r}, "
            f"not on this directory's {WEIGHTS_FILE} ({base_sha256!r}); refusing to combine them")
    path = Path(model_dir) / trained["path"]
    if not path.exists():
        raise ModelLoadError(f"trained parts not found: {path}")
    files = trained_files(path)
    model.config = replace(model.config, preset=Preset(trained["preset"]))
    model.apply_preset()
    if trained["kind"] == "lora":
        model = load_lora(model, path, base_weights_sha256=base_sha256)
    else:
        load_adapter_file(model, path, base_weights_sha256=base_sha256)
    return model, files


def load_model(model_dir: Path) -> tuple[BrainAdapter, ModelManifest, str]:
    """Load a model directory strictly, on CPU, in eval mode.

    Parameters
    ----------
    model_dir : Path
        Directory written by :func:`save_model` (and :func:`model.export.export_run`).

    Returns
    -------
    tuple
        ``(model, manifest, weights_sha256)``; with trained parts or a temperature
        the SHA-256 is :func:`model_identity` of all of them.

    Raises
    ------
    ModelLoadError
        On a wrong path, an invalid manifest, a weights file that does not match,
        or trained parts made on other base weights.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir)
    weights = model_dir / WEIGHTS_FILE
    state = load_weights(weights)
    text = None
    if manifest.config.use_note:
        text = load_text_encoder(resolve_text_encoder_path(model_dir, manifest.config), with_weights=False)
    try:
        model = BrainAdapter(manifest.config, text)
    except ValueError as exc:
        raise ModelLoadError(f"invalid model configuration in {model_dir}: {exc}") from exc
    strict_load(model, state, str(weights))
    digest = sha256_file(weights)
    files: dict[str, str] = {}
    if manifest.trained is not None:
        model, files = apply_trained(model, model_dir, manifest.trained, digest)
    model.eval()
    identity = model_identity(digest, files, manifest.temperature)
    logger.info("loaded model %s %s (sha256 %s, base %s, temperature %.3g)", manifest.name, manifest.version,
                identity[:12], digest[:12], manifest.temperature)
    return model, manifest, identity
