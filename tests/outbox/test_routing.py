"""Which destinations receive a run's objects: the study's called AE title picks a profile."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from core.errors import ConfigError
from dicom_node.db.models import Run, RunState, Study, utcnow
from dicom_node.db.session import Database, open_database
from dicom_node.outbox.routing import destinations_for, routes
from dicom_node.settings import Settings
from tests.conftest import make_settings

DESTINATIONS = [
    {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
    {"name": "pdfonly", "ae_title": "VIEWER", "host": "127.0.0.1", "port": 105, "objects": ["pdf"]},
    {"name": "research", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": 106, "objects": ["sr"]},
]
PROFILES = [
    {"ae_title": "TRIAL", "destinations": ["research", "pdfonly"]},
    {"ae_title": "ALL_OF_THEM"},
    {"ae_title": "BROKEN", "destinations": ["pacs", "gone"]},
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, **{"destinations": DESTINATIONS, "network.profiles": PROFILES})


def names(settings: Settings, called: str | None) -> list[str]:
    return [d.name for d in destinations_for(settings, called)]


def test_a_profile_with_destinations_sends_only_there_in_its_order(settings: Settings) -> None:
    assert names(settings, "TRIAL") == ["research", "pdfonly"]


@pytest.mark.parametrize("called", ["AD_NODE", "ALL_OF_THEM", "UNKNOWN", None])
def test_the_main_title_an_unknown_one_or_a_profile_without_destinations_send_everywhere(
        settings: Settings, called: str | None) -> None:
    assert names(settings, called) == ["pacs", "pdfonly", "research"]


def test_a_profile_naming_an_unknown_destination_is_a_configuration_error(settings: Settings) -> None:
    with pytest.raises(ConfigError, match="gone"):
        destinations_for(settings, "BROKEN")


def _run_for(settings: Settings, called: str | None) -> tuple[Database, str]:
    db = open_database(settings.database_url)
    with db.sessions.begin() as session:
        now = utcnow()
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", first_received_at=now, last_received_at=now,
                      called_ae_title=called)
        session.add(study)
        session.flush()
        run = Run(id=str(uuid.uuid4()), study_id=study.id, state=RunState.RUNNING.value, created_at=now)
        session.add(run)
    return db, run.id


@pytest.mark.parametrize(("called", "expected"), [
    ("TRIAL", [("research", ("sr",)), ("pdfonly", ("pdf",))]),
    (None, [("pacs", ("sr", "pdf")), ("pdfonly", ("pdf",)), ("research", ("sr",))]),
])
def test_routes_name_each_destination_and_its_objects(settings: Settings, called: str | None,
                                                      expected: list[tuple[str, tuple[str, ...]]]) -> None:
    db, run_id = _run_for(settings, called)
    with db.sessions() as session:
        assert routes(settings, session, run_id) == (expected, None)
    db.engine.dispose()


def test_routes_of_a_misconfigured_profile_send_nothing_and_say_why(settings: Settings) -> None:
    db, run_id = _run_for(settings, "BROKEN")
    with db.sessions() as session:
        chosen, error = routes(settings, session, run_id)
    db.engine.dispose()
    assert chosen == []
    assert error is not None and error.startswith("not sent: ") and "gone" in error
