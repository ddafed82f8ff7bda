"""Human-readable fallback: an Encapsulated PDF (Modality DOC) in the same study.

Many PACS show only images and PDFs, so next to the SR the node can send a
one-page PDF (laid out by :func:`compose_page`): the warnings in a framed banner
as large and bold as the result, the patient with sex and age at the study, the
result and a probability bar chart (or why there is none, what was received and
what the node needs), optional key slices drawn at one size with orientation
markers, the image quality checks with their limits, the inputs used, model and
preprocessing versions.  With volumes, a prior study or a note about either, a second
page (:func:`compose_volumes_page`) has the volumes table and the comparison with the
prior study.  Text is wrapped at spaces only, so a UID or a run id is never split.

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
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from model.types import CLASSES
from structured_reports.charset import report_character_set
from structured_reports.concepts import CLASS_LABELS
from structured_reports.page import (  # draw_key_slice: also named from here (``dicom-node check``)
    A4_INCHES,
    MARGIN,
    RESULT_FONT,
    TEXT_WIDTH,
    WARNING_COLOUR,
    Page,
    draw_key_slice,
    square_side,
)
from structured_reports.sr import check_report_input
from structured_reports.texts import (
    NOT_ANALYSED_PREFIX,
    age_at_study,
    analysed_series_label,
    notes_text,
    qc_value_text,
    requirement_text,
    series_labels,
    sex_text,
    summary_text,
    supersedes_text,
    versions_text,
    warning_texts,
)
from structured_reports.types import DISCLAIMER, KeySlice, ReportError, ReportInput
from structured_reports.volume_texts import (
    normative_text,
    percentile_label,
    prior_date_text,
    prior_gaps,
    probability_change_text,
)
from structured_reports.volumes import VolumeRow, shown, volume_rows

logger = logging.getLogger(__name__)

#: Series description of the PDF series (LO, at most 64 characters).
PDF_SERIES_DESCRIPTION = "AI result AD/MCI/CN report (PDF, research use only)"

#: Document title shown by viewers (ST).
PDF_DOCUMENT_TITLE = "Brain MRI AI result: AD / MCI / CN (research use only)"

#: Title printed on the page.
PAGE_TITLE = "Brain MRI: AI classification AD / MCI / CN"

#: At most this many key slices are drawn.
MAX_KEY_SLICES = 3

#: At most this many received series are listed on a "not analysed" page (the rest are counted).
MAX_SERIES_LINES = 20

#: Title of the second page (volumes and the prior study; without the prior's part when the comparison is off).
VOLUMES_PAGE_TITLE = "Brain volumes and comparison with the prior study"
VOLUMES_ONLY_PAGE_TITLE = "Brain volumes"

#: Said on page 1 when there is a second page (likewise).
VOLUMES_PAGE_POINTER = "Brain volumes and the comparison with a prior study: see page 2."
VOLUMES_ONLY_PAGE_POINTER = "Brain volumes: see page 2."

#: Caption under key slices that carry an outline.
OUTLINE_CAPTION = (
    "Registered brain (grey) with the outline of the template brain (yellow): "
    "the outline should follow the brain's edge. R/L: patient's right/left; A/P: anterior/posterior; "
    "S/I: superior/inferior."
)

_BAR_COLOURS = {"AD": "#b2182b", "MCI": "#ef8a62", "CN": "#4393c3"}
def compose_page(
    sources: Sequence[Dataset],
    report: ReportInput,
    *,
    key_slices: Sequence[KeySlice | npt.ArrayLike] | None = None,
    predecessor: Dataset | None = None,
    content_datetime: datetime.datetime | None = None,
) -> Figure:
    """Lay out the one-page report as a matplotlib figure (see :func:`render_pdf`).

    From the top: the warnings in a framed banner, as large and bold as the result; title; patient
    (name, ID, birth date, sex, age at the study), study and series; the result with its probabilities
    (or "Not analysed: <reason>", what was received and what the node needs); the key slices, all
    drawn at one size with their orientation markers; the image quality checks with their limits; the
    inputs and versions.
    """
    first = sources[0]
    when = content_datetime or datetime.datetime.now()
    fig = Figure(figsize=A4_INCHES)
    page = Page(fig)
    page.banner(warning_texts(report))
    page.text(PAGE_TITLE, fontsize=15.0, fontweight="bold", after=0.12)
    header = [
        f"Patient: {_person(first.get('PatientName'))}    ID: {first.get('PatientID', '')}",
        f"Birth date: {_date(first.get('PatientBirthDate'))}    Sex: {sex_text(first)}    "
        f"Age at study: {age_at_study(first)}",
        f"Study date: {_date(first.get('StudyDate'))}    Accession: {first.get('AccessionNumber', '')}    "
        f"Report time: {when:%Y-%m-%d %H:%M}",
    ]
    if report.prediction is not None:
        header.append(f"Series analysed: {analysed_series_label(sources)}")
    page.text("\n".join(header), fontsize=9.0, linespacing=1.45, after=0.2)

    if report.prediction is not None:
        _result(page, report)
    elif report.not_analysed is not None:
        _not_analysed(page, report, sources)
    if has_volumes_page(shown(report)):
        page.y += 0.05
        pointer = VOLUMES_PAGE_POINTER if _has_prior_part(report) else VOLUMES_ONLY_PAGE_POINTER
        page.text(pointer, fontsize=9.0, fontweight="bold", after=0.2)

    slices = [_as_key_slice(item, index) for index, item in enumerate(list(key_slices or [])[:MAX_KEY_SLICES])]
    if slices:
        _key_slice_row(page, slices)
    if report.prediction is not None and report.qc:
        verdict = "all within their limits" if all(c.ok for c in report.qc) else "NOT ALL WITHIN THEIR LIMITS"
        page.heading(f"Image quality checks ({verdict})")
        page.text("\n".join(_capital(qc_value_text(c)) for c in report.qc), fontsize=8.5, after=0.15)

    lines = [notes_text(report), versions_text(report)]
    if predecessor is not None:
        lines.append(supersedes_text(predecessor))
    page.heading("Inputs and provenance")
    page.text("\n".join(lines), fontsize=8.5, linespacing=1.5)
    _footer(fig)
    return fig


def _footer(fig: Figure) -> None:
    """The disclaimer at the foot of a page."""
    fig.text(MARGIN / A4_INCHES[0], 0.03, "\n".join(Page.lines(DISCLAIMER, 8.0)), fontsize=8.0,
             color=WARNING_COLOUR, va="bottom")


def has_volumes_page(report: ReportInput) -> bool:
    """Whether the report has a second page: volumes, a prior study, or a note on why either is missing."""
    return bool(report.volumes is not None or report.prior is not None or report.volumes_note or report.prior_note)


#: Columns of the volumes table (inches): structure, ml, % of ICV, then z and percentile, then prior ml and changes.
_WIDTHS = {"structure": 1.75, "ml": 0.85, "icv": 0.75, "z": 0.6, "pct": 0.75, "prior": 0.8, "rate": 0.85,
           "rate_pct": 0.8}


def _volume_cells(row: VolumeRow, normative: bool, prior: bool) -> list[str]:
    """One line of the volumes table (``-`` where a value does not apply)."""
    cells = [row.label, f"{row.ml:.2f}", "-" if row.percent_icv is None else f"{row.percent_icv:.3f}"]
    if normative:
        if row.z_score is None or row.percentile is None:
            cells += ["no ref.", "no ref."]
        else:
            cells += [f"{row.z_score:+.2f}", percentile_label(row.percentile)]
    if prior:
        cells.append("-" if row.prior_ml is None else f"{row.prior_ml:.2f}")
        cells.append("-" if row.change_ml_per_year is None else f"{row.change_ml_per_year:+.3f}")
        cells.append("-" if row.change_percent_per_year is None else f"{row.change_percent_per_year:+.2f}")
    return cells


def _volumes_table(page: Page, sources: Sequence[Dataset], report: ReportInput) -> None:
    """The method, the normative data (or that there are none), the table and the hippocampal asymmetry."""
    volumes = report.volumes
    if volumes is None:
        return
    rows = volume_rows(sources, report)
    normative = report.normative is not None
    prior = any(row.prior_ml is not None for row in rows)
    header, widths = ["Structure", "Volume\n(ml)", "% of ICV"], [_WIDTHS["structure"], _WIDTHS["ml"], _WIDTHS["icv"]]
    if normative:
        header += ["z-score", "Percentile"]
        widths += [_WIDTHS["z"], _WIDTHS["pct"]]
    if prior:
        header += ["Prior\n(ml)", "Change\n(ml/year)", "Change\n(%/year)"]
        widths += [_WIDTHS["prior"], _WIDTHS["rate"], _WIDTHS["rate_pct"]]
    page.text(f"Method: {volumes.algorithm}.", fontsize=8.0, color="#555555", after=0.05)
    page.text(normative_text(sources, report), fontsize=9.0, after=0.12)
    page.table(header, [_volume_cells(row, normative, prior) for row in rows], widths)
    page.text(f"Hippocampal asymmetry index: {volumes.hippocampal_asymmetry_percent:.2f} % "
              "(|left - right| / mean of left and right).", fontsize=9.0, after=0.15)


def compose_volumes_page(
    sources: Sequence[Dataset], report: ReportInput, *, content_datetime: datetime.datetime | None = None
) -> Figure | None:
    """The second page: the volumes table and the comparison with the prior study; None when there is neither.

    From the top: the warnings' banner, title, patient and study; "Brain volumes" (method, normative data or
    "no normative data configured", the table: structure, ml, % of ICV, z-score and percentile when a normative
    table is configured, the prior's ml and the change per year when there is a prior; the hippocampal
    asymmetry), or why there are none; "Comparison with the prior study" (its date and the interval, the change
    in class probabilities), or why there is none.
    """
    report = shown(report)
    if not has_volumes_page(report):
        return None
    first = sources[0]
    when = content_datetime or datetime.datetime.now()
    fig = Figure(figsize=A4_INCHES)
    page = Page(fig)
    page.banner(warning_texts(report))
    title = VOLUMES_PAGE_TITLE if _has_prior_part(report) else VOLUMES_ONLY_PAGE_TITLE
    page.text(title, fontsize=15.0, fontweight="bold", after=0.12)
    page.text(f"Patient: {_person(first.get('PatientName'))}    ID: {first.get('PatientID', '')}    "
              f"Sex: {sex_text(first)}    Age at study: {age_at_study(first)}\n"
              f"Study date: {_date(first.get('StudyDate'))}    Accession: {first.get('AccessionNumber', '')}    "
              f"Report time: {when:%Y-%m-%d %H:%M}", fontsize=9.0, linespacing=1.45, after=0.2)
    if report.volumes is not None or report.volumes_note:
        page.heading("Brain volumes")
        _volumes_table(page, sources, report)
        if report.volumes_note:
            page.text(_capital(report.volumes_note), fontsize=9.0, after=0.15)
    if _has_prior_part(report):
        page.heading("Comparison with the prior study")
        lines = [prior_date_text(sources, report), probability_change_text(report), *prior_gaps(report),
                 _capital(report.prior_note)]
        page.text("\n".join(line for line in lines if line), fontsize=9.0, linespacing=1.45, after=0.15)
    _footer(fig)
    return fig


def _has_prior_part(report: ReportInput) -> bool:
    """Whether page 2 has a comparison section (a prior, or why there is none; nothing when the comparison is off)."""
    return report.prior is not None or bool(report.prior_note)


def _result(page: Page, report: ReportInput) -> None:
    """The summary (in :data:`RESULT_FONT`) and the probability chart."""
    prediction = report.prediction
    if prediction is None:
        return
    page.text(summary_text(report).replace(" Probabilities:", "\nProbabilities:"), after=0.12,
              linespacing=1.3, **RESULT_FONT)
    axes = page.axes(MARGIN + 2.0, TEXT_WIDTH - 2.3, 1.25)
    page.y += 0.45  # the x label below the chart
    values = [float(prediction.probabilities[c]) for c in CLASSES]
    bars = axes.barh([CLASS_LABELS[c] for c in CLASSES], values, color=[_BAR_COLOURS[c] for c in CLASSES])
    axes.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=9)
    axes.set_xlim(0.0, 1.0)
    axes.invert_yaxis()
    axes.set_xlabel("Model probability")
    axes.tick_params(labelsize=9)


def _not_analysed(page: Page, report: ReportInput, sources: Sequence[Dataset]) -> None:
    """Why there is no result (in :data:`RESULT_FONT`), what was received, what the node needs."""
    if report.not_analysed is None:
        return
    page.text(NOT_ANALYSED_PREFIX + report.not_analysed[1], after=0.2, linespacing=1.3, **RESULT_FONT)
    labels = series_labels(sources)
    shown = [f"Series {label}" for label in labels[:MAX_SERIES_LINES]]
    if len(labels) > MAX_SERIES_LINES:
        shown.append(f"... and {len(labels) - MAX_SERIES_LINES} more series")
    page.heading("What was received")
    page.text("\n".join(shown), fontsize=9.0, after=0.15)
    needed = requirement_text(report)
    if needed:
        page.heading("What the node needs")
        page.text(needed, fontsize=9.0, after=0.15)


def _key_slice_row(page: Page, slices: Sequence[KeySlice]) -> None:
    """The key slices side by side, each as a square of one size, one pixel scale for all."""
    gap = 0.2
    side_in = (TEXT_WIDTH - gap * (MAX_KEY_SLICES - 1)) / MAX_KEY_SLICES
    side = square_side(max(max(key.image.shape) for key in slices))
    top = page.y + 0.22  # room for the titles
    for index, key in enumerate(slices):
        page.y = top
        draw_key_slice(page.axes(MARGIN + index * (side_in + gap), side_in, side_in), key, side=side)
    page.y += 0.06
    if any(key.outline is not None for key in slices):
        page.text(OUTLINE_CAPTION, fontsize=7.5, color="#555555", after=0.15)


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
        Instances of the analysed series (headers), or everything received for a study that was not
        analysed; the first names patient and study on the page.
    report : ReportInput
        The run's result and provenance.
    key_slices : Sequence of KeySlice or 2-D arrays, or None, optional
        Slices to show (at most :data:`MAX_KEY_SLICES`), each with an
        optional outline drawn over it, a caption and orientation markers.
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
    fig = compose_page(sources, report, key_slices=key_slices, predecessor=predecessor,
                       content_datetime=content_datetime)
    second = compose_volumes_page(sources, report, content_datetime=content_datetime)
    buffer = BytesIO()
    metadata = {"CreationDate": None, "Title": PDF_DOCUMENT_TITLE}
    if second is None:
        fig.savefig(buffer, format="pdf", metadata=metadata)
        return buffer.getvalue()
    with PdfPages(buffer, metadata=metadata) as document:
        document.savefig(fig)
        document.savefig(second)
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


def _as_key_slice(item: KeySlice | npt.ArrayLike, index: int) -> KeySlice:
    """A :class:`KeySlice` from a KeySlice or a bare 2-D array."""
    if isinstance(item, KeySlice):
        image = np.asarray(item.image, dtype=float)
        outline = None if item.outline is None else np.asarray(item.outline, dtype=bool)
        if outline is not None and outline.shape != image.shape:
            raise ReportError(f"key slice outline {outline.shape} does not match image {image.shape}")
        return KeySlice(image=image, outline=outline, title=item.title or f"Key slice {index + 1}",
                        orientation=item.orientation)
    return KeySlice(image=np.asarray(item, dtype=float), title=f"Key slice {index + 1}")


def _reference(instance: Dataset) -> Dataset:
    """An item of the SourceInstanceSequence."""
    item = Dataset()
    item.ReferencedSOPClassUID = instance.SOPClassUID
    item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
    return item


def _capital(text: str) -> str:
    """*text* with its first letter in upper case (the rest unchanged: "WM/GM ratio")."""
    return text[:1].upper() + text[1:]


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
