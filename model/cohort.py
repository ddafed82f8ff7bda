"""An ADNI-like synthetic cohort (volumes, notes, labels) for exercising training.

Every volume is made from one real brain (the MNI152 2009 template shipped with
nilearn, or Colin27 from mricron-data), put into the node's tensor contract (see
:mod:`pipeline.preprocess`: (D, H, W) = (inferior->superior, anterior->posterior,
right->left), template brain box centred in a 256^3 cube, [0, 1]) and average-pooled
to ``size``^3 (256 / size mm voxels).  Each subject then gets

* class-dependent atrophy of overlapping severity: the lateral ventricles are
  enlarged and the hippocampi and medial temporal lobes shrunk, by smooth local
  radial warps whose strength grows with a latent disease stage drawn around the
  class mean (CN < MCI < AD, with wide overlap) plus an age effect;
* subject variation: a random affine (rotation, scale, shift), a smooth
  multiplicative bias field and Gaussian noise, then min-max normalisation.

Notes carry class-dependent but overlapping findings (age, years of education,
memory complaints and who reports them, MMSE, CDR-SB), drawn independently of the
image's latent stage, so that image and note are complementary evidence.  They
never name the diagnosis.  Class proportions follow ADNI: AD 28 %, CN 30 %,
MCI 42 %.  Some subjects have a second visit (same label, same anatomy, new
acquisition), so a split must be made by subject.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from model.dataset import SYNTHETIC
from model.types import CLASSES
from pipeline.synth import load_reference_brain

logger = logging.getLogger(__name__)

#: ADNI class proportions.
CLASS_PROPORTIONS: dict[str, float] = {"AD": 0.28, "CN": 0.30, "MCI": 0.42}

#: The MNI152 2009 T1 brain template file in nilearn's data folder.
MNI152_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"

#: Edge of the node's tensor-contract cube.
CONTRACT_SIZE = 256

#: Words a note must never contain (the diagnosis or its synonyms).
FORBIDDEN_NOTE_WORDS = ("AD", "MCI", "CN", "alzheimer", "dementia", "cognitively normal",
                        "mild cognitive impairment", "diagnosis", "impairment")

#: Atrophy sites: (name, MNI x, y, z in mm, Gaussian radius in mm, sign: +1 enlarge, -1 shrink).
ATROPHY_SITES: tuple[tuple[str, float, float, float, float, int], ...] = (
    ("ventricle_left", -12.0, -10.0, 16.0, 20.0, +1),
    ("ventricle_right", 12.0, -10.0, 16.0, 20.0, +1),
    ("hippocampus_left", -28.0, -22.0, -14.0, 8.0, -1),
    ("hippocampus_right", 28.0, -22.0, -14.0, 8.0, -1),
    ("mtl_left", -28.0, -8.0, -28.0, 11.0, -1),
    ("mtl_right", 28.0, -8.0, -28.0, 11.0, -1),
)

#: Mean latent disease stage of each class (image and note are drawn around it independently).
STAGE_MEAN = {"CN": 0.0, "MCI": 0.5, "AD": 1.0}


@dataclass(frozen=True)
class CohortConfig:
    """Settings of :func:`generate_cohort`.

    Parameters
    ----------
    n_subjects : int
        Number of subjects.
    size : int
        Edge of the saved volumes (a divisor of 256; 64 gives 4 mm voxels).
    seed : int
        Seed of every random draw.
    reference : {"mni152", "colin27"}
        The real brain the volumes are made from.
    second_visit_fraction : float
        Fraction of subjects with a second scan.
    stage_sd : float
        Spread of the image's latent stage around its class mean (overlap).
    note_noise : float
        Multiplier of the spread of the note's findings around their class means.
    """

    n_subjects: int = 200
    size: int = 64
    seed: int = 0
    reference: str = "mni152"
    second_visit_fraction: float = 0.2
    stage_sd: float = 0.25
    note_noise: float = 1.25


@dataclass(frozen=True)
class CohortRow:
    """One scan of the cohort (a row of ``manifest.csv``).

    Parameters
    ----------
    subject_id, visit : str
        Identity of the subject and the visit.
    volume : str
        Path of the ``.npy`` volume, relative to the manifest's folder.
    note : str
        Clinical note (never the diagnosis).
    label : str
        Diagnosis, one of :data:`model.types.CLASSES`.
    stage : float
        Latent disease stage behind the image's atrophy.
    ventricle_scale, hippocampus_scale : float
        Strength of the ventricle enlargement and the hippocampal / medial temporal shrinkage.
    """

    subject_id: str
    visit: str
    volume: str
    note: str
    label: str
    stage: float
    ventricle_scale: float
    hippocampus_scale: float


def _reference_image(name: str) -> nib.Nifti1Image:
    """The reference brain as a NIfTI image.

    MNI152 is read straight from nilearn's data folder, which avoids importing
    ``nilearn.datasets`` (about 15 s of imports); Colin27 comes from
    :func:`pipeline.synth.load_reference_brain`.
    """
    if name == "mni152":
        spec = importlib.util.find_spec("nilearn")
        if spec is not None and spec.submodule_search_locations:
            path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / MNI152_FILE
            if path.is_file():
                return nib.Nifti1Image.from_filename(path)
    data, affine = load_reference_brain(name)
    return nib.Nifti1Image(data, affine)


def contract_reference(reference: str = "mni152", size: int = 64) -> tuple[NDArray[np.float32], dict[str, NDArray]]:
    """The reference brain in the tensor contract, pooled to ``size``^3, and its atrophy sites.

    Parameters
    ----------
    reference : str
        ``"mni152"`` or ``"colin27"`` (see :func:`pipeline.synth.load_reference_brain`).
    size : int
        Output edge; must divide 256.

    Returns
    -------
    tuple
        The volume (float32, (size,)*3, [0, 1]) and, per atrophy site, its centre
        in output voxel coordinates followed by its radius in output voxels.

    Raises
    ------
    ValueError
        When ``size`` does not divide 256.
    """
    if size <= 0 or CONTRACT_SIZE % size:
        raise ValueError(f"size {size} must divide {CONTRACT_SIZE}")
    img = nib.as_closest_canonical(_reference_image(reference))
    ras = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    nx, ny, _ = ras.shape
    vol = np.ascontiguousarray(ras.transpose(2, 1, 0)[:, ::-1, ::-1])  # (S, P, L) = (D, H, W)
    brain = vol > 0.05 * float(vol.max())
    nonzero = np.argwhere(brain)
    lo = np.maximum(nonzero.min(axis=0) - 8, 0)
    hi = np.minimum(nonzero.max(axis=0) + 9, vol.shape)
    cube = np.zeros((CONTRACT_SIZE,) * 3, dtype=np.float32)
    offset = np.zeros(3, dtype=np.int64)
    src, dst = [], []
    for a in range(3):
        length = int(hi[a] - lo[a])
        start = int(lo[a]) + max(length - CONTRACT_SIZE, 0) // 2
        length = min(length, CONTRACT_SIZE)
        pad = (CONTRACT_SIZE - length) // 2
        src.append(slice(start, start + length))
        dst.append(slice(pad, pad + length))
        offset[a] = pad - start
    cube[tuple(dst)] = vol[tuple(src)]
    clip = float(np.percentile(cube[cube > 0.05 * float(cube.max())], 99.9))
    cube = np.clip(cube / clip, 0.0, 1.0)
    f = CONTRACT_SIZE // size
    pooled = cube.reshape(size, f, size, f, size, f).mean(axis=(1, 3, 5)).astype(np.float32)
    inv = np.linalg.inv(np.asarray(img.affine, dtype=np.float64))
    sites: dict[str, NDArray] = {}
    for name, x, y, z, radius, _ in ATROPHY_SITES:
        i, j, k = (inv @ np.array([x, y, z, 1.0]))[:3]
        idx256 = np.array([k, ny - 1 - j, nx - 1 - i]) + offset
        sites[name] = np.append((idx256 + 0.5) / f - 0.5, radius / f)
    return pooled, sites


def ventricle_distance(reference: NDArray[np.float32], sites: dict[str, NDArray]) -> tuple[NDArray, float]:
    """Distance (voxels) of every voxel to the lateral ventricles, and the CSF intensity.

    The ventricles are the dark (CSF) voxels of the brain's interior within about
    three site radii of the two ventricle sites.

    Parameters
    ----------
    reference : numpy.ndarray
        From :func:`contract_reference`.
    sites : dict
        Its atrophy sites.

    Returns
    -------
    tuple
        Euclidean distance map (0 inside the ventricles) and the mean CSF intensity.
    """
    grid = np.indices(reference.shape, dtype=np.float32)
    near = np.zeros(reference.shape, dtype=bool)
    for name in ("ventricle_left", "ventricle_right"):
        centre, radius = sites[name][:3], float(sites[name][3])
        near |= ((grid - centre[:, None, None, None].astype(np.float32)) ** 2).sum(axis=0) < (1.5 * radius) ** 2
    interior = ndimage.binary_erosion(reference > 0.1, iterations=max(1, reference.shape[0] // 32))
    mask = near & interior & (reference < 0.35)
    if not mask.any():
        return np.full(reference.shape, np.inf, dtype=np.float32), 0.0
    csf = float(reference[mask].mean())
    return ndimage.distance_transform_edt(~mask).astype(np.float32), csf


def _bias_field(rng: np.random.Generator, size: int, strength: float) -> NDArray[np.float32]:
    """A smooth multiplicative field exp(quadratic polynomial), mean about 1."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    terms = (x, y, z, x * y, y * z, x * z, x * x, y * y, z * z)
    log_field = sum(float(rng.normal(0.0, strength)) * t for t in terms)
    return np.exp(np.asarray(log_field, dtype=np.float32))


