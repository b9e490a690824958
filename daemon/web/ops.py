"""``/healthz`` and ``/metrics``: the watcher is watched (principle 5).

``/healthz`` answers 200 when the record can be read, the sweep and the delivery loop have
each finished a pass lately (within 3 x ``sweep_interval`` + 30 s) and every calendar was
read lately (within 3 x ``poll_interval``), and at least one channel can deliver; otherwise
503 with the reasons. Its body shows each channel's state either way (see ``_channels``
for why one failing channel is not a 503). An external monitor (Uptime Kuma, a load
balancer, systemd's ``ExecCondition``) polls it.

``/metrics`` is Prometheus text, read from the record at scrape time through a registry of
this app's own (so two apps in one process never share counters). Neither carries personal
data: states, kinds, channels and source names only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

import structlog
from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from visitwatch.daemon import channel_health
from visitwatch.daemon.attention import needs_attention
from visitwatch.daemon.store import from_ts
from visitwatch.daemon.web.context import Activity, Durations, WebContext

log = structlog.get_logger(__name__)

blueprint = Blueprint("ops", __name__)

# Seconds from a notification's creation to its channel accepting it.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


# ---------------------------------------------------------------------- /healthz


def _context() -> WebContext:
    from visitwatch.daemon.web.app import context_of

    return context_of(current_app)


def health_report(context: WebContext) -> tuple[bool, dict[str, Any]]:
    """``(healthy, body)``: the body names each check and, when unhealthy, the reasons."""
    now = context.clock.now()
    daemon = context.config.daemon
    activity = context.activity
    reasons: list[str] = []
    body: dict[str, Any] = {}
    try:
        stored_sweep = from_ts(context.store.get_meta("last_sweep_at"))
        sources = context.store.query(
            "SELECT name, last_success_at, last_error, failures FROM sources ORDER BY name"
        )
        body["database"] = "ok"
    except sqlite3.Error as err:
        log.warning("healthz_database_unreadable", error=str(err))
        body["database"] = "unreadable"
        reasons.append("database: cannot be read")
        stored_sweep, sources = None, []
    if body["database"] == "ok":
        reasons += _channels(context, body)
    loop_limit = 3 * daemon.sweep_interval + timedelta(seconds=30)
    if activity.started is None:
        reasons.append("daemon: the sweep and delivery loops are not running")
    for name, last in (
        ("sweep", _latest(activity.last_sweep, stored_sweep)),
        ("dispatch", activity.last_dispatch),
    ):
        age = _age(now, last or activity.started)
        body[f"{name}_age_seconds"] = None if last is None else _age(now, last)
        if age is not None and age > loop_limit.total_seconds():
            reasons.append(f"{name}: no pass for {_seconds(age)} (limit {_seconds(loop_limit)})")
    source_limit = 3 * daemon.poll_interval.total_seconds()
    body["sources"] = {}
    for row in sources:
        last_ok = from_ts(row["last_success_at"])
        age = _age(now, last_ok or activity.started)
        body["sources"][row["name"]] = {
            "age_seconds": None if last_ok is None else _age(now, last_ok),
            "failures": row["failures"],
        }
        if age is not None and age > source_limit:
            since = "never read" if last_ok is None else f"last read {_seconds(age)} ago"
            reasons.append(f"source {row['name']}: {since} (limit {_seconds(source_limit)})")
    for name in context.extras.get("source_errors", {}):
        reasons.append(f"source {name}: cannot be used (see `visitwatch check`)")
    body["attention"] = _attention(context, now) if body["database"] == "ok" else []
    body["status"] = "unhealthy" if reasons else "ok"
    body["reasons"] = reasons
    return not reasons, body


def _channels(context: WebContext, body: dict[str, Any]) -> list[str]:
    """Each channel's state into ``body``; the reason for a 503, if any.

    /healthz answers "does the daemon itself work?", so that an uptime monitor pages someone
    who can repair it. One failing channel is not a 503: the daemon has told the admins
    itself, on another channel, once per outage (outages.py); restarting it would not mend
    a revoked key or a provider's outage; and a load balancer that took the 503 for "down"
    would take the check-in pages away from staff as well. When *every* channel is failing
    nobody can be alerted, not even about the outage: the daemon cannot do its job and the
    monitor is the only one left to tell anyone, so that is a 503.
    """
    names = [c.name for c in context.config.channels]
    try:
        states = channel_health.states(context.store, names)
    except sqlite3.Error as err:
        log.warning("healthz_channels_unreadable", error=str(err))
        return ["channels: their state cannot be read"]
    body["channels"] = {
        s.channel: {
            "state": s.state,
            "failing_since": s.failing_since,
            "last_error": s.last_error,
            "last_success": s.last_success,
            "outage_since": s.outage_since,
        }
        for s in states
    }
    if states and not any(s.up for s in states):
        return [f"channels: none can deliver ({', '.join(names)} failing)"]
    return []


def _attention(context: WebContext, now: datetime) -> list[dict[str, Any]]:
    """What needs an admin (``attention.py``), shown in the body but never a 503 by itself:
    each was told to the admins already, and restarting the daemon would mend none of them
    (the checks above are what make this a 503)."""
    try:
        items = needs_attention(
            context.store, context.config, now, context.extras.get("source_errors", {})
        )
    except sqlite3.Error as err:
        log.warning("healthz_attention_unreadable", error=str(err))
        return []
    return [a.as_dict(public=True) for a in items]


def _latest(*moments: datetime | None) -> datetime | None:
    known = [m for m in moments if m is not None]
    return max(known) if known else None


def _age(now: datetime, moment: datetime | None) -> float | None:
    return None if moment is None else round(max((now - moment).total_seconds(), 0.0), 1)


def _seconds(value: float | timedelta) -> str:
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    return f"{round(seconds)} s"


@blueprint.get("/healthz")
def healthz() -> tuple[dict[str, Any], int, dict[str, str]]:
    healthy, body = health_report(_context())
    return body, 200 if healthy else 503, {"Cache-Control": "no-store"}


# ---------------------------------------------------------------------- /metrics


class RecordCollector(Collector):
    """Reads the record and the loops' :class:`Activity` each time Prometheus scrapes."""

    def __init__(self, context: WebContext) -> None:
        self.context = context

    def collect(self) -> Iterator[Metric]:
        store = self.context.store
        visits = GaugeMetricFamily(
            "visitwatch_visits", "Visits in the record, by state", labels=["state"]
        )
        for row in store.query("SELECT state, COUNT(*) AS n FROM visits GROUP BY state"):
            visits.add_metric([row["state"]], row["n"])
        yield visits
        notifications = GaugeMetricFamily(
            "visitwatch_notifications",
            "Notifications in the record, by kind, channel and status",
            labels=["kind", "channel", "status"],
        )
        for row in store.query(
            "SELECT kind, channel, status, COUNT(*) AS n FROM notifications"
            " GROUP BY kind, channel, status"
        ):
            notifications.add_metric([row["kind"], row["channel"], row["status"]], row["n"])
        yield notifications
        yield self._delivery_latency()
        failures = GaugeMetricFamily(
            "visitwatch_source_consecutive_failures",
            "Calendar reads that failed in a row, by source (0: the last read worked)",
            labels=["source"],
        )
        last_ok = GaugeMetricFamily(
            "visitwatch_source_last_success_timestamp_seconds",
            "When each calendar source was last read successfully (Unix time)",
            labels=["source"],
        )
        for row in store.query("SELECT name, failures, last_success_at FROM sources"):
            failures.add_metric([row["name"]], row["failures"])
            moment = from_ts(row["last_success_at"])
            if moment is not None:
                last_ok.add_metric([row["name"]], moment.timestamp())
        yield failures
        yield last_ok
        yield from self._channels()
        yield from self._activity(self.context.activity)

    def _channels(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "visitwatch_channel_up",
            "1 while a channel delivers, 0 while it is failing (its own fault, not a recipient's)",
            labels=["channel"],
        )
        failures = GaugeMetricFamily(
            "visitwatch_channel_consecutive_failures",
            "Sends that failed in a row by the channel's fault, by channel (0: the last worked)",
            labels=["channel"],
        )
        last_ok = GaugeMetricFamily(
            "visitwatch_channel_last_success_timestamp_seconds",
            "When each channel last delivered a notification (Unix time)",
            labels=["channel"],
        )
        names = [c.name for c in self.context.config.channels]
        for state in channel_health.states(self.context.store, names):
            up.add_metric([state.channel], 1 if state.up else 0)
            failures.add_metric([state.channel], state.consecutive_failures)
            moment = from_ts(state.last_success)
            if moment is not None:
                last_ok.add_metric([state.channel], moment.timestamp())
        yield from (up, failures, last_ok)

    def _delivery_latency(self) -> HistogramMetricFamily:
        """Sent notifications: ``sent_at - created``, bucketed in one pass by SQLite."""
        seconds = "(julianday(sent_at) - julianday(created)) * 86400.0"
        columns = ", ".join(
            f"SUM(CASE WHEN {seconds} <= {bound} THEN 1 ELSE 0 END) AS b{n}"
            for n, bound in enumerate(LATENCY_BUCKETS)
        )
        row = self.context.store.query(
            f"SELECT COUNT(*) AS n, COALESCE(SUM({seconds}), 0) AS total, {columns}"
            " FROM notifications WHERE status = 'sent' AND sent_at IS NOT NULL"
        )[0]
        buckets = [(str(bound), row[f"b{n}"] or 0) for n, bound in enumerate(LATENCY_BUCKETS)]
        family = HistogramMetricFamily(
            "visitwatch_delivery_latency_seconds",
            "From a notification's creation to its channel accepting it",
        )
        family.add_metric([], [*buckets, ("+Inf", row["n"])], sum_value=row["total"])
        return family

    def _activity(self, activity: Activity) -> Iterable[Metric]:
        sweeps = HistogramMetricFamily(
            "visitwatch_sweep_duration_seconds", "How long each sweep pass took"
        )
        _add(sweeps, [], activity.sweeps)
        yield sweeps
        syncs = HistogramMetricFamily(
            "visitwatch_sync_duration_seconds",
            "How long each calendar read and its processing took, by source",
            labels=["source"],
        )
        failed = GaugeMetricFamily(
            "visitwatch_source_failed_reads",
            "Calendar reads that failed since the daemon started, by source",
            labels=["source"],
        )
        for source, durations in sorted(activity.syncs.items()):
            _add(syncs, [source], durations)
            failed.add_metric([source], activity.sync_failures.get(source, 0))
        yield syncs
        yield failed
        for name, moment in (("sweep", activity.last_sweep), ("dispatch", activity.last_dispatch)):
            if moment is not None:
                yield GaugeMetricFamily(
                    f"visitwatch_last_{name}_timestamp_seconds",
                    f"When the {name} loop last finished a pass (Unix time)",
                    value=moment.timestamp(),
                )


def _add(family: HistogramMetricFamily, labels: list[str], durations: Durations) -> None:
    buckets, total = durations.snapshot()
    family.add_metric(labels, buckets, sum_value=total)


def registry_for(context: WebContext) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RecordCollector(context))
    return registry


@blueprint.get("/metrics")
def metrics() -> Response:
    app = current_app
    registry = app.extensions.get("visitwatch-metrics")
    if registry is None:
        registry = app.extensions["visitwatch-metrics"] = registry_for(_context())
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
