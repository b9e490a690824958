"""The visit state machine as a pure function of stored fields and ``now``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from visitwatch.daemon import lifecycle
from visitwatch.daemon.lifecycle import VisitClock, plan
from visitwatch.policies.model import EscalationStep

START = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)
DEADLINE = datetime(2026, 11, 23, 15, 30, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
LADDER = (
    EscalationStep(timedelta(0), ("worker",), "reminder"),
    EscalationStep(timedelta(minutes=15), ("manager",), "overrun"),
    EscalationStep(
        timedelta(minutes=45), ("role:director",), "escalation", repeat=timedelta(minutes=15)
    ),
)


def advance(clock: VisitClock, now: datetime) -> tuple[VisitClock, lifecycle.Plan]:
    """Apply a plan the way the sweep stores it."""
    result = plan(clock, LADDER, now)
    stored = VisitClock(
        result.state,
        clock.start,
        clock.deadline,
        result.step,
        result.repeats,
        clock.acknowledged,
        clock.help_requested_at,
    )
    return stored, result


def fresh(**changes: object) -> VisitClock:
    return VisitClock(
        **{"state": lifecycle.BOOKED, "start": START, "deadline": DEADLINE, **changes}
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("offset", "state", "kinds"),
    [
        (-MINUTE, lifecycle.IN_PROGRESS, []),
        (timedelta(0), lifecycle.DUE, ["reminder"]),
        (MINUTE, lifecycle.DUE, ["reminder"]),
        (timedelta(minutes=14), lifecycle.DUE, ["reminder"]),
        (timedelta(minutes=15), lifecycle.OVERDUE, ["reminder", "overrun"]),
        (timedelta(minutes=16), lifecycle.OVERDUE, ["reminder", "overrun"]),
        (timedelta(minutes=44), lifecycle.OVERDUE, ["reminder", "overrun"]),
        (timedelta(minutes=45), lifecycle.ESCALATED, ["reminder", "overrun", "escalation"]),
    ],
)
def test_each_deadline_one_minute_before_at_and_after(offset, state, kinds):
    """A visit first swept at each moment is in the right state with every due alert raised."""
    result = plan(fresh(state=lifecycle.IN_PROGRESS), LADDER, DEADLINE + offset)
    assert result.state == state
    assert [a.kind for a in result.alerts] == kinds


def test_booked_until_start_then_in_progress():
    """Before the start a visit is booked and wakes at its start; after, it is in progress."""
    before = plan(fresh(), LADDER, START - MINUTE)
    assert before.state == lifecycle.BOOKED
    assert before.next_action_at == START
    assert plan(fresh(), LADDER, START).state == lifecycle.IN_PROGRESS


def test_next_action_is_the_next_rung():
    """The sweep is woken exactly when the next alert becomes due, not earlier."""
    clock, first = advance(fresh(state=lifecycle.IN_PROGRESS), START + MINUTE)
    assert first.next_action_at == DEADLINE
    clock, reminder = advance(clock, DEADLINE)
    assert reminder.next_action_at == DEADLINE + timedelta(minutes=15)


def test_each_alert_fires_once_as_time_moves_on():
    """Sweeping every minute for two hours raises each rung once and repeats every 15 minutes."""
    clock = fresh(state=lifecycle.IN_PROGRESS)
    raised: list[tuple[str, int, datetime]] = []
    now = DEADLINE - 5 * MINUTE
    while now <= DEADLINE + timedelta(minutes=120):
        clock, result = advance(clock, now)
        raised += [(a.kind, a.repeat, now) for a in result.alerts]
        now += MINUTE
    kinds = [(kind, repeat) for kind, repeat, _ in raised]
    assert kinds[:3] == [("reminder", 0), ("overrun", 0), ("escalation", 0)]
    # Escalation at +45, then repeats at +60, +75, +90, +105, +120.
    assert kinds[3:] == [("escalation", n) for n in range(1, 6)]
    assert raised[3][2] == DEADLINE + timedelta(minutes=60)


def test_outage_sends_each_missed_rung_once_and_only_the_latest_repeat():
    """After two hours without sweeps, one sweep raises every rung and one repeat, not six."""
    result = plan(fresh(state=lifecycle.IN_PROGRESS), LADDER, DEADLINE + timedelta(minutes=120))
    assert [(a.kind, a.repeat) for a in result.alerts] == [
        ("reminder", 0),
        ("overrun", 0),
        ("escalation", 0),
        ("escalation", 5),
    ]
    assert result.repeats == 5


def test_acknowledged_visit_raises_nothing_more():
    """An acknowledgement stops the ladder and its repeats."""
    clock = fresh(state=lifecycle.OVERDUE, step=2, acknowledged=True)
    result = plan(clock, LADDER, DEADLINE + timedelta(hours=3))
    assert result.state == lifecycle.ACKNOWLEDGED
    assert result.alerts == ()
    assert result.next_action_at is None


@pytest.mark.parametrize("state", sorted(lifecycle.TERMINAL))
def test_terminal_states_never_alert(state):
    """Resolved, cancelled and expired visits stay as they are, whatever the time."""
    result = plan(fresh(state=state), LADDER, DEADLINE + timedelta(hours=5))
    assert (result.state, result.alerts, result.next_action_at) == (state, (), None)


def test_help_request_fires_every_rung_at_once():
    """A help request pulls the whole ladder to the moment help was asked for."""
    asked = START + timedelta(minutes=20)
    clock = fresh(state=lifecycle.IN_PROGRESS, help_requested_at=asked)
    result = plan(clock, LADDER, asked)
    assert [a.kind for a in result.alerts] == ["help", "help", "help"]
    assert result.state == lifecycle.ESCALATED
    assert result.next_action_at == asked + timedelta(minutes=15)  # then it repeats


def test_extension_moves_every_rung():
    """A later deadline (an extension or an edit) moves the reminder and the alerts with it."""
    extended = DEADLINE + timedelta(minutes=30)
    clock = fresh(state=lifecycle.IN_PROGRESS, deadline=extended)
    assert plan(clock, LADDER, DEADLINE + MINUTE).alerts == ()
    assert [a.kind for a in plan(clock, LADDER, extended).alerts] == ["reminder"]


def test_prestart_notice_is_due_before_start_and_not_after_the_visit():
    """The pre-start compliance notice goes out once it is due, but not after the visit ended."""
    due = START - timedelta(minutes=30)
    clock = fresh(prestart_notice_due=due)
    assert plan(clock, LADDER, due - MINUTE).prestart_notice is False
    assert plan(clock, LADDER, due - MINUTE).next_action_at == due
    assert plan(clock, LADDER, due).prestart_notice is True
    assert plan(clock, LADDER, DEADLINE + MINUTE).prestart_notice is False
