"""Inputs of the report writers that are not the model's own types."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import numpy as np
from numpy.typing import NDArray

from core.errors import NodeError, Outcome
from model.types import ModelInfo, Prediction

DISCLAIMER = (
    "For research use only. Not a medical device; not for clinical diagnosis. "
    "The result must be confirmed by a qualified physician."
)


class ReportError(NodeError):
    """A report cannot be built from the given input (the message says why)."""


@dataclass(frozen=True)
class DeviceInfo:
    """The node as an observer device (TID 1004) and contributing equipment."""

    name: str
    manufacturer: str
    model_name: str
    serial_number: str
    device_uid: str
    software_version: str


@dataclass(frozen=True)
class KeySlice:
    """One image of the PDF page: a slice and, optionally, a contour drawn over it.

    Parameters
    ----------
    image : numpy.ndarray
        2-D grey values, shown as is (row 0 at the top).
    outline : numpy.ndarray or None
        2-D mask of ``image``'s shape whose boundary is drawn (e.g. the
        template's brain, to show that the registration was sound).
    title : str
        Caption above the image.
    """

    image: NDArray[np.float32]
    outline: NDArray[np.bool_] | None = None
    title: str = ""


@dataclass(frozen=True)
class NotesUsed:
    """Which clinical notes entered the model: count and dates, never the text."""

    dates: tuple[date, ...] = ()

    @property
    def count(self) -> int:
        """Number of notes used."""
        return len(self.dates)


@dataclass(frozen=True)
class ReportInput:
    """Everything a report needs besides the source instances.

    Exactly one of ``prediction`` and ``not_analysed`` is set.
    """

    run_id: str
    device: DeviceInfo
    model: ModelInfo
    preprocessing_version: str
    notes: NotesUsed = field(default_factory=NotesUsed)
    prediction: Prediction | None = None
    not_analysed: tuple[Outcome, str] | None = None
