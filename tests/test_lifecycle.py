"""The visit state machine as a pure function of stored fields and ``now``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from visitwatch.core.notification import NotificationKind
from visitwatch.daemon import lifecycle
from visitwatch.daemon.lifecycle import VisitClock, plan
from visitwatch.policies.model import EscalationStep

START = datetime(2026, 11, 23, 13, 0, tzinfo=UTC)
DEADLINE = datetime(2026, 11, 23, 15, 30, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
LADDER = (
    EscalationStep(timedelta(0), ("worker",), NotificationKind.REMINDER),
    EscalationStep(timedelta(minutes=15), ("manager",), NotificationKind.OVERRUN),
    EscalationStep(
        timedelta(minutes=45),
        ("role:director",),
        NotificationKind.ESCALATION,
        repeat=timedelta(minutes=15),
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
        clock.acknowledged_at,
        clock.help_requested_at,
        ack_realerts=result.ack_realerts,
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


def test_outage_sends_each_missed_rung_once_and_no_repeat_beside_it():
    """After two hours without sweeps, one sweep raises every rung once: no repeat beside it."""
    result = plan(fresh(state=lifecycle.IN_PROGRESS), LADDER, DEADLINE + timedelta(minutes=120))
    assert [(a.kind, a.repeat) for a in result.alerts] == [
        ("reminder", 0),
        ("overrun", 0),
        ("escalation", 0),
    ]
    assert result.repeats == 5
    assert result.next_action_at == DEADLINE + timedelta(minutes=135)


def test_outage_after_the_top_rung_sends_only_the_latest_repeat():
    """The top rung went out before a two-hour outage: one sweep sends one repeat, not five."""
    clock = fresh(state=lifecycle.ESCALATED, step=3, repeats=0)
    result = plan(clock, LADDER, DEADLINE + timedelta(minutes=120))
    assert [(a.kind, a.repeat) for a in result.alerts] == [("escalation", 5)]


def test_acknowledgement_timeout_beside_its_rung_sends_one_message():
    """Swept late, a rung and the ack timeout that would re-raise it go out once, not twice."""
    acked = DEADLINE + timedelta(minutes=16)
    clock = fresh(state=lifecycle.OVERDUE, step=2, acknowledged_at=acked)
    result = plan(clock, LADDER, DEADLINE + timedelta(minutes=50))
    assert [(a.kind, a.step_index) for a in result.alerts] == [("escalation", 2)]
    assert result.ack_realerts == 1
    assert result.next_action_at == acked + 2 * ACK_TIMEOUT


ACK_TIMEOUT = timedelta(minutes=30)


def ack_run(clock: VisitClock, until: datetime) -> list[tuple[str, int, int, datetime]]:
    """Sweep every minute from now to ``until``; (kind, step, ack round, when) of each alert."""
    raised: list[tuple[str, int, int, datetime]] = []
    now = max(clock.acknowledged_at or DEADLINE, DEADLINE - 5 * MINUTE)
    while now <= until:
        clock, result = advance(clock, now)
        raised += [(a.kind, a.step_index, a.ack_round, now) for a in result.alerts]
        now += MINUTE
    return raised


def test_acknowledgement_stops_repeats_until_it_times_out():
    """After an ack of the top rung, no repeats; at ack + 30 min the top rung is re-alerted."""
    acked = DEADLINE + timedelta(minutes=50)
    clock = fresh(state=lifecycle.ESCALATED, step=3, acknowledged_at=acked)
    before = plan(clock, LADDER, acked + ACK_TIMEOUT - MINUTE, ack_timeout=ACK_TIMEOUT)
    assert (before.state, before.alerts) == (lifecycle.ACKNOWLEDGED, ())
    assert before.next_action_at == acked + ACK_TIMEOUT
    at = plan(clock, LADDER, acked + ACK_TIMEOUT, ack_timeout=ACK_TIMEOUT)
    assert [(a.kind, a.step_index, a.ack_round) for a in at.alerts] == [("escalation", 2, 1)]
    assert at.state == lifecycle.ACKNOWLEDGED and at.ack_realerts == 1
    after = plan(clock, LADDER, acked + ACK_TIMEOUT + MINUTE, ack_timeout=ACK_TIMEOUT)
    assert [a.ack_round for a in after.alerts] == [1]  # not yet sent: it still goes, once


def test_unresolved_acknowledgement_re_alerts_every_timeout():
    """Nobody resolves the visit: a re-alert every 30 minutes after the ack, and only then."""
    acked = DEADLINE + timedelta(minutes=50)
    clock = fresh(state=lifecycle.ESCALATED, step=3, acknowledged_at=acked)
    raised = ack_run(clock, acked + timedelta(minutes=95))
    assert [(r[2], r[3]) for r in raised] == [
        (1, acked + ACK_TIMEOUT),
        (2, acked + 2 * ACK_TIMEOUT),
        (3, acked + 3 * ACK_TIMEOUT),
    ]


def test_acknowledgement_before_any_alert_lets_later_rungs_go_out():
    """An ack covers only what was raised: an early ack still lets every later rung fire."""
    acked = START + timedelta(minutes=10)
    clock = fresh(state=lifecycle.IN_PROGRESS, acknowledged_at=acked)
    assert plan(clock, LADDER, DEADLINE - MINUTE).alerts == ()
    raised = ack_run(clock, DEADLINE + timedelta(minutes=29))
    assert [(r[0], r[3]) for r in raised] == [
        ("reminder", DEADLINE),
        ("overrun", DEADLINE + timedelta(minutes=15)),
    ]


def test_acknowledgement_timeout_brings_the_next_rung_forward():
    """Acked after the overrun: at ack + 30 min the directors' rung fires, not at +45 later."""
    acked = DEADLINE + timedelta(minutes=16)
    clock = fresh(state=lifecycle.OVERDUE, step=2, acknowledged_at=acked)
    raised = ack_run(clock, acked + timedelta(minutes=61))
    # The escalation rung is due at +45 on its own: it fires then, to directors and acker;
    # the first timeout (+46) re-alerts the top rung, and so on every 30 minutes.
    assert [(r[0], r[1], r[2], r[3]) for r in raised] == [
        ("escalation", 2, 0, DEADLINE + timedelta(minutes=45)),
        ("escalation", 2, 1, acked + ACK_TIMEOUT),
        ("escalation", 2, 2, acked + 2 * ACK_TIMEOUT),
    ]


