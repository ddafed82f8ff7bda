"""The SR's brain volumes and prior-study comparison: TID 1501 groups, evidence and equipment for :mod:`sr`.

Layout (after the classification group, in the TID 1500 Imaging Measurements container)::

    CONTAINER Measurement Group (TID 1501), one per structure (6), then one for the asymmetry
      HAS OBS CONTEXT Tracking Identifier "Volumetry: left hippocampus" / Tracking Unique Identifier
      HAS CONCEPT MOD Finding Site = Hippocampus (SCT), HAS CONCEPT MOD Laterality = Left (SCT)
      HAS CONCEPT MOD Algorithm Name / Version / Parameters (TID 4019: the volumetry method)
      CONTAINS NUM Volume (SCT 118565006) = v ml
        HAS PROPERTIES (TID 311, only with a normative table) Mean Value of population ml,
          Standard deviation of population ml, Z-Score of measurement 1, Percentile Ranking of
          measurement %, Population description, Reference Authority (the table's source)
      CONTAINS NUM (ICVPCT, 99ADNODE) Volume, percent of intracranial volume = p %   (not for the ICV)
      CONTAINS NUM (PRIORVOL, 99ADNODE) Volume at the prior study = v0 ml            (with prior volumes)
        INFERRED FROM IMAGE Source of Measurement = an image of the prior series
      CONTAINS NUM (VOLRATE, 99ADNODE) Volume change per year = r ml/a                (and a usable interval)
        INFERRED FROM IMAGE Source of Measurement = current image, prior image
      CONTAINS NUM (VOLPCTRATE, 99ADNODE) Relative volume change per year = q %/a
        INFERRED FROM IMAGE ... (as above)
      CONTAINS IMAGE Source of Measurement = the representative image of the analysed series

The classification group gets, with a prior's probabilities, one NUM (PROBCHG, 99ADNODE) "Change
in probability since the prior study" per class (UCUM ``1``, current minus prior), qualified by
the class like the probabilities and inferred from an image of the prior series.  Every instance
of the prior series is in the evidence; highdicom puts instances of another study into the
Pertinent Other Evidence Sequence.

Why TID 1501 and not TID 1411 (highdicom's ``VolumetricROIMeasurementsAndQualitativeEvaluations``):
TID 1411 requires the measured region itself (a segmentation, a surface or a set of 2D regions)
as an object the SR references; the atlas labels warped to the patient are not stored as a DICOM
Segmentation, so the volumes are measurements of the group's finding site, which is TID 1501.
"""

from __future__ import annotations

import datetime
import logging
import re
from collections.abc import Sequence

import highdicom as hd
import pydicom
from highdicom.sr import RelationshipTypeValues
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from model.types import CLASSES
from pipeline.volumetry import Volumes
from structured_reports.concepts import (
    CLASS_CONCEPTS,
    HIPPOCAMPAL_ASYMMETRY,
    MILLILITER,
    MILLILITER_PER_YEAR,
    PERCENT_OF_ICV,
    PERCENT_PER_YEAR,
    PRIOR_VOLUME,
    PROBABILITY_CHANGE,
    RELATIVE_VOLUME_CHANGE_PER_YEAR,
    STRUCTURE_SITES,
    VOLUME_CHANGE_PER_YEAR,
)
from structured_reports.types import PriorResult, ReportInput
from structured_reports.uids import UidKind, derive_uid
from structured_reports.volumes import VolumeRow, probability_changes, volume_rows

logger = logging.getLogger(__name__)

#: Decimals of the NUM values: volumes (ml), percentages and rates, z-scores and probability changes.
VOLUME_DECIMALS = 3
PERCENT_DECIMALS = 4
RATE_DECIMALS = 4
SCORE_DECIMALS = 4

#: Tracking identifier of a volume group: "Volumetry: " and the structure.
TRACKING_PREFIX = "Volumetry: "

#: ``Volumes.algorithm`` as :func:`pipeline.volumetry.algorithm_name` writes it: name, version, details.
_ALGORITHM = re.compile(r"^(?P<name>\S+) (?P<version>\S+) \((?P<detail>.+)\)$")

#: Maximum length of a Long String (LO) value.
_LO_MAX = 64


