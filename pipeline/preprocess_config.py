"""Settings of the preprocessing stage: :class:`PreprocessConfig` and the registration names.

The settings and QC limits of :func:`pipeline.preprocess.preprocess`; the QC
table that reads the limits is :mod:`pipeline.qc`.

See Also
--------
pipeline.preprocess : The stage these settings drive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Registration = Literal["Affine", "AffineFast", "SyN"]


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of :func:`pipeline.preprocess.preprocess`.

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
        :func:`pipeline.registration.default_template_path`.
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
