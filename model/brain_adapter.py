"""The Brain-Adapter network: depth adapter, frozen M3D-CLIP towers, projections, heads.

Data flow for one batch::

    volume (B, 1, 256, 256, 256)
      -> DepthAdapter            (B, 1, 32, 256, 256)   avg-pool by 8 along D + zero-init conv residual
      -> vision_encoder (frozen) (B, 2049, 768)         token 0 (CLS) kept
      -> mm_vision_proj          image embedding, L2-normalised
    note -> tokenizer -> language_encoder (frozen) -> pooled  -> mm_language_proj -> text embedding
                                                      (token 0 or the masked mean: config.text_pooling)

Classification, two heads (our design):

* ``image_head`` over the image embedding alone.  It is always present and always
  trained, so the model has a real image-only answer: this is what a study without
  a note gets (``used_note=False``).
* ``fusion_head`` over ``[image, text]`` embeddings, only when ``use_note``; it answers
  for samples that have a note.
* With ``config.note_numbers`` the note brings its parsed numbers (age,
  education, MMSE, CDR-SB, memory complaints), standardised with training
  statistics, with missing-indicators, through a trainable linear layer
  (``note_numbers``, :class:`model.notenumbers.NoteNumbers`), because the frozen
  sentence encoder barely carries the size of a number (docs/model.md).  The
  fusion head then reads ``[text, numbers]`` (``config.note_text``) or the
  numbers alone, and its logits are *added* to the image head's, which it does
  not train (late fusion: the note adds evidence to the image's answer and does
  not reshape the image side).

Loss = CE(image_head) + CE(fusion_head, samples with a note)
+ ``contrastive_weight`` * symmetric CLIP loss over the samples with a note, with
``logit_scale`` multiplied directly (not exponentiated), as M3D does.

Submodule names follow M3D-CLIP (``vision_encoder``, ``language_encoder``,
``mm_vision_proj``, ``mm_language_proj``, ``logit_scale``) so its checkpoint maps
one-to-one onto ours.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from model.adapter_config import BrainAdapterConfig, Preset
from model.notenumbers import NOTE_FEATURES, NoteNumbers, note_number_matrix
from model.text import TextEncoder
from model.vit import ViT3D

__all__ = ["BrainAdapter", "BrainAdapterConfig", "BrainAdapterOutput", "DepthAdapter", "Preset"]

logger = logging.getLogger(__name__)


class DepthAdapter(nn.Module):
    """Depth reduction: fixed average pooling plus a zero-initialised residual branch.

    Parameters
    ----------
    factor : int
        Depth reduction factor (pooling kernel and stride along D).
    channels : int
        Width of the residual branch.

    Notes
    -----
    Branch: Conv3d(1, c, (f, 1, 1), stride (f, 1, 1)) -> GELU -> Conv3d(c, c, 3) -> GELU
    -> Conv3d(c, 1, 3), the last one zero-initialised, so an untrained adapter is
    exactly the plain reduction.
    """

    def __init__(self, factor: int, channels: int) -> None:
        super().__init__()
        self.factor = factor
        self.pool = nn.AvgPool3d(kernel_size=(factor, 1, 1), stride=(factor, 1, 1))
        self.branch = nn.Sequential(
            nn.Conv3d(1, channels, kernel_size=(factor, 1, 1), stride=(factor, 1, 1)),
            nn.GELU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv3d(channels, 1, kernel_size=3, padding=1),
        )
        last = self.branch[-1]
        if not isinstance(last, nn.Conv3d):  # pragma: no cover - construction invariant
            raise TypeError("last adapter layer must be a Conv3d")
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)
        self.branch.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reduce the depth.

        Parameters
        ----------
        x : torch.Tensor
            (B, 1, D, H, W).

        Returns
        -------
        torch.Tensor
            (B, 1, D / factor, H, W).
        """
        # channels_last_3d lets oneDNN run the 3D convolutions (and their backward) several
        # times faster on CPU; the values are the same.
        branch = self.branch(x.contiguous(memory_format=torch.channels_last_3d))
        return self.pool(x) + branch.contiguous()