def volumetry_algorithm(volumes: Volumes) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for the volumetry: ``Volumes.algorithm`` split into name, version and its details.

    Parameters
    ----------
    volumes : Volumes
        The measured volumes (``algorithm``: e.g. ``"pipeline.volumetry 1 (ANTsPy 0.6.1: SyN to Colin27, ...)"``).

    Returns
    -------
    highdicom.sr.AlgorithmIdentification
        Name ``pipeline.volumetry``, version ``1``, the details as the one parameter; a string of another
        form is the name, with version "not stated".
    """
    match = _ALGORITHM.match(volumes.algorithm.strip())
    if match is None:
        return hd.sr.AlgorithmIdentification(name=volumes.algorithm.strip() or "volumetry", version="not stated")
    return hd.sr.AlgorithmIdentification(name=match["name"], version=match["version"],
                                         parameters=[match["detail"]])


def _num(name: hd.sr.CodedConcept | Code, value: float, unit: hd.sr.CodedConcept | Code) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=value, unit=unit,
                                relationship_type=RelationshipTypeValues.HAS_PROPERTIES)


def _properties(row: VolumeRow, report: ReportInput) -> hd.sr.MeasurementProperties | None:
    """TID 310/311 of a Volume: the normative row's mean and SD, the z-score and percentile; None without."""
    if row.reference is None or row.z_score is None or row.percentile is None or report.normative is None:
        return None
    values = [
        _num(codes.SCT.MeanValueOfPopulation, round(row.reference.mean_ml, VOLUME_DECIMALS), MILLILITER),
        _num(codes.DCM.StandardDeviationOfPopulation, round(row.reference.sd_ml, VOLUME_DECIMALS), MILLILITER),
        _num(codes.DCM.ZScoreOfMeasurement, round(row.z_score, SCORE_DECIMALS), codes.UCUM.NoUnits),
        _num(codes.DCM.PercentileRankingOfMeasurement, round(row.percentile, PERCENT_DECIMALS), codes.UCUM.Percent),
    ]
    statistics = hd.sr.MeasurementStatisticalProperties(
        values=values, description=row.reference.describe(), authority=report.normative.source)
    return hd.sr.MeasurementProperties(measurement_statistical_properties=statistics)


def prior_image(prior: PriorResult | None) -> hd.sr.SourceImageForMeasurement | None:
    """The prior series' middle instance (in the order given) as a source of a measurement; None without one."""
    if prior is None or not prior.instances:
        return None
    sop_class, sop_instance = prior.instances[len(prior.instances) // 2]
    return hd.sr.SourceImageForMeasurement(referenced_sop_class_uid=sop_class,
                                           referenced_sop_instance_uid=sop_instance)


def _measurements(row: VolumeRow, report: ReportInput, current: pydicom.Dataset) -> list[hd.sr.Measurement]:
    """Volume, % of ICV, the prior's volume and the changes per year of one structure."""
    measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=round(row.ml, VOLUME_DECIMALS), unit=MILLILITER,
                                      properties=_properties(row, report))]
    if row.percent_icv is not None:
        measurements.append(hd.sr.Measurement(name=PERCENT_OF_ICV, value=round(row.percent_icv, PERCENT_DECIMALS),
                                              unit=codes.UCUM.Percent))
    before = prior_image(report.prior)
    if row.prior_ml is not None:
        measurements.append(hd.sr.Measurement(
            name=PRIOR_VOLUME, value=round(row.prior_ml, VOLUME_DECIMALS), unit=MILLILITER,
            referenced_images=[before] if before is not None else None))
    sources = [hd.sr.SourceImageForMeasurement.from_source_image(current),
               *([before] if before is not None else [])]
    if row.change_ml_per_year is not None:
        measurements.append(hd.sr.Measurement(
            name=VOLUME_CHANGE_PER_YEAR, value=round(row.change_ml_per_year, RATE_DECIMALS),
            unit=MILLILITER_PER_YEAR, referenced_images=sources))
    if row.change_percent_per_year is not None:
        measurements.append(hd.sr.Measurement(
            name=RELATIVE_VOLUME_CHANGE_PER_YEAR, value=round(row.change_percent_per_year, RATE_DECIMALS),
            unit=PERCENT_PER_YEAR, referenced_images=sources))
    return measurements


def _tracking(first: pydicom.Dataset, structure: str, label: str) -> hd.sr.TrackingIdentifier:
    """Tracking identifier and UID of a volume group (the UID derived from study, analysed series and structure)."""
    uid = derive_uid(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), "volumetry", structure,
                     UidKind.TRACKING)
    return hd.sr.TrackingIdentifier(uid=uid, identifier=f"{TRACKING_PREFIX}{label.lower()}")


