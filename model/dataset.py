"""Training manifests, the subject-level split and lazily read volumes for :mod:`model.train`.

A manifest is a CSV file with (at least) the columns ``subject_id``, ``volume``
(a ``.npy`` file, relative to the manifest's folder unless absolute), ``note``
and ``label`` (one of :data:`model.types.CLASSES`).  Optional columns:
``scan_id``, ``scan_date`` (ISO date; orders a subject's scans) and
``preprocessing_version`` (written by ``dicom-node cohort prepare``, see
:func:`check_preprocessing`).  Extra columns are ignored.

Labels belong to scans, not subjects: a subject whose diagnosis changes between
visits (CN -> MCI -> AD) is an ordinary case.  Volumes are never loaded all at
once: :class:`VolumeStore` reads the scans of one batch (memory-mapped ``.npy``),
so memory does not grow with the cohort.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model.errors import ModelInputError
from model.types import CLASSES

logger = logging.getLogger(__name__)

#: What enters the model: the MRI alone, the note alone (the MRI replaced by an empty volume), or both.
Inputs = Literal["mri", "note", "mri+note"]
INPUTS: tuple[str, ...] = ("mri", "note", "mri+note")
REQUIRED_COLUMNS = ("subject_id", "volume", "note", "label")

#: ``preprocessing_version`` of the synthetic cohort (:mod:`model.cohort`): volumes made in the tensor contract
#: directly, never by the node's preprocessing.  Accepted for training, and marked as synthetic everywhere.
SYNTHETIC = "synthetic"

#: Tolerance on the [0, 1] range of a volume.
RANGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Sample:
    """One scan of a manifest.

    Parameters
    ----------
    subject_id : str
        Subject; all scans of a subject land on the same side of a split.
    volume : Path
        Absolute path of the ``.npy`` volume.
    note : str
        Clinical note ("" for none).
    label : int
        Index into :data:`model.types.CLASSES`: the diagnosis at this scan.
    scan_id : str
        Scan identifier ("" when the manifest has none).
    scan_date : str
        ISO date of the scan ("" when unknown).
    preprocessing : str
        ``preprocessing_version`` of the row ("" when not recorded).
    """

    subject_id: str
    volume: Path
    note: str
    label: int
    scan_id: str = ""
    scan_date: str = ""
    preprocessing: str = ""


def read_manifest(path: Path) -> list[Sample]:
    """Read a training manifest.

    Parameters
    ----------
    path : Path
        CSV file.

    Returns
    -------
    list of Sample
        The scans, in file order.

    Raises
    ------
    ModelInputError
        When the file is missing, lacks a column, has an unknown label or is empty.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"manifest not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ModelInputError(f"manifest {path} lacks the column(s) {', '.join(missing)}")
        samples = []
        for line, row in enumerate(reader, start=2):
            if row["label"] not in CLASSES:
                raise ModelInputError(f"{path}:{line}: label must be one of {CLASSES}, got {row['label']!r}")
            volume = Path(row["volume"])
            samples.append(Sample(row["subject_id"], volume if volume.is_absolute() else path.parent / volume,
                                  row["note"] or "", CLASSES.index(row["label"]), row.get("scan_id") or "",
                                  row.get("scan_date") or "", (row.get("preprocessing_version") or "").strip()))
    if not samples:
        raise ModelInputError(f"manifest {path} has no rows")
    return samples


def check_preprocessing(samples: Sequence[Sample], expected: str | None) -> str:
    """Check that the volumes were preprocessed as the node preprocesses at inference.

    Parameters
    ----------
    samples : sequence of Sample
        The manifest's scans.
    expected : str or None
        The serving configuration's preprocessing identity (from the node's settings,
        see ``dicom-node cohort prepare``); None: not checked (library use), the
        manifest's versions are only reported.

    Returns
    -------
    str
        The manifest's preprocessing version (one value), :data:`SYNTHETIC` for a
        synthetic cohort, or the sorted distinct values joined by ``", "`` when not
        checked.

    Raises
    ------
    ModelInputError
        When rows carry another version than ``expected`` (or none), or synthetic
        and prepared volumes are mixed.
    """
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.preprocessing] = counts.get(s.preprocessing, 0) + 1
    found = sorted(counts)
    if expected is None:
        return ", ".join(v or "not recorded" for v in found)
    if found in ([expected], [SYNTHETIC]):
        return found[0]
    wrong = {v or "not recorded": n for v, n in counts.items() if v != expected}
    raise ModelInputError(
        "the manifest's volumes were not preprocessed as the node preprocesses at inference "
        f"(expected preprocessing {expected!r}; found " + ", ".join(f"{v!r}: {n} scan(s)" for v, n in wrong.items())
        + "); prepare the cohort with `dicom-node cohort prepare` under the serving configuration")


