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

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import structlog

from visitwatch.connectors.base import CalendarSource
from visitwatch.core.calendar import CalendarEvent, EventProblem, TimeWindow
from visitwatch.core.errors import ConnectorError
from visitwatch.daemon import lifecycle
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.escalation import (
    CONFLICT_RETRIES,
    Addressee,
    VersionConflict,
    Watcher,
    enqueue,
)
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.policies import Policy
from visitwatch.policies.model import Finding, VisitDetails

log = structlog.get_logger(__name__)

# An unchanged feed is not re-processed, except this often: the window moves with time, so
# new occurrences of a recurring series enter it without the feed changing.
REPROCESS_EVERY = timedelta(hours=1)
BATCH = 200
# The mass-removal guard's defaults ([daemon] settings, or per source).
REMOVAL_GUARD = 0.5
REMOVAL_GUARD_MIN = 3
REMOVAL_HOLD = timedelta(minutes=30)
INCOMPLETE_READ = "the read was incomplete (cut short or damaged): no visit was removed"
# The notification kind of "removed from the calendar while in progress: is X safe?".
REMOVED_KIND = "removed"


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


def visit_id(source: str, uid: str, recurrence_id: str) -> str:
    digest = hashlib.sha256(f"{source}\x1f{uid}\x1f{recurrence_id}".encode()).hexdigest()
    return digest[:12]


