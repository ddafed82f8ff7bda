"""Tests of checkpoint loading: M3D-CLIP's published layout and our model directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter
from model.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, sha256_file
from model.errors import ModelLoadError
from model.inference import Predictor, init_demo_model
from model.m3d_clip import M3DClip, init_from_m3d_clip, load_m3d_clip, transfer_m3d_clip
from model.text import load_text_encoder, packaged_minilm_path
from model.vit import ViTConfig
from tests.support.m3d_clip import random_state

M3D_CLIP_PARAMETERS = 198_052_609


def _random_state(**kwargs: object) -> dict[str, torch.Tensor]:
    """Random tensors with the key names and shapes of an M3D-CLIP checkpoint."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M3DClip(**kwargs).state_dict().items()}  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    return {k: torch.empty(s).uniform_(-0.05, 0.05, generator=gen) for k, s in shapes.items()}


def _tiny_bert_folder(tmp_path: Path) -> tuple[Path, object]:
    """A BERT folder (tiny config, MiniLM's bert-base-uncased vocabulary)."""
    from transformers import BertConfig

    folder = tmp_path / "tiny_bert"
    folder.mkdir()
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.save_pretrained(str(folder))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(packaged_minilm_path() / name, folder / name)
    return folder, config


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=0, trained=False)


def test_load_m3d_clip_published_layout_full_size_strict(tmp_path: Path) -> None:
    state = random_state("published")  # names and shapes from M3D's own code (the committed fixture)
    assert sum(t.numel() for t in state.values()) == M3D_CLIP_PARAMETERS
    assert {k.split(".")[0] for k in state} == {
        "vision_encoder", "language_encoder", "mm_vision_proj", "mm_language_proj", "logit_scale"
    }
    assert state["logit_scale"].shape == ()
    # Older transformers saved this non-persistent buffer; the loader drops it.
    state["language_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    clip = load_m3d_clip(tmp_path)
    loaded = clip.state_dict()
    for key in ("vision_encoder.blocks.11.attn.qkv.weight", "vision_encoder.cls_token",
                "language_encoder.pooler.dense.weight", "mm_language_proj.bias", "logit_scale"):
        assert torch.equal(loaded[key], state[key])


def test_load_m3d_clip_refuses_mismatched_checkpoint(tmp_path: Path) -> None:
    tiny_vit = ViTConfig(img_size=(8, 32, 32), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4)
    _, bert_config = _tiny_bert_folder(tmp_path)
    state = _random_state(vit_config=tiny_vit, text_config=bert_config, embed_dim=16)
    del state["vision_encoder.norm.weight"]
    state["mm_vision_proj.weight"] = torch.zeros(8, 32)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing keys: vision_encoder\.norm\.weight.*"
                                             r"unexpected keys: extra\.weight.*shape mismatches: mm_vision_proj"):
        load_m3d_clip(tmp_path / "clip.safetensors", vit_config=tiny_vit, text_config=bert_config, embed_dim=16)
    with pytest.raises(ModelLoadError, match="weights file not found"):
        load_m3d_clip(tmp_path / "absent")