def _subject_labels(samples: Sequence[Sample]) -> dict[str, int]:
    """Each subject's stratum: the label of its latest scan (by ``scan_date``, then file order)."""
    latest: dict[str, tuple[str, int, int]] = {}
    for i, s in enumerate(samples):
        key = (s.scan_date, i, s.label)
        if s.subject_id not in latest or key[:2] > latest[s.subject_id][:2]:
            latest[s.subject_id] = key
    return {subject: key[2] for subject, key in latest.items()}


def subject_split(
    samples: Sequence[Sample], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split scans into train and test parts by subject, stratified by label.

    A subject is stratified by the label of its latest scan (see the module
    docstring: labels belong to scans, and may change between visits).

    Parameters
    ----------
    samples : sequence of Sample
        The scans.
    test_fraction : float
        Fraction of each class's subjects held out (0 < f < 1).
    seed : int
        Seed of the subject shuffle.

    Returns
    -------
    tuple of list of int
        Indices of the training and the test scans; no subject has scans in both.

    Raises
    ------
    ModelInputError
        When ``test_fraction`` is outside (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ModelInputError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    label_of = _subject_labels(samples)
    rng = np.random.default_rng(seed)
    test_subjects: set[str] = set()
    for label in range(len(CLASSES)):
        subjects = sorted(k for k, v in label_of.items() if v == label)
        order = rng.permutation(len(subjects))
        n_test = round(test_fraction * len(subjects))
        test_subjects.update(subjects[i] for i in order[:n_test])
    train = [i for i, s in enumerate(samples) if s.subject_id not in test_subjects]
    test = [i for i, s in enumerate(samples) if s.subject_id in test_subjects]
    return train, test


def split_indices(samples: Sequence[Sample], indices: Sequence[int], fraction: float,
                  seed: int) -> tuple[list[int], list[int]]:
    """Split a subset of scans by subject (e.g. training scans into fit and validation parts).

    Parameters
    ----------
    samples : sequence of Sample
        All scans.
    indices : sequence of int
        The subset to split.
    fraction : float
        Fraction of the subset's subjects in the second part; 0 gives an empty second part.
    seed : int
        Seed of the subject shuffle.

    Returns
    -------
    tuple of list of int
        The two parts, as indices into ``samples``.
    """
    if fraction <= 0.0:
        return list(indices), []
    subset = [samples[i] for i in indices]
    first, second = subject_split(subset, fraction, seed)
    return [indices[i] for i in first], [indices[i] for i in second]


class VolumeStore:
    """The volumes of a manifest, read a batch at a time (memory-mapped ``.npy``).

    Parameters
    ----------
    paths : sequence of Path
        One ``.npy`` file per scan.
    shape : tuple of int
        Expected (D, H, W): the model's input size.
    empty : bool
        Return empty (zero) volumes instead (``--inputs note``); the files are still checked.

    Raises
    ------
    ModelInputError
        When a file is unreadable or has another shape (checked on the headers at
        construction; values are checked as batches are read).
    """

    def __init__(self, paths: Sequence[Path], shape: Sequence[int], *, empty: bool = False) -> None:
        self.paths = [Path(p) for p in paths]
        self.shape = tuple(int(v) for v in shape)
        self.empty = empty
        for path in self.paths:
            if self._open(path).shape != self.shape:
                raise ModelInputError(
                    f"volume {path} has shape {self._open(path).shape}, the model expects {self.shape}")

    def __len__(self) -> int:
        """Number of scans."""
        return len(self.paths)

    @staticmethod
    def _open(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ModelInputError(f"cannot read volume {path}: {exc}") from exc

    def load(self, indices: Sequence[int]) -> torch.Tensor:
        """Read some scans as one float32 tensor.

        Parameters
        ----------
        indices : sequence of int
            Scan indices.

        Returns
        -------
        torch.Tensor
            (len(indices), 1, D, H, W) float32 on the CPU.

        Raises
        ------
        ModelInputError
            When a volume has values outside [0, 1] or non-finite values.
        """
        out = torch.zeros((len(indices), 1, *self.shape), dtype=torch.float32)
        if self.empty:
            return out
        for k, i in enumerate(indices):
            arr = np.array(self._open(self.paths[i]), dtype=np.float32)
            if not np.isfinite(arr).all() or float(arr.min()) < -RANGE_TOLERANCE \
                    or float(arr.max()) > 1 + RANGE_TOLERANCE:
                raise ModelInputError(f"volume {self.paths[i]} has values outside [0, 1]")
            out[k, 0] = torch.from_numpy(arr)
        return out


def batches(indices: Sequence[int], batch_size: int, *, shuffle: bool, seed: int) -> Iterator[list[int]]:
    """Yield batches of indices, shuffled with a seed when asked.

    Parameters
    ----------
    indices : sequence of int
        Scan indices.
    batch_size : int
        Batch size.
    shuffle : bool
        Shuffle first.
    seed : int
        Shuffle seed (one per epoch keeps a resumed run identical).

    Yields
    ------
    list of int
        One batch.
    """
    order = list(indices)
    if shuffle:
        order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def manifest_sha256(path: Path) -> str:
    """SHA-256 of the manifest file (recorded in run summaries)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
