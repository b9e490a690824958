"""The watcher is watched: problems with visitwatch itself reach an admin (principle 5).

Checked after every sweep, each a cheap query:

- a calendar source that keeps failing: visits booked there are not being seen;
- an alert that could not be delivered on any channel;
- a Graph client secret or certificate about to expire (it would silently stop monitoring).

Each notice is a notification row of kind ``admin`` with an idempotency key per episode,
so it is sent once per outage, per failed alert, per expiry threshold.
"""

from __future__ import annotations

import sqlite3
from datetime import date, datetime, timedelta

import structlog

from visitwatch.connectors.base import Message
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.escalation import Addressee, Watcher, admin_addressees, enqueue
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.store import Store, from_ts, ts

log = structlog.get_logger(__name__)

SOURCE_FAILURES_BEFORE_NOTICE = 3
EXPIRY_WARNINGS_DAYS = (30, 14, 7)
RECENT = timedelta(days=2)


class HealthMonitor:
    def __init__(self, store: Store, config: Config, watcher: Watcher, clock: Clock) -> None:
        self.store = store
        self.config = config
        self.watcher = watcher
        self.clock = clock
        self._unreportable: set[int] = set()  # failed reports of failures, logged once

    def admins(self) -> list[Addressee]:
        return admin_addressees(self.watcher.directory)

    def admin_messages(self, subject: str, text: str) -> list[Message]:
        """An admin notice as messages in memory, for when the record cannot queue it."""
        now = self.clock.now()
        return [
            Message(0, "admin", None, a.recipient, "", subject, text, now) for a in self.admins()
        ]

    def check(self) -> int:
        now = self.clock.now()
        with self.store.transaction() as conn:
            written = self._sources(conn, now)
            written += self._undelivered(conn, now)
            written += self._expiring_secrets(conn, now)
        return written

    def notify(
        self,
        conn: sqlite3.Connection,
        key: str,
        subject: str,
        text: str,
        now: datetime,
        avoid_channel: str = "",
    ) -> int:
        """Queue an admin notice, once per ``key``, avoiding ``avoid_channel`` (the one in
        trouble) whenever any other channel can reach the admin."""
        written = 0
        for addressee in self.admins():
            recipient = addressee.recipient
            channels = self.watcher.channels_for("admin", recipient)
            # Not on the channel in trouble where another takes admin notices; else on any
            # other that reaches this admin, whatever its kinds; else on that one after all.
            channels = (
                [c for c in channels if c.name != avoid_channel]
                or [
                    c
                    for c in self.watcher.channels_for("admin", recipient, any_kind=True)
                    if c.name != avoid_channel
                ]
                or channels
            )
            if not channels:
                log.error("admin_unreachable", key=key, relation=addressee.relation)
            for channel in channels:
                written += enqueue(
                    conn, None, "admin", addressee, channel.name, subject, text, now, f"admin|{key}"
                )
        if written:
            log.warning("admin_notice", key=key)
        return written

    def _sources(self, conn: sqlite3.Connection, now: datetime) -> int:
        written = 0
        poll = self.config.daemon.poll_interval
        for source in conn.execute(
            "SELECT * FROM sources WHERE failures >= ?", (SOURCE_FAILURES_BEFORE_NOTICE,)
        ).fetchall():
            last_ok = from_ts(source["last_success_at"])
            since = fmt_local(last_ok, self.config.daemon.timezone) if last_ok else "never"
            text = (
                f"The calendar source {source['name']!r} has failed {source['failures']} times "
                f"in a row (polled every {int(poll.total_seconds() // 60) or 1} min).\n"
                f"Last error: {source['last_error']}\n"
                f"Last successful read: {since}.\n\n"
                "Visits already known from it are still watched, but new bookings, edits and "
                "cancellations there are not seen until it is fixed. Run `visitwatch check`."
            )
            # One notice per outage: the key carries the last success that the outage follows.
            written += self.notify(
                conn,
                f"source:{source['name']}:{source['last_success_at']}",
                f"visitwatch: calendar {source['name']!r} cannot be read",
                text,
                now,
            )
        return written

    def _undelivered(self, conn: sqlite3.Connection, now: datetime) -> int:
        written = 0
        # A failed alert whose fallback (if any) did not get through either.
        # Only recent failures: older ones were reported when they happened, and the sweep
        # (which runs this) must not slow down as the record grows.
        rows = conn.execute(
            "SELECT n.* FROM notifications n WHERE n.status = 'failed'"
            # An admin notice that failed is reported once, elsewhere; a failed report of a
            # failed report is not reported again (no loop).
            " AND n.key NOT LIKE 'admin|undelivered:%'"
            " AND n.created >= ? AND NOT EXISTS (SELECT 1 FROM notifications f"
            " WHERE f.fallback_of = n.id AND f.status = 'sent')",
            (ts(now - RECENT),),
        ).fetchall()
        for row in conn.execute(
            "SELECT id, channel FROM notifications WHERE status = 'failed' AND kind = 'admin'"
            " AND key LIKE 'admin|undelivered:%' AND created >= ?",
            (ts(now - RECENT),),
        ).fetchall():
            if row["id"] not in self._unreportable:
                self._unreportable.add(row["id"])
                log.error("admin_notice_undeliverable", notification=row["id"], channel=row[1])
        for row in rows:
            text = (
                f"A {row['kind']} notification (#{row['id']})"
                + (f" for visit {row['visit_id']}" if row["visit_id"] else f": {row['subject']},")
                + f" could not be delivered to {row['recipient_name']} via {row['channel']}.\n"
                f"Error: {row['last_error']}\n\n"
                "Make sure the recipient has been told. `visitwatch status` lists every "
                "undelivered notification."
            )
            written += self.notify(
                conn,
                f"undelivered:{row['id']}",
                f"visitwatch: a {row['kind']} alert was not delivered",
                text,
                now,
                avoid_channel=row["channel"],
            )
        return written

    def _expiring_secrets(self, conn: sqlite3.Connection, now: datetime) -> int:
        written = 0
        today = now.astimezone(self.config.daemon.timezone).date()
        for connector in (*self.config.sources, *self.config.channels):
            expires_text = connector.settings.get("secret_expires") or ""
            if not expires_text:
                continue
            expires = date.fromisoformat(expires_text)
            left = (expires - today).days
            due = [d for d in EXPIRY_WARNINGS_DAYS if left <= d]
            if not due:
                continue
            # Each threshold once; once expired, every day.
            step = f"expired:{today}" if left < 0 else f"{min(due)}d"
            when = "has expired" if left < 0 else f"expires in {left} days ({expires})"
            text = (
                f"The Microsoft 365 credential used by {connector.name!r} {when}. When it "
                "expires visitwatch can no longer read calendars or send mail, and visits "
                "stop being watched. Create a new secret or certificate for the app "
                "registration in Entra, update it where the config reads it, and set "
                "secret_expires to the new date."
            )
            written += self.notify(
                conn,
                f"expiry:{connector.name}:{expires}:{step}",
                f"visitwatch: credential for {connector.name!r} {when}",
                text,
                now,
            )
        return written
