"""Augmentation for the vision side's pretraining: unlabeled volumes under two acquisitions each.

The data and views of :mod:`model.pretrain`: :class:`AnatomySampler` draws
anatomies from the synthetic cohort's generator (:mod:`model.cohort`) with the
atrophy scales uniform and independent of any diagnosis
(:data:`VENTRICLE_RANGE`, :data:`HIPPOCAMPUS_RANGE`) and renders each under
freshly drawn acquisitions (pose, smooth bias field, contrast, noise) whose
spread is an :class:`AugmentConfig`.  Every random draw comes from the
sampler's own ``torch.Generator``, so a seed fixes the volumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional

from model.cohort import ATROPHY_SITES, Anatomy

#: Range of the ventricle enlargement drawn for pretraining (the cohort's scale is clipped to [0, 0.7]).
VENTRICLE_RANGE = (0.0, 0.7)

#: Range of the hippocampal / medial temporal shrinkage drawn for pretraining (cohort: [0, 0.6]).
HIPPOCAMPUS_RANGE = (0.0, 0.6)


@dataclass(frozen=True)
class AugmentConfig:
    """Spread of the acquisition changes between two views.

    Parameters
    ----------
    rotation_deg : float
        Standard deviation of the rotation about each axis (degrees); the cohort uses 2.5.
    scale : float
        Standard deviation of the isotropic scale around 1; the cohort uses 0.03.
    shift : float
        Standard deviation of the shift along each axis, in voxels of a 64^3 grid; the cohort uses 0.5.
    bias : float
        Standard deviation of each coefficient of the log bias field (quadratic
        polynomial); the cohort uses 0.06.
    gamma : float
        Standard deviation of the log of the contrast exponent (intensity ** gamma).
    noise : tuple of float
        Range of the Gaussian noise's standard deviation inside the head; the cohort uses (0.01, 0.03).
    """

    rotation_deg: float = 4.0
    scale: float = 0.05
    shift: float = 1.0
    bias: float = 0.10
    gamma: float = 0.15
    noise: tuple[float, float] = (0.0, 0.04)


class AnatomySampler:
    """Unlabeled brain volumes at ``size``^3, drawn in batches, with two acquisitions each.

    The anatomy follows :func:`model.cohort.subject_volume` (tissue loss and radial
    warps at the atrophy sites); the acquisition (pose, bias field, contrast, noise)
    is drawn per view.  Warp and pose are composed into one trilinear resampling,
    as the cohort does.

    Parameters
    ----------
    anat : Anatomy
        From :func:`model.cohort.anatomy`.
    augment : AugmentConfig
        Spread of the acquisition.
    generator : torch.Generator
        Source of every random draw.
    """

    def __init__(self, anat: Anatomy, augment: AugmentConfig, generator: torch.Generator) -> None:
        self.size = int(anat.reference.shape[0])
        self.augment = augment
        self.generator = generator
        self.reference = torch.from_numpy(anat.reference)
        self.distance = torch.from_numpy(anat.ventricle_distance)
        self.csf = float(anat.csf)
        hipp = [torch.from_numpy(anat.site_weights[name]) for name, *_, sign in ATROPHY_SITES if sign < 0]
        self.hippocampus_weight = torch.stack(hipp).amax(0)
        # warp displacement per unit of ventricle / hippocampus scale: coords -= sign * scale * w * offset
        self.ventricle_field = sum(torch.from_numpy(anat.site_weights[n] * anat.site_offsets[n])
                                   for n, *_, s in ATROPHY_SITES if s > 0)
        self.hippocampus_field = -sum(torch.from_numpy(anat.site_weights[n] * anat.site_offsets[n])
                                      for n, *_, s in ATROPHY_SITES if s < 0)
        self.grid = torch.stack(torch.meshgrid(*(torch.arange(self.size, dtype=torch.float32),) * 3,
                                               indexing="ij"))

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=self.generator)

    def _normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator)

    def anatomies(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` anatomies: ventricle and hippocampus scales, uniform and independent."""
        return self._uniform(n, *VENTRICLE_RANGE), self._uniform(n, *HIPPOCAMPUS_RANGE)

    def tissue(self, ventricle: torch.Tensor, hippocampus: torch.Tensor) -> torch.Tensor:
        """(n, D, H, W): the reference with tissue replaced by CSF (before the warps), as the cohort does."""
        grow = (3.5 * ventricle * self.size / 64.0)[:, None, None, None]
        loss = (grow - self.distance + 0.5).clamp(0.0, 1.0) * (self.distance > 0)
        loss = torch.maximum(loss, 0.8 * hippocampus[:, None, None, None] * self.hippocampus_weight)
        return self.reference * (1.0 - loss) + self.csf * loss * (self.reference > 0.05)

    def views(self, ventricle: torch.Tensor, hippocampus: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """(copies * n, 1, D, H, W) volumes in [0, 1]: each anatomy under freshly drawn acquisitions.

        Parameters
        ----------
        ventricle, hippocampus : torch.Tensor
            (n,) atrophy scales.
        copies : int
            Acquisitions per anatomy; row ``k * n + i`` is acquisition ``k`` of anatomy ``i``.

        Returns
        -------
        torch.Tensor
            float32 volumes.
        """
        size, aug = self.size, self.augment
        tissue = self.tissue(ventricle, hippocampus).repeat(copies, 1, 1, 1)
        warp = (ventricle[:, None, None, None, None] * self.ventricle_field
                + hippocampus[:, None, None, None, None] * self.hippocampus_field)
        coords = (self.grid - warp).repeat(copies, 1, 1, 1, 1)  # (n', 3, D, H, W), voxel index coordinates
        n = int(coords.shape[0])
        matrix = _rotations(torch.deg2rad(aug.rotation_deg * self._normal(n, 3)))
        matrix = matrix * (1.0 + aug.scale * self._normal(n))[:, None, None]
        centre = (size - 1) / 2.0
        shift = aug.shift * self._normal(n, 3) * size / 64.0
        flat = coords.reshape(n, 3, -1) - centre
        sample = torch.bmm(matrix, flat) + (centre + shift)[:, :, None]
        # grid_sample wants (x, y, z) = (W, H, D) in [-1, 1] (align_corners=True: -1 and 1 are voxel centres)
        norm = (sample * (2.0 / (size - 1)) - 1.0).reshape(n, 3, size, size, size).permute(0, 2, 3, 4, 1)
        out = functional.grid_sample(tissue[:, None], norm.flip(-1), mode="bilinear", padding_mode="zeros",
                                     align_corners=True)
        out = out * self._bias(n)
        head = out > 0.02
        gamma = torch.exp(aug.gamma * self._normal(n))[:, None, None, None, None]
        out = out.clamp_min(0.0) / out.amax(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        out = out ** gamma
        sd = self._uniform(n, *aug.noise)[:, None, None, None, None]
        out = (out + head * sd * self._normal(*out.shape)).clamp_min(0.0)
        return out / out.amax(dim=(1, 2, 3, 4), keepdim=True).clamp_min(1e-6)

    def _bias(self, n: int) -> torch.Tensor:
        axis = torch.linspace(-1.0, 1.0, self.size)
        z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
        terms = torch.stack((x, y, z, x * y, y * z, x * z, x * x, y * y, z * z))
        coefficients = self.augment.bias * self._normal(n, terms.shape[0])
        return torch.exp(torch.einsum("nt,tdhw->ndhw", coefficients, terms))[:, None]


def _rotations(angles: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) rotation matrices from (n, 3) angles about the three axes."""
    n = angles.shape[0]
    out = torch.eye(3).expand(n, 3, 3).clone()
    for axis in range(3):
        c, s = torch.cos(angles[:, axis]), torch.sin(angles[:, axis])
        a, b = (i for i in range(3) if i != axis)
        r = torch.eye(3).expand(n, 3, 3).clone()
        r[:, a, a], r[:, a, b], r[:, b, a], r[:, b, b] = c, -s, s, c
        out = torch.bmm(out, r)
    return out
