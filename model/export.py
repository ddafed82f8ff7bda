"""A training run made servable: its base, its trained parts and its temperature in one model directory.

``dicom-node model export RUN --out DIR`` (:func:`export_run`) writes a model
directory (:mod:`model.checkpoint`) that :meth:`model.inference.Predictor.load`
serves:

* ``model.safetensors``, ``text_encoder/``: the run's base, unchanged (copied from
  its model directory, or the seeded demonstration base written out), so the file's
  SHA-256 is the one the trained parts are bound to;
* ``adapter.safetensors`` or ``lora/`` (peft's format): the run's trained parts,
  copied as they are;
* ``brain_adapter.json``: the base's architecture with the run's preset, the run's
  calibration ``temperature`` and ``trained`` (kind, path, preset, base SHA-256).

Loading checks the binding again and refuses trained parts made on other weights.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from model.adapter_config import Preset
from model.checkpoint import MANIFEST_FILE, TEXT_ENCODER_DIR, WEIGHTS_FILE, read_manifest, save_model, sha256_file
from model.demo import BaseSpec, build_demo_base_from_spec
from model.errors import ModelInputError, ModelLoadError
from model.finetune import ADAPTER_FILE, LORA_DIR

logger = logging.getLogger(__name__)

#: The run folder's summary (``model.train.SUMMARY_FILE``).
RUN_SUMMARY = "run.json"


def _read_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_SUMMARY
    if not path.is_file():
        raise ModelInputError(f"not a training run (no {RUN_SUMMARY}): {run_dir}")
    summary: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if not summary.get("finished"):
        raise ModelInputError(f"run {run_dir} has not finished training (resume it with `train --resume`)")
    return summary


def _write_base(spec: BaseSpec, preset: Preset, out_dir: Path, *, name: str, version: str,
                demonstration: bool, temperature: float, trained: dict[str, str]) -> str:
    """Write the run's base into ``out_dir`` with the new manifest; return its weights' SHA-256."""
    if spec.kind == "demo":
        model = build_demo_base_from_spec(spec)
        model.config = replace(model.config, preset=preset)
        save_model(model, out_dir, name=name, version=version, demonstration=demonstration,
                   temperature=temperature, trained=trained)
        return sha256_file(out_dir / WEIGHTS_FILE)
    base_dir = Path(spec.path)
    manifest = read_manifest(base_dir)
    if manifest.trained is not None or manifest.temperature != 1.0:
        raise ModelInputError(f"base {base_dir} already carries trained parts or a temperature; "
                              "export needs the plain base the run started from")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base_dir / WEIGHTS_FILE, out_dir / WEIGHTS_FILE)
    config = manifest.config
    if (base_dir / TEXT_ENCODER_DIR).is_dir() and config.text_encoder_path == TEXT_ENCODER_DIR:
        shutil.copytree(base_dir / TEXT_ENCODER_DIR, out_dir / TEXT_ENCODER_DIR, dirs_exist_ok=True)
    elif config.use_note:
        config = config.with_text_encoder_path(str((base_dir / config.text_encoder_path).resolve()))
    exported = replace(manifest, name=name, version=version, demonstration=demonstration,
                       config=replace(config, preset=preset), temperature=temperature, trained=trained)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(exported.to_dict(), indent=2) + "\n", encoding="utf-8")
    return sha256_file(out_dir / WEIGHTS_FILE)


def export_run(run_dir: Path, out_dir: Path, *, name: str = "Brain-Adapter", version: str | None = None,
               demonstration: bool = True) -> Path:
    """Write a finished run as a servable model directory.

    Parameters
    ----------
    run_dir : Path
        Run folder written by ``dicom-node train``.
    out_dir : Path
        Destination model directory (created).
    name : str
        Model name recorded in the manifest (and in every report).
    version : str, optional
        Model version; ``0.1.0+<run folder name>`` by default.
    demonstration : bool
        Mark the model as not for clinical use (every report says so).  True by
        default: only the site, having validated the model, says otherwise; never
        False for a run on the seeded demonstration base or a synthetic cohort.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ModelInputError
        When the folder is not a finished run, or a demonstration run is to be
        exported for clinical use.
    ModelLoadError
        When the run's base is gone or its weights are not those the run trained on.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    summary = _read_run(run_dir)
    spec = BaseSpec.from_dict(summary["base"])
    lora = summary.get("lora")
    kind, part = ("lora", LORA_DIR) if lora else ("adapter", ADAPTER_FILE)
    if not (run_dir / part).exists():
        raise ModelInputError(f"run {run_dir} has no {part}")
    if not demonstration and (spec.kind == "demo" or summary.get("preprocessing_version") == "synthetic"):
        raise ModelInputError(f"run {run_dir} was trained on the demonstration base or a synthetic cohort; "
                              "it can only be exported as a demonstration model")
    preset = Preset(summary["config"]["preset"])
    trained = {"kind": kind, "path": part, "preset": preset.value,
               "base_weights_sha256": str(summary["base_weights_sha256"])}
    digest = _write_base(spec, preset, out_dir, name=name, version=version or f"0.1.0+{run_dir.name}",
                         demonstration=demonstration, temperature=float(summary.get("temperature", 1.0)),
                         trained=trained)
    if digest != trained["base_weights_sha256"]:
        raise ModelLoadError(f"the run's base weights changed since training ({digest[:12]} != "
                             f"{trained['base_weights_sha256'][:12]}); cannot export {run_dir}")
    if kind == "lora":
        shutil.copytree(run_dir / part, out_dir / part, dirs_exist_ok=True)
    else:
        shutil.copyfile(run_dir / part, out_dir / part)
    logger.info("exported run %s (%s, temperature %.3g) to %s", run_dir.name, kind,
                float(summary.get("temperature", 1.0)), out_dir)
    return out_dir
