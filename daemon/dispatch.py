"""Delivering notification rows: at least once, each channel on its own lane.

A row is marked sent only after its channel accepted it. A temporary failure is retried
with growing delays for as long as it takes (an overrun alert never expires); after a few
failures, or at once on a permanent one, a copy also goes to the channel's fallback.

The :class:`Dispatcher` claims what is due and hands it to the channels' lanes
(``lanes.py``: each channel delivers on its own thread, principle 9), then writes what each
send did. Nothing waits silently: what waits past ``delivery_deadline`` gets its fallback
copy and opens an outage the admins hear of (``outages.py``). When the record itself cannot
be written (a full disk), what a lane sent is remembered in memory and written when the disk
frees; :meth:`Dispatcher.send_unrecorded` delivers alerts that could not even be queued
straight from memory (``unrecorded.py``).
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import structlog

from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, Recipient
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import ConnectorConfig
from visitwatch.daemon.lanes import Batch, DispatchReport, Lanes
from visitwatch.daemon.outages import AdminNotifier, Outages
from visitwatch.daemon.store import Store, from_ts, record_unwritable, ts
from visitwatch.daemon.unrecorded import UnrecordedSends

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
        self.on_progress = on_progress or (lambda: None)
        self.lanes = Lanes(self._deliver_batch)
        self.unrecorded = UnrecordedSends(channels, configs, clock)
        self.outages = Outages(
            store,
            configs,
            self.lanes,
            self.unrecorded,
            delivery_deadline=delivery_deadline,
            send_timeout=send_timeout,
            notify_admins=notify_admins,
            timezone=next((c.context.timezone for c in channels.values()), None),  # for notices
        )

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
            self.outages.past_deadline(now, report)
            batches = self._submit_due(now, report)
            for batch in batches:
                if not batch.done.wait(max(0.0, give_up - time.monotonic())):
                    continue
                report.add(batch.report)
            if batches:
                # A late row whose first try just failed, or that now sits in a lane, opens
                # its outage now, not a pass later.
                self.outages.past_deadline(self.clock.now(), report)
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
        retry = from_ts(row["retry"]) if row else None
        oldest = from_ts(row["oldest"]) if row else None
        settles = self.outages.recovery_due(after)  # a recovered channel's outage to close
        moments = [m for m in (retry, oldest and oldest + self.delivery_deadline, settles) if m]
        return min(moments) if moments else None

    def idle(self) -> bool:
        """True when no lane has anything queued or in a send."""
        return self.lanes.idle()

    def close(self, timeout: float = 2.0) -> bool:
        """Stop the lanes; True when every one finished (a hung send is left behind)."""
        return self.lanes.close(timeout)

    def send_unrecorded(
        self, items: Iterable[tuple[str, Message]], *, local_ok: bool = False
    ) -> int:
        """Deliver messages the record could not queue, straight from memory.

        See :meth:`UnrecordedSends.send`: each message goes once to every channel that can
        take it, and the row that catches up later is marked sent, not sent again.
        """
        return self.unrecorded.send(items, local_ok=local_ok)

    def _submit_due(self, now: datetime, report: DispatchReport) -> list[Batch]:
        # Ids first, through the partial index on pending rows (the history never slows
        # this), then whole rows only for those no lane already holds.
        due = self.store.query(
            "SELECT id, channel FROM notifications INDEXED BY notifications_pending"
            " WHERE status = 'pending' AND next_attempt_at <= ?",
            (ts(now),),
        )
        held = self.lanes.held()
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
            batch = self.lanes.submit(name, channel_rows)
            if batch is not None:
                batches.append(batch)
        return batches

    # ------------------------------------------------------------------ one lane

    def _deliver_batch(self, batch: Batch) -> None:
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
            # The fault is this row's, not the channel's: the channel stays healthy.
            return ConnectorError(
                f"could not be read: {type(err).__name__}: {err}",
                permanent=True,
                recipient_fault=True,
            )
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
            self.unrecorded.record_works()
            return
        except sqlite3.Error as err:
            if len(rows) > 1 and not record_unwritable(err):
                for row, outcome in zip(rows, outcomes, strict=True):
                    self._record([row], [outcome], report)
                return
            self.unrecorded.record_failed(rows, outcomes, now, err)
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
            report.fallbacks += self.outages.fallback(conn, row, now)
        # The channel's health; a permanent fault of the channel's own opens its outage.
        fault = getattr(outcome, "recipient_fault", False)
        report.notices += self.outages.failed(conn, row, error, now, permanent, fault)
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
        return self.outages.recovered(conn, row["channel"], when)

    def _isolated(self, row: dict[str, Any], error: str) -> None:
        """Take a row that cannot be handled out of the queue; the health check reports it."""
        try:
            with self.store.transaction() as conn:
                conn.execute(
                    "UPDATE notifications SET status = 'failed', attempts = attempts + 1,"
                    " last_error = ?, next_attempt_at = NULL WHERE id = ?",
                    (error[:500], row["id"]),
                )
                self.outages.fallback(conn, row, self.clock.now())
        except sqlite3.Error as err:
            self.unrecorded.record_failed([row], [None], self.clock.now(), err, sent=False)
        log.error("notification_isolated", notification=row["id"], error=error)

    def _catch_up(self, row: dict[str, Any], report: DispatchReport) -> bool:
        """A row sent while the record could not be written: write it now, do not resend."""
        when = self.unrecorded.sent_at(row)
        if when is None:
            return False
        try:
            with self.store.transaction() as conn:
                self._mark_sent(conn, row, when)
        except sqlite3.Error:
            return True  # still cannot write: keep it in memory, never send it twice
        self.unrecorded.recorded(row)
        report.sent += 1
        return True


def to_message(row: dict[str, Any]) -> Message:
    """The message a notification row asks to send; ValueError when the row is unreadable."""
    created = from_ts(row["created"])
    if created is None:
        raise ValueError("the row has no creation time")
    return Message(
        id=row["id"],
        # The stored text, not NotificationKind(...): a kind this version does not know
        # (written by a newer one before a downgrade) is still delivered, never failed.
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
        created=created,
        short=row.get("short") or "",
        link=row.get("link") or "",
    )
