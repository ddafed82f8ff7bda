"""``dicom-node check PATH...``: would the node analyse these studies? A site check before go-live.

Runs what the node runs on a received study -- its C-STORE acceptance checks,
the completeness check, series selection with the configured rules, DICOM to
NIfTI conversion, preprocessing and QC -- offline, on DICOM files or folders (a
scanner's export): no network, no database, no model.  For each study it prints
every series' decision with its reasons and score, the QC values next to their
limits, the stage times and the result ("would be analysed" or "not analysed:
<reason>", as the report would say), and writes the key slices of each
preprocessed study as a PNG (``--out``), drawn as on the PDF report.

Exit status: 0 when every study has a series the node would analyse, 1 when at
least one study would not be analysed, 2 when no DICOM instance was found (or
a path does not exist).  Only UIDs, series descriptions, modalities and counts
are printed, never patient names or IDs.

Registered in :data:`dicom_node.cli.main.EXTENSIONS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

from core.errors import NodeError, NotAnalysed, Outcome
from dicom_node.cli.checkreport import (
    Instance,
    Scan,
    SeriesCheck,
    StudyCheck,
    scan_text,
    series_number_text,
    skipped_text,
    study_text,
    summary_json,
    summary_text,
)
from dicom_node.settings import Settings

if TYPE_CHECKING:
    from pipeline.preprocess_config import PreprocessConfig
    from pipeline.select import SelectionRules, SeriesDecision
    from structured_reports.types import KeySlice

logger = logging.getLogger(__name__)

#: Default folder of the key-slice PNGs, relative to the current directory.
DEFAULT_OUT = Path("check")

#: Outcome of a study none of whose instances the node would accept (it would never get a run).
NOT_RECEIVED = "not_received"

class CheckUsageError(NodeError):
    """The command line names nothing to check (exit status 2)."""


# ----- the command ---------------------------------------------------------------------------------------------


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``check`` to the ``dicom-node`` parser."""
    check = sub.add_parser(
        "check", parents=[common],
        help="site check before go-live: would the node analyse these DICOM files? (offline)",
        description="Run the node's C-STORE checks, completeness check, series selection, conversion, "
                    "preprocessing and QC on DICOM files or folders, without network, database or model; "
                    "exit 1 when a study would not be analysed, 2 when no DICOM was found.")
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                       help="DICOM files or folders (searched recursively; DICOMDIR and other files skipped)")
    check.add_argument("--out", type=Path, default=DEFAULT_OUT,
                       help="folder for the key-slice PNGs, one per study (default: ./check)")
    check.add_argument("--no-preprocess", action="store_true",
                       help="stop after conversion (quick triage: slice count and thickness checked, no PNG)")
    check.add_argument("--json", action="store_true", help="print a machine-readable summary instead of the report")
    check.add_argument("--verbose", action="store_true",
                       help="show the pipeline's INFO logs on stderr (by default only warnings)")


def dispatch(args: argparse.Namespace, settings: Settings) -> int | None:
    """Run ``check``; None for any other command."""
    if args.command != "check":
        return None
    root = logging.getLogger()
    level = root.level
    if args.log_level == "INFO" and not args.verbose:
        root.setLevel(logging.WARNING)  # the report is on stdout; the stages' INFO lines would repeat it
    try:
        return run_check(settings, args.paths, out_dir=args.out, preprocess_volume=not args.no_preprocess,
                         as_json=args.json)
    finally:
        root.setLevel(level)


def run_check(settings: Settings, paths: Sequence[Path], *, out_dir: Path = DEFAULT_OUT,
              preprocess_volume: bool = True, as_json: bool = False) -> int:
    """Check DICOM files or folders the way the node would process them; print the result.

    Parameters
    ----------
    settings : Settings
        The node's settings: selection rules (``processing.series_rules``), preprocessing
        (``processing.registration``, ``processing.n4``), ``storage.accept_lossy``.
        Neither the database nor the model is used.
    paths : sequence of Path
        Files or folders (searched recursively).
    out_dir : Path
        Folder for the key-slice PNGs (created when a PNG is written).
    preprocess_volume : bool
        False: stop after conversion (``--no-preprocess``).
    as_json : bool
        Print a JSON summary instead of the text report.

    Returns
    -------
    int
        0: every study would be analysed; 1: at least one would not; 2: no DICOM instance found.

    Raises
    ------
    CheckUsageError
        If a path does not exist.
    ConfigError
        If the selection rules cannot be loaded.
    """
    from dicom_node.runs.context import preprocess_config, series_rules

    rules = series_rules(settings)
    config = preprocess_config(settings)
    scan = scan_paths(paths)
    out = out_dir.resolve()
    if not scan.studies:
        print(f"dicom-node check: error: no DICOM instance found in {len(paths)} path(s) "
              f"({scan.files} file(s) read{skipped_text(scan.skipped)})", file=sys.stderr)
        if as_json:
            print(json.dumps(summary_json(scan, [], out, 2, preprocess_volume=preprocess_volume), indent=2))
        return 2
    if not as_json:
        print(scan_text(scan))
    studies: list[StudyCheck] = []
    for study_uid in sorted(scan.studies):
        study = check_study(study_uid, scan.studies[study_uid], rules, config, settings, out,
                            preprocess_volume=preprocess_volume)
        studies.append(study)
        if not as_json:
            print(study_text(study), flush=True)
    status = 0 if all(s.analysed for s in studies) else 1
    if as_json:
        print(json.dumps(summary_json(scan, studies, out, status, preprocess_volume=preprocess_volume), indent=2))
    else:
        print(summary_text(studies, preprocess_volume))
    return status


