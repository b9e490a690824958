"""Delivering notification rows: at least once, each channel on its own lane.

A row is marked sent only after its channel accepted it. A temporary failure is retried
with growing delays for as long as it takes (an overrun alert never expires); after a few
failures, or at once on a permanent one, a copy also goes to the channel's fallback.

Each channel delivers on its own **lane**: one daemon thread with its own queue (principle
9). A mail server that accepts the connection and never answers holds up its own lane and
nothing else: the console, the outbox and every other channel keep delivering, and the
sweep never waits for a send. A lane that stays busy longer than ``send_timeout`` is
*stalled*.

Nothing waits silently. A notification still not delivered ``delivery_deadline`` after it
was written (a hung or refusing channel) gets its fallback copy at once and opens an
**outage** of its channel: the admins are told once, on another channel, and told again
when the channel delivers again.

When the record itself cannot be written (a full disk), what a lane sent is remembered in
memory and written when the disk frees; :meth:`Dispatcher.send_unrecorded` delivers alerts
that could not even be queued straight from memory.
"""

from __future__ import annotations

import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, Recipient
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import ConnectorConfig
from visitwatch.daemon.store import Store, from_ts, record_unwritable, ts

log = structlog.get_logger(__name__)

FIRST_RETRY = timedelta(seconds=10)
MAX_RETRY = timedelta(minutes=5)
FALLBACK_AFTER_ATTEMPTS = 3
DELIVERY_DEADLINE = timedelta(minutes=2)
SEND_TIMEOUT = timedelta(seconds=30)
# Results are written in batches of this many (one commit each) by channels that accept
# many messages at once (the outbox: one write and one fsync for the batch).
BATCH = 200
# Doubling past this many attempts would only be capped again: 10 s * 2**5 > MAX_RETRY.
_MAX_DOUBLINGS = 5


def retry_delay(attempts: int, rng: random.Random | None = None) -> timedelta:
    """10 s, 20 s, 40 s ... capped at 5 min, with ±10 % jitter so retries don't align.

    The exponent is capped before anything is multiplied: after hours of failures the
    attempt count is large, and ``timedelta`` overflows long before ``2 ** attempts`` does.
    """
    doublings = min(max(0, attempts - 1), _MAX_DOUBLINGS)
    base = min(FIRST_RETRY * (2**doublings), MAX_RETRY)
    return base * (rng or random).uniform(0.9, 1.1)


class AdminNotifier(Protocol):
    def __call__(
        self,
        conn: sqlite3.Connection,
        key: str,
        subject: str,
        text: str,
        now: datetime,
        avoid_channel: str = "",
    ) -> int: ...


@dataclass
class DispatchReport:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    fallbacks: int = 0
    notices: int = 0  # admin notices written (a channel's outage or recovery)

    def add(self, other: DispatchReport) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed
        self.fallbacks += other.fallbacks
        self.notices += other.notices


@dataclass
class _Batch:
    rows: list[dict[str, Any]]
    report: DispatchReport = field(default_factory=DispatchReport)
    done: threading.Event = field(default_factory=threading.Event)


