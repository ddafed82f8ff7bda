"""Helpers for tests that run the whole node: settings with a PACS, DCMTK storescu, SR checks."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select

from dicom_node.app import Node
from dicom_node.cli.localpacs import LocalOrthanc, wait_for
from dicom_node.db.models import Run
from dicom_node.settings import Settings
from tests.conftest import make_settings, require_tool


def node_settings(tmp_path: Path, pacs: LocalOrthanc, model: Path, **overrides: object) -> Settings:
    """Test settings that send reports to ``pacs`` and use the model directory ``model``."""
    values: dict[str, object] = {
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}],
        "model.path": str(model),
        "network.allowed_calling_ae_titles": ["SCANNER"],
    }
    values.update(overrides)
    return make_settings(tmp_path, **values)


def send(node: Node, directory: Path, timeout_s: float = 120, options: Sequence[str] = ()) -> None:
    """C-STORE every file under ``directory`` to the node with DCMTK ``storescu`` (calling AE ``SCANNER``).

    ``options`` go to storescu before the peer, e.g. ``["-xt"]`` to propose JPEG-LS lossless (storescu
    proposes only uncompressed syntaxes by default and cannot transcode a compressed file).
    """
    result = subprocess.run(
        [require_tool("storescu"), "-aet", "SCANNER", "-aec", node.settings.network.ae_title, "+sd", "+r",
         *options, "127.0.0.1", str(node.server.port), str(directory)], capture_output=True, text=True,
        timeout=timeout_s, check=False)
    assert result.returncode == 0, result.stderr


def received_sr(pacs: LocalOrthanc, tmp_path: Path, timeout_s: float = 240) -> Path:
    """Wait for the one SR in Orthanc and save it as ``tmp_path / "sr.dcm"``."""
    found = wait_for(lambda: pacs.find_instances(Modality="SR"), timeout_s, "an SR in Orthanc", 0.5)
    assert len(found) == 1
    path = tmp_path / "sr.dcm"
    path.write_bytes(pacs.get_bytes(f"/instances/{found[0]['ID']}/file"))
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dicom3tools' ``dciodvfy`` reports for a file."""
    result = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def finished_run(node: Node, timeout_s: float = 60) -> Run:
    """The first run of the node's database recorded as finished (waits for it)."""
    def done() -> Run | None:
        with node.db.sessions() as session:
            return session.scalars(select(Run).where(Run.finished_at.is_not(None))).first()
    return wait_for(done, timeout_s, "the run to be recorded as finished")
