"""Outgoing C-STORE and C-ECHO (Storage and Verification SCU)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.settings import Destination, Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SendResult:
    """What the peer answered; ``status`` is None when no response came."""

    status: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        """True when the peer answered Success (or a Warning)."""
        return self.status is not None and (self.status == 0 or self.status == 1 or 0xB000 <= self.status <= 0xBFFF)


def _ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.network.ae_title)
    ae.acse_timeout = settings.network.acse_timeout_s
    ae.dimse_timeout = settings.network.dimse_timeout_s
    ae.network_timeout = settings.network.network_timeout_s
    return ae


def send_file(path: Path, destination: Destination, settings: Settings) -> SendResult:
    """Send one DICOM file by C-STORE and return the real response status.

    Parameters
    ----------
    path : Path
        A DICOM Part 10 file.
    destination : Destination
        The peer.
    settings : Settings
        For our AE title and timeouts.

    Returns
    -------
    SendResult
        The C-STORE response status, or an error when no association/response.
    """
    ds = dcmread(path)
    ae = _ae(settings)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            return SendResult(None, "association rejected")
        return SendResult(None, "association aborted or connection refused")
    try:
        response = assoc.send_c_store(ds)
    finally:
        assoc.release()
    if response is None or "Status" not in response:
        return SendResult(None, "no response to C-STORE (timeout or abort)")
    status = int(response.Status)
    return SendResult(status, None if status == 0 else f"C-STORE status 0x{status:04X}")


def echo(destination: Destination, settings: Settings) -> SendResult:
    """C-ECHO a destination."""
    ae = _ae(settings)
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return SendResult(None, "association rejected" if assoc.is_rejected else "association failed")
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if response is None or "Status" not in response:
        return SendResult(None, "no response to C-ECHO")
    return SendResult(int(response.Status), None)
