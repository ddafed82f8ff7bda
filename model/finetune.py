"""Declaration of the trainable parts, optional LoRA (peft), and adapter files.

* :func:`lora_config` declares, as a ``peft.LoraConfig``, the preset's trainable
  modules (``modules_to_save``) plus LoRA on the frozen ViT's attention
  (``qkv`` and ``out_proj``); :func:`apply_lora` wraps a model with it and
  :func:`merge_lora` folds LoRA back into a plain :class:`BrainAdapter` that
  :func:`model.checkpoint.save_model` can write.
* An *adapter file* (safetensors) holds only the trainable tensors of a model
  (plain or peft-wrapped) and, in its metadata, the SHA-256 of the base weights
  file it was trained on; :func:`load_adapter_file` refuses any other base.
* A *LoRA folder* (:func:`save_lora`) is peft's own format (``adapter_config.json``
  and ``adapter_model.safetensors``: LoRA matrices and the preset's modules), loadable
  with ``peft.PeftModel.from_pretrained(base, folder)``; its weights file's metadata
  carries the base weights' SHA-256, the preset and ``logit_scale`` (a bare
  parameter peft does not save), and :func:`load_lora` refuses any other base.
* :func:`trainable_parameter_counts` reports the trainable size of each preset.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter
from model.errors import ModelLoadError
from model.notenumbers import NoteNumbers
from model.text import TextEncoder

logger = logging.getLogger(__name__)

#: Regular expression selecting the ViT attention projections for LoRA.
LORA_ATTENTION_TARGETS = r".*vision_encoder\.blocks\.\d+\.attn\.(qkv|out_proj)"
#: A run's (or model directory's) trained tensors without LoRA.
ADAPTER_FILE = "adapter.safetensors"
#: A run's (or model directory's) LoRA folder, in peft's format.
LORA_DIR = "lora"
#: peft's weights file inside a LoRA folder.
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
#: Prefix peft puts before the wrapped model's parameter names.
PEFT_PREFIX = "base_model.model."


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the tensors of a model's trainable parameters, by parameter name.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`BrainAdapter` or its peft wrapper.

    Returns
    -------
    dict
        Name to detached CPU tensor, for every parameter with ``requires_grad``, and
        the buffers fitted on training data of the trained note-number layer
        (:attr:`model.notenumbers.NoteNumbers.FITTED_BUFFERS`: its standardisation),
        which belong with its weights.
    """
    state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, NoteNumbers) and any(p.requires_grad for p in module.parameters()):
            for buffer in NoteNumbers.FITTED_BUFFERS:
                state[f"{name}.{buffer}"] = getattr(module, buffer).detach().to("cpu").contiguous()
    return state


