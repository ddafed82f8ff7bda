"""The Comprehensive 3D SR (TID 1500) carrying the model's result.

Layout of the content tree (DICOM PS3.16)::

    CONTAINER Imaging Measurement Report (TID 1500)
      HAS CONCEPT MOD  Language of Content Item and Descendants = English       (row 2)
      HAS OBS CONTEXT  Observer Type = Device, Device Observer UID, Name        (row 3: TID 1001/1002/1004)
      HAS CONCEPT MOD  Procedure reported = Brain MRI                           (row 4)
      CONTAINS CONTAINER Imaging Measurements                                   (row 6)
        CONTAINS CONTAINER Measurement Group (TID 1501)
          HAS OBS CONTEXT Tracking Identifier / Tracking Unique Identifier
          HAS CONCEPT MOD Finding Site = Brain
          HAS CONCEPT MOD Algorithm Name/Version/Parameters (TID 4019; analysed only)
          CONTAINS NUM Probability = p (UCUM "1"), HAS CONCEPT MOD Finding = <class>  (x3)
          CONTAINS CODE Impression = <predicted class>                             (TID 1501 qualitative evaluation)
          CONTAINS IMAGE Source of Measurement              (one representative image of the analysed series)
          CONTAINS NUM Change in probability since the prior study (x3; with a prior's probabilities)
        CONTAINS CONTAINER Measurement Group (x7; with volumes: structured_reports/measurements.py)
      CONTAINS CONTAINER Qualitative Evaluations                                (row 12)
        CONTAINS TEXT Comment = demonstration model / research use only warnings   (first)
        CONTAINS TEXT Summary, or Impression = "Not analysed: ..."
        CONTAINS TEXT Comment / Clinical Information ... (series, QC or what the node needs, notes, versions)

TID 1500's rows come in a fixed order (language, observation context, procedure,
measurements, then the qualitative evaluations), so the sentences a reader reads
first can only open the Qualitative Evaluations container: the warnings, then the
summary.  What precedes them is kept short: the device observer is named by UID
and name only (TID 1004's other rows are optional and are in the Contributing
Equipment Sequence), and TID 4019 lists four parameters: preset, preprocessing
version, weights SHA-256 and, for a demonstration model, ``demonstration_model=true``.

The SR goes into the study of the source instances, with their patient and
study modules, every source instance in the evidence, the node and the
algorithm in the Contributing Equipment Sequence (IHE AI Results), and
VerificationFlag UNVERIFIED, CompletionFlag COMPLETE, PreliminaryFlag
PRELIMINARY (an unverified machine result is never the definitive report).
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Sequence

import highdicom as hd
import pydicom
from highdicom.sr import RelationshipTypeValues
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from model.types import CLASSES
from structured_reports.charset import report_character_set
from structured_reports.concepts import (
    CLASS_CONCEPTS,
    QUALITATIVE_EVALUATIONS,
    coding_scheme_identification,
)
from structured_reports.measurements import (
    prior_evidence,
    probability_change_measurements,
    volume_groups,
    volumetry_equipment,
)
from structured_reports.sources import representative_image, with_type2_defaults
from structured_reports.texts import (  # DEMONSTRATION_TEXT, NOT_ANALYSED_PREFIX: also named from here
    DEMONSTRATION_TEXT,  # noqa: F401
    NOT_ANALYSED_PREFIX,
    analysed_series_text,
    notes_text,
    qc_text,
    received_text,
    requirement_text,
    summary_text,
    supersedes_text,
    versions_text,
    warning_texts,
)
from structured_reports.types import ReportError, ReportInput
from structured_reports.uids import UidKind, derive_uid
from structured_reports.volume_texts import comparison_texts
from structured_reports.volumes import shown

logger = logging.getLogger(__name__)

#: Concept name of the result: DCM 121073 "Impression".  Not DCM 121071
#: "Finding": TID 1501 reserves that name for the finding type of the group.
FINDING_NAME = codes.DCM.Impression

#: Concept name of the class a probability belongs to (a modifier of the NUM).
PROBABILITY_CLASS_NAME = codes.DCM.Finding

#: The model parameters (``ModelInfo.parameters`` keys) named in TID 4019; the others stay in the model's manifest.
REPORTED_PARAMETERS = ("preset",)

#: Series description of the SR series (at most 64 characters, LO).
SR_SERIES_DESCRIPTION = "AI result AD/MCI/CN (research use only)"

#: Decimals of the probabilities in the NUM items (more digits only make the report harder to read).
PROBABILITY_DECIMALS = 4

#: Tolerance on the sum of the class probabilities.
_PROBABILITY_SUM_TOLERANCE = 1e-3


def build_sr(
    sources: Sequence[pydicom.Dataset],
    report: ReportInput,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    predecessor: pydicom.Dataset | None = None,
    content_datetime: datetime.datetime | None = None,
    tracking_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the Comprehensive 3D SR of one run.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        The MR instances of the analysed series (headers suffice, e.g. read
        with ``stop_before_pixels=True``).  For a study that was not analysed:
        the instances that were received.  Patient and study modules are
        copied from the first one.
    report : ReportInput
        Result, device, model and note information of the run.
    series_instance_uid : str
        Series Instance UID of the SR (see :func:`structured_reports.uids.derive_uid`).
    sop_instance_uid : str
        SOP Instance UID of the SR.
    series_number : int
        Series Number of the SR series (a fixed number per node, not random).
    instance_number : int, optional
        Instance Number of the SR, by default 1.
    predecessor : pydicom.Dataset or None, optional
        An earlier SR this one supersedes: referenced in the
        PredecessorDocumentsSequence and named in a text item.
    content_datetime : datetime.datetime or None, optional
        Content Date/Time of the report (e.g. when the run finished); the
        current time if None.  Passing the recorded time makes a replay
        reproduce the same content.
    tracking_uid : str or None, optional
        Tracking Unique Identifier of the measurement group; derived from
        study, analysed series and model weights if None, so reports on the
        same series by the same model share it.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR dataset, ready for ``dcmwrite`` or C-STORE.

    Raises
    ------
    ReportError
        If ``sources`` is empty or of several studies, ``report`` sets both
        or neither of ``prediction`` and ``not_analysed``, or the prediction
        is inconsistent (unknown class, probabilities not summing to 1).
    """
    check_report_input(sources, report)
    report = shown(report)
    first = sources[0]
    if tracking_uid is None:
        tracking_uid = derive_uid(
            str(first.StudyInstanceUID),
            str(first.SeriesInstanceUID),
            report.model.weights_sha256,
            UidKind.TRACKING,
        )
    algorithm = _algorithm_identification(report) if report.prediction is not None else None
    group = _measurement_group(sources, report, algorithm, tracking_uid)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=report.device.device_uid,
            name=report.device.name,
        ),
    )
    measurement_report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.BrainMRI,
        imaging_measurements=[group, *volume_groups(sources, report, representative_image(sources))],
        title=codes.cid7021.ImagingMeasurementReport,
    )
    root = measurement_report[0]
    root.ContentSequence.append(_text_container(sources, report, predecessor))
    _make_separate(root)

    when = content_datetime or datetime.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=[with_type2_defaults(first), *sources[1:], *prior_evidence(report)],
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=report.device.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        contributing_equipment=_contributing_equipment(report, when) + volumetry_equipment(report, when),
        specific_character_set=report_character_set(first.get("SpecificCharacterSet")),
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=report.device.model_name,
        software_versions=report.device.software_version,
        device_serial_number=report.device.serial_number,
        content_date=when.date(),
        content_time=when.time(),
        coding_schemes=coding_scheme_identification(),
    )
    logger.info(
        "built SR %s in series %s for study %s (run %s, %s)",
        sop_instance_uid,
        series_instance_uid,
        first.StudyInstanceUID,
        report.run_id,
        "not analysed" if report.not_analysed else "analysed",
    )
    return sr


