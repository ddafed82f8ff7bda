"""Initialisation of a training run's parts from training data, without labels.

Used by :func:`model.train.train` before the first optimizer step:
:func:`fit_note_numbers` standardises the note-number layer
(:mod:`model.notenumbers`) on the training scans with a note;
:func:`data_dependent_init` whitens the projections (:func:`whiten`) on the
encoder's class tokens and the pooled note states of the training scans (by
default only for the demonstration base, whose projections are seeded random).
"""

from __future__ import annotations

import logging

import torch

from model.brain_adapter import BrainAdapter
from model.feed import Inputs

logger = logging.getLogger(__name__)


def whiten(proj: torch.nn.Linear, feats: torch.Tensor) -> None:
    """Make a projection's outputs the whitened principal components of ``feats``.

    Row ``k`` of the weight becomes the ``k``-th principal direction divided by its
    standard deviation, the bias ``-W mu``: on ``feats`` the outputs have zero mean,
    unit variance and no correlation, ordered by the variance they carry.  Rows
    beyond the features' rank (fewer samples than outputs) keep their direction and
    are only standardised.

    Parameters
    ----------
    proj : torch.nn.Linear
        The projection (changed in place).
    feats : torch.Tensor
        (N, in_features) encoder features of training scans.
    """
    feats = feats.to(proj.weight.dtype)
    mu = feats.mean(0)
    centred = feats - mu
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    rank = min(proj.out_features, int((sv > 1e-6 * sv[0].clamp_min(1e-12)).sum()))
    weight = proj.weight.detach().clone()
    weight[:rank] = vh[:rank] / (sv[:rank, None] / max(len(feats) - 1, 1) ** 0.5)
    if rank < proj.out_features:
        rest = (centred @ weight[rank:].t()).std(0).clamp_min(1e-6)
        weight[rank:] = weight[rank:] / rest[:, None]
    proj.weight.copy_(weight)
    if proj.bias is not None:
        proj.bias.copy_(-(weight @ mu))


def data_dependent_init(model: BrainAdapter, inputs: Inputs, indices: list[int], device: torch.device,
                        batch_size: int = 16) -> None:
    """Whiten the projections on training data (:func:`whiten`), without labels.

    ``mm_vision_proj`` gets the whitened principal components of the encoder's
    class tokens over the given scans, ``mm_language_proj`` (when there are notes)
    those of the pooled note states of the scans with a note.  Used for the
    demonstration base, whose projections are seeded random: a random 64-d
    projection of the features keeps an arbitrary part of their variation (with the
    seeded random ViT, features that differ across subjects by a few per cent of
    their norm, so that unit-normalised embeddings would be nearly identical); the
    principal components keep the most.  Pretrained projections are left alone by
    default.

    Parameters
    ----------
    model : BrainAdapter
        The model (its adapter as it is).
    inputs : Inputs
        The scans' volumes and cached text states.
    indices : list of int
        The training scans used.
    device : torch.device
        Device of the model.
    batch_size : int
        Feature batch size.
    """
    with torch.no_grad():
        feats = torch.cat([model.image_features(inputs.batch(indices[i:i + batch_size]).to(device).volume)
                           for i in range(0, len(indices), batch_size)])
        whiten(model.mm_vision_proj, feats.float())
        with_note = [i for i in indices if bool(inputs.notes_present[i])]
        if inputs.text_hidden is not None and model.mm_language_proj is not None and len(with_note) >= 2:
            whiten(model.mm_language_proj, inputs.text_hidden[with_note].to(device))


def fit_note_numbers(model: BrainAdapter, inputs: Inputs, indices: list[int]) -> None:
    """Standardise the note-number layer on the training scans with a note (no labels); no-op without one.

    Parameters
    ----------
    model : BrainAdapter
        The model.
    inputs : Inputs
        The scans, with their raw note numbers.
    indices : list of int
        The training scans.
    """
    if model.note_numbers is None or inputs.note_numbers is None:
        return
    with_note = [i for i in indices if bool(inputs.notes_present[i])]
    with torch.no_grad():
        model.note_numbers.fit(inputs.note_numbers[with_note])
    logger.info("note numbers standardised on %d training scans", len(with_note))
