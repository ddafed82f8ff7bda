"""Preprocessing contract and QC on a downsampled real brain (Colin27 at 2 mm)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import NotAnalysed, Outcome
from pipeline.preprocess import PreprocessConfig, Preprocessed, _to_dhw, default_template_path, preprocess
from pipeline.synth import load_reference_brain

#: Marker centre in world RAS mm (RAS: +x is patient right): patient left, anterior, superior.
MARKER_RAS = np.array([-40.0, 30.0, 30.0])

FAST = PreprocessConfig(working_spacing_mm=3.0, aff_shrink_factors=(2, 1), aff_smoothing_sigmas=(1.0, 0.0),
                        min_slices=40, max_slice_thickness_mm=2.5)


def _colin_2mm(marker: bool = False) -> tuple[np.ndarray, np.ndarray]:
    volume, affine = load_reference_brain("colin27")
    small = np.ascontiguousarray(volume[::2, ::2, ::2])
    aff = affine.copy()
    aff[:3, :3] *= 2
    if marker:
        i, j, k = np.round((np.linalg.inv(aff) @ np.append(MARKER_RAS, 1))[:3]).astype(int)
        small[i - 2:i + 3, j - 2:j + 3, k - 2:k + 3] = small.max() * 2
    return small, aff


def _save(volume: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), path)
    return path


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> Preprocessed:
    path = _save(*_colin_2mm(marker=True), tmp_path_factory.mktemp("pre") / "colin_2mm.nii.gz")
    return preprocess(path, FAST)


def test_contract_shape_range_and_qc(result):
    v = result.volume
    assert v.shape == (256, 256, 256) and v.dtype == np.float32 and v.flags.c_contiguous
    assert float(v.min()) == 0.0 and float(v.max()) == 1.0
    assert v[0, 0, 0] == 0.0 and 0.05 < float(v.mean()) < 0.4
    assert set(result.stage_seconds) == {"load", "n4", "registration", "qc", "crop_resample"}
    assert result.qc["correlation"] > 0.55 and result.qc["coverage"] > 0.99
    assert result.qc["wm_gm_ratio"] > 1.1 and result.qc["slice_thickness_mm"] == 2.0
    assert result.registered is not None and result.registered.shape == (189, 233, 197)


def test_axis_convention_with_marker(result):
    """A marker at patient left/anterior/superior lands at high W, low H, high D."""
    assert result.registered is not None
    d, h, w = np.unravel_index(int(np.argmax(result.registered)), result.registered.shape)
    # template grid (z, y, x) LPS: x index 0 is patient right (x = +98 mm RAS), y index 0 anterior
    assert w > 98 + 25, "marker must be on the patient's left (W increases towards left)"
    assert h < 134 - 15, "marker must be anterior (H increases towards posterior)"
    assert d > 72 + 15, "marker must be superior (D increases towards superior)"
    assert result.volume.max() == 1.0


def test_syn_registration_improves_correlation(result, tmp_path):
    path = _save(*_colin_2mm(), tmp_path / "colin_2mm.nii.gz")
    syn = preprocess(path, replace(FAST, registration="SyN", keep_registered=False))
    assert syn.volume.shape == (256, 256, 256) and syn.registered is None
    assert syn.qc["correlation"] > result.qc["correlation"]


def test_to_dhw_matches_documented_orientation():
    import ants

    template = ants.image_read(str(default_template_path()))
    nifti = np.asarray(nib.Nifti1Image.from_filename(default_template_path()).get_fdata(), dtype=np.float32)
    # nibabel's array is RAS-indexed: flip x (R->L) and y (A->P), then order (z, y, x)
    expected = np.transpose(nifti[::-1, ::-1, :], (2, 1, 0))
    np.testing.assert_array_equal(_to_dhw(template), expected)


def test_thick_slices_fail_qc(tmp_path):
    path = _save(*_colin_2mm(), tmp_path / "thick.nii.gz")
    with pytest.raises(NotAnalysed, match=r"slices too thick: measured 2 mm, limit 1.5 mm") as info:
        preprocess(path, replace(FAST, max_slice_thickness_mm=1.5))
    assert info.value.outcome is Outcome.QC_FAILED


def test_too_few_slices_fail_qc(tmp_path):
    volume, affine = _colin_2mm()
    path = _save(volume[:, :, 30:60], affine, tmp_path / "slab.nii.gz")
    with pytest.raises(NotAnalysed, match=r"too few slices: measured 30, limit 40"):
        preprocess(path, FAST)


def test_partial_coverage_fails_qc(tmp_path):
    volume, affine = _colin_2mm()
    cropped = volume[:, :, 45:]  # upper half of the head only
    aff = affine.copy()
    aff[:3, 3] = (affine @ np.array([0, 0, 45, 1]))[:3]
    path = _save(cropped, aff, tmp_path / "top.nii.gz")
    with pytest.raises(NotAnalysed, match=r"brain not covered .*measured 0\.\d+, limit 0.95"):
        preprocess(path, replace(FAST, min_slices=20, registration_attempts=1))


def test_inverted_contrast_fails_qc(tmp_path):
    volume, affine = _colin_2mm()
    head = volume > np.percentile(volume, 55)
    inverted = np.where(head, volume.max() - volume, 0.0)
    path = _save(inverted, affine, tmp_path / "t2like.nii.gz")
    with pytest.raises(NotAnalysed, match=r"(not T1 contrast|correlation).*measured .*limit") as info:
        preprocess(path, replace(FAST, registration_attempts=1))
    assert info.value.outcome is Outcome.QC_FAILED


def test_unreadable_file(tmp_path):
    bogus = tmp_path / "bogus.nii.gz"
    bogus.write_bytes(b"nothing")
    with pytest.raises(NotAnalysed, match="cannot read the converted volume") as info:
        preprocess(bogus, FAST)
    assert info.value.outcome is Outcome.PROCESSING_ERROR


def test_low_correlation_retries_then_fails_qc(tmp_path, monkeypatch):
    import pipeline.preprocess as pre

    calls: list[float] = []
    real = pre._register

    def counting(fixed, moving, config):
        calls.append(config.aff_sampling_rate)
        return real(fixed, moving, config)

    monkeypatch.setattr(pre, "_register", counting)
    path = _save(*_colin_2mm(), tmp_path / "colin_2mm.nii.gz")
    with pytest.raises(NotAnalysed, match=r"registration to the template failed \(correlation\): measured 0\.\d+, "
                                          r"limit 0\.99") as info:
        preprocess(path, replace(FAST, min_correlation=0.99, n4=False))
    assert info.value.outcome is Outcome.QC_FAILED
    assert len(calls) == 2
