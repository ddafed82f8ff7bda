"""Time one full-size Brain-Adapter forward pass: fp32 reference vs optimised variants.

Builds a seeded, untrained model with the published ViT-B (2049 tokens) and the
full adapter, runs one preprocessed-size volume (1 x 256^3) through it and prints
one JSON line per variant: wall time (best of ``--repeats``) and the largest
absolute difference of the class probabilities from the fp32 reference.

Variants: ``fp32`` (SDPA, default kernel), ``fp32-math-attention`` (SDPA forced to
its math kernel, i.e. the unfused reference), ``bf16-autocast``.  The thread count
is set with ``--threads``.

Usage::

    .venv/bin/python benchmarks/bench_inference.py --threads 2 --repeats 2
    .venv/bin/python benchmarks/bench_inference.py --small   # demo-size ViT
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.brain_adapter import BrainAdapter, BrainAdapterConfig, Preset
from model.vit import ViTConfig

logger = logging.getLogger(__name__)


def _build(small: bool, device: torch.device) -> BrainAdapter:
    """Seeded, untrained, image-only model (the text tower does not touch the volume path)."""
    torch.manual_seed(0)
    cfg = BrainAdapterConfig(
        vit=ViTConfig.small() if small else ViTConfig.m3d(),
        embed_dim=64 if small else 768,
        preset=Preset.BRAIN_ADAPTER,
        use_note=False,
        adapter_channels=4 if small else 8,
    )
    model = BrainAdapter(cfg)
    with torch.no_grad():  # a non-trivial adapter branch, so it is timed and compared honestly
        for p in model.adapter.branch.parameters():
            p.normal_(std=0.02)
    return model.to(device).eval()


def _time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeats`` calls, and the last result."""
    best = float("inf")
    out = torch.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print JSON lines.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (``sys.argv[1:]`` by default).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="demo-size ViT instead of ViT-B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = _build(args.small, device)
    volume = torch.rand(1, 1, 256, 256, 256, generator=torch.Generator().manual_seed(1)).to(device)
    autocast_type = "cuda" if device.type == "cuda" else "cpu"

    def run(ctx: Callable[[], AbstractContextManager[object]]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode(), ctx():
                return torch.softmax(model(volume).logits.float(), dim=-1)

        return call

    variants: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "fp32": nullcontext,
        "fp32-math-attention": lambda: sdpa_kernel(SDPBackend.MATH),
        "bf16-autocast": lambda: torch.autocast(autocast_type, dtype=torch.bfloat16),
    }
    reference: torch.Tensor | None = None
    for name, ctx in variants.items():
        seconds, probs = _time(run(ctx), args.repeats)
        if reference is None:
            reference = probs
        diff = float((probs - reference).abs().max())
        print(json.dumps({
            "variant": name,
            "vit": "small" if args.small else "ViT-B (2049 tokens)",
            "device": str(device),
            "threads": args.threads,
            "seconds": round(seconds, 3),
            "max_abs_prob_diff_vs_fp32": diff,
        }), flush=True)


if __name__ == "__main__":
    main()
