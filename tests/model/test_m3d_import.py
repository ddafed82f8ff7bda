"""M3D-CLIP's published layout (a fixture made from M3D's own code) and ``dicom-node model import-m3d-clip``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dicom_node.cli.main import main
from model.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, load_model
from model.errors import ModelLoadError
from model.inference import Predictor
from model.m3d_clip import M3DClip
from model.m3d_import import import_m3d_clip, read_m3d_config, text_tower_config
from tests.support.m3d_clip import FIXTURE, layout, write_m3d_clip_folder


@pytest.mark.parametrize("name", ["published", "tiny"])
def test_our_m3d_clip_matches_the_layout_m3ds_code_creates(name: str, tmp_path: Path) -> None:
    spec = layout(name)
    (tmp_path / "config.json").write_text(json.dumps(spec["m3d_config"]), encoding="utf-8")
    (tmp_path / "bert.json").write_text(json.dumps(spec["text_config"]), encoding="utf-8")
    vit, _ = read_m3d_config(tmp_path)
    with torch.device("meta"):
        ours = M3DClip(vit, text_tower_config(tmp_path / "bert.json"), embed_dim=vit.hidden_size).state_dict()
    published = spec["state_dict"]
    assert sorted(set(published) - set(ours)) == []  # every published key exists in our module
    assert sorted(set(ours) - set(published)) == []  # and nothing else
    mismatched = {k: (published[k], list(ours[k].shape)) for k in published if list(ours[k].shape) != published[k]}
    assert mismatched == {}
    assert sum(t.numel() for t in ours.values()) == spec["parameter_count"]


def test_fixture_states_its_source() -> None:
    doc = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert doc["source"]["repository"] == "https://github.com/BAAI-DCAI/M3D"
    assert "LaMed/src/model/CLIP.py" in doc["source"]["files"]
    assert doc["generated_with"]["monai"].startswith("1.3.") and doc["generated_with"]["transformers"] == "4.39.1"
    published = doc["layouts"]["published"]
    assert published["parameter_count"] == 198_052_609
    assert published["state_dict"]["vision_encoder.patch_embedding.position_embeddings"] == [1, 2048, 768]
    assert published["state_dict"]["language_encoder.pooler.dense.weight"] == [768, 768]


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_import_m3d_clip_writes_a_base_the_node_loads(weights: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src, text_config, state = write_m3d_clip_folder(tmp_path / "M3D-CLIP", weights=weights)
    out = tmp_path / "base"
    assert main(["model", "import-m3d-clip", str(src), "--out", str(out), "--text-config", str(text_config),
                 "--input-size", "64"]) == 0
    assert f"base written to {out}" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    assert manifest["source"]["files_sha256"] == expected
    assert manifest["source"]["weights_file"] == weights
    assert manifest["source"]["config"]["model_type"] == "m3d_clip"
    assert manifest["demonstration"] is True  # adapter and heads untrained
    model, _, _ = load_model(out)
    saved = load_file(str(out / WEIGHTS_FILE))
    for key, tensor in state.items():
        if key != "logit_scale":
            assert torch.equal(saved[key], tensor), key  # the towers and projections, unchanged
    assert torch.equal(model.logit_scale.detach(), state["logit_scale"])
    predictor = Predictor.load(out)
    volume = torch.rand(64, 64, 64, generator=torch.Generator().manual_seed(1)).numpy()
    prediction = predictor.predict(volume, "MMSE 24/30, memory complaints for a year.")
    assert prediction.used_note is True and sum(prediction.probabilities.values()) == pytest.approx(1.0)


def test_import_refuses_a_checkpoint_that_does_not_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, text_config, state = write_m3d_clip_folder(tmp_path / "M3D-CLIP")
    del state["vision_encoder.blocks.1.attn.qkv.weight"]
    state["vision_encoder.classification_head.weight"] = torch.zeros(2, 32)
    state["mm_language_proj.weight"] = torch.zeros(16, 32)
    save_file(state, str(src / "model.safetensors"))
    argv = ["model", "import-m3d-clip", str(src), "--out", str(tmp_path / "base"), "--text-config", str(text_config),
            "--input-size", "64"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "missing keys: vision_encoder.blocks.1.attn.qkv.weight" in err
    assert "unexpected keys: vision_encoder.classification_head.weight" in err
    assert "shape mismatches: mm_language_proj.weight (16, 32) != (32, 32)" in err
    assert not (tmp_path / "base").exists()


def test_import_refuses_other_folders(tmp_path: Path) -> None:
    src, text_config, _ = write_m3d_clip_folder(tmp_path / "M3D-CLIP")
    with pytest.raises(ModelLoadError, match="does not exist"):
        import_m3d_clip(tmp_path / "absent", tmp_path / "out")
    (src / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors or pytorch_model\.bin in"):
        import_m3d_clip(src, tmp_path / "out", text_config=text_config, input_size=64)
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not an M3D-CLIP configuration"):
        import_m3d_clip(src, tmp_path / "out")
    config = dict(layout("tiny")["m3d_config"], pos_embed="conv")
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="pos_embed 'perceptron'"):
        import_m3d_clip(src, tmp_path / "out")


def test_import_refuses_an_input_size_the_vit_cannot_take(tmp_path: Path) -> None:
    src, text_config, _ = write_m3d_clip_folder(tmp_path / "M3D-CLIP")
    with pytest.raises(ModelLoadError, match="does not fit this input"):
        import_m3d_clip(src, tmp_path / "out", text_config=text_config, input_size=96)
