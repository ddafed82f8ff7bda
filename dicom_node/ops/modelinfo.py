"""Which model the node's runs use, for ``/readyz`` and ``dicom_node_model_info``, in every executor mode.

* ``processing.isolation = "thread"``: the node loaded the model itself; its
  predictor knows name, version and weights hash.
* worker processes (the default): the node's process loads no model; each worker
  reports the name of the model it loaded when it is ready.  Version and weights
  hash are read from the model directory the workers loaded (``model.path``) by
  :func:`model.identity.model_dir_identity`, the function loading uses (base weights,
  trained parts and temperature) -- without loading any weights (nor torch) here.
* Celery (``dicom-node worker`` on other machines): the listener cannot know; the
  metrics show the model of the most recent finished run from the database
  (:mod:`dicom_node.ops.metrics`, ``source="last_run"``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from dicom_node.settings import Settings
from model.identity import MANIFEST_FILE, WEIGHTS_FILE, model_dir_identity

#: The model package's file names, re-exported: this module reads the directory those name.
__all__ = ["MANIFEST_FILE", "WEIGHTS_FILE", "Identity", "ModelIdentity", "read_model_dir"]

logger = logging.getLogger(__name__)

Identity = dict[str, str]

#: Name, version and identity SHA-256 of a model directory, computed as loading it computes them (no torch).
read_model_dir = model_dir_identity


class ModelIdentity:
    """The identity of the model the node's runs use, or None while nothing is loaded.

    Parameters
    ----------
    settings : Settings
        ``model.path`` and the executor mode.
    loaded : callable
        What the node reports: the predictor's full identity (threads), the name
        its worker processes loaded, or None (starting, or Celery).
    """

    def __init__(self, settings: Settings, loaded: Callable[[], Identity | None]) -> None:
        self.settings = settings
        self._loaded = loaded
        self._lock = threading.Lock()
        self._on_disk: Identity | None = None
        self._read = False

    @property
    def reads_model_dir(self) -> bool:
        """True where the model is loaded by the node's worker processes (so the directory says the rest)."""
        processing = self.settings.processing
        return processing.executor == "local" and processing.isolation == "process"

    def __call__(self) -> Identity | None:
        """The model's name, version and weights hash (name only when the directory disagrees), or None."""
        loaded = self._loaded()
        if not loaded:
            return None
        if loaded.get("weights_sha256") or not self.reads_model_dir:
            return loaded
        on_disk = self.model_dir()
        if on_disk is None:
            return loaded
        if on_disk["name"] != loaded.get("name"):
            logger.warning("model.path now holds model %s, the worker processes loaded %s: restart the node",
                           on_disk["name"], loaded.get("name"))
            return loaded
        return dict(on_disk)

    def model_dir(self) -> Identity | None:
        """The model directory's identity, read once (the files the worker processes loaded at start)."""
        with self._lock:
            if not self._read:
                try:
                    self._on_disk = read_model_dir(self.settings.model_path)
                except (OSError, ValueError) as exc:
                    logger.warning("model identity not read from %s (%s)", self.settings.model_path,
                                   type(exc).__name__)
                    self._on_disk = None
                self._read = True
            return self._on_disk

    def prime(self) -> None:
        """Read the model directory now in a background thread (hashing large weights takes seconds)."""
        if self.reads_model_dir:
            threading.Thread(target=self.model_dir, name="model-identity", daemon=True).start()
