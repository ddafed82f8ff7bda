"""Report inputs for the structured-report tests: a header-only 3D T1 series, a report, SR and PDF builds.

A small T1 MR series (headers of a typical 3D MPRAGE, 8x8 pixels) is built
here, read back header-only as the node does; :func:`build` and
:func:`build_pdf_object` make the SR and the PDF of it with UIDs derived like
the worker does.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from core.errors import Outcome
from model.types import ModelInfo, Prediction
from pipeline.preprocess_config import PreprocessConfig
from pipeline.qc import QCCheck, qc_checks
from structured_reports.pdf import build_pdf
from structured_reports.sr import build_sr
from structured_reports.types import DeviceInfo, NotesUsed, ReportInput, SeriesRequirement
from structured_reports.uids import UidKind, derive_uid

N_SLICES = 5
PROBABILITIES = {"AD": 0.62, "MCI": 0.27, "CN": 0.11}
NOTE_DATES = (datetime.date(2024, 3, 1), datetime.date(2023, 11, 20))
TWO_NOTES = NotesUsed(NOTE_DATES)
RUN_TIME = datetime.datetime(2024, 3, 4, 12, 30, 5)
#: QC values of a good 3D T1 (as preprocessing measures them).
QC_VALUES = {"slices": 176.0, "slice_thickness_mm": 1.0, "correlation": 0.912, "coverage": 0.998,
             "wm_gm_ratio": 1.31}
#: What the tests' node configuration needs of a series (deliberately not the defaults).
REQUIREMENT = SeriesRequirement(min_slices=120, max_slice_thickness_mm=1.2)


def make_mr_series(n_slices: int = N_SLICES) -> list[Dataset]:
    """Header-only instances of a sagittal 3D T1 MPRAGE series (as read with stop_before_pixels)."""
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    instances: list[Dataset] = []
    for index in range(n_slices):
        ds = Dataset()
        sop_uid = generate_uid()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.PatientName = "Test^Patient"
        ds.PatientID = "SR-TEST-0001"
        ds.PatientBirthDate = "19480215"
        ds.PatientSex = "F"
        ds.PatientAge = "076Y"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240304"
        ds.StudyTime = "101500"
        ds.AccessionNumber = "ACC-0001"
        ds.StudyID = "1"
        ds.StudyDescription = "MRI BRAIN WITHOUT CONTRAST"
        ds.ReferringPhysicianName = "Ref^Doctor"
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.SeriesDescription = "t1_mprage_sag_p2_iso"
        ds.BodyPartExamined = "BRAIN"
        ds.PatientPosition = "HFS"
        ds.Manufacturer = "SIEMENS"
        ds.ManufacturerModelName = "Prisma"
        ds.DeviceSerialNumber = "166001"
        ds.SoftwareVersions = "syngo MR XA30"
        ds.InstitutionName = "Test Hospital"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = index + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
        ds.ScanningSequence = ["GR", "IR"]
        ds.SequenceVariant = ["SK", "SP", "MP"]
        ds.ScanOptions = "IR"
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = 2300.0
        ds.EchoTime = 2.98
        ds.InversionTime = 900.0
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 3.0
        ds.SliceThickness = 1.0
        ds.PixelSpacing = [1.0, 1.0]
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.ImagePositionPatient = [float(index) - n_slices / 2, -120.0, 120.0]
        ds.Rows = 8
        ds.Columns = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = (np.arange(64, dtype=np.uint16) * (index + 1)).tobytes()
        buffer = BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        buffer.seek(0)
        instances.append(pydicom.dcmread(buffer, stop_before_pixels=True))
    return instances


def received_study() -> list[Dataset]:
    """What a study the node would not analyse brings: a 3-image localizer (series 1) and a 2-image T2 (series 2).

    Both series are of one study and patient (the T2's headers are the localizer's with another series).
    """
    localizer = make_mr_series(3)
    t2 = make_mr_series(2)
    series_uid = generate_uid()
    for ds in localizer:
        ds.SeriesNumber, ds.SeriesDescription = 1, "localizer"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    for ds in t2:
        ds.StudyInstanceUID = localizer[0].StudyInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber, ds.SeriesDescription = 2, "t2_tse_tra"
    return [*t2, *localizer]  # not in series order: the report orders them


def reread(ds: Dataset) -> Dataset:
    """*ds* encoded to Part 10 bytes and decoded with pydicom, as a receiver reads it."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def content_items(items: Sequence[Dataset]) -> list[Dataset]:
    """Every content item under *items* (a ContentSequence), depth first, in document order."""
    found: list[Dataset] = []
    for item in items:
        found.append(item)
        found.extend(content_items(item.get("ContentSequence", [])))
    return found


