"""Preprocessing contract and QC on a downsampled real brain (Colin27 at 2 mm)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core.errors import NotAnalysed, Outcome
from pipeline.preprocess import Preprocessed, preprocess
from pipeline.preprocess_config import PreprocessConfig
from pipeline.registration import default_template_path, to_dhw
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
    np.testing.assert_array_equal(to_dhw(template), expected)


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
    with pytest.raises(NotAnalysed, match="the converted volume could not be read") as info:
        preprocess(bogus, FAST)
    assert info.value.outcome is Outcome.PROCESSING_ERROR


def test_low_correlation_tries_every_start_then_fails_qc(tmp_path, monkeypatch):
    import pipeline.preprocess as pre

    calls: list[tuple[int, int, tuple[float, ...]]] = []
    real = pre.register_affine

    def counting(ws, config, start, attempt, seed):
        calls.append((attempt, seed, tuple(np.round(start.ravel(), 3))))
        return real(ws, config, start, attempt, seed)

    monkeypatch.setattr(pre, "register_affine", counting)
    path = _save(*_colin_2mm(), tmp_path / "colin_2mm.nii.gz")
    with pytest.raises(NotAnalysed, match=r"registration to the template failed \(correlation\): measured 0\.\d+, "
                                          r"limit 0\.99") as info:
        preprocess(path, replace(FAST, min_correlation=0.99, n4=False))
    assert info.value.outcome is Outcome.QC_FAILED
    # the brain-centred start, then pitch, yaw and roll of +-15 degrees: 7 distinct starts, one seed each
    assert [a for a, _, _ in calls] == list(range(7))
    assert len({start for _, _, start in calls}) == 7
    assert calls[0][2] == tuple(np.eye(3).ravel())
    assert len({seed for _, seed, _ in calls}) == 1  # the base seed comes from the input, attempts add to it


def test_a_good_first_start_is_not_searched_further(tmp_path, monkeypatch):
    import pipeline.preprocess as pre

    calls: list[int] = []
    real = pre.register_affine
    monkeypatch.setattr(pre, "register_affine", lambda ws, c, s, a, seed: calls.append(a) or real(ws, c, s, a, seed))
    preprocess(_save(*_colin_2mm(), tmp_path / "colin_2mm.nii.gz"), replace(FAST, n4=False))
    assert calls == [0]


def _odd_grid_image():
    """An ANTs image on an odd grid whose 2 mm working grid stops short of the far faces."""
    import ants

    shape = (91, 113, 97)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    head = 600.0 * np.exp(-(grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2))  # signal up to every face
    bias = 1.0 + 0.3 * grid[0] - 0.2 * grid[2]
    data = (head * bias + 50.0).astype(np.float32)
    return ants.from_numpy(data, origin=(-54.6, -67.8, -53.35), spacing=(1.2, 1.2, 1.1))


def test_n4_bias_field_covers_the_whole_input_grid():
    """Scanner grids (176 x 240 x 256, 1.2 mm...) end beyond the working grid: no Inf or NaN there."""
    from pipeline.preprocess import _n4

    image = _odd_grid_image()
    corrected = _n4(image, PreprocessConfig(n4_iterations=(10, 10)))
    values = corrected.numpy()
    assert np.isfinite(values).all()
    # the last voxel of every face still holds signal of the input's order of magnitude
    far = values[-1, -1, -1], values[-1, 0, 0], values[0, -1, 0], values[0, 0, -1]
    assert all(20.0 < v < 2000.0 for v in far), far
    # a divided-out field: the corrected image's shape follows the input's (no holes, no steps)
    ratio = values / image.numpy()
    assert float(ratio.min()) > 0.2 and float(ratio.max()) < 5.0


def test_blank_input_is_a_named_refusal(tmp_path):
    """(ITK's NIfTI reader already turns NaN and Inf into 0: a blank image is what reaches us.)"""
    volume, affine = _colin_2mm()
    with pytest.raises(NotAnalysed, match=r"image has no signal after reading the volume") as info:
        preprocess(_save(np.zeros_like(volume), affine, tmp_path / "blank.nii.gz"), FAST)
    assert info.value.outcome is Outcome.QC_FAILED


def test_stage_that_produces_nan_is_named(tmp_path, monkeypatch):
    import pipeline.preprocess as pre

    monkeypatch.setattr(pre, "_n4", lambda image, config: image / image.new_image_like(
        np.zeros(image.shape, dtype=np.float32)))
    with pytest.raises(NotAnalysed, match=r"not finite after N4 bias correction"):
        preprocess(_save(*_colin_2mm(), tmp_path / "colin_2mm.nii.gz"), FAST)


@pytest.fixture(scope="module")
def posed_head(tmp_path_factory) -> Path:
    """A whole head with neck, 15 degrees pitched, 28 mm off the isocentre, head 6 % larger."""
    from tests.support.corpus import Appearance, Pose, centred_grid, render

    appearance = Appearance(pose=Pose((15.0, -9.0, 12.0), (-28.0, 22.0, -25.0), 1.06), seed=7)
    shape = (201, 231, 221)
    affine = centred_grid(shape, (1.0, 1.0, 1.0))
    path = tmp_path_factory.mktemp("head") / "head.nii.gz"
    nib.save(nib.Nifti1Image(render(appearance, affine, shape), affine), path)
    return path


@pytest.mark.slow
def test_whole_head_off_centre_registers_and_is_deterministic(posed_head):
    """Neck and pose no longer defeat registration; the same input gives the same tensor."""
    config = PreprocessConfig(keep_registered=False)
    first = preprocess(posed_head, config)
    second = preprocess(posed_head, config)
    assert first.qc["correlation"] >= 0.55 and first.qc["coverage"] >= 0.95
    np.testing.assert_array_equal(first.volume, second.volume)
    assert first.qc == second.qc
