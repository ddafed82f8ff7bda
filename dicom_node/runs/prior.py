"""The comparison of a study with the patient's prior study, in the study's run.

Once the study itself is analysed, the run asks ``prior.pacs`` (Study Root
C-FIND, :mod:`dicom_node.net.qr`) for the patient's newest earlier study with a
candidate 3D T1 series, within ``prior.max_age_years`` before the Study Date
(PatientID, and IssuerOfPatientID when the study has one).

* **The node already analysed that study** (a succeeded run with the model this
  run uses and, with volumetry on, volumes measured by the same method or the
  reason they could not be): that run's result is reused (``runs.prior_run_id``);
  nothing is retrieved.
* **Otherwise** its best T1 series (ranked by the series-level rules) is retrieved
  and analysed here as the study itself was: selection by the full rules,
  conversion, preprocessing, volumetry, the clinical notes of the prior's date,
  the model.

How the prior is retrieved (``prior.retrieve``)
-----------------------------------------------
``"get"`` (the default): C-GET on the node's own association, into
``<work_dir>/<run id>/prior/``, the run's scratch directory, removed with it.
Not into the spool: start-up reconciliation records every file it finds there as
a received instance, so a node stopped mid-retrieve would turn the prior into a
study of its own.  And not by C-MOVE to the node's own AE title: the moved
instances arrive at the node's Storage SCP like any study, which queues the prior
for a run of its own (a second analysis, and an SR and a PDF of the prior sent
into the prior study); the PACS must also be allowed to call the node, and the
instances stay in the spool.

``"move"`` is honoured for a PACS without C-GET: C-MOVE to
``prior.move_destination`` (default the node's AE title).  The instances come in
through the node's listener, recorded before the C-MOVE's final response; the run
reads them from the spool and withdraws the prior study's request for a run of its
own (``studies.needs_run``, set by their arrival), so that the prior is analysed
once, here.

Every failure is a note, never a failed run
-------------------------------------------
No prior, a prior that is not retrievable, a PACS that refuses the query or the
retrieve or does not answer (each wait bounded by ``prior.*_timeout_s``), a prior
that cannot be analysed: the run keeps the study's own result, and
``prior_note`` says in plain words why there is no comparison, in the report and
in the run's record (``runs.prior_note``).  The log has UIDs, run ids and the
failure's category, never patient data.
"""

from __future__ import annotations

import errno
import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import select, update

from core.errors import NodeError, NotAnalysed, audit_traceback
from dicom_node.db.models import Instance, Run, RunState, Series, Study
from dicom_node.ingest.identity import check_uid
from dicom_node.net.qr import PriorStudyClient
from dicom_node.net.qrtypes import PriorCandidate, PriorFailure, PriorStudy, PriorStudyError
from dicom_node.runs.analysis import measure, notes_for, same_method, volumes_from_record, volumes_record
from dicom_node.runs.context import RunContext
from pipeline.convert import convert_series
from pipeline.notes import format_note_text
from pipeline.preprocess import preprocess
from pipeline.select import SeriesCandidate, select_series
from structured_reports.types import PriorResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurrentStudy:
    """The study a prior is looked for: its UID and the keys of the query."""

    study_instance_uid: str
    patient_id: str | None
    issuer: str | None
    study_date: date | None


@dataclass(frozen=True)
class PriorOutcome:
    """The prior to compare with, or why there is none.

    Parameters
    ----------
    prior : PriorResult or None
        The prior's result (None: ``note`` says why).
    note : str
        Why there is no comparison ("" when there is one, or when the comparison is off).
    study_instance_uid : str or None
        The prior study found (also when it could not be retrieved or analysed).
    source : str
        How the prior's result was had: ``"reused"`` (an earlier run of the node), ``"get"``, ``"move"``; "".
    volumes_note : str
        Why the prior has no volumes although volumetry is on ("" otherwise).
    seconds : dict of str to float
        Time of the query, the retrieve and the prior's analysis (``prior.query`` ...).
    """

    prior: PriorResult | None = None
    note: str = ""
    study_instance_uid: str | None = None
    source: str = ""
    volumes_note: str = ""
    seconds: dict[str, float] = field(default_factory=dict)

    def columns(self, ctx: RunContext) -> dict[str, Any]:
        """The run's audit columns: ``prior_study_uid``, ``prior_run_id``, ``prior_note`` and ``prior`` (JSON)."""
        record: dict[str, Any] | None = None
        if self.prior is not None:
            prior = self.prior
            record = {
                "study_instance_uid": prior.study_instance_uid,
                "study_date": prior.study_date.isoformat(),
                "series_instance_uid": prior.series_instance_uid,
                "instances": len(prior.instances),
                "source": self.source,
                "run_id": prior.run_id,
                "probabilities": dict(prior.probabilities) if prior.probabilities is not None else None,
                "volumes": (volumes_record(prior.volumes, ctx.volumetry)
                            if prior.volumes is not None and ctx.volumetry is not None else None),
                "volumes_note": self.volumes_note or None,
                "seconds": self.seconds,
            }
        return {"prior_study_uid": self.study_instance_uid, "prior_run_id": self.prior.run_id if self.prior else None,
                "prior_note": self.note or None, "prior": record}


