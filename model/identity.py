"""A model directory's identity (name, version, the SHA-256 reports and the audit name), without torch.

:func:`model.checkpoint.load_model` and the node's metrics (``dicom_node/ops/modelinfo.py``, in a process that
never imports torch) compute it with the same functions, so the two cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

#: The manifest of a model directory.
MANIFEST_FILE = "brain_adapter.json"
#: The base weights of a model directory.
WEIGHTS_FILE = "model.safetensors"


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in chunks.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    str
        64 hex digits.
    """
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_identity(base_sha256: str, trained_files: Mapping[str, str], temperature: float) -> str:
    """SHA-256 identifying a base, the trained parts on it and the temperature together.

    Parameters
    ----------
    base_sha256 : str
        SHA-256 of ``model.safetensors``.
    trained_files : Mapping
        Relative path to SHA-256 of every file of the trained parts.
    temperature : float
        Served temperature.

    Returns
    -------
    str
        The base's own SHA-256 when there is nothing on top of it; otherwise the
        SHA-256 of a canonical JSON of the three.
    """
    if not trained_files and temperature == 1.0:
        return base_sha256
    doc = json.dumps({"base": base_sha256, "trained": dict(sorted(trained_files.items())),
                      "temperature": repr(float(temperature))}, sort_keys=True)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


def trained_files(root: Path) -> dict[str, str]:
    """Relative path to SHA-256 of a trained-parts file, or of every file under a folder."""
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return {p.relative_to(root.parent).as_posix(): sha256_file(p) for p in files}


def model_dir_identity(model_dir: Path) -> dict[str, str]:
    """Name, version and identity SHA-256 of a model directory, as loading it would give them, without loading.

    Parameters
    ----------
    model_dir : Path
        A model directory (manifest, base weights, trained parts if any).

    Returns
    -------
    dict
        ``name``, ``version`` and ``weights_sha256`` (:func:`model_identity` of base, trained parts, temperature).

    Raises
    ------
    OSError
        A file is missing or unreadable.
    ValueError
        The manifest is not a JSON object with a name and a version.
    """
    manifest = json.loads((model_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or "name" not in manifest or "version" not in manifest:
        raise ValueError(f"{model_dir / MANIFEST_FILE} has no name and version")
    trained = manifest.get("trained")
    files = trained_files(model_dir / trained["path"]) if isinstance(trained, dict) else {}
    identity = model_identity(sha256_file(model_dir / WEIGHTS_FILE), files, float(manifest.get("temperature", 1.0)))
    return {"name": str(manifest["name"]), "version": str(manifest["version"]), "weights_sha256": identity}
