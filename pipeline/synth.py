"""Synthetic but realistic DICOM MR series written from a real brain volume.

Used by tests, demonstrations and benchmarks: a NIfTI brain (Colin27 or the
MNI152 2009 template) is resampled onto a DICOM slice grid and written as a
single-frame MR Image Storage series (explicit VR little endian, 16-bit
unsigned) with the headers a Siemens, GE or Philips scanner would write for a
3D T1 (MPRAGE, BRAVO / IR-FSPGR, 3D TFE) or for the series a selector must
refuse (localizer, 2D T2, 3D FLAIR).

Geometry: NIfTI world coordinates are RAS+, DICOM patient coordinates are
LPS+; ``ImagePositionPatient`` and ``ImageOrientationPatient`` are computed in
LPS from the volume's affine, so a converter that honours them gets the
original world orientation back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from scipy import ndimage

from core.errors import NodeError

logger = logging.getLogger(__name__)

#: Colin27 single-subject T1 (Debian package mricron-data).
COLIN27_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")

ORIENTATIONS = ("axial", "sagittal", "coronal", "oblique")
VENDORS = ("SIEMENS", "GE", "PHILIPS")
KINDS = ("t1_mprage", "localizer", "t2", "flair")

#: Tilt of the "oblique" orientation: axial slices rotated about the
#: left-right axis (an AC-PC style angulation), in degrees.
OBLIQUE_TILT_DEG = 15.0

# Row direction, column direction (LPS unit vectors) of each plane; the
# slice normal is their cross product and slices are written along +normal.
_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])

# Vendor protocol headers.  Keys: (vendor, kind).
_MANUFACTURER = {"SIEMENS": "SIEMENS", "GE": "GE MEDICAL SYSTEMS", "PHILIPS": "Philips Medical Systems"}
_MODEL = {"SIEMENS": "Prisma", "GE": "DISCOVERY MR750", "PHILIPS": "Ingenia"}
_SOFTWARE = {"SIEMENS": "syngo MR XA30", "GE": "DV26.0_R03", "PHILIPS": "5.7.1"}

_PROTOCOLS: dict[tuple[str, str], dict[str, object]] = {
    ("SIEMENS", "t1_mprage"): {
        "SeriesDescription": "t1_mprage_sag_p2_iso", "ProtocolName": "t1_mprage_sag_p2_iso",
        "SequenceName": "*tfl3d1_16ns", "ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SK", "SP", "MP"],
        "ScanOptions": "IR", "MRAcquisitionType": "3D", "RepetitionTime": 2300.0, "EchoTime": 2.98,
        "InversionTime": 900.0, "FlipAngle": 9.0},
    ("GE", "t1_mprage"): {
        "SeriesDescription": "Sag T1 BRAVO", "ProtocolName": "ADNI3 Sag IR-FSPGR",
        "SequenceName": "efgre3d", "ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SS", "SK"],
        "ScanOptions": ["FAST_GEMS", "EDR_GEMS", "ACC_GEMS"], "MRAcquisitionType": "3D", "RepetitionTime": 7.3,
        "EchoTime": 3.0, "InversionTime": 400.0, "FlipAngle": 11.0},
    ("PHILIPS", "t1_mprage"): {
        "SeriesDescription": "T1W_3D_TFE", "ProtocolName": "WIP T1W_3D_TFE", "SequenceName": "T1TFE",
        "ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SP", "MP"], "ScanOptions": "",
        "MRAcquisitionType": "3D", "RepetitionTime": 6.8, "EchoTime": 3.1, "InversionTime": 900.0, "FlipAngle": 9.0},
    ("SIEMENS", "localizer"): {
        "SeriesDescription": "localizer", "ProtocolName": "localizer", "SequenceName": "*fl2d1",
        "ScanningSequence": "GR", "SequenceVariant": ["SP", "OSP"], "ScanOptions": "", "MRAcquisitionType": "2D",
        "RepetitionTime": 8.6, "EchoTime": 4.0, "FlipAngle": 20.0},
    ("GE", "localizer"): {
        "SeriesDescription": "3-pl T2* FGRE S", "ProtocolName": "3-plane loc", "SequenceName": "fgre",
        "ScanningSequence": "GR", "SequenceVariant": "SS", "ScanOptions": ["FAST_GEMS"], "MRAcquisitionType": "2D",
        "RepetitionTime": 5.1, "EchoTime": 1.6, "FlipAngle": 30.0},
    ("PHILIPS", "localizer"): {
        "SeriesDescription": "SURVEY", "ProtocolName": "SURVEY", "SequenceName": "", "ScanningSequence": "GR",
        "SequenceVariant": "SS", "ScanOptions": "", "MRAcquisitionType": "2D", "RepetitionTime": 11.0, "EchoTime": 4.6,
        "FlipAngle": 15.0},
    ("SIEMENS", "t2"): {
        "SeriesDescription": "t2_tse_tra_p2", "ProtocolName": "t2_tse_tra_p2", "SequenceName": "*tse2d1_15",
        "ScanningSequence": "SE", "SequenceVariant": ["SK", "SP", "OSP"], "ScanOptions": "", "MRAcquisitionType": "2D",
        "RepetitionTime": 6000.0, "EchoTime": 95.0, "FlipAngle": 150.0},
    ("GE", "t2"): {
        "SeriesDescription": "Ax T2 FSE", "ProtocolName": "Ax T2 FSE", "SequenceName": "fse-xl",
        "ScanningSequence": "SE", "SequenceVariant": "SK", "ScanOptions": ["FAST_GEMS"], "MRAcquisitionType": "2D",
        "RepetitionTime": 5500.0, "EchoTime": 100.0, "FlipAngle": 111.0},
    ("PHILIPS", "t2"): {
        "SeriesDescription": "T2W_TSE_TRA", "ProtocolName": "WIP T2W_TSE_TRA", "SequenceName": "TSE",
        "ScanningSequence": "SE", "SequenceVariant": "SK", "ScanOptions": "", "MRAcquisitionType": "2D",
        "RepetitionTime": 4000.0, "EchoTime": 100.0, "FlipAngle": 90.0},
    ("SIEMENS", "flair"): {
        "SeriesDescription": "t2_space_dark-fluid_sag_p2_iso", "ProtocolName": "t2_space_dark-fluid_sag_p2_iso",
        "SequenceName": "*spcir_278", "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "SP", "MP"],
        "ScanOptions": "IR", "MRAcquisitionType": "3D", "RepetitionTime": 5000.0, "EchoTime": 387.0,
        "InversionTime": 1800.0, "FlipAngle": 120.0},
    ("GE", "flair"): {
        "SeriesDescription": "Sag CUBE FLAIR", "ProtocolName": "Sag CUBE FLAIR", "SequenceName": "cube_flair",
        "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "MP"], "ScanOptions": ["FAST_GEMS"],
        "MRAcquisitionType": "3D", "RepetitionTime": 6300.0, "EchoTime": 120.0, "InversionTime": 1860.0,
        "FlipAngle": 90.0},
    ("PHILIPS", "flair"): {
        "SeriesDescription": "3D_Brain_VIEW_FLAIR", "ProtocolName": "WIP 3D_Brain_VIEW_FLAIR", "SequenceName": "TSE",
        "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK", "MP"], "ScanOptions": "",
        "MRAcquisitionType": "3D", "RepetitionTime": 4800.0, "EchoTime": 340.0, "InversionTime": 1650.0,
        "FlipAngle": 90.0},
}


@dataclass(frozen=True)
class StudyHeader:
    """Patient and study attributes shared by every series of a synthetic study.

    Parameters
    ----------
    patient_name : str
        PatientName, DICOM PN form (``"Family^Given"``).
    patient_id : str
        PatientID.
    patient_birth_date : str
        PatientBirthDate, ``YYYYMMDD``.
    patient_sex : str
        PatientSex: ``"M"``, ``"F"`` or ``"O"``.
    study_instance_uid : str
        StudyInstanceUID; also seeds the deterministic series/instance UIDs.
    study_date : str
        StudyDate, ``YYYYMMDD``.
    study_time : str
        StudyTime, ``HHMMSS``.
    accession_number : str
        AccessionNumber.
    study_id : str
        StudyID.
    referring_physician_name : str
        ReferringPhysicianName (may be empty).
    issuer_of_patient_id : str
        IssuerOfPatientID (may be empty).
    study_description : str
        StudyDescription.
    institution_name : str
        InstitutionName.
    """

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_instance_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str = "1"
    referring_physician_name: str = ""
    issuer_of_patient_id: str = ""
    study_description: str = "MR BRAIN"
    institution_name: str = "Synthetic Hospital"


def load_reference_brain(name: str = "colin27") -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Load a real, locally installed T1 brain volume.

    Parameters
    ----------
    name : str
        ``"colin27"`` (Colin Holmes 27-average, with skull, 1 mm, from
        mricron-data) or ``"mni152"`` (ICBM 2009 symmetric template as shipped
        with nilearn, brain only, 1 mm).  Nothing is downloaded.

    Returns
    -------
    tuple of numpy.ndarray
        The volume (float32, NIfTI voxel order) and its 4x4 RAS affine.

    Raises
    ------
    NodeError
        If the name is unknown or the file is not installed.
    """
    if name == "colin27":
        if not COLIN27_PATH.is_file():
            raise NodeError(f"Colin27 not found at {COLIN27_PATH} (install the Debian package mricron-data)")
        img = nib.Nifti1Image.from_filename(COLIN27_PATH)
    elif name == "mni152":
        from nilearn.datasets import load_mni152_template

        img = load_mni152_template(resolution=1)
    else:
        raise NodeError(f"unknown reference brain {name!r}; expected 'colin27' or 'mni152'")
    data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    return data, np.asarray(img.affine, dtype=np.float64)