class _Timer:
    """Seconds of the named steps of the comparison."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)


def compare_with_prior(ctx: RunContext, run_id: str, current: CurrentStudy, workdir: Path) -> PriorOutcome:
    """The prior study's result to compare *current* with, or why there is none (never raises).

    Parameters
    ----------
    ctx : RunContext
        ``ctx.prior_client`` asks the PACS (None: the comparison is off, an empty outcome).
    run_id : str
        The run (for the log).
    current : CurrentStudy
        The study analysed by the run.
    workdir : Path
        The run's scratch directory (a retrieved prior goes to ``workdir / "prior"``).

    Returns
    -------
    PriorOutcome
        The prior's result, or the note saying why there is none.
    """
    client = ctx.prior_client
    if client is None:
        return PriorOutcome()
    if not current.patient_id or current.study_date is None:
        return _without(run_id, None, "no prior study looked for: the study has no PatientID or no StudyDate", {})
    timer = _Timer()
    candidate: PriorCandidate | None = None
    try:
        with timer("prior.query"):
            candidate = client.find_prior(current.patient_id, current.issuer, current.study_date,
                                          current.study_instance_uid)
        study = candidate.study
        with timer("prior.lookup"):
            found = _reusable(ctx, run_id, study)
        if found is not None:
            reused, volumes_note = found
            logger.info("run %s: prior study %s: result of run %s reused", run_id, study.study_instance_uid,
                        reused.run_id)
            return PriorOutcome(reused, "", study.study_instance_uid, "reused", volumes_note, timer.seconds)
        return _retrieve_and_analyse(ctx, run_id, client, current, candidate, workdir, timer)
    except PriorStudyError as exc:
        note = _failure_note(exc, retrieving=candidate is not None)
        logger.info("run %s: no comparison with a prior study (%s)", run_id, exc.category.value)
    except NotAnalysed as exc:
        note = f"prior study not analysed: {exc.reason}"
        logger.info("run %s: prior study not analysed (%s)", run_id, exc.outcome.value)
    except NodeError as exc:  # ours: the message has no patient data
        note = f"prior study not analysed: {exc}"
        logger.warning("run %s: prior study not analysed: %s", run_id, exc)
    except Exception as exc:  # noqa: BLE001 - a bug in the comparison must not cost the study its result
        logger.error("run %s: the comparison with the prior study failed (%s):\n%s", run_id, type(exc).__name__,
                     audit_traceback(exc))
        note = f"prior study not compared: processing error ({type(exc).__name__}; see the node's log)"
    return _without(run_id, candidate.study.study_instance_uid if candidate else None, note, timer.seconds)


def _without(run_id: str, study_uid: str | None, note: str, seconds: dict[str, float]) -> PriorOutcome:
    logger.debug("run %s: prior note: %s", run_id, note)
    return PriorOutcome(None, note, study_uid, seconds=seconds)


def _failure_note(exc: PriorStudyError, *, retrieving: bool) -> str:
    """The report's sentence for a failed query or retrieve (the details name AE titles and statuses only)."""
    detail = str(exc).removeprefix(f"{exc.category.value}: ")
    if exc.category is PriorFailure.NO_PRIOR:
        return f"no prior study in the PACS ({detail})"
    if exc.category is PriorFailure.QUERY_TOO_BROAD:
        return f"no prior study looked for: the query matched too many studies ({detail})"
    step = "prior study not retrievable" if retrieving else "no prior study looked for"
    if exc.category is PriorFailure.PACS_REFUSED:
        return f"{step}: the PACS refused ({detail})"
    if exc.category is PriorFailure.PACS_UNREACHABLE:
        return f"{step}: the PACS did not answer ({detail})"
    return f"prior study not retrievable: {detail}"


