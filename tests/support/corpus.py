"""An independent corpus of scanner-like 3D T1 studies, made from real brains.

Independent of :mod:`pipeline.synth` on purpose: its own geometry, resampling
and DICOM writing, so that a shortcut shared by the node and its own test data
cannot hide a bug.  Nothing here imports the node.

Heads
-----
The brains are real: Colin27 (``ch2.nii.gz`` in Debian's ``mricron-data``, a
whole head at 1 mm, MNI space) and the MNI152 2009 template shipped with
nilearn (brain only; a scalp, skull and CSF shell is grown around it).  A head
is placed in the scanner with a pose (rotation, translation off the isocentre,
head size) and sampled onto the acquisition grid in world space; then come a
smooth multiplicative bias field (fixed to the scanner), the head coil's
fall-off towards the neck (fixed to the coil, hence to the head), Rician noise
(the magnitude of complex Gaussian noise) and, optionally, zero-filled edge
slices.  A small smooth random warp makes each seed a slightly different
subject.  Every random choice comes from a seeded :class:`numpy.random.Generator`.

World coordinates: computations use RAS+ millimetres (NIfTI); DICOM attributes
are written in LPS+ (``ImagePositionPatient``, ``ImageOrientationPatient``).
A grid is described by an affine mapping voxel indices ``(i, j, k)`` to RAS mm.

Series
------
:data:`VARIANTS` holds the corpus: Siemens MPRAGE, GE BRAVO / IR-FSPGR and
Philips T1 TFE series with their scanners' headers; sagittal, axial, coronal
and oblique slices (up to 15 degrees, double oblique); matrices such as
240 x 256 x 176, 256 x 256 x 172, 224 x 256 x 160 and 182 x 165 x 150; 0.9-1.2 mm
voxels, anisotropic ones; 12- and 16-bit, signed and unsigned storage,
RescaleSlope / RescaleIntercept; explicit and implicit VR little endian, JPEG-LS,
JPEG 2000 and RLE lossless; one Enhanced MR Image Storage instance; zero-filled
edge slices and phase-encoding edges; localizers next to some T1 series.
Variants of one :attr:`Variant.group` decode to the same pixels (:func:`groups`).

:func:`write_variant` writes one study at the scanner's size (``"full"``) or at
an affordable one (``"small"``: same field of view, about 1.35 mm voxels, at
least 100 voxels along every axis).  Every value and UID derives from the
variant's name and seeds: writing twice gives byte-identical files.

:func:`realistic_head` gives a whole-head 1 mm NIfTI in a random pose (for
registration robustness measurements).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

#: Colin27 single-subject T1, whole head, 1 mm, MNI space (Debian package ``mricron-data``).
COLIN27_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")

#: Centre of the head in MNI (anatomical RAS) millimetres: the point the pose rotates about
#: and places at ``translation_mm`` in the scanner.
HEAD_CENTRE_MNI = np.array([0.0, -18.0, 12.0])

#: Sources :func:`realistic_head` and the variants draw from.
SOURCES = ("colin27", "mni152")

Array = NDArray[np.float32]


def mni152_path() -> Path:
    """The MNI152 2009 T1 template shipped with nilearn (brain only, 1 mm).

    Returns
    -------
    Path
        ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` in nilearn's data folder.
    """
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


# ----------------------------------------------------------------------------------------------------------------
# Source heads
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def load_source(name: str) -> tuple[Array, NDArray[np.float64]]:
    """A whole-head source volume, intensities scaled so white matter is about 1.

    Parameters
    ----------
    name : {"colin27", "mni152"}
        ``colin27``: Colin27 with a 40 mm neck continued below its cut (the
        bottom slice, tapering); ``mni152``: the MNI152 2009 brain with a
        grown CSF / skull / scalp shell.

    Returns
    -------
    tuple
        ``(volume, affine)``: a read-only float32 array and its 4x4 voxel to
        RAS mm affine.
    """
    if name == "colin27":
        img = cast(nib.Nifti1Image, nib.load(COLIN27_PATH))
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
        axis = int(np.argmax(np.abs(affine[2, :3])))
        if axis != 2 or affine[2, 2] <= 0:
            raise ValueError("Colin27 is expected with its third axis inferior -> superior")
        # Colin27 is cut flat below the chin: continue the neck with its bottom slice, fading out.
        pad = 40
        bottom = data[:, :, :1]
        fade = (np.cos(np.linspace(0.0, np.pi / 2, pad, dtype=np.float32)) ** 2)[::-1]
        neck = bottom * fade[np.newaxis, np.newaxis, :]
        data = np.concatenate([neck, data], axis=2)
        affine = affine @ _translation(np.array([0.0, 0.0, -pad]))
        white = float(np.percentile(data[data > 0], 97.0))
    elif name == "mni152":
        img = cast(nib.Nifti1Image, nib.load(mni152_path()))
        brain = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
        data, affine = _grow_head(brain, affine)
        white = float(np.percentile(brain[brain > 0.2 * brain.max()], 90.0))
    else:
        raise ValueError(f"unknown source {name!r}; one of {SOURCES}")
    data = np.ascontiguousarray(data / white, dtype=np.float32)
    data.setflags(write=False)
    return data, affine


def _grow_head(brain: Array, affine: NDArray[np.float64]) -> tuple[Array, NDArray[np.float64]]:
    """Wrap a skull-stripped brain in CSF, skull, scalp fat and skin (a T1 look)."""
    pad = 22
    brain = np.pad(brain, pad)
    affine = affine @ _translation(np.array([-pad, -pad, -pad], dtype=np.float64))
    white = float(np.percentile(brain[brain > 0.2 * brain.max()], 90.0))
    mask = ndimage.binary_closing(brain > 0.15 * white, iterations=3)
    mask = ndimage.binary_fill_holes(mask)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    dist = ndimage.distance_transform_edt(~mask, sampling=zooms).astype(np.float32)
    head = np.zeros_like(brain)
    for lo, hi, level in ((0.0, 2.5, 0.12), (2.5, 8.0, 0.04), (8.0, 13.0, 0.85), (13.0, 16.0, 0.45)):
        head[(dist > lo) & (dist <= hi)] = level * white
    head = ndimage.gaussian_filter(head, 0.8)
    return np.where(mask, brain, head).astype(np.float32), affine


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


def _translation(t: NDArray[np.float64]) -> NDArray[np.float64]:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def rotation_matrix(degrees: Sequence[float]) -> NDArray[np.float64]:
    """Rotation about the RAS x (pitch), y (roll) then z (yaw) axes.

    Parameters
    ----------
    degrees : sequence of float
        Three angles in degrees.

    Returns
    -------
    numpy.ndarray
        3x3 rotation matrix ``Rz @ Ry @ Rx``.
    """
    ax, ay, az = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Pose:
    """Where the head lies in the scanner.

    Parameters
    ----------
    rotation_deg : tuple of float
        Rotation about RAS x, y, z (degrees) of the head about its centre.
    translation_mm : tuple of float
        Position of the head's centre (:data:`HEAD_CENTRE_MNI`) in scanner RAS mm.
    scale : float
        Head size relative to the source brain.
    """

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    scale: float = 1.0

    def matrix(self) -> NDArray[np.float64]:
        """4x4 map from anatomical (source) RAS mm to scanner RAS mm."""
        linear = np.eye(4)
        linear[:3, :3] = rotation_matrix(self.rotation_deg) * self.scale
        return _translation(np.asarray(self.translation_mm)) @ linear @ _translation(-HEAD_CENTRE_MNI)

    @classmethod
    def random(cls, rng: np.random.Generator, max_rotation_deg: float = 15.0, max_translation_mm: float = 30.0,
               max_scale: float = 0.08) -> Pose:
        """A pose drawn uniformly within the given limits (each axis independently)."""
        rot = rng.uniform(-max_rotation_deg, max_rotation_deg, 3)
        shift = rng.uniform(-max_translation_mm, max_translation_mm, 3)
        scale = 1.0 + rng.uniform(-max_scale, max_scale)
        return cls(tuple(float(v) for v in rot), tuple(float(v) for v in shift), float(scale))  # type: ignore[arg-type]


def resample_head(source: Array, source_affine: NDArray[np.float64], pose: Pose, grid_affine: NDArray[np.float64],
                  shape: Sequence[int], order: int = 1) -> Array:
    """Sample a posed head on an acquisition grid (world-space resampling).

    Parameters
    ----------
    source : numpy.ndarray
        Source volume.
    source_affine : numpy.ndarray
        Its voxel -> anatomical RAS mm affine.
    pose : Pose
        Anatomical -> scanner placement.
    grid_affine : numpy.ndarray
        Voxel -> scanner RAS mm affine of the grid to fill.
    shape : sequence of int
        Grid shape.
    order : int
        Spline order of the interpolation.

    Returns
    -------
    numpy.ndarray
        float32 volume of ``shape``; 0 where the grid leaves the source.
    """
    m = np.linalg.inv(source_affine) @ np.linalg.inv(pose.matrix()) @ grid_affine
    out = np.empty(tuple(int(n) for n in shape), dtype=np.float32)
    ndimage.affine_transform(source, m[:3, :3], offset=m[:3, 3], output=out, order=order, mode="constant",
                             cval=0.0, prefilter=order > 1)
    np.maximum(out, 0.0, out=out)
    return out


def _interp_matrix(n: int, m: int) -> NDArray[np.float64]:
    """Linear interpolation from ``m`` evenly spaced samples (first to last index) to ``n`` indices."""
    pos = np.linspace(0.0, m - 1.0, n)
    lo = np.minimum(np.floor(pos).astype(int), m - 2) if m > 1 else np.zeros(n, dtype=int)
    w = np.zeros((n, m))
    if m == 1:
        w[:, 0] = 1.0
        return w
    frac = pos - lo
    w[np.arange(n), lo] = 1.0 - frac
    w[np.arange(n), lo + 1] += frac
    return w


def smooth_field(fn: Callable[[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]], NDArray[np.float64]],
                 grid_affine: NDArray[np.float64], shape: Sequence[int], step: int = 6) -> Array:
    """Evaluate a smooth function of world position on a grid (coarse samples, linear interpolation).

    Parameters
    ----------
    fn : callable
        ``fn(x, y, z)`` of RAS mm arrays (broadcast), returning an array of the same shape.
    grid_affine : numpy.ndarray
        Voxel -> RAS mm affine.
    shape : sequence of int
        Grid shape.
    step : int
        About one sample every ``step`` voxels along each axis.

    Returns
    -------
    numpy.ndarray
        float32 field of ``shape``.
    """
    counts = [max(2, int(np.ceil((n - 1) / step)) + 1) for n in shape]
    idx = np.meshgrid(*[np.linspace(0.0, n - 1.0, c) for n, c in zip(shape, counts, strict=True)], indexing="ij")
    world = [sum(grid_affine[r, a] * idx[a] for a in range(3)) + grid_affine[r, 3] for r in range(3)]
    coarse = np.asarray(fn(*world), dtype=np.float64)
    w0, w1, w2 = (_interp_matrix(int(n), c) for n, c in zip(shape, counts, strict=True))
    part = np.tensordot(w0, coarse, axes=(1, 0))            # (n0, c1, c2)
    part = np.tensordot(part, w1, axes=(1, 1))              # (n0, c2, n1)
    part = np.ascontiguousarray(np.transpose(part, (0, 2, 1)))  # (n0, n1, c2)
    out = (part.reshape(-1, counts[2]) @ w2.T).reshape(tuple(int(n) for n in shape))
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Subject, bias, coil and noise
# ----------------------------------------------------------------------------------------------------------------


def warp_source(source: Array, affine: NDArray[np.float64], rng: np.random.Generator,
                amplitude_mm: float) -> Array:
    """Deform a source head by a smooth random displacement (another subject, roughly).

    Parameters
    ----------
    source : numpy.ndarray
        Source volume.
    affine : numpy.ndarray
        Its voxel -> RAS affine (for the voxel size).
    rng : numpy.random.Generator
        Random source.
    amplitude_mm : float
        Largest displacement.

    Returns
    -------
    numpy.ndarray
        The warped float32 volume (same grid).
    """
    if amplitude_mm <= 0:
        return source
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    shape = source.shape
    counts = [max(3, round(float(n * z) / 24.0) + 1) for n, z in zip(shape, zooms, strict=True)]
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        coarse = ndimage.gaussian_filter(rng.standard_normal(counts), 0.7, mode="nearest")
        coarse *= amplitude_mm / max(float(np.abs(coarse).max()), 1e-6) / zooms[axis]
        w = [_interp_matrix(int(n), c) for n, c in zip(shape, counts, strict=True)]
        field = np.einsum("ia,jb,kc,abc->ijk", w[0], w[1], w[2], coarse, optimize=True).astype(np.float32)
        coords[axis] += field
    return ndimage.map_coordinates(source, coords, order=1, mode="constant", cval=0.0).astype(np.float32)


def polynomial_bias(rng: np.random.Generator, centre_mm: Sequence[float], amplitude: float, degree: int = 3,
                    radius_mm: float = 100.0) -> Callable[..., NDArray[np.float64]]:
    """A smooth multiplicative bias field: ``exp`` of a random polynomial of world position.

    Parameters
    ----------
    rng : numpy.random.Generator
        Random source.
    centre_mm : sequence of float
        Centre (RAS mm) of the region the field is normalised over (the head).
    amplitude : float
        The field stays within ``[1 / (1 + amplitude), 1 + amplitude]`` inside ``radius_mm``.
    degree : int
        Polynomial degree.
    radius_mm : float
        Radius of the normalisation region.

    Returns
    -------
    callable
        ``field(x, y, z)`` of RAS mm arrays.
    """
    terms = [(a, b, c) for a in range(degree + 1) for b in range(degree + 1) for c in range(degree + 1)
             if 0 < a + b + c <= degree]
    coef = rng.standard_normal(len(terms)) / np.array([1.0 + a + b + c for a, b, c in terms])
    centre = np.asarray(centre_mm, dtype=np.float64)

    def poly(x: NDArray[np.float64], y: NDArray[np.float64], z: NDArray[np.float64]) -> NDArray[np.float64]:
        u, v, w = (x - centre[0]) / radius_mm, (y - centre[1]) / radius_mm, (z - centre[2]) / radius_mm
        return sum(k * u**a * v**b * w**c for k, (a, b, c) in zip(coef, terms, strict=True))

    probe = rng.uniform(-1.0, 1.0, (3, 4000)) * radius_mm
    probe = probe[:, np.linalg.norm(probe, axis=0) <= radius_mm] + centre[:, np.newaxis]
    values = poly(*probe)
    offset = 0.5 * (values.max() + values.min())
    scale = np.log1p(amplitude) / max(0.5 * (values.max() - values.min()), 1e-9)

    def field(x: NDArray[np.float64], y: NDArray[np.float64], z: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.exp(np.clip((poly(x, y, z) - offset) * scale, -1.5 * np.log1p(amplitude),
                              1.5 * np.log1p(amplitude)))

    return field


def coil_falloff(inferior_mm: float, width_mm: float, floor: float = 0.03) -> Callable[..., NDArray[np.float64]]:
    """Head-coil sensitivity: 1 over the head, dropping towards the neck (world z, the bore axis).

    Parameters
    ----------
    inferior_mm : float
        World z (RAS mm) where the sensitivity is half-way down.
    width_mm : float
        Width of the logistic drop.
    floor : float
        Sensitivity far below.

    Returns
    -------
    callable
        ``falloff(x, y, z)``.
    """

    def falloff(x: NDArray[np.float64], y: NDArray[np.float64], z: NDArray[np.float64]) -> NDArray[np.float64]:
        del x, y
        return floor + (1.0 - floor) / (1.0 + np.exp(-(z - inferior_mm) / width_mm))

    return falloff


def rician(image: Array, sigma: float, rng: np.random.Generator) -> Array:
    """Magnitude of the image plus complex Gaussian noise of standard deviation ``sigma`` per channel.

    Parameters
    ----------
    image : numpy.ndarray
        Noise-free magnitude image.
    sigma : float
        Noise level (same units as the image).
    rng : numpy.random.Generator
        Random source.

    Returns
    -------
    numpy.ndarray
        float32 magnitude image.
    """
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag, dtype=np.float32)


@dataclass(frozen=True)
class Appearance:
    """Everything about a scan but its grid: subject, pose, bias, coil, noise, signal level.

    Parameters
    ----------
    source : str
        One of :data:`SOURCES`.
    pose : Pose
        Head placement.
    warp_mm : float
        Amplitude of the subject's random warp.
    bias_amplitude : float
        Bias field within ``[1/(1+a), 1+a]`` over the head.
    falloff_mm : float
        Half-way point of the coil fall-off, mm below the head centre along the bore.
    falloff_width_mm : float
        Width of the fall-off.
    noise : float
        Noise sigma as a fraction of the white-matter signal.
    white_level : float
        White-matter signal in scanner units.
    seed : int
        Seed of the random parts that are not described here (warp, bias polynomial, noise).
    """

    source: str = "colin27"
    pose: Pose = Pose()
    warp_mm: float = 2.0
    bias_amplitude: float = 0.25
    falloff_mm: float = 90.0
    falloff_width_mm: float = 12.0
    noise: float = 0.03
    white_level: float = 800.0
    seed: int = 0

    @classmethod
    def random(cls, seed: int, source: str | None = None, max_rotation_deg: float = 15.0,
               max_translation_mm: float = 30.0, max_scale: float = 0.08) -> Appearance:
        """A random appearance (pose within the limits, bias 15-30 %, noise 1.5-4 %, ...)."""
        rng = np.random.default_rng([seed, 0xC0])
        pose = Pose.random(rng, max_rotation_deg, max_translation_mm, max_scale)
        return cls(source=source or "colin27", pose=pose, warp_mm=float(rng.uniform(1.0, 3.0)),
                   bias_amplitude=float(rng.uniform(0.15, 0.30)), falloff_mm=float(rng.uniform(80.0, 100.0)),
                   falloff_width_mm=float(rng.uniform(8.0, 16.0)), noise=float(rng.uniform(0.015, 0.04)),
                   white_level=float(rng.uniform(500.0, 1100.0)), seed=seed)


def render(appearance: Appearance, grid_affine: NDArray[np.float64], shape: Sequence[int],
           order: int = 1) -> Array:
    """The magnitude image a scanner would reconstruct on a grid (float32, scanner units).

    Parameters
    ----------
    appearance : Appearance
        Subject, pose and scanner effects.
    grid_affine : numpy.ndarray
        Voxel -> scanner RAS mm affine of the acquisition grid.
    shape : sequence of int
        Grid shape.
    order : int
        Interpolation order of the world-space resampling.

    Returns
    -------
    numpy.ndarray
        float32 image, Rician noise in the background.
    """
    rng = np.random.default_rng([appearance.seed, 0x5EED])
    source, source_affine = _subject(appearance.source, appearance.seed, appearance.warp_mm)
    image = resample_head(source, source_affine, appearance.pose, grid_affine, shape, order)
    centre = appearance.pose.translation_mm
    bias = polynomial_bias(rng, centre, appearance.bias_amplitude)
    coil = coil_falloff(centre[2] - appearance.falloff_mm * appearance.pose.scale, appearance.falloff_width_mm)
    image *= smooth_field(lambda x, y, z: bias(x, y, z) * coil(x, y, z), grid_affine, shape)
    image *= np.float32(appearance.white_level)
    return rician(image, appearance.noise * appearance.white_level, rng)


@functools.lru_cache(maxsize=3)
def _subject(source: str, seed: int, warp_mm: float) -> tuple[Array, NDArray[np.float64]]:
    """The source head warped into the seed's subject (cached: several series of one subject)."""
    volume, affine = load_source(source)
    warped = warp_source(volume, affine, np.random.default_rng([seed, 0x3A4F]), warp_mm)
    warped.setflags(write=False)
    return warped, affine


def centred_grid(shape: Sequence[int], zooms: Sequence[float]) -> NDArray[np.float64]:
    """Voxel -> RAS affine of an axis-aligned grid (RAS axis order) centred on the isocentre."""
    affine = np.diag([*map(float, zooms), 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape, dtype=np.float64) - 1.0) * np.asarray(zooms, dtype=np.float64)
    return affine


#: Grid of :func:`realistic_head`: 1 mm, RAS axes, room for the head at any pose within the limits;
#: odd / non-power-of-two sizes on purpose.
HEAD_GRID_SHAPE = (245, 283, 271)


def realistic_head(seed: int, source: str | None = None, shape: Sequence[int] = HEAD_GRID_SHAPE,
                   max_rotation_deg: float = 15.0, max_translation_mm: float = 30.0,
                   max_scale: float = 0.08) -> nib.Nifti1Image:
    """A whole-head 1 mm T1 as a scanner would give it, in a random pose.

    Parameters
    ----------
    seed : int
        Everything random derives from it: the same seed gives the same image.
    source : {"colin27", "mni152"} or None
        The brain; default Colin27 (whole head).
    shape : sequence of int
        Grid (RAS axes, 1 mm, centred on the isocentre).
    max_rotation_deg, max_translation_mm, max_scale
        Limits of the pose: rotation about each axis, translation of the head
        centre off the isocentre along each axis, relative head size change.

    Returns
    -------
    nibabel.Nifti1Image
        float32 image (scanner units, white matter about 500-1100) with a
        smooth bias field (15-30 %), the coil's fall-off towards the neck,
        Rician noise (1.5-4 %) and a small random warp.  The pose is in the
        header's ``descrip`` as JSON (``rot``, ``shift``, ``scale``).
    """
    appearance = Appearance.random(seed, source, max_rotation_deg, max_translation_mm, max_scale)
    affine = centred_grid(shape, (1.0, 1.0, 1.0))
    data = render(appearance, affine, shape)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    pose = appearance.pose
    img.header["descrip"] = json.dumps({"rot": [round(v, 1) for v in pose.rotation_deg],
                                        "shift": [round(v, 1) for v in pose.translation_mm],
                                        "scale": round(pose.scale, 3)}, separators=(",", ":")).encode()[:80]
    return img


# ----------------------------------------------------------------------------------------------------------------
# Acquisition grids and DICOM series
# ----------------------------------------------------------------------------------------------------------------

#: Row direction (increasing column index) and column direction (increasing row index) of each plane, LPS.
PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SliceGrid:
    """The acquisition grid of a series: voxel ``(column, row, slice)`` -> LPS mm.

    Parameters
    ----------
    row_dir, col_dir : numpy.ndarray
        ImageOrientationPatient (LPS unit vectors).
    origin : numpy.ndarray
        ImagePositionPatient of the first slice (centre of its first pixel), LPS mm.
    spacing : tuple of float
        Column spacing (PixelSpacing[1]), row spacing (PixelSpacing[0]), slice spacing (mm).
    shape : tuple of int
        Columns, rows, slices.
    """

    row_dir: NDArray[np.float64]
    col_dir: NDArray[np.float64]
    origin: NDArray[np.float64]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def normal(self) -> NDArray[np.float64]:
        """Slice normal (row x column), the direction slices are written along."""
        return cast(NDArray[np.float64], np.cross(self.row_dir, self.col_dir))

    def lps_affine(self) -> NDArray[np.float64]:
        """Voxel (column, row, slice) -> LPS mm."""
        affine = np.eye(4)
        affine[:3, 0] = self.row_dir * self.spacing[0]
        affine[:3, 1] = self.col_dir * self.spacing[1]
        affine[:3, 2] = self.normal * self.spacing[2]
        affine[:3, 3] = self.origin
        return affine

    def ras_affine(self) -> NDArray[np.float64]:
        """Voxel (column, row, slice) -> RAS mm (what :func:`render` takes)."""
        return _RAS_LPS @ self.lps_affine()

    def position(self, k: int) -> NDArray[np.float64]:
        """ImagePositionPatient of slice ``k``."""
        return self.origin + k * self.spacing[2] * self.normal

    @classmethod
    def centred(cls, plane: str, tilt_deg: Sequence[float], centre_ras: Sequence[float],
                spacing: Sequence[float], shape: Sequence[int]) -> SliceGrid:
        """A grid of a plane, rotated by ``tilt_deg`` (about RAS x, y, z), centred on ``centre_ras``."""
        row, col = (np.asarray(v, dtype=np.float64) for v in PLANES[plane])
        rot = _RAS_LPS[:3, :3] @ rotation_matrix(tilt_deg) @ _RAS_LPS[:3, :3]
        # round the direction cosines as a scanner writes them, then re-orthonormalise
        row = np.round(rot @ row, 8)
        col = np.round(rot @ col, 8)
        row /= np.linalg.norm(row)
        col -= (col @ row) * row
        col /= np.linalg.norm(col)
        sp = tuple(float(s) for s in spacing)
        n = tuple(int(v) for v in shape)
        normal = np.cross(row, col)
        centre = _RAS_LPS[:3, :3] @ np.asarray(centre_ras, dtype=np.float64)
        origin = centre - 0.5 * ((n[0] - 1) * sp[0] * row + (n[1] - 1) * sp[1] * col + (n[2] - 1) * sp[2] * normal)
        return cls(row, col, origin, sp, n)  # type: ignore[arg-type]


#: Vendor headers common to every series of a vendor (the scanner), then per protocol in :data:`PROTOCOLS`.
SCANNERS: dict[str, dict[str, object]] = {
    "SIEMENS": {
        "Manufacturer": "SIEMENS", "ManufacturerModelName": "Prisma_fit", "SoftwareVersions": "syngo MR E11",
        "DeviceSerialNumber": "166012", "StationName": "AWP166012", "MagneticFieldStrength": 3.0,
        "ImagingFrequency": 123.2508, "TransmitCoilName": "Body", "ReceiveCoilName": "HeadNeck_64",
    },
    "GE": {
        "Manufacturer": "GE MEDICAL SYSTEMS", "ManufacturerModelName": "DISCOVERY MR750",
        "SoftwareVersions": ["27", "LX", "MR Software release:DV26.0_R03_1831.b"],
        "DeviceSerialNumber": "0000000608555MR1",
        "StationName": "GEMR750", "MagneticFieldStrength": 3.0, "ImagingFrequency": 127.7718,
        "TransmitCoilName": "BODY", "ReceiveCoilName": "32Ch Head",
    },
    "PHILIPS": {
        "Manufacturer": "Philips Medical Systems", "ManufacturerModelName": "Ingenia",
        "SoftwareVersions": ["5.4.1", "5.4.1.0"], "DeviceSerialNumber": "42084", "StationName": "PHILIPS-MR1",
        "MagneticFieldStrength": 3.0, "ImagingFrequency": 127.7435, "TransmitCoilName": "B",
        "ReceiveCoilName": "SENSE_HEAD_32",
    },
}

#: 3D T1 protocols as the scanners write them (the values of real MPRAGE / BRAVO / T1 TFE series).
PROTOCOLS: dict[str, dict[str, object]] = {
    "SIEMENS": {
        "SeriesDescription": "t1_mprage_sag_p2_iso", "ProtocolName": "t1_mprage_sag_p2_iso",
        "SequenceName": "*tfl3d1_16ns", "ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SK", "SP", "MP"],
        "ScanOptions": "IR", "MRAcquisitionType": "3D", "RepetitionTime": 2300.0, "EchoTime": 2.98,
        "InversionTime": 900.0, "FlipAngle": 9.0, "NumberOfAverages": 1.0, "EchoNumbers": 1, "EchoTrainLength": 1,
        "PercentSampling": 100.0, "PercentPhaseFieldOfView": 93.75, "PixelBandwidth": 240.0,
        "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
    },
    "GE": {
        "SeriesDescription": "Sag T1 BRAVO", "ProtocolName": "BRAIN 3D T1", "SequenceName": "efgre3d",
        "ScanningSequence": ["GR", "IR"], "SequenceVariant": ["SS", "SK"],
        "ScanOptions": ["FAST_GEMS", "EDR_GEMS", "TRF_GEMS", "ACC_GEMS", "PFF"], "MRAcquisitionType": "3D",
        "RepetitionTime": 8.156, "EchoTime": 3.18, "InversionTime": 450.0, "FlipAngle": 12.0,
        "NumberOfAverages": 1.0, "EchoNumbers": 1, "EchoTrainLength": 1, "PercentSampling": 100.0,
        "PercentPhaseFieldOfView": 100.0, "PixelBandwidth": 244.141, "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
    },
    "PHILIPS": {
        "SeriesDescription": "T1W_3D_TFE", "ProtocolName": "WIP T1W_3D_TFE SENSE", "SequenceName": "",
        "ScanningSequence": "GR", "SequenceVariant": ["SK", "MP"], "ScanOptions": "OTHER",
        "MRAcquisitionType": "3D", "RepetitionTime": 8.1, "EchoTime": 3.7, "FlipAngle": 8.0,
        "NumberOfAverages": 1.0, "EchoNumbers": 1, "EchoTrainLength": 240,
        "PercentSampling": 100.0, "PercentPhaseFieldOfView": 100.0, "PixelBandwidth": 191.0,
        "ImageType": ["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
    },
}


@dataclass(frozen=True)
class Variant:
    """One scanner-like 3D T1 series (and its study).

    Parameters
    ----------
    name : str
        Key in :data:`VARIANTS`.
    vendor : {"SIEMENS", "GE", "PHILIPS"}
        Scanner and protocol headers.
    plane : {"sagittal", "axial", "coronal"}
        Slice orientation before ``tilt_deg``.
    shape : tuple of int
        Full size: columns, rows, slices.
    spacing : tuple of float
        Full size: column spacing (PixelSpacing[1]), row spacing (PixelSpacing[0]), slice spacing (mm).
    small_shape : tuple of int
        The affordable size (same field of view, coarser voxels; at least 100 along every axis).
    appearance : Appearance
        Subject, pose, bias, coil fall-off, noise.
    tilt_deg : tuple of float
        Obliquity of the slices: rotation about RAS x, y, z (degrees).
    fov_offset_mm : tuple of float
        Centre of the field of view relative to the head's centre (scanner RAS mm).
    slice_thickness : float or None
        SliceThickness when it differs from the slice spacing (full size).
    bits_stored : int
        12 or 16 (BitsAllocated is 16).
    signed : bool
        PixelRepresentation 1 (two's complement).
    rescale : tuple of float or None
        (RescaleSlope, RescaleIntercept): stored value = (value - intercept) / slope.
    transfer_syntax : str
        Explicit / implicit VR little endian or a lossless compressed syntax (a pydicom UID constant).
    enhanced : bool
        One Enhanced MR Image Storage multi-frame instance instead of single-frame MR images.
    zero_slices : int
        Edge slices at each end of the slab written as zeros (slab profile discarded by the scanner).
    zero_columns : int
        Columns at each side zero-filled (reduced phase field of view padded to the matrix).
    group : str or None
        Variants of one group have the same decoded pixels (copies in another syntax or IOD).
    full_in_default : bool
        Written at full size by the default test run (``make test``).
    localizer : bool
        A three-plane localizer series goes into the study too (the selector must skip it).
    headers : dict
        Protocol overrides (SeriesDescription, ...).
    note : str
        One line for the report.
    """

    name: str
    vendor: str
    plane: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    small_shape: tuple[int, int, int]
    appearance: Appearance
    tilt_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fov_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_thickness: float | None = None
    bits_stored: int = 12
    signed: bool = False
    rescale: tuple[float, float] | None = None
    transfer_syntax: UID = ExplicitVRLittleEndian
    enhanced: bool = False
    zero_slices: int = 0
    zero_columns: int = 0
    group: str | None = None
    full_in_default: bool = False
    localizer: bool = False
    headers: tuple[tuple[str, object], ...] = ()
    note: str = ""

    def grid(self, size: str = "small") -> SliceGrid:
        """The acquisition grid at ``size`` ("small" or "full")."""
        if size not in ("small", "full"):
            raise ValueError(f"size must be 'small' or 'full', not {size!r}")
        shape = self.shape if size == "full" else self.small_shape
        fov = [n * s for n, s in zip(self.shape, self.spacing, strict=True)]
        spacing = tuple(f / n for f, n in zip(fov, shape, strict=True)) if size == "small" else self.spacing
        centre = np.asarray(self.appearance.pose.translation_mm) + np.asarray(self.fov_offset_mm)
        return SliceGrid.centred(self.plane, self.tilt_deg, centre, spacing, shape)

    @property
    def storage(self) -> tuple[int, bool, tuple[float, float] | None]:
        """(bits_stored, signed, rescale): what decides the stored pixel values."""
        return self.bits_stored, self.signed, self.rescale


# ----------------------------------------------------------------------------------------------------------------
# Identity, pixels, datasets
# ----------------------------------------------------------------------------------------------------------------

#: Study date of every corpus study (one day per variant index).
STUDY_MONTH = "202603"


def corpus_uid(*parts: object) -> UID:
    """A UID derived from ``parts`` only (same parts, same UID; pydicom's root)."""
    return generate_uid(entropy_srcs=["tests.support.corpus", *map(str, parts)])


@dataclass(frozen=True)
class Identity:
    """Patient, study and series identity of a variant's study (synthetic)."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    study_instance_uid: UID
    study_id: str
    accession_number: str
    study_date: str
    study_time: str
    series_instance_uid: UID
    frame_of_reference_uid: UID


def identity(name: str) -> Identity:
    """The synthetic identity of a variant's study.

    Variants of one group share the subject (PatientID) but each is its own
    study, series and frame of reference.

    Parameters
    ----------
    name : str
        A key of :data:`VARIANTS`.

    Returns
    -------
    Identity
    """
    variant = VARIANTS[name]
    index = list(VARIANTS).index(name) + 1
    subjects = list(dict.fromkeys(v.group or v.name for v in VARIANTS.values()))
    subject = subjects.index(variant.group or variant.name) + 1
    birth_year = 1938 + 3 * subject
    return Identity(
        patient_name=f"Scanlike^Subject{subject:02d}", patient_id=f"SCANLIKE-{subject:04d}",
        patient_birth_date=f"{birth_year}{(subject % 12) + 1:02d}15", patient_sex="FM"[subject % 2],
        patient_age=f"{2026 - birth_year:03d}Y", study_instance_uid=corpus_uid(name, "study"),
        study_id=f"{index}", accession_number=f"SL{index:06d}", study_date=f"{STUDY_MONTH}{index:02d}",
        study_time=f"{8 + index % 9:02d}{(7 * index) % 60:02d}15.250000",
        series_instance_uid=corpus_uid(name, "series"),
        frame_of_reference_uid=corpus_uid(name, "frame-of-reference"))


def quantise(image: Array, bits_stored: int, signed: bool, rescale: tuple[float, float] | None) -> NDArray[np.integer]:
    """Stored pixel values: ``(value - intercept) / slope``, rounded and clipped to the bit depth.

    Parameters
    ----------
    image : numpy.ndarray
        Values in real-world (scanner) units.
    bits_stored : int
        BitsStored.
    signed : bool
        PixelRepresentation 1.
    rescale : tuple of float or None
        (slope, intercept).

    Returns
    -------
    numpy.ndarray
        ``int16`` when signed, else ``uint16``.
    """
    slope, intercept = rescale or (1.0, 0.0)
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)
    stored = np.clip(np.rint((image - intercept) / slope), lo, hi)
    return stored.astype(np.int16 if signed else np.uint16)


@functools.lru_cache(maxsize=2)
def _stored_pixels(pixel_variant: Variant, size: str) -> NDArray[np.integer]:
    grid = pixel_variant.grid(size)
    image = render(pixel_variant.appearance, grid.ras_affine(), grid.shape)
    # the zero-filled edges keep their width in mm at either size
    slices = round(pixel_variant.zero_slices * grid.shape[2] / pixel_variant.shape[2])
    columns = round(pixel_variant.zero_columns * grid.shape[0] / pixel_variant.shape[0])
    if slices:
        image[:, :, :slices] = 0
        image[:, :, -slices:] = 0
    if columns:
        image[:columns] = 0
        image[-columns:] = 0
    stored = quantise(image, *pixel_variant.storage)
    stored.setflags(write=False)
    return stored


def pixels(variant: Variant, size: str = "small") -> tuple[NDArray[np.integer], SliceGrid]:
    """The stored pixel values of a variant, indexed ``(column, row, slice)``, and its grid.

    Parameters
    ----------
    variant : Variant
        The series.
    size : {"small", "full"}
        Which grid.

    Returns
    -------
    tuple
        ``(stored, grid)``; variants of one group (same appearance, grid and
        storage) share the (read-only) array.
    """
    pixel_variant = dataclasses.replace(
        variant, name="", group=None, transfer_syntax=ExplicitVRLittleEndian, enhanced=False,
        full_in_default=False, localizer=False, headers=(), note="")
    return _stored_pixels(pixel_variant, size), variant.grid(size)


def _ds(value: float, decimals: int = 6) -> str:
    """A DS string (at most 16 characters) as a scanner writes it."""
    for d in range(decimals, -1, -1):
        text = f"{value:.{d}f}".rstrip("0").rstrip(".") if d else f"{value:.0f}"
        if text in ("-0", ""):
            text = "0"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a DS")


def _later(time: str, seconds: int) -> str:
    """A DICOM TM ``HHMMSS.ffffff`` some seconds after ``time``."""
    total = int(time[:2]) * 3600 + int(time[2:4]) * 60 + int(time[4:6]) + seconds
    return f"{total // 3600 % 24:02d}{total // 60 % 60:02d}{total % 60:02d}{time[6:]}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _header_values(variant: Variant) -> dict[str, object]:
    values: dict[str, object] = {**SCANNERS[variant.vendor], **PROTOCOLS[variant.vendor]}
    values.update(dict(variant.headers))
    return values


def _common(variant: Variant, ident: Identity, sop_class: UID, sop_instance: UID, series_number: int,
            series_uid: UID, description: str) -> Dataset:
    """Patient, study, series, frame of reference, equipment and SOP common attributes."""
    scanner = SCANNERS[variant.vendor]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
    ds.StudyTime = ident.study_time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = _later(ident.study_time, 60 * series_number + 7)
    ds.AccessionNumber = ident.accession_number
    ds.Modality = "MR"
    ds.Manufacturer = scanner["Manufacturer"]
    ds.InstitutionName = "Scanlike Imaging Centre"
    ds.ReferringPhysicianName = ""
    ds.StationName = scanner["StationName"]
    ds.StudyDescription = {"SIEMENS": "Neuro^Head", "GE": "MR BRAIN WO CONTRAST", "PHILIPS": "BRAIN"}[variant.vendor]
    ds.SeriesDescription = description
    ds.ManufacturerModelName = scanner["ManufacturerModelName"]
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.IssuerOfPatientID = "SCANLIKE"
    ds.PatientBirthDate = ident.patient_birth_date
    ds.PatientSex = ident.patient_sex
    ds.PatientAge = ident.patient_age
    ds.PatientWeight = "72"
    ds.BodyPartExamined = "BRAIN" if variant.vendor == "PHILIPS" else "HEAD"
    ds.DeviceSerialNumber = scanner["DeviceSerialNumber"]
    ds.SoftwareVersions = scanner["SoftwareVersions"]
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = ident.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ident.study_id
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = ident.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    return ds


def _pixel_module(ds: Dataset, rows: int, columns: int, bits_stored: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)


def _window(stored: NDArray[np.integer], rescale: tuple[float, float] | None) -> tuple[str, str]:
    slope, intercept = rescale or (1.0, 0.0)
    sample = stored[::4, ::4, ::4].astype(np.float64) * slope + intercept
    hi = float(np.percentile(sample, 99.5))
    return _ds(round(hi / 2)), _ds(round(hi))


_PROTOCOL_KEYWORDS = ("ProtocolName", "SequenceName", "ScanningSequence", "SequenceVariant", "ScanOptions",
                      "MRAcquisitionType", "RepetitionTime", "EchoTime", "InversionTime", "NumberOfAverages",
                      "ImagingFrequency", "EchoNumbers", "MagneticFieldStrength", "EchoTrainLength",
                      "PercentSampling", "PercentPhaseFieldOfView", "PixelBandwidth", "TransmitCoilName",
                      "ReceiveCoilName", "FlipAngle")


def single_frame_series(variant: Variant, ident: Identity, size: str = "small") -> list[Dataset]:
    """MR Image Storage instances, one per slice, in slice order (along the normal)."""
    stored, grid = pixels(variant, size)
    values = _header_values(variant)
    thickness = grid.spacing[2] if variant.slice_thickness is None or size == "small" else variant.slice_thickness
    center, width = _window(stored, variant.rescale)
    n_cols, n_rows, n_slices = grid.shape
    iop = [_ds(v, 8) for v in (*grid.row_dir, *grid.col_dir)]
    datasets = []
    for k in range(n_slices):
        ds = _common(variant, ident, MRImageStorage, corpus_uid(variant.name, "image", size, k), 3,
                     ident.series_instance_uid, str(values["SeriesDescription"]))
        ds.ImageType = values["ImageType"]
        for keyword in _PROTOCOL_KEYWORDS:
            value = values.get(keyword)
            if value is not None:
                setattr(ds, keyword, value)
        ds.SliceThickness = _ds(thickness)
        if variant.vendor != "SIEMENS":
            ds.SpacingBetweenSlices = _ds(grid.spacing[2])
        if variant.vendor == "GE":
            ds.ImagesInAcquisition = n_slices
        ds.AcquisitionMatrix = [0, n_rows, n_cols, 0] if variant.plane == "sagittal" else [n_cols, 0, 0, n_rows]
        ds.InPlanePhaseEncodingDirection = "ROW" if variant.plane == "sagittal" else "COL"
        ds.InstanceNumber = k + 1
        position = grid.position(k)
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = iop
        ds.SliceLocation = _ds(float(position @ grid.normal))
        _pixel_module(ds, n_rows, n_cols, variant.bits_stored, variant.signed)
        ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[0])]
        ds.WindowCenter, ds.WindowWidth = center, width
        if variant.rescale is not None:
            ds.RescaleIntercept = _ds(variant.rescale[1])
            ds.RescaleSlope = _ds(variant.rescale[0])
            ds.RescaleType = "US"
        frame = np.ascontiguousarray(stored[:, :, k].T)
        ds.PixelData = frame.astype(frame.dtype.newbyteorder("<")).tobytes()
        datasets.append(ds)
    return datasets


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def enhanced_instance(variant: Variant, ident: Identity, size: str = "small") -> Dataset:
    """One Enhanced MR Image Storage instance holding every slice as a frame.

    Geometry as the node reads it: ``PlanePositionSequence`` per frame,
    ``PlaneOrientationSequence`` and ``PixelMeasuresSequence`` shared; the
    protocol in the MR functional group macros.
    """
    stored, grid = pixels(variant, size)
    values = _header_values(variant)
    n_cols, n_rows, n_slices = grid.shape
    thickness = grid.spacing[2] if variant.slice_thickness is None or size == "small" else variant.slice_thickness
    ds = _common(variant, ident, EnhancedMRImageStorage, corpus_uid(variant.name, "enhanced", size), 3,
                 ident.series_instance_uid, str(values["SeriesDescription"]))
    for keyword in ("AcquisitionDate", "AcquisitionTime", "AcquisitionNumber"):
        delattr(ds, keyword)
    acquired = f"{ident.study_date}{ds.ContentTime}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.AcquisitionDateTime = acquired
    ds.AcquisitionDuration = 312.5
    ds.InstanceNumber = 1
    ds.NumberOfFrames = n_slices
    _pixel_module(ds, n_rows, n_cols, variant.bits_stored, variant.signed)
    # Enhanced MR Image module
    ds.ContentQualification = "PRODUCT"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = values["MagneticFieldStrength"]
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T1"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    # MR Pulse Sequence module
    ds.PulseSequenceName = str(values.get("SequenceName") or "tfl3d1").lstrip("*")
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "PARTIAL"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    # Acquisition Context, Multi-frame Dimension
    ds.AcquisitionContextSequence = DicomSequence()
    organization = corpus_uid(variant.name, "dimension-organization", size)
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=organization)])
    ds.DimensionIndexSequence = DicomSequence([
        _item(DimensionOrganizationUID=organization, DimensionIndexPointer=0x00209056,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=organization, DimensionIndexPointer=0x00209057,
              FunctionalGroupPointer=0x00209111, DimensionDescriptionLabel="In-Stack Position Number"),
    ])
    ds.DimensionOrganizationType = "3D"
    center, width = _window(stored, variant.rescale)
    slope, intercept = variant.rescale or (1.0, 0.0)
    inversion: dict[str, object] = {"InversionRecovery": "NO"}
    if values.get("InversionTime") is not None:
        inversion = {"InversionRecovery": "YES", "InversionTimes": [values["InversionTime"]]}
    shared = _item(
        PixelMeasuresSequence=DicomSequence([_item(
            PixelSpacing=[_ds(grid.spacing[1]), _ds(grid.spacing[0])], SliceThickness=_ds(thickness),
            SpacingBetweenSlices=_ds(grid.spacing[2]))]),
        PlaneOrientationSequence=DicomSequence([_item(
            ImageOrientationPatient=[_ds(v, 8) for v in (*grid.row_dir, *grid.col_dir)])]),
        FrameAnatomySequence=DicomSequence([_item(
            AnatomicRegionSequence=DicomSequence([_code("12738006", "SCT", "Brain")]), FrameLaterality="U")]),
        PixelValueTransformationSequence=DicomSequence([_item(
            RescaleIntercept=_ds(intercept), RescaleSlope=_ds(slope), RescaleType="US")]),
        FrameVOILUTSequence=DicomSequence([_item(WindowCenter=center, WindowWidth=width)]),
        MRImageFrameTypeSequence=DicomSequence([_item(
            FrameType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE",
            ComplexImageComponent="MAGNITUDE", AcquisitionContrast="T1")]),
        MRTimingAndRelatedParametersSequence=DicomSequence([_item(
            RepetitionTime=values["RepetitionTime"], FlipAngle=values["FlipAngle"],
            EchoTrainLength=values["EchoTrainLength"], RFEchoTrainLength=1, GradientEchoTrainLength=1,
            GradientOutputType="DB_DT", GradientOutput=42.5,
            SpecificAbsorptionRateSequence=DicomSequence([_item(
                SpecificAbsorptionRateDefinition="IEC_WHOLE_BODY", SpecificAbsorptionRateValue=0.06)]),
            OperatingModeSequence=DicomSequence([_item(OperatingModeType="STATIC FIELD", OperatingMode="IEC_NORMAL")]),
        )]),
        MRFOVGeometrySequence=DicomSequence([_item(
            InPlanePhaseEncodingDirection="ROW" if variant.plane == "sagittal" else "COLUMN",
            MRAcquisitionFrequencyEncodingSteps=n_rows if variant.plane == "sagittal" else n_cols,
            MRAcquisitionPhaseEncodingStepsInPlane=n_cols if variant.plane == "sagittal" else n_rows,
            MRAcquisitionPhaseEncodingStepsOutOfPlane=n_slices, PercentSampling=values["PercentSampling"],
            PercentPhaseFieldOfView=values["PercentPhaseFieldOfView"])]),
        MREchoSequence=DicomSequence([_item(EffectiveEchoTime=values["EchoTime"])]),
        MRModifierSequence=DicomSequence([_item(
            **inversion, FlowCompensation="NONE",
            T2Preparation="NO", SpatialPresaturation="NONE", SpectrallySelectedExcitation="NONE",
            PartialFourier="NO", ParallelAcquisition="YES",
            ParallelAcquisitionTechnique="OTHER", ParallelReductionFactorInPlane=2.0,
            ParallelReductionFactorOutOfPlane=1.0, ParallelReductionFactorSecondInPlane=1.0)]),
        MRImagingModifierSequence=DicomSequence([_item(
            MagnetizationTransfer="NONE", BloodSignalNulling="NO", Tagging="NONE",
            TransmitterFrequency=values["ImagingFrequency"], PixelBandwidth=values["PixelBandwidth"])]),
        MRReceiveCoilSequence=DicomSequence([_item(
            ReceiveCoilName=values["ReceiveCoilName"], ReceiveCoilManufacturerName=values["Manufacturer"],
            ReceiveCoilType="MULTICOIL", QuadratureReceiveCoil="NO",
            MultiCoilDefinitionSequence=DicomSequence([_item(MultiCoilElementName="HEA;HEP",
                                                             MultiCoilElementUsed="YES")]))]),
        MRTransmitCoilSequence=DicomSequence([_item(
            TransmitCoilName=values["TransmitCoilName"], TransmitCoilManufacturerName=values["Manufacturer"],
            TransmitCoilType="BODY")]),
        MRAveragesSequence=DicomSequence([_item(NumberOfAverages=values["NumberOfAverages"])]),
    )
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    for k in range(n_slices):
        frames.append(_item(
            FrameContentSequence=DicomSequence([_item(
                FrameAcquisitionNumber=1, FrameReferenceDateTime=acquired, FrameAcquisitionDateTime=acquired,
                FrameAcquisitionDuration=312500.0, StackID="1", InStackPositionNumber=k + 1,
                DimensionIndexValues=[1, k + 1])]),
            PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=[_ds(v) for v in grid.position(k)])]),
        ))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    volume = np.ascontiguousarray(np.transpose(stored, (2, 1, 0)))  # (frames, rows, columns)
    ds.PixelData = volume.astype(volume.dtype.newbyteorder("<")).tobytes()
    return ds


def localizer_series(variant: Variant, ident: Identity) -> list[Dataset]:
    """A three-plane 2D localizer (Siemens "localizer"): the selector must pass it over."""
    values = {**SCANNERS[variant.vendor], "SeriesDescription": "localizer", "ProtocolName": "localizer",
              "SequenceName": "*fl2d1", "ScanningSequence": "GR", "SequenceVariant": ["SP", "OSP"],
              "ScanOptions": "", "MRAcquisitionType": "2D", "RepetitionTime": 8.6, "EchoTime": 4.0,
              "FlipAngle": 20.0, "NumberOfAverages": 1.0, "EchoNumbers": 1, "EchoTrainLength": 1,
              "PercentSampling": 100.0, "PercentPhaseFieldOfView": 100.0, "PixelBandwidth": 320.0}
    series_uid = corpus_uid(variant.name, "localizer-series")
    centre = variant.appearance.pose.translation_mm
    datasets = []
    for n, plane in enumerate(("sagittal", "coronal", "axial")):
        grid = SliceGrid.centred(plane, (0.0, 0.0, 0.0), centre, (1.6, 1.6, 7.0), (160, 160, 1))
        image = render(variant.appearance, grid.ras_affine(), grid.shape)
        stored = quantise(image, 12, False, None)
        ds = _common(variant, ident, MRImageStorage, corpus_uid(variant.name, "localizer", n), 1, series_uid,
                     "localizer")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"]
        for keyword in _PROTOCOL_KEYWORDS:
            if values.get(keyword) is not None:
                setattr(ds, keyword, values[keyword])
        ds.SliceThickness = "7"
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [_ds(v) for v in grid.position(0)]
        ds.ImageOrientationPatient = [_ds(v, 8) for v in (*grid.row_dir, *grid.col_dir)]
        ds.SliceLocation = _ds(float(grid.position(0) @ grid.normal))
        _pixel_module(ds, 160, 160, 12, False)
        ds.PixelSpacing = ["1.6", "1.6"]
        frame = np.ascontiguousarray(stored[:, :, 0].T)
        ds.PixelData = frame.astype("<u2").tobytes()
        datasets.append(ds)
    return datasets


def _save(ds: Dataset, path: Path, transfer_syntax: UID) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    if transfer_syntax.is_compressed:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    else:
        meta.TransferSyntaxUID = transfer_syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def datasets(name: str, size: str = "small") -> list[Dataset]:
    """The T1 series of a variant as datasets (uncompressed), in slice order."""
    variant = VARIANTS[name]
    ident = identity(name)
    if variant.enhanced:
        return [enhanced_instance(variant, ident, size)]
    return single_frame_series(variant, ident, size)


def write_variant(name: str, out_dir: Path, size: str = "small") -> list[Path]:
    """Write a variant's study: its 3D T1 series (and a localizer where the variant has one).

    Parameters
    ----------
    name : str
        A key of :data:`VARIANTS`.
    out_dir : Path
        Files go to ``out_dir / name / "t1"`` (and ``.../"localizer"``).
    size : {"small", "full"}
        The affordable grid or the scanner's.

    Returns
    -------
    list of Path
        Every file written (T1 instances first, in slice order).
    """
    variant = VARIANTS[name]
    root = Path(out_dir) / name
    written = [_save(ds, root / "t1" / f"IM{n + 1:05d}.dcm", variant.transfer_syntax)
               for n, ds in enumerate(datasets(name, size))]
    if variant.localizer:
        ident = identity(name)
        written += [_save(ds, root / "localizer" / f"IM{n + 1:05d}.dcm", ExplicitVRLittleEndian)
                    for n, ds in enumerate(localizer_series(variant, ident))]
    return written


def variant_size(name: str, full: bool = False) -> str:
    """The size a test run writes: every variant at full size with ``full``, else small except the chosen ones."""
    return "full" if full or VARIANTS[name].full_in_default else "small"


# ----------------------------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------------------------


def _look(source: str, seed: int, rotation: tuple[float, float, float], shift: tuple[float, float, float],
          scale: float, **kwargs: float) -> Appearance:
    return Appearance(source=source, pose=Pose(rotation, shift, scale), seed=seed, **kwargs)


_SIEMENS_MPRAGE = Variant(
    name="siemens_sag_mprage_176x240x256", vendor="SIEMENS", plane="sagittal", shape=(240, 256, 176),
    spacing=(1.0, 1.0, 1.0), small_shape=(179, 191, 131), fov_offset_mm=(0.0, 0.0, 10.0),
    appearance=_look("colin27", 11, (6.0, -4.0, 9.0), (4.0, -14.0, 22.0), 1.03, white_level=900.0, noise=0.025,
                     bias_amplitude=0.25),
    group="siemens_mprage", localizer=True,
    note="Siemens Prisma sagittal MPRAGE 240x256, 176 slices, 12-bit, explicit VR, with a localizer")

_VARIANT_LIST = [
    _SIEMENS_MPRAGE,
    dataclasses.replace(_SIEMENS_MPRAGE, name="siemens_sag_mprage_implicit", transfer_syntax=ImplicitVRLittleEndian,
                        localizer=False, note="the Siemens MPRAGE, implicit VR little endian"),
    dataclasses.replace(_SIEMENS_MPRAGE, name="siemens_enhanced_mr", enhanced=True, localizer=False,
                        note="the Siemens MPRAGE as one Enhanced MR Image Storage instance"),
    dataclasses.replace(_SIEMENS_MPRAGE, name="siemens_jpegls", transfer_syntax=JPEGLSLossless, localizer=False,
                        note="the Siemens MPRAGE, JPEG-LS lossless"),
    dataclasses.replace(_SIEMENS_MPRAGE, name="siemens_j2k", transfer_syntax=JPEG2000Lossless, localizer=False,
                        note="the Siemens MPRAGE, JPEG 2000 lossless"),
    dataclasses.replace(_SIEMENS_MPRAGE, name="siemens_rle", transfer_syntax=RLELossless, localizer=False,
                        note="the Siemens MPRAGE, RLE lossless"),
    Variant(
        name="ge_ax_bravo_172_implicit", vendor="GE", plane="axial", shape=(256, 256, 172),
        spacing=(0.9375, 0.9375, 1.0), small_shape=(181, 181, 127), fov_offset_mm=(0.0, 0.0, 8.0),
        appearance=_look("colin27", 21, (-10.0, 3.0, -5.0), (-12.0, 20.0, -8.0), 0.95, white_level=1800.0,
                         noise=0.03, bias_amplitude=0.2),
        bits_stored=16, signed=True, transfer_syntax=ImplicitVRLittleEndian, full_in_default=True,
        headers=(("SeriesDescription", "Ax T1 BRAVO"), ("ProtocolName", "BRAIN 3D T1 AX")),
        note="GE MR750 axial BRAVO 256x256 at 0.94 mm, 172 slices, signed 16-bit, implicit VR"),
    Variant(
        name="philips_cor_tfe_oblique12_rescale", vendor="PHILIPS", plane="coronal", tilt_deg=(12.0, 0.0, 0.0),
        shape=(224, 256, 181), spacing=(1.0, 1.0, 1.2), small_shape=(167, 191, 161),
        appearance=_look("mni152", 31, (-8.0, 5.0, 4.0), (10.0, -6.0, 15.0), 1.05, white_level=1400.0,
                         noise=0.025, bias_amplitude=0.3),
        rescale=(1.406, 0.0), zero_slices=3, full_in_default=True,
        headers=(("SeriesDescription", "T1W_3D_TFE_cor"), ("ProtocolName", "WIP T1W_3D_TFE cor SENSE")),
        note="Philips Ingenia coronal T1 TFE tilted 12 deg, 1x1x1.2 mm, RescaleSlope 1.406, 12-bit, zero edge slices"),
    Variant(
        name="siemens_sag_160x224x256_16bit", vendor="SIEMENS", plane="sagittal", shape=(224, 256, 160),
        spacing=(1.0, 1.0, 1.2), small_shape=(167, 191, 139), fov_offset_mm=(0.0, 0.0, 10.0),
        appearance=_look("colin27", 41, (-14.0, 12.0, -8.0), (-25.0, 8.0, -20.0), 0.93, white_level=14000.0,
                         noise=0.02, bias_amplitude=0.25),
        bits_stored=16,
        headers=(("SeriesDescription", "MPRAGE_ADNI_1.2mm"), ("ProtocolName", "MPRAGE ADNI"),
                 ("RepetitionTime", 2300.0), ("EchoTime", 2.95), ("InversionTime", 900.0)),
        note="Siemens sagittal ADNI-style MPRAGE 224x256, 160 slices of 1.2 mm, 16-bit, pose 14 deg / 25 mm"),
    Variant(
        name="ge_sag_bravo_172x256x256", vendor="GE", plane="sagittal", tilt_deg=(0.0, 0.0, 6.0),
        shape=(256, 256, 172), spacing=(1.0, 1.0, 1.0), small_shape=(191, 191, 127), slice_thickness=1.2,
        appearance=_look("mni152", 51, (9.0, -13.0, 14.0), (28.0, -25.0, 27.0), 1.06, white_level=2200.0,
                         noise=0.03, bias_amplitude=0.25),
        bits_stored=16, signed=True,
        headers=(("SeriesDescription", "Sag IR-FSPGR BRAVO"), ("ProtocolName", "ADNI3 Sag IR-FSPGR")),
        note="GE sagittal IR-FSPGR 256x256, 172 slices (1.2 mm thick, 1.0 mm apart), 6 deg yaw, head 28 mm off"),
    Variant(
        name="ge_ax_bravo_double_oblique_0p9", vendor="GE", plane="axial", tilt_deg=(15.0, 0.0, 8.0),
        shape=(267, 267, 165), spacing=(0.9, 0.9, 1.1), small_shape=(179, 179, 133), fov_offset_mm=(0.0, 0.0, 8.0),
        appearance=_look("colin27", 61, (3.0, -6.0, 12.0), (-5.0, 30.0, 10.0), 1.07, white_level=1600.0,
                         noise=0.035, bias_amplitude=0.2),
        bits_stored=16, signed=True, zero_columns=20,
        headers=(("SeriesDescription", "Ax T1 BRAVO ACPC"), ("ProtocolName", "BRAIN 3D T1 ACPC")),
        note="GE axial BRAVO double oblique (15 deg, 8 deg), 0.9 mm in-plane, 1.1 mm slices, zero-filled phase edges"),
    Variant(
        name="philips_sag_tfe_150x182x165", vendor="PHILIPS", plane="sagittal", shape=(182, 165, 150),
        spacing=(1.2, 1.2, 1.2), small_shape=(182, 165, 150), fov_offset_mm=(0.0, 0.0, 15.0),
        appearance=_look("colin27", 71, (-5.0, -9.0, -12.0), (15.0, 12.0, -28.0), 0.98, white_level=2600.0,
                         noise=0.03, bias_amplitude=0.25),
        rescale=(2.43, 0.0),
        headers=(("SeriesDescription", "sT1W_3D_TFE"), ("ProtocolName", "sT1W_3D_TFE")),
        note="Philips sagittal T1 TFE 182x165, 150 slices, 1.2 mm isotropic, RescaleSlope 2.43"),
    Variant(
        name="siemens_cor_mprage_oblique", vendor="SIEMENS", plane="coronal", tilt_deg=(-14.0, 0.0, 7.0),
        shape=(240, 240, 197), spacing=(1.0, 1.0, 1.1), small_shape=(179, 179, 161),
        appearance=_look("mni152", 81, (12.0, 7.0, -3.0), (-18.0, -22.0, 5.0), 0.96, white_level=1000.0,
                         noise=0.025, bias_amplitude=0.2),
        localizer=True,
        headers=(("SeriesDescription", "t1_mprage_cor_p2"), ("ProtocolName", "t1_mprage_cor_p2")),
        note="Siemens coronal MPRAGE double oblique (-14 deg, 7 deg), 1.1 mm slices, 12-bit, with a localizer"),
    Variant(
        name="ge_ax_bravo_strong_bias_noise", vendor="GE", plane="axial", shape=(256, 256, 176),
        spacing=(1.0, 1.0, 1.0), small_shape=(191, 191, 131), fov_offset_mm=(0.0, 0.0, -8.0),
        appearance=_look("colin27", 91, (14.0, 14.0, -14.0), (30.0, -30.0, -30.0), 1.08, white_level=1500.0,
                         noise=0.04, bias_amplitude=0.3, falloff_mm=75.0, falloff_width_mm=9.0),
        bits_stored=16, zero_slices=4,
        headers=(("SeriesDescription", "Ax T1 BRAVO"), ("ProtocolName", "BRAIN 3D T1 AX")),
        note="GE axial BRAVO, 30 % bias, 4 % noise, early coil fall-off, zero edge slices, pose 14 deg / 30 mm"),
]

#: Every variant by name.
VARIANTS: dict[str, Variant] = {v.name: v for v in _VARIANT_LIST}


def groups() -> dict[str, list[str]]:
    """Variants with the same decoded pixels, by group (groups of one left out)."""
    out: dict[str, list[str]] = {}
    for v in VARIANTS.values():
        if v.group:
            out.setdefault(v.group, []).append(v.name)
    return {k: names for k, names in out.items() if len(names) > 1}
