"""Human-readable fallback: an Encapsulated PDF (Modality DOC) in the same study.

Many PACS show only images and PDFs, so next to the SR the node can send a
one-page PDF with the result, a probability bar chart, optional key slices,
the inputs used, model and preprocessing versions and the disclaimer.

highdicom has no Encapsulated PDF IOD; the object is built on
:class:`highdicom.SOPClass` (Patient, General Study, Patient Study, General
Series, General Equipment and SOP Common modules, patient and study copied from
the source like the SR) plus the Encapsulated Document Series, SC Equipment and
Encapsulated Document modules of PS3.3 A.45.1.  The page is drawn with
matplotlib's object API (no pyplot, no global backend state).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from io import BytesIO

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from model.types import CLASSES
from structured_reports.charset import report_character_set
from structured_reports.concepts import CLASS_LABELS
from structured_reports.sr import DEMONSTRATION_TEXT, NOT_ANALYSED_PREFIX, check_report_input
from structured_reports.texts import notes_text, summary_text, supersedes_text, versions_text
from structured_reports.types import DISCLAIMER, KeySlice, ReportError, ReportInput

logger = logging.getLogger(__name__)

#: Series description of the PDF series (LO, at most 64 characters).
PDF_SERIES_DESCRIPTION = "AI result AD/MCI/CN report (PDF, research use only)"

#: Document title shown by viewers (ST).
PDF_DOCUMENT_TITLE = "Brain MRI AI result: AD / MCI / CN (research use only)"

#: At most this many key slices are drawn.
MAX_KEY_SLICES = 3

#: Caption under key slices that carry an outline.
OUTLINE_CAPTION = (
    "Registered brain (grey) with the outline of the template brain (yellow): "
    "the outline should follow the brain's edge."
)

_OUTLINE_COLOUR = "#ffd700"
_A4_INCHES = (8.27, 11.69)
_BAR_COLOURS = {"AD": "#b2182b", "MCI": "#ef8a62", "CN": "#4393c3"}


def render_pdf(
    sources: Sequence[Dataset],
    report: ReportInput,
    *,
    key_slices: Sequence[KeySlice | npt.ArrayLike] | None = None,
    predecessor: Dataset | None = None,
    content_datetime: datetime.datetime | None = None,
) -> bytes:
    """Draw the one-page result report as PDF bytes.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        Instances of the analysed series (headers); the first names patient,
        study and series on the page.
    report : ReportInput
        The run's result and provenance.
    key_slices : Sequence of KeySlice or 2-D arrays, or None, optional
        Slices to show (at most :data:`MAX_KEY_SLICES`), each with an
        optional outline drawn over it and a caption.
    predecessor : pydicom.Dataset or None, optional
        An earlier report this one supersedes.
    content_datetime : datetime.datetime or None, optional
        Time printed as the report time; now if None.

    Returns
    -------
    bytes
        A PDF document (no creation date in its metadata, so a replay with the
        same inputs gives the same bytes).
    """
    first = sources[0]
    when = content_datetime or datetime.datetime.now()
    fig = Figure(figsize=_A4_INCHES)
    fig.text(0.06, 0.955, "Brain MRI: AI classification AD / MCI / CN",
             fontsize=16, weight="bold")
    fig.text(0.06, 0.935, DISCLAIMER, fontsize=8, color="#b2182b", wrap=True)
    header = [
        f"Patient: {_person(first.get('PatientName'))}    ID: {first.get('PatientID', '')}    "
        f"Birth date: {_date(first.get('PatientBirthDate'))}",
        f"Study date: {_date(first.get('StudyDate'))}    Accession: {first.get('AccessionNumber', '')}",
        f"Series analysed: {first.get('SeriesNumber', '')} {first.get('SeriesDescription', '')}"
        f" ({len(sources)} instances)",
        f"Report time: {when:%Y-%m-%d %H:%M}",
    ]
    fig.text(0.06, 0.90, "\n".join(header), fontsize=9, va="top", linespacing=1.5)

    prediction = report.prediction
    if prediction is not None:
        fig.text(0.06, 0.815, summary_text(report).replace(" Probabilities:", "\nProbabilities:"),
                 fontsize=11, weight="bold", va="top", linespacing=1.4)
        axes = fig.add_axes((0.34, 0.60, 0.56, 0.16))
        values = [float(prediction.probabilities[c]) for c in CLASSES]
        bars = axes.barh(
            [CLASS_LABELS[c] for c in CLASSES], values, color=[_BAR_COLOURS[c] for c in CLASSES]
        )
        axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=9)
        axes.set_xlim(0.0, 1.0)
        axes.invert_yaxis()
        axes.set_xlabel("Model probability")
        axes.tick_params(labelsize=9)
    elif report.not_analysed is not None:
        fig.text(0.06, 0.815, NOT_ANALYSED_PREFIX + report.not_analysed[1],  # top-aligned: wrapped lines go down
                 fontsize=12, weight="bold", va="top", linespacing=1.4, wrap=True)

    slices = [_as_key_slice(item, index) for index, item in enumerate(list(key_slices or [])[:MAX_KEY_SLICES])]
    for index, key in enumerate(slices):
        draw_key_slice(fig.add_axes((0.06 + index * 0.30, 0.33, 0.27, 0.22)), key)
    if any(key.outline is not None for key in slices):
        fig.text(0.06, 0.312, OUTLINE_CAPTION, fontsize=7.5, color="#555555")

    lines = [notes_text(report), versions_text(report)]
    if report.model.demonstration:
        lines.append(DEMONSTRATION_TEXT)
    if predecessor is not None:
        lines.append(supersedes_text(predecessor))
    text_top = 0.285 if slices else 0.52
    fig.text(0.06, text_top, "Inputs and provenance", fontsize=11, weight="bold")
    fig.text(0.06, text_top - 0.02, "\n\n".join(lines), fontsize=8.5, va="top", wrap=True)
    fig.text(0.06, 0.04, DISCLAIMER, fontsize=8, color="#b2182b", wrap=True)

    buffer = BytesIO()
    fig.savefig(buffer, format="pdf", metadata={"CreationDate": None, "Title": PDF_DOCUMENT_TITLE})
    return buffer.getvalue()


def build_pdf(
    sources: Sequence[Dataset],
    report: ReportInput,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    key_slices: Sequence[KeySlice | npt.ArrayLike] | None = None,
    predecessor: Dataset | None = None,
    content_datetime: datetime.datetime | None = None,
) -> hd.SOPClass:
    """Build the Encapsulated PDF instance (Modality DOC) of one run.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        Instances of the analysed series (headers); patient and study are
        copied from the first; all are listed in the SourceInstanceSequence.
    report : ReportInput
        The run's result and provenance.
    series_instance_uid : str
        Series Instance UID of the PDF series.
    sop_instance_uid : str
        SOP Instance UID of the PDF.
    series_number : int
        Series Number of the PDF series (fixed per node).
    instance_number : int, optional
        Instance Number, by default 1.
    key_slices : Sequence of KeySlice or 2-D arrays, or None, optional
        Slices to show on the page (see :func:`render_pdf`).
    predecessor : pydicom.Dataset or None, optional
        An earlier PDF (or SR) this one supersedes; named on the page.
    content_datetime : datetime.datetime or None, optional
        Content Date/Time; now if None.

    Returns
    -------
    highdicom.SOPClass
        The Encapsulated PDF dataset, ready for ``dcmwrite`` or C-STORE.

    Raises
    ------
    ReportError
        If ``sources`` or ``report`` are inconsistent (as for the SR).
    """
    check_report_input(sources, report)
    first = sources[0]
    when = content_datetime or datetime.datetime.now()
    document = render_pdf(
        sources, report, key_slices=key_slices, predecessor=predecessor, content_datetime=when
    )
    ds = hd.SOPClass(
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        sop_class_uid=EncapsulatedPDFStorage,
        instance_number=instance_number,
        modality="DOC",
        manufacturer=report.device.manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        patient_id=first.get("PatientID"),
        patient_name=first.get("PatientName"),
        patient_birth_date=first.get("PatientBirthDate"),
        patient_sex=first.get("PatientSex"),
        accession_number=first.get("AccessionNumber"),
        study_id=first.get("StudyID"),
        study_date=first.get("StudyDate"),
        study_time=first.get("StudyTime"),
        referring_physician_name=first.get("ReferringPhysicianName"),
        series_description=PDF_SERIES_DESCRIPTION,
        manufacturer_model_name=report.device.model_name,
        software_versions=report.device.software_version,
        device_serial_number=report.device.serial_number,
        content_date=when.date(),
        content_time=when.time(),
        specific_character_set=report_character_set(first.get("SpecificCharacterSet")),
    )
    ds.copy_patient_and_study_information(first)
    # SC Equipment module: the document was made on a workstation.
    ds.ConversionType = "WSD"
    # Encapsulated Document module.
    ds.AcquisitionDateTime = pydicom.valuerep.DT(when)
    ds.BurnedInAnnotation = "YES"
    ds.RecognizableVisualFeatures = "NO"
    ds.DocumentTitle = PDF_DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = []
    ds.SourceInstanceSequence = [_reference(instance) for instance in sources]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = document
    ds.EncapsulatedDocumentLength = len(document)
    logger.info(
        "built PDF %s in series %s for study %s (run %s, %d bytes)",
        sop_instance_uid,
        series_instance_uid,
        first.StudyInstanceUID,
        report.run_id,
        len(document),
    )
    return ds


def draw_key_slice(axes: Axes, key: KeySlice) -> None:
    """Draw one key slice as the PDF page shows it: grey image, outline in yellow, title.

    Parameters
    ----------
    axes : matplotlib.axes.Axes
        Empty axes to draw into (their frame and ticks are switched off).
    key : KeySlice
        The slice; its outline is drawn when it is neither empty nor everywhere.
    """
    axes.imshow(key.image, cmap="gray", interpolation="nearest")
    if key.outline is not None and key.outline.any() and not key.outline.all():
        axes.contour(key.outline.astype(float), levels=[0.5], colors=[_OUTLINE_COLOUR], linewidths=0.8)
    axes.set_axis_off()
    axes.set_title(key.title, fontsize=8)


def _as_key_slice(item: KeySlice | npt.ArrayLike, index: int) -> KeySlice:
    """A :class:`KeySlice` from a KeySlice or a bare 2-D array."""
    if isinstance(item, KeySlice):
        image = np.asarray(item.image, dtype=float)
        outline = None if item.outline is None else np.asarray(item.outline, dtype=bool)
        if outline is not None and outline.shape != image.shape:
            raise ReportError(f"key slice outline {outline.shape} does not match image {image.shape}")
        return KeySlice(image=image, outline=outline, title=item.title or f"Key slice {index + 1}")
    return KeySlice(image=np.asarray(item, dtype=float), title=f"Key slice {index + 1}")


def _reference(instance: Dataset) -> Dataset:
    """An item of the SourceInstanceSequence."""
    item = Dataset()
    item.ReferencedSOPClassUID = instance.SOPClassUID
    item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
    return item


def _person(value: object) -> str:
    """A DICOM person name as "Family, Given" for the page."""
    if value is None or str(value) == "":
        return ""
    name = pydicom.valuerep.PersonName(str(value))
    return ", ".join(part for part in (name.family_name, name.given_name) if part)


def _date(value: object) -> str:
    """A DICOM DA as YYYY-MM-DD (unchanged when it is not 8 digits)."""
    text = "" if value is None else str(value)
    return f"{text[:4]}-{text[4:6]}-{text[6:]}" if len(text) == 8 and text.isdigit() else text