@dataclass
class BrainAdapterOutput:
    """Outputs of :meth:`BrainAdapter.forward`.

    Parameters
    ----------
    logits : torch.Tensor
        (B, n_classes): fusion logits for samples with a note, image logits otherwise.
    image_logits : torch.Tensor
        (B, n_classes) from the image-only head.
    fused_logits : torch.Tensor or None
        (B, n_classes) from the fusion head, None without notes.
    image_embeds : torch.Tensor
        (B, embed_dim), unit norm.
    text_embeds : torch.Tensor or None
        (B, embed_dim), unit norm, None without notes.
    note_mask : torch.Tensor
        (B,) bool, True where a note was used.
    """

    logits: torch.Tensor
    image_logits: torch.Tensor
    fused_logits: torch.Tensor | None
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor | None
    note_mask: torch.Tensor


class BrainAdapter(nn.Module):
    """The Brain-Adapter classifier.

    Parameters
    ----------
    config : BrainAdapterConfig
        Configuration.
    text_encoder : TextEncoder or None
        Required when ``config.use_note``; ignored otherwise.

    Raises
    ------
    ValueError
        When ``use_note`` is set and no text encoder is given.
    """

    def __init__(self, config: BrainAdapterConfig, text_encoder: TextEncoder | None = None) -> None:
        super().__init__()
        self.config = config
        n_classes = len(config.classes)
        self.input_pool: nn.Module = (
            nn.AvgPool3d(config.input_pool) if config.input_pool > 1 else nn.Identity()
        )
        self.adapter = DepthAdapter(config.depth_factor, config.adapter_channels)
        self.vision_encoder = ViT3D(config.vit)
        self.mm_vision_proj = nn.Linear(config.vit.hidden_size, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.image_head = nn.Linear(config.embed_dim, n_classes)
        self.text_encoder: TextEncoder | None = None
        self.language_encoder: nn.Module | None = None
        self.mm_language_proj: nn.Linear | None = None
        self.fusion_head: nn.Linear | None = None
        self.note_numbers: NoteNumbers | None = None
        if config.use_note:
            if text_encoder is None:
                raise ValueError("use_note=True needs a text encoder")
            self.text_encoder = text_encoder
            self.language_encoder = text_encoder.model
            self.mm_language_proj = nn.Linear(text_encoder.hidden_size, config.embed_dim)
            # [image, text]; with note numbers [text, numbers] or [numbers]
            parts = 2 if not config.note_numbers or config.note_text else 1
            self.fusion_head = nn.Linear(parts * config.embed_dim, n_classes)
            if config.note_numbers:  # built last: the other parts' seeded initialisation stays as it was
                self.note_numbers = NoteNumbers(len(NOTE_FEATURES), config.embed_dim)
        self.apply_preset()

    # ------------------------------------------------------------------ training set-up
    def trainable_modules(self) -> list[str]:
        """Names of the submodules/parameters trained under the configured preset.

        Returns
        -------
        list of str
            Attribute names, e.g. ``["image_head", "fusion_head", "mm_vision_proj", ...]``.
            The note-number layer, new in every base, is trained in every preset,
            as the heads are.
        """
        names = ["image_head"]
        if self.fusion_head is not None:
            names.append("fusion_head")
        if self.note_numbers is not None:
            names.append("note_numbers")
        if self.config.preset in (Preset.TLP, Preset.BRAIN_ADAPTER):
            names += ["mm_vision_proj", "logit_scale"]
            if self.mm_language_proj is not None:
                names.append("mm_language_proj")
        if self.config.preset is Preset.BRAIN_ADAPTER:
            names.append("adapter")
        return names

    def apply_preset(self) -> None:
        """Freeze everything, then unfreeze the parts the preset trains."""
        for p in self.parameters():
            p.requires_grad_(False)
        for name in self.trainable_modules():
            part = getattr(self, name)
            if isinstance(part, nn.Parameter):
                part.requires_grad_(True)
            else:
                for p in part.parameters():
                    p.requires_grad_(True)

    def trainable_parameter_count(self) -> int:
        """Number of parameters with ``requires_grad``."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> BrainAdapter:
        """Set training mode; the frozen towers always stay in eval mode (no dropout).

        Parameters
        ----------
        mode : bool
            Training mode for the trainable parts.

        Returns
        -------
        BrainAdapter
            ``self``.
        """
        super().train(mode)
        self.vision_encoder.eval()
        if self.language_encoder is not None:
            self.language_encoder.eval()
        return self

    # ------------------------------------------------------------------ forward
    def image_features(self, volume: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's class token for a volume batch (before ``mm_vision_proj``).

        Parameters
        ----------
        volume : torch.Tensor
            (B, 1, *input_size), intensities in [0, 1].

        Returns
        -------
        torch.Tensor
            (B, ViT hidden size).
        """
        return self.vision_encoder(self.adapter(self.input_pool(volume)))[:, 0]

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        """Image embedding (unit norm) of a volume batch.

        Parameters
        ----------
        volume : torch.Tensor
            (B, 1, *input_size), intensities in [0, 1].

        Returns
        -------
        torch.Tensor
            (B, embed_dim).
        """
        return functional.normalize(self.mm_vision_proj(self.image_features(volume)), dim=-1)

    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The language encoder's pooled note state (before ``mm_language_proj``).

        Pooled as the encoder was trained (``config.text_pooling``): the first
        (CLS) token for M3D-CLIP's BERT, the mean of the token states over the
        attention mask for all-MiniLM-L6-v2 (what sentence-transformers does), so
        padding never changes a note's vector.

        Parameters
        ----------
        input_ids, attention_mask : torch.Tensor
            (B, L) from :meth:`tokenize`.

        Returns
        -------
        torch.Tensor
            (B, text hidden size).  The language encoder is frozen in every preset,
            so training may compute this once per note and pass it to
            :meth:`forward` as ``text_hidden``.

        Raises
        ------
        RuntimeError
            When the model has no text tower.
        """
        if self.language_encoder is None:
            raise RuntimeError("this model has no text encoder (use_note=False)")
        hidden = self.language_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.config.text_pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled: torch.Tensor = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            return pooled
        first: torch.Tensor = hidden[:, 0]
        return first

    def encode_text(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        text_hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embedding (unit norm) of a tokenised batch.

        Parameters
        ----------
        input_ids, attention_mask : torch.Tensor or None
            (B, L) from :meth:`tokenize`.
        text_hidden : torch.Tensor, optional
            Precomputed :meth:`text_hidden` output; used instead of the tokens.

        Returns
        -------
        torch.Tensor
            (B, embed_dim).

        Raises
        ------
        RuntimeError
            When the model has no text tower.
        """
        if self.language_encoder is None or self.mm_language_proj is None:
            raise RuntimeError("this model has no text encoder (use_note=False)")
        if text_hidden is None:
            if input_ids is None or attention_mask is None:
                raise RuntimeError("encode_text needs tokens or text_hidden")
            text_hidden = self.text_hidden(input_ids, attention_mask)
        return functional.normalize(self.mm_language_proj(text_hidden), dim=-1)

    def tokenize(self, notes: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise notes with the model's tokenizer.

        Parameters
        ----------
        notes : list of str
            One note per sample (empty string for none).

        Returns
        -------
        dict
            ``input_ids`` and ``attention_mask``.

        Raises
        ------
        RuntimeError
            When the model has no text tower.
        """
        if self.text_encoder is None:
            raise RuntimeError("this model has no text encoder (use_note=False)")
        return self.text_encoder.tokenize(notes, self.config.max_text_length)

    def note_numbers_of(self, notes: list[str]) -> torch.Tensor:
        """The raw note numbers :meth:`forward` takes as ``note_numbers`` (:mod:`model.notenumbers`).

        Parameters
        ----------
        notes : list of str
            One note per sample (empty string for none).

        Returns
        -------
        torch.Tensor
            (B, len(NOTE_FEATURES)) float32 on the CPU, NaN where a note does not
            state a number.
        """
        return torch.from_numpy(note_number_matrix(notes))

    def forward(
        self,
        volume: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        note_mask: torch.Tensor | None = None,
        text_hidden: torch.Tensor | None = None,
        note_numbers: torch.Tensor | None = None,
    ) -> BrainAdapterOutput:
        """Classify a batch.

        Parameters
        ----------
        volume : torch.Tensor
            (B, 1, *input_size).
        input_ids, attention_mask : torch.Tensor, optional
            Tokenised notes (B, L); omit for image-only.
        note_mask : torch.Tensor, optional
            (B,) bool, which samples have a real note; default: all, when
            ``input_ids`` (or ``text_hidden``) is given.
        text_hidden : torch.Tensor, optional
            (B, text hidden) precomputed by :meth:`text_hidden`, instead of tokens.
        note_numbers : torch.Tensor, optional
            (B, len(NOTE_FEATURES)) from :meth:`note_numbers_of`; required with a note
            when the model reads note numbers (``config.note_numbers``).

        Returns
        -------
        BrainAdapterOutput
            Logits and embeddings.

        Raises
        ------
        RuntimeError
            When the model reads note numbers and notes come without them.
        """
        batch = volume.shape[0]
        image_embeds = self.encode_image(volume)
        image_logits = self.image_head(image_embeds)
        has_text = (input_ids is not None or text_hidden is not None) and self.fusion_head is not None
        if note_mask is None:
            note_mask = torch.full((batch,), has_text, dtype=torch.bool, device=volume.device)
        note_mask = note_mask.to(device=volume.device, dtype=torch.bool) & has_text
        if not has_text or self.fusion_head is None:
            return BrainAdapterOutput(image_logits, image_logits, None, image_embeds, None, note_mask)
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_embeds = self.encode_text(input_ids, attention_mask, text_hidden)
        if self.note_numbers is None:
            fused_logits = self.fusion_head(torch.cat([image_embeds, text_embeds], dim=-1))
        else:
            if note_numbers is None:
                raise RuntimeError("this model reads the note's numbers: pass note_numbers (note_numbers_of)")
            numbers = self.note_numbers(note_numbers.to(volume.device)).to(text_embeds.dtype)
            note = torch.cat([text_embeds, numbers], dim=-1) if self.config.note_text else numbers
            fused_logits = image_logits.detach() + self.fusion_head(note)
        logits = torch.where(note_mask[:, None], fused_logits, image_logits)
        return BrainAdapterOutput(logits, image_logits, fused_logits, image_embeds, text_embeds, note_mask)

    # ------------------------------------------------------------------ loss
    def contrastive_loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Symmetric CLIP loss, ``logit_scale`` multiplied directly as in M3D.

        Parameters
        ----------
        image_embeds, text_embeds : torch.Tensor
            (N, embed_dim) unit-norm, paired by row.

        Returns
        -------
        torch.Tensor
            Scalar loss.
        """
        logits = self.logit_scale * image_embeds @ text_embeds.t()
        target = torch.arange(logits.shape[0], device=logits.device)
        return (functional.cross_entropy(logits, target) + functional.cross_entropy(logits.t(), target)) / 2

    def loss(self, output: BrainAdapterOutput, labels: torch.Tensor) -> torch.Tensor:
        """Training loss: CE (image head) + CE (fusion head) + w * contrastive.

        Parameters
        ----------
        output : BrainAdapterOutput
            From :meth:`forward`.
        labels : torch.Tensor
            (B,) class indices in :data:`model.types.CLASSES` order.

        Returns
        -------
        torch.Tensor
            Scalar loss.  The fusion and contrastive terms cover the samples with a
            note only (the contrastive one needs at least two).
        """
        loss = functional.cross_entropy(output.image_logits, labels)
        mask = output.note_mask
        if output.fused_logits is not None and output.text_embeds is not None and bool(mask.any()):
            loss = loss + functional.cross_entropy(output.fused_logits[mask], labels[mask])
            if int(mask.sum()) >= 2 and self.config.contrastive_weight > 0:
                loss = loss + self.config.contrastive_weight * self.contrastive_loss(
                    output.image_embeds[mask], output.text_embeds[mask]
                )
        return loss