def _plane_axes(orientation: str) -> NDArray[np.float64]:
    """Return a 3x3 matrix whose columns are row dir, column dir, normal (LPS)."""
    if orientation == "oblique":
        t = np.deg2rad(OBLIQUE_TILT_DEG)
        row = np.array([1.0, 0.0, 0.0])
        col = np.array([0.0, np.cos(t), -np.sin(t)])
    elif orientation in _PLANES:
        row, col = (np.array(v) for v in _PLANES[orientation])
    else:
        raise NodeError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")
    normal = np.cross(row, col)
    return np.stack([row, col, normal], axis=1)


def _grid(
    shape: tuple[int, ...], affine: NDArray[np.float64], axes: NDArray[np.float64], spacing: NDArray[np.float64]
) -> tuple[NDArray[np.float64], tuple[int, int, int]]:
    """Origin (LPS) and size (n_row_dir, n_col_dir, n_normal) covering the volume."""
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                        for k in (0, shape[2] - 1)])
    lps = (corners @ affine.T)[:, :3] @ _RAS_TO_LPS.T
    proj = lps @ axes  # coordinates along row dir, col dir, normal
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    size = np.floor((hi - lo) / spacing + 1e-6).astype(int) + 1
    origin = axes @ lo
    return origin, (int(size[0]), int(size[1]), int(size[2]))


