"""The numbers of a clinical note: one parser for the baseline and the model, and the model's input layer.

Why the model reads them: the frozen text tower (all-MiniLM-L6-v2, mean pooled)
barely tells ``MMSE 24/30`` from ``MMSE 29/30`` -- a sentence encoder is trained to
place sentences by topic, not by the size of a number.  On the synthetic cohort a
logistic regression on the parsed numbers beats every note-only model that reads
the note's text alone (the baseline's ``note numbers`` column of ``dicom-node
evaluate``; docs/model.md), so the model also reads them, as a small
*note-number vector*, through :class:`NoteNumbers`.  Whether the fusion head also
reads the text embedding is :attr:`model.adapter_config.BrainAdapterConfig.note_text`
(the demonstration base with note numbers reads the numbers alone: chosen on
validation subjects, docs/model.md).

:func:`parse_note` is the only parser: :mod:`model.baseline` fits its logistic
regression on it, and the model (training, evaluation and serving alike, through
:meth:`model.brain_adapter.BrainAdapter.note_numbers_of`) reads its output.

:class:`NoteNumbers` standardises each number with statistics of the training
scans (:meth:`NoteNumbers.fit`, kept as buffers that travel with the trained
parts), sets a missing number to 0 (the training mean) with a missing-indicator
beside it, and maps the 2 x 5 values through a trainable linear layer into the
fusion head's input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

#: The numbers of a note, in column order.
NOTE_FEATURES: tuple[str, ...] = ("age", "education_years", "mmse", "cdr_sb", "memory_complaints")

_NUMBER = r"(\d{1,3}(?:\.\d+)?)"
_AGE = (re.compile(_NUMBER + r"\s*[- ]?\s*(?:year|yr)s?[- ]?old\b", re.I),
        re.compile(r"\b(?:age|aged)\s*[:=]?\s*" + _NUMBER + r"\b", re.I),
        re.compile(_NUMBER + r"\s*(?:y/?o|yo)\b", re.I))
_EDUCATION = (re.compile(_NUMBER + r"\s*(?:years?|yrs?)\s+(?:of\s+)?(?:education|schooling)\b", re.I),
              re.compile(r"\b(?:education|schooling)\s*[:=]?\s*" + _NUMBER + r"\s*(?:years?|yrs?)?", re.I))
_MMSE = (re.compile(r"\b(?:MMSE|mini[- ]mental(?:\s+state)?(?:\s+exam(?:ination)?)?)(?:\s+score)?\s*[:=]?\s*"
                    + _NUMBER + r"(?:\s*(?:/|of|out of)\s*30)?", re.I),)
_CDR_SB = (re.compile(r"\bCDR[- ]?SB\b\s*[:=]?\s*" + _NUMBER, re.I),
           re.compile(r"\bCDR\s+sum\s+of\s+boxes\s*[:=]?\s*" + _NUMBER, re.I))
_COMPLAINTS = ((re.compile(r"\bno\s+(?:memory\s+)?complaints?\b", re.I), 0.0),
               (re.compile(r"\b(?:occasional|mild|some)\s+memory\s+complaints?\b", re.I), 1.0),
               (re.compile(r"\b(?:frequent|marked|severe)\s+memory\s+complaints?\b", re.I), 2.0))
_RANGES = {"age": (18.0, 120.0), "education_years": (0.0, 30.0), "mmse": (0.0, 30.0), "cdr_sb": (0.0, 18.0)}


def _first(patterns: Sequence[re.Pattern[str]], text: str, name: str) -> float:
    """The first number a pattern finds, within the plausible range of ``name``; NaN otherwise."""
    low, high = _RANGES[name]
    for pattern in patterns:
        for match in pattern.finditer(text):
            value = float(match.group(1))
            if low <= value <= high:
                return value
    return math.nan


def parse_note(text: str) -> dict[str, float]:
    """The numbers of a clinical note.

    Recognised forms (case-insensitive): age ``73-year-old``, ``Age 73``, ``aged 73``,
    ``73 yo``; education ``16 years of education``, ``16 years of schooling``,
    ``Education 16 years``; ``MMSE 27/30``, ``MMSE score 27 of 30``,
    ``Mini-Mental State Examination: 27``; ``CDR-SB 1.5``, ``CDR sum of boxes 1.5``
    (never the global CDR); memory complaints ``no`` / ``occasional`` (``mild``,
    ``some``) / ``frequent`` (``marked``, ``severe``).  A value outside its
    plausible range (age 18-120, education 0-30, MMSE 0-30, CDR-SB 0-18) is
    treated as absent.

    Parameters
    ----------
    text : str
        The note ("" for none).

    Returns
    -------
    dict
        :data:`NOTE_FEATURES` to a float, NaN when the note does not state it.
    """
    complaints = math.nan
    for pattern, level in _COMPLAINTS:
        if pattern.search(text):
            complaints = level
            break
    return {"age": _first(_AGE, text, "age"), "education_years": _first(_EDUCATION, text, "education_years"),
            "mmse": _first(_MMSE, text, "mmse"), "cdr_sb": _first(_CDR_SB, text, "cdr_sb"),
            "memory_complaints": complaints}


def note_number_matrix(notes: Sequence[str | None]) -> NDArray[np.float32]:
    """The parsed numbers of several notes (:func:`parse_note`), NaN where absent.

    Parameters
    ----------
    notes : sequence of str or None
        One note per scan (None or "" for none: a row of NaN).

    Returns
    -------
    numpy.ndarray
        (len(notes), len(NOTE_FEATURES)) float32, columns in :data:`NOTE_FEATURES` order.
    """
    rows = [[parse_note(note or "")[name] for name in NOTE_FEATURES] for note in notes]
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(NOTE_FEATURES))


class NoteNumbers(nn.Module):
    """Standardised note numbers with missing-indicators, through a trainable linear layer.

    Parameters
    ----------
    n_numbers : int
        Numbers per note (``len(NOTE_FEATURES)``).
    out_features : int
        Width of the output (the model's ``embed_dim``).

    Notes
    -----
    ``center`` and ``scale`` (buffers; 0 and 1 until :meth:`fit`) are the training
    scans' mean and standard deviation of each number.  A number ``x`` becomes
    ``(x - center) / scale``, or 0 when absent; the second half of the layer's input
    is 1 where the number is absent, 0 otherwise.  The buffers are saved with the
    trained parts (:func:`model.finetune.trainable_state`), so evaluation and serving
    standardise with the training statistics.
    """

    #: Buffers fitted on training data, saved with the trained parameters.
    FITTED_BUFFERS: tuple[str, ...] = ("center", "scale")
    center: torch.Tensor
    scale: torch.Tensor

    def __init__(self, n_numbers: int, out_features: int) -> None:
        super().__init__()
        self.n_numbers = n_numbers
        self.register_buffer("center", torch.zeros(n_numbers))
        self.register_buffer("scale", torch.ones(n_numbers))
        self.proj = nn.Linear(2 * n_numbers, out_features)

    def fit(self, raw: torch.Tensor) -> None:
        """Set ``center`` and ``scale`` from training scans' numbers (no labels).

        Parameters
        ----------
        raw : torch.Tensor
            (N, n_numbers), NaN where absent.  A number absent everywhere keeps
            center 0 and scale 1; a constant one gets scale 1.
        """
        values = raw.detach().to(torch.float64).cpu()
        center = torch.zeros(self.n_numbers, dtype=torch.float64)
        scale = torch.ones(self.n_numbers, dtype=torch.float64)
        for k in range(self.n_numbers):
            column = values[:, k][torch.isfinite(values[:, k])]
            if len(column):
                center[k] = column.mean()
            if len(column) > 1 and float(column.std()) > 1e-6:
                scale[k] = column.std()
        self.center.copy_(center.to(self.center.dtype))
        self.scale.copy_(scale.to(self.scale.dtype))

    def standardise(self, raw: torch.Tensor) -> torch.Tensor:
        """The layer's input: standardised numbers (0 when absent), then the missing-indicators.

        Parameters
        ----------
        raw : torch.Tensor
            (B, n_numbers), NaN where absent.

        Returns
        -------
        torch.Tensor
            (B, 2 * n_numbers).
        """
        raw = raw.to(device=self.center.device, dtype=self.center.dtype)
        present = torch.isfinite(raw)
        z = torch.where(present, (torch.nan_to_num(raw) - self.center) / self.scale, torch.zeros_like(raw))
        return torch.cat([z, (~present).to(raw.dtype)], dim=-1)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        """Map raw note numbers to the fusion head's third input.

        Parameters
        ----------
        raw : torch.Tensor
            (B, n_numbers), NaN where absent.

        Returns
        -------
        torch.Tensor
            (B, out_features).
        """
        out: torch.Tensor = self.proj(self.standardise(raw))
        return out
