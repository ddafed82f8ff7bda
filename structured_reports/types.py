"""Inputs of the report writers that are not the model's own types."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date

import numpy as np
from numpy.typing import NDArray

from core.errors import NodeError, Outcome
from model.types import ModelInfo, Prediction
from pipeline.normative import NormativeTable
from pipeline.preprocess_config import PreprocessConfig
from pipeline.qc import QCCheck
from pipeline.select import SelectionRules
from pipeline.volumetry import Volumes

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
    orientation : tuple of 4 str, or None
        The patient directions at the viewer's left, right, top and bottom edge of ``image``
        (``("R", "L", "A", "P")`` for an axial slice shown the radiological way), drawn as
        markers on the image; None: no markers.
    """

    image: NDArray[np.float32]
    outline: NDArray[np.bool_] | None = None
    title: str = ""
    orientation: tuple[str, str, str, str] | None = None


@dataclass(frozen=True)
class NotesUsed:
    """Which clinical notes entered the model: count and dates, never the text."""

    dates: tuple[date, ...] = ()

    @property
    def count(self) -> int:
        """Number of notes used."""
        return len(self.dates)


@dataclass(frozen=True)
class SeriesRequirement:
    """What series the node can analyse, as a "not analysed" report tells the radiologist.

    Parameters
    ----------
    min_slices : int
        Fewest slices (images of the series, and voxels along every axis of its volume).
    max_slice_thickness_mm : float
        Thickest slices (and largest voxel edge).
    """

    min_slices: int = PreprocessConfig.min_slices
    max_slice_thickness_mm: float = PreprocessConfig.max_slice_thickness_mm

    @classmethod
    def from_config(cls, rules: SelectionRules | None, config: PreprocessConfig) -> SeriesRequirement:
        """The stricter of the series-selection rules and the preprocessing QC limits.

        Parameters
        ----------
        rules : SelectionRules or None
            The configured selection rules: a ``[[require]]`` rule with a ``range`` on ``@images``
            raises the slice count, one on ``SliceThickness`` lowers the thickness.
        config : PreprocessConfig
            ``min_slices`` and ``max_slice_thickness_mm``.

        Returns
        -------
        SeriesRequirement
            What a series must have to pass both.
        """
        slices, thickness = float(config.min_slices), float(config.max_slice_thickness_mm)
        for rule in rules.requirements if rules is not None else ():
            if rule.range is None:
                continue
            low, high = rule.range
            if "@images" in rule.attributes and math.isfinite(low):
                slices = max(slices, low)
            if "SliceThickness" in rule.attributes and math.isfinite(high):
                thickness = min(thickness, high)
        return cls(min_slices=math.ceil(slices), max_slice_thickness_mm=thickness)


@dataclass(frozen=True)
class PriorResult:
    """The prior study's analysis, as a report compares the current study with it.

    Parameters
    ----------
    study_instance_uid : str
        The prior study.
    study_date : datetime.date
        Its Study Date (the interval of the per-year changes is measured from it).
    series_instance_uid : str
        The prior T1 series that was analysed.
    instances : tuple of (str, str)
        ``(SOPClassUID, SOPInstanceUID)`` of the prior series' instances, cited as evidence.
    volumes : Volumes or None
        The prior's volumes (None: not measured).
    probabilities : Mapping[str, float] or None
        The prior's class probabilities, keyed like :attr:`model.types.Prediction.probabilities`
        (None: the model gave no result for it).
    run_id : str or None
        The node's run that analysed the prior when its result was reused (None: analysed now).
    """

    study_instance_uid: str
    study_date: date
    series_instance_uid: str
    instances: tuple[tuple[str, str], ...] = ()
    volumes: Volumes | None = None
    probabilities: Mapping[str, float] | None = None
    run_id: str | None = None


@dataclass(frozen=True)
class ReportInput:
    """Everything a report needs besides the source instances.

    Exactly one of ``prediction`` and ``not_analysed`` is set.

    Parameters
    ----------
    run_id : str
        The run (named on every report).
    device : DeviceInfo
        The node.
    model : ModelInfo
        The model the node serves (named only when it ran).
    preprocessing_version : str
        Version of the preprocessing that made the model's input.
    notes : NotesUsed
        Clinical notes the model read.
    prediction : Prediction or None
        The result.
    not_analysed : tuple of (Outcome, str), or None
        Why there is no result, in plain words.
    qc : tuple of QCCheck
        The preprocessing's QC values with their limits (:func:`pipeline.qc.qc_checks`).
    requirement : SeriesRequirement
        What series the node can analyse (said when a study was not analysed).
    volumes : Volumes or None
        The current study's volumes (None: volumetry off or failed; ``volumes_note`` says which).
    volumes_note : str
        Why there are no volumes, in plain words ("" when there are, or volumetry is off).
    prior : PriorResult or None
        The prior study's analysis to compare with (None: ``prior_note`` says why).
    prior_note : str
        Why there is no comparison with a prior ("no prior study in the PACS", "prior study not
        retrievable: ..."); "" when prior comparison is off.
    normative : NormativeTable or None
        The configured normative volumes (setting ``volumetry.normative_table``); None: the reports
        say "no normative data configured" and give no z-score or percentile.
    """

    run_id: str
    device: DeviceInfo
    model: ModelInfo
    preprocessing_version: str
    notes: NotesUsed = field(default_factory=NotesUsed)
    prediction: Prediction | None = None
    not_analysed: tuple[Outcome, str] | None = None
    qc: tuple[QCCheck, ...] = ()
    requirement: SeriesRequirement = field(default_factory=SeriesRequirement)
    volumes: Volumes | None = None
    volumes_note: str = ""
    prior: PriorResult | None = None
    prior_note: str = ""
    normative: NormativeTable | None = None
