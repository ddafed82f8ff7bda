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
estimated on a ``working_spacing_mm`` grid inside a head mask and divided out
at full resolution -> registration to the template on the working grid
(retried once, with a fresh random metric sampling, when the template
correlation is below the QC limit) -> transform applied once at 1 mm onto the template grid -> image QC (template
correlation, brain coverage, T1 contrast) -> crop, pad, normalise.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from pipeline.errors import ConfigError, NotAnalysed, Outcome

logger = logging.getLogger(__name__)

Registration = Literal["Affine", "AffineFast", "SyN"]


def default_template_path() -> Path:
    """The MNI152 2009 (ICBM 2009a symmetric, 1 mm, brain) T1 template shipped with nilearn."""
    import nilearn.datasets

    path = Path(nilearn.datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise ConfigError(f"MNI152 template not found at {path}; is nilearn installed?")
    return path


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of :func:`preprocess`.

    Parameters
    ----------
    registration : {"Affine", "AffineFast", "SyN"}
        "Affine": multi-resolution affine on the working grid with
        ``aff_iterations`` / ``aff_shrink_factors`` (default, fast and at least
        as good as antspyx's default Affine); "AffineFast": antspyx's preset on
        the working grid; "SyN": affine + deformable (slower, ~1 min).
    working_spacing_mm : float
        Grid of the N4 estimate and the registration (the output is always
        resampled from the full-resolution input at 1 mm).
    n4 : bool
        Run N4 bias-field correction.
    n4_iterations, n4_tolerance, n4_shrink_factor
        N4 convergence per level, tolerance and shrink of the working grid.
    aff_iterations, aff_shrink_factors, aff_smoothing_sigmas
        Affine levels for ``registration="Affine"`` (on the working grid).
    aff_sampling_rate : float
        Fraction of voxels the metric samples at random.
    registration_attempts : int
        When the template correlation is below ``min_correlation``, register
        again (fresh random sampling) up to this many attempts in all; the best wins.
    template_path : Path or None
        T1 template (brain-extracted, axis-aligned); default
        :func:`default_template_path`.
    target_shape : int
        Edge of the output cube.
    clip_percentile : float or None
        Intensities above this percentile of the brain are clipped before the
        min-max normalisation (robust to hot voxels); None: plain min-max.
    crop : {"template", "foreground"}
        Background-crop box: the template's brain box (fixed) or the subject's
        foreground box.
    crop_margin_mm : float
        Margin around the template's brain box.
    foreground_fraction : float
        Background threshold for ``crop="foreground"``, as a fraction of the clip value.
    threads : int
        ITK threads.
    keep_registered : bool
        Return the registered volume (for key-slice images).
    min_slices : int
        QC: fewest voxels along any axis.
    max_slice_thickness_mm : float
        QC: largest voxel edge.
    min_correlation : float
        QC: Pearson correlation with the template inside its brain mask.
    min_coverage : float
        QC: fraction of the template brain inside the acquired field of view.
    min_wm_gm_ratio : float
        QC: mean white-matter over mean grey-matter intensity (T1: WM brighter).
    """

    registration: Registration = "Affine"
    working_spacing_mm: float = 2.0
    n4: bool = True
    n4_iterations: tuple[int, ...] = (25, 25, 25)
    n4_tolerance: float = 1e-4
    n4_shrink_factor: int = 2
    aff_iterations: tuple[int, ...] = (1000, 500)
    aff_shrink_factors: tuple[int, ...] = (4, 2)
    aff_smoothing_sigmas: tuple[float, ...] = (2.0, 1.0)
    aff_sampling_rate: float = 0.2
    registration_attempts: int = 2
    template_path: Path | None = None
    target_shape: int = 256
    clip_percentile: float | None = 99.9
    crop: Literal["template", "foreground"] = "template"
    crop_margin_mm: float = 8.0
    foreground_fraction: float = 0.05
    threads: int = 2
    keep_registered: bool = True
    min_slices: int = 100
    max_slice_thickness_mm: float = 1.5
    min_correlation: float = 0.5
    min_coverage: float = 0.95
    min_wm_gm_ratio: float = 1.05


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
    """

    volume: NDArray[np.float32]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    qc: dict[str, float] = field(default_factory=dict)
    registered: NDArray[np.float32] | None = None


def _qc_fail(what: str, measured: float, limit: float, unit: str = "") -> NotAnalysed:
    return NotAnalysed(Outcome.QC_FAILED, f"{what}: measured {measured:.3g}{unit}, limit {limit:.3g}{unit}")


def _to_dhw(img: Any) -> NDArray[np.float32]:
    """Array of an axis-aligned ANTs image in (z, y, x) LPS order (see module doc)."""
    data = np.asarray(img.numpy(), dtype=np.float32)
    direction = np.asarray(img.direction, dtype=np.float64)  # columns: axis directions in LPS
    dominant = np.argmax(np.abs(direction), axis=0)
    if sorted(dominant.tolist()) != [0, 1, 2] or np.min(np.max(np.abs(direction), axis=0)) < 0.999:
        raise ConfigError("the template must be axis-aligned (no oblique direction cosines)")
    for axis in range(3):
        if direction[dominant[axis], axis] < 0:
            data = np.flip(data, axis=axis)
    # new axis k (0=z/S, 1=y/P, 2=x/L) is the array axis whose dominant LPS component is 2-k
    order = [int(np.flatnonzero(dominant == 2 - k)[0]) for k in range(3)]
    return np.ascontiguousarray(np.transpose(data, order))


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


def _n4(image: Any, config: PreprocessConfig) -> Any:
    """Estimate the bias field on the working grid, divide it out at full resolution."""
    import ants

    spacing = max(config.working_spacing_mm, *image.spacing)
    small = ants.resample_image(image, (spacing,) * 3, False, 0)
    mask = ants.get_mask(small)
    field_img = ants.n4_bias_field_correction(
        small, mask=mask, shrink_factor=config.n4_shrink_factor,
        convergence={"iters": list(config.n4_iterations), "tol": config.n4_tolerance}, return_bias_field=True)
    values = field_img.numpy()
    inside = values > 0
    if not inside.any():
        raise NotAnalysed(Outcome.PROCESSING_ERROR, "bias field estimation failed (empty head mask)")
    values = np.where(inside, values, float(np.median(values[inside])))
    field_img = field_img.new_image_like(values.astype(np.float32))
    full_field = ants.resample_image_to_target(field_img, image, interp_type="linear")
    return image / full_field


def _register(fixed: Any, moving: Any, config: PreprocessConfig) -> list[str]:
    import ants

    spacing = max(config.working_spacing_mm, *moving.spacing)
    fixed_small = ants.resample_image(fixed, (spacing,) * 3, False, 0)
    moving_small = ants.resample_image(moving, (spacing,) * 3, False, 0)
    if config.registration == "Affine":
        result = ants.registration(
            fixed_small, moving_small, type_of_transform="Affine",
            aff_iterations=tuple(config.aff_iterations), aff_shrink_factors=tuple(config.aff_shrink_factors),
            aff_smoothing_sigmas=tuple(config.aff_smoothing_sigmas),
            aff_random_sampling_rate=config.aff_sampling_rate)
    elif config.registration in ("AffineFast", "SyN"):
        result = ants.registration(fixed_small, moving_small, type_of_transform=config.registration,
                                   aff_random_sampling_rate=config.aff_sampling_rate)
    else:
        raise ConfigError(f"registration {config.registration!r}: expected Affine, AffineFast or SyN")
    transforms: list[str] = list(result["fwdtransforms"])
    return transforms


def _correlation(a: NDArray[np.float32], b: NDArray[np.float32]) -> float:
    """Pearson correlation, 0 for a constant input."""
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _image_qc(warped: NDArray[np.float32], template: NDArray[np.float32], coverage: NDArray[np.float32],
              config: PreprocessConfig) -> dict[str, float]:
    brain = template > 0
    t = template[brain]
    w = warped[brain]
    correlation = _correlation(w, t)
    covered = float(np.mean(coverage[brain] > 0.5))
    wm = w[t >= np.percentile(t, 80)]
    gm = w[(t >= np.percentile(t, 30)) & (t <= np.percentile(t, 50))]
    ratio = float(np.mean(wm) / np.mean(gm)) if np.mean(gm) > 0 else 0.0
    qc = {"correlation": correlation, "coverage": covered, "wm_gm_ratio": ratio}
    if covered < config.min_coverage:
        raise _qc_fail("brain not covered (fraction of the template brain in the field of view)",
                       covered, config.min_coverage)
    if ratio < config.min_wm_gm_ratio:
        raise _qc_fail("not T1 contrast (white/grey matter intensity ratio)", ratio, config.min_wm_gm_ratio)
    if correlation < config.min_correlation:
        raise _qc_fail("registration to the template failed (correlation)", correlation, config.min_correlation)
    return qc


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
        raise NotAnalysed(Outcome.PROCESSING_ERROR, f"cannot read the converted volume: {exc}") from exc
    if image.dimension != 3:
        raise NotAnalysed(Outcome.PROCESSING_ERROR, f"expected a 3D volume, got {image.dimension}D")
    qc: dict[str, float] = {"slices": float(min(image.shape)), "slice_thickness_mm": float(max(image.spacing))}
    if qc["slices"] < config.min_slices:
        raise _qc_fail("too few slices", qc["slices"], config.min_slices)
    if qc["slice_thickness_mm"] > config.max_slice_thickness_mm:
        raise _qc_fail("slices too thick", qc["slice_thickness_mm"], config.max_slice_thickness_mm, " mm")
    template_path = config.template_path or default_template_path()
    try:
        template = ants.image_read(str(template_path), pixeltype="float")
    except (RuntimeError, ValueError, OSError) as exc:
        raise ConfigError(f"cannot read template {template_path}: {exc}") from exc
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    corrected = _n4(image, config) if config.n4 else image
    seconds["n4"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    template_arr = _to_dhw(template)
    brain = template_arr > 0
    best: tuple[float, list[str], Any] = (-2.0, [], None)
    for attempt in range(max(1, config.registration_attempts)):
        # each attempt draws a fresh random metric sampling, hence a different optimisation path
        transforms = _register(template, corrected, config)
        warped_img = ants.apply_transforms(template, corrected, transforms, interpolator="linear")
        corr = _correlation(_to_dhw(warped_img)[brain], template_arr[brain])
        if corr > best[0]:
            best = (corr, transforms, warped_img)
        if corr >= config.min_correlation:
            break
        logger.warning("registration attempt %d: template correlation %.3f below %.3f", attempt + 1, corr,
                       config.min_correlation)
    _, transforms, warped_img = best
    seconds["registration"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ones = image.new_image_like(np.ones(image.shape, dtype=np.float32))
    coverage_img = ants.apply_transforms(template, ones, transforms, interpolator="nearestNeighbor")
    warped = _to_dhw(warped_img)
    qc.update(_image_qc(warped, template_arr, _to_dhw(coverage_img), config))
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
    seconds["crop_resample"] = time.perf_counter() - t0
    logger.info("preprocessed volume: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return Preprocessed(volume=volume, stage_seconds=seconds, qc=qc,
                        registered=warped if config.keep_registered else None)
