"""An honest baseline: logistic regression on a few image features and the note's numbers.

``dicom-node evaluate`` scores, beside every evaluated run and on the same split,
three multinomial logistic regressions (scikit-learn, L2, standardised
features, missing values replaced by the training median):

* **MRI features**: :data:`IMAGE_FEATURES`, computed by :func:`image_features` from
  the preprocessed volume the model sees (the manifest's ``.npy``);
* **note numbers**: :data:`NOTE_FEATURES`, read from the note by
  :func:`model.notenumbers.parse_note`, a small regular-expression parser -- the
  same one a model trained with ``--note-numbers`` reads its note-number vector
  with (the model's text tower reads the note's words either way);
* **both**: the two sets side by side.

Each is fitted on the run's training subjects only (the subjects the run trained
on plus those it held out to fit its temperature: everything the run was allowed to
learn from; never a test subject) and scored on the scans the run is evaluated on,
with the same subject-level bootstrap 95 % intervals as the run
(:func:`model.intervals.bootstrap_intervals`).  Nothing is tuned on labels: the
thresholds and boxes below were fixed from the reference brain's anatomy (the
atrophy sites of :mod:`model.cohort` lie inside the boxes), and the regression
keeps scikit-learn's defaults (``C = 1``, lbfgs; more iterations allowed).

Image features (intensities first divided by the 90th percentile of the brain's
voxels, about the white-matter level, so that a global gain does not matter; the
brain mask is the voxels above 10 % of that level, closed and hole-filled, so
internal CSF belongs to it; boxes are fractions of the brain mask's bounding box,
so they follow the head's size and position):

``csf_fraction``
    CSF-like voxels (normalised intensity below :data:`CSF_LEVEL`) over brain voxels.
``central_csf_fraction``
    The same within :data:`CENTRAL_BOX`, around the lateral ventricles.
``central_mean_intensity``
    Mean normalised intensity of the brain voxels in that box: the threshold-free
    version, for coarse volumes whose ventricles are all partial volume (at 8 mm
    voxels no voxel of the synthetic cohort's ventricles falls below
    :data:`CSF_LEVEL`).
``white_matter_fraction``
    Voxels above :data:`WHITE_MATTER_LEVEL` over brain voxels.
``mtl_mean_intensity``
    Mean normalised intensity of the brain voxels in the two medial temporal
    boxes (:data:`MTL_BOXES`, hippocampus and medial temporal lobe, left and right).
``mtl_csf_fraction``
    CSF-like voxels over brain voxels in those boxes.
``intracranial_fraction``
    Brain voxels over all voxels (head size; a covariate).

Note numbers (NaN when the note does not state them): ``age`` (years),
``education_years``, ``mmse`` (0-30), ``cdr_sb`` (CDR sum of boxes, 0-18) and
``memory_complaints`` (0 none, 1 occasional, 2 frequent).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from model.dataset import Sample, VolumeStore
from model.intervals import N_BOOTSTRAP, bootstrap_intervals, format_interval
from model.notenumbers import NOTE_FEATURES, parse_note
from model.types import CLASSES

logger = logging.getLogger(__name__)

#: Image features, in column order.
IMAGE_FEATURES: tuple[str, ...] = ("csf_fraction", "central_csf_fraction", "central_mean_intensity",
                                   "white_matter_fraction", "mtl_mean_intensity", "mtl_csf_fraction",
                                   "intracranial_fraction")

#: The three baselines and their columns.
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "MRI features": IMAGE_FEATURES,
    "note numbers": NOTE_FEATURES,
    "both": IMAGE_FEATURES + NOTE_FEATURES,
}

#: Percentile of the brain's intensities that normalisation divides by (about white matter).
REFERENCE_PERCENTILE = 90.0

#: Brain mask: normalised intensity above this (then closed and hole-filled).
BRAIN_LEVEL = 0.1

#: CSF-like: normalised intensity below this (the reference brain's ventricles average 0.31 of its maximum).
CSF_LEVEL = 0.4

#: White-matter-like: normalised intensity above this.
WHITE_MATTER_LEVEL = 0.85

#: Box around the lateral ventricles: (low, high) fractions of the brain's bounding box along (D, H, W) =
#: (inferior->superior, anterior->posterior, right->left).
CENTRAL_BOX: tuple[tuple[float, float], ...] = ((0.40, 0.72), (0.30, 0.62), (0.33, 0.67))

#: Medial temporal boxes (hippocampus and medial temporal lobe), right and left, same convention.
MTL_BOXES: tuple[tuple[tuple[float, float], ...], ...] = (
    ((0.20, 0.44), (0.36, 0.62), (0.20, 0.38)),
    ((0.20, 0.44), (0.36, 0.62), (0.62, 0.80)),
)

#: A class needs at least this many training scans for the baseline to be fitted.
MIN_TRAIN_PER_CLASS = 2

def _box(bounds: tuple[NDArray[np.int64], NDArray[np.int64]],
         fractions: tuple[tuple[float, float], ...]) -> tuple[slice, ...]:
    """A box given as fractions of a bounding box (lo, hi inclusive), as slices."""
    lo, hi = bounds
    extent = hi - lo + 1
    return tuple(slice(int(lo[a] + math.floor(f0 * extent[a])), int(lo[a] + math.ceil(f1 * extent[a])))
                 for a, (f0, f1) in enumerate(fractions))


def brain_mask(volume: NDArray[np.floating[Any]]) -> tuple[NDArray[np.bool_], NDArray[np.float32]]:
    """The brain mask and the intensity-normalised volume (see the module docstring).

    Parameters
    ----------
    volume : numpy.ndarray
        (D, H, W) preprocessed volume in [0, 1].

    Returns
    -------
    tuple
        Boolean mask (internal CSF included) and the volume divided by the 90th
        percentile of the brain's intensities.
    """
    vol = np.asarray(volume, dtype=np.float32)
    peak = float(vol.max())
    if peak <= 0.0:
        return np.zeros(vol.shape, dtype=bool), vol
    rough = vol > BRAIN_LEVEL * peak
    reference = float(np.percentile(vol[rough], REFERENCE_PERCENTILE))
    normalised = vol / reference
    iterations = max(1, min(vol.shape) // 32)
    closed = ndimage.binary_closing(np.pad(normalised > BRAIN_LEVEL, iterations), iterations=iterations)
    inner = tuple(slice(iterations, -iterations) for _ in range(3))
    return ndimage.binary_fill_holes(closed)[inner], normalised


def image_features(volume: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
    """The baseline's image features of one volume (:data:`IMAGE_FEATURES`).

    Parameters
    ----------
    volume : numpy.ndarray
        (D, H, W) preprocessed volume in [0, 1], as the model sees it.

    Returns
    -------
    numpy.ndarray
        (7,) float64, in :data:`IMAGE_FEATURES` order; NaN for an empty volume.
    """
    mask, normalised = brain_mask(volume)
    if not mask.any():
        return np.full(len(IMAGE_FEATURES), np.nan)
    found = np.argwhere(mask)
    bounds = (found.min(axis=0), found.max(axis=0))
    csf = mask & (normalised < CSF_LEVEL)
    central = _box(bounds, CENTRAL_BOX)
    mtl_brain = np.zeros(mask.shape, dtype=bool)
    for box in MTL_BOXES:
        mtl_brain[_box(bounds, box)] = True
    mtl_brain &= mask
    n_brain = float(mask.sum())
    n_central = float(mask[central].sum())
    n_mtl = float(mtl_brain.sum())
    return np.array([
        float(csf.sum()) / n_brain,
        float(csf[central].sum()) / n_central if n_central else np.nan,
        float(normalised[central][mask[central]].mean()) if n_central else np.nan,
        float((mask & (normalised > WHITE_MATTER_LEVEL)).sum()) / n_brain,
        float(normalised[mtl_brain].mean()) if n_mtl else np.nan,
        float((csf & mtl_brain).sum()) / n_mtl if n_mtl else np.nan,
        n_brain / mask.size,
    ], dtype=np.float64)


def _read_volume(path: Path) -> NDArray[np.float32]:
    """One volume, read and checked as the model's loader reads it (:class:`model.dataset.VolumeStore`)."""
    shape = np.load(path, mmap_mode="r").shape
    return VolumeStore([path], shape).load([0])[0, 0].numpy()


