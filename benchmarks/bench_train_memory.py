"""Peak resident memory of ``train`` for 100 vs 1,000 scans: memory must not grow with the cohort.

Writes one synthetic manifest of ``--scans`` (default 1,000) float16 volumes of
``--size``^3 (default 64: 1,000 scans are 512 MiB as float16, 1 GiB as float32,
which the old whole-cohort loader held in memory), each the MNI152 reference of
:mod:`model.cohort` plus seeded noise, labels in ADNI proportions, one or two scans
per subject and a note on every other scan.  Then trains (seeded demonstration
base, MRI + note, one epoch) on its first 100 rows and on all rows, each in its own
process so that ``ru_maxrss`` is that run's peak, and prints one JSON line per run
and the ratio (the target: below 1.2).  ``--eager`` also measures each run with
the whole cohort loaded up front (what ``model.dataset.load_volumes`` did),
for comparison.

Usage::

    .venv/bin/python -m benchmarks.bench_train_memory                 # 100 vs 1,000 scans at 64^3
    .venv/bin/python -m benchmarks.bench_train_memory --size 32 --eager
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def write_cohort(root: Path, scans: int, size: int, seed: int = 0) -> Path:
    """A manifest of ``scans`` volumes (reference brain + noise) with labels and notes.

    Parameters
    ----------
    root : Path
        Output folder.
    scans : int
        Number of scans.
    size : int
        Volume edge (a multiple of 32 dividing 256).
    seed : int
        Seed of every draw.

    Returns
    -------
    Path
        The manifest (``preprocessing_version`` = synthetic).
    """
    from model.cohort import contract_reference, draw_labels
    from model.dataset import SYNTHETIC

    rng = np.random.default_rng(seed)
    reference, _ = contract_reference("mni152", size)
    (root / "volumes").mkdir(parents=True, exist_ok=True)
    labels = draw_labels(scans, rng)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["subject_id", "volume", "note", "label", "preprocessing_version"])
        for i, label in enumerate(labels):
            volume = np.clip(reference + rng.normal(0.0, 0.02, reference.shape), 0.0, 1.0).astype(np.float16)
            np.save(root / "volumes" / f"{i:05d}.npy", volume)
            note = f"MMSE {int(rng.integers(18, 31))}/30." if i % 2 else ""
            writer.writerow([f"B{i // 2:05d}", f"volumes/{i:05d}.npy", note, label, SYNTHETIC])
    return manifest


def head(manifest: Path, rows: int) -> Path:
    """A copy of the manifest with its first ``rows`` rows (same folder, so volume paths hold)."""
    lines = manifest.read_text(encoding="utf-8").splitlines()
    out = manifest.with_name(f"manifest_{rows}.csv")
    out.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return out


def child(manifest: str, out: str, eager: bool) -> dict[str, Any]:
    """One training run in this process; its peak RSS."""
    import torch

    from model.dataset import read_manifest
    from model.train import TrainConfig, train

    keep = None
    if eager:  # the old loader: every volume in one float16 tensor for the whole run
        samples = read_manifest(Path(manifest))
        keep = torch.stack([torch.from_numpy(np.load(s.volume).astype(np.float16)) for s in samples])
    started = time.perf_counter()
    train(TrainConfig(manifest=manifest, out_dir=out, inputs="mri+note", epochs=1, batch_size=8, progress=False,
                      seed=0, demo_base=True))
    rows = len(Path(manifest).read_text(encoding="utf-8").splitlines()) - 1
    return {"scans": rows, "eager": eager, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "held_cohort_mb": round(keep.numel() * 2 / 2**20, 1) if keep is not None else 0.0}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print JSON lines and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=1000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="also measure the old whole-cohort loading")
    parser.add_argument("--child", nargs=3, metavar=("MANIFEST", "OUT", "EAGER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2] == "1")))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-train-memory-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_cohort(root, args.scans, args.size)
        print(json.dumps({"cohort": args.scans, "size": args.size,
                          "seconds_to_write": round(time.perf_counter() - t0, 1)}), flush=True)
        results: dict[tuple[int, bool], dict[str, Any]] = {}
        for eager in ([False, True] if args.eager else [False]):
            for rows, path in ((args.small, head(manifest, args.small)), (args.scans, manifest)):
                out = root / f"run_{rows}_{int(eager)}"
                done = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_memory", "--child", str(path),
                                       str(out), "1" if eager else "0"], check=True, capture_output=True, text=True)
                results[(rows, eager)] = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(results[(rows, eager)]), flush=True)
        for eager in ([False, True] if args.eager else [False]):
            ratio = results[(args.scans, eager)]["peak_rss_mb"] / results[(args.small, eager)]["peak_rss_mb"]
            print(json.dumps({"loading": "eager (old)" if eager else "lazy", "ratio": round(ratio, 3),
                              "target": "< 1.2", "met": ratio < 1.2}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
