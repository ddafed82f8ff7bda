"""M3D-CLIP built natively and loaded strictly from its published ``model.safetensors``.

The published modelling code downloads ``bert-base-uncased`` in its constructor and
needs ``trust_remote_code``; here the towers are plain modules (our
:class:`model.vit.ViT3D` and a transformers ``BertModel`` built from a config), and
the checkpoint is loaded with ``strict=True`` and no network.

Checkpoint layout: ``vision_encoder.*`` (ViT-B keys), ``language_encoder.*``
(bert-base-uncased ``BertModel``, pooler included), ``mm_vision_proj.*``,
``mm_language_proj.*`` and the scalar ``logit_scale``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter
from model.checkpoint import WEIGHTS_FILE, load_weights, save_model, strict_load
from model.errors import ModelLoadError
from model.text import TextEncoder, force_offline
from model.vit import ViT3D, ViTConfig

logger = logging.getLogger(__name__)

#: Non-persistent buffers that older transformers versions saved; dropped on load.
_LEGACY_BUFFERS = ("language_encoder.embeddings.position_ids",)

#: Parts of M3D-CLIP that carry over to a BrainAdapter, by attribute name.
TRANSFERRED_PARTS = ("vision_encoder", "language_encoder", "mm_vision_proj", "mm_language_proj")


def bert_base_uncased_config() -> Any:
    """Return the bert-base-uncased ``BertConfig`` (transformers defaults), built offline."""
    force_offline()
    from transformers import BertConfig

    return BertConfig()


class M3DClip(nn.Module):
    """M3D-CLIP: 3D ViT image tower, BERT text tower, two projections, ``logit_scale``.

    Parameters
    ----------
    vit_config : ViTConfig, optional
        Vision tower sizes; the published ViT-B by default.
    text_config : transformers.BertConfig, optional
        Text tower configuration; bert-base-uncased by default.
    embed_dim : int
        Width of the projections' output.
    """

    def __init__(self, vit_config: ViTConfig | None = None, text_config: Any = None, embed_dim: int = 768) -> None:
        super().__init__()
        force_offline()
        from transformers import BertModel

        vit_config = vit_config or ViTConfig.m3d()
        text_config = text_config or bert_base_uncased_config()
        self.vision_encoder = ViT3D(vit_config)
        self.language_encoder = BertModel(text_config, add_pooling_layer=True)
        self.mm_vision_proj = nn.Linear(vit_config.hidden_size, embed_dim)
        self.mm_language_proj = nn.Linear(int(text_config.hidden_size), embed_dim)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embedding of (B, 1, 32, 256, 256) volumes."""
        return functional.normalize(self.mm_vision_proj(self.vision_encoder(image)[:, 0]), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embedding of a tokenised batch."""
        hidden = self.language_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return functional.normalize(self.mm_language_proj(hidden[:, 0]), dim=-1)


def _uninitialised_m3d_clip(vit_config: ViTConfig | None, text_config: Any, embed_dim: int) -> M3DClip:
    """Build M3D-CLIP without running weight initialisation (every weight is loaded next).

    The module is built on the meta device and given uninitialised CPU storage; the
    BERT embeddings' two non-persistent buffers, which no checkpoint carries, are
    then filled as transformers does.  If the text tower has any other
    non-persistent buffer, a normally initialised model is built instead.
    """
    with torch.device("meta"):
        model = M3DClip(vit_config, text_config, embed_dim)
    persistent = set(model.state_dict())
    transient = {name for name, _ in model.named_buffers() if name not in persistent}
    embeddings = getattr(model.language_encoder, "embeddings", None)
    known = {"language_encoder.embeddings.position_ids", "language_encoder.embeddings.token_type_ids"}
    if transient != known or embeddings is None:
        return M3DClip(vit_config, text_config, embed_dim)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        n = embeddings.position_ids.shape[-1]
        embeddings.position_ids.copy_(torch.arange(n).expand((1, -1)))
        embeddings.token_type_ids.zero_()
    return model


def load_m3d_clip(
    path: Path, *, vit_config: ViTConfig | None = None, text_config: Any = None, embed_dim: int | None = None
) -> M3DClip:
    """Load M3D-CLIP's ``model.safetensors`` strictly, without network.

    Parameters
    ----------
    path : Path
        The ``model.safetensors`` file, or the folder holding it.
    vit_config : ViTConfig, optional
        Vision tower sizes (published ViT-B by default).
    text_config : transformers.BertConfig, optional
        Text tower configuration (bert-base-uncased by default).
    embed_dim : int, optional
        Width of the projections' output; read from ``mm_vision_proj.weight`` by
        default (768 published).

    Returns
    -------
    M3DClip
        The model, in eval mode.

    Raises
    ------
    ModelLoadError
        When the file is missing or its keys/shapes differ from the architecture.
    """
    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    return clip_from_state(load_weights(file), str(file), vit_config=vit_config, text_config=text_config,
                           embed_dim=embed_dim)


def clip_from_state(state: dict[str, torch.Tensor], source: str, *, vit_config: ViTConfig | None = None,
                    text_config: Any = None, embed_dim: int | None = None) -> M3DClip:
    """Build M3D-CLIP and load a state dict into it strictly (every key, every shape).

    Parameters
    ----------
    state : dict
        The checkpoint's tensors (changed: legacy buffers are dropped).
    source : str
        The checkpoint's path, for messages.
    vit_config, text_config, embed_dim : optional
        As :func:`load_m3d_clip`.

    Returns
    -------
    M3DClip
        The model, in eval mode.

    Raises
    ------
    ModelLoadError
        Naming the missing keys, unexpected keys and shape mismatches.
    """
    for key in _LEGACY_BUFFERS:
        state.pop(key, None)
    if embed_dim is None:
        proj = state.get("mm_vision_proj.weight")
        embed_dim = int(proj.shape[0]) if proj is not None and proj.dim() == 2 else 768
    model = _uninitialised_m3d_clip(vit_config, text_config, embed_dim)
    strict_load(model, state, source)
    model.eval()
    logger.info("loaded M3D-CLIP checkpoint %s", Path(source).name)
    return model


def transfer_m3d_clip(clip: M3DClip, model: BrainAdapter) -> None:
    """Copy M3D-CLIP's towers, projections and ``logit_scale`` into a BrainAdapter.

    Each part is loaded strictly; the BrainAdapter's text tower must be a
    ``BertModel`` with the same configuration as M3D-CLIP's (build it from a
    folder holding bert-base-uncased's ``config.json`` and tokenizer).

    Parameters
    ----------
    clip : M3DClip
        Loaded M3D-CLIP.
    model : BrainAdapter
        Target; its adapter and heads are left as they are.

    Raises
    ------
    ModelLoadError
        When a part does not match (e.g. a text tower of another size).
    """
    for name in TRANSFERRED_PARTS:
        target = getattr(model, name)
        if target is None:
            logger.info("BrainAdapter has no %s; not transferred", name)
            continue
        strict_load(target, getattr(clip, name).state_dict(), f"M3D-CLIP {name}")
    if model.logit_scale.shape != clip.logit_scale.shape:
        raise ModelLoadError("M3D-CLIP logit_scale shape differs from the model's")
    with torch.no_grad():
        model.logit_scale.copy_(clip.logit_scale)
    model.apply_preset()


def _load_bert_tokenizer(path: Path) -> Any:
    """Load a BERT tokenizer from a local folder (vocab.txt / tokenizer.json), offline."""
    force_offline()
    from transformers import BertTokenizer

    try:
        return BertTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a BERT tokenizer from {path}: {exc}") from exc


def init_from_m3d_clip(
    m3d_path: Path,
    out_dir: Path,
    *,
    preset: Preset = Preset.BRAIN_ADAPTER,
    use_note: bool = True,
    seed: int = 0,
    name: str = "Brain-Adapter",
    version: str = "0.0.0+m3d-clip-init",
    tokenizer_path: Path | None = None,
    vit_config: ViTConfig | None = None,
    text_config: Any = None,
    input_size: tuple[int, int, int] = (256, 256, 256),
) -> Path:
    """Write a model directory initialised from M3D-CLIP (towers, projections, ``logit_scale``).

    The adapter starts as plain depth pooling and the heads are seeded random, so
    the result is marked ``demonstration=True`` until it is trained.

    Parameters
    ----------
    m3d_path : Path
        M3D-CLIP folder (``model.safetensors`` and, usually, its tokenizer files)
        or the weights file itself.
    out_dir : Path
        Destination model directory.
    preset : Preset
        Trainable parts for later training.
    use_note : bool
        Keep the text tower and a fusion head.
    seed : int
        Seed of the adapter and head initialisation.
    name, version : str
        Identity recorded in the manifest.
    tokenizer_path : Path, optional
        Folder with the bert-base-uncased tokenizer; ``m3d_path`` by default.
    vit_config, text_config : optional
        Architecture overrides (tests); the published sizes by default.
    input_size : tuple of int
        Size of the preprocessed volume.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ModelLoadError
        When the checkpoint or the tokenizer cannot be loaded.
    """
    m3d_path = Path(m3d_path)
    clip = load_m3d_clip(m3d_path, vit_config=vit_config, text_config=text_config)
    folder = tokenizer_path or (m3d_path if m3d_path.is_dir() else m3d_path.parent)
    return base_from_clip(clip, folder, Path(out_dir), preset=preset, use_note=use_note, seed=seed, name=name,
                          version=version, input_size=input_size)


def base_from_clip(clip: M3DClip, tokenizer_folder: Path, out_dir: Path, *, preset: Preset, use_note: bool,
                   seed: int, name: str, version: str, input_size: tuple[int, int, int],
                   source: dict[str, Any] | None = None) -> Path:
    """Write a Brain-Adapter model directory around a loaded M3D-CLIP (see :func:`init_from_m3d_clip`).

    Parameters
    ----------
    clip : M3DClip
        Loaded M3D-CLIP.
    tokenizer_folder : Path
        Folder with the BERT tokenizer (``vocab.txt``); unused without notes.
    out_dir : Path
        Destination model directory.
    preset, use_note, seed, name, version, input_size
        As :func:`init_from_m3d_clip`.
    source : dict, optional
        Provenance recorded in the manifest.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ModelLoadError
        When the tokenizer cannot be loaded or the sizes do not fit together.
    """
    text = None
    if use_note:
        hidden = int(clip.language_encoder.config.hidden_size)
        text = TextEncoder(model=clip.language_encoder, tokenizer=_load_bert_tokenizer(tokenizer_folder),
                           hidden_size=hidden)
    try:
        config = BrainAdapterConfig(
            vit=clip.vision_encoder.config,
            text_encoder_path=str(tokenizer_folder) if use_note else "",
            embed_dim=clip.mm_vision_proj.out_features,
            preset=preset,
            use_note=use_note,
            input_size=input_size,
            text_encoder_name="M3D-CLIP BERT (bert-base-uncased architecture)" if use_note else "",
        )
    except ValueError as exc:
        raise ModelLoadError(f"M3D-CLIP does not fit this input: {exc}") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BrainAdapter(config, text)
    transfer_m3d_clip(clip, model)
    return save_model(model, Path(out_dir), name=name, version=version, demonstration=True, source=source)