def _resample_slices(
    volume: NDArray[np.floating], affine: NDArray[np.float64], origin: NDArray[np.float64],
    axes: NDArray[np.float64], spacing: NDArray[np.float64], size: tuple[int, int, int],
    slice_indices: NDArray[np.int64],
) -> NDArray[np.float32]:
    """Sample the volume on the slice grid; returns (n_slices, rows, columns)."""
    inv = np.linalg.inv(affine)
    r = np.arange(size[1], dtype=np.float64)  # rows run along the column direction
    c = np.arange(size[0], dtype=np.float64)
    out = np.empty((len(slice_indices), size[1], size[0]), dtype=np.float32)
    rr, cc = np.meshgrid(r, c, indexing="ij")
    for n, k in enumerate(slice_indices):
        lps = (origin[None, None, :] + cc[..., None] * spacing[0] * axes[:, 0]
               + rr[..., None] * spacing[1] * axes[:, 1] + float(k) * spacing[2] * axes[:, 2])
        ras = lps @ _RAS_TO_LPS.T
        vox = ras @ inv[:3, :3].T + inv[:3, 3]
        out[n] = ndimage.map_coordinates(volume, np.moveaxis(vox, -1, 0), order=1, mode="constant", cval=0.0)
    return out


def _protocol(vendor: str, kind: str, orientation: str) -> dict[str, object]:
    """Vendor protocol headers, with the plane named the way the vendor names it."""
    protocol = dict(_PROTOCOLS[(vendor, kind)])
    if kind == "t1_mprage" and orientation != "sagittal":
        plane = {"SIEMENS": {"axial": "tra", "coronal": "cor", "oblique": "tra"},
                 "GE": {"axial": "Ax", "coronal": "Cor", "oblique": "Obl"},
                 "PHILIPS": {"axial": "TRA", "coronal": "COR", "oblique": "OBL"}}[vendor][orientation]
        for key in ("SeriesDescription", "ProtocolName"):
            text = str(protocol[key])
            text = text.replace("_sag_", f"_{plane}_").replace("Sag ", f"{plane} ")
            protocol[key] = text if vendor != "PHILIPS" else f"{text}_{plane}"
    return protocol


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _contrast(volume: NDArray[np.floating], kind: str) -> NDArray[np.float32]:
    """Give T2/FLAIR series a plausible inverted tissue contrast."""
    vol = np.asarray(volume, dtype=np.float32)
    if kind not in ("t2", "flair"):
        return vol
    fg = vol > np.percentile(vol, 60)
    out = np.where(fg, vol.max() - vol, 0.0).astype(np.float32)
    if kind == "flair":
        out = np.where(out > np.percentile(out[fg], 90), out * 0.2, out)  # dark fluid
    return out


