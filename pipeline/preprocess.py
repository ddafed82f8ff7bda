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
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from core.errors import ConfigError, NotAnalysed, Outcome

logger = logging.getLogger(__name__)

Registration = Literal["Affine", "AffineFast", "SyN"]

#: ANTsPy reads its random seed from a module global when it builds a registration's
#: arguments; registrations of different threads take turns so that each gets its own.
_ANTS_SEED_LOCK = threading.Lock()

#: Extra starts tried when the first registration is poor: (axis, degrees) rotations
#: about the template brain's centre (axis 0: left-right / pitch, 1: antero-posterior
#: / roll, 2: superior / yaw).
_EXTRA_STARTS: tuple[tuple[int, float], ...] = (
    (0, 15.0), (0, -15.0), (2, 15.0), (2, -15.0), (1, 15.0), (1, -15.0),
)

#: Scalp and skull above the brain's top, in mm (adult head; the search absorbs the rest).
_SCALP_MM = 12.0


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
        Starts tried in all: the brain-centred start, then rotated starts (pitch,
        yaw, roll of +-15 degrees) while the best template correlation is below
        ``min_correlation + retry_margin``; the best wins.  1 disables the search.
    retry_margin : float
        Correlation margin above ``min_correlation`` under which more starts are tried.
    mask_dilation_mm : float
        The metric is sampled inside the template's brain dilated by this much.
    seed : int
        Base of the metric's random sampling seed (combined with a hash of the
        input voxels, so the same input always gives the same result).
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
        ITK threads.  1 by default: ITK's multi-threaded metric adds its per-thread
        sums in an order that changes from run to run, so 2 threads give
        slightly different registrations of the same input.  ITK reads the count
        once per process (the first preprocessing of a process fixes it).
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
    registration_attempts: int = 7
    retry_margin: float = 0.05
    mask_dilation_mm: float = 8.0
    seed: int = 0
    template_path: Path | None = None
    target_shape: int = 256
    clip_percentile: float | None = 99.9
    crop: Literal["template", "foreground"] = "template"
    crop_margin_mm: float = 8.0
    foreground_fraction: float = 0.05
    threads: int = 1
    keep_registered: bool = True
    min_slices: int = 100
    max_slice_thickness_mm: float = 1.5
    min_correlation: float = 0.5
    min_coverage: float = 0.95
    min_wm_gm_ratio: float = 1.05


@dataclass(frozen=True)
class QCLimit:
    """One QC value of :func:`preprocess` and the :class:`PreprocessConfig` field that limits it.

    Parameters
    ----------
    key : str
        Key in :attr:`Preprocessed.qc`.
    label : str
        What a reader calls it ("slice thickness").
    config_field : str
        The :class:`PreprocessConfig` field holding the limit.
    comparison : {">=", "<="}
        A value passes when ``value <comparison> limit``.
    unit : str
        Suffix of value and limit when printed (" mm"), empty for ratios and counts.
    """

    key: str
    label: str
    config_field: str
    comparison: Literal[">=", "<="]
    unit: str = ""

    def limit(self, config: PreprocessConfig) -> float:
        """The limit *config* sets."""
        return float(getattr(config, self.config_field))


#: The one table of QC values and their limits (the order in which they are shown).
QC_LIMITS: tuple[QCLimit, ...] = (
    QCLimit("slices", "slices", "min_slices", ">="),
    QCLimit("slice_thickness_mm", "slice thickness", "max_slice_thickness_mm", "<=", " mm"),
    QCLimit("correlation", "template correlation", "min_correlation", ">="),
    QCLimit("coverage", "brain coverage", "min_coverage", ">="),
    QCLimit("wm_gm_ratio", "WM/GM ratio", "min_wm_gm_ratio", ">="),
)


@dataclass(frozen=True)
class QCCheck:
    """A measured QC value next to its limit."""

    key: str
    label: str
    value: float
    limit: float
    comparison: Literal[">=", "<="]
    unit: str = ""

    @property
    def ok(self) -> bool:
        """Whether the value is within its limit."""
        return self.value >= self.limit if self.comparison == ">=" else self.value <= self.limit

    @property
    def measured(self) -> str:
        """The value as a reader sees it: slices as a count, a length in its unit to 0.01, a ratio to 0.001."""
        digits = 0 if self.key == "slices" else 2 if self.unit else 3
        return f"{self.value:.{digits}f}{self.unit}"


def qc_checks(qc: dict[str, float], config: PreprocessConfig) -> tuple[QCCheck, ...]:
    """The measured QC values of :attr:`Preprocessed.qc` with their limits, in :data:`QC_LIMITS` order.

    Parameters
    ----------
    qc : dict of str to float
        Measured values (keys missing from it are left out).
    config : PreprocessConfig
        The limits the values were checked against.

    Returns
    -------
    tuple of QCCheck
        One entry per measured value.
    """
    return tuple(QCCheck(q.key, q.label, float(qc[q.key]), q.limit(config), q.comparison, q.unit)
                 for q in QC_LIMITS if q.key in qc)


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


