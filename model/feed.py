"""What reaches the model, the same way in training, evaluation and inference.

* The note: :func:`has_note` decides whether a note is used (a blank note is no
  note).  Training and evaluation pass a ``note_mask`` with every batch, so a scan
  without a note goes through the image-only head and stays out of the fusion and
  contrastive terms -- as :meth:`model.inference.Predictor.predict` does at
  inference.  Empty notes are never encoded.
* The note's numbers: for a model that reads them (``config.note_numbers``),
  :meth:`BrainAdapter.note_numbers_of` parses every note once, as
  :meth:`model.inference.Predictor.predict` does for one note, and the raw numbers
  travel with the batch; the model standardises them with its training statistics.
* The device: every tensor the model receives goes through :meth:`Batch.to` (or,
  for the frozen text tower, :func:`text_hidden_cache`), which moves it to the
  model's device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.brain_adapter import BrainAdapter
from model.dataset import Sample, VolumeStore

logger = logging.getLogger(__name__)


def has_note(note: str | None) -> bool:
    """Whether a note enters the model: anything but None or blank text."""
    return bool(note is not None and note.strip())


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of a model's parameters."""
    return next(model.parameters()).device


def note_mask(notes: Sequence[str]) -> torch.Tensor:
    """(N,) bool: which notes enter the model (:func:`has_note`)."""
    return torch.tensor([has_note(n) for n in notes], dtype=torch.bool)


