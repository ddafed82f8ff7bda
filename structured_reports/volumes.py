"""The numbers the reports give on brain volumes and on the prior study, computed once for the SR and the PDF.

Per structure: the volume (ml), its percentage of the intracranial volume, its z-score and
percentile against the configured normative table (:mod:`pipeline.normative`), the prior study's
volume and the change per year; for the whole report: the interval to the prior study and the
change in each class probability.  Pure: no rounding here (the writers round for display).

Change per year (``ml/a``) is ``(current - prior) / interval``, the relative change (``%/a``)
``100 * (current - prior) / prior / interval``, the interval in years of 365.25 days between the
two Study Dates.  Without both dates, or with a prior that is not earlier, there is no per-year
change (the texts say why).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom

from model.types import CLASSES
from pipeline.normative import STRUCTURES, NormativeRow, percentile_of_z
from structured_reports.types import PriorResult, ReportInput

logger = logging.getLogger(__name__)

#: Days of a year of the per-year changes.
DAYS_PER_YEAR = 365.25

#: The structures in report order with their labels (the stems of ``Volumes``' ``*_ml`` fields).
STRUCTURE_LABELS: dict[str, str] = {
    "hippocampus_left": "Left hippocampus",
    "hippocampus_right": "Right hippocampus",
    "lateral_ventricles": "Lateral ventricles",
    "grey_matter": "Grey matter",
    "white_matter": "White matter",
    "intracranial": "Intracranial volume",
}
if tuple(STRUCTURE_LABELS) != STRUCTURES:  # pragma: no cover - a programming error, caught on import
    raise RuntimeError("STRUCTURE_LABELS must list pipeline.normative.STRUCTURES in order")

_AGE_YEARS = {"D": 1.0 / DAYS_PER_YEAR, "W": 7.0 / DAYS_PER_YEAR, "M": 1.0 / 12.0, "Y": 1.0}


@dataclass(frozen=True)
class VolumeRow:
    """One structure's line of the volumes table.

    Parameters
    ----------
    structure : str
        The stem (``"hippocampus_left"``, ...).
    label : str
        The structure in words.
    ml : float
        Its volume.
    percent_icv : float or None
        Its percentage of the intracranial volume (None for the intracranial volume itself).
    reference : NormativeRow or None
        The normative row that applied (None: no table, or no row for the patient's age and sex).
    z_score, percentile : float or None
        Against ``reference``.
    prior_ml : float or None
        The prior study's volume (None: no prior volumes).
    change_ml_per_year, change_percent_per_year : float or None
        Per-year change since the prior (None: no prior volumes or no usable interval).
    """

    structure: str
    label: str
    ml: float
    percent_icv: float | None = None
    reference: NormativeRow | None = None
    z_score: float | None = None
    percentile: float | None = None
    prior_ml: float | None = None
    change_ml_per_year: float | None = None
    change_percent_per_year: float | None = None


def shown(report: ReportInput) -> ReportInput:
    """The report input as the writers show it: a study that was not analysed gets no volumes and no comparison.

    A "not analysed" report says why there is no result; volumes or a prior's comparison next to it would
    contradict it (and its sources are what was received, not an analysed series).  ``volumes_note`` and
    ``prior_note`` are kept.

    Parameters
    ----------
    report : ReportInput
        The run's report input.

    Returns
    -------
    ReportInput
        *report* itself when it has a result or nothing to drop, else a copy without ``volumes`` and ``prior``.
    """
    if report.prediction is not None or (report.volumes is None and report.prior is None):
        return report
    logger.info("run %s was not analysed: its volumes and prior comparison are left out of the reports", report.run_id)
    return dataclasses.replace(report, volumes=None, prior=None)


def dicom_date(value: object) -> datetime.date | None:
    """A DICOM DA value as a date (None when absent or not a valid ``YYYYMMDD``)."""
    text = "" if value is None else str(value).strip()
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


def age_years(ds: pydicom.Dataset) -> float | None:
    """The patient's age in years at the study: PatientAge, else from PatientBirthDate and StudyDate.

    Parameters
    ----------
    ds : pydicom.Dataset
        A source instance.

    Returns
    -------
    float or None
        E.g. 76.0 for ``076Y``, 0.5 for ``006M``, whole years from the dates; None when unknown.
    """
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(age) == 4 and age[:3].isdigit() and age[3] in _AGE_YEARS:
        return int(age[:3]) * _AGE_YEARS[age[3]]
    birth, study = dicom_date(ds.get("PatientBirthDate")), dicom_date(ds.get("StudyDate"))
    if birth is None or study is None or study < birth:
        return None
    return float(study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day)))


def interval_years(first: pydicom.Dataset, prior: PriorResult | None) -> float | None:
    """Years from the prior's Study Date to the current one; None without both dates or when not positive.

    Parameters
    ----------
    first : pydicom.Dataset
        A source instance of the current study (its StudyDate).
    prior : PriorResult or None
        The prior analysis.

    Returns
    -------
    float or None
        ``days / 365.25``.
    """
    current = dicom_date(first.get("StudyDate"))
    if prior is None or current is None:
        return None
    days = (current - prior.study_date).days
    return days / DAYS_PER_YEAR if days > 0 else None


def volume_rows(sources: Sequence[pydicom.Dataset], report: ReportInput) -> list[VolumeRow]:
    """One :class:`VolumeRow` per structure, in :data:`STRUCTURE_LABELS` order; empty without volumes.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        The analysed series (the first gives the study date, the patient's age and sex).
    report : ReportInput
        Its ``volumes``, ``prior`` and ``normative``.

    Returns
    -------
    list[VolumeRow]
        The table's lines.
    """
    volumes = report.volumes
    if volumes is None:
        return []
    first = sources[0]
    age, sex = age_years(first), str(first.get("PatientSex", "") or "")
    prior_volumes = report.prior.volumes if report.prior is not None else None
    years = interval_years(first, report.prior)
    rows = []
    for structure, label in STRUCTURE_LABELS.items():
        ml = float(getattr(volumes, f"{structure}_ml"))
        reference = report.normative.reference(structure, age, sex) if report.normative is not None else None
        z = None if reference is None else (ml - reference.mean_ml) / reference.sd_ml
        prior_ml = None if prior_volumes is None else float(getattr(prior_volumes, f"{structure}_ml"))
        rate = rate_percent = None
        if prior_ml is not None and years is not None:
            rate = (ml - prior_ml) / years
            rate_percent = 100.0 * (ml - prior_ml) / prior_ml / years if prior_ml > 0 else None
        rows.append(VolumeRow(
            structure=structure,
            label=label,
            ml=ml,
            percent_icv=None if structure == "intracranial" else volumes.percent_of_icv(ml),
            reference=reference,
            z_score=z,
            percentile=None if z is None else percentile_of_z(z),
            prior_ml=prior_ml,
            change_ml_per_year=rate,
            change_percent_per_year=rate_percent,
        ))
    return rows


def probability_changes(report: ReportInput) -> dict[str, float] | None:
    """Current minus prior probability of each class; None without both results.

    Parameters
    ----------
    report : ReportInput
        Its ``prediction`` and ``prior.probabilities``.

    Returns
    -------
    dict of str to float, or None
        Keyed like :data:`model.types.CLASSES`, in that order.
    """
    prior = report.prior
    if report.prediction is None or prior is None or prior.probabilities is None:
        return None
    if not set(CLASSES) <= set(prior.probabilities):
        return None
    return {c: float(report.prediction.probabilities[c]) - float(prior.probabilities[c]) for c in CLASSES}
