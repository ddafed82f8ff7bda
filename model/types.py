"""Plain result types shared by the model and the report writers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

#: The diagnostic classes, in the order of the classifier's logits.
CLASSES: tuple[str, ...] = ("AD", "MCI", "CN")


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model, recorded in every run and report.

    Parameters
    ----------
    name : str
        Human-readable model name, e.g. ``"Brain-Adapter"``.
    version : str
        Version string of the model (checkpoint) itself.
    weights_sha256 : str
        SHA-256 of the weights file(s), hex; identifies the exact weights.
    demonstration : bool
        True for untrained or synthetic-data models: reports must say
        "demonstration model, not for clinical use".
    parameters : Mapping[str, str]
        Algorithm parameters worth reporting (preset, input shape, ...).
    """

    name: str
    version: str
    weights_sha256: str
    demonstration: bool
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one volume.

    Parameters
    ----------
    probabilities : Mapping[str, float]
        Probability of each class in :data:`CLASSES`; they sum to 1.
    predicted_class : str
        The class with the highest probability.
    used_note : bool
        Whether a clinical note entered the model (False: image-only).
    """

    probabilities: Mapping[str, float]
    predicted_class: str
    used_note: bool
