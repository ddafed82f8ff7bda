"""Self-supervised pretraining of the demonstration base's vision side (``dicom-node model pretrain``).

M3D-CLIP's vision encoder arrives pretrained; the demonstration base (:mod:`model.demo`)
is small enough to be pretrained here, on this machine, from unlabeled brain volumes
that the project makes itself:

* **Data.** Every step draws fresh unlabeled volumes from the synthetic cohort's
  generator (:mod:`model.cohort`: the MNI152 brain in the tensor contract at
  ``size``^3) with anatomy drawn *independently of any diagnosis*: ventricle
  enlargement and hippocampal / medial temporal shrinkage each uniform over
  their whole range (:data:`model.augment.VENTRICLE_RANGE`, :data:`model.augment.HIPPOCAMPUS_RANGE`), not
  tied to a stage or a class.  No label, no note, no evaluation subject is used.
* **Objective.** Contrastive across augmentations (SimCLR's NT-Xent): two views
  of the same anatomy, each with its own pose (rotation, scale, shift), smooth
  bias field, contrast (gamma) and noise, wider than the cohort's, must be each
  other's nearest neighbour among the batch's views.  What is common to the two
  views is the anatomy, so the encoder's class token -- the feature the
  Brain-Adapter reads -- learns the anatomy and forgets the acquisition.
* **What is trained.** The ViT (and a small projector MLP on the class token that
  is thrown away afterwards); the depth adapter only with ``train_adapter`` (by
  default it stays the plain depth pooling: pretraining it too changed nothing
  measurable).  The text tower, projections and heads are not touched.  After
  pretraining the encoder is frozen, as the paper freezes M3D-CLIP's.

Output: ``vision.safetensors`` (the ``adapter.`` and ``vision_encoder.`` tensors,
metadata: the recipe and the SHA-256 of the tensors, :func:`model.demo.tensors_sha256`)
and ``pretrain.json`` (recipe, loss per logged step, time, peak memory, a
linear-probe diagnostic).  Results are bit-identical for a given torch build, CPU
and thread count (``threads``).  The diagnostic
(:func:`probe`) uses the generator's anatomy parameters of held-out generated
volumes only to *report* how much anatomy the class token carries (R^2 of a ridge
regression), never to train.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional

from model.augment import AnatomySampler, AugmentConfig
from model.brain_adapter import BrainAdapter, DepthAdapter
from model.cohort import anatomy
from model.demo import DEMO_VISION_FILE, PRETRAIN_INFO_FILE, build_demo_base, tensors_sha256, vision_state
from model.errors import ModelInputError

logger = logging.getLogger(__name__)

#: Pretrained weights file (:data:`model.demo.DEMO_VISION_FILE`); its summary is ``PRETRAIN_INFO_FILE``.
VISION_FILE = DEMO_VISION_FILE


@dataclass(frozen=True)
class PretrainConfig:
    """Recipe of :func:`pretrain`.

    Parameters
    ----------
    size : int
        Volume edge (the cohort's; 64 for the demonstration model).
    base_seed : int
        Seed of the demonstration base whose vision side is pretrained (its initial weights).
    seed : int
        Seed of the data and the augmentations; kept apart from the cohorts' seeds.
    steps : int
        Optimizer steps.
    batch_size : int
        Anatomies per step (two views each).
    lr : float
        Peak AdamW learning rate (linear warm-up, cosine decay).
    warmup : int
        Warm-up steps.
    weight_decay : float
        AdamW weight decay.
    temperature : float
        NT-Xent temperature.
    projector_dim : int
        Output width of the projector MLP (discarded after pretraining).
    threads : int
        Torch CPU threads (results are reproducible for a given thread count).
    train_adapter : bool
        Pretrain the depth adapter with the ViT (else it stays the plain depth pooling).
    augment : AugmentConfig
        The acquisition changes.
    """

    size: int = 64
    base_seed: int = 0
    seed: int = 20_000
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.05
    temperature: float = 0.2
    projector_dim: int = 128
    threads: int = 2
    train_adapter: bool = False
    augment: AugmentConfig = AugmentConfig()  # noqa: RUF009 -- a frozen dataclass (model.augment), immutable

    def __post_init__(self) -> None:
        """Validate.

        Raises
        ------
        ModelInputError
            On non-positive sizes or counts.
        """
        if self.steps <= 0 or self.batch_size < 2 or self.threads <= 0:
            raise ModelInputError("steps and threads must be positive and batch_size at least 2")
        if self.size <= 0 or 256 % self.size or self.size % 32:
            raise ModelInputError(f"size must divide 256 and be a multiple of 32, got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        data = asdict(self)
        data["augment"]["noise"] = list(self.augment.noise)
        return data


class Projector(nn.Module):
    """The MLP on the class token that the contrastive loss sees (discarded after pretraining).

    Parameters
    ----------
    width : int
        Class-token width.
    out_dim : int
        Output width.
    """

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        # batch normalisation first: a random ViT's class tokens differ across volumes by a few per cent
        # of their norm; standardising them over the batch gives the loss a signal from the first step
        self.net = nn.Sequential(nn.BatchNorm1d(width), nn.Linear(width, 2 * width), nn.BatchNorm1d(2 * width),
                                 nn.GELU(), nn.Linear(2 * width, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project (B, width) to (B, out_dim)."""
        return self.net(x)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over two views of a batch.

    Parameters
    ----------
    z1, z2 : torch.Tensor
        (B, E): row i of each is a view of sample i.
    temperature : float
        Softmax temperature.

    Returns
    -------
    torch.Tensor
        Scalar loss: each view must pick its partner among the other 2B - 1 views.
    """
    z = functional.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return functional.cross_entropy(sim, target)


class VisionSide(nn.Module):
    """The part of a Brain-Adapter that pretraining trains: depth adapter and ViT, class token out.

    Parameters
    ----------
    adapter : DepthAdapter
        The model's ``adapter``.
    vision_encoder : torch.nn.Module
        The model's ``vision_encoder``.
    train_adapter : bool
        Whether the adapter is trained too; when not, and its residual branch is
        still zero (untrained), only its pooling is computed (same values, a
        fraction of the time).
    """

    def __init__(self, adapter: DepthAdapter, vision_encoder: nn.Module, train_adapter: bool = False) -> None:
        super().__init__()
        self.adapter = adapter
        self.vision_encoder = vision_encoder
        self.train_adapter = train_adapter
        last = adapter.branch[-1]
        self.plain = not train_adapter and all(not bool(p.any()) for p in last.parameters())

    def trained_parameters(self) -> list[nn.Parameter]:
        """The parameters pretraining updates."""
        params = list(self.vision_encoder.parameters())
        return [*self.adapter.parameters(), *params] if self.train_adapter else params

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """Class token (B, hidden) of a (B, 1, D, H, W) batch."""
        if self.plain:
            reduced = self.adapter.pool(volume)
        elif self.train_adapter:
            reduced = self.adapter(volume)
        else:
            with torch.no_grad():
                reduced = self.adapter(volume)
        out: torch.Tensor = self.vision_encoder(reduced)[:, 0]
        return out


def _schedule(step: int, config: PretrainConfig) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(config: PretrainConfig, out_dir: Path, *, model: BrainAdapter, progress: bool = False) -> Path:
    """Pretrain a model's ViT (and adapter) by contrast across acquisitions; write ``vision.safetensors``.

    Parameters
    ----------
    config : PretrainConfig
        The recipe.
    out_dir : Path
        Output folder (created).
    model : BrainAdapter
        The demonstration base at ``config.size``; its ViT (and, with
        ``config.train_adapter``, its adapter) is trained in place.
    progress : bool
        Log the loss every 20 steps at INFO (else every 100).

    Returns
    -------
    Path
        The written ``vision.safetensors``.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        generator = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            side = VisionSide(model.adapter, model.vision_encoder, config.train_adapter)
            projector = Projector(model.vision_encoder.config.hidden_size, config.projector_dim)
        sampler = AnatomySampler(anatomy("mni152", config.size), config.augment, generator)
        params = [*side.trained_parameters(), *projector.parameters()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, config))
        side.train()
        history: list[dict[str, float]] = []
        every = 20 if progress else 100
        window: list[float] = []
        for step in range(config.steps):
            ventricle, hippocampus = sampler.anatomies(config.batch_size)
            z = projector(side(sampler.views(ventricle, hippocampus, copies=2)))
            loss = nt_xent(z[: config.batch_size], z[config.batch_size:], config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            window.append(float(loss.detach()))
            if (step + 1) % every == 0 or step + 1 == config.steps:
                history.append({"step": step + 1, "loss": round(float(np.mean(window)), 4),
                                "seconds": round(time.perf_counter() - started, 1)})
                window = []
                logger.info("pretrain step %d/%d: loss %.4f", step + 1, config.steps, history[-1]["loss"])
        side.eval()
        for p in params:
            p.requires_grad_(False)
        state = vision_state(model)
        digest = tensors_sha256(state)
        weights = out / VISION_FILE
        save_file(state, str(weights), metadata={"format": "brain-adapter-pretrained-vision", "sha256": digest,
                                                 "recipe": json.dumps(config.to_dict(), sort_keys=True)})
        diagnostics = probe(side, sampler, n=96)
    finally:
        torch.set_num_threads(previous_threads)
    info = {"format": "brain-adapter-pretrain", "config": config.to_dict(), "vision_sha256": digest,
            "history": history, "probe": diagnostics, "seconds": round(time.perf_counter() - started, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "torch": torch.__version__}
    (out / PRETRAIN_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    logger.info("pretrained vision side written to %s (sha256 %s, %.0f s)", weights, digest[:12], info["seconds"])
    return weights


def pretrain_demo_base(config: PretrainConfig, out_dir: Path, *, progress: bool = False) -> Path:
    """Pretrain the demonstration base of ``config.size`` and ``config.base_seed`` (``dicom-node model pretrain``).

    Parameters
    ----------
    config : PretrainConfig
        The recipe.
    out_dir : Path
        Output folder (``model/demo`` for the committed model).
    progress : bool
        Log the loss more often.

    Returns
    -------
    Path
        The written ``vision.safetensors``; train on it with ``dicom-node train
        --demo-base --demo-vision PATH``.
    """
    model = build_demo_base(config.size, seed=config.base_seed, use_note=False)
    return pretrain(config, out_dir, model=model, progress=progress)


def class_tokens(side: nn.Module, volumes: torch.Tensor, batch_size: int = 32) -> NDArray[np.float64]:
    """Class tokens of a volume batch, computed in chunks without gradients."""
    with torch.no_grad():
        return torch.cat([side(volumes[i:i + batch_size]) for i in range(0, len(volumes), batch_size)]).double().numpy()


def probe(side: nn.Module, sampler: AnatomySampler, n: int = 96) -> dict[str, float]:
    """How much anatomy the class token carries: cross-validated ridge R^2 of the atrophy scales.

    A report, not a training signal: ``n`` fresh unlabeled volumes (one acquisition
    each), 4-fold cross-validation of a ridge regression from the class token to
    the generator's ventricle and hippocampus scales.

    Parameters
    ----------
    side : torch.nn.Module
        Adapter + ViT returning the class token.
    sampler : AnatomySampler
        Source of the volumes (continues its random stream).
    n : int
        Volumes.

    Returns
    -------
    dict
        ``ventricle_r2`` and ``hippocampus_r2``.
    """
    ventricle, hippocampus = sampler.anatomies(n)
    feats = np.concatenate([class_tokens(side, sampler.views(ventricle[i:i + 32], hippocampus[i:i + 32]))
                            for i in range(0, n, 32)])  # 32 volumes at a time: memory
    return {"ventricle_r2": round(_ridge_cv_r2(feats, ventricle.double().numpy()), 3),
            "hippocampus_r2": round(_ridge_cv_r2(feats, hippocampus.double().numpy()), 3)}


def _ridge_cv_r2(x: NDArray[np.float64], y: NDArray[np.float64], folds: int = 4, alpha: float = 1.0) -> float:
    """Cross-validated R^2 of a ridge regression on standardised features."""
    pred = np.zeros_like(y)
    for k in range(folds):
        test = np.arange(len(y)) % folds == k
        mu, sd = x[~test].mean(0), x[~test].std(0) + 1e-8
        a, b = (x[~test] - mu) / sd, (x[test] - mu) / sd
        w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ (y[~test] - y[~test].mean()))
        pred[test] = b @ w + y[~test].mean()
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())