class Syncer:
    def __init__(
        self, store: Store, config: Config, policy: Policy, watcher: Watcher, clock: Clock
    ) -> None:
        self.store = store
        self.config = config
        self.policy = policy
        self.watcher = watcher
        self.clock = clock
        self.tz = config.daemon.timezone
        self.directory = config.directory
        self.learn: Callable[[CalendarSource, set[str]], None] | None = None

    def window(self, now: datetime) -> TimeWindow:
        return TimeWindow.around(
            now, self.config.daemon.window_past, self.config.daemon.window_ahead
        )

    def sync(self, source: CalendarSource) -> SyncReport:
        now = self.clock.now()
        window = self.window(now)
        self._source_row(source, now)
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
            self._succeeded(source, now, result.fingerprint, None)
            return SyncReport(source.name, ok=True, skipped=True, events=state.get("events", 0))

        if self.learn is not None:
            # Let the source's directory (Microsoft 365) introduce the people these entries
            # name before they are matched to workers.
            named = {e.owner for e in result.events} | {e.organizer for e in result.events}
            named |= {a.email for e in result.events for a in e.attendees}
            unknown = {n for n in named if n and self.directory.get(n) is None}
            if unknown:
                self.learn(source, unknown)
        report = SyncReport(source.name, ok=True, events=len(result.events))
        report.problems = list(result.problems)
        existing = {
            (r["uid"], r["recurrence_id"]): r
            for r in self.store.query("SELECT * FROM visits WHERE source = ?", (source.name,))
        }
        seen: set[tuple[str, str]] = set()
        for chunk_start in range(0, len(result.events), BATCH):
            # One commit per batch (a commit is an fsync), one savepoint per entry: a broken
            # entry rolls back alone, and the sweep never waits long for the write lock.
            before = (report.new, report.changed, report.ended)
            with self.store.transaction():
                for event in result.events[chunk_start : chunk_start + BATCH]:
                    key = (event.uid, event.recurrence_id)
                    if key in seen:
                        report.problems.append(_duplicate(event))
                        continue
                    seen.add(key)
                    self._process_safely(event, existing, now, report)
            if (report.new, report.changed, report.ended) != before:
                self.watcher.wake()  # committed: something may be due sooner than planned
        report.complete = result.complete
        if result.complete:
            # An entry that could not be read is not a removed one: keep watching it.
            seen |= {key for key in existing if key[0] in {p.uid for p in report.problems}}
            report.ended += self._apply_removals(source, state, existing, seen, window, now, report)
        else:
            report.problems.append(EventProblem(source.name, "", INCOMPLETE_READ))
        self._record_problems(source.name, report.problems, now)
        self._record_completeness(source.name, result.complete, report.problems, now)
        # A feed whose processing failed anywhere, or that was incomplete, is not marked as
        # seen: the next poll processes it again instead of skipping it as unchanged.
        fingerprint = None if report.failed or not result.complete else result.fingerprint
        self._succeeded(source, now, fingerprint, report)
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
        existing: dict[tuple[str, str], Any],
        now: datetime,
        report: SyncReport,
    ) -> None:
        row = existing.get((event.uid, event.recurrence_id))
        for _ in range(CONFLICT_RETRIES):
            try:
                with self.store.transaction():
                    self._process(event, row, now, report)
                return
            except VersionConflict:
                # The sweep (or a check-in) changed the visit since it was read: read it
                # again and redo the edit, rather than drop it.
                key = visit_id(event.source, event.uid, event.recurrence_id)
                row = self.store.one("SELECT * FROM visits WHERE id = ?", (key,))
            except Exception as err:
                log.exception("event_failed", source=event.source, uid=event.uid)
                report.failed += 1
                report.problems.append(
                    EventProblem(event.source, event.uid, f"could not be processed: {err}")
                )
                return
        log.error("event_kept_changing", source=event.source, uid=event.uid)
        report.failed += 1

    def _process(
        self, event: CalendarEvent, row: dict[str, Any] | None, now: datetime, report: SyncReport
    ) -> None:
        kind = self.policy.recognise(event)
        if kind is None:
            if row and row["state"] == lifecycle.BOOKED:
                with self.store.transaction() as conn:
                    self.watcher.end_monitoring(conn, row, now, "no longer marked as a visit")
                report.ended += 1
            elif row and row["state"] not in lifecycle.TERMINAL and not row["removed_at"]:
                # Under way: as good as removed from the calendar, and just as never ended.
                self._removed_while_under_way(row, now)
            return
        report.visits += 1
        details = self.policy.extract(event, kind, self.tz)
        findings = self.policy.check(event, details)
        fields = self._fields(event, kind, details, findings)
        fingerprint = _fingerprint(fields, details)
        # What the entry's categories were at the previous read: only those new since then
        # can be a check-in or a help request (none at the first read).
        previous = _categories(row)

        if row is None:
            row = self._insert(event, fields, fingerprint, now)
            report.new += 1
        elif row["event_fingerprint"] != fingerprint:
            self._update(row, fields, fingerprint, now)
            report.changed += 1
            row = self.store.one("SELECT * FROM visits WHERE id = ?", (row["id"],))
        assert row is not None
        if (
            row["state"] == lifecycle.CANCELLED
            and not event.cancelled
            and from_ts(fields["expected_return"]) > now
        ):
            # Removed (or cancelled) and now back in a read, not yet over: watch it again.
            with self.store.transaction():
                self.watcher._change(
                    row, now, "re-opened: back in the calendar", "calendar",
                    {**_watched_afresh(fields, now), "removed_at": None},
                )  # fmt: skip
            row = self.store.one("SELECT * FROM visits WHERE id = ?", (row["id"],))
            assert row is not None
            report.changed += 1
            self.watcher.wake()
        if row["state"] in lifecycle.TERMINAL:
            return
        if event.cancelled:
            with self.store.transaction() as conn:
                self.watcher.end_monitoring(conn, row, now, "cancelled in the calendar")
            report.ended += 1
            return
        if row.get("removed_at"):
            # Back in the calendar after it was removed while under way.
            with self.store.transaction() as conn:
                conn.execute("UPDATE visits SET removed_at = NULL WHERE id = ?", (row["id"],))
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
        if fresh.checked_in and self._started(row, now, timedelta(0)):
            self.watcher.check_in(row["id"], via="calendar")
        elif fresh.help_requested and not details.checked_in and not row["help_requested_at"]:
            # Help counts whenever it is new, before the start too: it can only raise alerts.
            self.watcher.request_help(row["id"], via="calendar")

    @staticmethod
    def _started(row: dict[str, Any], now: datetime, lead: timedelta) -> bool:
        # A check-in ("Safe") applies only to a visit that has started. A category set in advance is not new at the start (see _process),
        # so one copied onto a whole series cannot silence it. Modification times are never
        # consulted: visitwatch's own write-back moves them.
        return now >= from_ts(row["start"]) - lead

    def _fields(
        self, event: CalendarEvent, kind: str, details: VisitDetails, findings: list[Finding]
    ) -> dict[str, Any]:
        worker_id, worker_label, known = self._worker(event, details)
        if not known:
            findings = [
                *findings,
                Finding(
                    "worker_unknown",
                    "warning",
                    "visitwatch could not tell who is making this visit: add a line "
                    '"Worker: <name or e-mail>" or invite the worker.',
                    self.config.policy.clauses.get("worker_unknown", ""),
                ),
            ]
        end = event.end or event.start + self.config.policy.default_duration
        expected = details.expected_return
        return {
            "id": visit_id(event.source, event.uid, event.recurrence_id),
            "source": event.source,
            "uid": event.uid,
            "recurrence_id": event.recurrence_id,
            "kind": kind,
            "worker_id": worker_id,
            "worker_label": worker_label,
            "worker_known": int(known),
            "subject": event.subject,
            "address": details.address,
            "private": int(event.private),
            "start": ts(event.start),
            "end": ts(end),
            # Watched even when the entry gives no return time: the end stands in, and a
            # finding tells the worker to add one.
            "expected_return": ts(expected or end),
            "expected_return_from": details.expected_return_from if expected else "event_end",
            "risk_assessment": details.risk_assessment,
            "risk_assessment_complete": int(details.risk_assessment_complete),
            "worker_mobile": details.worker_mobile,
            "second_worker": details.second_worker,
            "pair_required": int(details.pair_required),
            "going_home_after": int(details.going_home_after),
            "findings": json.dumps([asdict(f) for f in findings]),
            "categories": json.dumps(list(event.categories)),
        }

    def _worker(self, event: CalendarEvent, details: VisitDetails) -> tuple[str, str, bool]:
        """Whose visit is this? The calendar's owner, a Worker: line, an attendee, the organiser."""
        candidates = [event.owner, details.worker_hint]
        candidates += [a.email for a in event.attendees if a.email != event.organizer]
        candidates.append(event.organizer)
        for candidate in candidates:
            member = self.directory.find(candidate) if candidate else None
            if member:
                return member.id, member.name, True
        label = details.worker_hint or next((a.name or a.email for a in event.attendees), "")
        label = label or event.organizer
        return (label.lower() if "@" in label else label), label, False

    def _insert(
        self, event: CalendarEvent, fields: dict[str, Any], fingerprint: str, now: datetime
    ) -> dict[str, Any]:
        """Store a newly seen visit (and its first compliance notice); return the stored row."""
        deadline = from_ts(fields["expected_return"])
        start = event.start
        state = lifecycle.BOOKED if now < start else lifecycle.IN_PROGRESS
        cause = "first seen in calendar"
        next_action: datetime | None = now
        if deadline < now - self.config.daemon.adopt_overdue_within:
            # Long over before visitwatch ever saw it: keep it in the record, raise nothing.
            state, next_action = lifecycle.EXPIRED, None
            cause = "first seen long after its expected return; recorded, not escalated"
        if event.cancelled:
            state, next_action, cause = lifecycle.CANCELLED, None, "first seen cancelled"
        has_errors = any(f["severity"] == "error" for f in json.loads(fields["findings"]))
        prestart_due = start - self.config.policy.notice_before_start
        row = {
            **fields,
            "deadline": fields["expected_return"],
            "state": state,
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
            stored = self.store.one("SELECT * FROM visits WHERE id = ?", (row["id"],))
            assert stored is not None
            if has_errors and state not in lifecycle.TERMINAL and deadline > now:
                self.watcher._compliance_notice(conn, stored, now, "first")
        return stored

    def _update(
        self, row: dict[str, Any], fields: dict[str, Any], fingerprint: str, now: datetime
    ) -> None:
        changes = {k: v for k, v in fields.items() if row.get(k) != v}
        changes["event_fingerprint"] = fingerprint
        changes["last_seen"] = ts(now)
        extended = row["extended_until"]
        deadline = (
            max(fields["expected_return"], extended) if extended else fields["expected_return"]
        )
        cause = "calendar entry changed"
        start = from_ts(fields["start"])
        if (
            row["state"] in (lifecycle.RESOLVED, lifecycle.EXPIRED)
            and fields["start"] != row["start"]
            and start > now
        ):
            # Checked in (or expired) and then moved to a later day: a new visit to watch.
            changes.update(_watched_afresh(fields, now))
            cause = f"re-opened: moved to {fmt_local(start, self.tz)} by a calendar edit"
        elif deadline != row["deadline"] and row["state"] not in lifecycle.TERMINAL:
            changes["deadline"] = deadline
            cause = "deadline moved by a calendar edit"
            if from_ts(deadline) > now and (row["step"] > 0 or row["acknowledged_at"]):
                # The worker (or office) moved the return time: start the ladder afresh.
                changes.update(
                    step=0, repeats=0, ack_realerts=0, acknowledged_at=None, acknowledged_by=None
                )
                changes["state"] = lifecycle.BOOKED if start > now else lifecycle.IN_PROGRESS
        if row["state"] not in lifecycle.TERMINAL:
            changes["next_action_at"] = ts(now)  # the sweep recomputes what is due
        with self.store.transaction():
            self.watcher._change(row, now, cause, "calendar", changes)

    # ------------------------------------------------------------------ bookkeeping

    def _apply_removals(
        self,
        source: CalendarSource,
        state: dict[str, Any],
        existing: dict[tuple[str, str], dict[str, Any]],
        seen: set[tuple[str, str]],
        window: TimeWindow,
        now: datetime,
        report: SyncReport,
    ) -> int:
        """End what a complete read no longer lists, unless the guard holds the read."""
        current = {
            r["id"]: r
            for r in self.store.query("SELECT * FROM visits WHERE source = ?", (source.name,))
        }
        live: list[tuple[tuple[str, str], dict[str, Any]]] = []
        for key, old in existing.items():
            row = current.get(old["id"])
            if row is None or row["state"] in lifecycle.TERMINAL or row["removed_at"]:
                continue
            start, end = from_ts(row["start"]), from_ts(row["end"])
            # Only entries the window fully covers can be known to be gone; one that merely
            # slid out of the window has not been removed.
            if window.start <= start and end <= window.end:
                live.append((key, row))
        removing = [row for key, row in live if key not in seen]
        if removing and self._guarded(source, len(removing), len(live)):
            ids = json.dumps(sorted(r["id"] for r in removing))
            held_since = from_ts(state.get("held_since"))
            confirmed = from_ts(state.get("held_confirmed_at"))
            same = state.get("held_removals") == ids and held_since is not None
            hold = self._guard_setting(source, "removal_hold", REMOVAL_HOLD)
            if not (same and (now - held_since >= hold or (confirmed and confirmed >= held_since))):
                if not same:
                    log.warning(
                        "removal_held", source=source.name, removing=len(removing), of=len(live)
                    )
                    with self.store.transaction() as conn:
                        conn.execute(
                            "UPDATE sources SET held_removals = ?, held_since = ?, held_live = ?,"
                            " held_confirmed_at = NULL, held_confirmed_by = NULL WHERE name = ?",
                            (ids, ts(now), len(live), source.name),
                        )
                report.held = len(removing)
                return 0
            log.warning("removal_applied_after_hold", source=source.name, removing=len(removing))
        if state.get("held_removals"):
            with self.store.transaction() as conn:
                conn.execute(
                    "UPDATE sources SET held_removals = NULL, held_since = NULL, held_live = 0,"
                    " held_confirmed_at = NULL, held_confirmed_by = NULL WHERE name = ?",
                    (source.name,),
                )
        ended = 0
        for row in removing:
            if row["state"] == lifecycle.BOOKED:
                with self.store.transaction() as conn:
                    self.watcher.end_monitoring(conn, row, now, "removed from the calendar")
                ended += 1
            else:
                self._removed_while_under_way(row, now)
        return ended

    def _guarded(self, source: CalendarSource, removing: int, live: int) -> bool:
        """Would this read remove all, or too large a share, of the source's visits?"""
        share = self._guard_setting(source, "removal_guard", REMOVAL_GUARD)
        minimum = self._guard_setting(source, "removal_guard_min", REMOVAL_GUARD_MIN)
        if removing == live:
            return True
        return removing >= minimum and removing > share * live

    def _guard_setting(self, source: CalendarSource, key: str, default: Any) -> Any:
        value = source.settings.get(key)
        if value is None:
            value = getattr(self.config.daemon, key, None)
        return default if value is None else value

    def _removed_while_under_way(self, row: dict[str, Any], now: datetime) -> None:
        """Never end a started visit because its entry went: keep watching, ask if all is well."""
        for _ in range(CONFLICT_RETRIES):
            try:
                with self.store.transaction() as conn:
                    row = self.watcher.current(row["id"])
                    if row["state"] in lifecycle.TERMINAL or row["removed_at"]:
                        return
                    self.watcher._change(
                        row, now, "removed_from_calendar", "calendar", {"removed_at": ts(now)}
                    )
                    self._ask_if_safe(conn, row, now)
                self.watcher.wake()
                return
            except VersionConflict:
                continue
        log.error("removed_visit_kept_changing", visit=row["id"])

    def _ask_if_safe(self, conn: Any, row: dict[str, Any], now: datetime) -> None:
        worker = Addressee(self.watcher.worker_recipient(row), "worker")
        people = [worker] + [
            a
            for a in self.watcher.alerted(conn, row["id"])
            if a.recipient.id != worker.recipient.id
        ]
        name = worker.recipient.name
        subject = f"visitwatch: is {name} safe? A visit was removed from the calendar"
        text = (
            f"The visit {row['id']} ({name}, started {fmt_local(from_ts(row['start']), self.tz)},"
            f" back by {fmt_local(from_ts(row['deadline']), self.tz)}) was removed from the"
            f" calendar while in progress: is {name} safe?\n\n"
            "visitwatch keeps watching it and its alerts go on until someone checks in"
            f" (`visitwatch checkin {row['id']}`) or confirms the worker is safe"
            f" (`visitwatch ack {row['id']} --by NAME --safe`)."
        )
        for addressee in people:
            recipient = addressee.recipient
            # Its own kind where channels take it; else wherever this person gets reminders,
            # else any channel that reaches them: this question must not be dropped.
            channels = (
                self.watcher.channels_for(REMOVED_KIND, recipient)
                or self.watcher.channels_for("reminder", recipient)
                or self.watcher.channels_for(REMOVED_KIND, recipient, any_kind=True)
            )
            if not channels:
                log.error("removed_visit_unreachable", visit=row["id"], relation=addressee.relation)
            for channel in channels:
                enqueue(
                    conn,
                    row["id"],
                    REMOVED_KIND,
                    addressee,
                    channel.name,
                    subject,
                    text,
                    now,
                    f"{row['id']}|removed|{ts(now)}",
                )

    def _source_row(self, source: CalendarSource, now: datetime) -> None:
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO sources (name, type, last_attempt_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET last_attempt_at = excluded.last_attempt_at",
                (source.name, source.type_name, ts(now)),
            )

    def _failed(self, source: CalendarSource, now: datetime, error: str) -> SyncReport:
        log.warning("source_failed", source=source.name, error=error)
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE sources SET last_error = ?, failures = failures + 1 WHERE name = ?",
                (error, source.name),
            )
        return SyncReport(source.name, ok=False, error=error)

    def _succeeded(
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

    def _record_completeness(
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

    def _record_problems(self, source: str, problems: list[EventProblem], now: datetime) -> None:
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


def _watched_afresh(fields: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The changes that make an ended visit a new one to watch from its start."""
    has_errors = any(f["severity"] == "error" for f in json.loads(fields["findings"]))
    return {
        "state": lifecycle.BOOKED if from_ts(fields["start"]) > now else lifecycle.IN_PROGRESS,
        "deadline": fields["expected_return"],
        "extended_until": None,
        "step": 0,
        "repeats": 0,
        "ack_realerts": 0,
        "acknowledged_at": None,
        "acknowledged_by": None,
        "help_requested_at": None,
        "checked_in_at": None,
        "checked_in_by": None,
        "ended_at": None,
        "prestart_notice_sent": int(not has_errors),
        "next_action_at": ts(now),
    }


def _fingerprint(fields: dict[str, Any], details: VisitDetails) -> str:
    material = {**fields, "checked_in": details.checked_in, "help": details.help_requested}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]


def _duplicate(event: CalendarEvent) -> EventProblem:
    when = f"starting {event.start:%Y-%m-%d %H:%M} UTC"
    return EventProblem(
        event.source,
        event.uid,
        f"appears twice in the feed with the same UID, {when}: the second copy was ignored;"
        " give each entry its own UID",
    )


def _categories(row: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The categories recorded at the previous read, or None when there was none."""
    if row is None or row.get("categories") is None:
        return None
    return tuple(json.loads(row["categories"]))
