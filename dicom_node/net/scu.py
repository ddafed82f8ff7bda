"""Outgoing C-STORE and C-ECHO (Storage and Verification SCU), over TLS where configured.

Every outcome is classified (:class:`~dicom_node.statuses.FailureClass`) so
that the outbox retries what can succeed later and stops at once on what cannot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from core.errors import ConfigError
from dicom_node.net.requestor import associate
from dicom_node.net.tls import client_context
from dicom_node.settings import Destination, Settings
from dicom_node.statuses import FailureClass, RejectResult, classify_store_status, is_success, is_warning

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendResult:
    """What the peer answered; ``status`` is None when no response came."""

    status: int | None
    error: str | None
    failure: FailureClass | None = field(default=None)

    @property
    def ok(self) -> bool:
        """True when the peer answered Success (or a Warning)."""
        return is_success(self.status) or is_warning(self.status)

    @property
    def warning(self) -> bool:
        """True when the peer stored the object with a Warning status."""
        return is_warning(self.status)


#: Timeouts (s) of an association requested without the node's settings (a tool's C-ECHO).
DEFAULT_TIMEOUT_S = 30.0


def _ae(settings: Settings | None, calling_ae_title: str | None = None) -> AE:
    net = settings.network if settings is not None else None
    ae = AE(ae_title=calling_ae_title or (net.ae_title if net is not None else "DICOM_NODE"))
    ae.acse_timeout = net.acse_timeout_s if net is not None else DEFAULT_TIMEOUT_S
    ae.dimse_timeout = net.dimse_timeout_s if net is not None else DEFAULT_TIMEOUT_S
    ae.network_timeout = net.network_timeout_s if net is not None else DEFAULT_TIMEOUT_S
    ae.connection_timeout = ae.acse_timeout
    return ae


def _associate(ae: AE, destination: Destination,
               settings: Settings | None) -> tuple[Association, SendResult | None]:
    """Open an association; the second item is the classified failure, or None when established."""
    opened: list[bool] = []
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, lambda event: opened.append(True))]
    if destination.tls and settings is None:
        raise ConfigError(f"destination {destination.name}: TLS needs the node's settings (network.tls)")
    tls_args = (client_context(settings.network.tls), destination.host) if destination.tls and settings else None
    assoc = associate(ae, destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args,
                      evt_handlers=handlers)
    if assoc.is_established:
        return assoc, None
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        result = getattr(primitive, "result", None)
        detail = f"source {getattr(primitive, 'result_source', '?')}, reason {getattr(primitive, 'diagnostic', '?')}"
        if result == RejectResult.PERMANENT:
            return assoc, SendResult(None, f"association rejected permanently ({detail})",
                                     FailureClass.REJECTED_PERMANENT)
        return assoc, SendResult(None, f"association rejected transiently ({detail})",
                                 FailureClass.REJECTED_TRANSIENT)
    if not opened:
        return assoc, SendResult(None, f"connection to {destination.host}:{destination.port} refused or unreachable",
                                 FailureClass.CONNECTION_REFUSED)
    if assoc.is_aborted:
        return assoc, SendResult(None, "association aborted during negotiation (TLS or peer failure)",
                                 FailureClass.ABORTED)
    return assoc, SendResult(None, "no association response (timeout)", FailureClass.TIMEOUT)


def send_file(path: Path, destination: Destination, settings: Settings) -> SendResult:
    """Send one DICOM file by C-STORE and return the real response status.

    Parameters
    ----------
    path : Path
        A DICOM Part 10 file.
    destination : Destination
        The peer (TLS when ``destination.tls``).
    settings : Settings
        For our AE title, timeouts and TLS files.

    Returns
    -------
    SendResult
        The C-STORE response status, or the classified failure when no association/response.
    """
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        return SendResult(None, f"object cannot be read ({type(exc).__name__})", FailureClass.LOCAL_ERROR)
    ae = _ae(settings)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc, failure = _associate(ae, destination, settings)
    if failure is not None:
        return failure
    try:
        response = assoc.send_c_store(ds)
    finally:
        if assoc.is_established:
            assoc.release()
    if response is None or "Status" not in response:
        if assoc.is_aborted:
            return SendResult(None, "association aborted before the C-STORE response", FailureClass.ABORTED)
        return SendResult(None, "no response to C-STORE (DIMSE timeout)", FailureClass.TIMEOUT)
    status = int(response.Status)
    failure_class = classify_store_status(status)
    if failure_class is None:
        return SendResult(status, f"C-STORE warning 0x{status:04X}" if is_warning(status) else None)
    return SendResult(status, f"C-STORE status 0x{status:04X}", failure_class)


def echo(destination: Destination, settings: Settings | None = None, *,
         calling_ae_title: str | None = None) -> SendResult:
    """C-ECHO a destination (TLS when ``destination.tls``): the node's one C-ECHO.

    With *settings*, as the node (its AE title, timeouts and TLS files); without,
    as *calling_ae_title* with :data:`DEFAULT_TIMEOUT_S` (tools and tests).
    """
    ae = _ae(settings, calling_ae_title)
    ae.add_requested_context(Verification)
    assoc, failure = _associate(ae, destination, settings)
    if failure is not None:
        return failure
    try:
        response = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if response is None or "Status" not in response:
        return SendResult(None, "no response to C-ECHO", FailureClass.TIMEOUT)
    status = int(response.Status)
    return SendResult(status, None if status == 0 else f"C-ECHO status 0x{status:04X}",
                      None if status == 0 else FailureClass.FAILURE_STATUS)
