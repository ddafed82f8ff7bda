"""The settings of the node's connections: its DICOM listener and peers, TLS, its HTTP side and webhooks.

The sections of :class:`~dicom_node.settings.Settings` that say whom the node
talks to and where: the listener's AE title and its callers (``network``, with
TLS and the AE-title profiles), the peers that receive reports
(``[[destinations]]``), the PACS asked for prior studies (``prior``), the
node's HTTP endpoint (``http``) and the webhooks it notifies
(``notifications``).  AE titles are checked here (:func:`_check_ae`).
:mod:`dicom_node.settings`, the public entry, imports every name of this
module, so ``from dicom_node.settings import Destination`` keeps working.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_serializer,
    field_validator,
    model_validator,
)

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value) or len(value) > 16:
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return stripped


def _number_as_text(value: Any) -> Any:
    """A secret written as a bare number in TOML or an env var (parsed as a number) is its digits."""
    return str(value) if isinstance(value, int | float) else value


#: A secret that may be all digits: read as text even when the file or env var parsed it as a number.
SecretText = BeforeValidator(_number_as_text)


def _check_optional_ae(value: str) -> str:
    """:func:`_check_ae`, where empty means "not set"."""
    return _check_ae(value) if value else value


#: An AE title that may be left empty ("not set").
OptionalAETitle = AfterValidator(_check_optional_ae)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """DICOM TLS (PS3.15 Annex B) for the listener and outgoing associations."""

    enabled: bool = False
    certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    require_client_certificate: bool = False
    minimum_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"


class Profile(_Section):
    """An AE title of the node bound to its own destinations and model."""

    ae_title: str
    destinations: tuple[str, ...] = ()
    model_path: str = ""

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class NetworkSettings(_Section):
    """The DICOM listener.

    ``allowed_calling_ae_titles`` entries are ``"AE"`` or ``"AE@host"`` (pinned to
    a peer address); ``"*"`` accepts any caller (insecure).
    """

    ae_title: str = "AD_NODE"
    bind_address: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_ae_titles: tuple[str, ...] = ()
    max_associations: int = Field(10, ge=1)
    max_associations_per_peer: int = Field(8, ge=1)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    #: On SIGTERM: how long associations in flight may go on before they are aborted.
    shutdown_grace_s: float = Field(10.0, ge=0)
    tcp_nodelay: bool = True
    #: How C-STORE requests are received: "lean" (the node parses P-DATA itself, :mod:`dicom_node.net.dimse`)
    #: or "public" (pynetdicom's public API only: ``EVT_C_STORE`` with ``STORE_RECV_CHUNKED_DATASET``).
    dimse_path: Literal["lean", "public"] = "lean"
    tls: TLSSettings = TLSSettings()
    profiles: tuple[Profile, ...] = ()

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _check_allowed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        checked = []
        for entry in value:
            ae, _, host = entry.partition("@")
            checked.append(_check_ae(ae) + (f"@{host.strip()}" if host.strip() else ""))
        return tuple(checked)


class Destination(_Section):
    """A DICOM peer (the PACS) that receives our reports."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    objects: tuple[Literal["sr", "pdf"], ...] = ("sr", "pdf")

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class PriorPacs(_Section):
    """The PACS asked for prior studies: ``destination`` names a ``[[destinations]]`` entry, or its own peer."""

    destination: str = ""
    ae_title: Annotated[str, OptionalAETitle] = ""
    host: str = ""
    port: int = Field(0, ge=0, le=65535)
    tls: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> PriorPacs:
        own = (self.ae_title, self.host, self.port)
        if self.destination and (any(own) or self.tls):
            raise ValueError("give either destination or ae_title/host/port/tls, not both")
        if any(own) and not all(own):
            raise ValueError("ae_title, host and port go together")
        return self


class PriorSettings(_Section):
    """Query/Retrieve of the patient's prior study (:mod:`dicom_node.net.qr`).

    ``retrieve = "get"`` (default): C-GET, the instances come back on the node's own
    association (into the run's scratch directory, :mod:`dicom_node.runs.prior`).
    ``"move"``: C-MOVE to ``move_destination`` (default ``network.ae_title``), which the
    PACS must know; the instances arrive at the node's own listener (allow the PACS's
    calling AE title) and stay in its spool.  ``dimse_timeout_s`` bounds every wait for a response (a PACS
    that sends no Pending C-MOVE responses needs it to cover a whole retrieve);
    ``retrieve_timeout_s`` bounds a whole retrieve (looked at on each response, then C-CANCEL).
    """

    enabled: bool = False
    pacs: PriorPacs = PriorPacs()
    retrieve: Literal["move", "get"] = "get"
    move_destination: Annotated[str, OptionalAETitle] = ""
    max_age_years: int = Field(10, ge=1, le=150)
    max_matches: int = Field(500, ge=1, le=100000)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    retrieve_timeout_s: float = Field(900.0, gt=0)
    #: Rules file whose series-level rules (Modality, SeriesDescription, ProtocolName) rank the prior's series;
    #: empty: ``processing.series_rules``.
    series_rules: str = ""
    min_score: float = 0.0

    @model_validator(mode="after")
    def _pacs_when_enabled(self) -> PriorSettings:
        if self.enabled and not (self.pacs.destination or self.pacs.ae_title):
            raise ValueError("prior.enabled needs prior.pacs (a destination name, or ae_title/host/port)")
        return self


