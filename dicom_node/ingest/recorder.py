"""Accepting one received instance: check it, spool it, record it.

This is the work behind the C-STORE handler.  It never decodes pixel data: the
encoded dataset is written to the spool as it arrived (file and directory
fsynced when ``storage.fsync``) and its row committed (durably: see
:mod:`dicom_node.db.session`) before the handler answers Success.  The
recorder uses SQLAlchemy Core with cached study/series ids, so an instance
costs one lookup and three small statements in one transaction.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import ConfigError
from dicom_node.db.driver import DriverStatement, driver_transaction
from dicom_node.db.models import Instance, Rejection, Series, SeriesState, Study, utcnow
from dicom_node.ingest.identity import InstanceIdentity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """Who sent an instance."""

    calling_ae_title: str
    address: str


@dataclass(frozen=True)
class Prior:
    """What the database holds for a SOP Instance UID already received."""

    sha256: str
    quarantined: bool
    row_id: int | None = None
    #: Start-up found its spooled file gone: a re-send writes it again, whatever the policy.
    file_missing: bool = False


class Duplicate(StrEnum):
    """What to do with a received instance given the duplicate policy."""

    NEW = "new"            # never seen, or only in quarantine (earlier versions)
    IGNORE = "ignore"      # identical re-send: acknowledged, nothing written
    REPLACE = "replace"    # overwrite the stored instance
    REJECT = "reject"      # refused with Duplicate SOP Instance


def duplicate_decision(policy: str, prior: Prior | None, digest: str) -> Duplicate:
    """Apply ``storage.duplicate_policy`` to a received instance.

    ``ignore_identical``: an identical re-send (same SHA-256) is acknowledged and
    ignored; changed content replaces the stored instance.  ``replace``: every
    re-send overwrites.  ``reject``: every re-send is refused (0x0111).
    An instance held only in quarantine (earlier versions), or whose spooled
    file was found missing, is always accepted as new.
    """
    if prior is None or prior.quarantined or prior.file_missing:
        return Duplicate.NEW
    if policy == "reject":
        return Duplicate.REJECT
    if policy == "ignore_identical" and prior.sha256 == digest:
        return Duplicate.IGNORE
    return Duplicate.REPLACE


#: The instance columns written on every receipt (besides its UID and series).
_INSTANCE_VALUES = ("sop_class_uid", "transfer_syntax_uid", "calling_ae_title", "peer_address", "spool_path",
                    "size_bytes", "sha256", "received_at", "association_id", "quarantined", "lossy",
                    "file_missing_at")


#: The columns of a study and of a series row created by their first instance.
_STUDY_VALUES = ("study_instance_uid", "patient_id", "issuer_of_patient_id", "accession_number", "study_date",
                 "first_received_at", "last_received_at", "needs_run")


_SERIES_VALUES = ("series_instance_uid", "study_id", "modality", "series_number", "series_description", "state",
                  "first_received_at", "last_received_at", "instance_count")


class Recorder:
    """Records received and rejected instances in the database.

    The per-instance statements are SQLAlchemy Core, compiled once and run on
    the driver's cursor (:mod:`dicom_node.db.driver`): one lookup before the
    file is written, one transaction after it (the instance row, its series and
    study re-opened; the study and series looked up or created when not cached).
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            raise ConfigError("Recorder needs a sessionmaker bound to an Engine")
        self.engine: Engine = bind
        # One writer at a time keeps study/series upserts race-free in one process.
        self._lock = threading.Lock()
        self._study_ids: dict[str, int] = {}
        self._series_ids: dict[str, int] = {}
        engine = self.engine
        self._prior = DriverStatement(engine, select(
            Instance.sha256, Instance.quarantined, Instance.id, Instance.file_missing_at).where(
            Instance.sop_instance_uid == bindparam("uid")))
        self._find_study = DriverStatement(engine, select(Study.id).where(
            Study.study_instance_uid == bindparam("uid")))
        self._add_study = DriverStatement(engine, insert(Study).returning(Study.id), _STUDY_VALUES)
        self._find_series = DriverStatement(engine, select(Series.id).where(
            Series.series_instance_uid == bindparam("uid")))
        self._add_series = DriverStatement(engine, insert(Series).returning(Series.id), _SERIES_VALUES)
        self._add_instance = DriverStatement(engine, insert(Instance), ("sop_instance_uid", "series_id",
                                                                         *_INSTANCE_VALUES))
        self._update_instance = DriverStatement(engine, update(Instance).where(
            Instance.id == bindparam("row_id")).values({key: bindparam(key) for key in ("series_id",
                                                                                          *_INSTANCE_VALUES)}))
        self._reopen_series = DriverStatement(engine, update(Series).where(
            Series.id == bindparam("series_id")).values(
            last_received_at=bindparam("now"), state=SeriesState.RECEIVING.value, completed_at=None,
            instance_count=Series.instance_count + bindparam("added")))
        self._reopen_study = DriverStatement(engine, update(Study).where(Study.id == bindparam("study_id")).values(
            last_received_at=bindparam("now"), needs_run=True))
        self._reopen_study_ae = DriverStatement(engine, update(Study).where(
            Study.id == bindparam("study_id")).values(
            last_received_at=bindparam("now"), needs_run=True, called_ae_title=bindparam("called")))

    def prior(self, sop_instance_uid: str) -> Prior | None:
        """The stored digest, quarantine and missing-file flags of *sop_instance_uid*, if any."""
        with driver_transaction(self.engine) as cursor:
            row = self._prior.execute(cursor, {"uid": sop_instance_uid}).fetchone()
        return None if row is None else Prior(row[0], bool(row[1]), int(row[2]), row[3] is not None)

    def _id(self, cursor: Any, find: DriverStatement, add: DriverStatement, uid: str,
            values: dict[str, object]) -> int:
        """The row id of a study or series: looked up, or inserted with *values*."""
        found = find.execute(cursor, {"uid": uid}).fetchone()
        if found is None:
            found = add.execute(cursor, values).fetchall()[0]
        return int(found[0])

    def _study_id(self, cursor: Any, ident: InstanceIdentity, now: datetime) -> int:
        cached = self._study_ids.get(ident.study_instance_uid)
        if cached is not None:
            return cached
        return self._id(cursor, self._find_study, self._add_study, ident.study_instance_uid, dict(
            study_instance_uid=ident.study_instance_uid, patient_id=ident.patient_id,
            issuer_of_patient_id=ident.issuer_of_patient_id, accession_number=ident.accession_number,
            study_date=ident.study_date, first_received_at=now, last_received_at=now, needs_run=False))

    def _series_id(self, cursor: Any, ident: InstanceIdentity, study_id: int, now: datetime) -> int:
        cached = self._series_ids.get(ident.series_instance_uid)
        if cached is not None:
            return cached
        return self._id(cursor, self._find_series, self._add_series, ident.series_instance_uid, dict(
            series_instance_uid=ident.series_instance_uid, study_id=study_id, modality=ident.modality,
            series_number=ident.series_number, series_description=ident.series_description,
            state=SeriesState.RECEIVING.value, first_received_at=now, last_received_at=now, instance_count=0))

    def record_instance(
        self, ident: InstanceIdentity, peer: Peer, path: Path, size: int, digest: str, ts_uid: str, *,
        changed: bool = True, association_id: int | None = None, called_ae_title: str | None = None,
        lossy: bool = False, prior: Prior | Literal[False] | None = None,
    ) -> None:
        """Record a spooled instance (insert, or update a replaced, quarantined or missing one).

        Parameters
        ----------
        ident, peer : InstanceIdentity, Peer
            What was received and from whom.
        path, size, digest, ts_uid : Path, int, str, str
            The spooled file, its size, SHA-256 and transfer syntax.
        changed : bool
            False when the content is identical to what is stored (a ``replace``
            of the same bytes): the row is refreshed but the series is not
            re-opened and the study gets no new run.
        association_id : int, optional
            The association log row that delivered it (None: recorded at start-up from the spool).
        called_ae_title : str, optional
            Our AE title the sender called (picks the study's profile).
        lossy : bool
            The instance is lossy compressed.
        prior : Prior or False, optional
            What :meth:`prior` returned just before (False: nothing stored),
            which saves looking the instance up again; None looks it up.
        """
        now = utcnow()
        values = dict(
            sop_class_uid=ident.sop_class_uid, transfer_syntax_uid=ts_uid, calling_ae_title=peer.calling_ae_title[:16],
            peer_address=peer.address[:64], spool_path=str(path), size_bytes=size, sha256=digest, received_at=now,
            association_id=association_id, quarantined=False, lossy=lossy, file_missing_at=None,
        )
        with self._lock:
            try:
                study_id, series_id = self._record(ident, values, now, changed, called_ae_title, prior)
            except IntegrityError:  # recorded meanwhile by another process: look everything up again
                self._study_ids.pop(ident.study_instance_uid, None)
                self._series_ids.pop(ident.series_instance_uid, None)
                study_id, series_id = self._record(ident, values, now, changed, called_ae_title, None)
        if len(self._series_ids) > 10_000:
            self._series_ids.clear()
            self._study_ids.clear()
        self._study_ids[ident.study_instance_uid] = study_id
        self._series_ids[ident.series_instance_uid] = series_id

    def _record(self, ident: InstanceIdentity, values: dict[str, object], now: datetime, changed: bool,
                called_ae_title: str | None, prior: Prior | Literal[False] | None) -> tuple[int, int]:
        """One transaction: study and series ids, the instance row, and the series and study re-opened."""
        with driver_transaction(self.engine) as cursor:
            study_id = self._study_id(cursor, ident, now)
            series_id = self._series_id(cursor, ident, study_id, now)
            if prior is None or (prior is not False and prior.row_id is None):
                found = self._prior.execute(cursor, {"uid": ident.sop_instance_uid}).fetchone()
                row = None if found is None else (int(found[2]), bool(found[1]))
            else:
                row = None if prior is False else (int(prior.row_id or 0), prior.quarantined)
            if row is None:
                self._add_instance.execute(cursor, {"sop_instance_uid": ident.sop_instance_uid,
                                                    "series_id": series_id, **values})
                added, changed = 1, True
            else:
                self._update_instance.execute(cursor, {"row_id": row[0], "series_id": series_id, **values})
                added = 1 if row[1] else 0
                changed = changed or row[1]
            if changed:
                self._reopen_series.execute(cursor, {"series_id": series_id, "now": now, "added": added})
                if called_ae_title:
                    self._reopen_study_ae.execute(cursor, {"study_id": study_id, "now": now,
                                                           "called": called_ae_title[:16]})
                else:
                    self._reopen_study.execute(cursor, {"study_id": study_id, "now": now})
        return study_id, series_id

    def record_rejection(
        self, peer: Peer, status: int, reason: str, sop_class_uid: str | None, sop_instance_uid: str | None
    ) -> None:
        """Record a refused instance or association and the reason given."""
        with self.sessions.begin() as session:
            session.add(
                Rejection(
                    received_at=utcnow(),
                    calling_ae_title=peer.calling_ae_title[:16],
                    peer_address=peer.address[:64],
                    sop_class_uid=(sop_class_uid or None) and sop_class_uid[:64],
                    sop_instance_uid=(sop_instance_uid or None) and sop_instance_uid[:64],
                    status=int(status),
                    reason=reason,
                )
            )

