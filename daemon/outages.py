"""Nothing waits silently: the delivery deadline, channel outages and the fallback chain.

A notification still not delivered ``delivery_deadline`` after it was written (a hung or
refusing channel) gets its fallback copy at once and opens an **outage** of its channel:
the admins are told once, on another channel, and told again when the channel delivers
again. Fallbacks chain (mail -> sms -> outbox), never back to a channel already tried.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog

from visitwatch.daemon.config import ConnectorConfig
from visitwatch.daemon.lanes import DispatchReport, Lanes
from visitwatch.daemon.store import Store, record_unwritable, ts
from visitwatch.daemon.unrecorded import UnrecordedSends

log = structlog.get_logger(__name__)

# Queues an admin notice once per key: (conn, key, subject, text, now, avoid_channel) ->
# notices written; avoid_channel is the channel in trouble ("" for none). HealthMonitor.notify.
AdminNotifier = Callable[[sqlite3.Connection, str, str, str, datetime, str], int]


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
    ) -> None:
        self.store = store
        self.configs = configs
        self.lanes = lanes
        self.unrecorded = unrecorded
        self.delivery_deadline = delivery_deadline
        self.send_timeout = send_timeout
        self.notify_admins = notify_admins
        # Channels in an announced outage (also kept in meta, so a restart remembers them):
        # checked on every successful send, so kept in memory.
        self._channels = {
            r["key"].removeprefix("outage:")
            for r in store.query("SELECT key FROM meta WHERE key LIKE 'outage:%'")
        }

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
        cutoff = ts(now - self.delivery_deadline)
        troubled = sorted(self._channels | set(self.stalled()))
        # A row whose fallback copy already went out (after repeated failures) still counts
        # against its channel: a channel that delivers nothing for the whole deadline is in
        # an outage, and the admins hear of it, even though the person was reached.
        late = self.store.query(
            "SELECT n.*, EXISTS (SELECT 1 FROM notifications f WHERE f.fallback_of = n.id)"
            " AS copied FROM notifications n WHERE n.status = 'pending' AND (n.created <= ?"
            f" OR n.channel IN ({','.join('?' * len(troubled))}))"
            " ORDER BY n.id",
            (cutoff, *troubled),
        )
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

    def recovered(self, conn: sqlite3.Connection, channel: str, now: datetime) -> int:
        """A send went through on a channel in an outage: drain, and close it once caught up."""
        if channel not in self._channels:
            return 0
        # What waited through the outage goes now, not at the end of its backoff.
        conn.execute(
            "UPDATE notifications SET next_attempt_at = ? WHERE channel = ?"
            " AND status = 'pending' AND next_attempt_at > ?",
            (ts(now), channel, ts(now)),
        )
        still_late = conn.execute(
            "SELECT 1 FROM notifications WHERE status = 'pending' AND created <= ?"
            " AND channel = ? LIMIT 1",
            (ts(now - self.delivery_deadline), channel),
        ).fetchone()
        if still_late:
            return 0
        meta = f"outage:{channel}"
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (meta,)).fetchone()
        self._channels.discard(channel)
        if not row:
            return 0
        conn.execute("DELETE FROM meta WHERE key = ?", (meta,))
        log.warning("channel_recovered", channel=channel)
        if self.notify_admins is None:
            return 0
        return self.notify_admins(
            conn,
            f"recovered:{channel}:{row[0]}",
            f"visitwatch: channel {channel!r} is delivering again",
            f"The channel {channel!r} is delivering again and has caught up with what was waiting.",
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
            " subject, text, created, next_attempt_at, fallback_of)"
            " SELECT key || '|fallback', visit_id, kind, recipient_id, recipient_name,"
            " recipient_email, recipient_mobile, recipient_relation, ?, subject, text, ?, ?, id"
            " FROM notifications WHERE id = ?",
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
        return None if config.fallback in tried else config.fallback

    def _has_fallback(self, row: dict[str, Any]) -> bool:
        config = self.configs.get(row["channel"])
        return bool(config and config.fallback)

    def _open(
        self, conn: sqlite3.Connection, channel: str, rows: list[dict[str, Any]], now: datetime
    ) -> int:
        meta = f"outage:{channel}"
        self._channels.add(channel)
        if conn.execute("SELECT 1 FROM meta WHERE key = ?", (meta,)).fetchone():
            return 0  # this outage was announced already
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (meta, ts(now)))
        oldest = rows[0]
        why = oldest["last_error"] or (
            f"no answer for over {self.send_timeout.total_seconds():g}s"
            if channel in self.stalled()
            else "not yet attempted"
        )
        config = self.configs.get(channel)
        fallback = (
            f"Copies are going to its fallback channel {config.fallback!r}."
            if config and config.fallback
            else "It has no fallback channel: make sure the people waiting for these "
            "messages are told another way."
        )
        text = (
            f"The channel {channel!r} has not delivered {len(rows)} notification(s) within "
            f"{_spoken(self.delivery_deadline)}. The oldest is #{oldest['id']}, a {oldest['kind']} notification"
            + (f" for visit {oldest['visit_id']}" if oldest["visit_id"] else "")
            + f".\nLast error: {why}\n\n{fallback}\nvisitwatch keeps retrying and tells you "
            "when the channel delivers again. `visitwatch status` lists what is waiting."
        )
        log.error("channel_outage", channel=channel, waiting=len(rows))
        if self.notify_admins is None:
            return 0
        return self.notify_admins(
            conn,
            f"outage:{channel}:{ts(now)}",
            f"visitwatch: channel {channel!r} is not delivering",
            text,
            now,
            channel,
        )


def _spoken(span: timedelta) -> str:
    seconds = round(span.total_seconds())
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} min"
