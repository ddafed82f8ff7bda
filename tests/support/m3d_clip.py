"""M3D-CLIP folders in the published layout, made from the committed fixture (not from the node's model code).

``tests/model/fixtures/m3d_clip_published_layout.json`` lists the state-dict names and
shapes that M3D's own code (BAAI-DCAI/M3D, ``LaMed/src/model/CLIP.py``) creates, for
the published configuration and for a tiny one with the same names; see
``tests/model/fixtures/make_m3d_clip_layout.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.text import packaged_minilm_path

FIXTURE = Path(__file__).resolve().parents[1] / "model" / "fixtures" / "m3d_clip_published_layout.json"
#: bert-base-uncased's tokenizer files (all-MiniLM-L6-v2 uses the same vocabulary).
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def layout(name: str) -> dict[str, Any]:
    """One layout of the fixture: ``m3d_config``, ``text_config``, ``parameter_count``, ``state_dict``."""
    doc: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return dict(doc["layouts"][name])


def random_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the names and shapes of a fixture layout."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.empty(shape).uniform_(-0.05, 0.05, generator=gen)
            for k, shape in layout(name)["state_dict"].items()}


def write_m3d_clip_folder(folder: Path, name: str = "tiny", *, weights: str = "model.safetensors",
                          seed: int = 0) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Write an M3D-CLIP folder as published (config.json, weights, tokenizer) for a fixture layout.

    Parameters
    ----------
    folder : Path
        The folder to write.
    name : str
        Fixture layout (``tiny`` or ``published``).
    weights : {"model.safetensors", "pytorch_model.bin"}
        Weights file format.
    seed : int
        Seed of the random weights.

    Returns
    -------
    tuple
        ``(folder, text_config_file, state)``: the text tower's BERT config.json is written
        beside the folder (the published folder has none: M3D loads bert-base-uncased by name).
    """
    spec = layout(name)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**spec["m3d_config"], "architectures": ["M3DCLIP"], "torch_dtype": "float32",
              "transformers_version": "4.39.1"}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    state = random_state(name, seed)
    if weights == "model.safetensors":
        save_file(state, str(folder / weights), metadata={"format": "pt"})
    else:
        torch.save(state, folder / weights)
    for file in TOKENIZER_FILES:
        shutil.copy(packaged_minilm_path() / file, folder / file)
    text_config = folder.parent / f"{folder.name}-bert-config.json"
    text_config.write_text(json.dumps(spec["text_config"], indent=2), encoding="utf-8")
    return folder, text_config, state