def _make_separate(item: pydicom.Dataset) -> None:
    """Mark every container SEPARATE: its items are no running narrative.

    highdicom creates CONTINUOUS containers; with SEPARATE, viewers such as
    dsr2html print each item with its concept name ("Probability = 0.62").
    """
    if item.get("ValueType") == "CONTAINER":
        item.ContinuityOfContent = "SEPARATE"
    for child in item.get("ContentSequence", []):
        _make_separate(child)


def check_report_input(sources: Sequence[pydicom.Dataset], report: ReportInput) -> None:
    """Raise :class:`ReportError` unless sources and report are consistent.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        The source instances (at least one, all of one study).
    report : ReportInput
        Exactly one of ``prediction`` and ``not_analysed`` set; a prediction
        with the three classes, probabilities in [0, 1] summing to 1, a known
        predicted class and ``used_note`` matching the listed notes.

    Raises
    ------
    ReportError
        Naming the first inconsistency found.
    """
    if len(sources) == 0:
        raise ReportError("an SR needs at least one source instance")
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ReportError(f"source instances belong to {len(studies)} studies, expected 1")
    if (report.prediction is None) == (report.not_analysed is None):
        raise ReportError("exactly one of prediction and not_analysed must be set")
    prediction = report.prediction
    if prediction is None:
        return
    if set(prediction.probabilities) != set(CLASSES):
        raise ReportError(
            f"probabilities are given for {sorted(prediction.probabilities)}, "
            f"expected {list(CLASSES)}"
        )
    values = [float(prediction.probabilities[c]) for c in CLASSES]
    if any(not (0.0 <= v <= 1.0) or math.isnan(v) for v in values):
        raise ReportError("class probabilities must lie in [0, 1]")
    if abs(sum(values) - 1.0) > _PROBABILITY_SUM_TOLERANCE:
        raise ReportError(f"class probabilities sum to {sum(values):.6f}, not 1")
    if prediction.predicted_class not in CLASSES:
        raise ReportError(f"unknown predicted class {prediction.predicted_class!r}")
    if prediction.used_note != (report.notes.count > 0):
        raise ReportError(
            f"prediction.used_note is {prediction.used_note} but "
            f"{report.notes.count} note(s) are listed"
        )