@dataclass
class Anatomy:
    """The reference brain and what every subject's atrophy is computed from (see :func:`anatomy`).

    Parameters
    ----------
    reference : numpy.ndarray
        From :func:`contract_reference`.
    sites : dict
        Its atrophy sites.
    ventricle_distance : numpy.ndarray
        Distance to the ventricles (voxels).
    csf : float
        Mean CSF intensity.
    site_weights : dict
        Gaussian weight map of each site.
    site_offsets : dict
        Offset of every voxel from each site's centre, (3, D, H, W).
    """

    reference: NDArray[np.float32]
    sites: dict[str, NDArray]
    ventricle_distance: NDArray[np.float32]
    csf: float
    site_weights: dict[str, NDArray[np.float32]]
    site_offsets: dict[str, NDArray[np.float32]]


def anatomy(reference_name: str = "mni152", size: int = 64) -> Anatomy:
    """Precompute the reference, its sites, ventricle distances and site weights.

    Parameters
    ----------
    reference_name : str
        ``"mni152"`` or ``"colin27"``.
    size : int
        Volume edge.

    Returns
    -------
    Anatomy
        Shared by every subject of a cohort.
    """
    reference, sites = contract_reference(reference_name, size)
    distance, csf = ventricle_distance(reference, sites)
    grid = np.indices(reference.shape, dtype=np.float32)
    weights, offsets = {}, {}
    for name, *_ in ATROPHY_SITES:
        offsets[name] = grid - sites[name][:3].astype(np.float32)[:, None, None, None]
        weights[name] = np.exp(-(offsets[name] ** 2).sum(axis=0) / (2.0 * float(sites[name][3]) ** 2))
    return Anatomy(reference, sites, distance, csf, weights, offsets)


