"""The watcher is watched: problems with visitwatch itself reach an admin (principle 5).

Checked after every sweep, each a cheap query:

- a calendar source that keeps failing: visits booked there are not being seen (after two
  failed reads, or at the first when a visit from it is under way or due soon); one that
  could not even be built; one whose reads keep coming back incomplete; one whose read
  is held by the mass-removal guard (sync.py), saying how to confirm it;
- an alert that could not be delivered on any channel; one that failed in an outage of its
  channel is not reported alone (the outage was, once: ``outages.py``) but, when it reached
  nobody another way, named with the others of that outage in one notice per check;
- a Graph client secret or certificate about to expire (it would silently stop monitoring).

Each notice is a notification row of kind ``admin`` with an idempotency key per episode,
so it is sent once per outage, per failed alert, per expiry threshold.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import structlog

from visitwatch.core.notification import Message, NotificationKind
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.lifecycle import TERMINAL
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.recipients import Addressee, admin_addressees
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.daemon.visits import Visit

log = structlog.get_logger(__name__)

# Failed reads in a row before an admin hears, so one hiccup raises nothing: within two
# poll intervals. At the first failure when a visit from the source is under way.
SOURCE_FAILURES_BEFORE_NOTICE = 2
INCOMPLETE_READS_BEFORE_NOTICE = 2
EXPIRY_WARNINGS_DAYS = (30, 14, 7)
RECENT = timedelta(days=2)


class HealthMonitor:
    def __init__(self, store: Store, config: Config, watcher: Watcher, clock: Clock) -> None:
        self.store = store
        self.config = config
        self.watcher = watcher
        self.clock = clock
        self._unreportable: set[int] = set()  # failed reports of failures, logged once
        # Sources the daemon could not build, name -> error (Service.source_errors).
        self.source_errors: Mapping[str, str] = {}

    def admins(self) -> list[Addressee]:
        return admin_addressees(self.watcher.staff.current)

    def admin_messages(self, subject: str, text: str) -> list[Message]:
        """An admin notice as messages in memory, for when the record cannot queue it."""
        now = self.clock.now()
        return [
            Message(0, NotificationKind.ADMIN, None, a.recipient, "", subject, text, now)
            for a in self.admins()
        ]

    def check(self) -> int:
        now = self.clock.now()
        with self.store.transaction() as conn:
            written = self._sources(conn, now)
            written += self._unbuilt_sources(conn, now)
            written += self._incomplete_reads(conn, now)
            written += self._held_reads(conn, now)
            written += self._unreadable_entries(conn, now)
            written += self._undelivered(conn, now)
            written += self._unreached_in_outages(conn, now)
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
        written, _ = self.watcher.router.to_admins(
            conn, None, subject, text, now, f"admin|{key}", avoid_channel=avoid_channel
        )
        if written:
            log.warning("admin_notice", key=key)
        return written

    def _sources(self, conn: sqlite3.Connection, now: datetime) -> int:
        written = 0
        poll = self.config.daemon.poll_interval
        soon = ts(now + self.config.policy.grace)
        for source in conn.execute("SELECT * FROM sources WHERE failures >= 1").fetchall():
            if source["failures"] < SOURCE_FAILURES_BEFORE_NOTICE and not self._under_way(
                conn, source["name"], soon
            ):
                continue
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

    @staticmethod
    def _under_way(conn: sqlite3.Connection, source: str, soon: str | None) -> bool:
        """Is a visit from ``source`` in progress, or starting or due within the grace period?"""
        terminal = ", ".join(f"'{state}'" for state in sorted(TERMINAL))
        return (
            conn.execute(
                f"SELECT 1 FROM visits WHERE source = ? AND state NOT IN ({terminal})"
                " AND (start <= ? OR deadline <= ?) LIMIT 1",
                (source, soon, soon),
            ).fetchone()
            is not None
        )

    def _unbuilt_sources(self, conn: sqlite3.Connection, now: datetime) -> int:
        written = 0
        for name, error in self.source_errors.items():
            text = (
                f"The calendar source {name!r} could not be started: {error}\n\n"
                "No visit booked there is watched until this is fixed and visitwatch is "
                "restarted. Run `visitwatch check`."
            )
            written += self.notify(
                conn,
                f"unbuilt:{name}:{_digest(error)}",
                f"visitwatch: calendar {name!r} cannot be used",
                text,
                now,
            )
        return written

    def _incomplete_reads(self, conn: sqlite3.Connection, now: datetime) -> int:
        written = 0
        for source in conn.execute(
            "SELECT * FROM sources WHERE incomplete >= ?", (INCOMPLETE_READS_BEFORE_NOTICE,)
        ).fetchall():
            since = from_ts(source["incomplete_since"])
            text = (
                f"The last {source['incomplete']} reads of the calendar source "
                f"{source['name']!r} were incomplete (since "
                f"{fmt_local(since, self.config.daemon.timezone) if since else '?'}).\n"
                f"Reason: {source['incomplete_reason']}\n\n"
                "Visits already known from it are still watched and none is removed, but "
                "entries visitwatch could not read are not watched. `visitwatch status` lists "
                "the unreadable entries."
            )
            written += self.notify(
                conn,
                f"incomplete:{source['name']}:{source['incomplete_since']}",
                f"visitwatch: calendar {source['name']!r} reads are incomplete",
                text,
                now,
            )
        return written

    def _held_reads(self, conn: sqlite3.Connection, now: datetime) -> int:
        written = 0
        tz = self.config.daemon.timezone
        for source in conn.execute(
            "SELECT * FROM sources WHERE held_removals IS NOT NULL"
        ).fetchall():
            ids = json.loads(source["held_removals"])
            marks = ", ".join("?" * len(ids))
            visits = [
                Visit.from_row(dict(row))
                for row in conn.execute(
                    f"SELECT * FROM visits WHERE id IN ({marks}) ORDER BY start", ids
                ).fetchall()
            ]
            hold = getattr(self.config.daemon, "removal_hold", None) or timedelta(minutes=30)
            since = from_ts(source["held_since"])
            applies = fmt_local(since + hold, tz) if since else "later"
            listing = "\n".join(
                f"  {v.id}  {v.state:<11} {v.worker_label}, {fmt_local(v.start, tz)}"
                for v in visits
            )
            name = source["name"]
            text = (
                f"The calendar source {name!r} no longer lists {len(ids)} of the "
                f"{source['held_live']} visits visitwatch watches from it. That many "
                "removals at once is more often a broken or emptied calendar than real "
                "cancellations, so nothing has been removed: these stay watched.\n\n"
                f"{listing}\n\n"
                f"If the calendar still says so, they are removed at its first read after "
                f"{applies}. If they really were cancelled, confirm now with "
                f"`visitwatch sources confirm {name}`. If not, fix the calendar. Visits "
                "already under way are never ended: their worker is asked whether they are safe."
            )
            written += self.notify(
                conn,
                f"held:{name}:{source['held_since']}",
                f"visitwatch: calendar {name!r} would remove {len(ids)} visits: held",
                text,
                now,
            )
        return written

    def _unreadable_entries(self, conn: sqlite3.Connection, now: datetime) -> int:
        """Entries a calendar read could not use: one of them may be a visit nobody watches.

        One notice per source each time a read finds entries it did not have trouble with
        before; the reasons (which can quote the feed) stay in `visitwatch status`.
        """
        written = 0
        for row in conn.execute(
            "SELECT source, COUNT(*) AS n, MAX(first_seen) AS newest,"
            " GROUP_CONCAT(uid, ', ') AS uids FROM problems WHERE uid != ''"
            " AND first_seen >= ? GROUP BY source",
            (ts(now - RECENT),),
        ).fetchall():
            uids = row["uids"].split(", ")
            shown = ", ".join(uids[:10]) + (f" and {len(uids) - 10} more" if len(uids) > 10 else "")
            text = (
                f"{row['n']} entr{'y' if row['n'] == 1 else 'ies'} in the calendar "
                f"{row['source']!r} could not be read: {shown}.\n\n"
                "If one of them is a home visit, it is not being watched as booked (one that "
                "was known before keeps its last good times). `visitwatch status` shows each "
                "with the reason; fix the entry in the calendar and it is read again."
            )
            written += self.notify(
                conn,
                f"unreadable:{row['source']}:{row['newest']}",
                f"visitwatch: entries in calendar {row['source']!r} cannot be read",
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
            # Failed in an outage of its channel: see _unreached_in_outages.
            " AND (n.outage IS NULL OR n.kind = 'admin')"
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

    def _unreached_in_outages(self, conn: sqlite3.Connection, now: datetime) -> int:
        """Alerts that failed in an outage of their channel and reached nobody another way
        (no fallback copy, no copy on another channel), named together: one notice per
        outage and check, so the admins can tell those people, without one per alert."""
        rows = conn.execute(
            "SELECT * FROM notifications WHERE status = 'failed' AND outage IS NOT NULL"
            # Sorted here: ORDER BY id would have SQLite scan the whole history instead of
            # the index of failed rows.
            " AND outage_named IS NULL AND kind != 'admin' AND created >= ?",
            (ts(now - RECENT),),
        ).fetchall()
        rows.sort(key=lambda row: row["id"])
        unreached: dict[tuple[str, str], list[sqlite3.Row]] = {}
        for row in rows:
            if not reached_otherwise(conn, row):
                unreached.setdefault((row["channel"], row["outage"]), []).append(row)
        written = 0
        tz = self.config.daemon.timezone
        for (channel, outage), failed in unreached.items():
            listing = [
                f"  #{r['id']} {r['kind']}"
                + (f" for visit {r['visit_id']}" if r["visit_id"] else "")
                + f" to {r['recipient_name']} ({r['recipient_relation'] or 'recipient'}),"
                f" written {fmt_local(from_ts(r['created']) or now, tz)}"
                for r in failed[:30]
            ]
            if len(failed) > 30:
                listing.append(f"  and {len(failed) - 30} more (`visitwatch status`)")
            since = from_ts(outage)
            text = (
                f"The channel {channel!r} is not delivering (you were told at "
                f"{fmt_local(since, tz) if since else '?'}). These notifications on it reached "
                "nobody another way:\n" + "\n".join(listing) + f"\nLast error: "
                f"{failed[-1]['last_error']}\n\nMake sure these people "
                "are told now: visitwatch could not tell them. A fallback channel for "
                f"{channel!r} (`fallback = ...` in its [[channels]] block) would have reached "
                "them. `visitwatch status` lists every undelivered notification."
            )
            written += self.notify(
                conn,
                f"outage-unreached:{channel}:{outage}:{failed[0]['id']}",
                f"visitwatch: {_counted(r['kind'] for r in failed)} on {channel!r} reached nobody",
                text,
                now,
                avoid_channel=channel,
            )
            conn.executemany(
                "UPDATE notifications SET outage_named = ? WHERE id = ?",
                [(ts(now), r["id"]) for r in failed],
            )
        return written

    def _expiring_secrets(self, conn: sqlite3.Connection, now: datetime) -> int:
        written = 0
        today = now.astimezone(self.config.daemon.timezone).date()
        for connector in (*self.config.sources, *self.config.channels):
            expires = connector.credential_expiry
            if expires is None:
                continue
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


def reached_otherwise(conn: sqlite3.Connection, row: sqlite3.Row) -> bool:
    """Whether the same notice to the same person went, or is going, another way: a
    fallback copy (one that failed reports itself) or the same alert on another channel.

    Keys are ``<alert>|<person>|<channel>``, a fallback copy's its original's + ``|fallback``.
    """
    person = row["key"]
    while person.endswith("|fallback"):
        person = person.removesuffix("|fallback")
    person = person.rpartition("|")[0] + "|"
    return (
        conn.execute(
            "SELECT 1 FROM notifications WHERE (fallback_of = :id OR (visit_id IS :visit"
            " AND recipient_id = :who AND substr(key, 1, :n) = :person AND id != :id"
            " AND status IN ('sent', 'pending', 'superseded'))) LIMIT 1",
            {
                "id": row["id"],
                "visit": row["visit_id"],
                "who": row["recipient_id"],
                "n": len(person),
                "person": person,
            },
        ).fetchone()
        is not None
    )


def _counted(kinds: Iterable[str]) -> str:
    """``"2 overrun, 1 reminder alerts"``: what a list of notifications holds, by kind."""
    counts = Counter(kinds)
    total = sum(counts.values())
    listed = ", ".join(f"{n} {kind}" for kind, n in counts.most_common())
    return f"{listed} {'alert' if total == 1 else 'alerts'}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]
