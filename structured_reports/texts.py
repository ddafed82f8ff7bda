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
