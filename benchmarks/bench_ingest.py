"""Ingest throughput: the node's two DIMSE paths and DCMTK's storescp, same run.

Run ``make bench-ingest`` (``python -m benchmarks.bench_ingest``).  A 500-instance
MR series (256x256, 16-bit, explicit VR little endian) is written once, then
sent with DCMTK's ``storescu`` over one association, with ``TCP_NODELAY=1`` in
the environment of both DCMTK tools (DCMTK sets TCP_NODELAY only then; the node
sets it itself, ``network.tcp_nodelay``), in ``--repeat`` interleaved rounds so
that every receiver meets the same machine (page-cache write-back, other load).
Each round sends the same instances to:

- DCMTK's ``storescp`` (writing files, no fsync: DCMTK never fsyncs), the reference;
- the node's :class:`~dicom_node.net.scp.StorageServer` (spool + SQLite database,
  everything the C-STORE handler does in production) on each DIMSE path
  (``network.dimse_path``): ``lean`` (the node parses P-DATA itself) and
  ``public`` (pynetdicom's public API: ``EVT_C_STORE`` with
  ``STORE_RECV_CHUNKED_DATASET``, the data set streamed to a file, not
  decoded; the same event-driven, bounded association loops as the lean
  path), each with ``storage.fsync = true`` (the default) and ``false``.
  The order of the four node runs turns from round to round.

Then 8 ``storescu`` senders in parallel to the node (lean path, fsync on; ``--senders 0`` skips it).

Prints instances per second (the best round of each receiver, and every round),
``ratio: X`` (lean, no fsync / storescp, the like-for-like figure),
``ratio_fsync: X`` (lean, durable default / storescp), ``lean/public`` with fsync
on and off, and the decision on the lean path: it is kept only if it is at least
:data:`KEEP_RATIO` times as fast as the public path with the default settings
(fsync on).  With ``--profile``, where the handler's time goes.  DCMTK's tools
are called by full path (pynetdicom installs its own ``storescu``/``storescp`` scripts).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.cli.localpacs import free_port, wait_for
from dicom_node.db.session import CHECKPOINT_INTERVAL_S, checkpoint, open_database
from dicom_node.ingest.recorder import Recorder
from dicom_node.ingest.spool import Spool
from dicom_node.net.scp import StorageServer
from dicom_node.settings import load_settings

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
#: The lean DIMSE path stays only if lean/public (fsync on, the default) is at least this.
KEEP_RATIO = 1.5
#: The node's configurations, as (DIMSE path, storage.fsync).
NODE_RUNS = (("lean", True), ("public", True), ("lean", False), ("public", False))


def write_series(out: Path, count: int, size: int = 256) -> list[Path]:
    """One MR series of *count* single-frame 16-bit instances."""
    out.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = np.random.default_rng(0).integers(0, 4000, (size, size), dtype=np.uint16).tobytes()
    paths = []
    for index in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
        ds.Modality, ds.PatientName, ds.PatientID = "MR", "Bench^Series", "BENCH-0001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 1, index + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(index)]
        ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels
        path = out / f"mr{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, files: list[Path], called: str) -> float:
    """Send *files* over one association; returns the seconds it took."""
    start = time.perf_counter()
    result = subprocess.run([STORESCU, "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                            env=DCMTK_ENV, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"storescu failed: {result.stderr[-2000:]}")
    return seconds


def bench_storescp(files: list[Path], work: Path) -> float:
    """Instances per second into DCMTK's storescp."""
    out = work / "storescp"
    out.mkdir(parents=True)
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-od", str(out), str(port)], env=DCMTK_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _accepts(port), 10, "storescp")
        seconds = storescu(port, files, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait()
    return len(files) / seconds


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_node(work: Path, fsync: bool, path: str = "lean") -> StorageServer:
    """The node's Storage SCP (DIMSE path *path*) on a free port, SQLite database under *work*."""
    settings = load_settings(environ={}, overrides={
        "storage.data_dir": str(work), "network.port": 0, "network.allowed_calling_ae_titles": ["BENCH"],
        "storage.fsync": fsync, "storage.free_space_reserve_mb": 0, "network.max_associations": 16,
        "network.dimse_path": path, "destinations": [],
    })
    db = open_database(settings.database_url)
    server = StorageServer(settings, Spool.from_settings(settings), Recorder(db.sessions))
    server.start()
    stop = threading.Event()

    def checkpoints() -> None:  # what the node's scheduler does meanwhile (SQLite WAL checkpoints)
        while not stop.wait(CHECKPOINT_INTERVAL_S):
            checkpoint(db.engine)

    threading.Thread(target=checkpoints, daemon=True).start()
    server.stop = _chain(server.stop, stop.set)  # type: ignore[method-assign,assignment]
    return server


def _chain(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        then()
    return both


def bench_node(files: list[Path], work: Path, fsync: bool, profile: bool = False,
               path: str = "lean") -> tuple[float, str]:
    """Instances per second into the node over one association (and a profile of the handler)."""
    server = start_node(work, fsync, path)
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        inner = server._store

        def profiled(*args: object) -> object:
            profiler.enable()
            try:
                return inner(*args)  # type: ignore[arg-type]
            finally:
                profiler.disable()

        server._store = profiled  # type: ignore[method-assign,assignment]
    try:
        seconds = storescu(server.port, files, server.settings.network.ae_title)
    finally:
        server.stop()
    report = ""
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("cumulative").print_stats(25)
        report = stream.getvalue()
    return len(files) / seconds, report


def bench_parallel(batches: list[list[Path]], work: Path, fsync: bool) -> float:
    """Instances per second into the node from len(batches) storescu processes at once."""
    server = start_node(work, fsync)
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(len(batches)) as pool:
            list(pool.map(lambda batch: storescu(server.port, batch, server.settings.network.ae_title), batches))
        seconds = time.perf_counter() - start
    finally:
        server.stop()
    return sum(len(b) for b in batches) / seconds


def _label(path: str, fsync: bool) -> str:
    return f"{path}, storage.fsync={'true' if fsync else 'false'}"


def _rounds(rates: list[float]) -> str:
    return ", ".join(f"{r:.0f}" for r in rates)


def decision(lean_fsync: float, public_fsync: float) -> str:
    """The verdict on the lean DIMSE path from the best rates with fsync on (the default)."""
    ratio = lean_fsync / public_fsync
    if ratio >= KEEP_RATIO:
        return f"decision: keep the lean path (lean/public = {ratio:.2f} >= {KEEP_RATIO} with fsync on)"
    return f"decision: the lean path does not earn its keep ({ratio:.2f} < {KEEP_RATIO}): remove it"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500, help="instances in the series (default 500)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved rounds (storescp and the four node runs); the best of each is compared")
    parser.add_argument("--senders", type=int, default=8, help="parallel senders for the last figure (0: skip it)")
    parser.add_argument("--per-sender", type=int, default=250, help="instances per parallel sender")
    parser.add_argument("--profile", action="store_true", help="profile the C-STORE handler (lean, no fsync)")
    args = parser.parse_args(argv)
    scp_rates: list[float] = []
    node_rates: dict[tuple[str, bool], list[float]] = {run: [] for run in NODE_RUNS}
    report = ""
    parallel = None
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        files = write_series(work / "series", args.count)
        for round_ in range(args.repeat):  # interleaved, so that all see the same machine
            scp_rates.append(bench_storescp(files, work / f"round{round_}"))
            shift = round_ % len(NODE_RUNS)  # no configuration always runs first (or right after storescp)
            for path, fsync in NODE_RUNS[shift:] + NODE_RUNS[:shift]:
                profile = args.profile and round_ == 0 and path == "lean" and not fsync
                rate, text = bench_node(files, work / f"round{round_}" / f"node-{path}-{int(fsync)}", fsync=fsync,
                                        profile=profile, path=path)
                node_rates[(path, fsync)].append(rate)
                report = text or report
        if args.senders > 0:
            batches = [write_series(work / f"sender{i}", args.per_sender) for i in range(args.senders)]
            parallel = bench_parallel(batches, work / "node-parallel", fsync=True)
    scp = max(scp_rates)
    best = {run: max(rates) for run, rates in node_rates.items()}
    print(f"instances: {args.count} (256x256, 16-bit MR), one association, TCP_NODELAY on, "
          f"{args.repeat} interleaved rounds (best of each)")
    print(f"storescp: {scp:.0f} instances/s  (rounds: {_rounds(scp_rates)})")
    for run in NODE_RUNS:
        print(f"node ({_label(*run)}): {best[run]:.0f} instances/s  (rounds: {_rounds(node_rates[run])})")
    if parallel is not None:
        print(f"node, {args.senders} parallel senders x {args.per_sender} (lean, fsync=true): "
              f"{parallel:.0f} instances/s")
    lean_nofsync = node_rates[("lean", False)]
    print(f"ratio_rounds: {', '.join(f'{n / s:.2f}' for n, s in zip(lean_nofsync, scp_rates, strict=True))}")
    print(f"ratio_fsync: {best[('lean', True)] / scp:.2f}")
    print(f"ratio: {best[('lean', False)] / scp:.2f}")
    print(f"ratio_public_fsync: {best[('public', True)] / scp:.2f}")
    print(f"ratio_public: {best[('public', False)] / scp:.2f}")
    for fsync in (True, False):
        per_round = ", ".join(f"{a / b:.2f}" for a, b in
                              zip(node_rates[("lean", fsync)], node_rates[("public", fsync)], strict=True))
        print(f"lean/public (storage.fsync={'true' if fsync else 'false'}): "
              f"{best[('lean', fsync)] / best[('public', fsync)]:.2f}  (rounds: {per_round})")
    print(decision(best[("lean", True)], best[("public", True)]))
    if report:
        print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