class Lane:
    """One channel's delivery thread and queue."""

    def __init__(self, name: str, work: Callable[[_Batch], None]) -> None:
        self.name = name
        self._work = work
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        self._lock = threading.Lock()
        self.in_flight: set[int] = set()  # row ids queued or being sent
        self.busy_since: float | None = None  # monotonic start of the batch being sent
        self._thread = threading.Thread(target=self._run, name=f"lane:{name}", daemon=True)
        self._thread.start()

    def submit(self, rows: list[dict[str, Any]]) -> _Batch | None:
        with self._lock:
            fresh = [r for r in rows if r["id"] not in self.in_flight]
            self.in_flight.update(r["id"] for r in fresh)
        if not fresh:
            return None
        batch = _Batch(fresh)
        self._queue.put(batch)
        return batch

    def held(self) -> set[int]:
        with self._lock:
            return set(self.in_flight)

    def stalled(self, limit: float) -> bool:
        started = self.busy_since
        return started is not None and time.monotonic() - started > limit

    def stop(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            self.busy_since = time.monotonic()
            try:
                self._work(batch)
            except Exception:  # never let a lane die: the next batch must still go out
                log.exception("lane_crashed", channel=self.name)
            finally:
                self.busy_since = None
                with self._lock:
                    self.in_flight.difference_update(r["id"] for r in batch.rows)
                batch.done.set()


class Dispatcher:
    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        configs: Mapping[str, ConnectorConfig],
        clock: Clock,
        *,
        delivery_deadline: timedelta = DELIVERY_DEADLINE,
        send_timeout: timedelta = SEND_TIMEOUT,
        notify_admins: AdminNotifier | None = None,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.channels = channels
        self.configs = configs
        self.clock = clock
        self.delivery_deadline = delivery_deadline
        self.send_timeout = send_timeout
        self.notify_admins = notify_admins
        self.on_progress = on_progress or (lambda: None)
        self._lanes: dict[str, Lane] = {}
        self._lanes_lock = threading.Lock()
        # Sent, but the record could not say so yet (disk full): row id -> when.
        self._sent_unrecorded: dict[int, datetime] = {}
        # Sent from memory (never queued: the record could not be written): key -> when.
        self._from_memory: dict[str, datetime] = {}
        self._from_memory_busy: set[str] = set()
        self._unrecorded_lock = threading.Lock()
        self._record_broken = False  # logged once per episode
        # Channels in an announced outage (also kept in meta, so a restart remembers them):
        # checked on every successful send, so kept in memory.
        self._outages = {
            r["key"].removeprefix("outage:")
            for r in store.query("SELECT key FROM meta WHERE key LIKE 'outage:%'")
        }

    # ------------------------------------------------------------------ the pass

    def dispatch(self, wait: float | None = None) -> DispatchReport:
        """Hand every due notification to its channel's lane.

        ``wait`` is how long to wait for those sends (``None``: the send timeout, enough
        for a live channel; ``0``: not at all, as the daemon's loop does, since lanes
        record their own results). A stalled channel never holds up the caller longer.
        """
        limit = self.send_timeout.total_seconds() if wait is None else wait
        give_up = time.monotonic() + limit
        report = DispatchReport()
        # Each round's results can write fallback copies, which should not wait a tick.
        for _round in range(3):
            now = self.clock.now()
            self._past_deadline(now, report)
            batches = self._submit_due(now, report)
            for batch in batches:
                if not batch.done.wait(max(0.0, give_up - time.monotonic())):
                    continue
                report.add(batch.report)
            if batches:
                # A late row whose first try just failed, or that now sits in a lane, opens
                # its outage now, not a pass later.
                self._past_deadline(self.clock.now(), report)
            if not batches or not all(b.done.is_set() for b in batches):
                break
            if not any(b.report.fallbacks or b.report.notices for b in batches):
                break
        return report

    def next_due(self, after: datetime) -> datetime | None:
        """When the next retry or delivery deadline falls after a pass that ran at ``after``.

        What was due at ``after`` is in a lane already (or a stalled one), and a lane that
        finishes wakes the loop itself, so only later moments count: a backlog stuck in a
        hung channel must not keep the loop spinning over it.
        """
        row = self.store.one(
            "SELECT (SELECT MIN(next_attempt_at) FROM notifications WHERE status = 'pending'"
            " AND next_attempt_at > :after) AS retry, (SELECT MIN(created) FROM notifications"
            " WHERE status = 'pending' AND created > :late) AS oldest",
            {"after": ts(after), "late": ts(after - self.delivery_deadline)},
        )
        moments = []
        if row and row["retry"]:
            moments.append(from_ts(row["retry"]))
        if row and row["oldest"]:
            moments.append(from_ts(row["oldest"]) + self.delivery_deadline)
        return min(moments) if moments else None

    def idle(self) -> bool:
        """True when no lane has anything queued or in a send."""
        return not any(lane.in_flight for lane in list(self._lanes.values()))

    def lanes_stalled(self) -> list[str]:
        limit = self.send_timeout.total_seconds()
        return [n for n, lane in list(self._lanes.items()) if lane.stalled(limit)]

    def close(self, timeout: float = 2.0) -> bool:
        """Stop the lanes; True when every one finished (a hung send is left behind)."""
        with self._lanes_lock:
            lanes = list(self._lanes.values())
            self._lanes.clear()
        for lane in lanes:
            lane.stop()
        deadline = time.monotonic() + timeout
        return all(lane.join(max(0.0, deadline - time.monotonic())) for lane in lanes)

    def _lane(self, name: str) -> Lane:
        with self._lanes_lock:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = Lane(name, self._deliver_batch)
            return lane

    def _submit_due(self, now: datetime, report: DispatchReport) -> list[_Batch]:
        # Ids first, through the partial index on pending rows (the history never slows
        # this), then whole rows only for those no lane already holds.
        due = self.store.query(
            "SELECT id, channel FROM notifications INDEXED BY notifications_pending"
            " WHERE status = 'pending' AND next_attempt_at <= ?",
            (ts(now),),
        )
        held = self._held()
        wanted = sorted(r["id"] for r in due if r["id"] not in held)
        rows = []
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            rows += self.store.query(
                f"SELECT * FROM notifications WHERE id IN ({','.join('?' * len(chunk))})"
                " AND status = 'pending' ORDER BY id",
                chunk,
            )
        by_channel: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["channel"] not in self.channels:
                # The channel was removed from the config since this row was written.
                self._isolated(row, f"channel {row['channel']!r} is not configured any more")
                report.failed += 1
                continue
            by_channel.setdefault(row["channel"], []).append(row)
        batches = []
        for name, channel_rows in by_channel.items():
            batch = self._lane(name).submit(channel_rows)
            if batch is not None:
                batches.append(batch)
        return batches

    def _held(self) -> set[int]:
        with self._lanes_lock:
            lanes = list(self._lanes.values())
        held: set[int] = set()
        for lane in lanes:
            held |= lane.held()
        return held

    # ------------------------------------------------------------------ one lane

    def _deliver_batch(self, batch: _Batch) -> None:
        name = batch.rows[0]["channel"]
        channel = self.channels[name]
        for start in range(0, len(batch.rows), BATCH):
            rows = self._still_pending(batch.rows[start : start + BATCH])
            pending = [r for r in rows if not self._catch_up(r, batch.report)]
            if not pending:
                continue
            if channel.sends_batches:
                outcomes = self._send_many(channel, pending)
                self._record(pending, outcomes, batch.report)
            else:
                for row in pending:
                    self._record([row], [self._send_one(channel, row)], batch.report)
        self.on_progress()

    def _still_pending(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows read before another batch of this lane sent them are not sent again.

        Only this lane sends for its channel, so a row still pending here is not being
        sent by anyone else.
        """
        ids = [r["id"] for r in rows]
        try:
            pending = {
                r["id"]
                for r in self.store.query(
                    f"SELECT id FROM notifications WHERE id IN ({','.join('?' * len(ids))})"
                    " AND status = 'pending'",
                    ids,
                )
            }
        except sqlite3.Error:
            return rows  # cannot read: sending twice is better than not at all
        return [r for r in rows if r["id"] in pending]

    @staticmethod
    def _send_one(channel: Channel, row: dict[str, Any]) -> BaseException | None:
        try:
            message = to_message(row)
        except Exception as err:  # a row that cannot be read is failed, never retried for ever
            return ConnectorError(f"could not be read: {type(err).__name__}: {err}", permanent=True)
        try:
            channel.send(message)
        except ConnectorError as err:
            return err
        except Exception as err:  # a channel bug is a delivery failure, not a daemon crash
            log.exception("channel_crashed", channel=row["channel"], notification=row["id"])
            return err
        return None

    def _send_many(
        self, channel: Channel, rows: list[dict[str, Any]]
    ) -> list[BaseException | None]:
        try:
            messages = [to_message(r) for r in rows]
        except Exception:  # one unreadable row: send the others one by one
            return [self._send_one(channel, r) for r in rows]
        try:
            return list(channel.send_many(messages))
        except Exception as err:
            log.exception("channel_crashed", channel=rows[0]["channel"])
            return [err] * len(rows)

    def _record(
        self,
        rows: list[dict[str, Any]],
        outcomes: list[BaseException | None],
        report: DispatchReport,
    ) -> None:
        """Write what happened to ``rows``; each row alone if the batch cannot be written."""
        now = self.clock.now()
        try:
            with self.store.transaction() as conn:
                for row, outcome in zip(rows, outcomes, strict=True):
                    self._record_one(conn, row, outcome, now, report)
            self._record_works()
            return
        except sqlite3.Error as err:
            if len(rows) > 1 and not record_unwritable(err):
                for row, outcome in zip(rows, outcomes, strict=True):
                    self._record([row], [outcome], report)
                return
            self._record_failed(rows, outcomes, now, err)
        except Exception as err:
            # One poisoned row (a value the code cannot handle) must never block the queue.
            log.exception("notification_unrecordable", notification=rows[0]["id"])
            if len(rows) > 1:
                for row, outcome in zip(rows, outcomes, strict=True):
                    self._record([row], [outcome], report)
                return
            self._isolated(rows[0], f"could not be processed: {type(err).__name__}: {err}")
            report.failed += 1

    def _record_one(
        self,
        conn: sqlite3.Connection,
        row: dict[str, Any],
        outcome: BaseException | None,
        now: datetime,
        report: DispatchReport,
    ) -> None:
        if outcome is None:
            report.notices += self._mark_sent(conn, row, now)
            report.sent += 1
            return
        permanent = isinstance(outcome, ConnectorError) and outcome.permanent
        error = str(outcome)
        if not isinstance(outcome, ConnectorError):
            error = f"unexpected {type(outcome).__name__}: {outcome}"
        attempts = row["attempts"] + 1
        if permanent:
            conn.execute(
                "UPDATE notifications SET status = 'failed', attempts = ?, last_error = ?,"
                " next_attempt_at = NULL WHERE id = ?",
                (attempts, error, row["id"]),
            )
            report.failed += 1
        else:
            conn.execute(
                "UPDATE notifications SET attempts = ?, last_error = ?, next_attempt_at = ?"
                " WHERE id = ?",
                (attempts, error, ts(now + retry_delay(attempts)), row["id"]),
            )
            report.retried += 1
        if permanent or attempts >= FALLBACK_AFTER_ATTEMPTS:
            report.fallbacks += self._fallback(conn, row, now)
        log.warning(
            "notification_failed",
            notification=row["id"],
            channel=row["channel"],
            attempts=attempts,
            permanent=permanent,
            error=error,
        )

    def _mark_sent(self, conn: sqlite3.Connection, row: dict[str, Any], when: datetime) -> int:
        conn.execute(
            "UPDATE notifications SET status = 'sent', sent_at = ?, attempts = attempts + 1,"
            " last_error = NULL WHERE id = ? AND status = 'pending'",
            (ts(when), row["id"]),
        )
        log.info(
            "notification_sent",
            notification=row["id"],
            kind=row["kind"],
            channel=row["channel"],
            visit_id=row["visit_id"],
        )
        return self._recovered(conn, row["channel"], when)

    def _fallback(self, conn: sqlite3.Connection, row: dict[str, Any], now: datetime) -> int:
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

    def _isolated(self, row: dict[str, Any], error: str) -> None:
        """Take a row that cannot be handled out of the queue; the health check reports it."""
        try:
            with self.store.transaction() as conn:
                conn.execute(
                    "UPDATE notifications SET status = 'failed', attempts = attempts + 1,"
                    " last_error = ?, next_attempt_at = NULL WHERE id = ?",
                    (error[:500], row["id"]),
                )
                self._fallback(conn, row, self.clock.now())
        except sqlite3.Error as err:
            self._record_failed([row], [None], self.clock.now(), err, sent=False)
        log.error("notification_isolated", notification=row["id"], error=error)

    # ------------------------------------------------------------------ deadlines

    def _past_deadline(self, now: datetime, report: DispatchReport) -> None:
        """Send to the fallback what waits too long, and open an outage (one admin notice).

        A notification gets its fallback copy when it has waited ``delivery_deadline``, or
        at once when its channel is in an announced outage or stuck in a send longer than
        ``send_timeout`` (a help request must not wait out the deadline again). A channel
        whose notifications wait past the deadline is in an outage until nothing on it
        does, however often it delivers meanwhile (a server that answers byte by byte).
        """
        cutoff = ts(now - self.delivery_deadline)
        troubled = sorted(self._outages | set(self.lanes_stalled()))
        late = self.store.query(
            "SELECT n.* FROM notifications n WHERE n.status = 'pending' AND (n.created <= ?"
            f" OR n.channel IN ({','.join('?' * len(troubled))}))"
            " AND NOT EXISTS (SELECT 1 FROM notifications f WHERE f.fallback_of = n.id)"
            " ORDER BY n.id",
            (cutoff, *troubled),
        )
        # Waiting counts against a channel once it has been tried or handed the row: rows
        # nobody has tried yet (the machine was asleep) get their chance first.
        held = self._held()
        overdue = [
            r
            for r in late
            if r["created"] <= cutoff
            and (r["attempts"] or r["id"] in held or r["channel"] in troubled)
        ]
        opening = {r["channel"] for r in overdue} - self._outages
        late = [
            r for r in late if self._has_fallback(r) and (r["channel"] in troubled or r in overdue)
        ]
        if not late and not opening:
            return
        try:
            with self.store.transaction() as conn:
                for row in late:
                    report.fallbacks += self._fallback(conn, row, now)
                for name in sorted(opening):
                    rows = [r for r in overdue if r["channel"] == name]
                    report.notices += self._outage(conn, name, rows, now)
        except sqlite3.Error as err:
            if record_unwritable(err):
                self._record_failed([], [], now, err)
            else:
                log.error("deadline_check_failed", error=str(err))

    def _has_fallback(self, row: dict[str, Any]) -> bool:
        config = self.configs.get(row["channel"])
        return bool(config and config.fallback)

    def _outage(
        self, conn: sqlite3.Connection, channel: str, rows: list[dict[str, Any]], now: datetime
    ) -> int:
        meta = f"outage:{channel}"
        self._outages.add(channel)
        if conn.execute("SELECT 1 FROM meta WHERE key = ?", (meta,)).fetchone():
            return 0  # this outage was announced already
        conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (meta, ts(now)))
        oldest = rows[0]
        why = oldest["last_error"] or (
            f"no answer for over {self.send_timeout.total_seconds():g}s"
            if channel in self.lanes_stalled()
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
            avoid_channel=channel,
        )

    def _recovered(self, conn: sqlite3.Connection, channel: str, now: datetime) -> int:
        """A send went through on a channel in an outage: drain, and close it once caught up."""
        if channel not in self._outages:
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
        self._outages.discard(channel)
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
        )

    # ------------------------------------------------------------------ no record

    def send_unrecorded(
        self, items: Iterable[tuple[str, Message]], *, local_ok: bool = False
    ) -> int:
        """Deliver messages the record could not queue, straight from memory.

        Used when the database cannot be written (a full disk) or delivery has stalled.
        ``items`` pairs each message with the notification key it would have had, less the
        channel ("" for none). Each goes to every channel that can take it and needs no
        local write (unless ``local_ok``), on a thread of its own; a key already sent (or
        being sent) is not sent again, and when the record catches up, the row with that
        key is marked sent instead of going out twice. Returns how many sends started.
        """
        handed = 0
        for prefix, message in items:
            for name, channel in self.channels.items():
                if channel.writes_locally and not local_ok:
                    continue
                config = self.configs.get(name)
                if (
                    config is not None
                    and config.kinds is not None
                    and message.kind not in config.kinds
                ):
                    continue
                field_name = channel.address_field
                if field_name and not getattr(message.recipient, field_name, ""):
                    continue
                key = f"{prefix}|{name}" if prefix else ""
                with self._unrecorded_lock:
                    if key and (key in self._from_memory or key in self._from_memory_busy):
                        continue
                    if key:
                        self._from_memory_busy.add(key)
                copy = Message(
                    message.id,
                    message.kind,
                    message.visit_id,
                    message.recipient,
                    name,
                    message.subject,
                    message.text,
                    message.created,
                )
                threading.Thread(
                    target=self._send_unrecorded_one,
                    args=(channel, copy, key),
                    name=f"unrecorded:{name}",
                    daemon=True,
                ).start()
                handed += 1
        return handed

    def _send_unrecorded_one(self, channel: Channel, message: Message, key: str) -> None:
        try:
            channel.send(message)
        except Exception as err:
            log.error(
                "notification_unrecorded_failed",
                kind=message.kind,
                channel=channel.name,
                visit_id=message.visit_id,
                error=str(err),
            )
        else:
            if key:
                with self._unrecorded_lock:
                    self._from_memory[key] = self.clock.now()
            log.warning(
                "notification_sent_unrecorded",
                kind=message.kind,
                channel=channel.name,
                visit_id=message.visit_id,
            )
        finally:
            with self._unrecorded_lock:
                self._from_memory_busy.discard(key)

    def _catch_up(self, row: dict[str, Any], report: DispatchReport) -> bool:
        """A row sent while the record could not be written: write it now, do not resend."""
        with self._unrecorded_lock:
            when = self._sent_unrecorded.get(row["id"]) or self._from_memory.get(row["key"])
        if when is None:
            return False
        try:
            with self.store.transaction() as conn:
                self._mark_sent(conn, row, when)
        except sqlite3.Error:
            return True  # still cannot write: keep it in memory, never send it twice
        with self._unrecorded_lock:
            self._sent_unrecorded.pop(row["id"], None)
            self._from_memory.pop(row["key"], None)
        report.sent += 1
        return True

    def _record_failed(
        self,
        rows: list[dict[str, Any]],
        outcomes: list[BaseException | None],
        now: datetime,
        err: sqlite3.Error,
        *,
        sent: bool = True,
    ) -> None:
        if sent:
            with self._unrecorded_lock:
                for row, outcome in zip(rows, outcomes, strict=True):
                    if outcome is None:
                        self._sent_unrecorded[row["id"]] = now
        if not self._record_broken:
            self._record_broken = True
            log.error("record_unwritable", error=str(err), waiting=len(rows))

    def _record_works(self) -> None:
        if self._record_broken:
            self._record_broken = False
            log.warning("record_writable_again")


def _spoken(span: timedelta) -> str:
    seconds = round(span.total_seconds())
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} min"


def to_message(row: dict[str, Any]) -> Message:
    return Message(
        id=row["id"],
        kind=row["kind"],
        visit_id=row["visit_id"],
        recipient=Recipient(
            row["recipient_id"],
            row["recipient_name"],
            row["recipient_email"],
            row["recipient_mobile"],
        ),
        channel=row["channel"],
        subject=row["subject"],
        text=row["text"],
        created=from_ts(row["created"]),
    )
