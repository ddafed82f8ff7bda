"""Training of the Brain-Adapter's trainable parts (``dicom-node train``).

One run: read a manifest (refused unless preprocessed as the node serves, see
:func:`model.dataset.check_preprocessing`), split it by subject (70/30 by default,
stratified; 15 % of the training subjects again for calibration), build the base
(a model directory, e.g. from ``dicom-node model import-m3d-clip``, or -- only when
asked for explicitly -- the demonstration base, its ViT seeded random or pretrained
by ``dicom-node model pretrain``), train the preset's
trainable parts with AdamW and the paper's per-group learning rates (adapter
1e-3, projections 1e-4; heads 1e-3, our choice), optionally with LoRA on the
frozen ViT's attention (peft, :mod:`model.finetune`), fit a temperature on the
validation subjects, evaluate on the test subjects and write, in the run folder::

    checkpoint.pt        trainable tensors, optimizer and position (resume)
    adapter.safetensors  trained tensors + SHA-256 of the base weights (+ temperature);
    or lora/             with LoRA: peft's format, the same binding in its metadata
    run.json             summary: configuration, base, split, history, test metrics with
                         bootstrap intervals, calibration
    MODEL_CARD.md        the model card (model.card)

Volumes are read a batch at a time (:class:`model.dataset.VolumeStore`).  The
frozen text tower's pooled state is computed once per note and reused (it is
frozen in every preset, so this changes nothing but time); scans without a note
go through the image-only head (:mod:`model.feed`), as at inference.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.adapter_config import Preset
from model.brain_adapter import BrainAdapter
from model.calibration import fit_temperature, nll
from model.card import MODEL_CARD_FILE, write_model_card
from model.dataset import (
    batches,
    check_preprocessing,
    manifest_sha256,
    read_manifest,
    split_indices,
    subject_split,
)
from model.demo import (
    DEMO_ADAPTER_FILE,
    DEMO_INFO_FILE,
    DEMO_VISION_FILE,
    PRETRAIN_INFO_FILE,
    BaseSpec,
    build_base,
    vision_file_sha256,
)
from model.errors import ModelInputError
from model.evaluate import assess
from model.feed import build_inputs, predict
from model.finetune import (
    ADAPTER_FILE,
    LORA_DIR,
    PEFT_PREFIX,
    apply_lora,
    save_adapter_file,
    save_lora,
    trainable_state,
)
from model.fusion import refit_note_fusion
from model.initialise import data_dependent_init, fit_note_numbers
from model.types import CLASSES

logger = logging.getLogger(__name__)


CHECKPOINT_FILE = "checkpoint.pt"


SUMMARY_FILE = "run.json"

__all__ = ["ADAPTER_FILE", "CHECKPOINT_FILE", "LORA_DIR", "SUMMARY_FILE", "TrainConfig", "export_demo", "train"]


PROJECTIONS = ("mm_vision_proj", "mm_language_proj", "logit_scale")


#: Trained at the heads' learning rate: the heads and the note-number layer (new in every base).
HEADS = ("image_head", "fusion_head", "note_numbers")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    Parameters
    ----------
    manifest : str
        Manifest CSV (see :mod:`model.dataset`).
    out_dir : str
        Run folder.
    inputs : {"mri", "note", "mri+note"}
        What enters the model ("note": the MRI replaced by an empty volume).
    preset : str
        FPM, TLP or BRAIN_ADAPTER.
    base : str
        Base model directory (e.g. from ``dicom-node model import-m3d-clip``).
    demo_base : bool
        Train on the demonstration base at the cohort's size instead; exactly one of
        ``base`` and ``demo_base`` must be given.
    base_seed : int
        Seed of the demonstration base.
    demo_vision : str
        Pretrained vision file for the demonstration base (``dicom-node model
        pretrain``, e.g. ``model/demo/vision.safetensors``); empty: its seeded random ViT.
    lora_rank : int
        LoRA rank on the frozen ViT's attention (0: no LoRA).
    lora_alpha : int or None
        LoRA alpha; the rank by default (scale 1).
    epochs, batch_size : int
        Epochs and batch size.
    lr_adapter, lr_projection, lr_head, lr_lora : float
        AdamW learning rate of each parameter group.
    weight_decay : float
        AdamW weight decay.
    test_fraction : float
        Fraction of subjects held out for the test.
    val_fraction : float
        Fraction of the remaining (training) subjects held out to fit the temperature
        (:mod:`model.calibration`); 0: no calibration (T = 1).
    preprocessing : str or None
        The serving configuration's preprocessing identity; the manifest must carry
        it (:func:`model.dataset.check_preprocessing`).  None: not checked.
    seed : int
        Seed of the split, the shuffles and the training randomness.
    activation_checkpointing : bool
        Recompute the ViT's block activations in the backward pass (memory).
    bf16 : bool or None
        bfloat16 autocast; None: on for CUDA, off on CPU.
    device : str
        Torch device.
    max_steps : int or None
        Stop (with a checkpoint) after this many optimizer steps in total.
    resume : bool
        Continue from the run folder's checkpoint.
    progress : bool
        Show progress bars (stderr).
    data_init : bool or None
        Whiten the projections on training data first (:func:`model.initialise.data_dependent_init`);
        None: only for the demonstration base.
    note_numbers : bool
        The demonstration base's fusion head also reads the note's parsed numbers
        (:mod:`model.notenumbers`), standardised with the training scans'
        statistics; ignored for ``inputs="mri"`` (no note).
    refit_fusion : bool
        After the last epoch, solve a numbers-only late fusion exactly on the training
        scans (:func:`model.fusion.refit_note_fusion`); no effect on other models.
    """

    manifest: str
    out_dir: str
    inputs: str = "mri+note"
    preset: str = Preset.BRAIN_ADAPTER.value
    base: str = ""
    demo_base: bool = False
    base_seed: int = 0
    demo_vision: str = ""
    lora_rank: int = 0
    lora_alpha: int | None = None
    epochs: int = 9
    batch_size: int = 8
    lr_adapter: float = 1e-3
    lr_projection: float = 1e-4
    lr_head: float = 1e-3
    lr_lora: float = 1e-4
    weight_decay: float = 0.01
    test_fraction: float = 0.3
    val_fraction: float = 0.15
    preprocessing: str | None = None
    seed: int = 0
    activation_checkpointing: bool = False
    bf16: bool | None = None
    device: str = "cpu"
    max_steps: int | None = None
    resume: bool = False
    progress: bool = True
    data_init: bool | None = None
    note_numbers: bool = False
    refit_fusion: bool = True

    def __post_init__(self) -> None:
        """Validate.

        Raises
        ------
        ModelInputError
            On an unknown input mode or preset, non-positive sizes, or no (or two) bases.
        """
        if self.lora_rank < 0:
            raise ModelInputError(f"the LoRA rank must not be negative (0: no LoRA), got {self.lora_rank}")
        if self.inputs not in ("mri", "note", "mri+note"):
            raise ModelInputError(f"inputs must be mri, note or mri+note, got {self.inputs!r}")
        if self.preset not in {p.value for p in Preset}:
            raise ModelInputError(f"preset must be one of {[p.value for p in Preset]}, got {self.preset!r}")
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ModelInputError("epochs and batch_size must be positive")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ModelInputError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if bool(self.base) == self.demo_base:
            raise ModelInputError(
                "train needs either --base MODEL_DIR (e.g. made by `dicom-node model import-m3d-clip`) or "
                "--demo-base (the seeded random demonstration base)" if not self.base
                else "train takes --base or --demo-base, not both")
        if self.demo_vision and not self.demo_base:
            raise ModelInputError("a pretrained vision file (--demo-vision) belongs to the demonstration base "
                                  "(--demo-base)")
        if self.note_numbers and not self.demo_base:
            raise ModelInputError("note numbers (--note-numbers) are built into the demonstration base "
                                  "(--demo-base); a base model directory reads them when its configuration does")