def test_loaded_m3d_clip_computes_like_the_saved_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vit = ViTConfig(img_size=(8, 32, 32), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4)
    _, bert_config = _tiny_bert_folder(tmp_path)
    original = M3DClip(vit, bert_config, embed_dim=16).eval()
    save_file(original.state_dict(), str(tmp_path / WEIGHTS_FILE))
    loaded = load_m3d_clip(tmp_path, vit_config=vit, text_config=bert_config, embed_dim=16)
    image = torch.rand(2, 1, 8, 32, 32)
    ids = torch.tensor([[101, 2023, 2003, 102], [101, 3637, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), original.encode_image(image), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text(ids, mask), original.encode_text(ids, mask), rtol=0, atol=0)


def test_transfer_m3d_clip_into_brain_adapter(tmp_path: Path) -> None:
    vit = ViTConfig(img_size=(8, 64, 64), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4)
    folder, bert_config = _tiny_bert_folder(tmp_path)
    clip = M3DClip(vit, bert_config, embed_dim=16)
    cfg = BrainAdapterConfig(vit=vit, text_encoder_path=str(folder), embed_dim=16, preset=Preset.TLP,
                             input_size=(64, 64, 64), adapter_channels=2)
    model = BrainAdapter(cfg, load_text_encoder(folder, with_weights=False))
    transfer_m3d_clip(clip, model)
    for name in ("vision_encoder", "language_encoder", "mm_vision_proj", "mm_language_proj"):
        ours, theirs = getattr(model, name).state_dict(), getattr(clip, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert model.mm_vision_proj.weight.requires_grad and not model.vision_encoder.cls_token.requires_grad


def test_init_from_m3d_clip_writes_a_loadable_model(tmp_path: Path) -> None:
    import numpy as np

    vit = ViTConfig(img_size=(8, 64, 64), hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4)
    folder, bert_config = _tiny_bert_folder(tmp_path)  # stands for the M3D-CLIP folder's tokenizer files
    clip = M3DClip(vit, bert_config, embed_dim=16)
    save_file(clip.state_dict(), str(folder / WEIGHTS_FILE))
    out = init_from_m3d_clip(folder, tmp_path / "model", vit_config=vit, text_config=bert_config,
                             input_size=(64, 64, 64))
    predictor = Predictor.load(out)
    assert predictor.info.demonstration is True
    assert predictor.info.parameters["text_encoder"].startswith("M3D-CLIP BERT")
    loaded = predictor.model.vision_encoder.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in clip.vision_encoder.state_dict().items())
    volume = np.random.default_rng(0).random((64, 64, 64), dtype=np.float32)
    assert predictor.predict(volume, "memory complaints").used_note is True


def test_demo_model_is_seeded_and_hashed(demo_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((demo_dir / MANIFEST_FILE).read_text())
    assert manifest["demonstration"] is True
    assert manifest["text_encoder_path"] == "text_encoder"
    assert (demo_dir / "text_encoder" / "config.json").is_file()
    again = init_demo_model(tmp_path / "again", seed=0, trained=False)
    assert sha256_file(again / WEIGHTS_FILE) == sha256_file(demo_dir / WEIGHTS_FILE)


def test_predictor_refuses_wrong_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model directory does not exist"):
        Predictor.load(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match=f"not a model directory \\(no {MANIFEST_FILE}\\)"):
        Predictor.load(tmp_path)


def _copy_demo(demo_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(demo_dir, target)
    return target


def test_predictor_refuses_mismatched_checkpoint(demo_dir: Path, tmp_path: Path) -> None:
    target = _copy_demo(demo_dir, tmp_path)
    state = load_file(str(target / WEIGHTS_FILE))
    del state["adapter.branch.4.weight"]
    state["image_head.weight"] = torch.zeros(4, 64)
    save_file(state, str(target / WEIGHTS_FILE))
    with pytest.raises(ModelLoadError, match=r"does not match the model architecture; missing keys: "
                                             r"adapter\.branch\.4\.weight; shape mismatches: image_head\.weight"):
        Predictor.load(target)


def test_predictor_refuses_other_architecture(demo_dir: Path, tmp_path: Path) -> None:
    target = _copy_demo(demo_dir, tmp_path)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["config"]["vit"]["num_layers"] = 3
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"missing keys: vision_encoder\.blocks\.2\."):
        Predictor.load(target)


def test_predictor_refuses_corrupt_files(demo_dir: Path, tmp_path: Path) -> None:
    target = _copy_demo(demo_dir, tmp_path)
    (target / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read weights file"):
        Predictor.load(target)
    (target / MANIFEST_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ModelLoadError, match="is not a brain-adapter-model manifest"):
        Predictor.load(target)
    (target / MANIFEST_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match=r"unreadable brain_adapter\.json"):
        Predictor.load(target)
