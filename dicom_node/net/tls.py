"""DICOM TLS (PS3.15 Annex B): SSL contexts for the listener and outgoing associations.

The node speaks TLS 1.2 or newer only; certificates and keys are PEM files
named by ``network.tls``.  The listener verifies client certificates against
``ca_certificates`` when ``require_client_certificate`` is set; outgoing
associations always verify the peer's certificate chain and host name.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from core.errors import ConfigError
from dicom_node.settings import TLSSettings

logger = logging.getLogger(__name__)

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _file(value: str, key: str) -> str:
    if not value:
        raise ConfigError(f"network.tls.{key} is empty but TLS is enabled")
    if not Path(value).is_file():
        raise ConfigError(f"network.tls.{key}: file not found: {value}")
    return value


def _load_chain(ctx: ssl.SSLContext, tls: TLSSettings) -> None:
    try:
        ctx.load_cert_chain(_file(tls.certificate, "certificate"), _file(tls.private_key, "private_key"))
    except ssl.SSLError as exc:
        raise ConfigError(f"network.tls.certificate/private_key cannot be loaded: {exc.reason}") from exc


def _load_cas(ctx: ssl.SSLContext, tls: TLSSettings) -> None:
    try:
        ctx.load_verify_locations(cafile=_file(tls.ca_certificates, "ca_certificates"))
    except ssl.SSLError as exc:
        raise ConfigError(f"network.tls.ca_certificates cannot be loaded: {exc.reason}") from exc


def server_context(tls: TLSSettings) -> ssl.SSLContext:
    """The SSL context of the listener.

    Parameters
    ----------
    tls : TLSSettings
        ``network.tls``; certificate and private key are required.

    Returns
    -------
    ssl.SSLContext
        Server-side context, TLS 1.2+ (or 1.3+), client certificates required when configured.

    Raises
    ------
    ConfigError
        A file is missing or cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.minimum_version]
    _load_chain(ctx, tls)
    if tls.require_client_certificate:
        _load_cas(ctx, tls)
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates:
        _load_cas(ctx, tls)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The SSL context of outgoing associations to destinations with ``tls = true``.

    The peer's chain is verified against ``ca_certificates`` and its host name
    against the destination's ``host``; our certificate is presented when configured.

    Raises
    ------
    ConfigError
        ``ca_certificates`` is missing, or a file cannot be loaded.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[tls.minimum_version]
    _load_cas(ctx, tls)
    if tls.certificate or tls.private_key:
        _load_chain(ctx, tls)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
