"""Query/Retrieve SCU: the patient's prior study from the PACS (Study Root C-FIND, then C-MOVE or C-GET).

:class:`PriorStudyClient` asks the PACS of ``prior.pacs`` for the patient's
earlier studies (C-FIND at STUDY level on PatientID, and IssuerOfPatientID when
known, within ``prior.max_age_years`` before the current study), ranks the
series of a prior at SERIES level with the series-level rules of the selection
rules file (Modality, SeriesDescription, ProtocolName: the real selection runs
later on the received instances), and retrieves one series: by C-MOVE to the
node's own AE title (the node's Storage SCP receives it like any study) or by
C-GET (the instances come back on this association and go to the caller's
``store`` callback; nothing here writes to the spool).

Every wait has a bound (ACSE, DIMSE and network timeouts, a connection timeout,
``prior.retrieve_timeout_s`` for a whole retrieve, looked at on each response, then
C-CANCEL; ``prior.max_matches`` for C-FIND), statuses are named, and nothing identifying the patient is logged:
study and series UIDs and counts only.  Every failure is a
:class:`~dicom_node.net.qrtypes.PriorStudyError` with a :class:`~dicom_node.net.qrtypes.PriorFailure`
category; the results are the value types of :mod:`dicom_node.net.qrtypes`.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from core.errors import NodeError
from dicom_node.ingest.identity import transfer_syntaxes
from dicom_node.net.qrtypes import (
    REFUSALS,
    PriorCandidate,
    PriorFailure,
    PriorStudy,
    PriorStudyError,
    QRStatus,
    RetrieveResult,
    SeriesMatch,
    status_name,
)
from dicom_node.net.requestor import associate
from dicom_node.net.tls import client_context
from dicom_node.settings import Destination, Settings
from dicom_node.statuses import StoreStatus
from pipeline.select import NoSuitableSeries, SelectionRules, SeriesCandidate, load_rules, select_series

logger = logging.getLogger(__name__)

# pynetdicom logs C-FIND/C-GET/C-MOVE identifiers (PatientID...) at INFO by default: never in this node.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet
#: What C-GET accepts back (SCP role): the classes a 3D T1 series comes in.
GET_STORAGE_CLASSES = (MRImageStorage, EnhancedMRImageStorage, LegacyConvertedEnhancedMRImageStorage)
#: Attributes a SERIES-level C-FIND answers, which the selection rules may test.
SERIES_LEVEL_ATTRIBUTES = frozenset({"Modality", "SeriesDescription", "ProtocolName"})

def prior_pacs(settings: Settings) -> Destination:
    """The PACS of ``prior.pacs``: a named destination, or the section's own peer (ConfigError when unknown)."""
    pacs = settings.prior.pacs
    if pacs.destination:
        return settings.destination(pacs.destination)
    return Destination(name="prior_pacs", ae_title=pacs.ae_title, host=pacs.host, port=pacs.port, tls=pacs.tls)


def series_level_rules(rules: SelectionRules, min_score: float) -> SelectionRules:
    """The rules a SERIES-level C-FIND answer can be judged by; a requirement holds when the PACS does not say."""
    return SelectionRules(
        requirements=tuple(replace(r, missing_ok=True) for r in rules.requirements
                           if set(r.attributes) <= SERIES_LEVEL_ATTRIBUTES),
        scores=tuple(r for r in rules.scores if set(r.attributes) <= SERIES_LEVEL_ATTRIBUTES),
        min_score=min_score)


def _years_before(day: datetime.date, years: int) -> datetime.date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


def _date(value: object) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(str(value).strip(), "%Y%m%d").date()
    except ValueError:
        return None


def _int(value: object) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


