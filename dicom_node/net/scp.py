"""The Storage SCP: the node's DICOM listener.

Handlers stay thin: they turn the work of :mod:`dicom_node.ingest.recorder` into named
DIMSE statuses.  No pixel data is decoded in the C-STORE handler: the encoded
dataset is written to the spool, recorded, then answered.

Associations are checked at request time (:mod:`dicom_node.net.access`):
calling AE title (optionally pinned to a host), called AE title (the node's or
a profile's), free disk above ``storage.free_space_reserve_mb``; pynetdicom
enforces ``network.max_associations``.  Every association is logged
(:mod:`dicom_node.net.associations`); an instance answered Success is stored, however
the association ends afterwards (released, aborted, dropped, or the node stopping).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from core.errors import ConfigError
from dicom_node.ingest.identity import RejectedInstance, check_inflated_size, read_identity, transfer_syntaxes
from dicom_node.ingest.recorder import Duplicate, Peer, Recorder, duplicate_decision
from dicom_node.ingest.spool import Spool, part10_header
from dicom_node.net import reactors as edge_fastpath
from dicom_node.net.access import AccessPolicy
from dicom_node.net.associations import AssociationInfo, AssociationJournal, AssociationOutcome
from dicom_node.net.dimse import Spill, StoreRequest
from dicom_node.net.listener import start_listener
from dicom_node.net.streaming import chunked_receive, discard_partial, streamed_dataset
from dicom_node.net.tls import server_context
from dicom_node.settings import Settings
from dicom_node.statuses import RejectReason, RejectResult, RejectSource, StoreStatus, VerificationStatus

logger = logging.getLogger(__name__)


#: Largest P-DATA PDU we accept; big PDUs mean fewer round trips through pynetdicom's reactor.
MAX_PDU = 1_048_576


_REJECT_REASONS: dict[tuple[Any, Any], str] = {
    (RejectSource.SERVICE_USER, RejectReason.CALLING_AE_NOT_RECOGNIZED): "calling AE title not recognised",
    (RejectSource.SERVICE_USER, RejectReason.CALLED_AE_NOT_RECOGNIZED): "called AE title not recognised",
    (RejectSource.SERVICE_PROVIDER_PRESENTATION, RejectReason.LOCAL_LIMIT_EXCEEDED):
        "too many associations (network.max_associations)",
}


@dataclass
class _AssocState:
    """What the node tracks about one open association."""

    log_id: int
    peer: Peer
    called_ae_title: str
    stored: int = 0
    refused: int = 0
    finished: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Accepted presentation context ID -> abstract syntax (filled on the first C-STORE).
    contexts: dict[int, str] | None = None
    #: Why a bound of the edge ended the association (an oversized data set).
    cut_off: str | None = None


class StorageServer:
    """A pynetdicom Storage SCP writing to the spool and the database.

    Parameters
    ----------
    settings : Settings
        The node's settings (AE titles, allow-list, TLS, limits, timeouts).
    spool : Spool
        Where instances are written.
    recorder : Recorder
        Where instances and rejections are recorded.

    Raises
    ------
    ConfigError
        Empty allow-list, an unresolvable pinned host, or unusable TLS files.
    """

    def __init__(self, settings: Settings, spool: Spool, recorder: Recorder) -> None:
        net = settings.network
        self.settings = settings
        self.policy = AccessPolicy.from_settings(settings)
        self.spool = spool
        self.recorder = recorder
        self.journal = AssociationJournal(recorder.sessions)
        self.reserve_bytes = settings.storage.free_space_reserve_mb * 1024 * 1024
        self.ssl_context = server_context(net.tls) if net.tls.enabled else None
        self.ae = AE(ae_title=net.ae_title)
        syntaxes = transfer_syntaxes(settings.storage.accept_lossy)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                self.ae.add_supported_context(context.abstract_syntax, syntaxes)
        self.ae.add_supported_context(Verification)
        self.ae.require_called_aet = True  # checked against the title chosen in _on_requested
        self.ae.require_calling_aet = []   # checked (with host pins) in _on_requested
        self.ae.maximum_associations = net.max_associations
        self.ae.maximum_pdu_size = MAX_PDU
        self.ae.acse_timeout = net.acse_timeout_s
        self.ae.dimse_timeout = net.dimse_timeout_s
        self.ae.network_timeout = net.network_timeout_s
        self._server: ThreadedAssociationServer | None = None
        self._assocs: dict[int, _AssocState] = {}
        self._assocs_lock = threading.Lock()
        #: Set when :meth:`stop` aborts the associations left after the grace period.
        self._stopping = False
        #: ``network.dimse_path = "public"``: C-STOREs through pynetdicom's ``EVT_C_STORE`` only.
        self._public = net.dimse_path == "public"
        #: Where data sets being received go once they are large (``storage.spill_bytes``).
        self._receiving = spool.root / ".receiving"
        self._spill = Spill(self._receiving, settings.storage.spill_bytes)

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        if self._server is None:
            raise ConfigError("the server is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads."""
        net = self.settings.network
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
        ]
        self._receiving.mkdir(parents=True, exist_ok=True)
        chunked_receive(True, self._receiving)
        self._server = start_listener(
            self.ae, (net.bind_address, net.port), handlers, accept_timeout_s=net.acse_timeout_s,
            per_peer_limit=net.max_associations_per_peer, tls_context=self.ssl_context)
        logger.info("listening as %s on %s:%d%s", ", ".join(sorted(self.policy.called)), net.bind_address,
                    self.port, " (TLS)" if self.ssl_context else "")

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting, let the associations in flight end within *grace_s*, then abort the rest.

        The listener is closed first (new connections are refused).  Open
        associations go on storing and may release within the grace period
        (``network.shutdown_grace_s`` when the node stops); those still open
        then are aborted (A-ABORT) and logged as such.  Whatever was answered
        Success is kept either way.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        deadline = time.monotonic() + grace_s
        while (active := [a for a in server.active_associations if a.is_alive()]) and (
                left := deadline - time.monotonic()) > 0:
            active[0].join(timeout=min(left, 0.1))
        if active:
            logger.warning("stopping: aborting %d association(s) still open after %.1f s", len(active), grace_s)
            self._stopping = True
        for assoc in active:
            assoc.abort()
        for assoc in active:
            assoc.join(timeout=5)
        self.ae.shutdown()
        chunked_receive(False)

    # ----- association life cycle ----------------------------------------
    def _on_conn_open(self, event: Any) -> None:
        raw = getattr(event.assoc.dul.socket, "socket", None)
        if self.settings.network.tcp_nodelay and raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        store = None if self._public else functools.partial(self._lean_store, event.assoc)
        if not edge_fastpath.install(event.assoc, store, self.settings.storage.max_dataset_bytes, self._on_cut_off,
                                     self._spill):
            logger.error("pynetdicom's internals differ from the pinned version: association served unbounded")

    def _on_cut_off(self, assoc: Any, reason: str) -> None:
        """A bound of :mod:`dicom_node.net.reactors` ended the association: record the instance refused."""
        with self._assocs_lock:
            state = self._assocs.get(id(assoc))
        if state is None:
            return
        command = getattr(getattr(getattr(assoc, "dimse", None), "message", None), "command_set", None)
        sop_class = getattr(command, "AffectedSOPClassUID", None)
        sop_instance = getattr(command, "AffectedSOPInstanceUID", None)
        state.cut_off = reason
        state.refused += 1
        self._refuse(state, None if sop_class is None else str(sop_class),
                     None if sop_instance is None else str(sop_instance),
                     RejectedInstance(StoreStatus.OUT_OF_RESOURCES, reason))

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        address = str(assoc.requestor.address)
        peer = Peer(calling_ae_title=calling, address=f"{address}:{assoc.requestor.port}")
        log_id = self.journal.start(AssociationInfo(calling, called, peer.address, self.ssl_context is not None))
        state = _AssocState(log_id, peer, called)
        with self._assocs_lock:
            self._assocs[id(assoc)] = state
        reason = self.policy.check_calling(calling, address)
        rsd: tuple[int, int, int] | None = None
        if reason is not None:
            rsd = (RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLING_AE_NOT_RECOGNIZED)
        elif (reason := self.policy.check_called(called)) is not None:
            rsd = (RejectResult.PERMANENT, RejectSource.SERVICE_USER, RejectReason.CALLED_AE_NOT_RECOGNIZED)
        elif self.spool.free_bytes() < self.reserve_bytes:
            reason = "free disk below storage.free_space_reserve_mb"
            rsd = (RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                   RejectReason.TEMPORARY_CONGESTION)
        if rsd is None or reason is None:
            assoc.acceptor.ae_title = called  # the profile's title is answered and passes pynetdicom's check
            return
        logger.warning("association from %s (calling AE %s) refused: %s", address, calling, reason)
        # before the A-ASSOCIATE-RJ: the peer then closes at once
        self._finish(assoc, AssociationOutcome.REJECTED, reason)
        assoc.acse.send_reject(*rsd)
        self._record_refusal(peer, reason)

    @staticmethod
    def _reject_reason(assoc: Any) -> str:
        primitive = assoc.acceptor.primitive
        key: tuple[Any, Any] = (getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None))
        return _REJECT_REASONS.get(key, "association rejected")

    def _on_rejected(self, event: Any) -> None:
        reason = self._reject_reason(event.assoc)
        logger.warning("association from %s refused: %s", event.assoc.requestor.address, reason)
        with self._assocs_lock:
            state = self._assocs.get(id(event.assoc))
        self._finish(event.assoc, AssociationOutcome.REJECTED, reason)
        if state is not None:
            self._record_refusal(state.peer, reason)

    def _record_refusal(self, peer: Peer, reason: str) -> None:
        try:
            self.recorder.record_rejection(peer, 0, f"association rejected: {reason}", None, None)
        except SQLAlchemyError as exc:
            logger.error("refused association not recorded (%s)", type(exc).__name__)

    def _on_released(self, event: Any) -> None:
        self._finish(event.assoc, AssociationOutcome.RELEASED, None)

    def _on_aborted(self, event: Any) -> None:
        self._finish(event.assoc, AssociationOutcome.ABORTED, "association aborted")

    def _on_conn_close(self, event: Any) -> None:
        if event.assoc.is_released:
            self._finish(event.assoc, AssociationOutcome.RELEASED, None)
        elif event.assoc.is_rejected or getattr(event.assoc.acceptor.primitive, "result", None) in (
                RejectResult.PERMANENT, RejectResult.TRANSIENT):  # the peer closed before EVT_REJECTED reached us
            self._finish(event.assoc, AssociationOutcome.REJECTED, self._reject_reason(event.assoc))
        else:
            self._finish(event.assoc, AssociationOutcome.ABORTED, "connection closed without A-RELEASE")

    def _finish(self, assoc: Any, outcome: str, reason: str | None) -> None:
        with self._assocs_lock:
            state = self._assocs.pop(id(assoc), None)
        discard_partial(assoc)
        if state is None:
            return
        with state.lock:  # waits for a C-STORE in progress
            state.finished = True
            if outcome == AssociationOutcome.ABORTED:
                if state.cut_off is not None:
                    reason = state.cut_off
                elif self._stopping:
                    reason = "aborted by the node stopping (network.shutdown_grace_s)"
                # Every instance answered Success is stored (PS3.4): an abort keeps them all.
                reason = f"{reason}: {state.stored} acknowledged instance(s) kept"
                logger.warning("association %d aborted (%s)", state.log_id, reason)
            try:
                self.journal.finish(state.log_id, outcome, reason, state.stored, state.refused)
            except SQLAlchemyError as exc:
                logger.error("association log %d not finished (%s)", state.log_id, type(exc).__name__)

    # ----- DIMSE handlers -------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        return int(VerificationStatus.SUCCESS)

    def _on_store(self, event: Any) -> int | Dataset:
        """pynetdicom's ``EVT_C_STORE``, the data set streamed to a file (``STORE_RECV_CHUNKED_DATASET``).

        The data set (the file's bytes after pynetdicom's file meta) is
        memory-mapped, checked, spooled and recorded without being read whole
        into memory.
        """
        request = event.request
        try:
            path = event.dataset_path
        except AttributeError:
            path = None
        args = (event.assoc, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                str(event.context.transfer_syntax))
        if path is None:  # no data set, or STORE_RECV_CHUNKED_DATASET turned off by someone else
            status, comment = self._serve_store(*args, request.DataSet.getvalue(), int(event.context.context_id))
        else:
            try:
                with streamed_dataset(path) as raw:
                    status, comment = self._serve_store(*args, raw, int(event.context.context_id))
            except (OSError, ValueError) as exc:
                logger.error("streamed data set unreadable (%s)", type(exc).__name__)
                return int(StoreStatus.OUT_OF_RESOURCES)
        if comment is None:
            return status
        answer = Dataset()
        answer.Status, answer.ErrorComment = status, comment[:64]
        return answer

    def _lean_store(self, assoc: Any, request: StoreRequest, ts_uid: str) -> tuple[int, str | None]:
        """The lean C-STORE path's service (:mod:`dicom_node.net.dimse`)."""
        args = (assoc, request.sop_class_uid, request.sop_instance_uid, ts_uid)
        if request.oversize:
            return self._serve_store(*args, b"", request.context_id, request.size)
        with request.dataset() as raw:
            return self._serve_store(*args, raw, request.context_id)

    def _serve_store(self, assoc: Any, sop_class: str, sop_instance: str, ts_uid: str,
                     raw: bytes | memoryview, context_id: int, size: int | None = None) -> tuple[int, str | None]:
        """Store one instance of *assoc*; returns the status and, on failure, the error comment."""
        with self._assocs_lock:
            state = self._assocs.get(id(assoc))
        if state is None:
            return int(StoreStatus.PROCESSING_FAILURE), "association unknown"
        with state.lock:
            if state.finished:
                return int(StoreStatus.PROCESSING_FAILURE), "association already ended"
            if state.contexts is None:
                state.contexts = {int(cx.context_id): str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            abstract = state.contexts.get(context_id)
            if abstract != sop_class:
                # PS3.7 9.1.1.1.1 and 7.1.1: the Affected SOP Class must be the context's abstract syntax
                status, comment = self._refuse(
                    state, sop_class, sop_instance,
                    RejectedInstance(StoreStatus.REFUSED_SOP_CLASS_NOT_SUPPORTED,
                                     f"SOP class not of presentation context {context_id} "
                                     f"(negotiated: {abstract or 'none'}, sent: {sop_class})"))
            elif (size or len(raw)) > self.settings.storage.max_dataset_bytes:
                status, comment = self._refuse(
                    state, sop_class, sop_instance,
                    RejectedInstance(StoreStatus.OUT_OF_RESOURCES,
                                     f"data set over storage.max_dataset_bytes "
                                     f"({self.settings.storage.max_dataset_bytes // (1024 * 1024)} MiB)"))
            else:
                status, comment = self._store(sop_class, sop_instance, ts_uid, raw, state)
            if status == StoreStatus.SUCCESS:
                state.stored += 1
            else:
                state.refused += 1
            return int(status), comment

    def _store(self, sop_class: str, sop_instance: str, ts_uid: str, raw: bytes | memoryview,
               state: _AssocState) -> tuple[StoreStatus, str | None]:
        storage = self.settings.storage
        try:
            try:
                if ts_uid == DeflatedExplicitVRLittleEndian:
                    check_inflated_size(raw, storage.max_inflated_bytes)
                ident, lossy = read_identity(raw, ts_uid, sop_class, storage.max_pixel_bytes)
            except RejectedInstance:
                raise
            except Exception as exc:
                raise RejectedInstance(
                    StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be decoded ({type(exc).__name__})"
                ) from exc
            if ident.sop_instance_uid != sop_instance:
                raise RejectedInstance(
                    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOPInstanceUID of the dataset differs from the C-STORE request",
                )
            if lossy and not storage.accept_lossy:
                raise RejectedInstance(StoreStatus.LOSSY_INPUT_REFUSED,
                                       "lossy-compressed input refused (storage.accept_lossy is false)")
            header = part10_header(sop_class, sop_instance, ts_uid, state.peer.calling_ae_title)
            size = len(header) + len(raw)
            if self.spool.free_bytes() - size < self.reserve_bytes:
                raise RejectedInstance(StoreStatus.OUT_OF_RESOURCES, "free disk below storage.free_space_reserve_mb")
            hasher = hashlib.sha256(header)
            hasher.update(raw)
            digest = hasher.hexdigest()
            prior = self.recorder.prior(sop_instance)
            decision = duplicate_decision(storage.duplicate_policy, prior, digest)
            if decision is Duplicate.REJECT:
                raise RejectedInstance(StoreStatus.DUPLICATE_SOP_INSTANCE,
                                       "SOP Instance UID already received (storage.duplicate_policy = reject)")
            if decision is Duplicate.IGNORE:
                logger.debug("identical re-send of %s ignored", sop_instance)
                return StoreStatus.SUCCESS, None
            path = self.spool.path_for(ident)
            try:
                self.spool.write(path, (header, raw))
            except OSError as exc:
                raise RejectedInstance(StoreStatus.OUT_OF_RESOURCES, f"spool write failed ({exc.strerror})") from exc
            try:
                self.recorder.record_instance(
                    ident, state.peer, path, size, digest, ts_uid,
                    changed=prior is None or prior.quarantined or prior.sha256 != digest,
                    association_id=state.log_id, called_ae_title=state.called_ae_title, lossy=lossy,
                    prior=False if prior is None else prior)
            except SQLAlchemyError as exc:
                logger.error("database unavailable while recording %s: %s", sop_instance, type(exc).__name__)
                return StoreStatus.OUT_OF_RESOURCES, "database unavailable"
        except RejectedInstance as exc:
            return self._refuse(state, sop_class, sop_instance, exc)
        logger.debug("stored %s (series %s)%s", ident.sop_instance_uid, ident.series_instance_uid,
                     " (replaced)" if decision is Duplicate.REPLACE else "")
        return StoreStatus.SUCCESS, None

    def _refuse(self, state: _AssocState, sop_class: str | None, sop_instance: str | None,
                exc: RejectedInstance) -> tuple[StoreStatus, str | None]:
        """Log and record a refused instance; returns its status and reason."""
        logger.warning(
            "refused SOP instance %s from %s: %s (status 0x%04X)",
            sop_instance, state.peer.calling_ae_title, exc.reason, exc.status,
        )
        try:
            self.recorder.record_rejection(state.peer, exc.status, exc.reason, sop_class, sop_instance)
        except SQLAlchemyError as db_exc:
            logger.error("rejection of %s not recorded (%s)", sop_instance, type(db_exc).__name__)
        return exc.status, exc.reason