def _reusable(ctx: RunContext, run_id: str, study: PriorStudy) -> tuple[PriorResult, str] | None:
    """The result of the node's latest succeeded run of *study* that compares with this run's, or None.

    It compares when it was made by the same model (same weights) and, with volumetry on, its volumes were measured
    by the same method (or could not be measured: measuring again would fail again).  The second value is that
    run's reason for having no volumes ("" when it has them, or volumetry is off), which the new run keeps.
    """
    weights = ctx.predictor.info.weights_sha256
    with ctx.sessions() as session:
        rows = session.execute(
            select(Run, Study.study_date).join(Study, Run.study_id == Study.id)
            .where(Study.study_instance_uid == study.study_instance_uid, Run.state == RunState.SUCCEEDED.value,
                   Run.prob_ad.is_not(None), Run.series_instance_uid.is_not(None))
            .order_by(Run.finished_at.desc())).all()
        for run, study_date in rows:
            if run.model_weights_sha256 != weights:
                logger.info("run %s: run %s of the prior used another model", run_id, run.id)
                continue
            volumes = run.volumes if ctx.volumetry is not None else None
            comparable = volumes is not None and ctx.volumetry is not None and same_method(volumes, ctx.volumetry)
            if ctx.volumetry is not None and not comparable and not run.volumes_note:
                logger.info("run %s: run %s of the prior has no volumes of this method", run_id, run.id)
                continue
            instances = session.execute(
                select(Instance.sop_class_uid, Instance.sop_instance_uid).join(Series)
                .where(Series.series_instance_uid == run.series_instance_uid, Instance.quarantined.is_(False))
                .order_by(Instance.id)).all()
            return PriorResult(
                study_instance_uid=study.study_instance_uid,
                study_date=study_date or study.study_date,
                series_instance_uid=str(run.series_instance_uid),
                instances=tuple((str(c), str(i)) for c, i in instances),
                volumes=volumes_from_record(volumes) if volumes is not None and comparable else None,
                probabilities={"AD": float(run.prob_ad or 0.0), "MCI": float(run.prob_mci or 0.0),
                               "CN": float(run.prob_cn or 0.0)},
                run_id=run.id,
            ), ((run.volumes_note or "") if ctx.volumetry is not None and not comparable else "")
    return None


def _retrieve_and_analyse(ctx: RunContext, run_id: str, client: PriorStudyClient, current: CurrentStudy,
                          candidate: PriorCandidate, workdir: Path, timer: _Timer) -> PriorOutcome:
    """Retrieve the prior's best T1 series (``prior.retrieve``) and analyse it as the run analysed the study."""
    study, series_uid = candidate.study, candidate.series[0].series_instance_uid
    method = ctx.settings.prior.retrieve
    target = workdir / "prior"
    with timer("prior.retrieve"):
        files = (_get(ctx, client, study.study_instance_uid, series_uid, target) if method == "get"
                 else _move(ctx, client, study.study_instance_uid, series_uid))
    logger.info("run %s: prior study %s: %d instance(s) of series %s retrieved by C-%s", run_id,
                study.study_instance_uid, len(files), series_uid, method.upper())
    with timer("prior.analysis"):
        workdir.mkdir(parents=True, exist_ok=True)
        headers = [(path, dcmread(path, stop_before_pixels=True)) for path in files]
        select_series([SeriesCandidate(series_uid, [ds for _, ds in headers])], ctx.rules)  # the full rules
        nifti = convert_series([path for path, _ in headers], workdir / "prior.nii.gz")
        pre = preprocess(nifti, ctx.preprocess_config)
        volumes, volumes_note = measure(ctx, run_id, pre, "prior study")
        notes = notes_for(ctx, current.patient_id, current.issuer, study.study_date, study.accession_number)
        prediction = ctx.predictor.predict(pre.volume, format_note_text(notes) if notes else None)
    headers.sort(key=lambda item: (_number(item[1]), str(item[1].SOPInstanceUID)))
    prior = PriorResult(
        study_instance_uid=study.study_instance_uid,
        study_date=study.study_date,
        series_instance_uid=series_uid,
        instances=tuple((str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for _, ds in headers),
        volumes=volumes,
        probabilities={key: float(value) for key, value in prediction.probabilities.items()},
    )
    return PriorOutcome(prior, "", study.study_instance_uid, method, volumes_note, timer.seconds)


def _number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        return 0


def _get(ctx: RunContext, client: PriorStudyClient, study_uid: str, series_uid: str, target: Path) -> list[Path]:
    """C-GET the series into *target*: one file per instance, named by its SOP Instance UID."""
    target.mkdir(parents=True, exist_ok=True)
    reserve = ctx.settings.storage.free_space_reserve_mb * 1024 * 1024
    written: dict[str, Path] = {}

    def store(ds: Dataset) -> None:
        uid = check_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")  # digits and dots: a safe file name
        if shutil.disk_usage(target).free < reserve:
            raise OSError(errno.ENOSPC, "free disk below storage.free_space_reserve_mb")
        path = target / f"{uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written[uid] = path

    client.get_series(study_uid, series_uid, store)
    return list(written.values())


def _move(ctx: RunContext, client: PriorStudyClient, study_uid: str, series_uid: str) -> list[Path]:
    """C-MOVE the series to the node's listener; its spooled files, the prior's own run request withdrawn."""
    result = client.move_series(study_uid, series_uid)
    with ctx.sessions.begin() as session:
        paths = session.scalars(
            select(Instance.spool_path).join(Series)
            .where(Series.series_instance_uid == series_uid, Instance.quarantined.is_(False),
                   Instance.file_missing_at.is_(None))).all()
        # Received like any study, the prior would get a run and reports of its own: it is analysed here instead.
        session.execute(update(Study).where(Study.study_instance_uid == study_uid, Study.needs_run.is_(True))
                        .values(needs_run=False))
    files = [Path(path) for path in paths if Path(path).is_file()]
    if not files:
        raise PriorStudyError(PriorFailure.NOT_RETRIEVABLE, f"{result}, but no instance of the series reached this "
                              "node (is prior.move_destination this node's AE title?)", result)
    return files
