"""Training manifests, the subject-level split and batches for :mod:`model.train`.

A manifest is a CSV file with (at least) the columns ``subject_id``, ``volume``
(a ``.npy`` file, relative to the manifest's folder unless absolute), ``note``
and ``label`` (one of :data:`model.types.CLASSES`).  Extra columns are ignored.
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
        Index into :data:`model.types.CLASSES`.
    """

    subject_id: str
    volume: Path
    note: str
    label: int


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
                                  row["note"] or "", CLASSES.index(row["label"])))
    if not samples:
        raise ModelInputError(f"manifest {path} has no rows")
    return samples


def subject_split(
    samples: Sequence[Sample], test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Split scans into train and test parts by subject, stratified by label.

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
        When ``test_fraction`` is outside (0, 1) or a subject carries two labels.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ModelInputError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    label_of: dict[str, int] = {}
    for s in samples:
        if label_of.setdefault(s.subject_id, s.label) != s.label:
            raise ModelInputError("a subject has scans with different labels; split by subject is ambiguous")
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


def load_volumes(samples: Sequence[Sample], shape: tuple[int, int, int]) -> torch.Tensor:
    """Load volumes into one float16 tensor (N, 1, D, H, W) (float32 per batch later).

    Parameters
    ----------
    samples : sequence of Sample
        The scans.
    shape : tuple of int
        Expected (D, H, W): the model's input size.

    Returns
    -------
    torch.Tensor
        float16 volumes.

    Raises
    ------
    ModelInputError
        When a file is unreadable or has another shape or values outside [0, 1].
    """
    out = torch.empty((len(samples), 1, *shape), dtype=torch.float16)
    for i, s in enumerate(samples):
        try:
            arr = np.load(s.volume)
        except (OSError, ValueError) as exc:
            raise ModelInputError(f"cannot read volume {s.volume}: {exc}") from exc
        if arr.shape != tuple(shape):
            raise ModelInputError(f"volume {s.volume} has shape {arr.shape}, the model expects {tuple(shape)}")
        if float(arr.min()) < -1e-3 or float(arr.max()) > 1 + 1e-3:
            raise ModelInputError(f"volume {s.volume} has values outside [0, 1]")
        out[i, 0] = torch.from_numpy(arr.astype(np.float16))
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
