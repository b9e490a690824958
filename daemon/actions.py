"""What people do about a visit: check in, extend, acknowledge, ask for help; and the
calendar ending one.

Each action reads the visit inside its own write transaction and claims it there
(:meth:`Visits.claim`); a claim lost to a concurrent writer (the sweep, a calendar sync) is
retried from what is stored now, so a conflict never reaches the person acting. Every action
records who and how (``via``: cli, calendar, web...) in ``checkins`` and the audit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

import structlog

from visitwatch.core.notification import NotificationKind
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon import messages
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.recipients import alerted
from visitwatch.daemon.routing import Router
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.daemon.visits import (
    CONFLICT_RETRIES,
    LADDER_RESET,
    ActionError,
    VersionConflict,
    Visit,
    Visits,
)
from visitwatch.policies.model import EscalationStep

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Pending notifications of these kinds are not sent once their visit is resolved.
# The extensions a worker may choose, in minutes (the page's buttons, a text's EXTEND).
EXTEND_CHOICES = (15, 30, 60)
SUPERSEDED_BY_RESOLUTION = tuple(str(k) for k in NotificationKind if k.withdrawn_at_resolution)


class Actions:
    def __init__(
        self,
        store: Store,
        visits: Visits,
        router: Router,
        clock: Clock,
        ladder: tuple[EscalationStep, ...],
        *,
        raise_due_now: Callable[[Visit, datetime], object],
        wake: Callable[[], None],
    ) -> None:
        self.store = store
        self.visits = visits
        self.router = router
        self.clock = clock
        self.ladder = ladder
        self.tz = router.tz
        # The sweep's step for one visit: a help request raises its alerts at once.
        self.raise_due_now = raise_due_now
        self.wake = wake

    # ------------------------------------------------------------------ the mechanics

    def retrying(self, visit_id: str, action: Callable[[Visit], T]) -> T:
        """Run ``action`` on the freshly read visit in one transaction; retry lost claims.

        A conflict is ours to resolve, never the user's: the visit is read again and the
        action redone from what is stored now. Only a visit that keeps changing gives up,
        clearly.
        """
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                with self.store.transaction():
                    return action(self.visits.current(visit_id))
            except VersionConflict:
                log.info("visit_changed_retrying", visit_id=visit_id, attempt=attempt)
        raise ActionError(
            f"visit {visit_id} kept changing while this was being recorded "
            f"({CONFLICT_RETRIES} tries), so nothing was changed. Run the command again; "
            "if this keeps happening, look at the daemon's log."
        )

    def change(
        self, visit: Visit, now: datetime, cause: str, actor: str, changes: Mapping[str, Any]
    ) -> Visit:
        """Claim ``visit`` with ``changes`` inside the caller's open transaction.

        Raises :class:`VersionConflict` if the visit is no longer the version read.
        """
        conn = self.store.db.conn
        changes = self._repeats_after_move(visit, now, dict(changes))
        return self.visits.claim(conn, visit, changes, cause, actor, now)

    def _repeats_after_move(
        self, visit: Visit, now: datetime, changes: dict[str, Any]
    ) -> dict[str, Any]:
        """A deadline moved under a repeating top rung, without restarting the ladder (a
        calendar edit to a time already past): count its repeats from the new deadline.

        Otherwise a deadline moved earlier makes the next repeat due at once, right after
        the alert that just went out (the ladder's rungs fire once per deadline, I4).
        """
        last = self.ladder[-1] if self.ladder else None
        if "deadline" not in changes or "step" in changes or last is None or last.repeat is None:
            return changes
        deadline = changes["deadline"]
        if isinstance(deadline, str):  # a calendar sync gives it in column form
            deadline = from_ts(deadline)
        if deadline == visit.deadline or visit.step < len(self.ladder):
            return changes
        base = deadline + last.after
        if visit.help_requested_at is not None:
            base = min(base, visit.help_requested_at)  # help pulls rungs forward
        # The repeats due by now under the new deadline count as sent: the last alert just
        # went out. (Keeping a larger count from the old deadline would read as a clock
        # that went back, and resend at once.)
        return {**changes, "repeats": max(int((now - base) / last.repeat), 0)}

    def _wake(self) -> None:
        """Wake the sweep after a commit; inside someone else's transaction, they wake it."""
        if not self.store.db.conn.in_transaction:
            self.wake()

    def _require_started(self, visit: Visit, now: datetime, doing: str, noun: str) -> None:
        """A check-in or acknowledgement only ever applies to a visit that has begun (I5)."""
        if now < visit.start:
            raise ActionError(
                f"cannot {doing} visit {visit.id} yet: it starts at "
                f"{messages.fmt_local(visit.start, self.tz)}, and {noun} only "
                "counts once the visit has started. To say it will run longer, use "
                f"`visitwatch checkin {visit.id} --extend 30m`, or edit the calendar entry."
            )

    # ------------------------------------------------------------------ the actions

    def check_in(
        self,
        ref: str,
        by: str = "",
        via: str = "cli",
        extend: timedelta | None = None,
        action: str = "checkin",
    ) -> Visit:
        """Check in (or extend); ``by`` defaults to the visit's worker.

        A check-in before the visit starts is refused; an extension is not (it only moves the
        deadline later, and the visit stays watched).
        """
        visit_id = self.visits.find(ref).id
        if extend is not None and extend <= timedelta(0):
            raise ActionError("--extend needs a positive duration such as 30m")
        now = self.clock.now()

        def act(visit: Visit) -> None:
            actor = by or visit.worker_label or "worker"
            if visit.state.terminal:
                raise ActionError(f"visit {visit.id} is already {visit.state}; nothing to check in")
            if extend is None:
                self._require_started(visit, now, "check in", "a check-in")
                self._resolve(
                    visit, now, actor, via, action,
                    "safe at home" if action == "safe_home" else "checked in",
                    f"checked in by {actor} via {via}",
                    {"checked_in_at": now, "checked_in_by": actor},
                    keep_help=True,
                )  # fmt: skip
                return
            if visit.help_requested_at is not None:
                # A help call is never stood down by moving the clock: only a check-in or
                # someone confirming the worker safe ends it.
                raise ActionError(
                    f"help was asked for during visit {visit.id} at "
                    f"{messages.fmt_local(visit.help_requested_at, self.tz)}, so it cannot be "
                    "extended: everyone alerted is still looking for the worker. If the worker "
                    "is safe, check in (or a manager confirms safe)."
                )
            until = max(visit.deadline, now) + extend
            changed = self.change(
                visit,
                now,
                f"extended by {extend}",
                actor,
                {
                    **LADDER_RESET,
                    "state": VisitState.IN_PROGRESS if now >= visit.start else visit.state,
                    "extended_until": until,
                    "deadline": until,
                    "help_requested_at": None,
                    "next_action_at": now,
                },
            )
            conn = self.store.db.conn
            record_checkin(conn, visit.id, now, "extend", actor, via, minutes=extend)
            self.router.notify(
                conn, changed, NotificationKind.EXTENDED, alerted(conn, visit.id), now,
                f"extend:{ts(until)}", actor,
            )  # fmt: skip

        self.retrying(visit_id, act)
        self._wake()
        log.info("checked_in", visit_id=visit_id, via=via, extended=bool(extend))
        return self.visits.current(visit_id)

    def note_departure(self, ref: str, by: str, via: str = "web") -> datetime:
        """ "Visit finished, heading home": recorded, and the visit still watched.

        For a visit with a journey home after it, the worker is not safe until they are
        home: this records when they left (so anyone looking for them searches the route,
        not the family's home) and changes nothing else; "Safe at home" resolves it.
        """
        visit_id = self.visits.find(ref).id
        now = self.clock.now()

        def act(visit: Visit) -> None:
            if visit.state.terminal:
                raise ActionError(f"visit {visit.id} is already {visit.state}")
            self._require_started(visit, now, "leave", "leaving")
            conn = self.store.db.conn
            record_checkin(conn, visit.id, now, "left", by, via)
            self.store.audit(
                conn, visit.id, now, "left the visit, heading home", by, visit.state, visit.state
            )

        self.retrying(visit_id, act)
        log.info("left_visit_recorded", visit_id=visit_id, via=via)
        return now

    def _resolve(
        self,
        visit: Visit,
        now: datetime,
        by: str,
        via: str,
        action: str,
        cause: str,
        how: str,
        changes: Mapping[str, Any],
        keep_help: bool = False,
    ) -> None:
        """End the visit as safe, record who and how, and tell everyone who was alerted.

        ``keep_help``: the worker's own check-in does not withdraw a help request they made
        (a SAFE soon after HELP may be made under duress): those asked to help hear of it,
        then the all clear, which says help was asked for.
        """
        self.change(visit, now, cause, by, {
            "state": VisitState.RESOLVED, "ended_at": now, "next_action_at": None, **changes,
        })  # fmt: skip
        conn = self.store.db.conn
        record_checkin(conn, visit.id, now, action, by, via)
        # Alerts still waiting to go out would now be false alarms: the worker is safe.
        withdrawn = [k for k in SUPERSEDED_BY_RESOLUTION if not (keep_help and k == "help")]
        conn.execute(
            "UPDATE notifications SET status = 'superseded', next_attempt_at = NULL,"
            " last_error = ? WHERE visit_id = ? AND status = 'pending' AND kind IN"
            f" ({', '.join(repr(k) for k in withdrawn)})",
            (f"not sent: the visit was resolved first ({how})", visit.id),
        )
        # One all clear per resolution: a visit re-opened and resolved again gets another
        # (the version tells two resolutions apart even within the same instant).
        token = f"resolved:{ts(now)}:{visit.version}"
        self.router.notify(
            conn, visit, NotificationKind.ALL_CLEAR, alerted(conn, visit.id), now, token, how
        )

    def acknowledge(
        self, ref: str, by: str, safe: bool = False, via: str = "cli", person: str = ""
    ) -> Visit:
        """Record who is handling an overdue visit (or, with ``safe``, that the worker is safe).

        An acknowledgement covers the alerts raised so far: later rungs still go out, to the
        acknowledger too, and after ``ack_timeout`` unresolved it re-alerts (lifecycle.plan).
        Acknowledging again restarts that timeout. Everyone else alerted is told who has
        taken it on (``person``: the acknowledger's staff id, when known, so they are not
        told of their own acknowledgement).
        """
        by = by.strip()
        if not by:
            raise ActionError('say who is acknowledging: --by "Your Name"')
        visit_id = self.visits.find(ref).id
        now = self.clock.now()

        def act(visit: Visit) -> None:
            if visit.state.terminal:
                raise ActionError(f"visit {visit.id} is already {visit.state}")
            self._require_started(visit, now, "acknowledge", "an acknowledgement")
            if safe:
                self._resolve(
                    visit, now, by, via, "confirmed_safe", "acknowledged and confirmed safe",
                    f"confirmed safe by {by}",
                    {
                        "acknowledged_at": visit.acknowledged_at or now,
                        "acknowledged_by": visit.acknowledged_by or by,
                    },
                )  # fmt: skip
                return
            changed = self.change(
                visit,
                now,
                "acknowledged",
                by,
                {
                    "state": VisitState.ACKNOWLEDGED,
                    "acknowledged_at": now,
                    "acknowledged_by": by,
                    "ack_realerts": 0,
                    "next_action_at": now,
                },
            )
            conn = self.store.db.conn
            record_checkin(conn, visit.id, now, "ack", by, via)
            # The others alerted hear who owns it, so nobody phones a worker a manager is
            # already with. The acknowledger is not told of their own acknowledgement.
            others = [
                a
                for a in alerted(conn, visit.id)
                if a.recipient.id != person and a.recipient.name != by
            ]
            self.router.notify(
                conn, changed, NotificationKind.ACKNOWLEDGED, others, now, f"ack:{ts(now)}", by
            )

        self.retrying(visit_id, act)
        self._wake()
        log.info("acknowledged", visit_id=visit_id, safe=safe)
        return self.visits.current(visit_id)

    def request_help(self, ref: str, by: str = "", via: str = "cli") -> Visit:
        """Alert the whole ladder now; ``by`` defaults to the visit's worker.

        Unlike a check-in, a help request is taken even before the visit starts: it can only
        raise alerts, never silence one.
        """
        visit_id = self.visits.find(ref).id
        now = self.clock.now()

        def act(visit: Visit) -> None:
            actor = by or visit.worker_label or "worker"
            if visit.state.terminal:
                raise ActionError(f"visit {visit.id} is already {visit.state}")
            # Every rung fires again at once, as "help", from the bottom of the ladder.
            self.change(
                visit,
                now,
                "help requested",
                actor,
                {
                    **LADDER_RESET,
                    "state": VisitState.ESCALATED,
                    "help_requested_at": now,
                    "next_action_at": now,
                },
            )
            record_checkin(self.store.db.conn, visit.id, now, "help", actor, via)

        self.retrying(visit_id, act)
        log.warning("help_requested", visit_id=visit_id, via=via)
        # Raise the help alerts now, in this process (the CLI's, or the daemon's sync), rather
        # than wait for the daemon's next sweep; should that fail, the sweep still does it.
        with self.store.transaction():
            self.raise_due_now(self.visits.current(visit_id), now)
        self._wake()
        return self.visits.current(visit_id)

    def end_monitoring(
        self,
        visit: Visit,
        now: datetime,
        reason: str,
        state: VisitState = VisitState.CANCELLED,
    ) -> None:
        """Cancelled or removed from the calendar: stop, and tell anyone who was alerted.

        Runs inside the caller's transaction. ``visit`` may be stale (read before it): the
        visit is read again here, so the change cannot be lost to a concurrent sweep.
        """
        visit = self.visits.current(visit.id)
        if visit.state.terminal:
            return
        self.change(
            visit, now, reason, "calendar",
            {"state": state, "ended_at": now, "next_action_at": None},
        )  # fmt: skip
        conn = self.store.db.conn
        self.router.notify(
            conn, visit, NotificationKind.ENDED, alerted(conn, visit.id), now, "ended", reason
        )


def record_checkin(
    conn: sqlite3.Connection,
    visit_id: str,
    now: datetime,
    action: str,
    by: str,
    via: str,
    **detail: Any,
) -> None:
    conn.execute(
        "INSERT INTO checkins (visit_id, at, action, actor, via, detail) VALUES (?,?,?,?,?,?)",
        (visit_id, ts(now), action, by, via, json.dumps(detail, default=str)),
    )
