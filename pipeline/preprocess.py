"""T1 volume -> the model's input tensor (N4, MNI registration, crop, 256^3, [0, 1]).

Tensor contract of :attr:`Preprocessed.volume` (the input of the model's adapter)
-----------------------------------------------------------------------------------
- ``float32``, shape ``(256, 256, 256)`` = ``(D, H, W)``, C-contiguous, values in
  ``[0, 1]`` (min-max after clipping at the ``clip_percentile`` percentile);
  background and padding are 0.
- Space: the MNI152 2009 template (affinely registered; "SyN" adds a warp),
  1 mm isotropic voxels.
- Axis order is the DICOM patient (LPS) order reversed, i.e. the
  ``(z, y, x)`` array of an LPS image, as SimpleITK's ``GetArrayFromImage``
  gives it:

  * ``D`` (axis 0): axial slices, index 0 = most **inferior**, increasing
    towards **superior**;
  * ``H`` (axis 1): image rows, index 0 = most **anterior**, increasing
    towards **posterior**;
  * ``W`` (axis 2): image columns, index 0 = patient **right**, increasing
    towards patient **left**.

  So ``volume[d]`` is an axial slice displayed the radiological way (anterior
  at the top, patient's right on the viewer's left).
- Background crop (``crop="template"``, default): the bounding box of the
  template's brain plus ``crop_margin_mm`` is cut out of the registered volume
  and centred in the 256^3 cube (zero padding).  The box is the same for every
  subject, so the brain sits at the same place in every tensor and background
  artefacts or registration jitter cannot move it.  With the default MNI152
  2009 template (197 x 233 x 189 grid) the box is fixed; ``crop="foreground"``
  instead uses the subject's voxels above ``foreground_fraction`` of the clip
  value (per-subject box, as in M3D's own preprocessing).

Pipeline: read NIfTI -> header QC (slice count, thickness) -> N4 bias field
estimated on a ``working_spacing_mm`` grid inside a head mask, extended by edge
replication so that it covers the whole input grid, and divided out at full
resolution -> registration to the template on the working grid -> transform
applied once at 1 mm onto the template grid -> image QC (template correlation,
brain coverage, T1 contrast) -> crop, pad, normalise.

Registration starts from where the brain is, not from the image's centre of
mass (which a neck, shoulders or a head off the isocentre pull far from the
brain): the head's top (vertex) along the patient's superior axis and the
centre of the slab below it place the template's brain; the metric is sampled
only in the template's brain (dilated), so scalp, neck and background cannot
drag it.  When the first result's template correlation is below
``min_correlation + retry_margin``, further starts rotated about each axis are
tried, and the best one wins.

Every value array is checked after each stage (finite, positive range): a
stage that produces NaN or Inf ends the run as "not analysed" naming the stage,
never as a crash further down.  Every random draw (the metric's sampling) is
seeded from the input's voxels and ``seed``: the same input gives the same
tensor.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.errors import ConfigError, NotAnalysed, Outcome
from pipeline.preprocess_config import PreprocessConfig
from pipeline.qc import check_values, image_qc, qc_fail
from pipeline.registration import (
    EXTRA_STARTS,
    affine_matrix,
    default_template_path,
    register_affine,
    rotation,
    to_dhw,
    workspace,
)

logger = logging.getLogger(__name__)


@dataclass
class Preprocessed:
    """Result of :func:`preprocess`; see the module docstring for the contract.

    Parameters
    ----------
    volume : numpy.ndarray
        float32 (256, 256, 256), (D, H, W), [0, 1].
    stage_seconds : dict of str to float
        Wall time per stage: "load", "n4", "registration", "qc", "crop_resample".
    qc : dict of str to float
        Measured QC values: "slices", "slice_thickness_mm", "correlation",
        "coverage", "wm_gm_ratio".
    registered : numpy.ndarray or None
        The registered 1 mm volume before crop/normalisation, same axis
        convention as ``volume`` (template grid size).
    template_to_native : numpy.ndarray or None
        4x4 affine mapping a template point to the input's point (LPS mm), the
        registration that made ``registered``; its determinant is the input's
        volume per template volume (:mod:`pipeline.volumetry`).  None when the
        registration is not affine ("SyN").
    """

    volume: NDArray[np.float32]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    qc: dict[str, float] = field(default_factory=dict)
    registered: NDArray[np.float32] | None = None
    template_to_native: NDArray[np.float64] | None = None


def _crop_pad(data: NDArray[np.float32], box: NDArray[np.bool_], margin: int, size: int) -> NDArray[np.float32]:
    """Crop to the bounding box of ``box`` (plus margin voxels) and centre in a size^3 cube."""
    nonzero = np.argwhere(box)
    if nonzero.size == 0:
        raise NotAnalysed(Outcome.QC_FAILED, "registered volume is empty: no voxel above the background")
    lo = np.maximum(nonzero.min(axis=0) - margin, 0)
    hi = np.minimum(nonzero.max(axis=0) + 1 + margin, data.shape)
    out = np.zeros((size, size, size), dtype=np.float32)
    src, dst = [], []
    for a in range(3):
        length = int(hi[a] - lo[a])
        if length > size:  # centre-crop
            start = int(lo[a]) + (length - size) // 2
            src.append(slice(start, start + size))
            dst.append(slice(0, size))
        else:
            offset = (size - length) // 2
            src.append(slice(int(lo[a]), int(hi[a])))
            dst.append(slice(offset, offset + length))
    out[tuple(dst)] = data[tuple(src)]
    return out


def _extend_to_grid(small: Any, values: NDArray[np.float32], pad: int) -> Any:
    """An ANTs image of *values* on *small*'s grid grown by *pad* voxels each side (edge values)."""
    import ants

    direction = np.asarray(small.direction, dtype=np.float64)
    spacing = np.asarray(small.spacing, dtype=np.float64)
    origin = np.asarray(small.origin, dtype=np.float64) - direction @ (spacing * pad)
    padded = np.pad(values, pad, mode="edge").astype(np.float32)
    return ants.from_numpy(padded, origin=tuple(origin.tolist()), spacing=tuple(spacing.tolist()), direction=direction)