def subject_volume(
    anat: Anatomy,
    ventricle_scale: float,
    hippocampus_scale: float,
    rng: np.random.Generator,
) -> NDArray[np.float32]:
    """One subject's volume: atrophy, random affine, bias field and noise.

    Parameters
    ----------
    anat : Anatomy
        From :func:`anatomy`.
    ventricle_scale : float
        Ventricle enlargement (0: none; 0.5: clearly enlarged).
    hippocampus_scale : float
        Hippocampal and medial temporal shrinkage (0: none).
    rng : numpy.random.Generator
        Source of the subject variation.

    Returns
    -------
    numpy.ndarray
        float32, the reference's shape, [0, 1].
    """
    reference = anat.reference
    size = reference.shape[0]
    # tissue loss: the ventricles grow by partial-volume CSF around them, the
    # hippocampal / medial temporal regions lose tissue towards CSF intensity
    distance = anat.ventricle_distance
    grow = 3.5 * ventricle_scale * size / 64.0
    loss = np.clip(grow - distance + 0.5, 0.0, 1.0) * (distance > 0)
    for name, *_, sign in ATROPHY_SITES:
        if sign < 0:
            loss = np.maximum(loss, 0.8 * hippocampus_scale * anat.site_weights[name])
    reference = (reference * (1.0 - loss) + anat.csf * loss * (reference > 0.05)).astype(np.float32)
    # and the same structures are warped: enlarge by sampling closer to the centre, shrink farther out
    coords = np.indices(reference.shape, dtype=np.float32)
    for name, *_, sign in ATROPHY_SITES:
        scale = ventricle_scale if sign > 0 else hippocampus_scale
        coords -= sign * scale * anat.site_weights[name] * anat.site_offsets[name]
    angles = np.deg2rad(rng.normal(0.0, 2.5, size=3))
    rot = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = np.cos(angle), np.sin(angle)
        plane = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[plane[0], plane[0]], r[plane[0], plane[1]], r[plane[1], plane[0]], r[plane[1], plane[1]] = c, -s, s, c
        rot = rot @ r
    matrix = rot * rng.normal(1.0, 0.03)
    centre = np.full(3, (size - 1) / 2.0)
    shift = rng.normal(0.0, 0.5, size=3) * size / 64.0
    flat = coords.reshape(3, -1) - centre[:, None]
    warped_coords = (matrix @ flat + (centre + shift)[:, None]).reshape(coords.shape)
    out = ndimage.map_coordinates(reference, warped_coords, order=1, mode="constant", cval=0.0)
    out = out * _bias_field(rng, size, 0.06)
    head = out > 0.02
    out = out + head * rng.normal(0.0, float(rng.uniform(0.01, 0.03)), size=out.shape)
    out = np.clip(out, 0.0, None)
    return (out / max(float(out.max()), 1e-6)).astype(np.float32)