def concept(item: Dataset) -> tuple[str, str]:
    """(CodeValue, CodingSchemeDesignator) of a content item's concept name."""
    name = item.ConceptNameCodeSequence[0]
    return str(name.CodeValue), str(name.CodingSchemeDesignator)


def make_report(
    *,
    prediction: Prediction | None = None,
    not_analysed: tuple[Outcome, str] | None = None,
    notes: NotesUsed = TWO_NOTES,
    demonstration: bool = True,
    qc: tuple[QCCheck, ...] | None = None,
) -> ReportInput:
    """A report input as the worker assembles it (QC values of :data:`QC_VALUES` with the default limits)."""
    if prediction is None and not_analysed is None:
        prediction = Prediction(
            probabilities=dict(PROBABILITIES), predicted_class="AD", used_note=notes.count > 0
        )
    return ReportInput(
        run_id="run-0042",
        device=DeviceInfo(
            name="BRAINAI-NODE-1",
            manufacturer="Example Research Lab",
            model_name="Brain-Adapter DICOM Node",
            serial_number="NODE-0001",
            device_uid=derive_uid("device", "NODE-0001"),
            software_version="0.3.0",
        ),
        model=ModelInfo(
            name="Brain-Adapter",
            version="1.2.0",
            weights_sha256="3c" * 32,
            demonstration=demonstration,
            parameters={"preset": "t1_1mm_mni", "input_shape": "1x160x192x160"},
        ),
        preprocessing_version="preproc-0.5.1",
        notes=notes,
        prediction=prediction,
        not_analysed=not_analysed,
        qc=qc_checks(QC_VALUES, PreprocessConfig()) if qc is None else qc,
        requirement=REQUIREMENT,
    )


def build(
    sources: Sequence[Dataset],
    report: ReportInput,
    predecessor: Dataset | None = None,
    instance_number: int = 1,
) -> hd.sr.Comprehensive3DSR:
    """Build with UIDs derived like the worker does."""
    first = sources[0]
    identity = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID), "in" * 32,
                report.model.weights_sha256, str(instance_number))
    return build_sr(
        sources,
        report,
        series_instance_uid=derive_uid(*identity[:4], UidKind.SR_SERIES),
        sop_instance_uid=derive_uid(*identity, UidKind.SR_INSTANCE),
        series_number=9901,
        instance_number=instance_number,
        predecessor=predecessor,
        content_datetime=RUN_TIME,
    )


def build_pdf_object(sources: list[Dataset], **kwargs: object) -> Dataset:
    """Build the Encapsulated PDF with UIDs derived like the worker does (``report``: :func:`make_report`)."""
    first = sources[0]
    identity = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID), "in" * 32, "3c" * 32)
    return build_pdf(
        sources,
        kwargs.pop("report", make_report()),  # type: ignore[arg-type]
        series_instance_uid=derive_uid(*identity, UidKind.PDF_SERIES),
        sop_instance_uid=derive_uid(*identity, UidKind.PDF_INSTANCE),
        series_number=9902,
        content_datetime=RUN_TIME,
        **kwargs,  # type: ignore[arg-type]
    )