def save_adapter_file(model: nn.Module, path: Path, *, base_weights_sha256: str, preset: Preset,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write the trainable tensors and the base-weights hash to a safetensors file.

    Parameters
    ----------
    model : torch.nn.Module
        Trained model (plain or peft-wrapped).
    path : Path
        Destination file.
    base_weights_sha256 : str
        SHA-256 of the base model's weights file (``Predictor.info.weights_sha256``).
    preset : Preset
        Preset the model was trained with.
    metadata : dict, optional
        More metadata (e.g. the calibration ``temperature``).

    Returns
    -------
    Path
        ``path``.
    """
    state = trainable_state(model)
    save_file(state, str(path), metadata={**(metadata or {}), "base_weights_sha256": base_weights_sha256,
                                          "preset": preset.value})
    logger.info("saved adapter file with %d tensors (base %s)", len(state), base_weights_sha256[:12])
    return path


def adapter_metadata(path: Path) -> dict[str, str]:
    """The metadata of an adapter file (base hash, preset, ``temperature`` when fitted, ...).

    Parameters
    ----------
    path : Path
        Adapter file.

    Returns
    -------
    dict
        The metadata.

    Raises
    ------
    ModelLoadError
        When the file is missing or unreadable.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read adapter file {path}: {exc}") from exc


def load_adapter_file(model: nn.Module, path: Path, *, base_weights_sha256: str) -> None:
    """Load an adapter file into a model built on the same base weights.

    Parameters
    ----------
    model : torch.nn.Module
        The model (plain or peft-wrapped as when the file was saved), its base
        weights already loaded.
    path : Path
        Adapter file.
    base_weights_sha256 : str
        SHA-256 of the base weights actually loaded.

    Raises
    ------
    ModelLoadError
        When the file is unreadable, was trained on other base weights, or its
        tensors are not exactly the model's trainable parameters.
    """
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta: dict[str, Any] = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read adapter file {path}: {exc}") from exc
    trained_on = meta.get("base_weights_sha256")
    if trained_on != base_weights_sha256:
        raise ModelLoadError(
            f"adapter file {path} was trained on base weights {trained_on!r}, not on the loaded base "
            f"{base_weights_sha256!r}; refusing to combine them"
        )
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ModelLoadError(
            f"adapter file {path} does not match the model's trainable parameters: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ModelLoadError(f"adapter file {path} has unexpected keys {result.unexpected_keys[:5]}")


def lora_config(model: BrainAdapter, *, rank: int, alpha: int | None = None, dropout: float = 0.0) -> Any:
    """Declare the preset's trainable modules and LoRA on the ViT attention.

    Parameters
    ----------
    model : BrainAdapter
        The model whose preset decides ``modules_to_save``.
    rank : int
        LoRA rank (> 0).
    alpha : int, optional
        LoRA alpha; ``rank`` by default (scale 1).
    dropout : float
        LoRA dropout.

    Returns
    -------
    peft.LoraConfig
        The declaration.

    Raises
    ------
    ValueError
        When ``rank`` is not positive.
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError("LoRA rank must be positive")
    modules = [m for m in model.trainable_modules() if m != "logit_scale"]
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        target_modules=LORA_ATTENTION_TARGETS,
        modules_to_save=modules,
        bias="none",
    )


def apply_lora(model: BrainAdapter, *, rank: int, alpha: int | None = None) -> Any:
    """Wrap a model with :func:`lora_config` (peft), keeping ``logit_scale`` trainable per preset.

    Parameters
    ----------
    model : BrainAdapter
        The model.
    rank : int
        LoRA rank.
    alpha : int, optional
        LoRA alpha.

    Returns
    -------
    peft.PeftModel
        Wrapped model; call it like the BrainAdapter.
    """
    from peft import get_peft_model

    wrapped = get_peft_model(model, lora_config(model, rank=rank, alpha=alpha))
    if "logit_scale" in model.trainable_modules():
        model.logit_scale.requires_grad_(True)
    return wrapped


def merge_lora(wrapped: Any) -> BrainAdapter:
    """Fold LoRA weights into the base and return the plain :class:`BrainAdapter`.

    Parameters
    ----------
    wrapped : peft.PeftModel
        From :func:`apply_lora`.

    Returns
    -------
    BrainAdapter
        Model with the merged weights and the trained ``modules_to_save``, its
        state-dict keys those of an unwrapped model.

    Raises
    ------
    TypeError
        When the wrapped model is not a BrainAdapter.
    """
    model = wrapped.merge_and_unload()
    if not isinstance(model, BrainAdapter):
        raise TypeError(f"expected a BrainAdapter, got {type(model).__name__}")
    model.apply_preset()
    return model


def save_lora(wrapped: Any, out_dir: Path, *, base_weights_sha256: str, preset: Preset,
              metadata: dict[str, str] | None = None) -> Path:
    """Write a LoRA-wrapped model's trained parts in peft's format, bound to its base.

    Parameters
    ----------
    wrapped : peft.PeftModel
        From :func:`apply_lora`, trained.
    out_dir : Path
        Destination folder (``adapter_config.json``, ``adapter_model.safetensors``).
    base_weights_sha256 : str
        SHA-256 of the base weights the model was built on.
    preset : Preset
        Preset the model was trained with.
    metadata : dict, optional
        More metadata (e.g. the calibration ``temperature``).

    Returns
    -------
    Path
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    wrapped.save_pretrained(str(out_dir))
    inner = wrapped.get_base_model()
    weights = out_dir / PEFT_WEIGHTS_FILE
    state = load_file(str(weights))
    # peft's loader ignores the metadata; the binding lives there, as in an adapter file.
    save_file(state, str(weights), metadata={
        **(metadata or {}), "format": "pt", "base_weights_sha256": base_weights_sha256, "preset": preset.value,
        "logit_scale": repr(float(inner.logit_scale.detach())),
    })
    logger.info("saved LoRA folder with %d tensors (base %s)", len(state), base_weights_sha256[:12])
    return out_dir


def lora_metadata(lora_dir: Path) -> dict[str, str]:
    """The metadata of a LoRA folder's weights file (base hash, preset, ``logit_scale``, ...).

    Parameters
    ----------
    lora_dir : Path
        Folder written by :func:`save_lora`.

    Returns
    -------
    dict
        The metadata.

    Raises
    ------
    ModelLoadError
        When the folder or its weights file is missing or unreadable.
    """
    weights = Path(lora_dir) / PEFT_WEIGHTS_FILE
    if not (Path(lora_dir) / "adapter_config.json").is_file() or not weights.is_file():
        raise ModelLoadError(f"not a LoRA folder (adapter_config.json and {PEFT_WEIGHTS_FILE}): {lora_dir}")
    try:
        with safe_open(str(weights), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(f"cannot read LoRA weights {weights}: {exc}") from exc


def load_lora(model: BrainAdapter, lora_dir: Path, *, base_weights_sha256: str) -> BrainAdapter:
    """Apply a LoRA folder to the base it was trained on and merge it.

    Parameters
    ----------
    model : BrainAdapter
        The base, its weights loaded (changed in place by peft).
    lora_dir : Path
        Folder written by :func:`save_lora`.
    base_weights_sha256 : str
        SHA-256 of the base weights actually loaded.

    Returns
    -------
    BrainAdapter
        The model with LoRA merged into the ViT attention and the trained modules
        in place, under the folder's preset, in eval mode.

    Raises
    ------
    ModelLoadError
        When the folder was trained on other base weights or does not fit the model.
    """
    from peft import PeftModel

    meta = lora_metadata(lora_dir)
    trained_on = meta.get("base_weights_sha256")
    if trained_on != base_weights_sha256:
        raise ModelLoadError(
            f"LoRA folder {lora_dir} was trained on base weights {trained_on!r}, not on the loaded base "
            f"{base_weights_sha256!r}; refusing to combine them")
    try:
        preset = Preset(meta.get("preset", model.config.preset.value))
        logit_scale = float(meta.get("logit_scale", "nan"))
        model.config = replace(model.config, preset=preset)
        wrapped = PeftModel.from_pretrained(model, str(lora_dir))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"LoRA folder {lora_dir} does not fit the model: {exc}") from exc
    merged = merge_lora(wrapped)
    if math.isfinite(logit_scale):
        with torch.no_grad():
            merged.logit_scale.fill_(logit_scale)
    return merged.eval()


def load_trained_parts(model: BrainAdapter, run_dir: Path, *, base_weights_sha256: str) -> BrainAdapter:
    """Apply a training run's trained parts (its LoRA folder, else its adapter file) to its base.

    Parameters
    ----------
    model : BrainAdapter
        The run's base, its weights loaded and the run's preset applied.
    run_dir : Path
        The run folder.
    base_weights_sha256 : str
        SHA-256 of the base weights actually loaded.

    Returns
    -------
    BrainAdapter
        The trained model (LoRA merged).

    Raises
    ------
    ModelLoadError
        When the parts were trained on other base weights or do not fit.
    """
    lora = Path(run_dir) / LORA_DIR
    if lora.is_dir():
        return load_lora(model, lora, base_weights_sha256=base_weights_sha256)
    load_adapter_file(model, Path(run_dir) / ADAPTER_FILE, base_weights_sha256=base_weights_sha256)
    return model


def trainable_parameter_counts(config: BrainAdapterConfig, text_encoder: TextEncoder | None) -> dict[str, int]:
    """Number of trainable parameters of each preset for a configuration.

    Parameters
    ----------
    config : BrainAdapterConfig
        Architecture (its own preset is ignored).
    text_encoder : TextEncoder or None
        Needed when ``config.use_note``.

    Returns
    -------
    dict
        Preset name to trainable parameter count.
    """
    counts = {}
    for preset in Preset:
        with torch.device("meta"):
            model = BrainAdapter(replace(config, preset=preset), text_encoder)
        counts[preset.value] = model.trainable_parameter_count()
    return counts
