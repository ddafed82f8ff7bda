"""Key slices of the PDF report: the registered brain with the template's outline.

Image maths on :mod:`pipeline.preprocess`'s (D, H, W) reversed-LPS convention, turned into radiological views:
``D`` grows towards superior, ``H`` towards posterior, ``W`` towards the patient's **left** (index 0 is the
patient's right).  So an axial slice ``volume[d]`` shows anterior at the top and the patient's right on the
viewer's left; the coronal slice has the same left-right; the sagittal slice shows anterior on the left.  Each
slice carries these directions (:attr:`~structured_reports.types.KeySlice.orientation`), drawn as markers.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from core.errors import NodeError
from structured_reports.types import KeySlice

#: Key slices of the PDF: (axis of the DHW volume, MNI coordinate in mm, caption, patient directions at the
#: viewer's left, right, top and bottom).
KEY_SLICE_PLANES: tuple[tuple[int, float, str, tuple[str, str, str, str]], ...] = (
    (0, 8.0, "Axial, z = 8 mm (MNI)", ("R", "L", "A", "P")),
    (1, -22.0, "Coronal, y = -22 mm (hippocampi)", ("R", "L", "S", "I")),
    (2, -28.0, "Sagittal, x = -28 mm (left hippocampus)", ("A", "P", "S", "I")),
)


def _template_dhw(template_path: Path) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """The template in the (D, H, W) = reversed-LPS order of :mod:`pipeline.preprocess`, and its
    voxel-to-RAS affine in that order."""
    image = nib.as_closest_canonical(nib.load(str(template_path)))
    ras = np.asarray(image.dataobj, dtype=np.float32)  # axes x (L->R), y (P->A), z (I->S)
    dhw = np.ascontiguousarray(ras.transpose(2, 1, 0)[:, ::-1, ::-1])
    nx, ny, _ = ras.shape
    # (d, h, w) -> (i, j, k) = (nx-1-w, ny-1-h, d), then the canonical affine.
    to_ijk = np.array([[0, 0, -1, nx - 1], [0, -1, 0, ny - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return dhw, np.asarray(image.affine, dtype=np.float64) @ to_ijk


def key_slices(registered: NDArray[np.float32], template_path: Path) -> list[KeySlice]:
    """Axial, coronal and sagittal slices of the registered brain with the template's outline.

    Parameters
    ----------
    registered : numpy.ndarray
        :attr:`pipeline.preprocess.Preprocessed.registered`: the subject on the template grid,
        (D, H, W) in reversed LPS order.
    template_path : Path
        The template it was registered to (brain-extracted: its non-zero voxels are the brain).

    Returns
    -------
    list[KeySlice]
        Slices oriented the radiological way (superior/anterior up, patient's right on the left),
        intensities scaled to [0, 1], each with the template brain as outline and its orientation markers.

    Raises
    ------
    NodeError
        If the registered volume is not on the template grid.
    """
    template, affine = _template_dhw(template_path)
    if registered.shape != template.shape:
        raise NodeError(f"registered volume {registered.shape} is not on the template grid {template.shape}")
    brain = template > 0
    inside = registered[brain]
    top = float(np.percentile(inside, 99.5)) if inside.size else float(registered.max())
    scaled = np.clip(registered / top, 0.0, 1.0) if top > 0 else np.zeros_like(registered)
    ras_to_dhw = np.linalg.inv(affine)
    slices = []
    for axis, mm, title, orientation in KEY_SLICE_PLANES:
        point = np.zeros(4)
        point[3] = 1.0
        point[{0: 2, 1: 1, 2: 0}[axis]] = mm  # DHW axis 0 is z, 1 is y, 2 is x
        index = round(float((ras_to_dhw @ point)[axis]))
        index = min(max(index, 0), registered.shape[axis] - 1)
        image = np.take(scaled, index, axis=axis)
        outline = np.take(brain, index, axis=axis)
        if axis != 0:  # coronal/sagittal: D grows superior, show superior at the top
            image, outline = image[::-1], outline[::-1]
        slices.append(KeySlice(image=np.ascontiguousarray(image, dtype=np.float32),
                               outline=np.ascontiguousarray(outline), title=title, orientation=orientation))
    return slices