def base_spec(config: TrainConfig, size: int) -> BaseSpec:
    """The base a run starts from (see :class:`TrainConfig`)."""
    if not config.demo_base:
        return BaseSpec(kind="dir", path=str(Path(config.base).resolve()))
    vision = Path(config.demo_vision).resolve() if config.demo_vision else None
    return BaseSpec(kind="demo", size=size, seed=config.base_seed, use_note=config.inputs != "mri",
                    vision=str(vision) if vision else "", vision_sha256=vision_file_sha256(vision) if vision else "",
                    text_pooling="mean", note_numbers=config.note_numbers and config.inputs != "mri")


def prepare_model(spec: BaseSpec, preset: str, inputs: str) -> tuple[BrainAdapter, str]:
    """Build the base and set the preset; check the base suits the inputs.

    Parameters
    ----------
    spec : BaseSpec
        The base.
    preset : str
        Preset to train.
    inputs : str
        Input mode.

    Returns
    -------
    tuple
        ``(model, base_weights_sha256)``.

    Raises
    ------
    ModelInputError
        When notes are wanted but the base has no text tower.
    """
    model, digest = build_base(spec)
    if inputs != "mri" and model.fusion_head is None:
        raise ModelInputError(f"inputs {inputs!r} need a base with a text tower (use_note)")
    model.config = replace(model.config, preset=Preset(preset))
    model.apply_preset()
    return model, digest


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: adapter, projections, heads (and LoRA), each with its learning rate.

    ``model`` is a :class:`BrainAdapter` or its peft wrapper (:func:`model.finetune.apply_lora`).
    """
    groups: dict[str, list[torch.nn.Parameter]] = {"adapter": [], "projections": [], "heads": [], "lora": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        top = name.removeprefix(PEFT_PREFIX).split(".")[0]
        key = ("lora" if ".lora_" in name else "adapter" if top == "adapter"
               else "projections" if top in PROJECTIONS else "heads")
        if key != "lora" and top not in ("adapter", *PROJECTIONS, *HEADS):
            raise ModelInputError(f"unexpected trainable parameter {name}")
        groups[key].append(param)
    rates = {"adapter": config.lr_adapter, "projections": config.lr_projection, "heads": config.lr_head,
             "lora": config.lr_lora}
    return [{"params": p, "lr": rates[k], "name": k} for k, p in groups.items() if p]


def _autocast(config: TrainConfig, device: torch.device) -> Any:
    use = config.bf16 if config.bf16 is not None else device.type == "cuda"
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train(config: TrainConfig) -> Path:
    """Run (or resume) one training run.

    Parameters
    ----------
    config : TrainConfig
        The run's settings.

    Returns
    -------
    Path
        The run folder, holding ``adapter.safetensors``, ``run.json`` and ``MODEL_CARD.md``.

    Raises
    ------
    ModelInputError
        On a bad manifest, volumes of mixed shape or another preprocessing than
        ``config.preprocessing``, or a mismatched resume.
    """
    started = time.perf_counter()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    samples = read_manifest(Path(config.manifest))
    preprocessing = check_preprocessing(samples, config.preprocessing)
    train_idx, test_idx = subject_split(samples, config.test_fraction, config.seed)
    fit_idx, val_idx = split_indices(samples, train_idx, config.val_fraction, config.seed + 1)
    shape = tuple(int(v) for v in np.load(samples[0].volume, mmap_mode="r").shape)
    if len(shape) != 3 or len(set(shape)) != 1:
        raise ModelInputError(f"volumes must be cubes (D, H, W); got {shape}")
    spec = base_spec(config, shape[0])
    model, base_sha = prepare_model(spec, config.preset, config.inputs)
    if tuple(model.config.input_size) != shape:
        raise ModelInputError(f"the base expects {model.config.input_size} volumes, the manifest has {shape}")
    if config.activation_checkpointing:
        model.vision_encoder.config = replace(model.vision_encoder.config, gradient_checkpointing=True)
    device = torch.device(config.device)
    model.to(device)
    inputs = build_inputs(model, samples, config.inputs)
    fit_note_numbers(model, inputs, fit_idx)
    if config.data_init if config.data_init is not None else spec.kind == "demo":  # resume overwrites it
        data_dependent_init(model, inputs, fit_idx, device)
    # With LoRA, ``net`` is the peft wrapper; ``model`` (the same modules) is what predict and loss use.
    net: torch.nn.Module = apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha) if config.lora_rank \
        else model
    optimizer = torch.optim.AdamW(parameter_groups(net, config), weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(fit_idx) / config.batch_size)
    epoch, batch_pos, step, history = 0, 0, 0, []
    ckpt_path = out / CHECKPOINT_FILE
    if config.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt["base_weights_sha256"] != base_sha:
            raise ModelInputError(f"checkpoint {ckpt_path} belongs to another base model")
        net.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, batch_pos, step, history = ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["history"]
        torch.set_rng_state(ckpt["torch_rng"])
        logger.info("resumed run %s at epoch %d, batch %d (step %d)", out.name, epoch, batch_pos, step)

    def save_checkpoint() -> None:
        torch.save({"trainable": trainable_state(net), "optimizer": optimizer.state_dict(), "epoch": epoch,
                    "batch": batch_pos, "step": step, "history": history, "torch_rng": torch.get_rng_state(),
                    "base_weights_sha256": base_sha}, ckpt_path)

    stopped = False
    while epoch < config.epochs and not stopped:
        net.train()
        t0 = time.perf_counter()
        losses: list[float] = []
        order = list(batches(fit_idx, config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch))
        bar = tqdm(order[batch_pos:], desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress,
                   initial=batch_pos, total=steps_per_epoch, leave=False)
        for idx in bar:
            batch = inputs.batch(idx).to(device)
            with _autocast(config, device):
                output = net(batch.volume, **batch.model_kwargs())
                loss = model.loss(output, inputs.labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            batch_pos, step = batch_pos + 1, step + 1
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if config.max_steps is not None and step >= config.max_steps:
                stopped = True
                break
        if not stopped or batch_pos >= steps_per_epoch:
            history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None,
                            "seconds": round(time.perf_counter() - t0, 2)})
            logger.info("epoch %d/%d: loss %.4f", epoch + 1, config.epochs, history[-1]["loss"] or float("nan"))
            epoch, batch_pos = epoch + 1, 0
        save_checkpoint()
    model.eval()
    fusion = refit_note_fusion(model, inputs, fit_idx, config.batch_size) if config.refit_fusion else None
    val = predict(model, inputs, val_idx, config.batch_size)
    temperature = fit_temperature(val.logits, np.asarray([samples[i].label for i in val_idx]))
    meta = {"temperature": repr(temperature), "preprocessing_version": preprocessing}
    if config.lora_rank:
        save_lora(net, out / LORA_DIR, base_weights_sha256=base_sha, preset=Preset(config.preset), metadata=meta)
    else:
        save_adapter_file(model, out / ADAPTER_FILE, base_weights_sha256=base_sha, preset=Preset(config.preset),
                          metadata=meta)
    test = predict(model, inputs, test_idx, config.batch_size, temperature=temperature)
    assessment = assess([samples[i] for i in test_idx], test, temperature, seed=config.seed)
    summary = {
        "format": "brain-adapter-run", "config": asdict(config), "base": spec.to_dict(),
        "base_weights_sha256": base_sha, "manifest_sha256": manifest_sha256(Path(config.manifest)),
        "preprocessing_version": preprocessing, "input_shape": list(shape), "finished": epoch >= config.epochs,
        "epochs_done": epoch, "steps": step,
        "split": {"train_subjects": sorted({samples[i].subject_id for i in fit_idx}),
                  "validation_subjects": sorted({samples[i].subject_id for i in val_idx}),
                  "test_subjects": sorted({samples[i].subject_id for i in test_idx}),
                  "train_scans": len(fit_idx), "validation_scans": len(val_idx), "test_scans": len(test_idx),
                  "labels": {part: {c: sum(samples[i].label == k for i in idx) for k, c in enumerate(CLASSES)}
                             for part, idx in (("train", fit_idx), ("validation", val_idx), ("test", test_idx))},
                  "notes": {part: int(inputs.notes_present[idx].sum()) if idx else 0
                            for part, idx in (("train", fit_idx), ("validation", val_idx), ("test", test_idx))}},
        "trainable_parameters": {g["name"]: sum(p.numel() for p in g["params"])
                                 for g in parameter_groups(net, config)},
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha or config.lora_rank, "folder": LORA_DIR}
        if config.lora_rank else None,
        "history": history, "fusion_refit": fusion, "temperature": temperature, "test_metrics": assessment["metrics"],
        "test_intervals": assessment["intervals"], "calibration": {
            **assessment["calibration"], "validation_scans": len(val_idx),
            "validation_nll_raw": nll(val.logits, [samples[i].label for i in val_idx]) if val_idx else None,
            "validation_nll_calibrated": nll(val.logits, [samples[i].label for i in val_idx], temperature)
            if val_idx else None},
        "threads": torch.get_num_threads(), "device": str(device),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    write_model_card(out / MODEL_CARD_FILE, summary)
    logger.info("run %s: %d steps, test macro F1 %.3f", out.name, step,
                assessment["metrics"]["macro avg"]["f1"])
    return out


def export_demo(run_dir: Path, demo_dir: Path, *, command: str = "") -> Path:
    """Copy a finished demonstration-base run's trained parts into a demonstration folder.

    Parameters
    ----------
    run_dir : Path
        A finished run on the seeded demonstration base with notes.
    demo_dir : Path
        Destination (``model/demo`` for the committed model).
    command : str
        The command that produced the run, recorded for provenance.

    Returns
    -------
    Path
        ``demo_dir``.

    Raises
    ------
    ModelInputError
        When the run did not finish or is not on the demonstration base with notes.
    """
    summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text(encoding="utf-8"))
    base = BaseSpec.from_dict(summary["base"])
    if base.kind != "demo" or not base.use_note or not summary["finished"] or summary.get("lora"):
        raise ModelInputError("only a finished run on the demonstration base with notes (without LoRA) can "
                              "become the demo model")
    if 256 % base.size:
        raise ModelInputError(f"the demo model must accept 256^3; trained size {base.size} does not divide 256")
    demo_dir = Path(demo_dir)
    demo_dir.mkdir(parents=True, exist_ok=True)
    (demo_dir / DEMO_ADAPTER_FILE).write_bytes((Path(run_dir) / ADAPTER_FILE).read_bytes())
    if base.vision:  # the pretrained vision file goes with the parts, named relative to the folder
        source, target = Path(base.vision), demo_dir / DEMO_VISION_FILE
        if source.resolve() != target.resolve():
            target.write_bytes(source.read_bytes())
            if (source.parent / PRETRAIN_INFO_FILE).is_file():
                (demo_dir / PRETRAIN_INFO_FILE).write_bytes((source.parent / PRETRAIN_INFO_FILE).read_bytes())
        base = replace(base, vision=DEMO_VISION_FILE)
    info = {"base": base.to_dict(), "base_weights_sha256": summary["base_weights_sha256"],
            "input_pool": 256 // base.size, "command": command, "config": summary["config"],
            "split": {k: summary["split"][k] for k in ("train_scans", "test_scans")},
            "trainable_parameters": summary["trainable_parameters"], "test_metrics": summary["test_metrics"],
            "manifest_sha256": summary["manifest_sha256"]}
    (demo_dir / DEMO_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return demo_dir