class HttpSettings(_Section):
    """The node's HTTP side: health, readiness, Prometheus metrics and the admin view.

    Bound to the loopback interface by default (put a TLS reverse proxy in front
    to reach it from elsewhere).  ``port = 0`` takes any free port.  Without an
    ``admin_token`` the admin view is read-only and never shows patient IDs;
    with one, the token (login form, or ``Authorization: Bearer``) shows them and
    allows replaying dead letters.
    """

    enabled: bool = True
    bind_address: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8042, ge=0, le=65535)
    admin_token: Annotated[str, SecretText] = ""
    #: Seconds a scrape of ``/metrics`` reuses the figures read from the database.
    metrics_cache_s: float = Field(5.0, ge=0, le=300)
    #: Seconds between C-ECHOs of every destination (shown in ``/readyz``, ``/metrics``, ``/config``); 0: none.
    echo_interval_s: float = Field(60.0, ge=0, le=86400)

    @field_validator("admin_token")
    @classmethod
    def _check_token(cls, value: str) -> str:
        if value and (len(value) < 16 or any(c.isspace() for c in value)):
            raise ValueError("an admin token is at least 16 characters, without spaces")
        return value


#: What a webhook can be told about (``notifications.webhooks[].events``).
NotificationEvent = Literal["run.failed", "run.not_analysed", "delivery.dead_lettered"]
NOTIFICATION_EVENTS: tuple[NotificationEvent, ...] = ("run.failed", "run.not_analysed", "delivery.dead_lettered")


class Webhook(_Section):
    """An HTTP(S) endpoint that receives signed JSON POSTs (:mod:`dicom_node.outbox.notify`).

    ``secret`` (16+ characters) keys the HMAC-SHA256 signature; it is never
    shown (``SecretStr``), and the URL's path and query are masked wherever
    the settings are shown (some services put a token there).
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(repr=False)
    secret: Annotated[SecretStr, SecretText] = Field(min_length=16)
    events: tuple[NotificationEvent, ...] = NOTIFICATION_EVENTS
    timeout_s: float = Field(10.0, gt=0, le=120)
    max_attempts: int = Field(8, ge=1, le=100)
    initial_backoff_s: float = Field(5.0, gt=0)
    max_backoff_s: float = Field(900.0, gt=0)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        value = value.strip()
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
            raise ValueError("a webhook URL is http:// or https:// with a host")
        return value

    @field_validator("events")
    @classmethod
    def _some_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("a webhook needs at least one event")
        return tuple(dict.fromkeys(value))

    @model_validator(mode="after")
    def _backoff_order(self) -> Webhook:
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("max_backoff_s is below initial_backoff_s")
        return self

    @field_serializer("url", when_used="json")
    def _shown_url(self, value: str) -> str:
        parts = urlsplit(value)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}" + ("/***" if parts.path.strip("/") or parts.query else "")


class NotificationSettings(_Section):
    """Webhooks told when a run fails or is not analysed and when a delivery is dead-lettered.

    ``admin_url`` is the admin view's base URL as receivers reach it (links in
    the payload; empty: no links).  Events of the last ``lookback_h`` hours
    without a notification yet are notified (so events of a node that was
    down are not lost, and enabling a webhook does not replay all history).
    """

    webhooks: tuple[Webhook, ...] = ()
    admin_url: str = ""
    lookback_h: float = Field(24.0, gt=0)

    @field_validator("admin_url")
    @classmethod
    def _check_admin_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
            raise ValueError("admin_url is http:// or https:// with a host")
        return value

    @field_validator("webhooks")
    @classmethod
    def _unique_names(cls, value: tuple[Webhook, ...]) -> tuple[Webhook, ...]:
        names = [hook.name for hook in value]
        if len(set(names)) != len(names):
            raise ValueError("webhook names must be unique")
        return value

    def webhook(self, name: str) -> Webhook | None:
        """The webhook called *name*, or None when it is no longer configured."""
        return next((hook for hook in self.webhooks if hook.name == name), None)
