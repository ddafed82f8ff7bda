"""Prepare a labelled cohort exactly as the node prepares a study (``dicom-node cohort prepare``).

For every row of a labels file (:mod:`model.labels`) this runs the node's own
stages with the node's own settings, which the caller passes in
(``dicom_node.cli.model`` builds them with ``dicom_node.runs.context``):

1. series selection (:func:`pipeline.select.select_series`, the node's rules) over
   the DICOM folder's series -- skipped for a NIfTI file;
2. conversion (:func:`pipeline.convert.convert_series`);
3. preprocessing and QC (:func:`pipeline.preprocess.preprocess`, the node's settings);
4. optionally a fixed average pooling to a smaller cube (``size``), the same
   parameter-free pooling :attr:`model.brain_adapter.BrainAdapterConfig.input_pool`
   applies at inference.

Output folder::

    manifest.csv   the training manifest (model.dataset), with preprocessing_version
    failures.csv   scan_id, subject_id, stage, outcome, reason of every scan not prepared
    cohort.json    preprocessing identity and settings, rules hash, counts
    volumes/       <key>.npy volumes and <key>.json results, the cache

The cache key is the SHA-256 of the source's bytes together with the
preprocessing identity, the rules' hash and the output size and type, so a second
run reuses every scan already done (prepared, or refused by the node: refusals are
deterministic) and redoes a scan whose files or settings changed.  Scans run in
``jobs`` processes.  Logs carry counts only, never a row's identifiers or notes.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.errors import NodeError, NotAnalysed, Outcome
from model.dataset import REQUIRED_COLUMNS
from model.labels import LabelRow
from pipeline.preprocess_config import PreprocessConfig
from pipeline.registration import default_template_path
from pipeline.select import SelectionRules

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.csv"
FAILURES_FILE = "failures.csv"
COHORT_FILE = "cohort.json"
VOLUMES_DIR = "volumes"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: PreprocessConfig fields that do not change the volume (left out of the identity).
NOT_IN_IDENTITY = ("threads", "keep_registered")


def preprocessing_identity(version: str, config: PreprocessConfig) -> str:
    """The identity of a preprocessing: the node's version and a hash of its settings.

    Parameters
    ----------
    version : str
        The node's ``PREPROCESSING_VERSION``.
    config : PreprocessConfig
        The settings (the template's bytes are hashed, not its path).

    Returns
    -------
    str
        ``"<version>+<12 hex digits>"``; equal identities give equal volumes.
    """
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in NOT_IN_IDENTITY}
    template = Path(config.template_path or default_template_path())
    values["template_path"] = hashlib.sha256(template.read_bytes()).hexdigest()
    digest = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    return f"{version}+{digest[:12]}"


@dataclass(frozen=True)
class PrepareSettings:
    """How scans are prepared: the node's settings plus the output format.

    Parameters
    ----------
    rules : SelectionRules
        The node's series-selection rules.
    preprocess : PreprocessConfig
        The node's preprocessing settings and QC limits.
    identity : str
        :func:`preprocessing_identity` of them.
    rules_sha256 : str
        SHA-256 of the rules file.
    size : int
        Edge of the saved cube (divides the preprocessing's ``target_shape``).
    float16 : bool
        Save float16 (half the disk; abs. error <= 2.5e-4) instead of float32.
    """

    rules: SelectionRules
    preprocess: PreprocessConfig
    identity: str
    rules_sha256: str
    size: int = 256
    float16: bool = False

    def cache_salt(self) -> str:
        """What, besides the source, decides a scan's result."""
        return f"{self.identity}|{self.rules_sha256}|{self.size}|{'f2' if self.float16 else 'f4'}"


@dataclass
class ScanResult:
    """What became of one scan.

    Parameters
    ----------
    scan_id : str
        The row's scan id.
    key : str
        Cache key ("" when the source could not be read).
    ok : bool
        Prepared.
    stage, outcome, reason : str
        Where and why it failed ("" when prepared).
    series_instance_uid : str
        The selected series ("" for a NIfTI source).
    source_sha256 : str
        Hash of the source's bytes.
    qc : dict
        QC values of the preprocessing.
    seconds : float
        Time spent (0 when cached).
    cached : bool
        Taken from the cache.
    """

    scan_id: str
    key: str = ""
    ok: bool = False
    stage: str = ""
    outcome: str = ""
    reason: str = ""
    series_instance_uid: str = ""
    source_sha256: str = ""
    qc: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cached: bool = False


def source_files(source: Path) -> list[Path]:
    """The files of a source: the file itself, or every file under a folder, sorted."""
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.is_file())


def source_sha256(source: Path) -> str:
    """SHA-256 over a source's files (relative names and bytes)."""
    digest = hashlib.sha256()
    for path in source_files(source):
        digest.update(str(path.relative_to(source) if path != source else path.name).encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def pool_volume(volume: np.ndarray, size: int) -> np.ndarray:
    """Average-pool a cube to ``size``^3 (the inference-time ``input_pool``)."""
    factor = volume.shape[0] // size
    if factor * size != volume.shape[0] or len(set(volume.shape)) != 1:
        raise NodeError(f"cannot pool a {volume.shape} volume to {size}^3")
    if factor == 1:
        return volume
    return volume.reshape(size, factor, size, factor, size, factor).mean(axis=(1, 3, 5)).astype(np.float32)


def _select_and_convert(source: Path, rules: SelectionRules, scratch: Path, result: ScanResult) -> Path:
    """The chosen series of a DICOM folder as a NIfTI file (the node's selection and conversion)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from pipeline.convert import convert_series
    from pipeline.select import SeriesCandidate, select_series

    result.stage = "selection"
    by_study: dict[str, dict[str, list[tuple[Path, Any]]]] = {}
    for path in source_files(source):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SeriesInstanceUID" not in ds or "SOPClassUID" not in ds:
            continue  # DICOMDIR and other non-image objects
        series = by_study.setdefault(str(ds.get("StudyInstanceUID", "")), {})
        series.setdefault(str(ds.SeriesInstanceUID), []).append((path, ds))
    if not by_study:
        raise NotAnalysed(Outcome.NO_SUITABLE_SERIES, "no DICOM instance found")
    if len(by_study) > 1:
        raise NotAnalysed(Outcome.PROCESSING_ERROR,
                          f"the folder holds {len(by_study)} studies; give one study per row")
    by_series = next(iter(by_study.values()))
    candidates = [SeriesCandidate(uid, [ds for _, ds in items]) for uid, items in by_series.items()]
    chosen = select_series(candidates, rules).chosen.series_instance_uid
    result.series_instance_uid = chosen
    result.stage = "conversion"
    return convert_series([p for p, _ in by_series[chosen]], scratch / "input.nii.gz")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prepare_scan(row: LabelRow, settings: PrepareSettings, volumes_dir: Path) -> ScanResult:
    """Prepare one scan, or take it from the cache.

    Parameters
    ----------
    row : LabelRow
        The scan.
    settings : PrepareSettings
        The node's settings and the output format.
    volumes_dir : Path
        The cache folder.

    Returns
    -------
    ScanResult
        Prepared, or why not.  Refusals by the node (:class:`NotAnalysed`) are cached
        like volumes; other failures (unreadable files, bugs) are not, so a second
        run tries them again.
    """
    start = time.perf_counter()
    result = ScanResult(row.scan_id, stage="input")
    if not row.source.exists():
        result.outcome, result.reason = Outcome.PROCESSING_ERROR.value, "the path does not exist"
        return result
    try:
        result.source_sha256 = source_sha256(row.source)
    except OSError as exc:
        result.outcome, result.reason = Outcome.PROCESSING_ERROR.value, f"cannot read the source ({exc.strerror})"
        return result
    result.key = hashlib.sha256(f"{result.source_sha256}|{settings.cache_salt()}".encode()).hexdigest()[:32]
    record = volumes_dir / f"{result.key}.json"
    if record.is_file() and (volumes_dir / f"{result.key}.npy").is_file() == json.loads(
            record.read_text(encoding="utf-8"))["ok"]:
        cached = ScanResult(**{**json.loads(record.read_text(encoding="utf-8")), "scan_id": row.scan_id})
        cached.cached, cached.seconds = True, 0.0
        return cached
    try:
        with tempfile.TemporaryDirectory(prefix="cohort-prepare-") as scratch:
            if row.source.is_file() and row.source.name.lower().endswith(NIFTI_SUFFIXES):
                nifti = row.source
            elif row.source.is_dir():
                nifti = _select_and_convert(row.source, settings.rules, Path(scratch), result)
            else:
                raise NotAnalysed(Outcome.PROCESSING_ERROR, "the path is neither a DICOM folder nor a NIfTI file")
            from pipeline.preprocess import preprocess

            result.stage = "preprocessing"
            pre = preprocess(nifti, dataclasses.replace(settings.preprocess, keep_registered=False))
        result.qc = {k: float(v) for k, v in pre.qc.items()}
        result.stage = "save"
        volume = pool_volume(pre.volume, settings.size).astype(np.float16 if settings.float16 else np.float32)
        tmp = volumes_dir / f"{result.key}.tmp.npy"
        np.save(tmp, volume)
        os.replace(tmp, volumes_dir / f"{result.key}.npy")
        result.ok, result.stage = True, ""
    except NotAnalysed as exc:
        result.outcome, result.reason = exc.outcome.value, exc.reason
    except NodeError as exc:
        result.outcome, result.reason = Outcome.PROCESSING_ERROR.value, f"processing error: {exc}"
        result.seconds = round(time.perf_counter() - start, 2)
        return result  # not cached
    except Exception as exc:  # noqa: BLE001 - one bad scan must not stop a cohort; messages may quote headers
        logger.debug("traceback (frames only):\n%s", "".join(traceback.format_tb(exc.__traceback__)))
        result.outcome, result.reason = Outcome.PROCESSING_ERROR.value, f"processing error ({type(exc).__name__})"
        result.seconds = round(time.perf_counter() - start, 2)
        return result  # not cached
    result.seconds = round(time.perf_counter() - start, 2)
    _write_json(record, {k: v for k, v in dataclasses.asdict(result).items() if k not in ("scan_id", "cached")})
    return result


@dataclass
class PrepareReport:
    """Summary of :func:`prepare_cohort`.

    Parameters
    ----------
    manifest, failures : Path
        The files written.
    results : list of ScanResult
        One per row, in file order.
    """

    manifest: Path
    failures: Path
    results: list[ScanResult]

    @property
    def prepared(self) -> int:
        """Scans in the manifest."""
        return sum(r.ok for r in self.results)

    @property
    def failed(self) -> int:
        """Scans in the failures table."""
        return sum(not r.ok for r in self.results)

    @property
    def cached(self) -> int:
        """Scans taken from the cache."""
        return sum(r.cached for r in self.results)


def _run(rows: Sequence[LabelRow], settings: PrepareSettings, volumes_dir: Path, jobs: int,
         progress: bool) -> list[ScanResult]:
    results: dict[int, ScanResult] = {}
    bar = tqdm(total=len(rows), desc="cohort prepare", unit="scan", disable=not progress)
    if jobs <= 1:
        for i, row in enumerate(rows):
            results[i] = prepare_scan(row, settings, volumes_dir)
            bar.update(1)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(prepare_scan, row, settings, volumes_dir): i for i, row in enumerate(rows)}
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                try:
                    results[i] = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker that died (memory) fails its scan only
                    results[i] = ScanResult(rows[i].scan_id, stage="worker", outcome=Outcome.PROCESSING_ERROR.value,
                                            reason=f"the worker failed ({type(exc).__name__})")
                bar.update(1)
    bar.close()
    return [results[i] for i in range(len(rows))]


def prepare_cohort(rows: Sequence[LabelRow], out_dir: Path, settings: PrepareSettings, *, jobs: int = 1,
                   progress: bool = True, provenance: dict[str, Any] | None = None) -> PrepareReport:
    """Prepare every scan and write the manifest, the failures table and ``cohort.json``.

    Parameters
    ----------
    rows : sequence of LabelRow
        From :func:`model.labels.read_labels`.
    out_dir : Path
        Output folder (created; a second run reuses its cache).
    settings : PrepareSettings
        The node's settings and the output format.
    jobs : int
        Scans prepared in parallel (processes).
    progress : bool
        Show a progress bar (stderr).
    provenance : dict, optional
        Written into ``cohort.json`` (settings sources, software version).

    Returns
    -------
    PrepareReport
        Files and per-scan results.
    """
    out_dir = Path(out_dir)
    volumes_dir = out_dir / VOLUMES_DIR
    volumes_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = _run(rows, settings, volumes_dir, jobs, progress)
    manifest = out_dir / MANIFEST_FILE
    columns = [*REQUIRED_COLUMNS, "scan_id", "scan_date", "preprocessing_version", "series_instance_uid",
               "source_sha256"]
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row, res in zip(rows, results, strict=True):
            if res.ok:
                writer.writerow({"subject_id": row.subject_id, "volume": f"{VOLUMES_DIR}/{res.key}.npy",
                                 "note": row.note, "label": row.label, "scan_id": row.scan_id,
                                 "scan_date": row.scan_date, "preprocessing_version": settings.identity,
                                 "series_instance_uid": res.series_instance_uid,
                                 "source_sha256": res.source_sha256})
    failures = out_dir / FAILURES_FILE
    with failures.open("w", newline="", encoding="utf-8") as fh:
        table = csv.writer(fh)
        table.writerow(["scan_id", "subject_id", "stage", "outcome", "reason"])
        for row, res in zip(rows, results, strict=True):
            if not res.ok:
                table.writerow([row.scan_id, row.subject_id, res.stage, res.outcome, res.reason])
    report = PrepareReport(manifest, failures, results)
    info = {
        "format": "brain-adapter-cohort", "preprocessing_version": settings.identity,
        "preprocessing": {k: str(v) if isinstance(v, Path) else v
                          for k, v in dataclasses.asdict(settings.preprocess).items()},
        "series_rules_sha256": settings.rules_sha256, "size": settings.size,
        "dtype": "float16" if settings.float16 else "float32",
        "scans": len(rows), "prepared": report.prepared, "failed": report.failed, "cached": report.cached,
        "labels": {c: sum(1 for r, s in zip(rows, results, strict=True) if s.ok and r.label == c)
                   for c in ("AD", "MCI", "CN")},
        "seconds": round(time.perf_counter() - started, 1), **(provenance or {}),
    }
    _write_json(out_dir / COHORT_FILE, info)
    logger.info("cohort prepared: %d of %d scan(s), %d failed, %d from the cache", report.prepared, len(rows),
                report.failed, report.cached)
    return report
