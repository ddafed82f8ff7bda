"""Time one full-size Brain-Adapter forward (adapter + M3D ViT-B + BERT-base text tower).

Builds a seeded, untrained model with the published sizes (ViT-B on 2049 tokens, a
bert-base-uncased text tower built from its configuration, 768-d projections), a
non-trivial adapter branch and one preprocessed-size volume (1 x 256^3) with a
note of about 120 tokens, and runs each variant in its own process so that the
peak resident memory (``ru_maxrss``) belongs to that variant.  Prints one JSON
line per variant: best wall time of ``--repeats`` forwards, per-stage times
(adapter, ViT, text), peak RSS and the largest absolute difference of the class
probabilities from the fp32 reference.

Variants:

* ``fp32`` - the node's path: SDPA (fused attention), adapter in channels_last_3d.
* ``fp32-math-attention`` - SDPA forced to its unfused math kernel.
* ``fp32-adapter-contiguous`` - adapter convolutions in the default memory format.
* ``fp32-1-thread`` - one intra-op thread.
* ``bf16-autocast`` - bfloat16 autocast (needs AVX512-BF16/AMX to pay off).
* ``int8-dynamic`` - dynamic int8 quantisation of every Linear (weights int8,
  activations quantised on the fly; oneDNN/fbgemm VNNI kernels).
* ``fp32-compile`` - ``torch.compile`` of the ViT (only with ``--compile``: the
  compilation takes minutes on two cores; its time is reported separately).

Usage::

    .venv/bin/python -m benchmarks.bench_inference            # all variants
    .venv/bin/python -m benchmarks.bench_inference --variants fp32 int8-dynamic --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)

VARIANTS = ("fp32", "fp32-math-attention", "fp32-adapter-contiguous", "fp32-1-thread", "bf16-autocast",
            "int8-dynamic", "fp32-compile")
NOTE = ("78-year-old woman, 14 years of education. Frequent memory complaints, reported by a daughter: "
        "misplaces objects, repeats questions, needs help with finances since last year; independent in "
        "personal care. Hypertension, treated. MMSE 24/30, CDR sum of boxes 3.5. Lives with her husband; "
        "no falls; no focal neurological signs. Referred for MRI of the brain.")


def build_full_model() -> Any:
    """Seeded untrained Brain-Adapter at published sizes (BERT-base text tower from config)."""
    from transformers import BertModel

    from model.brain_adapter import BrainAdapter, BrainAdapterConfig, Preset
    from model.m3d_clip import bert_base_uncased_config
    from model.text import TextEncoder, load_text_encoder, packaged_minilm_path
    from model.vit import ViTConfig

    torch.manual_seed(0)
    tokenizer = load_text_encoder(packaged_minilm_path(), with_weights=False).tokenizer  # bert-base-uncased vocab
    bert = BertModel(bert_base_uncased_config(), add_pooling_layer=True).eval()
    text = TextEncoder(model=bert, tokenizer=tokenizer, hidden_size=768)
    cfg = BrainAdapterConfig(vit=ViTConfig.m3d(), text_encoder_path="bert-base-uncased (config only)",
                             embed_dim=768, preset=Preset.BRAIN_ADAPTER, use_note=True, adapter_channels=8)
    model = BrainAdapter(cfg, text)
    with torch.no_grad():  # a non-trivial adapter branch, so it is timed and compared honestly
        for p in model.adapter.branch.parameters():
            p.normal_(std=0.02)
    return model.eval()


def _stage_times(model: Any, volume: torch.Tensor, tokens: dict[str, torch.Tensor],
                 ctx: Callable[[], AbstractContextManager[object]]) -> dict[str, float]:
    """Wall time of each stage of one forward."""
    times = {}
    with torch.inference_mode(), ctx():
        t = time.perf_counter()
        reduced = model.adapter(model.input_pool(volume))
        times["adapter_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model.vision_encoder(reduced)
        times["vit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model.encode_text(tokens["input_ids"], tokens["attention_mask"])
        times["text_s"] = time.perf_counter() - t
    return {k: round(v, 3) for k, v in times.items()}


def run_variant(variant: str, repeats: int, reference: Path | None) -> dict[str, Any]:
    """Build the model, apply the variant, time it; compare with the saved reference probabilities."""
    from torch.ao.quantization import quantize_dynamic

    threads = 1 if variant == "fp32-1-thread" else torch.get_num_threads()
    torch.set_num_threads(threads)
    model = build_full_model()
    ctx: Callable[[], AbstractContextManager[object]] = nullcontext
    extra: dict[str, Any] = {}
    if variant == "fp32-math-attention":
        ctx = lambda: sdpa_kernel(SDPBackend.MATH)  # noqa: E731
    elif variant == "bf16-autocast":
        ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    elif variant == "fp32-adapter-contiguous":
        model.adapter.branch.to(memory_format=torch.contiguous_format)
        forward = model.adapter.forward
        model.adapter.forward = lambda x: model.adapter.pool(x) + model.adapter.branch(x)
        del forward
    elif variant == "int8-dynamic":
        for name in ("vision_encoder", "language_encoder"):
            setattr(model, name, quantize_dynamic(getattr(model, name), {torch.nn.Linear}, dtype=torch.qint8))
        if model.text_encoder is not None:
            model.text_encoder.model = model.language_encoder
    elif variant == "fp32-compile":
        model.vision_encoder = torch.compile(model.vision_encoder, dynamic=False)
    volume = torch.rand(1, 1, 256, 256, 256, generator=torch.Generator().manual_seed(1))
    tokens = model.tokenize([NOTE])
    if variant == "fp32-compile":
        t = time.perf_counter()
        with torch.inference_mode():
            model(volume, tokens["input_ids"], tokens["attention_mask"])
        extra["compile_s"] = round(time.perf_counter() - t, 1)
    best, probs = float("inf"), torch.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.inference_mode(), ctx():
            out = model(volume, tokens["input_ids"], tokens["attention_mask"])
            probs = torch.softmax(out.logits.float().double(), dim=-1)
        best = min(best, time.perf_counter() - start)
    diff = None
    if reference is not None and reference.is_file():
        diff = float((probs - torch.load(reference)).abs().max())
    elif reference is not None:
        torch.save(probs, reference)
        diff = 0.0
    return {"variant": variant, "threads": threads, "seconds": round(best, 3),
            **_stage_times(model, volume, tokens, ctx), **extra,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "note_tokens": int(tokens["input_ids"].shape[1]),
            "max_abs_prob_diff_vs_fp32": diff}


def main(argv: list[str] | None = None) -> None:
    """Run the variants, each in a child process, and print JSON lines.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (``sys.argv[1:]`` by default).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS,
                        default=[v for v in VARIANTS if v != "fp32-compile"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        print(json.dumps(run_variant(args.child, args.repeats, args.reference)), flush=True)
        return
    variants = list(dict.fromkeys(["fp32", *args.variants, *(["fp32-compile"] if args.compile else [])]))
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "fp32_probs.pt"
        for variant in variants:
            cmd = [sys.executable, "-m", "benchmarks.bench_inference", "--child", variant,
                   "--repeats", str(args.repeats), "--reference", str(reference)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            print(line if done.returncode == 0 else json.dumps(
                {"variant": variant, "error": done.stderr.strip().splitlines()[-1:]}), flush=True)


if __name__ == "__main__":
    main()