def feature_matrix(samples: Sequence[Sample], columns: Sequence[str],
                   cache: dict[Path, NDArray[np.float64]] | None = None) -> NDArray[np.float64]:
    """The features of some scans.

    Parameters
    ----------
    samples : sequence of Sample
        The scans.
    columns : sequence of str
        Names from :data:`IMAGE_FEATURES` and :data:`NOTE_FEATURES`.
    cache : dict, optional
        Image features by volume path, filled and reused (one evaluation reads each
        volume once).

    Returns
    -------
    numpy.ndarray
        (len(samples), len(columns)) float64, NaN where a value is missing.
    """
    cache = {} if cache is None else cache
    want_image = any(c in IMAGE_FEATURES for c in columns)
    rows = []
    for sample in samples:
        values: dict[str, float] = {}
        if want_image:
            if sample.volume not in cache:
                cache[sample.volume] = image_features(_read_volume(sample.volume))
            values.update(zip(IMAGE_FEATURES, cache[sample.volume].tolist(), strict=True))
        values.update(parse_note(sample.note))
        rows.append([values[c] for c in columns])
    return np.asarray(rows, dtype=np.float64).reshape(len(samples), len(columns))


def fit_predict(x_train: NDArray[np.float64], y_train: NDArray[np.int64], x_eval: NDArray[np.float64], *,
                seed: int = 0) -> NDArray[np.float64]:
    """Fit the logistic regression on training rows and give class probabilities of others.

    Parameters
    ----------
    x_train, y_train : numpy.ndarray
        (N, F) features (NaN: missing) and (N,) class indices into :data:`model.types.CLASSES`.
    x_eval : numpy.ndarray
        (M, F) features to score.
    seed : int
        ``random_state`` of the regression.

    Returns
    -------
    numpy.ndarray
        (M, len(CLASSES)) probabilities (0 for a class absent from training).
    """
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(),
                          LogisticRegression(C=1.0, max_iter=5000, random_state=seed))
    model.fit(x_train, y_train)
    probabilities = np.zeros((len(x_eval), len(CLASSES)), dtype=np.float64)
    if len(x_eval):
        probabilities[:, model.classes_] = model.predict_proba(x_eval)
    return probabilities


