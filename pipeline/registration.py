"""Registration to the MNI template: the template, brain-centred starts, ANTs registration, transforms.

Helpers of :func:`pipeline.preprocess.preprocess` (and :mod:`pipeline.volumetry`):
:func:`default_template_path` (the MNI152 2009 template), the (D, H, W) axis
convention of an ANTs image (:func:`to_dhw`, contract in :mod:`pipeline.preprocess`),
the brain-centred start and its rotated alternatives, one seeded ANTs registration
per start, and the 4x4 affine of the result.

See Also
--------
pipeline.preprocess : The stage that runs the registration attempts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.errors import ConfigError, NotAnalysed, Outcome
from pipeline.preprocess_config import PreprocessConfig
from pipeline.qc import pearson

#: ANTsPy reads its random seed from a module global when it builds a registration's
#: arguments; registrations of different threads take turns so that each gets its own.
_ANTS_SEED_LOCK = threading.Lock()

#: Extra starts tried when the first registration is poor: (axis, degrees) rotations
#: about the template brain's centre (axis 0: left-right / pitch, 1: antero-posterior
#: / roll, 2: superior / yaw).
EXTRA_STARTS: tuple[tuple[int, float], ...] = (
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


def to_dhw(img: Any) -> NDArray[np.float32]:
    """Array of an axis-aligned ANTs image in (z, y, x) LPS order (see :mod:`pipeline.preprocess`)."""
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


def physical_points(image: Any, index: NDArray[Any]) -> NDArray[np.float64]:
    """LPS world coordinates (mm) of voxel indices (n, 3) of an ANTs image."""
    direction = np.asarray(image.direction, dtype=np.float64)
    spacing = np.asarray(image.spacing, dtype=np.float64)
    origin = np.asarray(image.origin, dtype=np.float64)
    result: NDArray[np.float64] = origin + (np.asarray(index, dtype=np.float64) * spacing) @ direction.T
    return result


@contextmanager
def ants_seed(seed: int) -> Iterator[None]:
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

    brain_points = physical_points(fixed_small, np.argwhere(fixed_small.numpy() > 0))
    head = ants.get_mask(moving_small, cleanup=2).numpy() > 0
    if not head.any():
        raise NotAnalysed(Outcome.QC_FAILED, "no head found in the image (registration start)")
    head_points = physical_points(moving_small, np.argwhere(head))
    brain_top, brain_slab = _head_top_and_centre(brain_points)
    brain_centre: NDArray[np.float64] = brain_points.mean(axis=0)
    head_top, head_slab = _head_top_and_centre(head_points)
    target = np.array([head_slab[0], head_slab[1], head_top - _SCALP_MM - (brain_top - brain_centre[2])])
    source = np.array([brain_slab[0], brain_slab[1], brain_centre[2]])
    offset: NDArray[np.float64] = target - source
    return brain_centre, offset


def rotation(axis: int, degrees: float) -> NDArray[np.float64]:
    """The 3 x 3 rotation by *degrees* about array axis *axis* (a further registration start)."""
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
class Workspace:
    """Working-grid images shared by the registration attempts."""

    fixed: Any
    moving: Any
    mask: Any
    centre: NDArray[np.float64]
    offset: NDArray[np.float64]
    brain: NDArray[np.bool_]
    template: NDArray[np.float32]
    directory: Path


def workspace(template: Any, moving: Any, config: PreprocessConfig, directory: Path) -> Workspace:
    """Resample *template* and *moving* to the working grid and place the brain-centred start, once for all attempts."""
    import ants

    spacing = max(config.working_spacing_mm, *moving.spacing)
    fixed_small = ants.resample_image(template, (spacing,) * 3, False, 0)
    moving_small = ants.resample_image(moving, (spacing,) * 3, False, 0)
    brain_small = fixed_small.new_image_like((fixed_small.numpy() > 0).astype(np.float32))
    radius = max(1, round(config.mask_dilation_mm / spacing))
    mask = ants.morphology(brain_small, "dilate", radius, mtype="binary", shape="ball")
    centre, offset = _brain_start(fixed_small, moving_small)
    template_small = to_dhw(fixed_small)
    return Workspace(fixed_small, moving_small, mask, centre, offset, template_small > 0, template_small, directory)


def register_affine(ws: Workspace, config: PreprocessConfig, start: NDArray[np.float64], attempt: int,
                    seed: int) -> tuple[list[str], float]:
    """One registration from a start rotation; (forward transforms, working-grid template correlation)."""
    import ants

    initial = _start_transform(ws.directory / f"start{attempt}.mat", ws.centre, ws.offset, start)
    common: dict[str, Any] = {"initial_transform": [initial], "mask": ws.mask,
                              "aff_random_sampling_rate": config.aff_sampling_rate,
                              "outprefix": str(ws.directory / f"reg{attempt}_")}
    with ants_seed(seed + attempt):
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
    warped = to_dhw(result["warpedmovout"])
    return transforms, pearson(warped[ws.brain], ws.template[ws.brain])


def affine_matrix(transforms: list[str]) -> NDArray[np.float64] | None:
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
