"""Watching visits: the sweep and the escalation ladder.

The sweep advances every visit whose next action is due (:func:`lifecycle.plan` says what),
in batches, one transaction per batch. Every state change happens in one transaction together
with its audit row and the notification rows it causes (principle 2: a crash can lose
neither), claimed through :meth:`Visits.claim`, so a change made concurrently (a check-in
from the CLI while the daemon sweeps) is never overwritten.

Who the alerts go to is :mod:`recipients`; how they are worded and queued is :mod:`routing`;
what people do about them is :mod:`actions`. Every alert reaches someone: an addressee no
channel can reach is named in an admin notice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from visitwatch.core.notification import Message, NotificationKind
from visitwatch.daemon import lifecycle, messages
from visitwatch.daemon.actions import Actions
from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.lifecycle import VisitClock
from visitwatch.daemon.recipients import Addressee, Recipients, StaffDirectory
from visitwatch.daemon.routing import Router
from visitwatch.daemon.store import Store, record_unwritable, ts
from visitwatch.daemon.visits import UnreadableVisit, VersionConflict, Visit, Visits
from visitwatch.daemon.web.links import Links
from visitwatch.policies.model import EscalationStep

log = structlog.get_logger(__name__)

# Visits advanced per transaction: one commit (one fsync) per batch, not per visit, and the
# write lock is released between batches so a check-in never waits long.
SWEEP_BATCH = 500
# Seconds between writes of the sweep's pulse (meta last_sweep_at, which `status`, `doctor`
# and /healthz read) when a pass finds nothing due. A pass that advances visits writes it
# anyway, in its own transaction.
PULSE_EVERY = 5.0


class Watcher:
    """The sweep, and the parts every other piece of the daemon shares."""

    def __init__(
        self,
        store: Store,
        config: Config,
        clock: Clock,
        wake: Callable[[], None] | None = None,
        staff: StaffDirectory | None = None,
        links: Links | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.clock = clock
        self.staff = staff or StaffDirectory(config.directory)
        self.visits = Visits(store)
        self.recipients = Recipients(self.staff)
        self.router = Router(config, self.recipients, links)
        self.ladder: tuple[EscalationStep, ...] = (
            config.policy.escalation or lifecycle.default_ladder(config.policy.grace)
        )
        self.ack_timeout = config.policy.ack_timeout
        self.tz = config.daemon.timezone
        # Called after a committed write that may make something due sooner than the sweep
        # expected (a new or edited visit, a check-in, an ack, a help request).
        self.wake: Callable[[], None] = wake or (lambda: None)
        self.actions = Actions(
            store, self.visits, self.router, clock, self.ladder,
            raise_due_now=self.advance_safely, wake=lambda: self.wake(),
        )  # fmt: skip
        self._failing: set[str] = set()  # visits whose last sweep raised (logged once)
        self._pulsed: datetime | None = None  # when this sweep last wrote last_sweep_at

    # ------------------------------------------------------------------ sweep

    def sweep(self, batch: int = SWEEP_BATCH) -> int:
        """Advance every visit whose next action is due, in batches. Returns how many changed."""
        now = self.clock.now()
        changed = 0
        after: tuple[str, str] = ("", "")  # (next_action_at, id) of the last visit seen
        if not self._pulse_due(now) and not self.visits.due(now, after, 1):
            # Nothing due: no write transaction. Page actions wake the sweep many times a
            # second under load, and each empty pass would otherwise hold the write lock
            # (and an fsync) that the next check-in is waiting for.
            return 0
        while True:
            with self.store.transaction():
                # Read inside the write transaction: nothing can change these visits under us.
                due = self.visits.due(now, after, batch)
                for visit in due:
                    if isinstance(visit, UnreadableVisit):
                        changed += self._advance_failed(visit, now, visit.error)
                    else:
                        changed += self.advance_safely(visit, now)
                if len(due) < batch:
                    # In the last batch's transaction: one commit (one fsync) per sweep.
                    self.store.set_meta("last_sweep_at", ts(now) or "")
                    break
            last = due[-1]
            if isinstance(last, UnreadableVisit):
                after = (last.next_action_at or "", last.id)
            else:
                after = (ts(last.next_action_at) or "", last.id)
        self._pulsed = now  # committed (a failed commit raised above)
        return changed

    def _pulse_due(self, now: datetime) -> bool:
        """Whether the pulse is owed: never written by this sweep, or written
        :data:`PULSE_EVERY` ago (or in what is now the future: the clock stepped back)."""
        last = self._pulsed
        return last is None or not 0 <= (now - last).total_seconds() < PULSE_EVERY

    def reconsider_all(self) -> int:
        """Make every watched visit due now (after a wall-clock step): the sweep recomputes
        each one's next action from its stored deadline, instead of trusting times computed
        on a clock that was wrong."""
        now = ts(self.clock.now())
        with self.store.transaction() as conn:
            changed = conn.execute(
                "UPDATE visits SET next_action_at = ? WHERE next_action_at > ?", (now, now)
            ).rowcount
        self.wake()
        return changed

    def next_due(self) -> datetime | None:
        """When the sweep next has something to do (through the visits_next_action index)."""
        return self.visits.next_due()

    def advance_safely(self, visit: Visit, now: datetime) -> int:
        """Advance one visit in a savepoint; a failure is this visit's alone (principle 4)."""
        try:
            changed = self._advance(visit, now)
        except sqlite3.Error as err:
            if record_unwritable(err):
                raise  # not this visit's fault: the whole sweep goes from memory
            return self._advance_failed(visit, now, err)
        except Exception as err:
            return self._advance_failed(visit, now, err)
        if visit.id in self._failing:
            self._failing.discard(visit.id)
            log.info("sweep_recovered", visit_id=visit.id)
        return changed

    def _advance_failed(self, visit: Visit | UnreadableVisit, now: datetime, err: Exception) -> int:
        # One bad visit must not stall every other one: look again in a minute.
        self.store.db.conn.execute(
            "UPDATE visits SET next_action_at = ? WHERE id = ?",
            (ts(now + timedelta(minutes=1)), visit.id),
        )
        if visit.id not in self._failing:
            self._failing.add(visit.id)
            log.error("sweep_failed", visit_id=visit.id, exc_info=err)
            self._sweep_failure_notice(visit, now, err)
        return 0

    def clock_of(self, visit: Visit) -> VisitClock:
        prestart_due = None
        if not visit.prestart_notice_sent and visit.has_errors:
            prestart_due = visit.start - self.config.policy.notice_before_start
        return VisitClock(
            state=visit.state,
            start=visit.start,
            deadline=visit.deadline,
            step=visit.step,
            repeats=visit.repeats,
            acknowledged_at=visit.acknowledged_at,
            help_requested_at=visit.help_requested_at,
            prestart_notice_due=prestart_due,
            ack_realerts=visit.ack_realerts,
        )

    def _advance(self, visit: Visit, now: datetime) -> int:
        stored = self.clock_of(visit)
        plan = lifecycle.plan(stored, self.ladder, now, self.ack_timeout)
        with self.store.transaction() as conn:
            changes = {
                "state": plan.state,
                "step": plan.step,
                "repeats": plan.repeats,
                "ack_realerts": plan.ack_realerts,
                "next_action_at": plan.next_action_at,
                "prestart_notice_sent": visit.prestart_notice_sent or plan.prestart_notice,
            }
            try:
                fresh = self.visits.claim(conn, visit, changes, "", "", now, audit=False)
            except VersionConflict:
                return 0  # changed under us; the next sweep sees the new version
            if plan.state != visit.state:
                cause = "deadline passed" if plan.alerts else "time"
                self.store.audit(conn, visit.id, now, cause, "visitwatch", visit.state, plan.state)
            elif plan.ack_realerts > stored.ack_realerts:
                minutes = int(self.ack_timeout.total_seconds() // 60)
                self.store.audit(
                    conn, visit.id, now,
                    f"acknowledged and still unresolved after {minutes} min: re-alerted",
                    "visitwatch", visit.state, plan.state,
                )  # fmt: skip
            for alert, token, addressees in self._alert_targets(visit, fresh, plan):
                rung = f"{ts(visit.deadline)}:{alert.step_index}"
                kind = NotificationKind(alert.kind)
                self.router.notify(conn, fresh, kind, addressees, now, token, rung=rung)
                log.info(
                    "alert_raised",
                    visit_id=visit.id,
                    kind=str(kind),
                    step=alert.step_index,
                    repeat=alert.repeat,
                    recipients=len(addressees),
                )
            if plan.prestart_notice:
                self.compliance_notice(conn, fresh, now, "prestart")
        return 1 if plan.differs_from(stored) else 0

    def _alert_targets(
        self, visit: Visit, fresh: Visit, plan: lifecycle.Plan
    ) -> list[tuple[lifecycle.Alert, str, list[Addressee]]]:
        """Each alert of ``plan`` with its idempotency token and the people it goes to."""
        found = []
        for alert in plan.alerts:
            token = f"{ts(visit.deadline)}:{alert.step_index}:{alert.repeat}:{int(alert.help)}"
            if alert.ack_round:
                token += f":ack{alert.ack_round}"
            skip_worker = alert.help  # the worker asked for help; do not remind them
            targets = self.recipients.addressees(alert.step.to, fresh)
            if visit.acknowledged_at:
                # An ack covers what was raised; what comes after goes to the acker too.
                targets += self.recipients.acknowledger(fresh)
            chosen: dict[str, Addressee] = {}
            for target in targets:
                if not (skip_worker and target.relation == "worker"):
                    chosen.setdefault(target.recipient.id, target)
            found.append((alert, token, list(chosen.values())))
        return found

    def unrecorded_alerts(self, now: datetime) -> list[tuple[str, Message]]:
        """The alerts due now, built in memory without writing anything.

        For when the record cannot be written (a full disk): the sweep cannot claim visits
        or queue notifications, but the alerts they would raise must still go out. Each
        comes with the notification key it would have had (minus the channel), so that
        when the record catches up nothing is sent twice.
        """
        found = []
        for visit in self.visits.due(now):
            if isinstance(visit, UnreadableVisit):
                continue  # its admin notice went out when the sweep first failed on it
            try:
                plan = lifecycle.plan(self.clock_of(visit), self.ladder, now, self.ack_timeout)
                fresh = visit.replace(state=plan.state, step=plan.step, repeats=plan.repeats)
                for alert, token, addressees in self._alert_targets(visit, fresh, plan):
                    kind = NotificationKind(alert.kind)
                    for addressee in addressees:
                        view = self.router.view(fresh, addressee, kind, now)
                        subject, text = messages.alert(view, kind, now, addressee.relation)
                        key = f"{visit.id}|{kind}|{token}|{addressee.recipient.id}"
                        message = Message(
                            0, kind, visit.id, addressee.recipient, "", subject, text, now
                        )
                        found.append((key, message))
            except Exception:  # one bad visit must not hide the others' alerts
                log.exception("unrecorded_alert_failed", visit_id=visit.id)
        return found

    # ------------------------------------------------------------------ notices

    def _sweep_failure_notice(
        self, visit: Visit | UnreadableVisit, now: datetime, err: Exception
    ) -> None:
        """A visit the sweep cannot process is a visit nobody is watching: an admin must know."""
        text = (
            f"The sweep could not process visit {visit.id} ({type(err).__name__}: {err}). "
            "visitwatch tries again every minute, but until it succeeds this visit's "
            "reminders and alerts may not go out. Check on the worker another way, and see "
            "the daemon's log (event sweep_failed)."
        )
        deadline = visit.deadline if isinstance(visit, UnreadableVisit) else ts(visit.deadline)
        key = f"admin|sweep_failed|{visit.id}|{deadline}"
        self.router.to_admins(
            self.store.db.conn, visit.id, "visitwatch: a visit cannot be watched", text, now, key
        )

    def compliance_notice(
        self, conn: sqlite3.Connection, visit: Visit, now: datetime, token: str
    ) -> None:
        """Tell the worker (and, if the policy says, the manager) what the policy finds missing."""
        targets = (
            ["worker", "manager"] if self.config.policy.notify_manager_of_findings else ["worker"]
        )
        addressees = self.recipients.addressees(targets, visit)
        self.router.notify(conn, visit, NotificationKind.COMPLIANCE, addressees, now, token)
        log.info("compliance_notice", visit_id=visit.id, when=token)
