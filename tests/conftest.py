"""Shared fixtures: settings in a temporary directory, a database, servers on free ports."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.cli.localpacs import LocalOrthanc
from dicom_node.db.session import Database, open_database
from dicom_node.settings import Settings, load_settings
from model.inference import init_demo_model

DCMTK = Path("/usr/bin")
POSTGRES_URL = os.environ.get("DICOM_NODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def require_tool(name: str) -> str:
    """Full path of a Debian tool (DCMTK, dicom3tools, Orthanc); fail clearly when missing."""
    path = DCMTK / name if (DCMTK / name).exists() else Path(shutil.which(name) or "")
    if not path or not Path(path).exists():
        pytest.fail(f"{name} is not installed: run `make setup` (Debian packages dcmtk, dicom3tools, orthanc)")
    return str(path)


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    """Settings rooted in *tmp_path*: port 0, SQLite, quick completeness, no volumetry (about a minute per run)."""
    values: dict[str, object] = {
        "storage.data_dir": str(tmp_path / "node"),
        "volumetry.enabled": False,  # on in the product; the tests of volumes and priors turn it on
        "network.port": 0,
        "http.port": 0,  # the HTTP side on a free port (several nodes may run at once)
        "network.allowed_calling_ae_titles": ["SCANNER"],
        "completeness.quiet_period_s": 1.0,
        "completeness.poll_interval_s": 0.2,
        "destinations": [],
    }
    values.update(overrides)
    return load_settings(environ={}, overrides=values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default test settings."""
    return make_settings(tmp_path)


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    """A migrated SQLite database under the test's data directory."""
    db = open_database(settings.database_url)
    yield db
    db.engine.dispose()


@pytest.fixture
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    """A running Orthanc (the receiving PACS) on free ports."""
    require_tool("Orthanc") if shutil.which("Orthanc") else None
    pacs = LocalOrthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained demonstration model (``dicom-node model init-demo``), written once per session."""
    return init_demo_model(tmp_path_factory.mktemp("model") / "demo")
