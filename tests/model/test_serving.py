"""From a training run to the node's predictor: ``train --lora`` (peft's format), ``model export``, the temperature."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dicom_node.cli.main import main
from model.checkpoint import MANIFEST_FILE, WEIGHTS_FILE, sha256_file
from model.cohort import CohortConfig, generate_cohort
from model.dataset import read_manifest
from model.demo import build_demo_base, state_sha256
from model.errors import ModelInputError, ModelLoadError
from model.evaluate import load_run
from model.export import export_run
from model.finetune import load_lora
from model.inference import Predictor
from model.train import TrainConfig
from model.types import CLASSES

NOTE = "74-year-old man, 14 years of education. His wife reports repeated questions; MMSE 25/30, CDR-SB 1.5."


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny LoRA run made through the CLI on the seeded demonstration base, and its export."""
    root = tmp_path_factory.mktemp("serving")
    manifest = generate_cohort(root / "cohort", CohortConfig(n_subjects=14, size=32, seed=5))
    run, model_dir = root / "run", root / "model"
    assert main(["train", str(manifest), "--out", str(run), "--demo-base", "--lora", "2", "--epochs", "1",
                 "--batch-size", "4", "--lr-lora", "1e-2", "--no-progress"]) == 0
    assert main(["model", "export", str(run), "--out", str(model_dir)]) == 0
    return manifest, run, model_dir


def _inputs(manifest: Path) -> tuple[np.ndarray, torch.Tensor]:
    volume = np.load(read_manifest(manifest)[0].volume).astype(np.float32)
    return volume, torch.from_numpy(volume)[None, None]


def _logits(model: Any, inner: Any, x: torch.Tensor) -> torch.Tensor:
    tokens = inner.tokenize([NOTE])
    with torch.no_grad():
        return model(x, tokens["input_ids"], tokens["attention_mask"], note_mask=torch.ones(1, dtype=torch.bool)).logits


def test_lora_run_is_peft_format_and_served_as_trained(lora_run: tuple[Path, Path, Path]) -> None:
    from peft import PeftModel

    manifest, run, model_dir = lora_run
    summary = json.loads((run / "run.json").read_text())
    assert summary["lora"]["rank"] == 2 and summary["trainable_parameters"]["lora"] > 0
    assert not (run / "adapter.safetensors").exists()
    config = json.loads((run / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["peft_type"] == "LORA"

    base = build_demo_base(32, seed=0, use_note=True)
    base_sha = state_sha256(base)
    assert summary["base_weights_sha256"] == base_sha
    peft_model = PeftModel.from_pretrained(base, str(run / "lora")).eval()
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.abs().sum()) > 0 for p in lora_b)  # LoRA trained (B starts at zero)
    volume, x = _inputs(manifest)
    expected = _logits(peft_model, base, x)

    predictor = Predictor.load(model_dir)
    temperature = summary["temperature"]
    assert predictor.temperature == temperature
    assert predictor.info.parameters["trained_parts"] == "lora"
    assert predictor.info.parameters["base_weights_sha256"] == sha256_file(model_dir / WEIGHTS_FILE) == base_sha
    torch.testing.assert_close(_logits(predictor.model, predictor.model, x), expected, rtol=0, atol=1e-5)
    served = predictor.predict(volume, NOTE).probabilities
    z = expected[0].double().numpy() / temperature
    softmax = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert [served[c] for c in CLASSES] == pytest.approx(softmax.tolist(), abs=1e-6)

    evaluated, _ = load_run(run)  # evaluate rebuilds the same model from the run folder
    torch.testing.assert_close(_logits(evaluated, evaluated, x), expected, rtol=0, atol=1e-5)


def test_lora_parts_refuse_another_base(lora_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, run, model_dir = lora_run
    other = build_demo_base(32, seed=1, use_note=True)
    with pytest.raises(ModelLoadError, match="was trained on base weights"):
        load_lora(other, run / "lora", base_weights_sha256=state_sha256(other))
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    state = load_file(str(copy / WEIGHTS_FILE))
    state["vision_encoder.blocks.0.attn.qkv.weight"] += 1e-3
    save_file(state, str(copy / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"made on base weights .* refusing to combine them"):
        Predictor.load(copy)


def test_served_probabilities_are_softmax_of_logits_over_the_stored_temperature(
        lora_run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    manifest, _, model_dir = lora_run
    volume, x = _inputs(manifest)
    served = {}
    for temperature in (1.0, 2.5):
        copy = tmp_path / f"T{temperature}"
        shutil.copytree(model_dir, copy)
        doc = json.loads((copy / MANIFEST_FILE).read_text())
        doc["temperature"] = temperature
        (copy / MANIFEST_FILE).write_text(json.dumps(doc))
        predictor = Predictor.load(copy)
        logits = _logits(predictor.model, predictor.model, x)[0].double().numpy()
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        served[temperature] = predictor.predict(volume, NOTE)
        assert [served[temperature].probabilities[c] for c in CLASSES] == pytest.approx(expected.tolist(), abs=1e-9)
        assert predictor.info.parameters["temperature"] == f"{temperature:g}"
    assert served[1.0].predicted_class == served[2.5].predicted_class  # a temperature never changes the class
    assert max(served[2.5].probabilities.values()) < max(served[1.0].probabilities.values())


def test_train_needs_an_explicit_base(lora_run: tuple[Path, Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    manifest = lora_run[0]
    assert main(["train", str(manifest), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert "--base MODEL_DIR" in err and "--demo-base" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ModelInputError, match="not both"):
        TrainConfig(manifest=str(manifest), out_dir=str(tmp_path), base=str(tmp_path), demo_base=True)
    with pytest.raises(ModelInputError, match="only be exported as a demonstration model"):
        export_run(lora_run[1], tmp_path / "clinical", demonstration=False)
    with pytest.raises(ModelInputError, match="LoRA rank"):
        TrainConfig(manifest=str(manifest), out_dir=str(tmp_path), demo_base=True, lora_rank=-1)
