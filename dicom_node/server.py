"""The Storage SCP: the node's DICOM listener.

Handlers stay thin: they turn the work of :mod:`dicom_node.ingest` into named
DIMSE statuses.  No pixel data is decoded in the handler.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.ingest import Peer, Recorder, RejectedInstance, Spool, identify
from dicom_node.settings import Settings
from dicom_node.statuses import StoreStatus, VerificationStatus
from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)


def _peer(event: Any) -> Peer:
    requestor = event.assoc.requestor
    return Peer(calling_ae_title=str(requestor.ae_title).strip(), address=f"{requestor.address}:{requestor.port}")


class StorageServer:
    """A pynetdicom Storage SCP writing to the spool and the database.

    Parameters
    ----------
    settings : Settings
        The node's settings (AE title, address, allow-list, timeouts).
    spool : Spool
        Where instances are written.
    recorder : Recorder
        Where instances and rejections are recorded.
    on_stored : callable, optional
        Called (without arguments) after each newly stored instance.
    """

    def __init__(self, settings: Settings, spool: Spool, recorder: Recorder) -> None:
        net = settings.network
        if not net.allowed_calling_ae_titles:
            raise ConfigError(
                "network.allowed_calling_ae_titles is empty: list the AE titles allowed to send, "
                "or '*' to accept any caller (insecure)"
            )
        self.settings = settings
        self.spool = spool
        self.recorder = recorder
        self.ae = AE(ae_title=net.ae_title)
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)
        self.ae.require_called_aet = True
        allowed = [] if "*" in net.allowed_calling_ae_titles else list(net.allowed_calling_ae_titles)
        self.ae.require_calling_aet = allowed
        self.ae.maximum_associations = net.max_associations
        self.ae.acse_timeout = net.acse_timeout_s
        self.ae.dimse_timeout = net.dimse_timeout_s
        self.ae.network_timeout = net.network_timeout_s
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        """The bound TCP port (useful when configured as 0)."""
        if self._server is None:
            raise ConfigError("the server is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve in background threads."""
        net = self.settings.network
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = self.ae.start_server((net.bind_address, net.port), block=False, evt_handlers=handlers)
        logger.info("listening as %s on %s:%d", net.ae_title, net.bind_address, self.port)

    def stop(self) -> None:
        """Stop accepting associations and close the listener."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    # ----- handlers -------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        return int(VerificationStatus.SUCCESS)

    def _on_rejected(self, event: Any) -> None:
        peer = _peer(event)
        logger.warning("association from %s refused (calling AE not allowed or called AE wrong)", peer.address)
        self.recorder.record_rejection(peer, 0, "association rejected: calling or called AE title not accepted", None, None)

    def _on_store(self, event: Any) -> int:
        peer = _peer(event)
        request = event.request
        sop_class = str(request.AffectedSOPClassUID)
        sop_instance = str(request.AffectedSOPInstanceUID)
        try:
            try:
                ds = event.dataset
                ident = identify(ds, sop_class)
            except RejectedInstance:
                raise
            except Exception as exc:  # noqa: BLE001 - any decoding failure of untrusted bytes
                raise RejectedInstance(
                    StoreStatus.CANNOT_UNDERSTAND, f"dataset cannot be decoded ({type(exc).__name__})"
                ) from exc
            if ident.sop_instance_uid != sop_instance:
                raise RejectedInstance(
                    StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                    "SOPInstanceUID of the dataset differs from the C-STORE request",
                )
            data = event.encoded_dataset()
            path = self.spool.path_for(ident)
            try:
                self.spool.write(path, data)
            except OSError as exc:
                raise RejectedInstance(StoreStatus.OUT_OF_RESOURCES, f"spool write failed ({exc.strerror})") from exc
            ts_uid = str(event.context.transfer_syntax)
            try:
                new = self.recorder.record_instance(ident, peer, path, data, ts_uid)
            except SQLAlchemyError as exc:
                logger.error("database unavailable while recording %s: %s", sop_instance, type(exc).__name__)
                return int(StoreStatus.OUT_OF_RESOURCES)
        except RejectedInstance as exc:
            logger.warning(
                "refused SOP instance %s from %s: %s (status 0x%04X)",
                sop_instance, peer.calling_ae_title, exc.reason, exc.status,
            )
            self.recorder.record_rejection(peer, exc.status, exc.reason, sop_class, sop_instance)
            return int(exc.status)
        logger.debug("stored %s (series %s)%s", ident.sop_instance_uid, ident.series_instance_uid,
                     "" if new else " (identical re-send)")
        return int(StoreStatus.SUCCESS)