def _check_values(stage: str, values: NDArray[np.floating]) -> None:
    """Refuse NaN/Inf, and an image without positive signal, after *stage*.

    Raises
    ------
    NotAnalysed
        ``QC_FAILED`` naming the stage, so that a bad value never travels on silently.
    """
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - np.count_nonzero(finite))
        raise NotAnalysed(Outcome.QC_FAILED, f"image values not finite after {stage} ({bad} voxels are NaN or "
                                             "infinite)")
    top = float(values.max()) if values.size else 0.0
    if top <= 0.0 or top <= float(values.min()):
        raise NotAnalysed(Outcome.QC_FAILED, f"image has no signal after {stage} (constant or not positive)")


def _physical_points(image: Any, index: NDArray[Any]) -> NDArray[np.float64]:
    """LPS world coordinates (mm) of voxel indices (n, 3) of an ANTs image."""
    direction = np.asarray(image.direction, dtype=np.float64)
    spacing = np.asarray(image.spacing, dtype=np.float64)
    origin = np.asarray(image.origin, dtype=np.float64)
    result: NDArray[np.float64] = origin + (np.asarray(index, dtype=np.float64) * spacing) @ direction.T
    return result


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


@contextmanager
def _ants_seed(seed: int) -> Iterator[None]:
    """ANTsPy's registration seed for the duration of one call (one thread at a time)."""
    import ants

    with _ANTS_SEED_LOCK:
        previous = ants.config._random_seed
        ants.config._random_seed = seed
        try:
            yield
        finally:
            ants.config._random_seed = previous


def _head_top_and_centre(points: NDArray[np.float64]) -> tuple[float, NDArray[np.float64]]:
    """Top (superior-most, robust) of a set of LPS points and the centre of the slab under it."""
    top = float(np.percentile(points[:, 2], 99.5))
    slab = points[(points[:, 2] > top - 90.0) & (points[:, 2] < top - 10.0)]
    if len(slab) == 0:
        slab = points
    centre: NDArray[np.float64] = slab.mean(axis=0)
    return top, centre