class PriorStudyClient:
    """The node's Q/R SCU towards ``prior.pacs``, built once from the settings.

    Raises
    ------
    ConfigError
        ``prior.pacs`` names an unknown destination, a TLS file is missing, or the rules file is invalid.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.prior = settings.prior
        self.pacs = prior_pacs(settings)
        self._tls = client_context(settings.network.tls) if self.pacs.tls else None
        path = Path(self.prior.series_rules) if self.prior.series_rules else settings.series_rules_path
        self.rules = series_level_rules(load_rules(path), self.prior.min_score)

    # ----- queries -----------------------------------------------------------------------------------------
    def find_prior_studies(self, patient_id: str, issuer: str | None, before_study_date: datetime.date,
                           exclude_study_uid: str) -> list[PriorStudy]:
        """The patient's studies from ``prior.max_age_years`` before *before_study_date* up to it, newest first.

        The current study (*exclude_study_uid*), studies of another patient or issuer (a PACS that ignores a
        key) and studies without a valid StudyDate are left out.
        """
        earliest = _years_before(before_study_date, self.prior.max_age_years)
        query = _query("STUDY", PatientID=patient_id, StudyInstanceUID="", StudyTime="", AccessionNumber="",
                       StudyDate=f"{earliest:%Y%m%d}-{before_study_date:%Y%m%d}", ModalitiesInStudy="")
        if issuer:
            query.IssuerOfPatientID = issuer
        if not (patient_id + (issuer or "")).isascii():
            query.SpecificCharacterSet = "ISO_IR 192"
        studies: list[PriorStudy] = []
        dropped = 0
        for match in self._find(query, "STUDY"):
            uid = str(match.get("StudyInstanceUID", "")).strip()
            day = _date(match.get("StudyDate", ""))
            other = (str(match.get("PatientID", patient_id)) != patient_id
                     or bool(issuer and str(match.get("IssuerOfPatientID", issuer) or issuer) != issuer))
            if not uid or uid == exclude_study_uid or day is None or other or not earliest <= day <= before_study_date:
                dropped += uid != exclude_study_uid
                continue
            modalities = match.get("ModalitiesInStudy") or []
            studies.append(PriorStudy(uid, day, str(match.get("StudyTime", "") or ""),
                                      str(match.get("AccessionNumber", "") or ""),
                                      tuple(str(m) for m in ([modalities] if isinstance(modalities, str)
                                                             else modalities))))
        studies.sort(key=lambda s: (s.study_date, s.study_time.split(".")[0].ljust(6, "0")), reverse=True)
        logger.info("prior query: %d prior stud%s (%d match(es) left out)", len(studies),
                    "y" if len(studies) == 1 else "ies", dropped)
        return studies

    def find_t1_series(self, study_uid: str) -> list[SeriesMatch]:
        """The series of *study_uid* that the series-level rules accept, best first."""
        query = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID="", Modality="",
                       SeriesDescription="", ProtocolName="", SeriesNumber="", NumberOfSeriesRelatedInstances="")
        matches: list[SeriesMatch] = []
        for found in self._find(query, "SERIES"):
            uid = str(found.get("SeriesInstanceUID", "")).strip()
            if not uid or str(found.get("StudyInstanceUID", study_uid)) != study_uid:
                continue
            header = Dataset()
            for keyword in sorted(SERIES_LEVEL_ATTRIBUTES):
                if str(found.get(keyword, "") or "").strip():
                    setattr(header, keyword, found.get(keyword))
            try:
                selection = select_series([SeriesCandidate(uid, [header])], self.rules)
            except NoSuitableSeries:
                continue
            matches.append(SeriesMatch(uid, str(found.get("Modality", "") or ""),
                                       str(found.get("SeriesDescription", "") or ""),
                                       _int(found.get("SeriesNumber", "")),
                                       _int(found.get("NumberOfSeriesRelatedInstances", "")),
                                       selection.decisions[0].score))
        matches.sort(key=lambda m: (m.score, m.instances or 0, m.series_number or -1, m.series_instance_uid),
                     reverse=True)
        logger.info("prior study %s: %d candidate T1 series", study_uid, len(matches))
        return matches

    def find_prior(self, patient_id: str, issuer: str | None, before_study_date: datetime.date,
                   exclude_study_uid: str) -> PriorCandidate:
        """The newest prior study that has candidate T1 series (raises ``no prior`` when none has)."""
        studies = self.find_prior_studies(patient_id, issuer, before_study_date, exclude_study_uid)
        for study in studies:
            series = self.find_t1_series(study.study_instance_uid)
            if series:
                return PriorCandidate(study, tuple(series))
        raise PriorStudyError(PriorFailure.NO_PRIOR, f"{len(studies)} prior stud{'y' if len(studies) == 1 else 'ies'}"
                              f" within {self.prior.max_age_years} years, none with a candidate T1 series")

    # ----- retrieval ---------------------------------------------------------------------------------------
    def retrieve_series(self, study_uid: str, series_uid: str,
                        store: Callable[[Dataset], None] | None = None) -> RetrieveResult:
        """Retrieve one series by ``prior.retrieve``: C-MOVE, or C-GET into *store* (required then)."""
        if self.prior.retrieve == "get":
            if store is None:
                raise NodeError("prior.retrieve = 'get' needs a store callback for the instances")
            return self.get_series(study_uid, series_uid, store)
        return self.move_series(study_uid, series_uid)

    def move_series(self, study_uid: str, series_uid: str) -> RetrieveResult:
        """C-MOVE the series to ``prior.move_destination`` (default the node's AE title)."""
        destination = self.prior.move_destination or self.settings.network.ae_title
        with self._association([(MOVE, None)]) as assoc:
            self._require(assoc, MOVE, "C-MOVE")
            key = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
            result = self._retrieve(assoc, assoc.send_c_move(key, destination, MOVE), "move", None)
        return self._checked(result, study_uid, series_uid)

    def get_series(self, study_uid: str, series_uid: str, store: Callable[[Dataset], None]) -> RetrieveResult:
        """C-GET the series; each instance goes to *store* (a NodeError or OSError there fails that sub-operation)."""
        received: list[str] = []

        def on_store(event: Any) -> int:
            try:
                ds = event.dataset
                ds.file_meta = event.file_meta
                uid = str(ds.get("SeriesInstanceUID", ""))
            except Exception as exc:  # noqa: BLE001 - pydicom's decoding errors have no common base
                logger.warning("C-GET: undecodable instance refused (%s)", type(exc).__name__)
                return int(StoreStatus.CANNOT_UNDERSTAND)
            if uid != series_uid:
                logger.warning("C-GET: instance of another series refused")
                return int(StoreStatus.PROCESSING_FAILURE)
            try:
                store(ds)
            except NodeError as exc:
                logger.warning("C-GET: store callback refused an instance (%s)", type(exc).__name__)
                return int(StoreStatus.PROCESSING_FAILURE)
            except OSError as exc:
                logger.warning("C-GET: store callback failed (%s)", type(exc).__name__)
                return int(StoreStatus.OUT_OF_RESOURCES)
            received.append(str(ds.SOPInstanceUID))
            return int(StoreStatus.SUCCESS)

        syntaxes = transfer_syntaxes(self.settings.storage.accept_lossy)
        contexts = [(GET, None), *((sop, syntaxes) for sop in GET_STORAGE_CLASSES)]
        roles = [build_role(sop, scp_role=True) for sop in GET_STORAGE_CLASSES]
        with self._association(contexts, roles=roles, handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            self._require(assoc, GET, "C-GET")
            key = _query("SERIES", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
            result = self._retrieve(assoc, assoc.send_c_get(key, GET), "get", received)
        return self._checked(result, study_uid, series_uid)

    # ----- association and responses -----------------------------------------------------------------------
    @contextmanager
    def _association(self, contexts: list[tuple[str, list[str] | None]], *, roles: list[Any] | None = None,
                     handlers: list[Any] | None = None) -> Iterator[Association]:
        ae = AE(ae_title=self.settings.network.ae_title)
        ae.acse_timeout = ae.connection_timeout = self.prior.acse_timeout_s
        ae.dimse_timeout = self.prior.dimse_timeout_s
        ae.network_timeout = self.prior.network_timeout_s
        for abstract, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(abstract)
            else:
                ae.add_requested_context(abstract, syntaxes)
        opened: list[bool] = []
        tls_args = (self._tls, self.pacs.host) if self._tls is not None else None
        started = time.monotonic()
        assoc = associate(ae, self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title, tls_args=tls_args,
                          evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: opened.append(True)), *(handlers or [])],
                          ext_neg=roles)
        if not assoc.is_established:
            raise self._not_associated(assoc, bool(opened), time.monotonic() - started)
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    def _not_associated(self, assoc: Association, opened: bool, waited_s: float) -> PriorStudyError:
        peer = f"{self.pacs.ae_title}@{self.pacs.host}:{self.pacs.port}"
        if assoc.is_rejected:
            primitive = assoc.acceptor.primitive
            reason = getattr(primitive, "reason_str", "?") if primitive is not None else "?"
            kind = getattr(primitive, "result_str", "rejected") if primitive is not None else "rejected"
            return PriorStudyError(PriorFailure.PACS_REFUSED, f"{peer} rejected the association ({kind}: {reason})")
        if not opened:
            return PriorStudyError(PriorFailure.PACS_UNREACHABLE, f"connection to {peer} refused or timed out "
                                   f"(prior.acse_timeout_s = {self.prior.acse_timeout_s:g})")
        if assoc.is_aborted and waited_s < self.prior.acse_timeout_s * 0.9:  # pynetdicom aborts on its timeout too
            return PriorStudyError(PriorFailure.PACS_REFUSED,
                                   f"{peer} aborted the association during negotiation (TLS or peer failure)")
        return PriorStudyError(PriorFailure.PACS_UNREACHABLE, f"no association response from {peer} within "
                               f"prior.acse_timeout_s = {self.prior.acse_timeout_s:g}")

    def _require(self, assoc: Association, abstract: str, service: str) -> None:
        if not any(cx.abstract_syntax == abstract for cx in assoc.accepted_contexts):
            assoc.release()
            raise PriorStudyError(PriorFailure.PACS_REFUSED,
                                  f"{self.pacs.ae_title} does not accept Study Root {service}")

    def _next(self, responses: Iterator[tuple[Dataset, Dataset | None]], service: str,
              answered: bool) -> tuple[int, Dataset, Dataset | None]:
        """The next response; no response at all becomes a PriorStudyError (timeout, or the PACS ended it)."""
        started = time.monotonic()
        status, identifier = next(responses, (Dataset(), None))
        if "Status" in status:
            return int(status.Status), status, identifier
        if time.monotonic() - started >= self.prior.dimse_timeout_s * 0.9:
            raise PriorStudyError(PriorFailure.PACS_UNREACHABLE, f"no {service} response within "
                                  f"prior.dimse_timeout_s = {self.prior.dimse_timeout_s:g}")
        if answered:
            raise PriorStudyError(PriorFailure.NOT_RETRIEVABLE,
                                  f"{self.pacs.ae_title} ended the association during the {service}")
        raise PriorStudyError(PriorFailure.PACS_REFUSED, f"{self.pacs.ae_title} ended the association instead of "
                              f"answering the {service} (is this node's AE title allowed to use it?)")

    def _find(self, query: Dataset, level: str) -> list[Dataset]:
        """The identifiers of a C-FIND, at most ``prior.max_matches`` of them (more: C-CANCEL, QUERY_TOO_BROAD)."""
        limit = self.prior.max_matches
        matches: list[Dataset] = []
        with self._association([(FIND, None)]) as assoc:
            self._require(assoc, FIND, "C-FIND")
            responses = assoc.send_c_find(query, FIND)
            seen = 0
            while True:
                code, _, identifier = self._next(responses, "C-FIND", seen > 0)
                if code not in (QRStatus.PENDING, QRStatus.PENDING_OPTIONAL_KEYS):
                    break
                seen += 1
                if identifier is not None and seen <= limit:
                    matches.append(identifier)
                if seen == limit + 1:
                    assoc.send_c_cancel(1, query_model=FIND)
                elif seen > 2 * limit + 1:
                    assoc.abort()  # the PACS ignores the C-CANCEL
                    break
        if seen > limit:
            raise PriorStudyError(PriorFailure.QUERY_TOO_BROAD,
                                  f"more than prior.max_matches = {limit} {level}-level matches")
        if code != QRStatus.SUCCESS:
            failure = PriorFailure.PACS_REFUSED if code in REFUSALS else PriorFailure.NOT_RETRIEVABLE
            raise PriorStudyError(failure, f"{level}-level C-FIND ended with {status_name(code, 'C-FIND')}")
        return matches

    def _retrieve(self, assoc: Association, responses: Iterator[tuple[Dataset, Dataset | None]], method: str,
                  received: list[str] | None) -> RetrieveResult:
        """Follow C-MOVE/C-GET responses to the final one (C-CANCEL after ``prior.retrieve_timeout_s``)."""
        service = f"C-{method.upper()}"
        deadline = time.monotonic() + self.prior.retrieve_timeout_s
        counts = {"completed": 0, "failed": 0, "warning": 0}
        cancelled = answered = False
        while True:
            code, status, _ = self._next(responses, service, answered)
            answered = True
            for key in counts:
                value = status.get(f"NumberOf{key.title()}Suboperations")
                counts[key] = int(value) if value is not None else counts[key]
            if code not in (QRStatus.PENDING, QRStatus.PENDING_OPTIONAL_KEYS):
                break
            if not cancelled and time.monotonic() > deadline:
                logger.warning("%s: prior.retrieve_timeout_s passed, cancelling", service)
                assoc.send_c_cancel(1, query_model=MOVE if method == "move" else GET)
                cancelled = True
        return RetrieveResult(method, code, counts["completed"], counts["failed"], counts["warning"],
                              None if received is None else len(received))

    def _checked(self, result: RetrieveResult, study_uid: str, series_uid: str) -> RetrieveResult:
        logger.info("prior study %s series %s: %s", study_uid, series_uid, result)
        if result.status in REFUSALS:
            hint = (f" (the PACS does not know the AE title "
                    f"{self.prior.move_destination or self.settings.network.ae_title})"
                    if result.status == QRStatus.MOVE_DESTINATION_UNKNOWN else "")
            raise PriorStudyError(PriorFailure.PACS_REFUSED, f"{result}{hint}", result)
        ok = result.status in (QRStatus.SUCCESS, QRStatus.SUB_OPERATIONS_WARNING)
        if not ok or result.failed or not result.completed + result.warning:
            hint = (f" (cancelled after prior.retrieve_timeout_s = {self.prior.retrieve_timeout_s:g})"
                    if result.status == QRStatus.CANCEL else " (is the C-MOVE destination known to the PACS?)"
                    if result.method == "move" and not result.completed else "")
            raise PriorStudyError(PriorFailure.NOT_RETRIEVABLE, f"{result}{hint}", result)
        return result


def _query(level: str, **keys: str) -> Dataset:
    """A C-FIND/C-MOVE/C-GET identifier at *level* with the given keys (empty: return key)."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query
