"""A run's story in the database: a handful of short transactions, none nested, and every stage's columns kept.

The run goes through the real ``process_run`` on the small spooled study of :class:`tests.support.reports.Study5`
(conversion and preprocessing stood in for, since its instances are header-only); the engine's events count the
transactions and the connections held at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from sqlalchemy import event

from dicom_node.db.models import Run
from dicom_node.runs import processing as processing
from dicom_node.runs.processing import process_run
from model.inference import Predictor
from pipeline.preprocess import Preprocessed
from pipeline.select import SelectionRules
from tests.support.reports import MODEL, PREDICTION, Study5


def _converted(_files: Any, out_path: Path) -> Path:
    out_path.write_bytes(b"")
    return out_path


def _preprocessed(*_: Any, **__: Any) -> Preprocessed:
    return Preprocessed(volume=np.zeros((4, 4, 4), dtype=np.float32), stage_seconds={"n4": 0.5},
                        qc={"slices": 5.0}, registered=None)


class _Transactions:
    """Transactions begun on an engine, and the most connections one thread held at once."""

    def __init__(self) -> None:
        self.begun = 0
        self.held: dict[int, int] = {}
        self.most_held = 0

    def begin(self, _conn: Any) -> None:
        self.begun += 1

    def checkout(self, *_: Any) -> None:
        me = threading.get_ident()
        self.held[me] = self.held.get(me, 0) + 1
        self.most_held = max(self.most_held, self.held[me])

    def checkin(self, *_: Any) -> None:
        me = threading.get_ident()
        self.held[me] = self.held.get(me, 1) - 1


@pytest.fixture
def study(tmp_path: Path) -> Iterator[Study5]:
    made = Study5(tmp_path)
    made.ctx.rules = SelectionRules(requirements=(), scores=())  # any MR series will do
    made.ctx.predictor = cast(Predictor, SimpleNamespace(info=MODEL, predict=lambda volume, note: PREDICTION))
    yield made
    made.db.engine.dispose()


def test_a_run_opens_a_handful_of_short_transactions_none_nested(
        study: Study5, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = study.new_run()
    monkeypatch.setattr(processing, "convert_series", _converted)
    monkeypatch.setattr(processing, "preprocess", _preprocessed)
    counted = _Transactions()
    engine = study.db.engine
    event.listen(engine, "begin", counted.begin)
    event.listen(engine.pool, "checkout", counted.checkout)
    event.listen(engine.pool, "checkin", counted.checkin)
    try:
        process_run(run_id, study.ctx)
    finally:
        event.remove(engine, "begin", counted.begin)
        event.remove(engine.pool, "checkout", counted.checkout)
        event.remove(engine.pool, "checkin", counted.checkin)

    # claim; the study read; selection; preprocessing; the objects' read (notes store included); the result
    assert counted.begun <= 7, counted.begun
    assert counted.most_held == 1  # never a session opened while another is open
    with study.db.sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None
        assert (run.state, run.predicted_class) == ("succeeded", "AD")
        stamps = [run.created_at, run.selected_at, run.converted_at, run.preprocessed_at, run.notes_joined_at,
                  run.inferred_at, run.report_built_at, run.finished_at]
        assert all(stamps) and stamps == sorted(cast("list[datetime]", stamps)), stamps
        assert run.qc == {"slices": 5.0} and run.notes_used == []
        assert run.stage_seconds is not None and run.stage_seconds["preprocess.n4"] == 0.5