def _n4(image: Any, config: PreprocessConfig) -> Any:
    """Estimate the bias field on the working grid, divide it out at full resolution.

    The working grid ends up to one working voxel short of the input grid's far
    faces, where a plain resampling of the field gives 0 (and the division Inf or
    NaN); the field is therefore extended by edge replication before it is
    resampled, and checked positive and finite everywhere.
    """
    import ants

    spacing = max(config.working_spacing_mm, *image.spacing)
    small = ants.resample_image(image, (spacing,) * 3, False, 0)
    mask = ants.get_mask(small)
    field_img = ants.n4_bias_field_correction(
        small, mask=mask, shrink_factor=config.n4_shrink_factor,
        convergence={"iters": list(config.n4_iterations), "tol": config.n4_tolerance}, return_bias_field=True)
    values = field_img.numpy()
    inside = np.isfinite(values) & (values > 0)
    if not inside.any():
        raise NotAnalysed(Outcome.QC_FAILED, "bias field estimation failed (no head found in the image)")
    values = np.where(inside, values, float(np.median(values[inside]))).astype(np.float32)
    full_field = ants.resample_image_to_target(_extend_to_grid(field_img, values, pad=2), image,
                                               interp_type="linear")
    field_values = full_field.numpy()
    if not np.isfinite(field_values).all() or float(field_values.min()) <= 0.0:
        raise NotAnalysed(Outcome.QC_FAILED, "bias field estimation failed (field not positive over the image)")
    return image / full_field


def _canonical(image: Any) -> Any:
    """The image in one voxel order (RAS) with its geometry rounded (1e-4 mm, 1e-6 direction).

    Converters write the same voxels in different orders and with geometry that
    differs in the last float digits (dicom2nifti's single-frame volume and the
    node's own multi-frame assembly, for example); one canonical form makes the
    same pixels give the same seed and the same registration.
    """
    import ants

    oriented = ants.reorient_image2(image, "RAS")
    values = np.ascontiguousarray(oriented.numpy(), dtype=np.float32)
    direction = np.round(np.asarray(oriented.direction, dtype=np.float64), 6)
    return ants.from_numpy(values, origin=tuple(np.round(np.asarray(oriented.origin, dtype=np.float64), 4).tolist()),
                           spacing=tuple(np.round(np.asarray(oriented.spacing, dtype=np.float64), 4).tolist()),
                           direction=direction)