# ----- reading --------------------------------------------------------------------------------------------------


def _files(paths: Sequence[Path]) -> Iterable[Path]:
    seen: set[Path] = set()
    for path in paths:
        if path.is_file():
            found: Iterable[Path] = [path]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            raise CheckUsageError(f"check: no such file or folder: {path}")
        for item in found:
            key = item.resolve()
            if key not in seen:
                seen.add(key)
                yield item


def scan_paths(paths: Sequence[Path]) -> Scan:
    """Read the headers (no pixel data) of every DICOM file under ``paths``, by study and series.

    Files that are not DICOM Part 10 files and DICOMDIRs are skipped and counted; a second file
    with a SOP Instance UID already found is skipped as a duplicate.

    Raises
    ------
    CheckUsageError
        If a path does not exist.
    """
    start = time.perf_counter()
    scan = Scan()
    sop_uids: set[str] = set()
    for path in _files(paths):
        scan.files += 1
        if path.name.upper() == "DICOMDIR":
            scan.skip("DICOMDIR")
            continue
        try:
            header = dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            scan.skip("not DICOM")
            continue
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not stop the check of the others
            logger.debug("a file skipped: unreadable DICOM (%s)", type(exc).__name__)  # paths may name the patient
            scan.skip("unreadable DICOM")
            continue
        meta = getattr(header, "file_meta", None)
        if str(getattr(meta, "MediaStorageSOPClassUID", "")) == MediaStorageDirectoryStorage:  # an index, no image
            scan.skip("DICOMDIR")
            continue
        sop_uid = str(header.get("SOPInstanceUID", "") or "")
        if sop_uid and sop_uid in sop_uids:
            scan.skip("duplicate SOP Instance UID")
            continue
        sop_uids.add(sop_uid)
        study = str(header.get("StudyInstanceUID", "") or "")
        series = str(header.get("SeriesInstanceUID", "") or "")
        scan.studies.setdefault(study, {}).setdefault(series, []).append(Instance(path, header))
    scan.seconds = round(time.perf_counter() - start, 3)
    return scan


# ----- the node's stages, offline ---------------------------------------------------------------------------


def _ingest_refusal(header: Dataset, accept_lossy: bool) -> str | None:
    """Why the node's Storage SCP would refuse this instance (as its C-STORE status); None if it would store it."""
    from dicom_node.ingest.identity import RejectedInstance, identify, is_lossy

    meta = getattr(header, "file_meta", None)
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or header.get("SOPClassUID", "") or "")
    syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
    try:
        identify(header, sop_class)
        if not accept_lossy and syntax and is_lossy(header, syntax):
            return "0xC001 lossy-compressed input refused (storage.accept_lossy is false)"
    except RejectedInstance as exc:
        return f"0x{int(exc.status):04X} {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - the node answers Cannot Understand to any undecodable data set
        return f"0xC000 dataset cannot be decoded ({type(exc).__name__})"
    return None


