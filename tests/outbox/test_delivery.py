"""The outbox against real peers: Orthanc down then up, permanent rejects, status classes, CLI."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from sqlalchemy import select

from dicom_node.cli import main as cli
from dicom_node.cli.localpacs import LocalOrthanc, free_port, wait_for
from dicom_node.db.models import Delivery, Run, RunState, Study, utcnow
from dicom_node.db.session import Database, open_database
from dicom_node.outbox.delivery import deliver_due, list_deliveries, retry_deliveries
from dicom_node.settings import Settings
from dicom_node.statuses import FailureClass
from tests.conftest import make_settings
from tests.support.edge import mr_series, no_patient_data_in_logs

__all__ = ["no_patient_data_in_logs"]


def queue_delivery(db: Database, path: Path, destination: str) -> int:
    """What a finished run leaves in the outbox: one object for one destination."""
    now = utcnow()
    with db.sessions.begin() as session:
        study = Study(study_instance_uid=f"2.25.{uuid.uuid4().int}", first_received_at=now, last_received_at=now)
        session.add(study)
        session.flush()
        run = Run(id=str(uuid.uuid4()), study_id=study.id, state=RunState.SUCCEEDED.value, created_at=now,
                  finished_at=now)
        session.add(run)
        session.flush()
        delivery = Delivery(run_id=run.id, destination=destination, sop_instance_uid=str(dcmread(path).SOPInstanceUID),
                            object_path=str(path), created_at=now, next_attempt_at=now)
        session.add(delivery)
        session.flush()
        return int(delivery.id)


def delivery_row(db: Database, delivery_id: int) -> Delivery:
    with db.sessions() as session:
        row = session.get(Delivery, delivery_id)
        assert row is not None
        return row


def settings_for(tmp_path: Path, destinations: list[dict[str, object]]) -> Settings:
    return make_settings(tmp_path, **{"destinations": destinations, "delivery.initial_backoff_s": 0.2,
                                      "delivery.max_backoff_s": 0.5, "delivery.max_attempts": 6,
                                      "network.acse_timeout_s": 5})


def test_pacs_down_then_up_survives_a_node_restart(tmp_path: Path, orthanc: LocalOrthanc) -> None:
    settings = settings_for(tmp_path, [{"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1",
                                        "port": orthanc.dicom_port}])
    [path] = mr_series(tmp_path / "s", 11, 3)[:1]
    orthanc.stop()                                     # the PACS is down when the report is due
    db = open_database(settings.database_url)
    delivery_id = queue_delivery(db, path, "pacs")
    assert deliver_due(db.sessions, settings) == 1
    first = delivery_row(db, delivery_id)
    assert first.state == "pending" and first.attempts == 1 and first.failure_class == "connection_refused"
    db.engine.dispose()                                # the node stops ...
    orthanc.start()                                    # ... the PACS comes back ...
    db = open_database(settings.database_url)          # ... the node starts again, same outbox
    wait_for(lambda: deliver_due(db.sessions, settings) or delivery_row(db, delivery_id).state == "sent", 30,
             "the delivery", 0.1)
    wait_for(lambda: delivery_row(db, delivery_id).state == "sent", 30, "the delivery to be sent", 0.1)
    row = delivery_row(db, delivery_id)
    assert row.last_status == 0 and row.failure_class is None and row.attempts >= 2
    history = row.history or []
    assert history[0]["class"] == "connection_refused" and history[-1]["status"] == "0x0000"
    assert orthanc.find_instances(SOPInstanceUID=str(dcmread(path).SOPInstanceUID))
    db.engine.dispose()


def test_permanent_reject_is_dead_letter_without_retry_storm_and_can_be_replayed(
    tmp_path: Path, orthanc: LocalOrthanc, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    destinations: list[dict[str, object]] = [
        {"name": "wrongae", "ae_title": "NOT_PACS", "host": "127.0.0.1", "port": orthanc.dicom_port},
        {"name": "pacs", "ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    settings = settings_for(tmp_path, destinations)
    [path] = mr_series(tmp_path / "s", 12, 3)[:1]
    db = open_database(settings.database_url)
    delivery_id = queue_delivery(db, path, "wrongae")
    assert deliver_due(db.sessions, settings) == 1
    row = delivery_row(db, delivery_id)
    assert row.state == "dead" and row.attempts == 1 and row.failure_class == "rejected_permanent"
    assert "rejected permanently" in (row.last_error or "")
    assert deliver_due(db.sessions, settings) == 0        # no retry storm
    assert [d.id for d in list_deliveries(db.sessions, "dead")] == [delivery_id]

    monkeypatch.setenv("DICOM_NODE_DESTINATIONS", json.dumps(destinations))
    common = ["--data-dir", str(settings.data_dir)]
    assert cli.main(["deliveries", "list", "--state", "dead", *common]) == 0
    listed = capsys.readouterr().out
    assert "rejected_permanent" in listed and "wrongae" in listed
    assert cli.main(["echo", "pacs", *common]) == 0
    assert "C-ECHO pacs: status 0x0000" in capsys.readouterr().out
    assert cli.main(["echo", "wrongae", *common]) == 1
    with db.sessions.begin() as session:                  # the administrator fixes the AE title ...
        fixed = session.get(Delivery, delivery_id)
        assert fixed is not None
        fixed.destination = "pacs"
    assert cli.main(["deliveries", "retry", str(delivery_id), *common]) == 0   # ... and replays it
    assert deliver_due(db.sessions, settings) == 1
    row = delivery_row(db, delivery_id)
    assert row.state == "sent" and row.attempts == 1
    assert row.history is not None
    assert [h.get("event") for h in row.history] == [None, "replayed", None]
    assert retry_deliveries(db.sessions, all_dead=True) == 0
    db.engine.dispose()


@pytest.fixture
def scripted_pacs() -> Iterator[tuple[int, list[int]]]:
    """A pynetdicom Storage SCP answering the statuses listed, one per C-STORE."""
    statuses: list[int] = []
    ae = AE(ae_title="SCRIPTED")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(("127.0.0.1", free_port()), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: statuses.pop(0))])
    assert server is not None
    yield int(server.server_address[1]), statuses
    server.shutdown()


def test_status_classes_warning_out_of_resources_and_failure(tmp_path: Path,
                                                              scripted_pacs: tuple[int, list[int]]) -> None:
    port, statuses = scripted_pacs
    settings = settings_for(tmp_path, [{"name": "p", "ae_title": "SCRIPTED", "host": "127.0.0.1", "port": port}])
    [path] = mr_series(tmp_path / "s", 1, 3)[:1]
    db = open_database(settings.database_url)
    statuses.extend([0xA700, 0xB000])                      # Out of Resources, then stored with a warning
    delivery_id = queue_delivery(db, path, "p")
    deliver_due(db.sessions, settings)
    row = delivery_row(db, delivery_id)
    assert row.state == "pending" and row.failure_class == FailureClass.OUT_OF_RESOURCES.value
    assert row.last_attempt_at is not None
    assert 0.1 < (row.next_attempt_at - row.last_attempt_at).total_seconds() < 1
    wait_for(lambda: deliver_due(db.sessions, settings), 5, "the retry", 0.05)
    row = delivery_row(db, delivery_id)
    assert row.state == "sent" and row.last_status == 0xB000 and row.failure_class == "warning"
    assert row.history is not None
    assert [h["status"] for h in row.history] == ["0xA700", "0xB000"]
    statuses.append(0xC000)                                 # Cannot understand: permanent for this object
    failed = queue_delivery(db, path, "p")
    deliver_due(db.sessions, settings)
    row = delivery_row(db, failed)
    assert row.state == "dead" and row.attempts == 1 and row.failure_class == FailureClass.FAILURE_STATUS.value
    refused = queue_delivery(db, path, "nowhere")           # a destination that is not configured
    deliver_due(db.sessions, settings)
    assert delivery_row(db, refused).state == "dead"
    with db.sessions() as session:
        assert len(session.scalars(select(Delivery)).all()) == 3
    db.engine.dispose()
