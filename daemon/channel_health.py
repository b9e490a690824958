"""Each channel's health, as Healthchecks keeps per integration: one row per channel.

Glossary:

- **failing**: the channel's last send failed by the channel's own fault (a refused login,
  a suspended service, a provider that is down), or an announced outage is still open.
  ``failing_since`` is when that trouble began; it is cleared when the channel delivers
  again and nothing on it waits past the delivery deadline.
- **recipient fault**: a failure about one person (an invalid number, an opted-out
  recipient; ``ConnectorError.recipient_fault``). It says nothing about the channel, which
  stays healthy; that person's failed alert is reported on its own, as before.
- **outage** (an episode): failing long enough for the admins to be told, once
  (``outage_since``), at once for a permanent failure, after ``delivery_deadline`` for a
  temporary one (``outages.py``); and once more when it ends.

Every send outcome updates the row in the transaction that records it, so the state survives
a restart. ``last_error`` is the ConnectorError text, which channels write without personal
data; it is safe for ``status``, ``/healthz`` and admin notices.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from visitwatch.daemon.store import Store

HEALTHY = "healthy"
FAILING = "failing"


@dataclass(frozen=True)
class ChannelState:
    """One channel's health as stored (times as the record's ISO text, or None)."""

    channel: str
    failing_since: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    last_success: str | None = None
    sent: int = 0
    failures: int = 0  # failures by the channel's fault, ever
    consecutive_failures: int = 0
    recipient_failures: int = 0  # failures about one recipient, ever
    outage_since: str | None = None  # the announced outage, if one is open

    @property
    def state(self) -> str:
        return FAILING if self.failing_since or self.outage_since else HEALTHY

    @property
    def up(self) -> bool:
        return self.state == HEALTHY

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, **asdict(self)}


def _ensure(conn: sqlite3.Connection, channel: str) -> None:
    conn.execute("INSERT OR IGNORE INTO channel_health (channel) VALUES (?)", (channel,))


def succeeded(conn: sqlite3.Connection, channel: str, now: str) -> None:
    """A send went through. Failing ends here unless an outage is still open (it ends
    when its backlog has caught up: :func:`close_outage`)."""
    # One statement on the common path: this runs for every row of a batch, between the
    # channel accepting it and the commit that records it.
    updated = conn.execute(
        "UPDATE channel_health SET sent = sent + 1, last_success = ?, consecutive_failures = 0,"
        " failing_since = CASE WHEN outage_since IS NULL THEN NULL ELSE failing_since END"
        " WHERE channel = ?",
        (now, channel),
    ).rowcount
    if not updated:
        conn.execute(
            "INSERT INTO channel_health (channel, sent, last_success) VALUES (?, 1, ?)",
            (channel, now),
        )


def failed(
    conn: sqlite3.Connection, channel: str, error: str, now: str, *, recipient_fault: bool
) -> None:
    """A send failed: by the channel's fault it is failing; about one recipient it is not."""
    _ensure(conn, channel)
    if recipient_fault:
        conn.execute(
            "UPDATE channel_health SET recipient_failures = recipient_failures + 1"
            " WHERE channel = ?",
            (channel,),
        )
        return
    conn.execute(
        "UPDATE channel_health SET failures = failures + 1,"
        " consecutive_failures = consecutive_failures + 1, last_error = ?, last_error_at = ?,"
        " failing_since = COALESCE(failing_since, ?) WHERE channel = ?",
        (error[:500], now, now, channel),
    )


def open_outage(conn: sqlite3.Connection, channel: str, now: str, began: str) -> str | None:
    """Open an outage of ``channel`` (``began``: when its trouble started); the new
    outage's id (its ``outage_since``), or None when one is open already."""
    _ensure(conn, channel)
    opened = conn.execute(
        "UPDATE channel_health SET outage_since = ?,"
        " failing_since = MIN(COALESCE(failing_since, ?), ?)"
        " WHERE channel = ? AND outage_since IS NULL",
        (now, began, began, channel),
    ).rowcount
    return now if opened else None


def close_outage(conn: sqlite3.Connection, channel: str) -> str | None:
    """The channel delivers again and has caught up: healthy; the outage closed, or None."""
    row = conn.execute(
        "SELECT outage_since FROM channel_health WHERE channel = ?", (channel,)
    ).fetchone()
    conn.execute(
        "UPDATE channel_health SET outage_since = NULL, failing_since = NULL WHERE channel = ?",
        (channel,),
    )
    return row[0] if row else None


def current_outage(conn: sqlite3.Connection, channel: str) -> str | None:
    row = conn.execute(
        "SELECT outage_since FROM channel_health WHERE channel = ?", (channel,)
    ).fetchone()
    return row[0] if row else None


def failing_since(conn: sqlite3.Connection, channel: str) -> str | None:
    row = conn.execute(
        "SELECT failing_since FROM channel_health WHERE channel = ?", (channel,)
    ).fetchone()
    return row[0] if row else None


def in_outage(store: Store) -> set[str]:
    """Channels with an announced outage open (read once at start; outages.py keeps it)."""
    return {
        r["channel"]
        for r in store.query("SELECT channel FROM channel_health WHERE outage_since IS NOT NULL")
    }


def states(store: Store, configured: Iterable[str]) -> list[ChannelState]:
    """The health of every configured channel, in config order (never used: healthy)."""
    fields = ChannelState.__dataclass_fields__
    stored = {
        r["channel"]: ChannelState(**{k: v for k, v in r.items() if k in fields})
        for r in store.query("SELECT * FROM channel_health")
    }
    return [stored.get(name) or ChannelState(name) for name in configured]
