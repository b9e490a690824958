"""Nothing waits silently: the delivery deadline, channel outages and the fallback chain.

A notification still not delivered ``delivery_deadline`` after it was written (a hung or
refusing channel) gets its fallback copy at once and opens an **outage** of its channel; so
does, at once, a permanent failure that is the channel's own fault (a revoked key, a
suspended service). The admins are told once per outage, on another channel, naming the
channel, since when, the last error and what to do, and told once more when the channel
delivers again and has caught up; never once per failed alert (alerts that reached nobody
another way are named together by the health check, ``health.py``). A failure about one
recipient (``ConnectorError.recipient_fault``) leaves the channel healthy. Each channel's
state is kept in ``channel_health`` (``channel_health.py``). Fallbacks chain
(mail -> sms -> outbox), never back to a channel already tried.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from visitwatch.daemon import channel_health
from visitwatch.daemon.config import ConnectorConfig
from visitwatch.daemon.lanes import DispatchReport, Lanes
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.store import Store, from_ts, record_unwritable, ts
from visitwatch.daemon.unrecorded import UnrecordedSends

log = structlog.get_logger(__name__)

# Queues an admin notice once per key: (conn, key, subject, text, now, avoid_channel) ->
# notices written; avoid_channel is the channel in trouble ("" for none). HealthMonitor.notify.
AdminNotifier = Callable[[sqlite3.Connection, str, str, str, datetime, str], int]


# Pending notifications, with whether a fallback copy exists; completed by a condition on
# an indexed column (notifications_pending_created, or notifications_pending for channel).
_LATE = (
    "SELECT n.*, EXISTS (SELECT 1 FROM notifications f WHERE f.fallback_of = n.id) AS copied"
    " FROM notifications n WHERE n.status = 'pending' AND "
)


# The least time a channel must deliver with no failure of its own before its outage is
# announced over: long enough that a channel refusing every few minutes is one episode.
RECOVERY_HOLD = timedelta(minutes=15)


class Outages:
    """Channels in an announced outage, and the fallback copies that stand in for them."""

    def __init__(
        self,
        store: Store,
        configs: Mapping[str, ConnectorConfig],
        lanes: Lanes,
        unrecorded: UnrecordedSends,
        *,
        delivery_deadline: timedelta,
        send_timeout: timedelta,
        notify_admins: AdminNotifier | None,
        timezone: ZoneInfo | None = None,
    ) -> None:
        self.store = store
        self.configs = configs
        self.lanes = lanes
        self.unrecorded = unrecorded
        self.delivery_deadline = delivery_deadline
        self.send_timeout = send_timeout
        self.notify_admins = notify_admins
        self.timezone = timezone or ZoneInfo("UTC")
        # Channels in an announced outage (kept in channel_health, so a restart remembers
        # them): checked on every successful send, so kept in memory too.
        self._channels = channel_health.in_outage(store)
        # An outage closes (one "delivering again" notice) only once its channel has caught
        # up and has had no failure of its own for this long, so a flapping channel is one
        # episode, not two notices per flap. Read from channel_health: a restart keeps it.
        self.recovery_hold = max(delivery_deadline, RECOVERY_HOLD)

    def stalled(self) -> list[str]:
        """Channels whose lane has been inside one send for longer than ``send_timeout``."""
        return self.lanes.stalled(self.send_timeout.total_seconds())

    def past_deadline(self, now: datetime, report: DispatchReport) -> None:
        """Send to the fallback what waits too long, and open an outage (one admin notice).

        A notification gets its fallback copy when it has waited ``delivery_deadline``, or
        at once when its channel is in an announced outage or stuck in a send longer than
        ``send_timeout`` (a help request must not wait out the deadline again). A channel
        whose notifications wait past the deadline is in an outage until nothing on it
        does, however often it delivers meanwhile (a server that answers byte by byte).
        """
        try:
            self._settle(now, report)
        except sqlite3.Error as err:
            log.error("outage_close_failed", error=str(err))
        cutoff = ts(now - self.delivery_deadline)
        troubled = sorted(self._channels | set(self.stalled()))
        # A row whose fallback copy already went out (after repeated failures) still counts
        # against its channel: a channel that delivers nothing for the whole deadline is in
        # an outage, and the admins hear of it, even though the person was reached.
        # Two index searches, merged here: one query with "created <= ? OR channel IN (...)"
        # and ORDER BY id made SQLite scan every notification ever sent, on every pass.
        found = {
            r["id"]: r
            for r in self.store.query(_LATE + "n.created <= ?", (cutoff,))
            + (
                self.store.query(
                    _LATE + f"n.channel IN ({','.join('?' * len(troubled))})", troubled
                )
                if troubled
                else []
            )
        }
        late = [found[key] for key in sorted(found)]
        # Waiting counts against a channel once it has been tried or handed the row: rows
        # nobody has tried yet (the machine was asleep) get their chance first.
        held = self.lanes.held()
        overdue = [
            r
            for r in late
            if r["created"] <= cutoff
            and (r["attempts"] or r["id"] in held or r["channel"] in troubled)
        ]
        opening = {r["channel"] for r in overdue} - self._channels
        late = [
            r
            for r in late
            if not r["copied"]
            and self._has_fallback(r)
            and (r["channel"] in troubled or r in overdue)
        ]
        if not late and not opening:
            return
        try:
            with self.store.transaction() as conn:
                for row in late:
                    report.fallbacks += self.fallback(conn, row, now)
                for name in sorted(opening):
                    rows = [r for r in overdue if r["channel"] == name]
                    report.notices += self._open(conn, name, rows, now)
        except sqlite3.Error as err:
            if record_unwritable(err):
                self.unrecorded.record_failed([], [], now, err)
            else:
                log.error("deadline_check_failed", error=str(err))

    def failed(
        self,
        conn: sqlite3.Connection,
        row: dict[str, Any],
        error: str,
        now: datetime,
        permanent: bool,
        recipient_fault: bool,
    ) -> int:
        """Record a failed send in its channel's health; admin notices written.

        A permanent failure that is the channel's fault opens its outage at once (one
        notice), and the row belongs to that outage: it is reported with it, not alone.
        """
        name = row["channel"]
        channel_health.failed(conn, name, error, ts(now) or "", recipient_fault=recipient_fault)
        if recipient_fault or not permanent:
            return 0  # temporary: an outage when it persists past the deadline
        notices = self._open(conn, name, [{**row, "last_error": error}], now, permanent=True)
        conn.execute(
            "UPDATE notifications SET outage = ? WHERE id = ?",
            (channel_health.current_outage(conn, name), row["id"]),
        )
        return notices

    def recovered(self, conn: sqlite3.Connection, channel: str, now: datetime) -> int:
        """A send went through: the channel's health, and for a channel in an outage drain
        what waits, then close the outage (one notice) once caught up."""
        channel_health.succeeded(conn, channel, ts(now) or "")
        if channel not in self._channels:
            return 0
        # What waited through the outage goes now, not at the end of its backoff.
        conn.execute(
            "UPDATE notifications SET next_attempt_at = ? WHERE channel = ?"
            " AND status = 'pending' AND next_attempt_at > ?",
            (ts(now), channel, ts(now)),
        )
        if self._still_late(conn, channel, now):
            return 0
        healthy = self._healthy_since(conn, channel)
        if healthy is None or now - healthy < self.recovery_hold:
            return 0  # caught up: it closes once healthy for the hold (past_deadline)
        return self._close(conn, channel, now)

    def recovery_due(self, after: datetime) -> datetime | None:
        """When, after a pass that ran at ``after``, the next outage of a channel delivering
        again may close (the delivery loop wakes then). A hold that ended by ``after``
        while rows were still late is not a moment to come back for: the pass that sends
        those rows (woken as their lane finishes, or at their retry) settles it, and
        returning it would spin the loop until then."""
        moments = []
        for channel in sorted(self._channels):
            healthy = self._healthy_since(self.store.db.conn, channel)
            if healthy is not None and healthy + self.recovery_hold > after:
                moments.append(healthy + self.recovery_hold)
        return min(moments, default=None)

    def _healthy_since(self, conn: sqlite3.Connection, channel: str) -> datetime | None:
        """Since when ``channel`` has delivered with no failure of its own; None: it has
        not delivered since its last failure."""
        row = conn.execute(
            "SELECT last_error_at, last_success, outage_since FROM channel_health"
            " WHERE channel = ?",
            (channel,),
        ).fetchone()
        if row is None or not row[1]:
            return None
        trouble = row[0] or row[2]  # the last failure; else the outage (never tried)
        if trouble and row[1] <= trouble:
            return None
        return from_ts(trouble or row[1])

    def _settle(self, now: datetime, report: DispatchReport) -> None:
        """Close the outages of channels caught up and healthy for the whole hold."""
        for channel in sorted(self._channels):
            with self.store.transaction() as conn:
                healthy = self._healthy_since(conn, channel)
                if healthy is None or now - healthy < self.recovery_hold:
                    continue
                if not self._still_late(conn, channel, now):
                    report.notices += self._close(conn, channel, now)

    def _still_late(self, conn: sqlite3.Connection, channel: str, now: datetime) -> bool:
        """Whether something on ``channel`` still waits past the delivery deadline."""
        row = conn.execute(
            "SELECT 1 FROM notifications WHERE status = 'pending' AND created <= ?"
            " AND channel = ? LIMIT 1",
            (ts(now - self.delivery_deadline), channel),
        ).fetchone()
        return row is not None

    def _close(self, conn: sqlite3.Connection, channel: str, now: datetime) -> int:
        """End ``channel``'s outage and tell the admins once that it delivers again."""
        began = channel_health.failing_since(conn, channel)
        outage = channel_health.close_outage(conn, channel)
        self._channels.discard(channel)
        if not outage:
            return 0
        log.warning("channel_recovered", channel=channel)
        if self.notify_admins is None:
            return 0
        since = from_ts(began or outage)
        return self.notify_admins(
            conn,
            f"recovered:{channel}:{outage}",
            f"visitwatch: channel {channel!r} is delivering again",
            f"The channel {channel!r} is delivering again (failing since "
            f"{self._local(since)}) and has caught up with what was waiting.",
            now,
            "",
        )

    def fallback(self, conn: sqlite3.Connection, row: dict[str, Any], now: datetime) -> int:
        """A copy on the channel's fallback; fallbacks chain, never back to a channel tried."""
        target = self._fallback_channel(conn, row)
        if target is None:
            return 0
        return conn.execute(
            "INSERT OR IGNORE INTO notifications (key, visit_id, kind, recipient_id,"
            " recipient_name, recipient_email, recipient_mobile, recipient_relation, channel,"
            " subject, text, short, link, created, next_attempt_at, fallback_of)"
            " SELECT key || '|fallback', visit_id, kind, recipient_id, recipient_name,"
            " recipient_email, recipient_mobile, recipient_relation, ?, subject, text, short,"
            " link, ?, ?, id FROM notifications WHERE id = ?",
            (target, ts(now), ts(now), row["id"]),
        ).rowcount

    def _fallback_channel(self, conn: sqlite3.Connection, row: dict[str, Any]) -> str | None:
        config = self.configs.get(row["channel"])
        if config is None or not config.fallback:
            return None
        tried = {row["channel"]}
        parent = row["fallback_of"]
        while parent is not None:
            up = conn.execute(
                "SELECT channel, fallback_of FROM notifications WHERE id = ?", (parent,)
            ).fetchone()
            if up is None:
                break
            tried.add(up[0])
            parent = up[1]
        if config.fallback in tried:
            return None
        target = self.configs.get(config.fallback)
        if target is not None and target.broadcasts != config.broadcasts:
            return None  # a person's signed link never goes to a shared place (config refuses it)
        return config.fallback

    def _has_fallback(self, row: dict[str, Any]) -> bool:
        config = self.configs.get(row["channel"])
        return bool(config and config.fallback)

    def _open(
        self,
        conn: sqlite3.Connection,
        channel: str,
        rows: list[dict[str, Any]],
        now: datetime,
        *,
        permanent: bool = False,
    ) -> int:
        """Open ``channel``'s outage and tell the admins once; 0 when it is open already."""
        self._channels.add(channel)
        oldest = rows[0]
        # Trouble began when the oldest waiting row was written, or now for a refusal.
        began = ts(now) if permanent else oldest["created"]
        outage = channel_health.open_outage(conn, channel, ts(now) or "", began or "")
        if outage is None:
            return 0  # this outage was announced already
        since = from_ts(channel_health.failing_since(conn, channel)) or now
        why = oldest["last_error"] or (
            f"no answer for over {self.send_timeout.total_seconds():g}s"
            if channel in self.stalled()
            else "not yet attempted"
        )
        about = f"#{oldest['id']}, a {oldest['kind']} notification" + (
            f" for visit {oldest['visit_id']}" if oldest["visit_id"] else ""
        )
        if permanent:
            what = (
                f"The channel {channel!r} refused {about} for good, and the fault is the "
                "channel's, not the recipient's: every message on it fails until it is fixed."
            )
            todo = (
                "What to do: fix what the error names (a revoked or wrong API key, a "
                "suspended account or service, a wrong sender or template), then run "
                "`visitwatch check`. Each new message is still tried on it first."
            )
        else:
            what = (
                f"The channel {channel!r} has not delivered {len(rows)} notification(s) "
                f"within {_spoken(self.delivery_deadline)}. The oldest is {about}."
            )
            todo = (
                "What to do: if the provider or server is down, nothing; visitwatch keeps "
                "retrying. If it lasts, check the provider's status page, the network and "
                "the channel's settings (`visitwatch check`)."
            )
        config = self.configs.get(channel)
        fallback = (
            f"Meanwhile every message on it also goes to its fallback channel {config.fallback!r}."
            if config and config.fallback
            else "It has no fallback channel: you will be told who could not be reached "
            "another way, so that you can tell them."
        )
        text = (
            f"{what}\nFailing since: {self._local(since)}.\nLast error: {why}\n\n{fallback}\n"
            f"{todo}\n\nYou get one notice when it delivers again, not one per alert. "
            "`visitwatch status` shows each channel's state and what is waiting."
        )
        log.error("channel_outage", channel=channel, waiting=len(rows), permanent=permanent)
        if self.notify_admins is None:
            return 0
        return self.notify_admins(
            conn,
            f"outage:{channel}:{outage}",
            f"visitwatch: channel {channel!r} is not delivering",
            text,
            now,
            channel,
        )

    def _local(self, moment: datetime | None) -> str:
        return fmt_local(moment, self.timezone) if moment else "?"


def _spoken(span: timedelta) -> str:
    seconds = round(span.total_seconds())
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} min"
