"""Brain volumetry of the preprocessed T1: hippocampi, lateral ventricles, grey and white matter, ICV.

A pure stage (no network, no database) on :class:`pipeline.preprocess.Preprocessed`:
it reuses the N4-corrected volume preprocessing already registered (affinely) to the
MNI152 template and the registration's matrix, and measures in that 1 mm grid.

Atlas (Debian package ``mricron-data``, ``/usr/share/mricron/templates``)
-------------------------------------------------------------------------
- **Colin27** (``ch2.nii.gz``, whole head; ``ch2bet.nii.gz``, its brain mask): the
  single subject the labels below were drawn on, registered to the patient.
- **AAL** (``aal.nii.gz``, Tzourio-Mazoyer et al. 2002, drawn on Colin27, same grid):
  labels 37 ``Hippocampus_L`` and 38 ``Hippocampus_R`` (``aal.nii.txt``).  Chosen because
  it is the one atlas of that package with named left and right hippocampi (Harvard-Oxford
  is there only as its cortical atlas, which has no hippocampus; AICHA cuts it into
  functional parcels; JHU189 ships no label names; Brodmann, JHU white matter and
  NatBrainLab are cortical or tract atlases, INIA19 a macaque one) and because it was drawn
  on the very image we register, so no second template-to-template mapping is needed.
  AAL's hippocampus is larger than manual tracing protocols (about 7.5 ml each on
  Colin27): compare with normative values made with this same method, never with another
  tool's.  Licence: Debian distributes it in mricron-data (main); its authors ask for
  Tzourio-Mazoyer et al. 2002 to be cited; check AAL's own terms before commercial use.
- **Lateral ventricles**: no atlas of the package labels them, so they are drawn here from
  Colin27 itself, reproducibly: voxels darker than 55 (Colin27's 0-255 scale: ventricular
  CSF about 30, grey matter about 85) at least 10 mm inside the brain mask and at least
  3 mm from the midline (third ventricle, septum), the connected components holding a
  seed in each lateral ventricle (about 18.5 ml on Colin27; bodies, horns and atria;
  Colin27's temporal horns are too thin to be included).  nilearn ships no atlas offline.

Method
------
1. Affine then SyN (Mattes MI, 4 and 2 mm levels) from Colin27's head to the patient's
   registered head inside a dilated brain mask; then, around each hippocampus, a short
   SyN at 1 mm started from the first (hippocampal boundaries move by well under a
   voxel of the 2 mm grid for a 10 % change).
2. Atlas labels pulled into the patient's grid (linear interpolation, so partial voxels
   count in part): the brain mask is the intracranial mask (brain and the CSF inside
   Colin27's brain envelope; an estimate of intracranial volume, not a dural segmentation).
3. Atropos (k-means initialised, 3 classes, MRF 0.1) inside that mask: CSF, grey and
   white matter posteriors; GM + WM + CSF = ICV.
4. Hippocampus = its label's volume (a deformation-based measure: the registration's
   local volume change applied to AAL's hippocampus); lateral ventricles = their label
   weighted by the CSF posterior.

Volumes are the patient's
-------------------------
Everything is measured on the template grid after the affine registration, where a
patient's millilitre is not a millilitre: a head 10 % larger in every direction fills
the same template grid.  The registration maps a template point ``x`` to the patient's
point ``A x + b`` (:attr:`Preprocessed.template_to_native`), so one template voxel is
``|det A|`` times its volume in the patient: every volume is multiplied by it.  It is
exact for an affine registration; preprocessing with ``registration="SyN"`` (a warp)
is refused.  The SyN of step 1 needs no such factor: it only moves the atlas onto the
patient's (affinely registered) image, and volumes are counted in the patient's voxels.

Measured (Colin27, 1 mm, one ITK thread, this project's 2-core machine): 54-58 s of CPU per
run (affine 3 s, whole-brain SyN 24 s, hippocampal refinement 9 s, Atropos 17 s, label
warps 3 s), about 5 times preprocessing's 11 s; accuracy in ``tests/pipeline/test_volumetry.py``.
Deterministic: one ITK thread, seeded affine sampling, Atropos' constant seed.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from core.errors import ConfigError, NotAnalysed, Outcome
from pipeline.preprocess import Preprocessed
from pipeline.registration import ants_seed, default_template_path, physical_points, to_dhw

logger = logging.getLogger(__name__)

#: Debian's mricron-data templates (Colin27, its brain, AAL).
ATLAS_DIR = Path("/usr/share/mricron/templates")
#: Bumped whenever a change of method can change a number.
METHOD_VERSION = "1"

_AAL_HIPPOCAMPUS = (37, 38)  # aal.nii.txt: 37 Hippocampus_L, 38 Hippocampus_R
_VENTRICLE_THRESHOLD = 55.0
_VENTRICLE_DEPTH_MM = 10
_MIDLINE_MM = 3.0
#: One seed in each lateral ventricle's body, LPS mm (+x is the patient's left): left, right.
_VENTRICLE_SEEDS_LPS = ((8.0, 0.0, 20.0), (-8.0, 0.0, 20.0))


@dataclass(frozen=True)
class VolumetryConfig:
    """Settings of :func:`measure_volumes` (defaults: the measured method of the module docstring).

    Parameters
    ----------
    working_spacing_mm : float
        Grid of the whole-brain registration.
    aff_iterations, aff_shrink_factors, aff_smoothing_sigmas
        Affine levels (Colin27 to the patient's registered head).
    syn_iterations : tuple of int
        SyN iterations per level (levels halve the grid: 4 and 2 mm by default).
    local_iterations : tuple of int
        SyN iterations around each hippocampus (2 and 1 mm); empty: no refinement.
    local_margin_mm : float
        Margin of the hippocampal boxes around the label.
    grad_step, flow_sigma, total_sigma
        SyN step and regularisation (ANTs' defaults).
    box_margin_mm, mask_dilation_mm
        Margin of the working box around the template brain; dilation of the metric mask.
    mrf : float
        Atropos' Markov random field weight (1-voxel neighbourhood).
    min_correlation : float
        QC: correlation of the registered Colin27 with the patient inside the brain.
    seed : int
        Seed of the affine stage's metric sampling.
    threads : int
        ITK threads (1: several threads sum in a changing order, results then vary).
    atlas_dir : Path
        Where ``ch2.nii.gz``, ``ch2bet.nii.gz`` and ``aal.nii.gz`` are.
    """

    working_spacing_mm: float = 2.0
    aff_iterations: tuple[int, ...] = (500, 250)
    aff_shrink_factors: tuple[int, ...] = (2, 1)
    aff_smoothing_sigmas: tuple[float, ...] = (1.0, 0.0)
    syn_iterations: tuple[int, ...] = (40, 20)
    local_iterations: tuple[int, ...] = (20, 10)
    local_margin_mm: float = 8.0
    grad_step: float = 0.2
    flow_sigma: float = 3.0
    total_sigma: float = 0.0
    box_margin_mm: float = 12.0
    mask_dilation_mm: float = 8.0
    mrf: float = 0.1
    min_correlation: float = 0.6
    seed: int = 0
    threads: int = 1
    atlas_dir: Path = ATLAS_DIR


@dataclass(frozen=True)
class Volumes:
    """Volumes in the patient's millilitres, and the method that measured them.

    Parameters
    ----------
    hippocampus_left_ml, hippocampus_right_ml : float
        AAL hippocampus (patient's left, right).
    lateral_ventricles_ml : float
        Both lateral ventricles.
    grey_matter_ml, white_matter_ml : float
        Totals inside the intracranial mask.
    intracranial_ml : float
        Intracranial volume estimate (the normaliser of the percentages).
    algorithm : str
        Method and versions, for reports.
    qc : dict of str to float
        ``correlation`` (registered Colin27 against the patient), ``jacobian``
        (patient volume per template volume), ``seconds``.
    """

    hippocampus_left_ml: float
    hippocampus_right_ml: float
    lateral_ventricles_ml: float
    grey_matter_ml: float
    white_matter_ml: float
    intracranial_ml: float
    algorithm: str
    qc: dict[str, float] = field(default_factory=dict, compare=False)

    def percent_of_icv(self, ml: float) -> float:
        """*ml* as a percentage of the intracranial volume."""
        return 100.0 * ml / self.intracranial_ml

    @property
    def hippocampal_asymmetry_percent(self) -> float:
        """``|L - R| / ((L + R) / 2) * 100``."""
        left, right = self.hippocampus_left_ml, self.hippocampus_right_ml
        return 100.0 * abs(left - right) / ((left + right) / 2.0)

    def normalised(self) -> dict[str, float]:
        """Each structure in % of ICV, keyed like the fields (``..._percent_icv``)."""
        names = ("hippocampus_left", "hippocampus_right", "lateral_ventricles", "grey_matter", "white_matter")
        return {f"{n}_percent_icv": self.percent_of_icv(getattr(self, f"{n}_ml")) for n in names}


@dataclass(frozen=True)
class _Atlas:
    head: Any
    brain: Any
    hippocampus: tuple[Any, Any]
    ventricles: Any


def algorithm_name() -> str:
    """The method's identity for reports (module version, ANTsPy version, atlases)."""
    import ants

    return (f"pipeline.volumetry {METHOD_VERSION} (ANTsPy {ants.__version__}: SyN to Colin27, AAL hippocampus, "
            "Colin27 lateral ventricles, Atropos 3 classes)")


def _from_dhw(image: Any, data: NDArray[np.float32]) -> NDArray[np.float32]:
    """Inverse of :func:`pipeline.registration.to_dhw`: a (z, y, x) LPS array back in *image*'s voxel order."""
    direction = np.asarray(image.direction, dtype=np.float64)
    dominant = np.argmax(np.abs(direction), axis=0)
    order = [int(np.flatnonzero(dominant == 2 - k)[0]) for k in range(3)]
    out = np.transpose(data, np.argsort(order))
    for axis in range(3):
        if direction[dominant[axis], axis] < 0:
            out = np.flip(out, axis=axis)
    return np.ascontiguousarray(out, dtype=np.float32)


@functools.lru_cache(maxsize=2)
def _atlas(atlas_dir: Path) -> _Atlas:
    """Colin27, its brain mask, the AAL hippocampi and the lateral ventricles drawn from it."""
    import ants

    images = []
    for name in ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz"):
        if not (atlas_dir / name).is_file():
            raise ConfigError(f"volumetry atlas file missing: {atlas_dir / name} (Debian package mricron-data)")
        images.append(ants.image_read(str(atlas_dir / name), pixeltype="float"))
    head, bet, aal = images
    if head.shape != aal.shape or head.shape != bet.shape:
        raise ConfigError(f"Colin27 and AAL grids differ in {atlas_dir}")
    brain_mask = bet.numpy() > 0
    labels = aal.numpy()
    hippocampus = (head.new_image_like((labels == _AAL_HIPPOCAMPUS[0]).astype(np.float32)),
                   head.new_image_like((labels == _AAL_HIPPOCAMPUS[1]).astype(np.float32)))
    values = head.numpy()
    lps_x = physical_points(head, np.argwhere(np.ones(values.shape, dtype=bool)))[:, 0].reshape(values.shape)
    inner = ndimage.binary_erosion(brain_mask, iterations=_VENTRICLE_DEPTH_MM)
    components, _ = ndimage.label((values < _VENTRICLE_THRESHOLD) & inner & (np.abs(lps_x) >= _MIDLINE_MM))
    to_index = np.linalg.inv(np.asarray(head.direction) * np.asarray(head.spacing))
    keep = set()
    for seed in _VENTRICLE_SEEDS_LPS:
        ijk = np.round(to_index @ (np.asarray(seed) - np.asarray(head.origin))).astype(int)
        keep.add(int(components[tuple(ijk)]))
    if 0 in keep or len(keep) != 2:
        raise ConfigError("lateral ventricles not found in Colin27 (unexpected ch2.nii.gz)")
    ventricles = head.new_image_like(np.isin(components, sorted(keep)).astype(np.float32))
    return _Atlas(head, head.new_image_like(brain_mask.astype(np.float32)), hippocampus, ventricles)


def _box(mask: NDArray[np.bool_], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _crop(image: Any, box: tuple[slice, ...]) -> Any:
    import ants

    return ants.crop_indices(image, [s.start for s in box], [s.stop for s in box])


def _register(fixed: Any, atlas: _Atlas, config: VolumetryConfig, directory: str) -> tuple[list[str], float]:
    """Affine + SyN of Colin27 onto *fixed* on the working grid: (transforms, correlation)."""
    import ants

    spacing = (config.working_spacing_mm,) * 3
    small = ants.resample_image(fixed, spacing, False, 0)
    moving = ants.resample_image(atlas.head, spacing, False, 0)
    brain = ants.apply_transforms(small, atlas.brain, [], interpolator="nearestNeighbor")
    mask = ants.morphology(brain, "dilate", max(1, round(config.mask_dilation_mm / config.working_spacing_mm)),
                           mtype="binary", shape="ball")
    with ants_seed(config.seed + 1):
        affine = ants.registration(small, moving, type_of_transform="Affine", mask=mask,
                                   aff_iterations=config.aff_iterations,
                                   aff_shrink_factors=config.aff_shrink_factors,
                                   aff_smoothing_sigmas=config.aff_smoothing_sigmas, outprefix=f"{directory}/aff_")
    syn = ants.registration(small, moving, type_of_transform="SyNOnly", mask=mask,
                            initial_transform=affine["fwdtransforms"], reg_iterations=config.syn_iterations,
                            grad_step=config.grad_step, flow_sigma=config.flow_sigma, total_sigma=config.total_sigma,
                            outprefix=f"{directory}/syn_")
    inside = brain.numpy() > 0
    warped, target = syn["warpedmovout"].numpy()[inside], small.numpy()[inside]
    correlation = float(np.corrcoef(warped, target)[0, 1]) if np.std(warped) > 0 and np.std(target) > 0 else 0.0
    return list(syn["fwdtransforms"]), correlation


def _hippocampus(box: Any, atlas: _Atlas, side: int, transforms: list[str], config: VolumetryConfig,
                 directory: str) -> NDArray[np.float32]:
    """One hippocampal label on *box*'s grid, refined by a 1 mm SyN in a box around it."""
    import ants

    label = np.asarray(ants.apply_transforms(box, atlas.hippocampus[side], transforms).numpy())
    if not config.local_iterations or not (label > 0.01).any():
        return label
    sub = _box(label > 0.01, round(config.local_margin_mm / min(box.spacing)), box.shape)
    fixed = _crop(box, sub)
    local = ants.registration(fixed, atlas.head, type_of_transform="SyNOnly", initial_transform=transforms,
                              reg_iterations=config.local_iterations, grad_step=config.grad_step,
                              flow_sigma=config.flow_sigma, total_sigma=config.total_sigma,
                              outprefix=f"{directory}/hip{side}_")
    refined = np.zeros_like(label)
    refined[sub] = ants.apply_transforms(fixed, atlas.hippocampus[side], local["fwdtransforms"]).numpy()
    return refined


def _tissues(box: Any, inside: NDArray[np.bool_], config: VolumetryConfig) -> tuple[NDArray[np.float32], ...]:
    """Atropos posteriors (CSF, GM, WM: darkest to brightest) on *box*'s grid, zero outside *inside*."""
    import ants

    sub = _box(inside, 2, box.shape)
    image = _crop(box, sub)
    segmentation = ants.atropos(a=image, x=image.new_image_like(inside[sub].astype(np.float32)), i="kmeans[3]",
                                m=f"[{config.mrf},1x1x1]", c="[5,0]",
                                r=0)  # r=0: Atropos' constant seed (its default draws one: results vary)
    posteriors = []
    for posterior in segmentation["probabilityimages"]:
        full = np.zeros(box.shape, dtype=np.float32)
        full[sub] = posterior.numpy()
        posteriors.append(full * inside)
    values = image.numpy()
    means = [float(np.sum(p[sub] * values) / max(float(np.sum(p[sub])), 1e-6)) for p in posteriors]
    csf, gm, wm = (posteriors[i] for i in np.argsort(means))
    return csf, gm, wm


def measure_volumes(pre: Preprocessed, config: VolumetryConfig | None = None,
                    template_path: Path | None = None) -> Volumes:
    """Measure the patient's brain volumes from a preprocessed T1.

    Parameters
    ----------
    pre : Preprocessed
        Needs ``registered`` and ``template_to_native`` (affine preprocessing, the default).
    config : VolumetryConfig, optional
        Method settings; the defaults are the measured method.
    template_path : Path, optional
        The template preprocessing registered to (``PreprocessConfig.template_path``).

    Returns
    -------
    Volumes
        In the patient's millilitres (see the module docstring).

    Raises
    ------
    ConfigError
        Missing atlas files, or a preprocessing result without the affine or the registered volume.
    NotAnalysed
        ``QC_FAILED`` when Colin27 could not be registered to the patient.
    """
    config = config or VolumetryConfig()
    if pre.registered is None or pre.template_to_native is None:
        raise ConfigError("volumetry needs affine preprocessing with keep_registered (registered volume and "
                          "template_to_native)")
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(config.threads)
    import ants

    t0 = time.perf_counter()
    atlas = _atlas(config.atlas_dir)
    template = ants.image_read(str(template_path or default_template_path()), pixeltype="float")
    if to_dhw(template).shape != pre.registered.shape:
        raise ConfigError("the registered volume is not on the template's grid")
    subject = template.new_image_like(_from_dhw(template, pre.registered))
    box = _crop(subject, _box(template.numpy() > 0, round(config.box_margin_mm / min(template.spacing)),
                              template.shape))
    with tempfile.TemporaryDirectory(prefix="volumetry-") as tmp:
        transforms, correlation = _register(box, atlas, config, tmp)
        if correlation < config.min_correlation:
            raise NotAnalysed(Outcome.QC_FAILED, f"volumetry: atlas registration failed (correlation): measured "
                                                 f"{correlation:.3g}, limit {config.min_correlation:.3g}")
        inside = np.asarray(ants.apply_transforms(box, atlas.brain, transforms).numpy()) >= 0.5
        ventricles = np.asarray(ants.apply_transforms(box, atlas.ventricles, transforms).numpy())
        left, right = (_hippocampus(box, atlas, side, transforms, config, tmp) for side in (0, 1))
    csf, gm, wm = _tissues(box, inside, config)
    jacobian = abs(float(np.linalg.det(pre.template_to_native[:3, :3])))
    ml = float(np.prod(template.spacing)) / 1000.0 * jacobian
    seconds = time.perf_counter() - t0
    logger.info("volumetry: %.1f s, atlas correlation %.3f", seconds, correlation)
    return Volumes(
        hippocampus_left_ml=float(left.sum(dtype=np.float64)) * ml,
        hippocampus_right_ml=float(right.sum(dtype=np.float64)) * ml,
        lateral_ventricles_ml=float((ventricles * csf).sum(dtype=np.float64)) * ml,
        grey_matter_ml=float(gm.sum(dtype=np.float64)) * ml,
        white_matter_ml=float(wm.sum(dtype=np.float64)) * ml,
        intracranial_ml=float(np.count_nonzero(inside)) * ml,
        algorithm=algorithm_name(),
        qc={"correlation": correlation, "jacobian": jacobian, "seconds": seconds},
    )