def _brain_start(fixed_small: Any, moving_small: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Template brain centre and the translation that puts it where the subject's brain is.

    The subject's brain is placed from its head: the head's top minus the template
    brain's depth (its top to its centroid) and a scalp, and the left-right and
    antero-posterior centre of the slab under the top.  Unlike the centre of mass,
    this does not move with the neck, the shoulders or a partly cut field of view.

    Returns
    -------
    (centre, offset)
        The template brain's centroid (LPS mm) and the moving-minus-fixed offset.
    """
    import ants

    brain_points = _physical_points(fixed_small, np.argwhere(fixed_small.numpy() > 0))
    head = ants.get_mask(moving_small, cleanup=2).numpy() > 0
    if not head.any():
        raise NotAnalysed(Outcome.QC_FAILED, "no head found in the image (registration start)")
    head_points = _physical_points(moving_small, np.argwhere(head))
    brain_top, brain_slab = _head_top_and_centre(brain_points)
    brain_centre: NDArray[np.float64] = brain_points.mean(axis=0)
    head_top, head_slab = _head_top_and_centre(head_points)
    target = np.array([head_slab[0], head_slab[1], head_top - _SCALP_MM - (brain_top - brain_centre[2])])
    source = np.array([brain_slab[0], brain_slab[1], brain_centre[2]])
    offset: NDArray[np.float64] = target - source
    return brain_centre, offset


def _rotation(axis: int, degrees: float) -> NDArray[np.float64]:
    angle = np.deg2rad(degrees)
    c, s = float(np.cos(angle)), float(np.sin(angle))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def _start_transform(path: Path, centre: NDArray[np.float64], offset: NDArray[np.float64],
                     rotation: NDArray[np.float64]) -> str:
    """Write a fixed-to-moving start transform (rotation about *centre*, then *offset*)."""
    import ants

    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=rotation, center=tuple(centre.tolist()),
        translation=tuple(offset.tolist()))
    ants.write_transform(transform, str(path))
    return str(path)


@dataclass
class _Workspace:
    """Working-grid images shared by the registration attempts."""

    fixed: Any
    moving: Any
    mask: Any
    centre: NDArray[np.float64]
    offset: NDArray[np.float64]
    brain: NDArray[np.bool_]
    template: NDArray[np.float32]
    directory: Path


def _workspace(template: Any, moving: Any, config: PreprocessConfig, directory: Path) -> _Workspace:
    import ants

    spacing = max(config.working_spacing_mm, *moving.spacing)
    fixed_small = ants.resample_image(template, (spacing,) * 3, False, 0)
    moving_small = ants.resample_image(moving, (spacing,) * 3, False, 0)
    brain_small = fixed_small.new_image_like((fixed_small.numpy() > 0).astype(np.float32))
    radius = max(1, round(config.mask_dilation_mm / spacing))
    mask = ants.morphology(brain_small, "dilate", radius, mtype="binary", shape="ball")
    centre, offset = _brain_start(fixed_small, moving_small)
    template_small = _to_dhw(fixed_small)
    return _Workspace(fixed_small, moving_small, mask, centre, offset, template_small > 0, template_small, directory)


def _register(ws: _Workspace, config: PreprocessConfig, start: NDArray[np.float64], attempt: int,
              seed: int) -> tuple[list[str], float]:
    """One registration from a start rotation; (forward transforms, working-grid template correlation)."""
    import ants

    initial = _start_transform(ws.directory / f"start{attempt}.mat", ws.centre, ws.offset, start)
    common: dict[str, Any] = {"initial_transform": [initial], "mask": ws.mask,
                              "aff_random_sampling_rate": config.aff_sampling_rate,
                              "outprefix": str(ws.directory / f"reg{attempt}_")}
    with _ants_seed(seed + attempt):
        if config.registration == "Affine":
            result = ants.registration(
                ws.fixed, ws.moving, type_of_transform="Affine", aff_iterations=tuple(config.aff_iterations),
                aff_shrink_factors=tuple(config.aff_shrink_factors),
                aff_smoothing_sigmas=tuple(config.aff_smoothing_sigmas), **common)
        elif config.registration in ("AffineFast", "SyN"):
            result = ants.registration(ws.fixed, ws.moving, type_of_transform=config.registration, **common)
        else:
            raise ConfigError(f"registration {config.registration!r}: expected Affine, AffineFast or SyN")
    transforms: list[str] = list(result["fwdtransforms"])  # the start is composed into the affine
    warped = _to_dhw(result["warpedmovout"])
    return transforms, _correlation(warped[ws.brain], ws.template[ws.brain])


def _affine_matrix(transforms: list[str]) -> NDArray[np.float64] | None:
    """The 4x4 template-to-input point map of a single affine transform file (None otherwise)."""
    import ants

    if len(transforms) != 1 or not transforms[0].endswith(".mat"):
        return None
    transform = ants.read_transform(transforms[0])
    params = np.asarray(transform.parameters, dtype=np.float64)
    centre = np.asarray(transform.fixed_parameters, dtype=np.float64)
    matrix = np.eye(4)
    matrix[:3, :3] = params[:9].reshape(3, 3)
    matrix[:3, 3] = params[9:12] + centre - matrix[:3, :3] @ centre  # ITK: y = M (x - c) + c + t
    return matrix


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
        logger.warning("cannot read the converted volume (%s)", type(exc).__name__)
        raise NotAnalysed(Outcome.PROCESSING_ERROR, "the converted volume could not be read") from exc
    if image.dimension != 3:
        raise NotAnalysed(Outcome.PROCESSING_ERROR, f"the series is not a 3D volume ({image.dimension}D)")
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
    image = _canonical(image)
    _check_values("reading the volume", image.numpy())
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    corrected = _n4(image, config) if config.n4 else image
    if config.n4:
        _check_values("N4 bias correction", corrected.numpy())
    seconds["n4"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    template_arr = _to_dhw(template)
    seed = _input_seed(image, config)
    with tempfile.TemporaryDirectory(prefix="register-") as tmp:
        ws = _workspace(template, corrected, config, Path(tmp))
        starts = [np.eye(3)] + [_rotation(axis, deg) for axis, deg in _EXTRA_STARTS]
        best: tuple[float, list[str]] = (-2.0, [])
        for attempt, start in enumerate(starts[:max(1, config.registration_attempts)]):
            transforms, corr = _register(ws, config, start, attempt, seed)
            if corr > best[0]:
                best = (corr, transforms)
            if best[0] >= config.min_correlation + config.retry_margin:
                break
            logger.info("registration start %d: template correlation %.3f (working grid), trying another start",
                        attempt + 1, corr)
        transforms = best[1]
        to_native = _affine_matrix(transforms)
        warped_img = ants.apply_transforms(template, corrected, transforms, interpolator="linear")
        seconds["registration"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ones = image.new_image_like(np.ones(image.shape, dtype=np.float32))
        coverage_img = ants.apply_transforms(template, ones, transforms, interpolator="nearestNeighbor")
    warped = _to_dhw(warped_img)
    _check_values("registration", warped)
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
    _check_values("normalisation", volume)
    seconds["crop_resample"] = time.perf_counter() - t0
    logger.info("preprocessed volume: %s", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return Preprocessed(volume=volume, stage_seconds=seconds, qc=qc,
                        registered=warped if config.keep_registered else None, template_to_native=to_native)