def algorithm_parameters(report: ReportInput) -> list[str]:
    """The TID 4019 parameters a reader needs: preset, preprocessing version, weights hash, demonstration flag.

    Parameters
    ----------
    report : ReportInput
        The report input (its model's other parameters are left out: the weights hash names the checkpoint).

    Returns
    -------
    list[str]
        ``key=value`` strings.
    """
    parameters = [f"{key}={report.model.parameters[key]}" for key in REPORTED_PARAMETERS
                  if key in report.model.parameters]
    parameters.append(f"preprocessing_version={report.preprocessing_version}")
    parameters.append(f"weights_sha256={report.model.weights_sha256}")
    if report.model.demonstration:
        parameters.append("demonstration_model=true")
    return parameters


def _algorithm_identification(report: ReportInput) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for the model that ran: name, version and :func:`algorithm_parameters`."""
    return hd.sr.AlgorithmIdentification(
        name=report.model.name,
        version=report.model.version,
        parameters=algorithm_parameters(report),
    )


def _measurement_group(
    sources: Sequence[pydicom.Dataset],
    report: ReportInput,
    algorithm: hd.sr.AlgorithmIdentification | None,
    tracking_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group on the analysed series (finding and probabilities); a bare one when not analysed."""
    first = sources[0]
    series_number = first.get("SeriesNumber")
    if report.prediction is None:
        identifier = "AD/MCI/CN classification, not analysed"
    else:
        identifier = f"{report.model.name} AD/MCI/CN classification"
        if series_number is not None and str(series_number) != "":
            identifier += f", series {series_number}"
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier)
    finding_sites = [hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)]
    prediction = report.prediction
    if prediction is None:
        # Not analysed: the group says so; the reason, what was received and
        # what the node needs are in the text container.  No algorithm (no
        # model ran) and no source images: what was received need not be
        # images (the evidence still lists every instance).
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            algorithm_id=algorithm,
            finding_sites=finding_sites,
        )
    measurements = [_probability(c, float(prediction.probabilities[c])) for c in CLASSES]
    measurements += probability_change_measurements(report)
    finding = hd.sr.QualitativeEvaluation(
        name=FINDING_NAME,
        value=CLASS_CONCEPTS[prediction.predicted_class],
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        finding_sites=finding_sites,
        measurements=measurements,
        qualitative_evaluations=[finding],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(representative_image(sources))
        ],
    )


