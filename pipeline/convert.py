"""DICOM series -> NIfTI conversion with our own geometry checks first.

Single-frame series go through :mod:`dicom2nifti` (its own validation and
resampling are switched off: this module checks the geometry itself and refuses
rather than resamples).  Enhanced / Legacy Converted Enhanced MR multi-frame
instances are assembled here from their functional groups, for every vendor.
Compressed transfer syntaxes are decoded by pydicom's handlers (the pylibjpeg
plugins cover JPEG, JPEG-LS, JPEG 2000, RLE).

Checks, each a :class:`~core.errors.NotAnalysed` with a readable reason:

- every image has ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
  and all share one orientation, matrix size and pixel spacing;
- one SeriesInstanceUID, at least :data:`MIN_SLICES` slices, no two slices at
  the same position;
- the slice positions lie on the slice normal (no shear / gantry tilt);
- the positions are evenly spaced; a gap that is a whole multiple of the
  spacing means missing instances (``INCOMPLETE_SERIES``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from core.errors import NotAnalysed, Outcome

logger = logging.getLogger(__name__)

#: Fewest slices that make a volume worth converting.
MIN_SLICES = 3
#: Relative tolerance on slice spacing (fraction of the median spacing).
SPACING_TOLERANCE = 0.02
#: Absolute tolerance (mm) on slice spacing and in-plane drift of positions.
POSITION_TOLERANCE_MM = 0.01
#: Tolerance on direction cosines.
ORIENTATION_TOLERANCE = 1e-3

# dicom2nifti keeps its settings in module globals; serialise our use of them.
_DICOM2NIFTI_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Plane:
    """Geometry of one 2D image (a single-frame instance or one frame)."""

    position: NDArray[np.float64]
    orientation: NDArray[np.float64]
    spacing: tuple[float, float]
    size: tuple[int, int]


def _fail(reason: str, outcome: Outcome = Outcome.PROCESSING_ERROR) -> NotAnalysed:
    return NotAnalysed(outcome, reason)


def _plane(position: object, orientation: object, spacing: object, rows: object, columns: object,
           what: str) -> _Plane:
    missing = [name for name, value in (("ImagePositionPatient", position),
                                        ("ImageOrientationPatient", orientation),
                                        ("PixelSpacing", spacing), ("Rows", rows), ("Columns", columns))
               if value is None or value == "" or (isinstance(value, Sized) and len(value) == 0)]
    if missing:
        raise _fail(f"missing geometry: {what} has no {', '.join(missing)}")
    try:
        pos = np.asarray([float(v) for v in position], dtype=np.float64)  # type: ignore[attr-defined]
        iop = np.asarray([float(v) for v in orientation], dtype=np.float64)  # type: ignore[attr-defined]
        px = tuple(float(v) for v in spacing)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise _fail(f"missing geometry: {what} has unreadable position, orientation or pixel spacing") from exc
    if pos.shape != (3,) or iop.shape != (6,) or len(px) != 2 or min(px) <= 0:
        raise _fail(f"missing geometry: {what} has malformed position/orientation/pixel spacing")
    return _Plane(pos, iop, (px[0], px[1]), (int(rows), int(columns)))  # type: ignore[call-overload]


def check_geometry(planes: Sequence[_Plane]) -> tuple[list[int], float]:
    """Check that the planes form one evenly spaced, unsheared stack.

    Parameters
    ----------
    planes : sequence of _Plane
        Geometry of each image, in any order.

    Returns
    -------
    tuple
        The indices of ``planes`` sorted along the slice normal, and the slice
        spacing in mm.

    Raises
    ------
    NotAnalysed
        With the first inconsistency found.
    """
    if len(planes) < MIN_SLICES:
        raise _fail(f"only {len(planes)} image(s) with geometry: not a volume (need {MIN_SLICES})")
    first = planes[0]
    for n, p in enumerate(planes):
        if np.max(np.abs(p.orientation - first.orientation)) > ORIENTATION_TOLERANCE:
            raise _fail(f"mixed orientation: image {n + 1} has ImageOrientationPatient "
                        f"{np.round(p.orientation, 4).tolist()}, image 1 "
                        f"{np.round(first.orientation, 4).tolist()}")
        if p.size != first.size or np.max(np.abs(np.subtract(p.spacing, first.spacing))) > 1e-4:
            raise _fail(f"mixed matrix: image {n + 1} is {p.size} at {p.spacing} mm, "
                        f"image 1 is {first.size} at {first.spacing} mm")
    row, col = first.orientation[:3], first.orientation[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise _fail("missing geometry: ImageOrientationPatient is not two orthonormal vectors")
    normal = np.cross(row, col)
    distances = np.array([p.position @ normal for p in planes])
    order = [int(i) for i in np.argsort(distances, kind="stable")]
    d = distances[order]
    steps = np.diff(d)
    if np.min(steps) <= POSITION_TOLERANCE_MM:
        n = int(np.argmin(steps))
        raise _fail(f"duplicate slice position: two images at {d[n]:.2f} mm along the normal "
                    "(multi-echo, repeated or mixed series)")
    origin = planes[order[0]].position
    drift = max(float(np.linalg.norm(planes[i].position - origin - (planes[i].position - origin) @ normal * normal))
                for i in order)
    if drift > max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * float(np.median(steps))):
        raise _fail(f"sheared stack: slice positions drift {drift:.2f} mm off the slice normal (gantry tilt)")
    spacing = float(np.median(steps))
    tol = max(POSITION_TOLERANCE_MM, SPACING_TOLERANCE * spacing)
    bad = np.flatnonzero(np.abs(steps - spacing) > tol)
    if bad.size:
        n = int(bad[0])
        ratio = steps[n] / spacing
        if abs(ratio - round(ratio)) * spacing <= tol and round(ratio) >= 2:
            raise _fail(f"slice gap: {steps[n]:.2f} mm between slices {n + 1} and {n + 2}, spacing "
                        f"{spacing:.2f} mm ({round(ratio) - 1} slice(s) missing)",
                        Outcome.INCOMPLETE_SERIES)
        raise _fail(f"slice gap: uneven slice spacing, {steps[n]:.2f} mm between slices {n + 1} and "
                    f"{n + 2} where the spacing is {spacing:.2f} mm")
    return order, spacing


def _read(files: Sequence[Path]) -> list[Dataset]:
    datasets: list[Dataset] = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError) as exc:
            logger.warning("unreadable DICOM file in the series (%s)", type(exc).__name__)
            raise _fail("an image of the series is not a readable DICOM file") from exc
    return datasets


def _single_frame_planes(datasets: Sequence[Dataset]) -> list[_Plane]:
    return [_plane(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"),
                   ds.get("Rows"), ds.get("Columns"), f"image {n + 1}") for n, ds in enumerate(datasets)]


def _frame_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The first item of a functional-group macro, per-frame first, then shared."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        group = groups[index] if groups is ds.get("PerFrameFunctionalGroupsSequence") else groups[0]
        seq = group.get(keyword)
        if seq:
            item: Dataset = seq[0]
            return item
    return None


def _multiframe_planes(ds: Dataset) -> list[_Plane]:
    planes = []
    for i in range(int(ds.NumberOfFrames)):
        pos = _frame_item(ds, i, "PlanePositionSequence")
        ori = _frame_item(ds, i, "PlaneOrientationSequence")
        meas = _frame_item(ds, i, "PixelMeasuresSequence")
        planes.append(_plane(pos.get("ImagePositionPatient") if pos else None,
                             ori.get("ImageOrientationPatient") if ori else None,
                             meas.get("PixelSpacing") if meas else None,
                             ds.get("Rows"), ds.get("Columns"), f"frame {i + 1}"))
    return planes


def _affine(first: _Plane, spacing: float) -> NDArray[np.float64]:
    """NIfTI (RAS) affine for data indexed [column, row, slice]."""
    row, col = first.orientation[:3], first.orientation[3:]
    lps = np.eye(4)
    lps[:3, 0] = row * first.spacing[1]
    lps[:3, 1] = col * first.spacing[0]
    lps[:3, 2] = np.cross(row, col) * spacing
    lps[:3, 3] = first.position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _convert_multiframe(ds: Dataset, out_path: Path) -> Path:
    planes = _multiframe_planes(ds)
    order, spacing = check_geometry(planes)
    try:
        pixels = np.asarray(ds.pixel_array, dtype=np.float32)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        logger.warning("pixel data not decodable (%s)", type(exc).__name__)
        raise _fail(f"the pixel data could not be decoded ({ds.file_meta.TransferSyntaxUID.name})") from exc
    if pixels.ndim != 3:
        raise _fail(f"multi-frame pixel data has shape {pixels.shape}, expected (frames, rows, columns)")
    slices = []
    for i in order:
        frame = pixels[i]
        transform = _frame_item(ds, i, "PixelValueTransformationSequence")
        if transform is not None:
            frame = frame * float(transform.get("RescaleSlope", 1.0)) + float(transform.get("RescaleIntercept", 0.0))
        slices.append(frame.T)  # [column, row]
    data = np.stack(slices, axis=-1)
    img = nib.Nifti1Image(data, _affine(planes[order[0]], spacing))
    img.header.set_xyzt_units("mm")
    nib.save(img, out_path)
    return out_path


@contextmanager
def _dicom2nifti_settings() -> Iterator[None]:
    from dicom2nifti import settings

    with _DICOM2NIFTI_LOCK:
        saved = {name: getattr(settings, name) for name in (
            "validate_slicecount", "validate_orientation", "validate_orthogonal",
            "validate_slice_increment", "validate_instance_number", "resample")}
        settings.disable_validate_slicecount()
        settings.disable_validate_orientation()
        settings.disable_validate_orthogonal()
        settings.disable_validate_slice_increment()
        settings.disable_validate_instance_number()
        settings.disable_resampling()
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(settings, name, value)


def convert_series(files: Sequence[Path], out_path: Path) -> Path:
    """Convert one DICOM MR series to a NIfTI file.

    Parameters
    ----------
    files : sequence of Path
        All instances of the series: single-frame images, or one Enhanced /
        Legacy Converted Enhanced multi-frame instance.
    out_path : Path
        Where to write the NIfTI (``.nii`` or ``.nii.gz``).

    Returns
    -------
    Path
        ``out_path``.  The image keeps the world (RAS) orientation of the DICOM
        geometry; the voxel order is dicom2nifti's (reoriented towards LAS/RAS).

    Raises
    ------
    NotAnalysed
        ``INCOMPLETE_SERIES`` when slices are missing; ``PROCESSING_ERROR``
        for inconsistent or missing geometry, several series, undecodable
        pixel data, or a converter failure.
    """
    if not files:
        raise _fail("no images in the series", Outcome.INCOMPLETE_SERIES)
    datasets = _read(files)
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise _fail(f"the files belong to {len(series)} different series")
    unique: dict[str, Dataset] = {}
    for ds in datasets:
        unique.setdefault(str(ds.get("SOPInstanceUID", id(ds))), ds)
    datasets = list(unique.values())
    multiframe = [ds for ds in datasets if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if multiframe:
        if len(datasets) != 1:
            raise _fail(f"{len(multiframe)} multi-frame instance(s) mixed with {len(datasets) - len(multiframe)} "
                        "others; expected one Enhanced MR instance")
        result = _convert_multiframe(datasets[0], out_path)
        logger.info("converted multi-frame series %s", next(iter(series)))
        return result
    if any(int(ds.get("SamplesPerPixel", 1)) != 1 for ds in datasets):
        raise _fail("colour images are not MR magnitude data")
    order, spacing = check_geometry(_single_frame_planes(datasets))
    ordered = [datasets[i] for i in order]
    from dicom2nifti.convert_dicom import dicom_array_to_nifti
    from dicom2nifti.exceptions import ConversionError, ConversionValidationError

    with _dicom2nifti_settings():
        try:
            dicom_array_to_nifti(ordered, str(out_path), reorient_nifti=True)
        except (ConversionError, ConversionValidationError) as exc:
            logger.warning("dicom2nifti refused the series (%s)", type(exc).__name__)
            raise _fail("the images do not form a volume that can be converted (the converter refused them)") from exc
        except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError) as exc:
            logger.warning("conversion failed (%s)", type(exc).__name__)
            raise _fail("the series could not be converted to a volume") from exc
    img = nib.Nifti1Image.from_filename(out_path)
    zooms = img.header.get_zooms()
    if len(img.shape) != 3 or not np.any(np.isclose(zooms, spacing, rtol=0.05)):
        raise _fail(f"converted volume has shape {img.shape} and voxel size {zooms}; expected a 3D volume")
    logger.info("converted series %s: %d slices, spacing %.2f mm", next(iter(series)), len(ordered), spacing)
    return out_path
