"""The sentences on brain volumes and on the prior study, shared by the SR's text items and the PDF page.

Numbers come from :mod:`structured_reports.volumes`; like :mod:`structured_reports.texts`, nothing here
names the patient.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom

from model.types import CLASSES
from structured_reports.texts import age_at_study, sex_text
from structured_reports.types import ReportInput
from structured_reports.volumes import VolumeRow, interval_years, probability_changes, volume_rows

#: Said wherever a z-score or percentile would be, when no normative table is configured.
NO_NORMATIVE_TEXT = "Volumes are not compared with a population: no normative data configured."


def percentile_label(percentile: float) -> str:
    """A percentile for the reader: ``"12"``, ``"<1"`` or ``">99"`` (a normal tail is never exactly 0 or 100)."""
    if percentile < 1.0:
        return "<1"
    if percentile > 99.0:
        return ">99"
    return f"{percentile:.0f}"


def _volume_phrase(row: VolumeRow) -> str:
    """``left hippocampus 3.41 ml (0.241 % of ICV, z -1.23, percentile 11)``."""
    details = [] if row.percent_icv is None else [f"{row.percent_icv:.3f} % of ICV"]
    if row.z_score is not None and row.percentile is not None:
        details.append(f"z {row.z_score:+.2f}, percentile {percentile_label(row.percentile)}")
    return f"{row.label.lower()} {row.ml:.2f} ml" + (f" ({', '.join(details)})" if details else "")


def volumes_text(sources: Sequence[pydicom.Dataset], report: ReportInput) -> str:
    """The measured volumes in one paragraph, with the method; empty without volumes.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        The analysed series (patient's age and sex for the normative rows).
    report : ReportInput
        Its ``volumes`` and ``normative``.

    Returns
    -------
    str
        E.g. ``"Brain volumes (pipeline.volumetry 1 ...): left hippocampus 3.41 ml (0.241 % of ICV); ...;
        hippocampal asymmetry index 2.90 %."``
    """
    volumes = report.volumes
    if volumes is None:
        return ""
    phrases = "; ".join(_volume_phrase(row) for row in volume_rows(sources, report))
    return (f"Brain volumes ({volumes.algorithm}): {phrases}; hippocampal asymmetry index "
            f"{volumes.hippocampal_asymmetry_percent:.2f} % (|L - R| / mean).")


def normative_text(sources: Sequence[pydicom.Dataset], report: ReportInput) -> str:
    """Which population the volumes are compared with, or :data:`NO_NORMATIVE_TEXT`; empty without volumes.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        The analysed series.
    report : ReportInput
        Its ``volumes`` and ``normative``.

    Returns
    -------
    str
        The table's source, and the structures it has no row for at the patient's age and sex.
    """
    if report.volumes is None:
        return ""
    if report.normative is None:
        return NO_NORMATIVE_TEXT
    rows = volume_rows(sources, report)
    text = (f"Z-scores and percentiles against the configured normative data (source: {report.normative.source}), "
            "by the patient's sex and age at the study.")
    missing = [row.label.lower() for row in rows if row.reference is None]
    if missing:
        text += (f" No normative row for the patient's age ({age_at_study(sources[0])}) and sex "
                 f"({sex_text(sources[0])}): {', '.join(missing)}.")
    return text


def prior_date_text(sources: Sequence[pydicom.Dataset], report: ReportInput) -> str:
    """The prior study's date, the interval and whose result it is; empty without a prior.

    Returns
    -------
    str
        E.g. ``"Prior study of 2022-03-01, 2.01 years earlier (analysed now)."``
    """
    prior = report.prior
    if prior is None:
        return ""
    years = interval_years(sources[0], prior)
    interval = (f"{years:.2f} years earlier" if years is not None
                else "no per-year change: the study dates give no positive interval")
    origin = f"result of the node's run {prior.run_id}" if prior.run_id else "analysed now"
    return f"Prior study of {prior.study_date.isoformat()}, {interval} ({origin})."


def probability_change_text(report: ReportInput) -> str:
    """The change of each class probability since the prior study; empty without both results.

    Returns
    -------
    str
        E.g. ``"Change in class probabilities since the prior study: AD +0.120 (0.500 to 0.620), ..."``
    """
    changes = probability_changes(report)
    if changes is None or report.prior is None or report.prior.probabilities is None or report.prediction is None:
        return ""
    before, now = report.prior.probabilities, report.prediction.probabilities
    parts = [f"{c} {changes[c]:+.3f} ({float(before[c]):.3f} to {float(now[c]):.3f})" for c in CLASSES]
    return f"Change in class probabilities since the prior study: {', '.join(parts)}."


def prior_gaps(report: ReportInput) -> list[str]:
    """What could not be compared with the prior study, one sentence each; empty without a prior.

    Parameters
    ----------
    report : ReportInput
        Its ``prior``, ``volumes`` and ``prediction``.

    Returns
    -------
    list[str]
        E.g. ``["The prior study has no class probabilities to compare with."]``.
    """
    prior = report.prior
    if prior is None:
        return []
    gaps = []
    if prior.volumes is None:
        gaps.append("The prior study has no volumes to compare with.")
    elif report.volumes is None:
        gaps.append("This study has no volumes to compare with the prior's.")
    if prior.probabilities is None:
        gaps.append("The prior study has no class probabilities to compare with.")
    elif report.prediction is None:
        gaps.append("This study has no class probabilities to compare with the prior's.")
    return gaps


def prior_text(sources: Sequence[pydicom.Dataset], report: ReportInput) -> str:
    """The comparison with the prior study in one paragraph (for the SR); empty without a prior.

    Returns
    -------
    str
        The prior's date and interval, the volume change per year of each structure, the change in class
        probabilities, and what could not be compared (:func:`prior_gaps`).
    """
    if report.prior is None:
        return ""
    parts = [prior_date_text(sources, report)]
    changes = [f"{row.label.lower()} {row.change_ml_per_year:+.3f} ml/a"
               + (f" ({row.change_percent_per_year:+.2f} %/a)" if row.change_percent_per_year is not None else "")
               for row in volume_rows(sources, report) if row.change_ml_per_year is not None]
    if changes:
        parts.append(f"Volume change per year: {'; '.join(changes)}.")
    parts.append(probability_change_text(report))
    parts += prior_gaps(report)
    return " ".join(part for part in parts if part)


def volumes_note_text(report: ReportInput) -> str:
    """Why there are no volumes (``volumes_note``), for the reader; empty when there is no note."""
    return f"Brain volumes: {report.volumes_note}" if report.volumes_note else ""


def prior_note_text(report: ReportInput) -> str:
    """Why there is no comparison with a prior study (``prior_note``); empty when there is no note."""
    return f"Comparison with a prior study: {report.prior_note}" if report.prior_note else ""


def comparison_texts(sources: Sequence[pydicom.Dataset], report: ReportInput) -> list[str]:
    """The SR's sentences on volumes and the prior study, after the summary (empty items left out).

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        The analysed series.
    report : ReportInput
        The report input.

    Returns
    -------
    list[str]
        Volumes, normative data, why no volumes, the prior comparison, why no prior comparison.
    """
    texts = [volumes_text(sources, report), normative_text(sources, report), volumes_note_text(report),
             prior_text(sources, report), prior_note_text(report)]
    return [text for text in texts if text]
