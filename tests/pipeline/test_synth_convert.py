"""Synthetic DICOM writer and DICOM -> NIfTI conversion (orientation, geometry checks)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid
from scipy import ndimage

from core.errors import NodeError, NotAnalysed, Outcome
from pipeline.convert import convert_series
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series

STUDY = StudyHeader(patient_name="Test^Marker", patient_id="T0001", patient_birth_date="19470304",
                    patient_sex="F", study_instance_uid="1.2.826.0.1.3680043.8.498.12345",
                    study_date="20240305", study_time="093000", accession_number="ACC0001")

#: World (RAS, mm) centre of the marker, in the patient's RIGHT hemisphere (RAS: +x is right).
MARKER_RAS = np.array([45.0, -10.0, 15.0])


@pytest.fixture(scope="module")
def marked_brain() -> tuple[np.ndarray, np.ndarray]:
    """Colin27 at 3 mm with a bright cube in the left hemisphere."""
    volume, affine = load_reference_brain("colin27")
    small = np.ascontiguousarray(volume[::3, ::3, ::3])
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] * 3
    centre = np.linalg.inv(aff) @ np.append(MARKER_RAS, 1.0)
    i, j, k = np.round(centre[:3]).astype(int)
    small[i - 2:i + 3, j - 2:j + 3, k - 2:k + 3] = small.max() * 1.5
    return small, aff


def _sample(img: nib.Nifti1Image, world: np.ndarray) -> np.ndarray:
    inv = np.linalg.inv(img.affine)
    vox = inv[:3, :3] @ world.T + inv[:3, 3:4]
    return ndimage.map_coordinates(np.asarray(img.get_fdata()), vox, order=1, mode="constant")


def _write(marked: tuple[np.ndarray, np.ndarray], tmp: Path, **kwargs: str) -> list[Path]:
    volume, affine = marked
    return write_mr_series(volume, affine, tmp, study=STUDY, series_number=5, voxel_mm=3.0, **kwargs)


@pytest.mark.parametrize(("orientation", "vendor"), [
    ("axial", "SIEMENS"), ("sagittal", "GE"), ("coronal", "PHILIPS"), ("oblique", "SIEMENS")])
def test_orientation_kept(marked_brain, tmp_path, orientation, vendor):
    files = _write(marked_brain, tmp_path / "dcm", orientation=orientation, vendor=vendor)
    img = nib.Nifti1Image.from_filename(convert_series(files, tmp_path / "out.nii.gz"))
    volume, affine = marked_brain
    marker = _sample(img, MARKER_RAS[None, :])[0]
    mirror = _sample(img, (MARKER_RAS * [-1, 1, 1])[None, :])[0]
    assert marker > 3 * mirror, (orientation, marker, mirror)
    grid = np.stack(np.meshgrid(*(np.arange(4, s - 4, 3) for s in volume.shape), indexing="ij")).reshape(3, -1)
    world = (affine[:3, :3] @ grid + affine[:3, 3:4]).T
    corr = np.corrcoef(_sample(img, world), volume[tuple(grid)])[0, 1]
    assert corr > (0.99 if orientation != "oblique" else 0.95)


def test_headers_realistic_and_deterministic(marked_brain, tmp_path):
    first = _write(marked_brain, tmp_path / "a", orientation="sagittal", vendor="GE")
    again = _write(marked_brain, tmp_path / "b", orientation="sagittal", vendor="GE")
    ds = pydicom.dcmread(first[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.Manufacturer == "GE MEDICAL SYSTEMS" and "BRAVO" in ds.SeriesDescription
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
    assert list(ds.ScanningSequence) == ["GR", "IR"] and ds.MRAcquisitionType == "3D"
    assert ds.BitsAllocated == 16 and ds.ImagesInAcquisition == len(first)
    assert [float(v) for v in ds.ImageOrientationPatient] == [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    assert ds.BodyPartExamined == "BRAIN" and ds.StudyInstanceUID == STUDY.study_instance_uid
    other = pydicom.dcmread(again[0])
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (other.SeriesInstanceUID, other.SOPInstanceUID)
    last = pydicom.dcmread(first[-1])
    # sagittal slices advance along LPS -x (towards patient right)
    assert float(last.ImagePositionPatient[0]) < float(ds.ImagePositionPatient[0])


@pytest.mark.parametrize(("kind", "expected"), [
    ("localizer", "2D"), ("t2", "2D"), ("flair", "3D")])
def test_negative_series_headers(marked_brain, tmp_path, kind, expected):
    files = _write(marked_brain, tmp_path, kind=kind, vendor="PHILIPS")
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.MRAcquisitionType == expected
    assert "SE" in ds.ScanningSequence if kind != "localizer" else ds.ScanningSequence == "GR"
    if kind == "localizer":
        orientations = {tuple(pydicom.dcmread(f).ImageOrientationPatient) for f in files}
        assert len(files) == 9 and len(orientations) == 3


def test_unknown_vendor_rejected(marked_brain, tmp_path):
    with pytest.raises(NodeError, match="unknown vendor"):
        _write(marked_brain, tmp_path, vendor="TOSHIBA")


def test_mni152_reference_is_real_brain():
    volume, affine = load_reference_brain("mni152")
    assert volume.shape == (197, 233, 189) and affine[0, 0] == 1.0
    assert 0.1 < float(np.mean(volume > 0)) < 0.4


def _edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def test_slice_gap_is_incomplete(marked_brain, tmp_path):
    files = _write(marked_brain, tmp_path / "dcm")
    del files[20]
    with pytest.raises(NotAnalysed, match=r"slice gap: 6\.00 mm .*\(1 slice\(s\) missing\)") as info:
        convert_series(files, tmp_path / "out.nii.gz")
    assert info.value.outcome is Outcome.INCOMPLETE_SERIES


def test_uneven_spacing_refused(marked_brain, tmp_path):
    files = _write(marked_brain, tmp_path / "dcm")
    ds = pydicom.dcmread(files[10])
    position = [float(v) for v in ds.ImagePositionPatient]
    _edit(files[10], ImagePositionPatient=[position[0], position[1], position[2] + 1.2])
    with pytest.raises(NotAnalysed, match="uneven slice spacing") as info:
        convert_series(files, tmp_path / "out.nii.gz")
    assert info.value.outcome is Outcome.PROCESSING_ERROR


def test_mixed_orientation_refused(marked_brain, tmp_path):
    files = _write(marked_brain, tmp_path / "dcm")
    _edit(files[5], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(NotAnalysed, match="mixed orientation: image 6"):
        convert_series(files, tmp_path / "out.nii.gz")


def test_missing_geometry_refused(marked_brain, tmp_path):
    files = _write(marked_brain, tmp_path / "dcm")
    _edit(files[3], ImagePositionPatient=None)
    with pytest.raises(NotAnalysed, match="missing geometry: image 4 has no ImagePositionPatient"):
        convert_series(files, tmp_path / "out.nii.gz")


def test_duplicate_position_refused(marked_brain, tmp_path):
    files = _write(marked_brain, tmp_path / "dcm")
    ds = pydicom.dcmread(files[8])
    _edit(files[9], ImagePositionPatient=list(ds.ImagePositionPatient))
    with pytest.raises(NotAnalysed, match="duplicate slice position"):
        convert_series(files, tmp_path / "out.nii.gz")


def test_sheared_stack_refused(marked_brain, tmp_path):
    files = _write(marked_brain, tmp_path / "dcm")
    for n, path in enumerate(files):
        ds = pydicom.dcmread(path, stop_before_pixels=False)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(path, ImagePositionPatient=[x, y + 0.3 * n, z])  # gantry-tilt-like shear
    with pytest.raises(NotAnalysed, match="sheared stack"):
        convert_series(files, tmp_path / "out.nii.gz")


def test_too_few_images_and_not_dicom(tmp_path, marked_brain):
    files = _write(marked_brain, tmp_path / "dcm")
    with pytest.raises(NotAnalysed, match="not a volume"):
        convert_series(files[:2], tmp_path / "out.nii.gz")
    bogus = tmp_path / "bogus.dcm"
    bogus.write_bytes(b"not dicom")
    with pytest.raises(NotAnalysed, match=r"an image of the series is not a readable DICOM file"):
        convert_series([bogus], tmp_path / "out.nii.gz")


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless])
def test_compressed_series_converts(marked_brain, tmp_path, syntax):
    files = _write(marked_brain, tmp_path / "dcm", orientation="coronal")
    plain = nib.Nifti1Image.from_filename(convert_series(files, tmp_path / "plain.nii.gz"))
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    packed = nib.Nifti1Image.from_filename(convert_series(files, tmp_path / "rle.nii.gz"))
    np.testing.assert_allclose(packed.affine, plain.affine, atol=1e-4)
    np.testing.assert_array_equal(packed.get_fdata(), plain.get_fdata())


def test_enhanced_multiframe_fallback(marked_brain, tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    files = _write(marked_brain, tmp_path / "dcm", orientation="oblique")
    single = nib.Nifti1Image.from_filename(convert_series(files, tmp_path / "single.nii.gz"))
    enhanced = LegacyConvertedEnhancedMRImage(
        [pydicom.dcmread(f) for f in files], series_instance_uid=generate_uid(), series_number=99,
        sop_instance_uid=generate_uid(), instance_number=1)
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path)
    multi = nib.Nifti1Image.from_filename(convert_series([path], tmp_path / "multi.nii.gz"))
    marker = _sample(multi, MARKER_RAS[None, :])[0]
    assert marker > 3 * _sample(multi, (MARKER_RAS * [-1, 1, 1])[None, :])[0]
    points = (single.affine @ np.array([[10, 20, 15, 1], [30, 40, 25, 1]]).T)[:3].T
    np.testing.assert_allclose(_sample(multi, points), _sample(single, points), rtol=1e-4, atol=1e-3)
