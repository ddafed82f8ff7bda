"""Configuration of the Brain-Adapter: which parts are trained (:class:`Preset`) and its sizes.

:class:`BrainAdapterConfig` is what a model directory's manifest records
(:mod:`model.checkpoint`) and what :class:`model.brain_adapter.BrainAdapter` is
built from; it holds no tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from model.types import CLASSES
from model.vit import ViTConfig


class Preset(StrEnum):
    """Which parts are trained (the paper's rows).

    FPM: frozen pretrained model, heads only.  TLP: projections, ``logit_scale``
    and heads.  BRAIN_ADAPTER: the depth adapter as well.
    """

    FPM = "FPM"
    TLP = "TLP"
    BRAIN_ADAPTER = "BRAIN_ADAPTER"


#: How a note's token states are pooled (:attr:`BrainAdapterConfig.text_pooling`).
TEXT_POOLINGS: tuple[str, ...] = ("cls", "mean")


@dataclass(frozen=True)
class BrainAdapterConfig:
    """Configuration of a :class:`BrainAdapter`.

    Parameters
    ----------
    vit : ViTConfig
        Vision encoder sizes; its ``img_size`` is the adapter's output size.
    text_encoder_path : str
        Local Hugging Face encoder folder (empty when ``use_note`` is False). In a
        model directory it is stored relative to that directory.
    embed_dim : int
        Width of the shared image/text embedding space (768 in M3D-CLIP).
    preset : Preset
        Trainable parts.
    use_note : bool
        Whether the model has a text tower and a fusion head.
    contrastive_weight : float
        Weight of the contrastive term in the loss.
    classes : tuple of str
        Class names in logit order.
    input_size : tuple of int
        Size (D, H, W) of the preprocessed volume the model receives.
    adapter_channels : int
        Width of the adapter's residual convolution branch.
    max_text_length : int
        Maximum number of note tokens.
    text_encoder_name : str
        Human-readable identity of the text encoder, for reports.
    input_pool : int
        Fixed average pooling of the whole volume by this factor, in every axis,
        before the adapter (1: none).  Demonstration models trained on
        reduced-resolution cohorts use it to accept the node's 256^3 input; it has
        no parameters.
    text_pooling : {"cls", "mean"}
        How the text tower's token states become one note vector: the first
        (CLS) token, as M3D-CLIP's BERT was trained to be read, or the mean over
        the attention mask, as sentence-transformers' all-MiniLM-L6-v2 was
        trained.  A saved configuration without the field reads as "cls".
    note_numbers : bool
        Whether the fusion head also reads the note's parsed numbers (age,
        education, MMSE, CDR-SB, memory complaints: :mod:`model.notenumbers`),
        standardised and mapped by a trainable linear layer.  Needs ``use_note``.
        A saved configuration without the field reads as False.  With it the
        fusion head's logits add to the image head's (late fusion,
        :mod:`model.brain_adapter`).
    note_text : bool
        With ``note_numbers``: whether the fusion head also reads the text
        embedding (``[text, numbers]``) or the numbers alone.  A saved
        configuration without the field reads as True.
    """

    vit: ViTConfig = field(default_factory=ViTConfig)
    text_encoder_path: str = ""
    embed_dim: int = 768
    preset: Preset = Preset.BRAIN_ADAPTER
    use_note: bool = True
    contrastive_weight: float = 0.5
    classes: tuple[str, ...] = CLASSES
    input_size: tuple[int, int, int] = (256, 256, 256)
    adapter_channels: int = 8
    max_text_length: int = 512
    text_encoder_name: str = ""
    input_pool: int = 1
    text_pooling: str = "cls"
    note_numbers: bool = False
    note_text: bool = True

    def __post_init__(self) -> None:
        """Validate the configuration.

        Raises
        ------
        ValueError
            When the input size cannot be reduced to the ViT's input size.
        """
        object.__setattr__(self, "preset", Preset(self.preset))
        if self.input_pool < 1 or any(s % self.input_pool for s in self.input_size):
            raise ValueError(f"input_pool {self.input_pool} must divide every axis of input_size {self.input_size}")
        d_in, h_in, w_in = (s // self.input_pool for s in self.input_size)
        d_out, h_out, w_out = self.vit.img_size
        if (h_in, w_in) != (h_out, w_out) or d_in % d_out != 0:
            raise ValueError(
                f"input_size {self.input_size} (pooled by {self.input_pool}) must reduce along D only, "
                f"by an integer factor, to the ViT's img_size {self.vit.img_size}"
            )
        if self.use_note and not self.text_encoder_path:
            raise ValueError("use_note=True needs a text_encoder_path")
        if tuple(self.classes) != CLASSES:
            raise ValueError(f"classes must be {CLASSES}")
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, got {self.text_pooling!r}")
        if self.note_numbers and not self.use_note:
            raise ValueError("note_numbers=True needs use_note=True (the numbers come from the note)")
        if not self.note_text and not self.note_numbers:
            raise ValueError("note_text=False needs note_numbers=True (the fusion head must read some of the note)")

    @property
    def depth_factor(self) -> int:
        """Depth reduction factor of the adapter (8 for 256 -> 32)."""
        return self.input_size[0] // self.input_pool // self.vit.img_size[0]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dictionary."""
        return {
            "vit": self.vit.to_dict(),
            "text_encoder_path": self.text_encoder_path,
            "embed_dim": self.embed_dim,
            "preset": self.preset.value,
            "use_note": self.use_note,
            "contrastive_weight": self.contrastive_weight,
            "classes": list(self.classes),
            "input_size": list(self.input_size),
            "adapter_channels": self.adapter_channels,
            "max_text_length": self.max_text_length,
            "text_encoder_name": self.text_encoder_name,
            "input_pool": self.input_pool,
            "text_pooling": self.text_pooling,
            "note_numbers": self.note_numbers,
            "note_text": self.note_text,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BrainAdapterConfig:
        """Build a configuration from :meth:`to_dict`'s output.

        Parameters
        ----------
        data : Mapping
            The dictionary.

        Returns
        -------
        BrainAdapterConfig
            The configuration.
        """
        values = dict(data)
        vit = ViTConfig.from_dict(values.pop("vit", {}))
        return cls(
            vit=vit,
            preset=Preset(values.pop("preset", Preset.BRAIN_ADAPTER.value)),
            classes=tuple(values.pop("classes", CLASSES)),
            input_size=tuple(int(v) for v in values.pop("input_size", (256, 256, 256))),  # type: ignore[arg-type]
            **values,
        )

    def with_text_encoder_path(self, path: str) -> BrainAdapterConfig:
        """Return a copy with another text encoder path."""
        return replace(self, text_encoder_path=path)