def _input_seed(image: Any, config: PreprocessConfig) -> int:
    """A seed drawn from the input's voxels and geometry (same input, same seed)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(image.numpy(), dtype=np.float32).tobytes())
    digest.update(np.asarray([*image.spacing, *image.origin], dtype=np.float64).tobytes())
    digest.update(str(config.seed).encode())
    return int.from_bytes(digest.digest()[:4], "little") % (2**31 - 1) or 1


def preprocess(nifti_path: Path, config: PreprocessConfig) -> Preprocessed:
    """Preprocess a T1 NIfTI into the model's input volume.

    Parameters
    ----------
    nifti_path : Path
        The converted series (any orientation; world geometry must be right).
    config : PreprocessConfig
        Settings and QC limits.

    Returns
    -------
    Preprocessed
        Volume (contract in the module docstring), stage timings, QC values.

    Raises
    ------
    NotAnalysed
        ``QC_FAILED`` with "measured X, limit Y" for too few slices, too thick
        slices, incomplete brain coverage, non-T1 contrast or a failed
        registration; ``PROCESSING_ERROR`` if the file cannot be read.
    ConfigError
        For an unusable template or registration name.
    """
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(config.threads)
    import ants

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        image = ants.image_read(str(nifti_path), pixeltype="float")
    except (RuntimeError, ValueError, OSError) as exc:
        logger.warning("cannot read the converted volume (%s)", type(exc).__name__)
        raise NotAnalysed(Outcome.PROCESSING_ERROR, "the converted volume could not be read") from exc
    if image.dimension != 3:
        raise NotAnalysed(Outcome.PROCESSING_ERROR, f"the series is not a 3D volume ({image.dimension}D)")
    qc: dict[str, float] = {"slices": float(min(image.shape)), "slice_thickness_mm": float(max(image.spacing))}
    if qc["slices"] < config.min_slices:
        raise qc_fail("too few slices", qc["slices"], config.min_slices)
    if qc["slice_thickness_mm"] > config.max_slice_thickness_mm:
        raise qc_fail("slices too thick", qc["slice_thickness_mm"], config.max_slice_thickness_mm, " mm")
    template_path = config.template_path or default_template_path()
    try:
        template = ants.image_read(str(template_path), pixeltype="float")
    except (RuntimeError, ValueError, OSError) as exc:
        raise ConfigError(f"cannot read template {template_path}: {exc}") from exc
    image = _canonical(image)
    check_values("reading the volume", image.numpy())
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    corrected = _n4(image, config) if config.n4 else image
    if config.n4:
        check_values("N4 bias correction", corrected.numpy())
    seconds["n4"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    template_arr = to_dhw(template)
    seed = _input_seed(image, config)
    with tempfile.TemporaryDirectory(prefix="register-") as tmp:
        ws = workspace(template, corrected, config, Path(tmp))
        starts = [np.eye(3)] + [rotation(axis, deg) for axis, deg in EXTRA_STARTS]
        best: tuple[float, list[str]] = (-2.0, [])
        for attempt, start in enumerate(starts[:max(1, config.registration_attempts)]):
            transforms, corr = register_affine(ws, config, start, attempt, seed)
            if corr > best[0]:
                best = (corr, transforms)
            if best[0] >= config.min_correlation + config.retry_margin:
                break
            logger.info("registration start %d: template correlation %.3f (working grid), trying another start",
                        attempt + 1, corr)
        transforms = best[1]
        to_native = affine_matrix(transforms)
        warped_img = ants.apply_transforms(template, corrected, transforms, interpolator="linear")
        seconds["registration"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ones = image.new_image_like(np.ones(image.shape, dtype=np.float32))
        coverage_img = ants.apply_transforms(template, ones, transforms, interpolator="nearestNeighbor")
    warped = to_dhw(warped_img)
    check_values("registration", warped)
    qc.update(image_qc(warped, template_arr, to_dhw(coverage_img), config))
    seconds["qc"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    warped = np.maximum(warped, 0.0)
    brain_values = warped[template_arr > 0]
    top = float(np.percentile(brain_values, config.clip_percentile)) if config.clip_percentile else float(
        warped.max())
    if top <= 0:
        raise NotAnalysed(Outcome.QC_FAILED, "registered volume has no signal inside the brain")
    clipped = np.minimum(warped, top)
    if config.crop == "template":
        spacing = float(min(template.spacing))
        cube = _crop_pad(clipped, template_arr > 0, round(config.crop_margin_mm / spacing), config.target_shape)
    else:
        cube = _crop_pad(clipped, clipped > config.foreground_fraction * top, 0, config.target_shape)
    lo = float(cube.min())
    volume = ((cube - lo) / (top - lo)).astype(np.float32)
    check_values("normalisation", volume)
    seconds["crop_resample"] = time.perf_counter() - t0
    logger.info("preprocessed volume: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return Preprocessed(volume=volume, stage_seconds=seconds, qc=qc,
                        registered=warped if config.keep_registered else None, template_to_native=to_native)
