"""Delivering notification rows: at least once, with backoff, and a fallback channel.

A row is marked sent only after its channel accepted it. A temporary failure is retried
with growing delays for as long as it takes (an overrun alert never expires); after a few
failures, or at once on a permanent one, a copy also goes to the channel's fallback.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from visitwatch.connectors.base import Channel, ConnectorError, Message, Recipient
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import ConnectorConfig
from visitwatch.daemon.store import Store, from_ts, ts

log = structlog.get_logger(__name__)

FIRST_RETRY = timedelta(seconds=10)
MAX_RETRY = timedelta(minutes=5)
FALLBACK_AFTER_ATTEMPTS = 3


def retry_delay(attempts: int, rng: random.Random | None = None) -> timedelta:
    """10 s, 20 s, 40 s ... capped at 5 min, with ±10 % jitter so retries don't align."""
    base = min(FIRST_RETRY * (2 ** max(0, attempts - 1)), MAX_RETRY)
    jitter = (rng or random).uniform(0.9, 1.1)
    return base * jitter


@dataclass
class DispatchReport:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    fallbacks: int = 0


class Dispatcher:
    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        configs: Mapping[str, ConnectorConfig],
        clock: Clock,
    ) -> None:
        self.store = store
        self.channels = channels
        self.configs = configs
        self.clock = clock

    def dispatch(self, limit: int = 200) -> DispatchReport:
        report = DispatchReport()
        # A failed row is rescheduled into the future, so each round only finds new work:
        # the fallback copies written by the round before, which should not wait a tick.
        for _round in range(3):
            rows = self.store.query(
                "SELECT * FROM notifications WHERE status = 'pending' AND next_attempt_at <= ?"
                " ORDER BY id LIMIT ?",
                (ts(self.clock.now()), limit),
            )
            fallbacks = report.fallbacks
            for row in rows:
                self._deliver(row, report)
            if report.fallbacks == fallbacks:
                break
        return report

    def _deliver(self, row: dict[str, Any], report: DispatchReport) -> None:
        channel = self.channels.get(row["channel"])
        if channel is None:
            # The channel was removed from the config since this row was written.
            self._failed(
                row,
                f"channel {row['channel']!r} is not configured any more",
                permanent=True,
                report=report,
            )
            return
        message = to_message(row)
        try:
            channel.send(message)
        except ConnectorError as err:
            self._failed(row, str(err), permanent=err.permanent, report=report)
            return
        except Exception as err:  # a channel bug is a delivery failure, not a daemon crash
            log.exception("channel_crashed", channel=row["channel"], notification=row["id"])
            self._failed(
                row, f"unexpected {type(err).__name__}: {err}", permanent=False, report=report
            )
            return
        now = self.clock.now()
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE notifications SET status = 'sent', sent_at = ?, attempts = attempts + 1,"
                " last_error = NULL WHERE id = ?",
                (ts(now), row["id"]),
            )
        report.sent += 1
        log.info(
            "notification_sent",
            notification=row["id"],
            kind=row["kind"],
            channel=row["channel"],
            visit_id=row["visit_id"],
        )

    def _failed(
        self, row: dict[str, Any], error: str, *, permanent: bool, report: DispatchReport
    ) -> None:
        now = self.clock.now()
        attempts = row["attempts"] + 1
        with self.store.transaction() as conn:
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

    def _fallback(self, conn: Any, row: dict[str, Any], now: datetime) -> int:
        config = self.configs.get(row["channel"])
        if config is None or not config.fallback or row["fallback_of"] is not None:
            return 0
        return conn.execute(
            "INSERT OR IGNORE INTO notifications (key, visit_id, kind, recipient_id,"
            " recipient_name, recipient_email, recipient_mobile, recipient_relation, channel,"
            " subject, text, created, next_attempt_at, fallback_of)"
            " SELECT key || '|fallback', visit_id, kind, recipient_id, recipient_name,"
            " recipient_email, recipient_mobile, recipient_relation, ?, subject, text, ?, ?, id"
            " FROM notifications WHERE id = ?",
            (config.fallback, ts(now), ts(now), row["id"]),
        ).rowcount


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