def _probability(label: str, value: float) -> hd.sr.Measurement:
    """A NUM ``Probability`` (UCUM "1") qualified by the class it belongs to."""
    measurement = hd.sr.Measurement(
        name=codes.DCM.Probability,
        value=round(value, PROBABILITY_DECIMALS),
        unit=codes.UCUM.NoUnits,
    )
    item = measurement[0]
    modifier = hd.sr.CodeContentItem(
        name=PROBABILITY_CLASS_NAME,
        value=CLASS_CONCEPTS[label],
        relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
    )
    if "ContentSequence" in item:
        item.ContentSequence.append(modifier)
    else:
        item.ContentSequence = hd.sr.ContentSequence([modifier])
    return measurement


def _text(name: hd.sr.CodedConcept | Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name,
        value=value,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )


def _text_container(
    sources: Sequence[pydicom.Dataset], report: ReportInput, predecessor: pydicom.Dataset | None
) -> hd.sr.ContainerContentItem:
    """The items a radiologist reads, in the TID 1500 Qualitative Evaluations container.

    The warnings first, then the result (or why there is none), then the inputs and the provenance.
    """
    items = [_text(codes.DCM.Comment, warning) for warning in warning_texts(report)]
    prediction = report.prediction
    if prediction is not None:
        items.append(_text(codes.DCM.Summary, summary_text(report)))
        items.extend(_text(codes.DCM.Comment, text) for text in comparison_texts(sources, report))
        items.append(_text(codes.DCM.Comment, analysed_series_text(sources)))
        if report.qc:
            items.append(_text(codes.DCM.Comment, qc_text(report)))
    elif report.not_analysed is not None:
        _, reason = report.not_analysed
        items.append(_text(FINDING_NAME, NOT_ANALYSED_PREFIX + reason))
        items.extend(_text(codes.DCM.Comment, text) for text in comparison_texts(sources, report))
        items.append(_text(codes.DCM.Comment, received_text(sources)))
        needed = requirement_text(report)
        if needed:
            items.append(_text(codes.DCM.Comment, needed))
    items.append(_text(codes.LN.ClinicalInformation, notes_text(report)))
    items.append(_text(codes.DCM.Comment, versions_text(report)))
    if predecessor is not None:
        items.append(_text(codes.DCM.Comment, supersedes_text(predecessor)))
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


#: Maximum length of a Long String (LO) value.
LO_MAX = 64


def _contributing_equipment(
    report: ReportInput, when: datetime.datetime
) -> list[hd.ContributingEquipment]:
    """The node and the algorithm as processing equipment (IHE AI Results)."""
    node = hd.ContributingEquipment(
        manufacturer=report.device.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=report.device.model_name,
        software_versions=report.device.software_version,
        device_serial_number=report.device.serial_number,
        station_name=report.device.name[:16],
        contribution_datetime=when,
        contribution_description="DICOM node that ran the analysis and wrote this report",
    )
    if report.prediction is None:
        return [node]  # no model ran
    algorithm = hd.ContributingEquipment(
        manufacturer=report.device.manufacturer[:LO_MAX],
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        # Long String attributes: a model's name or version may be longer than 64 characters.
        manufacturer_model_name=report.model.name[:LO_MAX],
        software_versions=[report.model.version[:LO_MAX], report.preprocessing_version[:LO_MAX]],
        contribution_datetime=when,
        contribution_description=(
            f"AI algorithm {report.model.name} {report.model.version}"
            + (" (demonstration model)" if report.model.demonstration else "")
        )[:64],
    )
    return [node, algorithm]
