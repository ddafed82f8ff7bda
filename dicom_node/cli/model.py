"""``dicom-node cohort prepare``, ``train``, ``evaluate``, ``synth cohort``, ``model import-m3d-clip``, ``export``.

``cohort prepare`` runs the node's own selection, conversion and preprocessing,
with the node's own settings (:mod:`dicom_node.runs.context`), on a labelled
cohort (:mod:`model.prepare` does the work); ``train`` and ``evaluate`` refuse a
manifest whose preprocessing differs from the one the node serves with
(``PREPROCESSING_VERSION`` and the settings' hash, :func:`serving_preprocessing`).
``train`` needs a base: ``--base DIR`` (``model import-m3d-clip`` makes one from
M3D-CLIP) or, explicitly, ``--demo-base``; ``model export`` makes a finished run a
model directory the node serves (trained parts bound to the base, calibration
temperature applied).

Listed in :data:`dicom_node.cli.main.EXTENSIONS`; torch and the model code are imported
only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from dicom_node.settings import Settings

logger = logging.getLogger(__name__)


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add the ``cohort prepare``, ``train``, ``evaluate`` and ``synth cohort`` sub-commands.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The top-level sub-command set.
    common : argparse.ArgumentParser
        Parent parser with the common flags (``--device`` among them).
    """
    train = sub.add_parser("train", parents=[common], help="train the Brain-Adapter on a manifest of volumes and notes")
    train.add_argument("manifest", type=Path, help="CSV: subject_id, volume (.npy), note, label")
    train.add_argument("--out", type=Path, required=True, help="run folder (checkpoint, adapter file, run.json)")
    train.add_argument("--inputs", choices=["mri", "note", "mri+note"], default="mri+note")
    train.add_argument("--preset", choices=["FPM", "TLP", "BRAIN_ADAPTER"], default="BRAIN_ADAPTER")
    base = train.add_mutually_exclusive_group()
    base.add_argument("--base", type=Path, help="base model directory (e.g. from `dicom-node model import-m3d-clip`)")
    base.add_argument("--demo-base", action="store_true",
                      help="train on the demonstration base instead (seeded; its ViT random unless --demo-vision)")
    train.add_argument("--base-seed", type=int, default=0, help="seed of the demonstration base")
    train.add_argument("--demo-vision", type=Path,
                       help="pretrained vision file for --demo-base (`dicom-node model pretrain`), "
                            "e.g. model/demo/vision.safetensors")
    train.add_argument("--note-numbers", action="store_true",
                       help="the demonstration base's fusion head also reads the note's parsed numbers "
                            "(age, education, MMSE, CDR-SB, memory complaints; model/notenumbers.py)")
    train.add_argument("--no-refit-fusion", action="store_true",
                       help="keep the note-number fusion as trained by SGD (default: solved exactly after the "
                            "last epoch, model/fusion.py)")
    train.add_argument("--lora", type=int, default=0, metavar="R",
                       help="LoRA of rank R on the frozen ViT's attention (peft; 0: none)")
    train.add_argument("--lora-alpha", type=int, help="LoRA alpha (default: R)")
    train.add_argument("--lr-lora", type=float, default=1e-4)
    train.add_argument("--epochs", type=int, default=9)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr-adapter", type=float, default=1e-3)
    train.add_argument("--lr-projection", type=float, default=1e-4)
    train.add_argument("--lr-head", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--test-fraction", type=float, default=0.3)
    train.add_argument("--val-fraction", type=float, default=0.15,
                       help="fraction of the training subjects held out to fit the temperature (0: none)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--activation-checkpointing", action="store_true")
    train.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bfloat16 autocast (default: on for CUDA, off on CPU)")
    train.add_argument("--max-steps", type=int)
    train.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    train.add_argument("--no-progress", action="store_true")
    train.add_argument("--export-demo", type=Path, help="after training, write the demonstration model's files here")

    evaluate = sub.add_parser("evaluate", parents=[common], help="evaluate trained runs side by side")
    evaluate.add_argument("runs", type=Path, nargs="+", help="run folders written by `dicom-node train`")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for confusion.png, tsne.png, metrics.json")
    evaluate.add_argument("--manifest", type=Path, help="evaluate on this manifest (default: each run's test subjects)")
    evaluate.add_argument("--names", nargs="+", help="column names, one per run")
    evaluate.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates of the 95 %% intervals")

    cohort_group = sub.add_parser("cohort", help="labelled cohorts").add_subparsers(dest="cohort_command",
                                                                                    required=True)
    prepare = cohort_group.add_parser(
        "prepare", parents=[common],
        help="select, convert and preprocess a labelled cohort as the node does (training manifest)")
    prepare.add_argument("labels", type=Path,
                         help="CSV: scan_id, subject_id, label, scan_date, note (optional), "
                              "path (DICOM folder or NIfTI)")
    prepare.add_argument("--out", type=Path, required=True, help="output folder (manifest, failures, volumes cache)")
    prepare.add_argument("--jobs", type=int, default=1, help="scans prepared in parallel (processes)")
    prepare.add_argument("--size", type=int, default=256,
                         help="edge of the saved volumes; below 256: average pooling, as input_pool does")
    prepare.add_argument("--float16", action="store_true", help="save float16 volumes (half the disk)")
    prepare.add_argument("--label-map", nargs="+", metavar="FROM=TO", help="more label converters, e.g. EMCI=MCI")
    prepare.add_argument("--no-progress", action="store_true")

    synth = sub.add_parser("synth", help="synthetic data").add_subparsers(dest="synth_command", required=True)
    cohort = synth.add_parser("cohort", parents=[common], help="an ADNI-like synthetic cohort for training")
    cohort.add_argument("--out", type=Path, required=True)
    cohort.add_argument("--subjects", type=int, default=200)
    cohort.add_argument("--size", type=int, default=64, help="volume edge (divides 256)")
    cohort.add_argument("--seed", type=int, default=0)
    cohort.add_argument("--reference", choices=["mni152", "colin27"], default="mni152")


def add_model_commands(model: Any, common: argparse.ArgumentParser) -> None:
    """Add ``import-m3d-clip``, ``export`` and ``pretrain`` to the ``model`` command group.

    Parameters
    ----------
    model : argparse._SubParsersAction
        The ``model`` group's sub-command set (made by :mod:`dicom_node.cli.main`).
    common : argparse.ArgumentParser
        Parent parser with the common flags.
    """
    imp = model.add_parser("import-m3d-clip", parents=[common],
                           help="make a training base from a local copy of the published M3D-CLIP folder")
    imp.add_argument("src", type=Path, help="folder: config.json, model.safetensors or pytorch_model.bin, tokenizer")
    imp.add_argument("--out", type=Path, required=True, help="base model directory to write")
    imp.add_argument("--text-config", type=Path,
                     help="BERT config.json of the text tower (default: bert-base-uncased, as published)")
    imp.add_argument("--input-size", type=int, default=256,
                     help="edge of the volumes the base receives (default 256, the node's input)")
    imp.add_argument("--image-only", action="store_true", help="leave the text tower out")
    imp.add_argument("--name", default="Brain-Adapter base (M3D-CLIP)")
    imp.add_argument("--version", help="model version (default: from the weights' SHA-256)")
    export = model.add_parser("export", parents=[common],
                              help="write a finished training run as a model directory the node serves")
    export.add_argument("run", type=Path, help="run folder written by `dicom-node train`")
    export.add_argument("--out", type=Path, required=True, help="model directory to write")
    export.add_argument("--name", default="Brain-Adapter")
    export.add_argument("--version", help="model version (default: 0.1.0+<run folder name>)")
    pretrain = model.add_parser(
        "pretrain", parents=[common],
        help="pretrain the demonstration base's ViT by self-supervision on unlabeled synthetic brains")
    pretrain.add_argument("--out", type=Path, required=True,
                          help="folder for vision.safetensors and pretrain.json (model/demo for the committed model)")
    pretrain.add_argument("--size", type=int, default=64, help="volume edge (the cohort's; a multiple of 32)")
    pretrain.add_argument("--steps", type=int, default=200)
    pretrain.add_argument("--batch-size", type=int, default=16, help="anatomies per step (two views each)")
    pretrain.add_argument("--seed", type=int, default=20_000, help="seed of the volumes and augmentations")
    pretrain.add_argument("--base-seed", type=int, default=0, help="seed of the base whose ViT is pretrained")
    pretrain.add_argument("--threads", type=int, default=2,
                          help="torch CPU threads (the result is reproducible for a given thread count)")
    pretrain.add_argument("--train-adapter", action="store_true", help="pretrain the depth adapter too")
    export.add_argument("--clinical", action="store_true",
                        help="the site has validated the model: reports drop the demonstration notice "
                             "(refused for runs on the demonstration base or synthetic data)")


def _import_m3d_clip(args: argparse.Namespace) -> int:
    from model.checkpoint import WEIGHTS_FILE, sha256_file
    from model.m3d_import import import_m3d_clip

    out = import_m3d_clip(args.src, args.out, text_config=args.text_config, input_size=args.input_size,
                          use_note=not args.image_only, name=args.name, version=args.version)
    print(f"base written to {out} (weights sha256 {sha256_file(out / WEIGHTS_FILE)}); "
          f"train on it with `dicom-node train MANIFEST --base {out} --out RUN`")
    return 0


def _export(args: argparse.Namespace) -> int:
    from model.export import export_run
    from model.inference import Predictor

    out = export_run(args.run, args.out, name=args.name, version=args.version, demonstration=not args.clinical)
    info = Predictor.load(out).info
    print(f"model written to {out}: {info.name} {info.version}, sha256 {info.weights_sha256}, "
          f"temperature {info.parameters['temperature']}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from model.pretrain import PretrainConfig, pretrain_demo_base

    config = PretrainConfig(size=args.size, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                            base_seed=args.base_seed, threads=args.threads, train_adapter=args.train_adapter)
    weights = pretrain_demo_base(config, args.out)
    print(f"pretrained vision file written to {weights}; train on it with "
          f"`dicom-node train MANIFEST --demo-base --demo-vision {weights} --out RUN`")
    return 0


def serving_preprocessing(settings: Settings) -> str:
    """The preprocessing identity of the node's serving configuration (version + settings hash).

    Parameters
    ----------
    settings : Settings
        Node settings (``processing.registration``, ``processing.n4``, ...).

    Returns
    -------
    str
        What a manifest's ``preprocessing_version`` must be for ``train`` and ``evaluate``.
    """
    from dicom_node.runs.context import preprocess_config
    from dicom_node.runs.processing import PREPROCESSING_VERSION
    from model.prepare import preprocessing_identity

    return preprocessing_identity(PREPROCESSING_VERSION, preprocess_config(settings))


def _cohort_prepare(args: argparse.Namespace, settings: Settings) -> int:
    import hashlib

    from dicom_node.runs.context import preprocess_config, series_rules
    from model.labels import parse_label_map, read_labels
    from model.prepare import PrepareSettings, prepare_cohort

    if args.jobs < 1 or args.size < 1 or 256 % args.size:
        print("dicom-node: error: --jobs must be positive and --size must divide 256", file=sys.stderr)
        return 2
    rows = read_labels(args.labels, parse_label_map(args.label_map))
    config = preprocess_config(settings)
    prep = PrepareSettings(rules=series_rules(settings), preprocess=config, identity=serving_preprocessing(settings),
                           rules_sha256=hashlib.sha256(settings.series_rules_path.read_bytes()).hexdigest(),
                           size=args.size, float16=args.float16)
    report = prepare_cohort(rows, args.out, prep, jobs=args.jobs, progress=not args.no_progress,
                            provenance={"series_rules": str(settings.series_rules_path)})
    print(f"{report.prepared} of {len(rows)} scan(s) prepared ({report.cached} from the cache), "
          f"{report.failed} failed; preprocessing {prep.identity}")
    print(f"manifest: {report.manifest}\nfailures: {report.failures}")
    return 0 if report.prepared else 1


def _train(args: argparse.Namespace, settings: Settings) -> int:
    from model.train import TrainConfig, export_demo, train

    config = TrainConfig(
        manifest=str(args.manifest), out_dir=str(args.out), inputs=args.inputs, preset=args.preset,
        base=str(args.base) if args.base else "", demo_base=args.demo_base, base_seed=args.base_seed,
        demo_vision=str(args.demo_vision) if args.demo_vision else "", note_numbers=args.note_numbers,
        lora_rank=args.lora, lora_alpha=args.lora_alpha, lr_lora=args.lr_lora, epochs=args.epochs,
        batch_size=args.batch_size, lr_adapter=args.lr_adapter, lr_projection=args.lr_projection,
        lr_head=args.lr_head, weight_decay=args.weight_decay, test_fraction=args.test_fraction,
        val_fraction=args.val_fraction, preprocessing=serving_preprocessing(settings), seed=args.seed,
        activation_checkpointing=args.activation_checkpointing, bf16=args.bf16, device=args.device or "cpu",
        max_steps=args.max_steps, resume=args.resume, progress=not args.no_progress,
        refit_fusion=not args.no_refit_fusion,
    )
    run = train(config)
    print(f"run written to {run}")
    if args.export_demo:
        out = export_demo(run, args.export_demo, command=shlex.join(["dicom-node", *sys.argv[1:]]))
        print(f"demonstration model files written to {out}")
    return 0


def _evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from model.evaluate import evaluate_runs

    if args.names and len(args.names) != len(args.runs):
        print("dicom-node: error: --names needs one name per run", file=sys.stderr)
        return 2
    table, _ = evaluate_runs(args.runs, args.out, manifest=args.manifest, names=args.names,
                             device=args.device or settings.model.device, n_boot=args.bootstrap,
                             preprocessing=serving_preprocessing(settings))
    print(table)
    print(f"\nconfusion matrix: {args.out / 'confusion.png'}\nt-SNE: {args.out / 'tsne.png'}"
          f"\nreliability diagram: {args.out / 'calibration.png'}")
    return 0


def _synth_cohort(args: argparse.Namespace) -> int:
    from model.cohort import CohortConfig, generate_cohort

    manifest = generate_cohort(args.out, CohortConfig(n_subjects=args.subjects, size=args.size, seed=args.seed,
                                                      reference=args.reference))
    print(f"cohort manifest: {manifest}")
    return 0


def dispatch(args: argparse.Namespace, settings: Settings) -> int | None:
    """Run one of this module's commands; None when the command is not ours.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed arguments.
    settings : Settings
        Node settings: series rules and preprocessing (``cohort prepare``), the serving
        preprocessing that ``train`` and ``evaluate`` check, the model device.

    Returns
    -------
    int or None
        Exit status, or None.
    """
    if args.command == "model" and getattr(args, "model_command", None) == "import-m3d-clip":
        return _import_m3d_clip(args)
    if args.command == "model" and getattr(args, "model_command", None) == "export":
        return _export(args)
    if args.command == "model" and getattr(args, "model_command", None) == "pretrain":
        return _pretrain(args)
    if args.command == "cohort" and getattr(args, "cohort_command", None) == "prepare":
        return _cohort_prepare(args, settings)
    if args.command == "train":
        return _train(args, settings)
    if args.command == "evaluate":
        return _evaluate(args, settings)
    if args.command == "synth" and getattr(args, "synth_command", None) == "cohort":
        return _synth_cohort(args)
    return None