def test_acknowledgement_timeout_pulls_a_distant_rung_forward():
    """With the next rung far off, the timeout fires it early, and it does not fire twice."""
    ladder = (
        EscalationStep(timedelta(0), ("worker",), NotificationKind.REMINDER),
        EscalationStep(timedelta(minutes=15), ("manager",), NotificationKind.OVERRUN),
        EscalationStep(timedelta(hours=2), ("role:director",), NotificationKind.ESCALATION),
    )
    acked = DEADLINE + timedelta(minutes=16)
    clock = fresh(state=lifecycle.OVERDUE, step=2, acknowledged_at=acked)
    result = plan(clock, ladder, acked + ACK_TIMEOUT, ack_timeout=ACK_TIMEOUT)
    assert [(a.kind, a.step_index, a.ack_round) for a in result.alerts] == [("escalation", 2, 1)]
    assert result.step == 3
    later = VisitClock(
        result.state, START, DEADLINE, result.step, result.repeats, acked,
        ack_realerts=result.ack_realerts,
    )  # fmt: skip
    two_hours = plan(later, ladder, DEADLINE + timedelta(hours=2), ack_timeout=ACK_TIMEOUT)
    assert [(a.step_index, a.ack_round) for a in two_hours.alerts] == [(2, 3)]


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


def test_acknowledgement_before_the_deadline_times_out_from_the_deadline():
    """An early ack's timeout counts from the deadline: nothing is brought before the reminder."""
    acked = START + timedelta(minutes=10)
    clock = fresh(state=lifecycle.IN_PROGRESS, acknowledged_at=acked)
    assert plan(clock, LADDER, acked + ACK_TIMEOUT).alerts == ()
    raised = ack_run(clock, DEADLINE + ACK_TIMEOUT)
    assert [(r[0], r[2], r[3]) for r in raised] == [
        ("reminder", 0, DEADLINE),
        ("overrun", 0, DEADLINE + timedelta(minutes=15)),
        ("escalation", 1, DEADLINE + ACK_TIMEOUT),  # the directors' rung, 15 minutes early
    ]
