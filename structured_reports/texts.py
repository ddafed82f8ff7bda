"""The sentences a radiologist reads, shared by the SR's text items and the PDF page.

None of them carries a note's text or a patient identifier: notes are counted and dated,
everything else is result, versions and UIDs.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom

from model.types import CLASSES
from structured_reports.concepts import CLASS_LABELS
from structured_reports.types import ReportInput

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
    """Model, weights, preprocessing and node software versions.

    Parameters
    ----------
    report : ReportInput
        The report input.

    Returns
    -------
    str
        A sentence for the reader.
    """
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