def _series_check(uid: str, items: Sequence[Instance], accept_lossy: bool) -> tuple[SeriesCheck, list[Instance]]:
    first = items[0].header
    try:
        number: int | None = int(first.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = None
    images = 0
    for item in items:
        try:
            images += int(item.header.get("NumberOfFrames", 1) or 1)
        except (TypeError, ValueError):
            images += 1
    check = SeriesCheck(series_instance_uid=uid, series_number=number,
                        description=str(first.get("SeriesDescription", "") or ""),
                        modality=str(first.get("Modality", "") or ""), instances=len(items), images=images)
    received: list[Instance] = []
    for item in items:
        refusal = _ingest_refusal(item.header, accept_lossy)
        if refusal is None:
            received.append(item)
        else:
            check.refused[refusal] = check.refused.get(refusal, 0) + 1
    return check, received


def _completeness(headers: Sequence[Dataset]) -> str | None:
    """The node's content check of a series (why it is incomplete, or None).

    As in :mod:`dicom_node.ingest.completeness`.
    """
    from dicom_node.ingest.completeness import evaluate_series

    try:
        verdict = evaluate_series(headers)
    except Exception as exc:  # noqa: BLE001 - the node, too, leaves an uncheckable geometry to the run
        logger.warning("geometry not checkable (%s); the run will judge it", type(exc).__name__)
        return None
    return None if verdict.complete else verdict.reason


def check_study(study_uid: str, by_series: dict[str, list[Instance]], rules: SelectionRules,
                config: PreprocessConfig, settings: Settings, out_dir: Path, *,
                preprocess_volume: bool = True) -> StudyCheck:
    """Run one study through the node's stages; a refusal at any stage becomes the study's reason.

    Parameters
    ----------
    study_uid : str
        StudyInstanceUID.
    by_series : dict of str to list of Instance
        The study's instances by SeriesInstanceUID.
    rules : SelectionRules
        Series selection rules (:func:`dicom_node.runs.context.series_rules`).
    config : PreprocessConfig
        Preprocessing settings and QC limits (:func:`dicom_node.runs.context.preprocess_config`).
    settings : Settings
        For ``storage.accept_lossy``.
    out_dir : Path
        Folder of the key-slice PNG.
    preprocess_volume : bool
        False: stop after conversion.

    Returns
    -------
    StudyCheck
        Decisions, QC, stage times and the result.
    """
    from pipeline.select import NoSuitableSeries, SeriesCandidate, select_series

    study = StudyCheck(study_instance_uid=study_uid, series=[])
    received: dict[str, list[Instance]] = {}
    for uid, items in by_series.items():
        series, accepted = _series_check(uid, items, settings.storage.accept_lossy)
        study.series.append(series)
        if accepted:
            received[uid] = accepted
    study.series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))
    if not received:
        study.not_analysed(NOT_RECEIVED, "the node would refuse every instance of the study at C-STORE")
        return study

    start = time.perf_counter()
    for series in study.series:
        if series.series_instance_uid in received:
            series.incomplete = _completeness([i.header for i in received[series.series_instance_uid]])
    study.stage_seconds["completeness"] = round(time.perf_counter() - start, 3)
    incomplete = [f"series {s.series_number if s.series_number is not None else '?'} "
                  f"({s.description or 'no description'}): {s.incomplete}" for s in study.series if s.incomplete]
    if incomplete:  # as dicom_node.ingest.completeness.incomplete_reason words it
        study.not_analysed(Outcome.INCOMPLETE_SERIES.value, "incomplete series: " + "; ".join(incomplete))

    start = time.perf_counter()
    ordered = [s for s in study.series if s.series_instance_uid in received]
    candidates = [SeriesCandidate(s.series_instance_uid, [i.header for i in received[s.series_instance_uid]])
                  for s in ordered]
    decisions: list[SeriesDecision]
    try:
        selection = select_series(candidates, rules)
        decisions = selection.decisions
    except NoSuitableSeries as exc:
        decisions = exc.decisions
        study.not_analysed(exc.outcome.value, exc.reason)
    study.stage_seconds["selection"] = round(time.perf_counter() - start, 3)
    for series, decision in zip(ordered, decisions, strict=True):
        series.decision = decision
        if decision.accepted:
            study.chosen = series
    if study.reason is not None or study.chosen is None:
        return study
    try:
        _convert_and_preprocess(study, received[study.chosen.series_instance_uid], config, out_dir,
                                preprocess_volume)
    except NotAnalysed as exc:
        study.not_analysed(exc.outcome.value, exc.reason)
    except NodeError as exc:  # as process_run words it
        study.not_analysed(Outcome.PROCESSING_ERROR.value, f"processing error: {exc}")
    except Exception as exc:  # noqa: BLE001 - a bug must still give an answer; its message may quote header values
        logger.warning("study %s: unexpected %s (--log-level DEBUG shows where)", study_uid, type(exc).__name__)
        logger.debug("traceback (frames only):\n%s", "".join(traceback.format_tb(exc.__traceback__)))
        study.not_analysed(Outcome.PROCESSING_ERROR.value, f"processing error ({type(exc).__name__})")
    return study


