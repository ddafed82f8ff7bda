"""Volumetry on a real brain with known volume changes (Colin27 under a known smooth deformation).

The left hippocampus is shrunk by about 10 % and the lateral ventricles grown by about
20 % (``tests/support/deformation.py``: the changes are computed from the field with
scipy, independently of the node); both volumes go through preprocessing and volumetry
as a patient's would.  Measured on this machine (pipeline/volumetry.py defaults):
left hippocampus -8.97 % for -10.27 % expected, lateral ventricles +21.43 % for +21.63 %,
right hippocampus +0.40 % for -0.35 %, ICV -0.19 %, GM +0.12 %, WM -0.28 %.
Tolerances: 3 percentage points for a deformed structure (the registration recovers
about 87 % of a 10 % hippocampal change: boundaries move by under half a millimetre),
1.5 points for the untouched hippocampus, 1 % for ICV, grey and white matter.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from core.errors import ConfigError
from pipeline.preprocess import Preprocessed, preprocess
from pipeline.preprocess_config import PreprocessConfig
from pipeline.registration import default_template_path, to_dhw
from pipeline.volumetry import Volumes, VolumetryConfig, _from_dhw, measure_volumes
from tests.support.deformation import displacement, load_colin, min_jacobian, pull_back, volume_change

#: Pull-back amplitudes (mm^2 per unit mask gradient): about -10 % left hippocampus, +20 % ventricles.
HIPPOCAMPUS_AMPLITUDE = -4.5
VENTRICLE_AMPLITUDE = 9.5

DEFORMED_TOLERANCE_PP = 3.0
UNTOUCHED_HIPPOCAMPUS_PP = 1.5
TISSUE_TOLERANCE = 0.01

STRUCTURES = ("hippocampus_left_ml", "hippocampus_right_ml", "lateral_ventricles_ml", "grey_matter_ml",
              "white_matter_ml", "intracranial_ml")


@pytest.fixture(scope="module")
def colin():
    return load_colin()


@pytest.fixture(scope="module")
def field(colin):
    return displacement(colin.volume.shape, [(colin.hippocampus_left, HIPPOCAMPUS_AMPLITUDE),
                                             (colin.ventricles, VENTRICLE_AMPLITUDE)])


@pytest.fixture(scope="module")
def expected(colin, field) -> dict[str, float]:
    return {"hippocampus_left_ml": volume_change(colin.hippocampus_left, field),
            "hippocampus_right_ml": volume_change(colin.hippocampus_right, field),
            "lateral_ventricles_ml": volume_change(colin.ventricles, field),
            "intracranial_ml": volume_change(colin.brain, field)}


@pytest.fixture(scope="module")
def runs(colin, field, tmp_path_factory) -> dict[str, tuple[Preprocessed, Volumes]]:
    """Base and deformed Colin27 through preprocessing (defaults) and volumetry (defaults)."""
    out = {}
    folder = tmp_path_factory.mktemp("volumetry")
    for name, volume in (("base", colin.volume), ("deformed", pull_back(colin.volume, field))):
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(volume, colin.affine), path)
        pre = preprocess(path, PreprocessConfig())
        out[name] = (pre, measure_volumes(pre))
    return out


def _change(runs: dict[str, tuple[Preprocessed, Volumes]], name: str) -> float:
    return float(getattr(runs["deformed"][1], name) / getattr(runs["base"][1], name) - 1.0)


def test_the_deformation_does_what_the_tests_claim(colin, field, expected):
    assert -0.115 < expected["hippocampus_left_ml"] < -0.09
    assert 0.18 < expected["lateral_ventricles_ml"] < 0.23
    assert abs(expected["hippocampus_right_ml"]) < 0.01
    assert abs(expected["intracranial_ml"]) < 1e-4
    assert min_jacobian(field) > 0.5  # smooth and invertible
    near = (colin.hippocampus_left > 0) | (colin.ventricles > 0)
    far = ndimage.distance_transform_edt(~near) > 20.0  # mm (1 mm voxels)
    assert float(np.abs(field[:, far]).max()) < 0.01  # local: under 0.01 mm 2 cm away


@pytest.mark.slow
def test_shrunk_left_hippocampus_is_measured(runs, expected):
    measured = _change(runs, "hippocampus_left_ml")
    assert measured == pytest.approx(expected["hippocampus_left_ml"], abs=DEFORMED_TOLERANCE_PP / 100)


@pytest.mark.slow
def test_grown_ventricles_are_measured(runs, expected):
    measured = _change(runs, "lateral_ventricles_ml")
    assert measured == pytest.approx(expected["lateral_ventricles_ml"], abs=DEFORMED_TOLERANCE_PP / 100)


@pytest.mark.slow
def test_untouched_structures_stay(runs, expected):
    assert _change(runs, "hippocampus_right_ml") == pytest.approx(expected["hippocampus_right_ml"],
                                                                   abs=UNTOUCHED_HIPPOCAMPUS_PP / 100)
    for name in ("intracranial_ml", "grey_matter_ml", "white_matter_ml"):
        assert abs(_change(runs, name)) < TISSUE_TOLERANCE, name


@pytest.mark.slow
def test_left_and_right_are_not_swapped(runs):
    base, deformed = runs["base"][1], runs["deformed"][1]
    assert deformed.hippocampus_left_ml < 0.95 * base.hippocampus_left_ml
    assert deformed.hippocampus_right_ml > 0.98 * base.hippocampus_right_ml
    assert deformed.hippocampal_asymmetry_percent > base.hippocampal_asymmetry_percent + 5.0


@pytest.mark.slow
def test_absolute_volumes_on_colin27(runs, colin):
    """Colin27 is the atlas' own brain: an optimistic check, but of the whole chain's units (ml)."""
    volumes = runs["base"][1]
    voxel_ml = abs(float(np.linalg.det(colin.affine[:3, :3]))) / 1000.0
    assert volumes.intracranial_ml == pytest.approx(colin.brain.sum() * voxel_ml, rel=0.02)
    assert volumes.hippocampus_left_ml == pytest.approx(colin.hippocampus_left.sum() * voxel_ml, rel=0.04)
    assert volumes.hippocampus_right_ml == pytest.approx(colin.hippocampus_right.sum() * voxel_ml, rel=0.04)
    assert volumes.lateral_ventricles_ml == pytest.approx(colin.ventricles.sum() * voxel_ml, rel=0.10)
    assert 0.35 < volumes.grey_matter_ml / volumes.intracranial_ml < 0.55
    assert 0.3 < volumes.white_matter_ml / volumes.intracranial_ml < 0.5
    assert volumes.qc["correlation"] > 0.9
    assert "AAL" in volumes.algorithm and "ANTsPy" in volumes.algorithm


@pytest.mark.slow
def test_same_input_same_volumes_and_native_millilitres(runs):
    """A patient 10 % larger each way fills the same template grid: only the matrix says so."""
    pre, first = runs["base"]
    assert pre.template_to_native is not None
    larger = pre.template_to_native @ np.diag([1.1, 1.1, 1.1, 1.0])
    second = measure_volumes(replace(pre, template_to_native=larger))
    for name in STRUCTURES:  # the same registered voxels measure the same, then scale by the Jacobian
        assert getattr(second, name) == pytest.approx(getattr(first, name) * 1.1**3, rel=1e-9), name
    assert second.normalised() == pytest.approx(first.normalised(), rel=1e-9)


@pytest.mark.slow
def test_template_to_native_maps_the_template_onto_the_input(runs, colin):
    """Sampling the input through the exposed matrix gives the registered volume back."""
    import ants

    pre = runs["base"][0]
    assert pre.registered is not None and pre.template_to_native is not None
    template = ants.image_read(str(default_template_path()))
    brain = np.argwhere(template.numpy() > 0)[::50]
    direction = np.asarray(template.direction) * np.asarray(template.spacing)
    lps = np.asarray(template.origin) + brain @ direction.T
    native_lps = lps @ pre.template_to_native[:3, :3].T + pre.template_to_native[:3, 3]
    ras = native_lps * np.array([-1.0, -1.0, 1.0])
    index = (np.linalg.inv(colin.affine) @ np.c_[ras, np.ones(len(ras))].T)[:3]
    sampled = ndimage.map_coordinates(colin.volume, index, order=1)
    registered = _from_dhw(template, pre.registered)[tuple(brain.T)]
    assert np.corrcoef(sampled, registered)[0, 1] > 0.95


def test_percentages_and_asymmetry():
    volumes = Volumes(hippocampus_left_ml=3.0, hippocampus_right_ml=4.0, lateral_ventricles_ml=30.0,
                      grey_matter_ml=600.0, white_matter_ml=450.0, intracranial_ml=1500.0, algorithm="x")
    assert volumes.hippocampal_asymmetry_percent == pytest.approx(100 * 1.0 / 3.5)
    assert volumes.normalised() == pytest.approx({
        "hippocampus_left_percent_icv": 0.2, "hippocampus_right_percent_icv": 100 * 4 / 1500,
        "lateral_ventricles_percent_icv": 2.0, "grey_matter_percent_icv": 40.0, "white_matter_percent_icv": 30.0})


def test_warped_preprocessing_is_refused():
    pre = Preprocessed(volume=np.zeros((4, 4, 4), dtype=np.float32),
                       registered=np.zeros((189, 233, 197), dtype=np.float32), template_to_native=None)
    with pytest.raises(ConfigError, match=r"volumetry needs affine preprocessing"):
        measure_volumes(pre)


def test_missing_atlas_is_named(tmp_path: Path):
    pre = Preprocessed(volume=np.zeros((4, 4, 4), dtype=np.float32),
                       registered=np.zeros((189, 233, 197), dtype=np.float32), template_to_native=np.eye(4))
    with pytest.raises(ConfigError, match=r"volumetry atlas file missing: .*ch2\.nii\.gz \(Debian package "
                                          r"mricron-data\)"):
        measure_volumes(pre, VolumetryConfig(atlas_dir=tmp_path))


def test_from_dhw_inverts_to_dhw():
    import ants

    template = ants.image_read(str(default_template_path()))
    np.testing.assert_array_equal(_from_dhw(template, to_dhw(template)), template.numpy())
