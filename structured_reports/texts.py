"""The sentences a radiologist reads, shared by the SR's text items and the PDF page.

None of them carries a note's text or a patient identifier: notes are counted and dated,
everything else is result, versions and UIDs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom

from core.errors import Outcome
from model.types import CLASSES
from pipeline.qc import QCCheck
from structured_reports.concepts import CLASS_LABELS
from structured_reports.types import DISCLAIMER, ReportInput
from structured_reports.volumes import dicom_date

#: Said first, before the result, when the model is a demonstration model.
DEMONSTRATION_TEXT = "Demonstration model, not for clinical use."

#: Prefix of the result when the study was not analysed.
NOT_ANALYSED_PREFIX = "Not analysed: "

#: What the node analyses, before the limits of :class:`~structured_reports.types.SeriesRequirement`.
SERIES_NEEDED = ("a 3D T1-weighted MR series of original images (e.g. MPRAGE, IR-FSPGR/BRAVO or 3D TFE), "
                 "the whole brain in the field of view")

#: What could not be done, by the stage of the run that failed (the ``*_at`` stamps of the run's audit record).
FAILED_STEP_TEXTS = {
    "started": "the analysis could not be started.",
    "selected": "the series to analyse could not be chosen (series selection step failed).",
    "converted": "the series could not be converted to a volume (conversion step failed).",
    "preprocessed": "image preprocessing could not be completed.",
    "notes_joined": "the clinical notes could not be looked up.",
    "inferred": "the analysis model could not be run.",
    "report_built": "the report could not be completed.",
}
#: Said when the stage is not one of :data:`FAILED_STEP_TEXTS`.
FAILED_STEP_FALLBACK = "the analysis could not be completed."


def processing_failure_text(stage: str, run_id: str, *, configuration: bool = False) -> str:
    """Why a run that failed has no result, in plain words: the step, and that it was recorded.

    Never names an exception or quotes its message; the audit record of the run
    keeps the stage and the traceback for the node's administrators.

    Parameters
    ----------
    stage : str
        The stage of the run that failed (``selected``, ``converted``, ...).
    run_id : str
        The run, for the administrators to find its record.
    configuration : bool, optional
        The node's configuration is at fault: its administrators must correct it.

    Returns
    -------
    str
        E.g. ``"image preprocessing could not be completed. The failure was recorded
        for the node's administrators (run <run id>)."``, to follow "Not analysed: ".
    """
    step = FAILED_STEP_TEXTS.get(stage, FAILED_STEP_FALLBACK)
    if configuration:
        return (f"{step} The node's configuration must be corrected by its administrators; "
                f"the failure was recorded for them (run {run_id}).")
    return f"{step} The failure was recorded for the node's administrators (run {run_id})."


def analysed_series_text(sources: Sequence[pydicom.Dataset]) -> str:
    """Sentence naming the analysed series and how the SR references it.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        Instances of the analysed series.

    Returns
    -------
    str
        A sentence for the reader.
    """
    first = sources[0]
    number = str(first.get("SeriesNumber", "") or "").strip()
    description = str(first.get("SeriesDescription", "") or "").strip()
    label = " ".join(part for part in (number, f'"{description}"' if description else "") if part)
    return (
        f"Analysed series {label or first.SeriesInstanceUID} ({len(sources)} images): "
        "one representative image is referenced as the source; every image is listed "
        "in the evidence."
    )


def warning_texts(report: ReportInput) -> list[str]:
    """The warnings said before anything else: demonstration model (when one gave the result), research use only.

    Parameters
    ----------
    report : ReportInput
        The report input.

    Returns
    -------
    list[str]
        :data:`DEMONSTRATION_TEXT` when a demonstration model gave the result (a report of a study that was not
        analysed names no model), then :data:`~structured_reports.types.DISCLAIMER`.
    """
    if report.model.demonstration and report.prediction is not None:
        return [DEMONSTRATION_TEXT, DISCLAIMER]
    return [DISCLAIMER]


def _series_label(first: pydicom.Dataset, count: int) -> str:
    """``3 "t1_mprage_sag_p2_iso" (MR, 181 images)``: number, description, modality, image count."""
    number = str(first.get("SeriesNumber", "") or "").strip()
    description = str(first.get("SeriesDescription", "") or "").strip()
    modality = str(first.get("Modality", "") or "").strip() or "modality unknown"
    label = " ".join(part for part in (number or "(no number)", f'"{description}"' if description else "") if part)
    return f"{label} ({modality}, {count} image{'s' if count != 1 else ''})"


def series_labels(sources: Sequence[pydicom.Dataset]) -> list[str]:
    """One label per series among *sources*, ordered by Series Number.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        Instances (headers) of one or more series.

    Returns
    -------
    list[str]
        E.g. ``['1 "localizer" (MR, 3 images)', '3 "t1_mprage" (MR, 176 images)']``.
    """
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for ds in sources:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)

    def order(items: list[pydicom.Dataset]) -> tuple[int, str]:
        number = items[0].get("SeriesNumber")
        try:
            return int(number), ""
        except (TypeError, ValueError):
            return 1 << 31, str(items[0].get("SeriesInstanceUID", ""))
    return [_series_label(items[0], len(items)) for items in sorted(by_series.values(), key=order)]


def analysed_series_label(sources: Sequence[pydicom.Dataset]) -> str:
    """The analysed series: number, description, modality, image count (see :func:`series_labels`)."""
    return _series_label(sources[0], len(sources))


def received_text(sources: Sequence[pydicom.Dataset]) -> str:
    """What the node received of a study it did not analyse, series by series.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        Every instance received (headers).

    Returns
    -------
    str
        E.g. ``'Received: series 1 "localizer" (MR, 3 images).'``.
    """
    labels = series_labels(sources)
    return f"Received: series {'; series '.join(labels)}."


def requirement_text(report: ReportInput) -> str:
    """What series the node needs, with the configured limits; empty when that was not the problem.

    A processing error is the node's failure, not the series': then nothing is said about the series.

    Parameters
    ----------
    report : ReportInput
        A report of a study that was not analysed.

    Returns
    -------
    str
        E.g. ``"The node needs a 3D T1-weighted MR series ... with at least 100 slices and a slice
        thickness of at most 1.5 mm."``
    """
    if report.not_analysed is None or report.not_analysed[0] is Outcome.PROCESSING_ERROR:
        return ""
    need = report.requirement
    return (f"The node needs {SERIES_NEEDED}, with at least {need.min_slices} slices and a slice thickness "
            f"of at most {need.max_slice_thickness_mm:g} mm.")


def qc_value_text(check: QCCheck) -> str:
    """A QC value and its limit: ``slice thickness 1.00 mm (at most 1.5 mm)``."""
    bound = "at least" if check.comparison == ">=" else "at most"
    flag = "" if check.ok else ", OUTSIDE THE LIMIT"
    return f"{check.label} {check.measured} ({bound} {check.limit:g}{check.unit}{flag})"


def qc_text(report: ReportInput) -> str:
    """The image quality checks of the analysed series, each with its limit; empty when none were measured.

    Parameters
    ----------
    report : ReportInput
        The report input.

    Returns
    -------
    str
        E.g. ``"Image quality checks: slices 181 (at least 100); ...; all within their limits."``
    """
    if not report.qc:
        return ""
    verdict = ("all within their limits" if all(c.ok for c in report.qc)
               else "NOT ALL WITHIN THEIR LIMITS")
    return f"Image quality checks: {'; '.join(qc_value_text(c) for c in report.qc)}; {verdict}."


_SEXES = {"F": "female", "M": "male", "O": "other"}
_AGE_UNITS = {"D": ("day", "days"), "W": ("week", "weeks"), "M": ("month", "months"), "Y": ("year", "years")}


def age_at_study(ds: pydicom.Dataset) -> str:
    """The patient's age at the study: PatientAge, else computed from PatientBirthDate and StudyDate.

    Parameters
    ----------
    ds : pydicom.Dataset
        A source instance (patient and study modules).

    Returns
    -------
    str
        E.g. ``"76 years"`` or ``"11 months"``; ``"not given"`` when the header has neither.
    """
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in _AGE_UNITS:
        count = int(age[:3])
        return f"{count} {_AGE_UNITS[age[3]][0 if count == 1 else 1]}"
    birth, study = dicom_date(ds.get("PatientBirthDate")), dicom_date(ds.get("StudyDate"))
    if birth is None or study is None or study < birth:
        return "not given"
    years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    if years >= 2:
        return f"{years} years"
    months = (study.year - birth.year) * 12 + study.month - birth.month - (study.day < birth.day)
    return f"{months} month{'s' if months != 1 else ''}"


def sex_text(ds: pydicom.Dataset) -> str:
    """PatientSex in words: ``female``, ``male``, ``other``; ``not given`` when absent or empty."""
    return _SEXES.get(str(ds.get("PatientSex", "") or "").strip().upper(), "not given")


def summary_text(report: ReportInput) -> str:
    """One sentence with the predicted class and the three probabilities.

    Parameters
    ----------
    report : ReportInput
        A report with a prediction.

    Returns
    -------
    str
        E.g. ``"Most likely class: AD (Alzheimer's disease). Probabilities:
        AD 0.720, MCI 0.200, CN 0.080."``; empty if there is no prediction.
    """
    prediction = report.prediction
    if prediction is None:
        return ""
    probabilities = ", ".join(
        f"{c} {float(prediction.probabilities[c]):.3f}" for c in CLASSES
    )
    return (
        f"Most likely class: {CLASS_LABELS[prediction.predicted_class]}. "
        f"Probabilities: {probabilities}."
    )


def notes_text(report: ReportInput) -> str:
    """Whether clinical notes entered the model: count and dates, never text.

    Parameters
    ----------
    report : ReportInput
        The report input.

    Returns
    -------
    str
        A sentence for the reader.
    """
    if report.not_analysed is not None:
        return "No model was run; no clinical note was used."
    if report.notes.count == 0:
        return "No clinical note was used; the result is based on the MR images only."
    dates = ", ".join(d.isoformat() for d in sorted(report.notes.dates))
    plural = "s" if report.notes.count > 1 else ""
    return (
        f"{report.notes.count} clinical note{plural} used together with the MR images "
        f"(dated {dates}); note text is not reproduced here."
    )


def versions_text(report: ReportInput) -> str:
    """Model, weights, preprocessing and node software versions; only the node's when no model ran.

    Parameters
    ----------
    report : ReportInput
        The report input.

    Returns
    -------
    str
        A sentence for the reader.
    """
    if report.prediction is None:
        return f"Node {report.device.name} software {report.device.software_version}; run {report.run_id}."
    return (
        f"Model {report.model.name} version {report.model.version} "
        f"(weights SHA-256 {report.model.weights_sha256[:16]}...); "
        f"preprocessing version {report.preprocessing_version}; "
        f"node {report.device.name} software {report.device.software_version}; "
        f"run {report.run_id}."
    )


def supersedes_text(predecessor: pydicom.Dataset) -> str:
    """Sentence naming the earlier SR this one replaces.

    Parameters
    ----------
    predecessor : pydicom.Dataset
        The superseded SR.

    Returns
    -------
    str
        A sentence for the reader.
    """
    created = str(predecessor.get("ContentDate", "")) or "an unknown date"
    if len(created) == 8 and created.isdigit():
        created = f"{created[:4]}-{created[4:6]}-{created[6:]}"
    return (
        f"This report supersedes the earlier report of {created} "
        f"(SOP Instance UID {predecessor.SOPInstanceUID})."
    )