def _note(label: str, rng: np.random.Generator, noise: float, age: float) -> str:
    """A short EHR-like note with class-dependent, overlapping findings (never the diagnosis)."""
    mmse_mean = {"CN": 28.6, "MCI": 27.0, "AD": 24.0}[label]
    mmse_sd = {"CN": 1.3, "MCI": 1.9, "AD": 2.6}[label] * noise
    mmse = int(np.clip(round(rng.normal(mmse_mean, mmse_sd)), 12, 30))
    cdr_mean = {"CN": 0.2, "MCI": 1.4, "AD": 3.2}[label]
    cdr_sd = {"CN": 0.5, "MCI": 1.0, "AD": 1.5}[label] * noise
    cdr = float(np.clip(round(rng.normal(cdr_mean, cdr_sd) * 2) / 2, 0.0, 18.0))
    education = int(np.clip(round(rng.normal({"CN": 16.3, "MCI": 15.9, "AD": 15.2}[label], 2.8)), 6, 22))
    complaint_p = {"CN": (0.55, 0.35, 0.10), "MCI": (0.20, 0.50, 0.30), "AD": (0.10, 0.35, 0.55)}[label]
    complaint = ("no memory complaints", "occasional memory complaints", "frequent memory complaints")[
        int(rng.choice(3, p=complaint_p))
    ]
    informant = ("reported by the patient", "reported by the spouse", "reported by a daughter", "reported by a son")[
        int(rng.integers(4))
    ]
    sex = ("woman", "man")[int(rng.integers(2))]
    templates = (
        "{age}-year-old {sex}, {edu} years of education. {Complaint}, {informant}. MMSE {mmse}/30, CDR-SB {cdr}.",
        "Patient: {age}-year-old {sex} with {edu} years of schooling. History: {complaint} ({informant}). "
        "Cognitive testing: MMSE {mmse}/30; CDR sum of boxes {cdr}.",
        "Age {age}, {sex}. Education {edu} years. {Complaint}, {informant}. MMSE score {mmse} of 30. CDR-SB {cdr}.",
    )
    text = templates[int(rng.integers(len(templates)))].format(
        age=round(age), sex=sex, edu=education, complaint=complaint, Complaint=complaint.capitalize(),
        informant=informant, mmse=mmse, cdr=f"{cdr:.1f}",
    )
    return text[0].upper() + text[1:]


