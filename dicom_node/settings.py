"""The node's one typed, validated settings object.

Settings are read once at start-up from a TOML file (``config/node.toml`` by
default), then overridden by environment variables ``DICOM_NODE_<SECTION>__<KEY>``
and finally by explicit overrides (command-line flags).  An invalid value stops
start-up with a :class:`~core.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydicom.uid import UID, generate_uid

from core.errors import ConfigError
from dicom_node.connection_settings import (  # the connection sections, all named from here too
    NOTIFICATION_EVENTS,  # noqa: F401
    Destination,
    HttpSettings,
    NetworkSettings,
    NotificationEvent,  # noqa: F401
    NotificationSettings,
    PriorPacs,  # noqa: F401
    PriorSettings,
    Profile,  # noqa: F401
    TLSSettings,  # noqa: F401
    Webhook,  # noqa: F401
    _Section,
)

ENV_PREFIX = "DICOM_NODE_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "node.toml"
DEFAULT_SERIES_RULES = PROJECT_ROOT / "config" / "series_selection.toml"


class VolumetrySettings(_Section):
    """Brain volumetry of every analysed study (:mod:`pipeline.volumetry`), in its report.

    ``normative_table``: a file of normative values (:mod:`pipeline.normative`), read at
    start-up; empty: none (the reports give the volumes without normative ranges).
    ``working_spacing_mm`` (grid of the whole-brain registration to the atlas) and
    ``hippocampal_refinement`` (a 1 mm registration around each hippocampus) are the
    method's cost: the defaults are the measured method (about 55 s of CPU per study);
    other values give other numbers, to be compared only with values measured the same way
    (a prior study measured otherwise is measured again).
    """

    enabled: bool = True
    normative_table: str = ""
    working_spacing_mm: float = Field(2.0, ge=1.0, le=6.0)
    hippocampal_refinement: bool = True

    @field_validator("normative_table")
    @classmethod
    def _table_exists(cls, value: str) -> str:
        value = value.strip()
        if value and not Path(value).is_file():
            raise ValueError(f"no such file: {value}")
        return value


class StorageSettings(_Section):
    """Local directories; relative ones are below ``data_dir``."""

    data_dir: Path = Path("var/node")
    spool_dir: Path = Path("spool")
    work_dir: Path = Path("work")
    outbox_dir: Path = Path("outbox")
    quarantine_dir: Path = Path("quarantine")
    fsync: bool = True
    free_space_reserve_mb: int = Field(1024, ge=0)
    duplicate_policy: Literal["ignore_identical", "replace", "reject"] = "ignore_identical"
    accept_lossy: bool = True
    max_dataset_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    spill_bytes: int = Field(16 * 1024 * 1024, ge=0)
    max_pixel_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_inflated_bytes: int = Field(256 * 1024 * 1024, ge=1024)


class DatabaseSettings(_Section):
    """The audit and state database (SQLAlchemy URL)."""

    url: str = ""


class CompletenessSettings(_Section):
    """When a series counts as complete."""

    quiet_period_s: float = Field(10.0, ge=0)
    poll_interval_s: float = Field(0.5, gt=0)
    incomplete_limit_s: float = Field(600.0, gt=0)


class ProcessingSettings(_Section):
    """The run executor and pipeline options.

    ``isolation`` applies to the local executor: ``"process"`` runs each of the
    ``workers`` in its own process (its own model and GIL, so preprocessing
    cannot stall the DICOM listener); ``"thread"`` runs them as threads of the
    node's process (one model in memory; for tests and debugging).
    """

    workers: int = Field(1, ge=1, le=64)
    isolation: Literal["process", "thread"] = "process"
    series_rules: str = ""
    note_window_days: int = Field(365, ge=0)
    registration: Literal["Affine", "AffineFast", "SyN"] = "Affine"
    n4: bool = True
    executor: Literal["local", "celery"] = "local"
    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"


class NoteColumns(_Section):
    """Column names of an external notes table (empty: column absent)."""

    patient_id: str = "patient_id"
    issuer_of_patient_id: str = ""
    accession_number: str = "accession_number"
    note_date: str = "note_date"
    note_type: str = "note_type"
    text: str = "text"
    note_id: str = "id"


class NotesSettings(_Section):
    """Where clinical notes come from: the node's database or an external SQL database."""

    source: Literal["node", "external"] = "node"
    url: str = ""
    table: str = "clinical_notes"
    columns: NoteColumns = NoteColumns()

    @model_validator(mode="after")
    def _url_for_external(self) -> NotesSettings:
        if self.source == "external" and not self.url:
            raise ValueError("notes.url is required when notes.source is 'external'")
        return self


class ModelSettings(_Section):
    """Where the model is and where it runs."""

    path: str = ""
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|mps)$")


class DeliverySettings(_Section):
    """Retries of outgoing C-STOREs."""

    max_attempts: int = Field(8, ge=1)
    initial_backoff_s: float = Field(2.0, gt=0)
    max_backoff_s: float = Field(600.0, gt=0)


class DeviceSettings(_Section):
    """The node as it names itself in its reports."""

    name: str = "AD_NODE"
    manufacturer: str = "Brain-Adapter Node Project"
    model_name: str = "dicom-node"
    serial_number: str = "0001"
    device_uid: str = ""

    @field_validator("device_uid")
    @classmethod
    def _check_uid(cls, value: str) -> str:
        if value and not UID(value).is_valid:
            raise ValueError("not a valid DICOM UID")
        return value