def _base_dataset(study: StudyHeader, vendor: str, kind: str, series_number: int,
                  series_uid: str, for_uid: str, protocol: dict[str, object]) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = study.study_date
    ds.SeriesDate = study.study_date
    ds.AcquisitionDate = study.study_date
    ds.ContentDate = study.study_date
    ds.StudyTime = study.study_time
    ds.SeriesTime = study.study_time
    ds.AcquisitionTime = study.study_time
    ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = _MANUFACTURER[vendor]
    ds.InstitutionName = study.institution_name
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StudyDescription = study.study_description
    ds.ManufacturerModelName = _MODEL[vendor]
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    if study.issuer_of_patient_id:
        ds.IssuerOfPatientID = study.issuer_of_patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.BodyPartExamined = "BRAIN"
    for keyword, value in protocol.items():
        setattr(ds, keyword, value)
    ds.MagneticFieldStrength = 3.0
    ds.ImagingFrequency = 123.2
    ds.ImagedNucleus = "1H"
    ds.EchoTrainLength = 1 if kind in ("t1_mprage", "localizer") else 15
    ds.NumberOfAverages = 1.0
    ds.SoftwareVersions = _SOFTWARE[vendor]
    ds.ReceiveCoilName = "Head_32" if vendor == "SIEMENS" else "HEAD 32"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def write_mr_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    study: StudyHeader,
    series_number: int,
    orientation: str = "axial",
    vendor: str = "SIEMENS",
    kind: str = "t1_mprage",
    voxel_mm: float | None = None,
) -> list[Path]:
    """Write a volume as a single-frame DICOM MR series.

    Parameters
    ----------
    volume : numpy.ndarray
        3D intensities in NIfTI voxel order.
    affine : numpy.ndarray
        4x4 voxel-to-world (RAS+, mm) affine of ``volume``.
    out_dir : Path
        Folder for the files (created); files are named ``MR<series>_<nnnn>.dcm``.
    study : StudyHeader
        Patient and study attributes.
    series_number : int
        SeriesNumber; also seeds the deterministic UIDs.
    orientation : str
        Slice plane: ``"axial"``, ``"sagittal"``, ``"coronal"`` or ``"oblique"``
        (axial tilted by :data:`OBLIQUE_TILT_DEG` about the left-right axis).
        Ignored for ``kind="localizer"``, which writes 3 slices in each plane.
    vendor : str
        ``"SIEMENS"``, ``"GE"`` or ``"PHILIPS"``: manufacturer and protocol headers.
    kind : str
        ``"t1_mprage"`` (3D T1 IR-GRE), or the negative series ``"localizer"``,
        ``"t2"`` (2D TSE, 5 mm slices with a 1 mm gap), ``"flair"`` (3D FLAIR).
    voxel_mm : float or None
        Isotropic grid spacing; default: the smallest voxel size of ``volume``.
        For ``"t2"`` it sets the in-plane spacing only.

    Returns
    -------
    list of Path
        The written files, in InstanceNumber order.

    Raises
    ------
    NodeError
        For an unknown orientation, vendor or kind, or a volume that is not 3D.
    """
    vendor = vendor.upper()
    if vendor not in VENDORS:
        raise NodeError(f"unknown vendor {vendor!r}; expected one of {VENDORS}")
    if kind not in KINDS:
        raise NodeError(f"unknown kind {kind!r}; expected one of {KINDS}")
    vol = np.asarray(volume)
    aff = np.asarray(affine, dtype=np.float64)
    if vol.ndim != 3 or aff.shape != (4, 4):
        raise NodeError(f"need a 3D volume and a 4x4 affine, got {vol.shape} and {aff.shape}")
    vol = _contrast(vol, kind)
    base_mm = float(voxel_mm) if voxel_mm else float(np.min(np.linalg.norm(aff[:3, :3], axis=0)))
    protocol = _protocol(vendor, kind, orientation)
    series_uid = _uid(study.study_instance_uid, series_number, kind, orientation, vendor, "series")
    for_uid = _uid(study.study_instance_uid, "frame-of-reference")
    base = _base_dataset(study, vendor, kind, series_number, series_uid, for_uid, protocol)

    # Slice stacks: (plane axes, spacing, origin, size, slice indices, thickness)
    stacks = []
    if kind == "localizer":
        for plane in ("sagittal", "coronal", "axial"):
            axes = _plane_axes(plane)
            spacing = np.array([base_mm, base_mm, 10.0])
            origin, size = _grid(vol.shape, aff, axes, spacing)
            mid = size[2] // 2
            stacks.append((axes, spacing, origin, size, np.array([mid - 1, mid, mid + 1]), 7.0))
    else:
        axes = _plane_axes("axial" if kind == "t2" else orientation)
        thickness = 5.0 if kind == "t2" else base_mm
        spacing = np.array([base_mm, base_mm, 6.0 if kind == "t2" else base_mm])
        origin, size = _grid(vol.shape, aff, axes, spacing)
        stacks.append((axes, spacing, origin, size, np.arange(size[2]), thickness))

    slabs = [_resample_slices(vol, aff, o, a, s, sz, idx) for a, s, o, sz, idx, _ in stacks]
    vmax = max(float(s.max()) for s in slabs) or 1.0
    scale = 4000.0 / vmax
    n_images = sum(len(s) for s in slabs)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    instance = 0
    for (axes, spacing, origin, size, indices, thickness), slab in zip(stacks, slabs, strict=True):
        iop = [round(float(v), 8) for v in np.concatenate([axes[:, 0], axes[:, 1]])]
        for k, pixels in zip(indices, slab, strict=True):
            instance += 1
            ds = Dataset()
            ds.update(base)
            sop_uid = UID(_uid(series_uid, instance))
            ds.SOPInstanceUID = sop_uid
            ds.InstanceNumber = instance
            ds.ImagesInAcquisition = n_images
            position = origin + float(k) * spacing[2] * axes[:, 2]
            ds.ImagePositionPatient = [round(float(v), 6) for v in position]
            ds.ImageOrientationPatient = iop
            ds.SliceLocation = round(float(position @ axes[:, 2]), 6)
            ds.SliceThickness = thickness
            ds.SpacingBetweenSlices = float(spacing[2])
            ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing, column spacing
            ds.Rows, ds.Columns = int(size[1]), int(size[0])
            data = np.clip(np.rint(pixels * scale), 0, 65535).astype(np.uint16)
            ds.SmallestImagePixelValue = int(data.min())
            ds.LargestImagePixelValue = int(data.max())
            ds.WindowCenter = 1200
            ds.WindowWidth = 2400
            ds.PixelData = data.tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            path = out_dir / f"MR{series_number:03d}_{instance:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    logger.info("wrote synthetic series %s: %d images", series_uid, len(paths))
    return paths
