"""What ``dicom-node check`` found, and how it is printed (text report and ``--json`` summary).

The data classes are filled by :mod:`dicom_node.cli.check`, which runs the node's stages offline; nothing here
reads files or runs a stage.  Only UIDs, series descriptions, modalities and counts are printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import Dataset

if TYPE_CHECKING:
    from pipeline.qc import QCCheck
    from pipeline.select import SeriesDecision


@dataclass
class Instance:
    """One DICOM file found under the paths, with its header (no pixel data)."""

    path: Path
    header: Dataset


@dataclass
class Scan:
    """What was found under the paths: instances by study and series, and what was skipped."""

    studies: dict[str, dict[str, list[Instance]]] = field(default_factory=dict)
    files: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def instances(self) -> int:
        """Number of DICOM instances found."""
        return sum(len(items) for series in self.studies.values() for items in series.values())

    def skip(self, why: str) -> None:
        """Count a skipped file."""
        self.skipped[why] = self.skipped.get(why, 0) + 1


@dataclass
class SeriesCheck:
    """What the node would make of one series."""

    series_instance_uid: str
    series_number: int | None
    description: str
    modality: str
    instances: int
    images: int
    refused: dict[str, int] = field(default_factory=dict)
    incomplete: str | None = None
    decision: SeriesDecision | None = None

    @property
    def received(self) -> int:
        """Instances the node would accept over C-STORE."""
        return self.instances - sum(self.refused.values())


@dataclass
class StudyCheck:
    """What the node would make of one study."""

    study_instance_uid: str
    series: list[SeriesCheck]
    chosen: SeriesCheck | None = None
    outcome: str | None = None
    reason: str | None = None
    converted: dict[str, Any] | None = None
    qc: list[QCCheck] = field(default_factory=list)
    qc_source: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    png: Path | None = None
    png_error: str | None = None
    preprocessed: bool = False

    @property
    def analysed(self) -> bool:
        """True when the node would analyse the study (no not-analysed reason)."""
        return self.reason is None and self.chosen is not None

    def not_analysed(self, outcome: str, reason: str) -> None:
        """Record the first reason the study would not be analysed."""
        if self.reason is None:
            self.outcome, self.reason = outcome, reason


# ----- output ---------------------------------------------------------------------------------------------------


def series_number_text(series: SeriesCheck) -> str:
    """The series number, ``?`` when the header has none."""
    return "?" if series.series_number is None else str(series.series_number)


def skipped_text(skipped: dict[str, int]) -> str:
    """``; skipped: 2 not DICOM, 1 DICOMDIR`` (empty when nothing was skipped)."""
    if not skipped:
        return ""
    return "; skipped: " + ", ".join(f"{count} {why}" for why, count in sorted(skipped.items()))


def scan_text(scan: Scan) -> str:
    """The first line of the report: what was read under the paths."""
    series = sum(len(s) for s in scan.studies.values())
    return (f"{scan.files} file(s) read in {scan.seconds:.1f} s: {scan.instances} DICOM instance(s), "
            f"{len(scan.studies)} study(ies), {series} series{skipped_text(scan.skipped)}")


def _seconds_text(seconds: dict[str, float]) -> str:
    main = [(k, v) for k, v in seconds.items() if "." not in k]
    parts = []
    for name, value in main:
        sub = [(k.split(".", 1)[1], v) for k, v in seconds.items() if k.startswith(name + ".")]
        detail = f" ({', '.join(f'{k} {v:.1f} s' for k, v in sub)})" if sub else ""
        parts.append(f"{name} {value:.2f} s{detail}")
    return ", ".join(parts)


def study_text(study: StudyCheck) -> str:
    """The text report of one study."""
    lines = ["", f"study {study.study_instance_uid or '(no StudyInstanceUID)'}: {len(study.series)} series"]
    for s in study.series:
        lines.append(f"  series {series_number_text(s)} \"{s.description}\"  {s.modality or '-'}  {s.images} image(s)"
                     + (f" in {s.instances} instance(s)" if s.instances != s.images else "")
                     + f"  {s.series_instance_uid}")
        for reason, count in s.refused.items():
            lines.append(f"      refused at C-STORE: {count} of {s.instances} instance(s): {reason}")
        if s.incomplete:
            lines.append(f"      incomplete: {s.incomplete}")
        if s.decision is not None:
            verdict = "ACCEPTED" if s.decision.accepted else "refused"
            lines.append(f"      {verdict} (score {s.decision.score:g}): {'; '.join(s.decision.reasons)}")
    if study.converted is not None:
        shape, spacing = study.converted["shape"], study.converted["spacing_mm"]
        lines.append(f"  converted: {' x '.join(map(str, shape))} voxels of "
                     f"{' x '.join(f'{v:g}' for v in spacing)} mm")
    if study.qc:
        lines.append(f"  QC ({study.qc_source}):")
        for q in study.qc:
            lines.append(f"    {q.label:22} {q.measured:>8}   limit {q.comparison} {f'{q.limit:g}{q.unit}':<8} "
                         f"{'ok' if q.ok else 'FAILED'}")
    if study.stage_seconds:
        lines.append(f"  stage times: {_seconds_text(study.stage_seconds)}")
    if study.png is not None:
        lines.append(f"  key slices: {study.png}")
    elif study.png_error:
        lines.append(f"  key slices: {study.png_error}")
    chosen = study.chosen
    if study.analysed and chosen is not None:  # analysed: a series was chosen and nothing refused the study
        done = ("would be analysed" if study.preprocessed
                else "converted; preprocessing and image QC not run (--no-preprocess)")
        lines.append(f"  result: {done}: series {series_number_text(chosen)} \"{chosen.description}\"")
    else:
        lines.append(f"  result: not analysed: {study.reason}")
    return "\n".join(lines)


def summary_text(studies: Sequence[StudyCheck], preprocessed: bool) -> str:
    """The last lines of the report: how many studies would be analysed, and why the others would not."""
    good = sum(s.analysed for s in studies)
    verb = "would be analysed" if preprocessed else "passed selection and conversion"
    lines = ["", f"summary: {good} of {len(studies)} study(ies) {verb}"]
    lines += [f"  not analysed: study {s.study_instance_uid}: {s.reason}" for s in studies if not s.analysed]
    return "\n".join(lines)


def _series_json(s: SeriesCheck) -> dict[str, Any]:
    return {
        "series_instance_uid": s.series_instance_uid,
        "series_number": s.series_number,
        "description": s.description,
        "modality": s.modality,
        "instances": s.instances,
        "images": s.images,
        "refused_at_cstore": s.refused,
        "incomplete": s.incomplete,
        "accepted": bool(s.decision and s.decision.accepted),
        "score": None if s.decision is None else s.decision.score,
        "reasons": [] if s.decision is None else list(s.decision.reasons),
    }


def _study_json(study: StudyCheck) -> dict[str, Any]:
    return {
        "study_instance_uid": study.study_instance_uid,
        "analysed": study.analysed,
        "preprocessed": study.preprocessed,
        "outcome": study.outcome,
        "reason": study.reason,
        "chosen_series_instance_uid": None if study.chosen is None else study.chosen.series_instance_uid,
        "series": [_series_json(s) for s in study.series],
        "converted": study.converted,
        "qc_source": study.qc_source or None,
        "qc": {q.key: {"value": q.value, "limit": q.limit, "comparison": q.comparison, "ok": q.ok}
               for q in study.qc},
        "stage_seconds": study.stage_seconds,
        "key_slices_png": None if study.png is None else str(study.png),
    }


def summary_json(scan: Scan, studies: Sequence[StudyCheck], out_dir: Path, status: int, *,
                 preprocess_volume: bool = True) -> dict[str, Any]:
    """The machine-readable summary printed by ``--json``.

    With ``--no-preprocess`` (``no_preprocess`` true) a study's ``analysed`` means that it passed
    the stages that were run (up to conversion and the slice count and thickness limits).
    """
    return {
        "files": scan.files,
        "instances": scan.instances,
        "skipped": scan.skipped,
        "read_seconds": scan.seconds,
        "no_preprocess": not preprocess_volume,
        "out_dir": str(out_dir),
        "studies": [_study_json(s) for s in studies],
        "analysed": sum(s.analysed for s in studies),
        "not_analysed": sum(not s.analysed for s in studies),
        "exit_status": status,
    }
