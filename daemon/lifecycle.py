"""The visit state machine, as a pure function of stored fields and one ``now``.

::

    booked ──start──▶ in_progress ──deadline──▶ due ──+grace──▶ overdue ──▶ escalated ⟲
       │                   │                     │               │             │
       └─────── check-in / acknowledged and confirmed safe ──────┴─────────────┴──▶ resolved
    (any active state) ── entry cancelled or removed ──▶ cancelled

``acknowledged`` sits beside overdue/escalated: a manager has taken it on, so repeats stop,
but the visit is not resolved until the worker is confirmed safe.

The deadline is the expected return time (or the end of an extension). Each ladder step is
timed from it; a help request pulls every step forward to the moment help was asked for.
Nothing here reads the clock or the database: :func:`plan` is tested at one minute before,
at, and after each deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from visitwatch.policies.model import EscalationStep

BOOKED = "booked"
IN_PROGRESS = "in_progress"
DUE = "due"
OVERDUE = "overdue"
ESCALATED = "escalated"
ACKNOWLEDGED = "acknowledged"
RESOLVED = "resolved"
CANCELLED = "cancelled"
EXPIRED = "expired"  # first seen long after its deadline: recorded, never escalated

TERMINAL = frozenset({RESOLVED, CANCELLED, EXPIRED})

_STATE_AFTER_KIND = {"reminder": DUE, "overrun": OVERDUE, "escalation": ESCALATED}


@dataclass(frozen=True)
class VisitClock:
    """The stored fields the lifecycle depends on."""

    state: str
    start: datetime
    deadline: datetime
    step: int = 0  # how many ladder steps have fired
    repeats: int = 0  # how many repeats of the last step have fired
    acknowledged: bool = False
    help_requested_at: datetime | None = None
    prestart_notice_due: datetime | None = None  # when a not-yet-sent compliance notice is due


@dataclass(frozen=True)
class Alert:
    """One ladder step (or a repeat of the last one) that has become due."""

    step_index: int
    step: EscalationStep
    repeat: int  # 0 for the step itself, n for its n-th repeat
    due_at: datetime
    help: bool = False

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

    def differs_from(self, clock: VisitClock) -> bool:
        return (
            self.state != clock.state
            or self.step != clock.step
            or self.repeats != clock.repeats
            or bool(self.alerts)
            or self.prestart_notice
        )


def step_due_at(clock: VisitClock, step: EscalationStep) -> datetime:
    due = clock.deadline + step.after
    if clock.help_requested_at is not None:
        due = min(due, clock.help_requested_at)
    return due


def plan(clock: VisitClock, ladder: tuple[EscalationStep, ...], now: datetime) -> Plan:
    """What should have happened to this visit by ``now``, given what already has."""
    if clock.state in TERMINAL:
        return Plan(clock.state, clock.step, clock.repeats)

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

    # An acknowledgement stops the ladder: someone responsible is on it.
    if not clock.acknowledged:
        while step < len(ladder):
            due = step_due_at(clock, ladder[step])
            if now < due:
                upcoming.append(due)
                break
            alerts.append(Alert(step, ladder[step], 0, due, help=helping))
            step += 1
        last = ladder[-1] if ladder else None
        if step == len(ladder) and last is not None and last.repeat:
            base = step_due_at(clock, last)
            # After an outage, send the latest repeat once rather than every missed one.
            done = int((now - base) / last.repeat)
            if done > repeats:
                alerts.append(Alert(step - 1, last, done, base + done * last.repeat, help=helping))
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
    return Plan(state, step, repeats, tuple(alerts), prestart, next_action)


def default_ladder(grace: timedelta) -> tuple[EscalationStep, ...]:
    """Reminder at the deadline, manager after the grace period, directors after that."""
    return (
        EscalationStep(timedelta(0), ("worker",), "reminder"),
        EscalationStep(grace, ("manager",), "overrun"),
        EscalationStep(
            grace + timedelta(minutes=30),
            ("role:director",),
            "escalation",
            repeat=timedelta(minutes=15),
        ),
    )
