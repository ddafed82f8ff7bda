"""Start-up reconciliation of the spool and the database.

An instance is answered Success only once its file is in the spool and its row
committed (docs/edge.md, "Durable before Success"), so after any stop -- SIGTERM,
SIGKILL, a power loss -- the two should agree.  :func:`reconcile_spool` runs
before the node listens and checks that they do:

- a temporary ``.*.part`` file is a data set that was never acknowledged (the
  node stopped while writing it): removed;
- a spool file without an instance row (the node stopped between the rename
  and the commit, so it was never acknowledged either, but it is whole) is
  recorded like a received instance; one that cannot be read is moved to
  ``storage.quarantine_dir`` with the reason logged;
- a row whose file is gone is marked (``instances.file_missing_at``) and
  logged: an instance that was acknowledged and lost, for the administrator;
  a re-send writes the file again and clears the mark;
- a row quarantined by an earlier version of the node (which quarantined the
  instances of aborted associations, wrongly: they had been acknowledged) is
  moved back into the spool, counted and its study given a run.

Only UIDs and counts are logged, never patient data.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.db.models import Instance, Series, SeriesState, Study, utcnow
from dicom_node.ingest.identity import InvalidInstanceError, read_identity
from dicom_node.ingest.recorder import Peer, Recorder
from dicom_node.ingest.spool import Spool, fsync_directory

logger = logging.getLogger(__name__)

#: The peer recorded for instances found in the spool at start-up.
RECONCILED_PEER = Peer(calling_ae_title="", address="spool reconciliation")


class UnreadableSpoolFile(Exception):  # noqa: N818 - a reason, not an error of the node
    """A spool file that cannot be recorded; the message is the reason (no patient data)."""


@dataclass
class ReconcileReport:
    """What start-up reconciliation found and did."""

    #: Temporary files of data sets never acknowledged, removed.
    partial_removed: int = 0
    #: Spool files without a row, recorded.
    recorded: int = 0
    #: Spool files without a row that could not be read, moved to the quarantine directory.
    set_aside: int = 0
    #: Rows whose spooled file is missing, marked now (rows marked earlier are not counted again).
    missing: int = 0
    #: Rows quarantined by an earlier version, moved back into the spool.
    restored: int = 0

    @property
    def clean(self) -> bool:
        """True when spool and database agreed."""
        return not (self.partial_removed or self.recorded or self.set_aside or self.missing or self.restored)


def reconcile_spool(spool: Spool, recorder: Recorder) -> ReconcileReport:
    """Bring the spool and the instance rows into agreement (see the module's description).

    Parameters
    ----------
    spool : Spool
        The node's spool.
    recorder : Recorder
        Records spool files that have no row.

    Returns
    -------
    ReconcileReport
        The counts, also logged.
    """
    report = ReconcileReport()
    _restore_quarantined(spool, recorder, report)
    with recorder.sessions() as session:
        rows = session.execute(select(Instance.id, Instance.spool_path, Instance.file_missing_at)
                               .where(Instance.quarantined.is_(False))).all()
    known = {str(Path(path)) for _, path, _ in rows}
    for path in sorted(spool.root.rglob("*")):
        if not path.is_file():
            continue
        if path.name.startswith(".") and path.name.endswith(".part"):
            path.unlink(missing_ok=True)
            report.partial_removed += 1
            continue
        if str(path) in known:
            continue
        try:
            _record_file(path, recorder)
            report.recorded += 1
        except UnreadableSpoolFile as exc:
            target = spool.quarantine_path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            logger.warning("spool file %s set aside in %s: %s", path.name, spool.quarantine, exc)
            report.set_aside += 1
    missing = [row_id for row_id, path, marked in rows if marked is None and not Path(path).exists()]
    found = [row_id for row_id, path, marked in rows if marked is not None and Path(path).exists()]
    with recorder.sessions.begin() as session:
        for ids, value in ((missing, utcnow()), (found, None)):  # found again: put back by hand
            for start in range(0, len(ids), 500):
                session.execute(update(Instance).where(Instance.id.in_(ids[start:start + 500]))
                                .values(file_missing_at=value))
    report.missing = len(missing)
    flagged = sum(1 for _, _, marked in rows if marked is not None) - len(found) + report.missing
    if report.clean:
        logger.info("spool reconciled: spool and database agree (%d instance row(s))", len(rows))
    else:
        logger.warning(
            "spool reconciled: %d unacknowledged partial file(s) removed, %d file(s) without a row recorded, "
            "%d unreadable file(s) set aside, %d row(s) newly found without a file, %d quarantined row(s) "
            "restored", report.partial_removed, report.recorded, report.set_aside, report.missing,
            report.restored)
    if flagged:
        logger.error("%d acknowledged instance(s) have no spooled file (instances.file_missing_at is set); "
                     "ask the sender to send them again", flagged)
    return report


def _record_file(path: Path, recorder: Recorder) -> None:
    """Record one spool file as if just received.

    Raises
    ------
    UnreadableSpoolFile
        The file is not a Part 10 file the node wrote, or its data set is refused.
    """
    try:
        data = path.read_bytes()
        if data[128:132] != b"DICM" or len(data) < 144:
            raise UnreadableSpoolFile("no DICOM preamble")
        group_length = struct.unpack_from("<I", data, 140)[0]
        meta = read_file_meta_info(path)
        ts_uid = str(meta.TransferSyntaxUID)
        sop_class = str(meta.MediaStorageSOPClassUID)
        ident, lossy = read_identity(data[144 + group_length:], ts_uid, sop_class)
    except InvalidInstanceError as exc:
        raise UnreadableSpoolFile(f"data set refused: {exc}") from exc
    except (InvalidDicomError, AttributeError, KeyError, TypeError, ValueError, NotImplementedError, EOFError,
            struct.error, zlib.error, OSError) as exc:
        raise UnreadableSpoolFile(f"file meta information unreadable ({type(exc).__name__})") from exc
    if ident.sop_instance_uid != str(meta.MediaStorageSOPInstanceUID) or path.stem != ident.sop_instance_uid:
        raise UnreadableSpoolFile("SOP Instance UID differs from the file's name or meta information")
    prior = recorder.prior(ident.sop_instance_uid)
    if prior is not None and not prior.quarantined and not prior.file_missing:
        raise UnreadableSpoolFile(f"a stray copy of instance {ident.sop_instance_uid}, recorded elsewhere")
    source = str(getattr(meta, "SourceApplicationEntityTitle", "") or "").strip()
    peer = Peer(calling_ae_title=source, address=RECONCILED_PEER.address)
    try:
        recorder.record_instance(ident, peer, path, len(data), hashlib.sha256(data).hexdigest(), ts_uid,
                                 lossy=lossy, prior=prior if prior is not None else False)
    except SQLAlchemyError as exc:
        raise UnreadableSpoolFile(f"not recorded ({type(exc).__name__})") from exc
    logger.info("spool file of instance %s had no row: recorded", ident.sop_instance_uid)


def _restore_quarantined(spool: Spool, recorder: Recorder, report: ReconcileReport) -> None:
    """Move rows quarantined by an earlier version back into the spool and count them again."""
    with recorder.sessions() as session:
        rows = session.execute(select(Instance.id, Instance.spool_path, Instance.series_id)
                               .where(Instance.quarantined.is_(True))).all()
    if not rows:
        return
    now = utcnow()
    with recorder.sessions.begin() as session:
        for row_id, spool_path, _ in rows:
            source = Path(spool_path)
            try:
                target = spool.root / source.resolve().relative_to(spool.quarantine)
            except ValueError:
                target = source
            values: dict[str, object] = {"quarantined": False, "spool_path": str(target)}
            if source != target and source.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                if spool.fsync:
                    fsync_directory(target.parent)
            elif not target.exists():
                values["file_missing_at"] = now
            session.execute(update(Instance).where(Instance.id == row_id).values(**values))
        for series_id in {row[2] for row in rows}:
            count = session.scalar(select(func.count(Instance.id)).where(
                Instance.series_id == series_id, Instance.quarantined.is_(False))) or 0
            session.execute(update(Series).where(Series.id == series_id).values(
                instance_count=count, state=SeriesState.RECEIVING.value, completed_at=None, last_received_at=now))
            study_id = session.scalar(select(Series.study_id).where(Series.id == series_id))
            session.execute(update(Study).where(Study.id == study_id).values(needs_run=True, last_received_at=now))
    report.restored = len(rows)
