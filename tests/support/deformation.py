"""Known smooth deformations of a real brain, with their volume changes computed independently.

Colin27 (``ch2.nii.gz``, Debian ``mricron-data``) is deformed by a pull-back
displacement field ``u``: the deformed image is ``I'(x) = I(x + u(x))``.  Each
structure's field is the gradient of its Gaussian-smoothed mask times an amplitude:
``u = +a * grad(G_sigma * M)`` points into the structure, so voxels just outside it
sample its inside and it grows; ``-a`` shrinks it.  The field is smooth, local
(sigma a few mm) and vanishes far away, so the intracranial volume is unchanged.

A structure's expected volume after deformation is its mask pulled back through
the same field (``sum(M(x + u(x)))``), computed here with scipy, independently of
the node's registration and segmentation.  The masks are read and drawn here with
nibabel and scipy (AAL's hippocampi; the lateral ventricles as Colin27's dark
voxels connected to a seed in each ventricle), not with the node's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

TEMPLATES = Path("/usr/share/mricron/templates")

Array = NDArray[np.float32]


@dataclass(frozen=True)
class Colin:
    """Colin27 and the masks of the structures the tests deform (all on its 1 mm RAS grid)."""

    volume: Array
    affine: NDArray[np.float64]
    hippocampus_left: Array
    hippocampus_right: Array
    ventricles: Array
    brain: Array


def _ras_index(affine: NDArray[np.float64], ras_mm: tuple[float, float, float]) -> tuple[int, ...]:
    return tuple(np.round(np.linalg.inv(affine) @ np.append(ras_mm, 1.0))[:3].astype(int).tolist())


def load_colin() -> Colin:
    """Colin27, AAL's hippocampi (37 left, 38 right) and the lateral ventricles, as float masks."""
    img = cast(nib.Nifti1Image, nib.load(TEMPLATES / "ch2.nii.gz"))
    volume = np.asarray(img.dataobj, dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    aal = np.asarray(cast(nib.Nifti1Image, nib.load(TEMPLATES / "aal.nii.gz")).dataobj)
    brain = np.asarray(cast(nib.Nifti1Image, nib.load(TEMPLATES / "ch2bet.nii.gz")).dataobj) > 0
    x_ras = (affine @ np.vstack([np.indices(volume.shape).reshape(3, -1), np.ones(volume.size)]))[0]
    deep = ndimage.binary_erosion(brain, iterations=10)
    dark = (volume < 55.0) & deep & (np.abs(x_ras.reshape(volume.shape)) >= 3.0)
    components, _ = ndimage.label(dark)
    seeds = [components[_ras_index(affine, (x, 0.0, 20.0))] for x in (-8.0, 8.0)]
    ventricles = np.isin(components, [s for s in seeds if s])
    return Colin(volume, affine, (aal == 37).astype(np.float32), (aal == 38).astype(np.float32),
                 ventricles.astype(np.float32), brain.astype(np.float32))


def displacement(shape: tuple[int, ...], parts: list[tuple[Array, float]], sigma_mm: float = 4.0) -> Array:
    """Pull-back field (3, *shape*), voxels of 1 mm: sum of ``amplitude * grad(G_sigma * mask)``.

    Computed in the box around the masks plus 6 sigma (the field is below 1e-7 mm
    beyond), zero elsewhere.
    """
    field = np.zeros((3, *shape), dtype=np.float32)
    union = np.zeros(shape, dtype=bool)
    for mask, _ in parts:
        union |= mask > 0
    idx = np.argwhere(union)
    margin = int(np.ceil(6 * sigma_mm))
    box = tuple(slice(max(int(lo) - margin, 0), min(int(hi) + 1 + margin, n))
                for lo, hi, n in zip(idx.min(axis=0), idx.max(axis=0), shape, strict=True))
    for mask, amplitude in parts:
        smooth = ndimage.gaussian_filter(mask[box].astype(np.float64), sigma_mm)
        for axis, grad in enumerate(np.gradient(smooth)):
            index: tuple[int | slice, ...] = (axis, *box)
            field[index] += (amplitude * grad).astype(np.float32)
    return field


def pull_back(image: Array, field: Array) -> Array:
    """``image(x + u(x))`` with trilinear interpolation (edges repeated)."""
    moved = np.zeros_like(image)
    nonzero = np.abs(field).max(axis=0) > 0
    moved[...] = image
    points = np.argwhere(nonzero).T.astype(np.float32)
    moved[nonzero] = ndimage.map_coordinates(image, points + field[:, nonzero], order=1, mode="nearest")
    return moved


def volume_change(mask: Array, field: Array) -> float:
    """Relative volume change of *mask* under the deformation (e.g. -0.10 for 10 % smaller)."""
    return float(pull_back(mask, field).sum(dtype=np.float64) / mask.sum(dtype=np.float64) - 1.0)


def min_jacobian(field: Array) -> float:
    """Smallest determinant of ``I + Du`` (positive: the deformation folds nowhere)."""
    idx = np.argwhere(np.abs(field).max(axis=0) > 0)
    box = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(axis=0), idx.max(axis=0), strict=True))
    boxes: list[tuple[int | slice, ...]] = [(k, *box) for k in range(3)]
    grads = np.stack([np.stack(np.gradient(field[index].astype(np.float64))) for index in boxes])
    jac = grads + np.eye(3)[:, :, None, None, None]
    return float(np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))).min())
