"""A node data directory with one spooled, recorded study, and runs processed on it with the analysis stubbed.

Shared by the tests of the objects a run writes (``tests/outbox/test_objects.py``)
and of processing failures (``tests/runs/test_processing_failures.py``).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pydicom
import pytest
from pydicom import Dataset
from sqlalchemy import select

from dicom_node.db.models import Delivery, Instance, Run, RunState, Series, Study, utcnow
from dicom_node.db.session import open_database
from dicom_node.runs import processing as processing
from dicom_node.runs.context import RunContext
from dicom_node.runs.processing import process_run
from model.inference import Predictor
from model.types import ModelInfo, Prediction
from pipeline.preprocess_config import PreprocessConfig
from pipeline.select import load_rules
from structured_reports.types import NotesUsed
from tests.conftest import make_settings
from tests.support.sr import make_mr_series

MODEL = ModelInfo(name="Brain-Adapter", version="0.0-demo", weights_sha256="ab" * 32, demonstration=True,
                  parameters={"preset": "demo"})
PREDICTION = Prediction(probabilities={"AD": 0.61, "MCI": 0.29, "CN": 0.10}, predicted_class="AD", used_note=False)
DESTINATIONS = [
    {"name": "both", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
    {"name": "sronly", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "objects": ["sr"]},
    {"name": "pdfonly", "ae_title": "VIEWER", "host": "127.0.0.1", "port": 104, "objects": ["pdf"]},
]

#: Outbox directories written by every :class:`Study5`, scanned by the last test of ``tests/outbox/test_objects.py``.
WRITTEN: list[Path] = []


class Study5:
    """A node data directory with one spooled 5-instance study recorded in the database."""

    def __init__(self, root: Path) -> None:
        self.settings = make_settings(root, destinations=DESTINATIONS, **{
            "network.profiles": [{"ae_title": "RESEARCH", "destinations": ["pdfonly"]}]})
        self.db = open_database(self.settings.database_url)
        self.ctx = RunContext(settings=self.settings, sessions=self.db.sessions,
                              predictor=cast(Predictor, SimpleNamespace(info=MODEL)),
                              rules=load_rules(self.settings.series_rules_path), preprocess_config=PreprocessConfig())
        self.series = make_mr_series()
        first = self.series[0]
        self.study_uid, self.series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        now = utcnow()
        with self.db.sessions.begin() as session:
            study = Study(study_instance_uid=self.study_uid, patient_id=str(first.PatientID),
                          first_received_at=now, last_received_at=now)
            session.add(study)
            session.flush()
            self.study_id = study.id
            series = Series(series_instance_uid=self.series_uid, study_id=study.id, modality="MR", series_number=3,
                            state="complete", instance_count=0, first_received_at=now, last_received_at=now)
            session.add(series)
            session.flush()
            self.series_id = series.id
        for ds in self.series:
            self.add_instance(ds)
        WRITTEN.append(self.settings.outbox_dir)

    def add_instance(self, ds: Dataset) -> None:
        """Spool one instance and record it (as ingest does)."""
        path = self.settings.spool_dir / self.study_uid / self.series_uid / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        data = path.read_bytes()
        with self.db.sessions.begin() as session:
            session.add(Instance(sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                                 series_id=self.series_id, transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                                 calling_ae_title="SCANNER", peer_address="127.0.0.1", spool_path=str(path),
                                 size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), received_at=utcnow()))

    def new_run(self, supersedes: str | None = None) -> str:
        run_id = str(uuid.uuid4())
        with self.db.sessions.begin() as session:
            session.add(Run(id=run_id, study_id=self.study_id, state=RunState.QUEUED.value, created_at=utcnow(),
                            supersedes_run_id=supersedes))
        return run_id

    def run(self, analyse: Callable[..., Any], supersedes: str | None = None) -> Run:
        """Queue and process one run with ``analyse`` standing in for the analysis."""
        run_id = self.new_run(supersedes)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(processing, "_analyse", analyse)
            process_run(run_id, self.ctx)
        with self.db.sessions() as session:
            run = session.get(Run, run_id)
            assert run is not None
            return run

    def deliveries(self, run_id: str) -> list[tuple[str, str]]:
        with self.db.sessions() as session:
            rows = session.scalars(select(Delivery).where(Delivery.run_id == run_id)).all()
            return sorted((d.destination, d.object_kind) for d in rows)


def analysed(ctx: RunContext, run_id: str, inputs: Any, progress: Any) -> tuple[str, Prediction, NotesUsed]:
    """Stand-in for a successful analysis of the one series."""
    return next(iter(inputs.by_series)), PREDICTION, NotesUsed()


def outbox(study: Study5, run: Run, kind: str) -> Path:
    return study.settings.outbox_dir / run.id / f"{kind}.dcm"


def sr_texts(path: Path) -> str:
    """Every TextValue of the SR's content tree at *path*, joined by newlines."""
    def walk(items: Any) -> Iterator[str]:
        for item in items:
            if "TextValue" in item:
                yield str(item.TextValue)
            yield from walk(item.get("ContentSequence", []))
    return "\n".join(walk(pydicom.dcmread(path).ContentSequence))
