"""What visitwatch remembers about each source: last read, failures, problems, completeness.

``visitwatch status`` and the health checks read these rows; the sync writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import structlog

from visitwatch.connectors.base import CalendarSource
from visitwatch.core.calendar import EventProblem
from visitwatch.daemon.store import Store, ts

log = structlog.get_logger(__name__)

INCOMPLETE_READ = "the read was incomplete (cut short or damaged): no visit was removed"


@dataclass
class SyncReport:
    source: str
    ok: bool
    skipped: bool = False
    events: int = 0
    visits: int = 0
    new: int = 0
    changed: int = 0
    ended: int = 0
    failed: int = 0  # entries whose processing raised: the feed is read again next poll
    held: int = 0  # removals held by the mass-removal guard
    complete: bool = True
    problems: list[EventProblem] = field(default_factory=list)
    error: str = ""


class SourceLedger:
    """The ``sources`` and ``problems`` rows of the record."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def attempted(self, source: CalendarSource, now: datetime) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO sources (name, type, last_attempt_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET last_attempt_at = excluded.last_attempt_at",
                (source.name, source.type_name, ts(now)),
            )

    def failed(self, source: CalendarSource, now: datetime, error: str) -> SyncReport:
        log.warning("source_failed", source=source.name, error=error)
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE sources SET last_error = ?, failures = failures + 1 WHERE name = ?",
                (error, source.name),
            )
        return SyncReport(source.name, ok=False, error=error)

    def succeeded(
        self,
        source: CalendarSource,
        now: datetime,
        fingerprint: str | None,
        report: SyncReport | None,
    ) -> None:
        with self.store.transaction() as conn:
            if report is None:
                conn.execute(
                    "UPDATE sources SET last_success_at = ?, last_error = NULL, failures = 0"
                    " WHERE name = ?",
                    (ts(now), source.name),
                )
            else:
                # No fingerprint: processing hit an error, so the feed is not marked as seen.
                conn.execute(
                    "UPDATE sources SET last_success_at = ?, last_error = NULL, failures = 0,"
                    " fingerprint = ?, processed_at = CASE WHEN ? IS NULL THEN processed_at"
                    " ELSE ? END, events = ?, visits = ? WHERE name = ?",
                    (
                        ts(now),
                        fingerprint,
                        fingerprint,
                        ts(now),
                        report.events,
                        report.visits,
                        source.name,
                    ),
                )

    def record_completeness(
        self, source: str, complete: bool, problems: list[EventProblem], now: datetime
    ) -> None:
        """Count incomplete reads in a row (health.py tells an admin when they repeat)."""
        reason = next((p.reason for p in problems if not p.uid), INCOMPLETE_READ)
        with self.store.transaction() as conn:
            if complete:
                conn.execute(
                    "UPDATE sources SET incomplete = 0, incomplete_since = NULL,"
                    " incomplete_reason = NULL WHERE name = ?",
                    (source,),
                )
            else:
                conn.execute(
                    "UPDATE sources SET incomplete = incomplete + 1, incomplete_since ="
                    " COALESCE(incomplete_since, ?), incomplete_reason = ? WHERE name = ?",
                    (ts(now), reason, source),
                )

    def record_problems(self, source: str, problems: list[EventProblem], now: datetime) -> None:
        with self.store.transaction() as conn:
            for problem in problems:
                # The reason can quote the feed (an address, a name): only at debug.
                log.warning("entry_unreadable", source=source, uid=problem.uid)
                log.debug("entry_unreadable_reason", uid=problem.uid, reason=problem.reason)
                conn.execute(
                    "INSERT INTO problems (source, uid, reason, first_seen, last_seen)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (source, uid, reason)"
                    " DO UPDATE SET last_seen = excluded.last_seen",
                    (source, problem.uid, problem.reason, ts(now), ts(now)),
                )
            # What this read did not report any more has been fixed.
            conn.execute(
                "DELETE FROM problems WHERE source = ? AND last_seen < ?", (source, ts(now))
            )
