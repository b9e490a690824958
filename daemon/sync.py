"""Reading one calendar source into visits.

fetch(window) -> recognise -> extract -> check -> upsert, one transaction per entry, so a
broken entry is recorded as a problem and every other entry is still watched (principle 4).
A source that cannot be read keeps its last good visits: they stay watched, and the
failure is recorded on the source's health for ``visitwatch status``.

Only a complete, believable read ends a visit (principle 8):

- an incomplete read (cut short by its time budget, damaged) may add and update, never
  remove; it is recorded as a problem, and repeated ones reach an admin (health.py);
- a read that would remove all, or more than ``removal_guard`` (a share, once at least
  ``removal_guard_min`` visits), of a source's watched visits is **held**: nothing is
  removed until the same read has repeated for ``removal_hold`` or an admin confirms it
  (``visitwatch sources confirm NAME``); health.py tells the admins;
- a visit already under way (in progress, due, overdue) whose entry is removed is never
  ended: its worker and everyone alerted are asked whether the worker is safe, and the
  ladder goes on until someone checks in or confirms safe.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from visitwatch.connectors.base import CalendarSource
from visitwatch.core.calendar import CalendarEvent, EventProblem, TimeWindow
from visitwatch.core.errors import ConnectorError
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.entries import (
    duplicate,
    entry_fields,
    entry_fingerprint,
    visit_id,
    watched_afresh,
)
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.removals import Removals
from visitwatch.daemon.source_state import INCOMPLETE_READ, SourceLedger, SyncReport
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.daemon.visits import (
    CONFLICT_RETRIES,
    LADDER_RESET,
    UnreadableVisit,
    VersionConflict,
    Visit,
    to_column,
)
from visitwatch.policies import Policy

log = structlog.get_logger(__name__)

# An unchanged feed is not re-processed, except this often: the window moves with time, so
# new occurrences of a recurring series enter it without the feed changing.
REPROCESS_EVERY = timedelta(hours=1)
BATCH = 200


class Syncer:
    def __init__(
        self, store: Store, config: Config, policy: Policy, watcher: Watcher, clock: Clock
    ) -> None:
        self.store = store
        self.config = config
        self.policy = policy
        self.watcher = watcher
        self.visits = watcher.visits
        self.actions = watcher.actions
        self.staff = watcher.staff
        self.clock = clock
        self.tz = config.daemon.timezone
        self.ledger = SourceLedger(store)
        self.removals = Removals(
            store, config, watcher.visits, watcher.actions, watcher.router,
            watcher.recipients, watcher.wake,
        )  # fmt: skip
        self.learn: Callable[[CalendarSource, set[str]], None] | None = None

    def window(self, now: datetime) -> TimeWindow:
        return TimeWindow.around(
            now, self.config.daemon.window_past, self.config.daemon.window_ahead
        )

    def sync(self, source: CalendarSource) -> SyncReport:
        now = self.clock.now()
        window = self.window(now)
        self.ledger.attempted(source, now)
        state = self.store.one("SELECT * FROM sources WHERE name = ?", (source.name,)) or {}
        processed = from_ts(state.get("processed_at"))
        known = None
        if processed and now - processed < REPROCESS_EVERY and not state.get("held_removals"):
            # A held read is read again at every poll: it is applied only if it repeats.
            known = state.get("fingerprint")
        try:
            result = source.fetch(window, known)
        except ConnectorError as err:
            return self._failed(source, now, str(err))
        except Exception as err:  # a connector bug must not stop the other sources
            log.exception("source_crashed", source=source.name)
            return self._failed(source, now, f"unexpected {type(err).__name__}: {err}")

        if result.unchanged or (known and result.fingerprint == known):
            self.ledger.succeeded(source, now, result.fingerprint, None)
            return SyncReport(source.name, ok=True, skipped=True, events=state.get("events", 0))

        if self.learn is not None:
            # Let the source's directory (Microsoft 365) introduce the people these entries
            # name before they are matched to workers.
            named = {e.owner for e in result.events} | {e.organizer for e in result.events}
            named |= {a.email for e in result.events for a in e.attendees}
            unknown = {n for n in named if n and self.staff.current.get(n) is None}
            if unknown:
                self.learn(source, unknown)
        report = SyncReport(source.name, ok=True, events=len(result.events))
        report.problems = list(result.problems)
        existing: dict[tuple[str, str], Visit] = {}
        # Rows the record cannot read: their entries are left alone (the sweep reports them
        # to an admin and keeps trying), never taken for new visits.
        unreadable: set[tuple[str, str]] = set()
        for stored in self.visits.of_source(source.name):
            if isinstance(stored, UnreadableVisit):
                unreadable.add(stored.key)
            else:
                existing[(stored.uid, stored.recurrence_id)] = stored
        seen: set[tuple[str, str]] = set()
        for chunk_start in range(0, len(result.events), BATCH):
            # One commit per batch (a commit is an fsync), one savepoint per entry: a broken
            # entry rolls back alone, and the sweep never waits long for the write lock.
            before = (report.new, report.changed, report.ended)
            with self.store.transaction():
                for event in result.events[chunk_start : chunk_start + BATCH]:
                    key = (event.uid, event.recurrence_id)
                    if key in seen:
                        report.problems.append(duplicate(event))
                        continue
                    seen.add(key)
                    if key not in unreadable:
                        self._process_safely(event, existing, now, report)
            if (report.new, report.changed, report.ended) != before:
                self.watcher.wake()  # committed: something may be due sooner than planned
        report.complete = result.complete
        if result.complete:
            # An entry that could not be read is not a removed one: keep watching it.
            seen |= {key for key in existing if key[0] in {p.uid for p in report.problems}}
            ended, report.held = self.removals.apply(source, state, existing, seen, window, now)
            report.ended += ended
        else:
            report.problems.append(EventProblem(source.name, "", INCOMPLETE_READ))
        self.ledger.record_problems(source.name, report.problems, now)
        self.ledger.record_completeness(source.name, result.complete, report.problems, now)
        # A feed whose processing failed anywhere, or that was incomplete, is not marked as
        # seen: the next poll processes it again instead of skipping it as unchanged.
        fingerprint = None if report.failed or not result.complete else result.fingerprint
        self.ledger.succeeded(source, now, fingerprint, report)
        log.info(
            "source_synced",
            source=source.name,
            events=report.events,
            visits=report.visits,
            new=report.new,
            changed=report.changed,
            ended=report.ended,
            held=report.held,
            complete=report.complete,
            problems=len(report.problems),
        )
        return report

    # ------------------------------------------------------------------ one entry

    def _process_safely(
        self,
        event: CalendarEvent,
        existing: dict[tuple[str, str], Visit],
        now: datetime,
        report: SyncReport,
    ) -> None:
        visit = existing.get((event.uid, event.recurrence_id))
        for _ in range(CONFLICT_RETRIES):
            try:
                with self.store.transaction():
                    self._process(event, visit, now, report)
                return
            except VersionConflict:
                # The sweep (or a check-in) changed the visit since it was read: read it
                # again and redo the edit, rather than drop it.
                visit = self.visits.get(visit_id(event.source, event.uid, event.recurrence_id))
            except Exception as err:
                log.exception("event_failed", source=event.source, uid=event.uid)
                report.failed += 1
                report.problems.append(
                    EventProblem(event.source, event.uid, f"could not be processed: {err}")
                )
                return
        log.error("event_kept_changing", source=event.source, uid=event.uid)
        report.failed += 1

    def _failed(self, source: CalendarSource, now: datetime, error: str) -> SyncReport:
        self.ledger.failed(source, now, error)
        return SyncReport(source.name, ok=False, error=error)

    def _process(
        self, event: CalendarEvent, visit: Visit | None, now: datetime, report: SyncReport
    ) -> None:
        kind = self.policy.recognise(event)
        if kind is None:
            if visit and visit.state == VisitState.BOOKED:
                with self.store.transaction():
                    self.actions.end_monitoring(visit, now, "no longer marked as a visit")
                report.ended += 1
            elif visit and not visit.state.terminal and not visit.removed_at:
                # Under way: as good as removed from the calendar, and just as never ended.
                self.removals.removed_while_under_way(visit, now)
            return
        report.visits += 1
        details = self.policy.extract(event, kind, self.tz)
        findings = self.policy.check(event, details)
        fields = entry_fields(
            event, kind, details, findings, self.config.policy, self.staff.current
        )
        fingerprint = entry_fingerprint(fields, details)
        # What the entry's categories were at the previous read: only those new since then
        # can be a check-in or a help request (none at the first read).
        previous = visit.categories if visit else None

        if visit is None:
            visit = self._insert(event, fields, fingerprint, now)
            report.new += 1
        elif visit.event_fingerprint != fingerprint:
            visit = self._update(visit, fields, fingerprint, now)
            report.changed += 1
        if (
            visit.state == VisitState.CANCELLED
            and not event.cancelled
            and fields["expected_return"] > ts(now)  # fixed-width UTC text sorts as time
        ):
            # Removed (or cancelled) and now back in a read, not yet over: watch it again.
            with self.store.transaction():
                visit = self.actions.change(
                    visit, now, "re-opened: back in the calendar", "calendar",
                    {**watched_afresh(fields, now), "removed_at": None},
                )  # fmt: skip
            report.changed += 1
            self.watcher.wake()
        if visit.state.terminal:
            return
        if event.cancelled:
            with self.store.transaction():
                self.actions.end_monitoring(visit, now, "cancelled in the calendar")
            report.ended += 1
            return
        if visit.removed_at:
            # Back in the calendar after it was removed while under way.
            with self.store.transaction() as conn:
                conn.execute("UPDATE visits SET removed_at = NULL WHERE id = ?", (visit.id,))
        if previous is None:
            return
        known = {c.casefold() for c in previous}
        # visitwatch's own write-back labels ("visitwatch: safe") are never a person's word.
        added = tuple(
            c
            for c in event.categories
            if c.casefold() not in known and not c.casefold().startswith("visitwatch:")
        )
        if not added:
            return
        fresh = self.policy.extract(replace(event, categories=added), kind, self.tz)
        # A check-in ("Safe") applies only to a visit that has started. A category set in
        # advance is not new at the start (see above), so one copied onto a whole series
        # cannot silence it. Modification times are never consulted: visitwatch's own
        # write-back moves them.
        if fresh.checked_in and now >= visit.start:
            self.actions.check_in(visit.id, via="calendar")
        elif fresh.help_requested and not details.checked_in and not visit.help_requested_at:
            # Help counts whenever it is new, before the start too: it can only raise alerts.
            self.actions.request_help(visit.id, via="calendar")

    def _insert(
        self, event: CalendarEvent, fields: dict[str, Any], fingerprint: str, now: datetime
    ) -> Visit:
        """Store a newly seen visit (and its first compliance notice); return it as stored."""
        deadline = from_ts(fields["expected_return"])
        assert deadline is not None
        start = event.start
        state = VisitState.BOOKED if now < start else VisitState.IN_PROGRESS
        cause = "first seen in calendar"
        next_action: datetime | None = now
        if deadline < now - self.config.daemon.adopt_overdue_within:
            # Long over before visitwatch ever saw it: keep it in the record, raise nothing.
            state, next_action = VisitState.EXPIRED, None
            cause = "first seen long after its expected return; recorded, not escalated"
        if event.cancelled:
            state, next_action, cause = VisitState.CANCELLED, None, "first seen cancelled"
        has_errors = any(f["severity"] == "error" for f in json.loads(fields["findings"]))
        prestart_due = start - self.config.policy.notice_before_start
        row = {
            **fields,
            "deadline": fields["expected_return"],
            "state": str(state),
            "next_action_at": ts(next_action),
            # Seen for the first time inside the pre-start window: the first notice is enough.
            "prestart_notice_sent": int(not has_errors or now >= prestart_due),
            "event_fingerprint": fingerprint,
            "first_seen": ts(now),
            "last_seen": ts(now),
            "updated": ts(now),
        }
        with self.store.transaction() as conn:
            columns = ", ".join(f'"{k}"' for k in row)
            conn.execute(
                f"INSERT INTO visits ({columns}) VALUES ({', '.join('?' * len(row))})",
                tuple(row.values()),
            )
            self.store.audit(
                conn, row["id"], now, cause, "calendar", None, state, source=event.source
            )
            stored = self.visits.current(row["id"])
            if has_errors and not state.terminal and deadline > now:
                self.watcher.compliance_notice(conn, stored, now, "first")
        return stored

    def _update(
        self, visit: Visit, fields: dict[str, Any], fingerprint: str, now: datetime
    ) -> Visit:
        changes = {k: v for k, v in fields.items() if to_column(k, getattr(visit, k)) != v}
        changes["event_fingerprint"] = fingerprint
        changes["last_seen"] = ts(now)
        extended = ts(visit.extended_until)
        deadline = (
            max(fields["expected_return"], extended) if extended else fields["expected_return"]
        )
        cause = "calendar entry changed"
        start = from_ts(fields["start"])
        assert start is not None
        if (
            visit.state in (VisitState.RESOLVED, VisitState.EXPIRED)
            and start != visit.start
            and start > now
        ):
            # Checked in (or expired) and then moved to a later day: a new visit to watch.
            changes.update(watched_afresh(fields, now))
            cause = f"re-opened: moved to {fmt_local(start, self.tz)} by a calendar edit"
        elif deadline != ts(visit.deadline) and not visit.state.terminal:
            changes["deadline"] = deadline
            cause = "deadline moved by a calendar edit"
            if deadline > ts(now) and (visit.step > 0 or visit.acknowledged_at):
                # The worker (or office) moved the return time: start the ladder afresh.
                changes.update(LADDER_RESET)
                changes["state"] = VisitState.BOOKED if start > now else VisitState.IN_PROGRESS
            elif visit.acknowledged_at is not None:
                # Moved earlier, still past: the acknowledgement's timeouts count from the new
                # deadline, but an edit is not a timeout: rounds it makes look elapsed count
                # as done, and the next re-alert comes at the next one (found by make soak:
                # the edit re-sent the rung just sent, at the same moment).
                since = max(visit.acknowledged_at, from_ts(deadline) or now)
                elapsed = int((now - since) / self.config.policy.ack_timeout) if now > since else 0
                changes["ack_realerts"] = max(visit.ack_realerts, elapsed)
        if not visit.state.terminal:
            changes["next_action_at"] = ts(now)  # the sweep recomputes what is due
        with self.store.transaction():
            return self.actions.change(visit, now, cause, "calendar", changes)