def volume_groups(
    sources: Sequence[pydicom.Dataset], report: ReportInput, current: pydicom.Dataset
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One TID 1501 group per structure and one for the hippocampal asymmetry; empty without volumes.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        The analysed series (the first: study, series, patient's age and sex).
    report : ReportInput
        Its ``volumes``, ``prior`` and ``normative``.
    current : pydicom.Dataset
        The representative image of the analysed series (the groups' source image).

    Returns
    -------
    list[highdicom.sr.MeasurementsAndQualitativeEvaluations]
        The groups, in :data:`structured_reports.volumes.STRUCTURE_LABELS` order, the asymmetry last.
    """
    volumes = report.volumes
    if volumes is None:
        return []
    first = sources[0]
    algorithm = volumetry_algorithm(volumes)
    source = [hd.sr.SourceImageForMeasurementGroup.from_source_image(current)]
    groups = []
    for row in volume_rows(sources, report):
        site, laterality = STRUCTURE_SITES[row.structure]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(first, row.structure, row.label),
            algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(anatomic_location=site, laterality=laterality)],
            measurements=_measurements(row, report, current),
            source_images=source,
        ))
    asymmetry = hd.sr.Measurement(name=HIPPOCAMPAL_ASYMMETRY,
                                  value=round(volumes.hippocampal_asymmetry_percent, PERCENT_DECIMALS),
                                  unit=codes.UCUM.Percent)
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(first, "hippocampal_asymmetry", "hippocampal asymmetry"),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Hippocampus, laterality=codes.SCT.Bilateral)],
        measurements=[asymmetry],
        source_images=source,
    ))
    return groups


def probability_change_measurements(report: ReportInput) -> list[hd.sr.Measurement]:
    """Per class, current minus prior probability (UCUM ``1``), qualified by the class; empty without both.

    Parameters
    ----------
    report : ReportInput
        Its ``prediction`` and ``prior.probabilities``.

    Returns
    -------
    list[highdicom.sr.Measurement]
        One NUM per class of :data:`model.types.CLASSES`, inferred from an image of the prior series.
    """
    changes = probability_changes(report)
    if changes is None:
        return []
    before = prior_image(report.prior)
    measurements = []
    for label in CLASSES:
        measurement = hd.sr.Measurement(name=PROBABILITY_CHANGE, value=round(changes[label], SCORE_DECIMALS),
                                        unit=codes.UCUM.NoUnits,
                                        referenced_images=[before] if before is not None else None)
        item = measurement[0]
        modifier = hd.sr.CodeContentItem(name=codes.DCM.Finding, value=CLASS_CONCEPTS[label],
                                         relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD)
        if "ContentSequence" in item:
            item.ContentSequence.insert(0, modifier)  # the class first, then the prior image it is inferred from
        else:
            item.ContentSequence = hd.sr.ContentSequence([modifier])
        measurements.append(measurement)
    return measurements


def prior_evidence(report: ReportInput) -> list[pydicom.Dataset]:
    """The prior series' instances as evidence items (study, series, SOP class and instance); empty without.

    Parameters
    ----------
    report : ReportInput
        Its ``prior``.

    Returns
    -------
    list[pydicom.Dataset]
        Datasets with just the four UIDs highdicom's evidence needs: another study's go to the
        Pertinent Other Evidence Sequence.
    """
    prior = report.prior
    if prior is None:
        return []
    evidence = []
    for sop_class, sop_instance in prior.instances:
        ds = pydicom.Dataset()
        ds.StudyInstanceUID = prior.study_instance_uid
        ds.SeriesInstanceUID = prior.series_instance_uid
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_instance
        evidence.append(ds)
    return evidence


def volumetry_equipment(report: ReportInput, when: datetime.datetime) -> list[hd.ContributingEquipment]:
    """The volumetry as processing equipment (IHE AI Results), next to the node and the model; empty without.

    Parameters
    ----------
    report : ReportInput
        Its ``volumes`` (their ``algorithm``) and ``device``.
    when : datetime.datetime
        Contribution date and time (the report's content time).

    Returns
    -------
    list[highdicom.ContributingEquipment]
        One item, or none without volumes.
    """
    if report.volumes is None:
        return []
    algorithm = volumetry_algorithm(report.volumes)
    name, version = str(algorithm[0].TextValue), str(algorithm[1].TextValue)
    return [hd.ContributingEquipment(
        manufacturer=report.device.manufacturer[:_LO_MAX],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=name[:_LO_MAX],
        software_versions=version[:_LO_MAX],
        contribution_datetime=when,
        contribution_description=f"Brain volumetry {name} {version}"[:_LO_MAX],
    )]
