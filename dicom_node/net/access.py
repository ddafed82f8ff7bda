"""Who may talk to the node: calling-AE allow-list (optionally host-pinned), called AE titles, profiles.

``network.allowed_calling_ae_titles`` entries are ``"AE"`` (any host) or
``"AE@host"`` (only from that host name or address); ``"*"`` accepts any caller.
The called AE title must be ``network.ae_title`` or the AE title of one of
``network.profiles``; the called AE title picks the profile, whose destinations
receive the study's reports.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from core.errors import ConfigError
from dicom_node.settings import Profile, Settings

logger = logging.getLogger(__name__)


def _resolve(host: str) -> frozenset[str]:
    try:
        return frozenset({_normalise_ip(str(ipaddress.ip_address(host)))})  # a pin compares as peers do
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise ConfigError(f"network.allowed_calling_ae_titles: host {host!r} cannot be resolved ({exc})") from exc
    return frozenset(_normalise_ip(str(info[4][0])) for info in infos)


def _normalise_ip(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass(frozen=True)
class AccessPolicy:
    """The allow-list and our AE titles, resolved once at start-up.

    Use :meth:`from_settings`; host names of pinned entries are resolved then.
    """

    any_caller: bool
    callers: dict[str, frozenset[str] | None]
    called: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        """Build the policy; raises ConfigError for an empty allow-list or an unresolvable host."""
        net = settings.network
        if not net.allowed_calling_ae_titles:
            raise ConfigError(
                "network.allowed_calling_ae_titles is empty: list the AE titles allowed to send, "
                "or '*' to accept any caller (insecure)"
            )
        callers: dict[str, frozenset[str] | None] = {}
        for entry in net.allowed_calling_ae_titles:
            ae, _, host = entry.partition("@")
            if ae == "*":
                continue
            if not host:
                callers[ae] = None  # any host
            elif callers.get(ae, frozenset()) is not None:
                callers[ae] = (callers.get(ae) or frozenset()) | _resolve(host)
        called = frozenset({net.ae_title, *(p.ae_title for p in net.profiles)})
        return cls("*" in net.allowed_calling_ae_titles, callers, called)

    def check_calling(self, calling_ae: str, peer_ip: str) -> str | None:
        """None when *calling_ae* may connect from *peer_ip*, else the reason."""
        if self.any_caller:
            return None
        if calling_ae not in self.callers:
            return "calling AE title not in network.allowed_calling_ae_titles"
        hosts = self.callers[calling_ae]
        if hosts is not None and _normalise_ip(peer_ip) not in hosts:
            return "calling AE title not allowed from this host"
        return None

    def check_called(self, called_ae: str) -> str | None:
        """None when *called_ae* is one of our AE titles, else the reason."""
        return None if called_ae in self.called else "called AE title is not one of this node's AE titles"


def profile_for(settings: Settings, called_ae_title: str | None) -> Profile | None:
    """The profile bound to *called_ae_title*, or None (the node's main AE title)."""
    for profile in settings.network.profiles:
        if profile.ae_title == called_ae_title:
            return profile
    return None