def _convert_and_preprocess(study: StudyCheck, items: Sequence[Instance], config: PreprocessConfig,
                            out_dir: Path, preprocess_volume: bool) -> None:
    """Convert the chosen series, then preprocess it and write the key slices (or check the geometry only)."""
    import nibabel as nib

    from pipeline.convert import convert_series

    with tempfile.TemporaryDirectory(prefix="dicom-node-check-") as scratch:
        start = time.perf_counter()
        nifti = convert_series([i.path for i in items], Path(scratch) / "input.nii.gz")
        study.stage_seconds["conversion"] = round(time.perf_counter() - start, 3)
        image: Any = nib.load(nifti)
        shape = [int(n) for n in image.shape[:3]]
        spacing = [round(float(z), 3) for z in image.header.get_zooms()[:3]]
        study.converted = {"shape": shape, "spacing_mm": spacing}
        if not preprocess_volume:
            _geometry_qc(study, config, float(min(shape)), float(max(spacing)))
            return
        from pipeline.preprocess import preprocess
        from pipeline.qc import qc_checks

        start = time.perf_counter()
        pre = preprocess(nifti, config)
    study.stage_seconds["preprocessing"] = round(time.perf_counter() - start, 3)
    study.stage_seconds.update({f"preprocessing.{k}": round(v, 3) for k, v in pre.stage_seconds.items()})
    study.preprocessed = True
    study.qc_source = "preprocessing"
    study.qc = list(qc_checks(pre.qc, config))
    if pre.registered is None:
        study.png_error = "no registered volume (keep_registered is off)"
        return
    try:
        study.png = write_key_slices(study, pre.registered, config, out_dir)
    except (NodeError, OSError, ValueError) as exc:
        logger.warning("study %s: key slices not written (%s)", study.study_instance_uid, type(exc).__name__)
        study.png_error = f"not written: {exc}" if isinstance(exc, (NodeError, OSError)) else \
            f"not written ({type(exc).__name__})"


def _geometry_qc(study: StudyCheck, config: PreprocessConfig, slices: float, thickness: float) -> None:
    """``--no-preprocess``: the QC limits measurable on the converted volume (as preprocessing measures them)."""
    study.qc_source = "converted volume"
    from pipeline.qc import qc_checks

    study.qc = list(qc_checks({"slices": slices, "slice_thickness_mm": thickness}, config))
    for value, what in zip(study.qc, ("too few slices", "slices too thick"), strict=True):
        if not value.ok:  # the wording of pipeline.preprocess
            study.not_analysed(Outcome.QC_FAILED.value, f"{what}: measured {value.value:.3g}{value.unit}, "
                                                        f"limit {value.limit:.3g}{value.unit}")


def png_name(study_uid: str) -> str:
    """File name of a study's key-slice PNG: its StudyInstanceUID, any character but digits and dots replaced."""
    return (re.sub(r"[^0-9.]", "_", study_uid) or "no-study-uid") + ".png"


def write_key_slices(study: StudyCheck, registered: Any, config: PreprocessConfig, out_dir: Path) -> Path:
    """Draw the key slices of a preprocessed study as the PDF report shows them; write a PNG.

    Parameters
    ----------
    study : StudyCheck
        The study (its UID, chosen series and QC go into the title).
    registered : numpy.ndarray
        :attr:`pipeline.preprocess.Preprocessed.registered`.
    config : PreprocessConfig
        For the template path.
    out_dir : Path
        Target folder (created).

    Returns
    -------
    Path
        The PNG written.
    """
    from matplotlib.figure import Figure

    from pipeline.registration import default_template_path
    from structured_reports.keyslices import key_slices
    from structured_reports.pdf import OUTLINE_CAPTION, draw_key_slice

    slices: list[KeySlice] = key_slices(registered, config.template_path or default_template_path())
    fig = Figure(figsize=(10.0, 4.4))
    chosen = study.chosen
    series = "" if chosen is None else f"series {series_number_text(chosen)} \"{chosen.description}\""
    fig.suptitle(f"Study {study.study_instance_uid}\n{series}: key slices after registration to the template",
                 fontsize=10)
    for index, key in enumerate(slices):
        draw_key_slice(fig.add_axes((0.02 + index * 0.33, 0.14, 0.29, 0.66)), key)
    qc = ", ".join(f"{q.label} {q.measured}" for q in study.qc)
    fig.text(0.02, 0.06, f"{OUTLINE_CAPTION}\nQC: {qc}", fontsize=8, color="#555555", va="center")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / png_name(study.study_instance_uid)
    fig.savefig(path, format="png", dpi=100, facecolor="white")
    return path
