"""``/metrics``: the node's figures in the Prometheus text format, read from the database at scrape time.

A custom collector (:class:`NodeCollector`) counts what the database holds, so
the figures are right whichever process did the work (listener, worker
processes, Celery workers on other machines) and survive restarts; nothing is
threaded through the C-STORE hot path.  A scrape reuses the figures of the
previous one for ``http.metrics_cache_s`` seconds.  Labels carry states,
outcomes, statuses and stage names only, never UIDs or patient data.

Metrics (all prefixed ``dicom_node_``): ``instances_received_total``,
``instances_refused_total{status}``, ``associations_total{outcome}``,
``runs{state,outcome}``, ``run_stage_seconds{stage}`` (histogram of
``runs.stage_seconds``), ``queue_depth``, ``queue_oldest_age_seconds``,
``deliveries{state}``, ``dead_letters``, ``notifications{state}``, ``model_info{name,version,weights_sha256,source}``,
``database_up`` and ``metrics_collect_seconds``; from the periodic C-ECHO
(:mod:`dicom_node.ops.echo`, in memory, not the database):
``destination_echo_up{destination}``, ``destination_echo_rtt_seconds{destination}``
and ``destination_echo_timestamp_seconds{destination}``.

The model's identity (``model_info``) comes from where it is true: ``source="loaded"``
is the model of this node or its worker processes (:mod:`dicom_node.ops.modelinfo`;
none for a Celery listener), ``source="last_run"`` the model recorded by the most
recent finished run, whichever process or machine ran it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.db.models import (
    AssociationLog,
    Delivery,
    DeliveryState,
    Instance,
    Notification,
    NotificationState,
    Rejection,
    Run,
    RunState,
)
from dicom_node.ops.echo import EchoResult

logger = logging.getLogger(__name__)

PREFIX = "dicom_node_"
#: Upper bounds (seconds) of the stage-duration histogram.
STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)

ModelIdentity = Callable[[], dict[str, str] | None]
EchoResults = Callable[[], dict[str, EchoResult]]


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def stage_histogram(rows: Iterable[dict[str, Any] | None]) -> HistogramMetricFamily:
    """The histogram of stage durations from ``runs.stage_seconds`` values."""
    observations: dict[str, list[float]] = {}
    for stages in rows:
        for stage, seconds in (stages or {}).items():
            if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0:
                observations.setdefault(str(stage), []).append(float(seconds))
    family = HistogramMetricFamily(PREFIX + "run_stage_seconds", "Duration of each stage of finished runs",
                                   labels=["stage"])
    for stage, values in sorted(observations.items()):
        buckets = [(str(bound), float(sum(v <= bound for v in values))) for bound in STAGE_BUCKETS]
        buckets.append(("+Inf", float(len(values))))
        family.add_metric([stage], buckets, sum_value=sum(values))
    return family


class NodeCollector(Collector):
    """Reads the node's figures from the database (cached for *cache_s* seconds).

    Parameters
    ----------
    sessions : sessionmaker
        Database sessions.
    cache_s : float
        Seconds a result is reused.
    model_identity : callable, optional
        The model this node (or its worker processes) loaded, or None.
    echoes : callable, optional
        The last C-ECHO of each destination (:meth:`dicom_node.ops.echo.EchoProbe.results`).
    """

    def __init__(self, sessions: sessionmaker[Session], cache_s: float = 5.0,
                 model_identity: ModelIdentity | None = None, echoes: EchoResults | None = None) -> None:
        self.sessions = sessions
        self.cache_s = cache_s
        self.model_identity = model_identity
        self.echoes = echoes
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Any]] | None = None

    def collect(self) -> Iterator[Any]:
        """The metric families (from the cache when fresh)."""
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.cache_s:
                self._cached = (now, self._read())
            families = self._cached[1]
        yield from families

    def _read(self) -> list[Any]:
        started = time.perf_counter()
        up = GaugeMetricFamily(PREFIX + "database_up", "1 when the last scrape could read the database")
        try:
            families = self._from_database()
            up.add_metric([], 1.0)
        except SQLAlchemyError as exc:
            logger.warning("metrics: database not readable (%s)", type(exc).__name__)
            families = []
            up.add_metric([], 0.0)
        echo = echo_families(self.echoes() if self.echoes else {})
        took = GaugeMetricFamily(PREFIX + "metrics_collect_seconds", "Seconds the last read of the figures took")
        took.add_metric([], time.perf_counter() - started)
        return [*families, *echo, up, took]

    def _from_database(self) -> list[Any]:
        with self.sessions() as session:
            received = session.scalar(select(func.count()).select_from(Instance)) or 0
            refused = session.execute(select(Rejection.status, func.count()).group_by(Rejection.status)).all()
            assocs = session.execute(select(AssociationLog.outcome, func.count())
                                     .group_by(AssociationLog.outcome)).all()
            runs = session.execute(select(Run.state, Run.outcome, func.count())
                                   .group_by(Run.state, Run.outcome)).all()
            oldest = session.scalar(select(func.min(Run.created_at)).where(Run.state == RunState.QUEUED.value))
            stages = session.scalars(select(Run.stage_seconds).where(Run.finished_at.is_not(None))).all()
            deliveries = {state: count for state, count in session.execute(
                select(Delivery.state, func.count()).group_by(Delivery.state)).all()}
            notifications = {state: count for state, count in session.execute(
                select(Notification.state, func.count()).group_by(Notification.state)).all()}
            last_model = session.execute(
                select(Run.model_name, Run.model_version, Run.model_weights_sha256)
                .where(Run.model_name.is_not(None), Run.finished_at.is_not(None))
                .order_by(Run.finished_at.desc()).limit(1)).first()

        fams: list[Any] = []
        fam = CounterMetricFamily(PREFIX + "instances_received", "Instances received and kept (answered Success)")
        fam.add_metric([], float(received))
        fams.append(fam)
        fam = CounterMetricFamily(PREFIX + "instances_refused", "Instances refused, by DIMSE status",
                                  labels=["status"])
        for status, count in sorted(refused, key=lambda r: r[0]):
            fam.add_metric([f"0x{status:04X}"], float(count))
        fams.append(fam)
        fam = CounterMetricFamily(PREFIX + "associations", "Associations, by outcome (open: not ended yet)",
                                  labels=["outcome"])
        for outcome, count in sorted(assocs, key=lambda r: r[0] or ""):
            fam.add_metric([outcome or "open"], float(count))
        fams.append(fam)
        gauge = GaugeMetricFamily(PREFIX + "runs", "Runs, by state and outcome", labels=["state", "outcome"])
        for state, outcome, count in sorted(runs, key=lambda r: (r[0], r[1] or "")):
            gauge.add_metric([state, outcome or ""], float(count))
        fams.append(gauge)
        fams.append(stage_histogram(stages))
        queued = sum(count for state, _, count in runs if state == RunState.QUEUED.value)
        gauge = GaugeMetricFamily(PREFIX + "queue_depth", "Runs waiting for a worker")
        gauge.add_metric([], float(queued))
        fams.append(gauge)
        gauge = GaugeMetricFamily(PREFIX + "queue_oldest_age_seconds", "Age of the oldest queued run (0: none)")
        gauge.add_metric([], max(0.0, (datetime.now(UTC) - _aware(oldest)).total_seconds()) if oldest else 0.0)
        fams.append(gauge)
        gauge = GaugeMetricFamily(PREFIX + "deliveries", "Outbox deliveries, by state", labels=["state"])
        for state in DeliveryState:
            gauge.add_metric([state.value], float(deliveries.get(state.value, 0)))
        fams.append(gauge)
        gauge = GaugeMetricFamily(PREFIX + "dead_letters", "Deliveries in the dead-letter state (need an admin)")
        gauge.add_metric([], float(deliveries.get(DeliveryState.DEAD.value, 0)))
        fams.append(gauge)
        gauge = GaugeMetricFamily(PREFIX + "notifications", "Webhook notifications, by state", labels=["state"])
        for notification_state in NotificationState:
            gauge.add_metric([notification_state.value], float(notifications.get(notification_state.value, 0)))
        fams.append(gauge)
        loaded = self.model_identity() if self.model_identity else None
        info = InfoMetricFamily(PREFIX + "model", "The model loaded by this node or its worker processes "
                                "(source=loaded) and the one the most recent finished run used (source=last_run)",
                                labels=["source"])
        if loaded:
            info.add_metric(["loaded"], {k: str(loaded.get(k) or "") for k in ("name", "version", "weights_sha256")})
        if last_model is not None:
            info.add_metric(["last_run"], {"name": last_model[0] or "", "version": last_model[1] or "",
                                           "weights_sha256": last_model[2] or ""})
        fams.append(info)
        return fams


def echo_families(results: dict[str, EchoResult]) -> list[Any]:
    """Gauges of the last C-ECHO of each destination: success, round trip, when."""
    up = GaugeMetricFamily(PREFIX + "destination_echo_up", "1 when the last C-ECHO of the destination succeeded",
                           labels=["destination"])
    rtt = GaugeMetricFamily(PREFIX + "destination_echo_rtt_seconds",
                            "Seconds the last C-ECHO took (connect, associate, echo, release)", labels=["destination"])
    when = GaugeMetricFamily(PREFIX + "destination_echo_timestamp_seconds",
                             "Unix time of the last C-ECHO of the destination", labels=["destination"])
    for name, result in sorted(results.items()):
        up.add_metric([name], 1.0 if result.ok else 0.0)
        rtt.add_metric([name], result.rtt_ms / 1000.0)
        when.add_metric([name], result.at.timestamp())
    return [up, rtt, when]


def make_registry(collector: NodeCollector) -> CollectorRegistry:
    """A registry holding only the node's collector (no process metrics of the default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