class LoggingSettings(_Section):
    """How the node logs: ``text`` lines or one ``json`` object per line (no patient data either way)."""

    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("format", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value


class Settings(_Section):
    """All settings of the node, validated."""

    network: NetworkSettings = NetworkSettings()
    destinations: tuple[Destination, ...] = ()
    prior: PriorSettings = PriorSettings()
    volumetry: VolumetrySettings = VolumetrySettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    completeness: CompletenessSettings = CompletenessSettings()
    processing: ProcessingSettings = ProcessingSettings()
    notes: NotesSettings = NotesSettings()
    model: ModelSettings = ModelSettings()
    delivery: DeliverySettings = DeliverySettings()
    notifications: NotificationSettings = NotificationSettings()
    device: DeviceSettings = DeviceSettings()
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()

    @field_validator("processing")
    @classmethod
    def _volumetry_needs_affine(cls, value: ProcessingSettings, info: ValidationInfo) -> ProcessingSettings:
        volumetry = info.data.get("volumetry")
        if isinstance(volumetry, VolumetrySettings) and volumetry.enabled and value.registration == "SyN":
            raise ValueError("volumetry.enabled needs processing.registration Affine or AffineFast (volumes are "
                             "measured through the affine registration; or set volumetry.enabled = false)")
        return value

    # ----- derived values -------------------------------------------------
    def _under_data(self, path: Path) -> Path:
        return path if path.is_absolute() else self.data_dir / path

    @property
    def data_dir(self) -> Path:
        """Absolute data directory."""
        return self.storage.data_dir.resolve()

    @property
    def spool_dir(self) -> Path:
        """Where received instances are written."""
        return self._under_data(self.storage.spool_dir)

    @property
    def work_dir(self) -> Path:
        """Scratch space of runs."""
        return self._under_data(self.storage.work_dir)

    @property
    def outbox_dir(self) -> Path:
        """Objects written by runs, waiting for (or kept after) delivery."""
        return self._under_data(self.storage.outbox_dir)

    @property
    def quarantine_dir(self) -> Path:
        """Spool files that start-up reconciliation could not record, set aside (kept, not processed)."""
        return self._under_data(self.storage.quarantine_dir)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL; default a SQLite file under the data directory."""
        return self.database.url or f"sqlite:///{self.data_dir / 'node.sqlite3'}"

    @property
    def model_path(self) -> Path:
        """The model directory."""
        return Path(self.model.path) if self.model.path else self.data_dir / "models" / "demo"

    @property
    def series_rules_path(self) -> Path:
        """The series-selection rules file."""
        return Path(self.processing.series_rules) if self.processing.series_rules else DEFAULT_SERIES_RULES

    @property
    def normative_table_path(self) -> Path | None:
        """The normative values file of the volumes (``volumetry.normative_table``), or None."""
        return Path(self.volumetry.normative_table) if self.volumetry.normative_table else None

    @property
    def device_uid(self) -> str:
        """The node's Device UID, stable for a given serial number."""
        if self.device.device_uid:
            return self.device.device_uid
        return str(generate_uid(prefix=None, entropy_srcs=["dicom-node device", self.device.serial_number]))

    def destination(self, name: str) -> Destination:
        """Return the destination called *name*."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none"
        raise ConfigError(f"unknown destination {name!r} (configured: {known})")


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"setting {'.'.join(path)}: {key} is not a section")
        node = child
    node[path[-1]] = value


def _env_value(raw: str) -> Any:
    """Parse an environment value: JSON when it parses, else a plain string.

    Lists may also be given comma-separated.
    """
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _coerce_lists(tree: dict[str, Any]) -> None:
    network = tree.get("network")
    if isinstance(network, dict):
        value = network.get("allowed_calling_ae_titles")
        if isinstance(value, str):
            network["allowed_calling_ae_titles"] = [v for v in value.split(",") if v.strip()]


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: file, then environment, then explicit overrides.

    Parameters
    ----------
    config_file : Path, optional
        TOML file; default ``config/node.toml`` (or ``$DICOM_NODE_CONFIG``).
    environ : Mapping[str, str], optional
        Environment to read ``DICOM_NODE_*`` overrides from; default ``os.environ``.
    overrides : Mapping[str, Any], optional
        Dotted keys (``"network.port"``) to values, e.g. from CLI flags.

    Returns
    -------
    Settings
        The validated settings.

    Raises
    ------
    ConfigError
        When the file cannot be read or a value is invalid; the message names the key.
    """
    env = os.environ if environ is None else environ
    path = config_file or Path(env.get(ENV_PREFIX + "CONFIG", DEFAULT_CONFIG))
    try:
        tree: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        keys = [k.lower() for k in name[len(ENV_PREFIX):].split("__")]
        _set_path(tree, keys, _env_value(raw) if keys != ["database", "url"] else raw)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, dotted.split("."), value)
    _coerce_lists(tree)
    for dest in tree.get("destinations", []) or []:
        if isinstance(dest, dict) and "port" in dest and isinstance(dest["port"], str):
            dest["port"] = dest["port"].strip()
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid setting {problems}") from exc
