"""Key slices show the patient's left where they say L.

An asymmetric volume is made in world coordinates: the MNI template with a bright block in one hemisphere
(x < 0 is the patient's left in the template's RAS space).  It goes through the pipeline's own reading (ANTs,
:func:`pipeline.registration.to_dhw`, which makes ``Preprocessed.registered``), then :func:`key_slices`, and is
drawn as the PDF draws it; the block must sit on the side whose marker is L, and the sagittal slice of the left
hippocampus (x = -28 mm) must cut it only when it is on the left.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.registration import default_template_path
from structured_reports.keyslices import key_slices
from structured_reports.pdf import draw_key_slice
from structured_reports.types import KeySlice

ants = pytest.importorskip("ants")


def registered_with_block(tmp_path: Path, side: str) -> np.ndarray:
    """The template with a bright block at x in [15, 45] mm on the patient's *side*, read as preprocessing does."""
    from pipeline.registration import to_dhw

    template = cast(nib.Nifti1Image, nib.load(str(default_template_path())))
    data = np.asarray(template.dataobj, dtype=np.float32)
    i, j, k = np.indices(data.shape)
    x, y, z = (template.affine[axis, 0] * i + template.affine[axis, 1] * j + template.affine[axis, 2] * k
               + template.affine[axis, 3] for axis in range(3))
    lateral = -x if side == "left" else x  # RAS: the patient's left is x < 0
    block = (lateral > 15) & (lateral < 45) & (y > -40) & (y < 10) & (z > -10) & (z < 25)
    data[block] = 3.0 * float(data.max())
    path = tmp_path / f"{side}.nii.gz"
    nib.save(nib.Nifti1Image(data, template.affine), str(path))
    return to_dhw(ants.image_read(str(path)))


def block_column_fraction(key: KeySlice) -> float | None:
    """Where the block's centre is across the image (0 left edge, 1 right edge); None if the slice misses it."""
    columns = np.flatnonzero((key.image > 0.9).any(axis=0))
    if columns.size == 0:
        return None
    return float(columns.mean() + 0.5) / key.image.shape[1]


def drawn_sides(key: KeySlice) -> tuple[float, float]:
    """Where the block and the L marker appear on the drawn key slice, as fractions of the axes' width."""
    fig = Figure(figsize=(3, 3), dpi=100)
    axes = fig.add_axes((0, 0, 1, 1))
    draw_key_slice(axes, KeySlice(image=key.image, title=key.title, orientation=key.orientation))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3].astype(float) / 255
    renderer = canvas.get_renderer()
    bright = pixels.min(axis=2) > 0.95
    for text in axes.texts:  # the white markers are not the block
        box = text.get_window_extent(renderer)
        height = pixels.shape[0]
        bright[int(height - box.y1) - 1:int(height - box.y0) + 1, int(box.x0) - 1:int(box.x1) + 1] = False
    block = float(np.flatnonzero(bright.any(axis=0)).mean()) / pixels.shape[1]
    marker = next(t for t in axes.texts if t.get_text() == "L").get_window_extent(renderer)
    return block, float((marker.x0 + marker.x1) / 2) / pixels.shape[1]


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_block_in_one_hemisphere_appears_on_the_side_marked_for_it(side: str, tmp_path: Path) -> None:
    axial, coronal, sagittal = key_slices(registered_with_block(tmp_path, side), default_template_path())

    for key in (axial, coronal):
        assert key.orientation is not None and key.orientation[:2] == ("R", "L")  # viewer's left, right
        where = block_column_fraction(key)
        assert where is not None, key.title
        marked = "L" if where > 0.5 else "R"
        assert marked == side[0].upper(), (key.title, where)
        block, marker = drawn_sides(key)
        same_side_as_l = (block > 0.5) == (marker > 0.5)
        assert same_side_as_l == (side == "left"), (key.title, block, marker)  # drawn: next to L iff left
    assert sagittal.orientation == ("A", "P", "S", "I")
    assert "left hippocampus" in sagittal.title
    assert (block_column_fraction(sagittal) is not None) == (side == "left")  # x = -28 mm is the left


def test_every_key_slice_names_its_four_directions() -> None:
    template = cast(nib.Nifti1Image, nib.load(str(default_template_path())))
    data = np.asarray(template.dataobj, dtype=np.float32)
    registered = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    orientations = [key.orientation for key in key_slices(registered, default_template_path())]
    assert orientations == [("R", "L", "A", "P"), ("R", "L", "S", "I"), ("A", "P", "S", "I")]