def skip_reason(train: Sequence[Sample], evaluated: Sequence[Sample]) -> str | None:
    """Why the baseline cannot be fitted and scored on this split; None when it can."""
    counts = {c: sum(s.label == k for s in train) for k, c in enumerate(CLASSES)}
    if min(counts.values()) < MIN_TRAIN_PER_CLASS:
        return (f"the training split has too few scans per class ({', '.join(f'{c} {n}' for c, n in counts.items())}"
                f"; at least {MIN_TRAIN_PER_CLASS} of each needed)")
    if not evaluated:
        return "no scans to score"
    return None


def run_baseline(train: Sequence[Sample], evaluated: Sequence[Sample], *, seed: int = 0,
                 n_boot: int = N_BOOTSTRAP,
                 cache: dict[Path, NDArray[np.float64]] | None = None) -> dict[str, Any]:
    """Fit the three baselines on training scans and score them on others.

    Parameters
    ----------
    train : sequence of Sample
        The run's training scans.
    evaluated : sequence of Sample
        The scans the run is evaluated on.
    seed : int
        Seed of the regression and of the bootstrap (use the run's bootstrap seed).
    n_boot : int
        Bootstrap replicates.
    cache : dict, optional
        Image features by volume path (see :func:`feature_matrix`).

    Returns
    -------
    dict
        ``{"skipped": reason}``, or ``train_scans``, ``train_subjects``,
        ``evaluated_scans``, ``evaluated_subjects``, ``features`` (:data:`FEATURE_SETS`)
        and ``results``: baseline name to ``{"intervals": ..., "coefficients_standardised": ...}``
        where ``intervals`` is :func:`model.intervals.bootstrap_intervals`'s output.
    """
    reason = skip_reason(train, evaluated)
    if reason is not None:
        logger.info("baseline skipped: %s", reason)
        return {"skipped": reason}
    cache = {} if cache is None else cache
    y_train = np.array([s.label for s in train], dtype=np.int64)
    y_eval = np.array([s.label for s in evaluated], dtype=np.int64)
    groups = [s.subject_id for s in evaluated]
    every = IMAGE_FEATURES + NOTE_FEATURES
    x_train_all = feature_matrix(train, every, cache)
    x_eval_all = feature_matrix(evaluated, every, cache)
    results: dict[str, Any] = {}
    for name, columns in FEATURE_SETS.items():
        cols = [every.index(c) for c in columns]
        probabilities = fit_predict(x_train_all[:, cols], y_train, x_eval_all[:, cols], seed=seed)
        results[name] = {"intervals": bootstrap_intervals(y_eval, probabilities, groups, n_boot=n_boot, seed=seed)}
        logger.info("baseline %s: macro F1 %.3f on %d scans", name, results[name]["intervals"]["macro f1"]["value"],
                    len(evaluated))
    return {"train_scans": len(train), "train_subjects": len({s.subject_id for s in train}),
            "evaluated_scans": len(evaluated), "evaluated_subjects": len(set(groups)),
            "features": {k: list(v) for k, v in FEATURE_SETS.items()}, "results": results}


def format_baseline(by_split: Sequence[tuple[Sequence[str], dict[str, Any]]]) -> str:
    """The baselines as a Markdown table, one group of rows per split.

    Parameters
    ----------
    by_split : sequence of tuple
        ``(run names, run_baseline output)``: the runs sharing a split and its baseline.

    Returns
    -------
    str
        A heading line and a table; a skipped split becomes a line saying why.
    """
    keys = ["f1 AD", "f1 MCI", "f1 CN", "macro f1", "auc AD", "auc MCI", "auc CN", "macro auc"]
    lines = ["Baseline: logistic regression on the same split as the run(s) (model/baseline.py; fitted on the "
             "runs' training subjects, scored on the evaluated scans; 95 % subject-level bootstrap intervals)",
             "",
             "| baseline | split of | fitted / scored scans | "
             + " | ".join(k.replace("f1", "F1").replace("auc", "AUC") for k in keys) + " |",
             "|---|---|---:|" + "---:|" * len(keys)]
    header = len(lines)
    skipped = []
    for runs, baseline in by_split:
        if "skipped" in baseline:
            skipped.append(f"baseline skipped for {', '.join(runs)}: {baseline['skipped']}")
            continue
        for name, result in baseline["results"].items():
            lines.append(f"| {name} | {', '.join(runs)} | {baseline['train_scans']} / {baseline['evaluated_scans']} | "
                         + " | ".join(format_interval(result["intervals"][k]) for k in keys) + " |")
    if len(lines) == header:
        return "\n".join(skipped)
    return "\n".join(lines + (["", *skipped] if skipped else []))
