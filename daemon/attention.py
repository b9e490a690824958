"""What needs an admin now: the troubles ``health.py`` sends notices about, while they last.

A notice is sent once per episode; an admin who missed it (or opened ``visitwatch status``
or ``/healthz`` a day later) still needs to see the trouble until it is resolved. So these
are read from the record's current state, not from the notices sent: a source that reads
again, a channel that delivers again, a renewed credential, a dead letter whose visit has
ended, drop off by themselves.

Each item's ``problem`` and ``fix`` carry no personal data and no error text (``/healthz``
is served without sign-in); ``detail`` (the last error) is for ``visitwatch status`` only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from visitwatch.daemon import channel_health
from visitwatch.daemon.config import Config
from visitwatch.daemon.health import (
    EXPIRY_WARNINGS_DAYS,
    INCOMPLETE_READS_BEFORE_NOTICE,
    RECENT,
    SOURCE_FAILURES_BEFORE_NOTICE,
    reached_otherwise,
)
from visitwatch.daemon.heartbeat import META_ERROR, META_FAILING_SINCE
from visitwatch.daemon.lifecycle import TERMINAL
from visitwatch.daemon.store import Store, from_ts, ts


@dataclass(frozen=True)
class Attention:
    """One trouble an admin must fix: what, which, since when, and how to fix it."""

    topic: str  # source, channel, undelivered, credential, heartbeat
    name: str  # the source's or channel's name, a notification's #id, ...
    problem: str
    fix: str
    since: str | None = None
    detail: str = ""  # the last error: may quote an address, so never on /healthz

    def as_dict(self, public: bool = False) -> dict[str, Any]:
        shown = asdict(self)
        if public:
            del shown["detail"]
        return shown


def needs_attention(
    store: Store, config: Config, now: datetime, source_errors: Mapping[str, str]
) -> list[Attention]:
    """Everything that needs an admin now, most fundamental first."""
    items = [
        Attention(
            "source",
            name,
            "cannot be used: no visit booked there is watched",
            "correct its [[sources]] entry (`visitwatch check` says what is wrong), then "
            "restart visitwatch",
            detail=error,
        )
        for name, error in source_errors.items()
    ]
    conn = store.db.conn
    items += _sources(conn, config, now)
    items += _channels(store, config)
    items += _undelivered(conn, now)
    items += _credentials(config, now)
    items += _heartbeat(store)
    return items


def _sources(conn: sqlite3.Connection, config: Config, now: datetime) -> list[Attention]:
    stale_after = 3 * config.daemon.poll_interval
    items = []
    for row in conn.execute("SELECT * FROM sources ORDER BY name").fetchall():
        name, last_ok = row["name"], from_ts(row["last_success_at"])
        if row["failures"] >= SOURCE_FAILURES_BEFORE_NOTICE:
            items.append(
                Attention(
                    "source",
                    name,
                    f"its last {row['failures']} reads failed: new bookings, edits and "
                    "cancellations there are not seen",
                    "run `visitwatch check` to see why it cannot be read",
                    row["last_success_at"],
                    row["last_error"] or "",
                )
            )
        elif last_ok is not None and now - last_ok > stale_after:
            items.append(
                Attention(
                    "source",
                    name,
                    f"not read for {_minutes(now - last_ok)} (it is read every "
                    f"{_minutes(config.daemon.poll_interval)})",
                    "make sure the daemon is running (`visitwatch doctor`)",
                    row["last_success_at"],
                )
            )
        if row["incomplete"] >= INCOMPLETE_READS_BEFORE_NOTICE:
            items.append(
                Attention(
                    "source",
                    name,
                    f"its last {row['incomplete']} reads were incomplete: entries it could "
                    "not read are not watched",
                    "`visitwatch status` lists the unreadable entries; fix them in the calendar",
                    row["incomplete_since"],
                    row["incomplete_reason"] or "",
                )
            )
        if row["held_removals"]:
            items.append(
                Attention(
                    "source",
                    name,
                    "a read that would remove most of its watched visits is held",
                    f"if they really were cancelled: `visitwatch sources confirm {name}`; "
                    "if not, fix the calendar",
                    row["held_since"],
                )
            )
    return items


def _channels(store: Store, config: Config) -> list[Attention]:
    names = [c.name for c in config.channels]
    return [
        Attention(
            "channel",
            state.channel,
            "is not delivering: alerts on it go to its fallback, if it has one",
            "`visitwatch doctor` tries it; fix what its last error says",
            state.failing_since,
            state.last_error or "",
        )
        for state in channel_health.states(store, names)
        if not state.up
    ]


def _undelivered(conn: sqlite3.Connection, now: datetime) -> list[Attention]:
    """Dead letters that reached nobody another way, while their visit is still open."""
    ended = ", ".join(f"'{state}'" for state in sorted(TERMINAL))
    rows = conn.execute(
        "SELECT n.* FROM notifications n LEFT JOIN visits v ON v.id = n.visit_id"
        f" WHERE n.status = 'failed' AND n.created >= ? AND (v.state IS NULL"
        f" OR v.state NOT IN ({ended})) ORDER BY n.id",
        (ts(now - RECENT),),
    ).fetchall()
    return [
        Attention(
            "undelivered",
            f"#{row['id']}",
            f"{row['kind']} notification"
            + (f" for visit {row['visit_id']}" if row["visit_id"] else "")
            + f" could not be delivered via {row['channel']}",
            "make sure the recipient has been told another way (`visitwatch status` says who)",
            row["created"],
            row["last_error"] or "",
        )
        for row in rows
        if not reached_otherwise(conn, row)
    ]


def _credentials(config: Config, now: datetime) -> list[Attention]:
    today = now.astimezone(config.daemon.timezone).date()
    items = []
    for connector in (*config.sources, *config.channels):
        expires = connector.credential_expiry
        if expires is None or (expires - today).days > max(EXPIRY_WARNINGS_DAYS):
            continue
        left = (expires - today).days
        items.append(
            Attention(
                "credential",
                connector.name,
                f"its Microsoft 365 credential {'has expired' if left < 0 else 'expires'} on "
                f"{expires}" + ("" if left < 0 else f" (in {left} days)"),
                "create a new secret or certificate in Entra, update it where the config "
                "reads it, and set secret_expires to the new date",
            )
        )
    return items


def _heartbeat(store: Store) -> list[Attention]:
    since = store.get_meta(META_FAILING_SINCE)
    if not since:
        return []
    return [
        Attention(
            "heartbeat",
            "heartbeat_url",
            "the external monitor cannot be reached: it may report visitwatch as down",
            "check the address and the network (`visitwatch doctor`)",
            since,
            store.get_meta(META_ERROR) or "",
        )
    ]


def _minutes(span: Any) -> str:
    return f"{max(1, round(span.total_seconds() / 60))} min"