def draw_labels(n: int, rng: np.random.Generator) -> list[str]:
    """Class labels in ADNI proportions (largest-remainder rounding, then shuffled).

    Parameters
    ----------
    n : int
        Number of subjects.
    rng : numpy.random.Generator
        Shuffling source.

    Returns
    -------
    list of str
        ``n`` labels.
    """
    names = list(CLASS_PROPORTIONS)
    exact = np.array([CLASS_PROPORTIONS[c] * n for c in names])
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts))[: n - int(counts.sum())]:
        counts[i] += 1
    labels = [c for c, k in zip(names, counts, strict=True) for _ in range(int(k))]
    return [labels[i] for i in rng.permutation(n)]


def generate_cohort(out_dir: Path, config: CohortConfig) -> Path:
    """Write a synthetic cohort: ``volumes/*.npy`` (float16) and ``manifest.csv``.

    Parameters
    ----------
    out_dir : Path
        Destination folder (created).
    config : CohortConfig
        Size, resolution, seed, overlap.

    Returns
    -------
    Path
        The manifest file, columns ``subject_id, volume, note, label`` (what
        ``dicom-node train`` reads), ``preprocessing_version`` (``synthetic``: made in
        the tensor contract, not by the node's preprocessing) followed by the ground-truth columns
        ``visit, stage, ventricle_scale, hippocampus_scale``.
    """
    out_dir = Path(out_dir)
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    anat = anatomy(config.reference, config.size)
    labels = draw_labels(config.n_subjects, rng)
    rows: list[CohortRow] = []
    for number, label in enumerate(labels):
        subject = f"SYN{config.seed:03d}-{number:05d}"
        age = float(rng.normal({"CN": 73.0, "MCI": 73.0, "AD": 75.0}[label], 7.0))
        stage = float(rng.normal(STAGE_MEAN[label], config.stage_sd)) + 0.01 * (age - 73.0)
        visits = 2 if rng.random() < config.second_visit_fraction else 1
        for visit in range(visits):
            progressed = stage + 0.05 * visit * (STAGE_MEAN[label] + 0.2)
            ventricle = float(np.clip(0.15 + 0.35 * progressed, 0.0, 0.7))
            hippocampus = float(np.clip(0.10 + 0.30 * progressed, 0.0, 0.6))
            volume = subject_volume(anat, ventricle, hippocampus, rng)
            name = f"volumes/{subject}_v{visit + 1}.npy"
            np.save(out_dir / name, volume.astype(np.float16))
            rows.append(CohortRow(subject, f"v{visit + 1}", name, _note(label, rng, config.note_noise, age + visit),
                                  label, round(progressed, 4), round(ventricle, 4), round(hippocampus, 4)))
    manifest = out_dir / "manifest.csv"
    fields = ["subject_id", "volume", "note", "label", "preprocessing_version", "visit", "stage", "ventricle_scale",
              "hippocampus_scale"]
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{k: v for k, v in asdict(row).items() if k in fields},
                             "preprocessing_version": SYNTHETIC})
    counts = {c: labels.count(c) for c in CLASSES}
    logger.info("synthetic cohort: %d subjects, %d scans, %s, %d^3 -> %s", config.n_subjects, len(rows), counts,
                config.size, manifest)
    return manifest