def text_hidden_cache(model: BrainAdapter, notes: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Pooled states of the frozen text tower for every note (zeros for no note; :meth:`BrainAdapter.text_hidden`).

    Parameters
    ----------
    model : BrainAdapter
        A model with a text tower; the tokens go to its device.
    notes : sequence of str
        One note per scan.
    batch_size : int
        Notes per forward.

    Returns
    -------
    torch.Tensor
        (N, hidden) float32 on the CPU; rows of blank notes are zero (never used:
        their ``note_mask`` is False).
    """
    device = model_device(model)
    hidden = model.text_encoder.hidden_size if model.text_encoder is not None else 0
    out = torch.zeros((len(notes), hidden), dtype=torch.float32)
    present = [i for i, n in enumerate(notes) if has_note(n)]
    with torch.no_grad():
        for start in range(0, len(present), batch_size):
            chunk = present[start:start + batch_size]
            tokens = model.tokenize([notes[i].strip() for i in chunk])
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            out[chunk] = model.text_hidden(ids, mask).float().cpu()
    return out


@dataclass
class Batch:
    """One batch of model inputs.

    Parameters
    ----------
    volume : torch.Tensor
        (B, 1, D, H, W) float32.
    text_hidden : torch.Tensor or None
        (B, hidden) cached text-tower states; None for an image-only model or run.
    note_mask : torch.Tensor or None
        (B,) bool, which scans have a note; None with ``text_hidden``.
    labels : torch.Tensor or None
        (B,) class indices.
    note_numbers : torch.Tensor or None
        (B, len(NOTE_FEATURES)) raw note numbers (NaN: absent), for a model that
        reads them; None otherwise.
    """

    volume: torch.Tensor
    text_hidden: torch.Tensor | None = None
    note_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    note_numbers: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        """The same batch with every tensor on ``device``."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Batch(self.volume.to(device=device, dtype=torch.float32), move(self.text_hidden),
                     move(self.note_mask), move(self.labels), move(self.note_numbers))

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`BrainAdapter.forward` besides the volume."""
        if self.text_hidden is None:
            return {}
        kwargs = {"text_hidden": self.text_hidden, "note_mask": self.note_mask}
        if self.note_numbers is not None:
            kwargs["note_numbers"] = self.note_numbers
        return kwargs


@dataclass
class Inputs:
    """Everything needed to build batches of a set of scans.

    Parameters
    ----------
    volumes : VolumeStore
        The volumes (read per batch).
    text_hidden : torch.Tensor or None
        (N, hidden) from :func:`text_hidden_cache`, None for image-only.
    notes_present : torch.Tensor
        (N,) bool from :func:`note_mask`.
    labels : torch.Tensor
        (N,) class indices.
    note_numbers : torch.Tensor or None
        (N, len(NOTE_FEATURES)) raw note numbers for a model that reads them
        (:meth:`BrainAdapter.note_numbers_of`); None otherwise.
    """

    volumes: VolumeStore
    text_hidden: torch.Tensor | None
    notes_present: torch.Tensor
    labels: torch.Tensor
    note_numbers: torch.Tensor | None = None

    def batch(self, indices: Sequence[int]) -> Batch:
        """The batch of the given scans, on the CPU."""
        idx = list(indices)
        text = None if self.text_hidden is None else self.text_hidden[idx]
        mask = None if self.text_hidden is None else self.notes_present[idx]
        numbers = None if self.text_hidden is None or self.note_numbers is None else self.note_numbers[idx]
        return Batch(self.volumes.load(idx), text, mask, self.labels[idx], numbers)


@dataclass
class Predictions:
    """Model outputs over a set of scans.

    Parameters
    ----------
    predicted : numpy.ndarray
        (N,) class indices.
    probabilities : numpy.ndarray
        (N, n_classes), after the temperature.
    embeddings : numpy.ndarray
        (N, E): what the deciding head sees (text part zero for scans without a note).
    logits : numpy.ndarray
        (N, n_classes), before the temperature.
    """

    predicted: np.ndarray
    probabilities: np.ndarray
    embeddings: np.ndarray
    logits: np.ndarray


def predict(model: BrainAdapter, inputs: Inputs, indices: Sequence[int], batch_size: int = 8,
            temperature: float = 1.0) -> Predictions:
    """Classify scans in batches on the model's device.

    Parameters
    ----------
    model : BrainAdapter
        The model.
    inputs : Inputs
        Volumes, cached note states, note mask, labels.
    indices : sequence of int
        Scans to classify.
    batch_size : int
        Batch size.
    temperature : float
        Logits are divided by it before the softmax (1: uncalibrated).

    Returns
    -------
    Predictions
        Classes, probabilities, embeddings and logits.
    """
    device = model_device(model)
    preds, probs, embeds, logits = [], [], [], []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(indices), batch_size):
            batch = inputs.batch(indices[start:start + batch_size]).to(device)
            out = model(batch.volume, **batch.model_kwargs())
            raw = out.logits.float()
            p = torch.softmax(raw / temperature, dim=-1)
            logits.append(raw.cpu())
            probs.append(p.cpu())
            preds.append(p.argmax(dim=-1).cpu())
            if out.text_embeds is None:
                emb = out.image_embeds
            else:
                emb = torch.cat([out.image_embeds, out.text_embeds * out.note_mask[:, None]], -1)
            embeds.append(emb.float().cpu())
    n_classes = len(model.config.classes)
    if not indices:
        empty = np.zeros((0, n_classes), dtype=np.float32)
        return Predictions(np.zeros(0, dtype=np.int64), empty, np.zeros((0, 0), dtype=np.float32), empty)
    return Predictions(torch.cat(preds).numpy(), torch.cat(probs).numpy(), torch.cat(embeds).numpy(),
                       torch.cat(logits).numpy())


def build_inputs(model: BrainAdapter, samples: list[Sample], inputs: str) -> Inputs:
    """Volumes (read lazily), cached note states and the note mask of a manifest's scans.

    Parameters
    ----------
    model : BrainAdapter
        The model (its input size and text tower).
    samples : list of Sample
        The scans.
    inputs : str
        ``"mri"``, ``"note"`` (empty volumes) or ``"mri+note"``.

    Returns
    -------
    Inputs
        What :meth:`Inputs.batch` builds batches from (with the raw note numbers
        when the model reads them).
    """
    volumes = VolumeStore([s.volume for s in samples], model.config.input_size, empty=inputs == "note")
    notes = [s.note for s in samples]
    text = text_hidden_cache(model, notes) if inputs != "mri" else None
    numbers = None
    if text is not None and model.note_numbers is not None:
        numbers = model.note_numbers_of([n.strip() if has_note(n) else "" for n in notes])
    return Inputs(volumes, text, note_mask(notes), torch.tensor([s.label for s in samples]), numbers)
