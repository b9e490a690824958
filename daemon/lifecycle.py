"""The visit state machine, as a pure function of stored fields and one ``now``.

::

    booked ──start──▶ in_progress ──deadline──▶ due ──+grace──▶ overdue ──▶ escalated ⟲
       │                   │                     │               │             │
       └─────── check-in / acknowledged and confirmed safe ──────┴─────────────┴──▶ resolved
    (any active state) ── entry cancelled or removed ──▶ cancelled

``acknowledged`` sits beside overdue/escalated: someone has taken it on, so the repeats of
the top rung stop, but the visit is not resolved until the worker is confirmed safe. An
acknowledgement covers only the alerts already raised: rungs not yet reached still fire on
their own time (the watcher adds the acknowledger to them). It also times out: every
``ack_timeout`` after the acknowledgement (or after the deadline, if it came earlier) the
next rung is brought forward (the top rung once the ladder is spent) and re-alerted, to its
people and the acknowledger, until the visit is resolved or acknowledged again.

The deadline is the expected return time (or the end of an extension). Each ladder step is
timed from it; a help request pulls every step forward to the moment help was asked for.
Nothing here reads the clock or the database: :func:`plan` is tested at one minute before,
at, and after each deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from visitwatch.core.notification import NotificationKind
from visitwatch.core.visit_state import TERMINAL_STATES, VisitState
from visitwatch.policies.model import EscalationStep

# Short names, as the rest of the lifecycle reads best with them.
BOOKED = VisitState.BOOKED
IN_PROGRESS = VisitState.IN_PROGRESS
DUE = VisitState.DUE
OVERDUE = VisitState.OVERDUE
ESCALATED = VisitState.ESCALATED
ACKNOWLEDGED = VisitState.ACKNOWLEDGED
RESOLVED = VisitState.RESOLVED
CANCELLED = VisitState.CANCELLED
EXPIRED = VisitState.EXPIRED

TERMINAL = TERMINAL_STATES

_STATE_AFTER_KIND = {
    NotificationKind.REMINDER: DUE,
    NotificationKind.OVERRUN: OVERDUE,
    NotificationKind.ESCALATION: ESCALATED,
}


@dataclass(frozen=True)
class VisitClock:
    """The stored fields the lifecycle depends on."""

    state: VisitState
    start: datetime
    deadline: datetime
    step: int = 0  # how many ladder steps have fired
    repeats: int = 0  # how many repeats of the last step have fired
    acknowledged_at: datetime | None = None
    help_requested_at: datetime | None = None
    prestart_notice_due: datetime | None = None  # when a not-yet-sent compliance notice is due
    ack_realerts: int = 0  # how many acknowledgement timeouts have re-alerted

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_at is not None


@dataclass(frozen=True)
class Alert:
    """One ladder step (or a repeat of the last one) that has become due."""

    step_index: int
    step: EscalationStep
    repeat: int  # 0 for the step itself, n for its n-th repeat
    due_at: datetime
    help: bool = False
    ack_round: int = 0  # n > 0: the n-th re-alert after an acknowledgement timed out

    @property
    def kind(self) -> str:
        return "help" if self.help else self.step.kind


@dataclass(frozen=True)
class Plan:
    state: str
    step: int
    repeats: int
    alerts: tuple[Alert, ...] = ()
    prestart_notice: bool = False
    next_action_at: datetime | None = None
    ack_realerts: int = 0

    def differs_from(self, clock: VisitClock) -> bool:
        return (
            self.state != clock.state
            or self.step != clock.step
            or self.repeats != clock.repeats
            or self.ack_realerts != clock.ack_realerts
            or bool(self.alerts)
            or self.prestart_notice
        )


def step_due_at(clock: VisitClock, step: EscalationStep) -> datetime:
    due = clock.deadline + step.after
    if clock.help_requested_at is not None:
        due = min(due, clock.help_requested_at)
    return due


DEFAULT_ACK_TIMEOUT = timedelta(minutes=30)


def plan(
    clock: VisitClock,
    ladder: tuple[EscalationStep, ...],
    now: datetime,
    ack_timeout: timedelta = DEFAULT_ACK_TIMEOUT,
) -> Plan:
    """What should have happened to this visit by ``now``, given what already has."""
    if clock.state in TERMINAL:
        return Plan(clock.state, clock.step, clock.repeats, ack_realerts=clock.ack_realerts)

    alerts: list[Alert] = []
    upcoming: list[datetime] = []
    step, repeats = clock.step, clock.repeats
    helping = clock.help_requested_at is not None

    prestart = False
    if clock.prestart_notice_due is not None:
        if now >= clock.prestart_notice_due:
            prestart = now < clock.deadline  # no point after the visit is over
        else:
            upcoming.append(clock.prestart_notice_due)

    # Every rung fires on its own time, acknowledged or not: an ack covers what was raised.
    while step < len(ladder):
        due = step_due_at(clock, ladder[step])
        if now < due:
            break
        alerts.append(Alert(step, ladder[step], 0, due, help=helping))
        step += 1
    fired_now = {alert.step_index for alert in alerts}  # one message per rung per sweep
    realerts = clock.ack_realerts
    if clock.acknowledged_at is not None and ladder:
        # Repeats stop (someone is on it), but the acknowledgement times out: an overdue
        # visit nobody has resolved comes back to the acknowledger and the next rung up.
        since = max(clock.acknowledged_at, clock.deadline)
        rounds = int((now - since) / ack_timeout) if now >= since else 0
        if rounds > realerts:
            index = min(step, len(ladder) - 1)
            step = max(step, index + 1)  # a rung brought forward does not fire again later
            due = since + rounds * ack_timeout
            if index not in fired_now:  # else that rung has just gone out to the same people
                alerts.append(Alert(index, ladder[index], 0, due, help=helping, ack_round=rounds))
            realerts = rounds
        upcoming.append(since + (realerts + 1) * ack_timeout)
    if step < len(ladder):
        upcoming.append(step_due_at(clock, ladder[step]))
    if clock.acknowledged_at is None:
        last = ladder[-1] if ladder else None
        if step == len(ladder) and last is not None and last.repeat:
            base = step_due_at(clock, last)
            # After an outage, send the latest repeat once rather than every missed one, and
            # none if the rung itself goes out in this same sweep.
            done = int((now - base) / last.repeat)
            if 0 <= done < repeats:
                # The wall clock went back (it was fast, and NTP corrected it): the count came
                # from the wrong clock. Count again from now, taking the repeat due now as not
                # sent, or the next would wait as long as the clock was fast.
                repeats = max(done - 1, 0)
            if done > repeats:
                if step - 1 not in fired_now:
                    due = base + done * last.repeat
                    alerts.append(Alert(step - 1, last, done, due, help=helping))
                repeats = done
            upcoming.append(base + (repeats + 1) * last.repeat)

    if clock.acknowledged:
        state = ACKNOWLEDGED
    elif step > 0:
        state = _STATE_AFTER_KIND.get(ladder[step - 1].kind, ESCALATED)
        if helping:
            state = ESCALATED
    elif now < clock.start:
        state = BOOKED
        upcoming.append(clock.start)
    else:
        state = IN_PROGRESS

    next_action = min(upcoming) if upcoming else None
    return Plan(state, step, repeats, tuple(alerts), prestart, next_action, realerts)


def default_ladder(grace: timedelta) -> tuple[EscalationStep, ...]:
    """Reminder at the deadline, manager after the grace period, directors after that."""
    return (
        EscalationStep(timedelta(0), ("worker",), NotificationKind.REMINDER),
        EscalationStep(grace, ("manager",), NotificationKind.OVERRUN),
        EscalationStep(
            grace + timedelta(minutes=30),
            ("role:director",),
            NotificationKind.ESCALATION,
            repeat=timedelta(minutes=15),
        ),
    )
