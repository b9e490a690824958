"""Issue 6 on the watching side: nobody is silenced early, skipped, dropped or kept waiting.

Acknowledgements that cover only what was raised and time out; check-ins that only apply to
started visits; resolved visits moved to a later day watched again; alerts to people no
channel reaches told to an admin; the grace period; races with the sweep retried, never
dropped; a sweep with no cap. Real ICS files, a real database, real channels; only time moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import ClassVar

import pytest
from structlog.testing import capture_logs

from tests.conftest import MANAGER_AND_DIRECTOR, T0, World, home_visit, many_visits, tick
from tests.scripted import ScriptedChannel
from visitwatch.connectors import registry
from visitwatch.daemon.config import Directory, StaffMember
from visitwatch.daemon.entries import visit_id
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.recipients import admin_addressees
from visitwatch.daemon.store import from_ts, ts
from visitwatch.daemon.visits import ActionError, Visit

START = T0 + timedelta(hours=1)  # 13:00
DEADLINE = T0 + timedelta(hours=2)  # 14:00
MIN = timedelta(minutes=1)
VISIT = visit_id("team", "visit-1", "")
NAMES = ("Asha", "Maria", "Sam", "Ben", "Brook Street")


def visit(world: World, service: object, column: str) -> object:
    row = service.store.one(f"SELECT {column} FROM visits WHERE id = ?", (VISIT,))  # type: ignore[attr-defined]
    return row[column]


# --------------------------------------------------------------------------- defect 6: acks


def test_ack_before_any_alert_lets_every_later_rung_go_out_also_to_the_acknowledger(
    world: World,
):
    """An ack mid-visit silences nothing: reminder and manager alert still go, to the acker too."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START + 10 * MIN)
    tick(service)
    service.watcher.actions.acknowledge(VISIT, by="Sam Webster")
    world.at(DEADLINE)
    tick(service)
    assert sorted(world.recipients("reminder")) == [
        "asha.khan@example.org",
        "sam.webster@example.org",
    ]
    world.at(DEADLINE + timedelta(minutes=15))
    tick(service)
    assert sorted(world.recipients("overrun")) == MANAGER_AND_DIRECTOR
    [to_maria] = [m for m in world.messages("overrun") if m["recipient"]["name"] == "Maria Jones"]
    assert "Sam Webster acknowledged" in to_maria["text"]
    service.watcher.actions.check_in(VISIT, by="Asha Khan")
    service.dispatch()
    assert sorted(world.recipients("all_clear")) == MANAGER_AND_DIRECTOR


def test_ack_times_out_re_alerting_acknowledger_and_next_rung_and_repeats(world: World):
    """Acked after the manager alert and never resolved: re-alerts every 30 minutes after."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    service.watcher.actions.acknowledge(VISIT, by="maria.jones@example.org")  # an id matches too
    world.at(DEADLINE + timedelta(minutes=45))
    tick(service)
    # The directors' rung was not yet raised when Maria acknowledged: it still goes.
    assert sorted(world.recipients("escalation")) == MANAGER_AND_DIRECTOR
    world.at(DEADLINE + timedelta(minutes=16 + 30) - MIN)
    tick(service)
    assert len(world.messages("escalation")) == 2
    world.at(DEADLINE + timedelta(minutes=16 + 30))
    tick(service)
    assert len(world.messages("escalation")) == 4
    world.at(DEADLINE + timedelta(minutes=16 + 60))
    tick(service)
    assert len(world.messages("escalation")) == 6
    causes = [
        r["cause"]
        for r in service.store.query("SELECT cause FROM audit WHERE visit_id = ?", (VISIT,))
    ]
    assert causes.count("acknowledged and still unresolved after 30 min: re-alerted") == 2
    # Acknowledging again restarts the timeout.
    service.watcher.actions.acknowledge(VISIT, by="Maria Jones")
    world.at(DEADLINE + timedelta(minutes=16 + 89))
    tick(service)
    assert len(world.messages("escalation")) == 6


def test_ack_timeout_is_a_policy_setting(world: World):
    """`[policy.timing] ack_timeout = "10m"` re-alerts ten minutes after the ack."""
    world.policy = '[policy.timing]\nack_timeout = "10m"\n'
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    service.watcher.actions.acknowledge(VISIT, by="Maria Jones")
    world.at(DEADLINE + timedelta(minutes=25))
    tick(service)
    assert world.messages("escalation") == []
    world.at(DEADLINE + timedelta(minutes=26))
    tick(service)
    assert sorted(world.recipients("escalation")) == MANAGER_AND_DIRECTOR


def test_a_moved_deadline_clears_an_earlier_ack(world: World):
    """A new return time restarts the ladder: an ack given for the old one no longer stands."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START + 10 * MIN)
    tick(service)
    service.watcher.actions.acknowledge(VISIT, by="Maria Jones")
    world.write_calendar(home_visit(description="Risk assessment: complete\nReturn by: 15:00"))
    world.at(START + 20 * MIN)
    tick(service)
    assert visit(world, service, "acknowledged_at") is None
    assert visit(world, service, "state") == "in_progress"


def test_ack_without_a_name_is_refused(world: World):
    """`ack --by ""` says who is needed instead of recording an anonymous acknowledgement."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    with pytest.raises(ActionError, match="--by"):
        service.watcher.actions.acknowledge(VISIT, by="  ")
    assert visit(world, service, "state") == "overdue"


# --------------------------------------------------------------------------- defect 7: I5


def test_check_in_and_ack_before_the_start_are_refused_saying_when_it_starts(world: World):
    """Before 13:00, a check-in or an ack is refused with the start time; nothing is resolved."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START - MIN)
    tick(service)
    with pytest.raises(ActionError, match=r"starts at Mon 23 Nov 13:00 \(GMT\)"):
        service.watcher.actions.check_in(VISIT, by="Asha Khan")
    with pytest.raises(ActionError, match=r"cannot acknowledge visit .* yet"):
        service.watcher.actions.acknowledge(VISIT, by="Maria Jones")
    with pytest.raises(ActionError, match="starts at"):
        service.watcher.actions.acknowledge(VISIT, by="Maria Jones", safe=True)
    assert visit(world, service, "state") == "booked"
    assert service.store.query("SELECT * FROM checkins") == []
    world.at(DEADLINE)
    tick(service)
    assert world.recipients("reminder") == ["asha.khan@example.org"]


def test_extension_before_the_start_is_allowed_and_keeps_watching(world: World):
    """`--extend` before the start only moves the deadline later; the visit is still watched."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START - 10 * MIN)
    tick(service)
    service.watcher.actions.check_in(VISIT, by="Asha Khan", extend=timedelta(minutes=30))
    assert from_ts(visit(world, service, "deadline")) == DEADLINE + timedelta(minutes=30)  # type: ignore[arg-type]
    world.at(DEADLINE + timedelta(minutes=30))
    tick(service)
    assert world.recipients("reminder") == ["asha.khan@example.org"]


def test_help_before_the_start_is_taken(world: World):
    """A worker asking for help early is heard at once: help can raise alerts, never silence."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START - 5 * MIN)
    tick(service)
    service.watcher.actions.request_help(VISIT, by="Asha Khan")
    service.dispatch()
    assert sorted(world.recipients("help")) == MANAGER_AND_DIRECTOR


def test_safe_category_set_before_the_start_does_not_check_in(world: World):
    """A "Safe" category set ten minutes before the visit is not a check-in for it."""
    world.write_calendar(
        home_visit(categories=("Home Visit", "Safe"), last_modified=START - 10 * MIN)
    )
    service = world.service()
    for moment in (START - 10 * MIN, START + MIN, DEADLINE + timedelta(minutes=15)):
        world.at(moment)
        tick(service)
    assert visit(world, service, "state") == "overdue"
    assert world.recipients("overrun") == ["maria.jones@example.org"]


def test_resolved_visit_moved_to_tomorrow_is_watched_again(world: World):
    """Checked in, then moved to tomorrow in Outlook: re-opened, audited, and escalated then."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START + 5 * MIN)
    tick(service)
    service.watcher.actions.check_in(VISIT, by="Asha Khan")
    day = timedelta(days=1)
    world.write_calendar(home_visit(start=START + day, end=DEADLINE + day))
    world.at(START + 10 * MIN)
    tick(service)
    assert visit(world, service, "state") == "booked"
    [reopen] = service.store.query(
        "SELECT from_state, to_state, cause, actor FROM audit WHERE visit_id = ?"
        " AND cause LIKE 're-opened%'",
        (VISIT,),
    )
    assert reopen == {
        "from_state": "resolved",
        "to_state": "booked",
        "cause": "re-opened: moved to Tue 24 Nov 13:00 (GMT) by a calendar edit",
        "actor": "calendar",
    }
    world.at(DEADLINE + day + timedelta(minutes=15))
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]


# --------------------------------------------------------------------------- defect 8


class ScriptedSmsChannel(ScriptedChannel):
    """Like SMS: only for recipients with a mobile number."""

    type_name: ClassVar[str] = "scripted_sms"
    address_field: ClassVar[str | None] = "mobile"


@pytest.fixture
def sms(monkeypatch: pytest.MonkeyPatch, scripted_channels: object) -> Iterator[None]:
    monkeypatch.setitem(
        registry.CHANNELS, "scripted_sms", "tests.test_escalation_safety:ScriptedSmsChannel"
    )
    yield


SMS = '\n[[channels]]\nname = "sms"\ntype = "scripted_sms"\n'
ADMIN_OUTBOX = (
    '\n[[channels]]\nname = "outbox"\ntype = "outbox"\npath = "outbox.jsonl"\nkinds = ["admin"]\n'
)


def test_alert_to_someone_no_channel_reaches_becomes_an_admin_notice(world: World, sms: None):
    """The director has no mobile on an SMS-only ladder: an admin is told who, which visit, why."""
    world.channels = SMS + ADMIN_OUTBOX
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=45))
    tick(service)
    [notice] = world.messages("admin")
    assert notice["recipient"]["id"] == "sam.webster@example.org"  # directors stand in
    assert "Sam Webster" in notice["subject"] + notice["text"]
    assert VISIT in notice["text"]
    assert "no mobile number" in notice["text"] and "'sms'" in notice["text"]
    assert "Brook Street" not in notice["text"]  # the visit id, not the family's address
    world.at(DEADLINE + timedelta(minutes=60))  # the repeat: the same rung, no second notice
    tick(service)
    assert len(world.messages("admin")) == 1


def test_when_even_the_admins_cannot_be_reached_it_is_logged_without_names(world: World, sms: None):
    """SMS only and no admin with a mobile: an error is logged, naming the visit, not people."""
    world.channels = SMS
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=45))
    with capture_logs() as logs:
        tick(service)
    errors = [e for e in logs if e["event"] == "admin_unreachable"]
    assert errors and errors[0]["visit_id"] == VISIT and errors[0]["log_level"] == "error"
    for event in logs:
        if event["log_level"] in ("warning", "error"):
            assert not any(name in repr(event) for name in NAMES), event


def test_admin_addressees_fall_back_from_admin_to_director_to_manager():
    """Admins are the "admin" role, else directors, else managers."""
    people = [
        StaffMember("a@x.org", "A", "a@x.org", "", "manager", ""),
        StaffMember("b@x.org", "B", "b@x.org", "", "director", ""),
    ]
    directory = Directory({p.id: p for p in people})
    assert [a.recipient.id for a in admin_addressees(directory)] == ["b@x.org"]
    admin = StaffMember("c@x.org", "C", "c@x.org", "", "admin", "")
    directory = Directory({p.id: p for p in (*people, admin)})
    assert [(a.recipient.id, a.relation) for a in admin_addressees(directory)] == [
        ("c@x.org", "role:admin")
    ]
    assert admin_addressees(Directory({})) == []


# --------------------------------------------------------------------------- defect 9: grace


def test_grace_sets_when_the_manager_is_alerted(world: World):
    """`grace = "5m"`: the manager at +5 and the directors 30 minutes after that, not +15/+45."""
    world.policy = '[policy.timing]\ngrace = "5m"\n'
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + 4 * MIN)
    tick(service)
    assert world.messages("overrun") == []
    world.at(DEADLINE + 5 * MIN)
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]
    world.at(DEADLINE + 34 * MIN)
    tick(service)
    assert world.messages("escalation") == []
    world.at(DEADLINE + 35 * MIN)
    tick(service)
    assert world.recipients("escalation") == ["sam.webster@example.org"]


# --------------------------------------------------------------------------- defect 10: races


def _bump_version_once(service: object, monkeypatch: pytest.MonkeyPatch, always: bool = False):
    """After the watcher reads the visit, a concurrent writer changes it (as the sweep does)."""
    visits = service.watcher.visits  # type: ignore[attr-defined]
    real = visits.current
    bumps: list[str] = []

    def racing(visit_id: str) -> Visit:
        row = real(visit_id)
        if always or not bumps:
            bumps.append(visit_id)
            service.store.db.conn.execute(  # type: ignore[attr-defined]
                "UPDATE visits SET version = version + 1 WHERE id = ?", (visit_id,)
            )
        return row

    monkeypatch.setattr(visits, "current", racing)
    return bumps


def test_check_in_racing_the_sweep_succeeds(world: World, monkeypatch: pytest.MonkeyPatch):
    """A check-in whose visit changes between read and write is retried, not refused."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    bumps = _bump_version_once(service, monkeypatch)
    service.watcher.actions.check_in(VISIT, by="Asha Khan")
    assert bumps == [VISIT]
    assert visit(world, service, "state") == "resolved"
    service.dispatch()
    assert world.recipients("all_clear") == ["maria.jones@example.org"]


@pytest.mark.parametrize("action", ["ack", "help", "extend"])
def test_every_action_racing_the_sweep_succeeds(
    world: World, monkeypatch: pytest.MonkeyPatch, action: str
):
    """Ack, help and extend on a busy visit succeed after a lost claim."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    _bump_version_once(service, monkeypatch)
    if action == "ack":
        service.watcher.actions.acknowledge(VISIT, by="Maria Jones")
        assert visit(world, service, "acknowledged_by") == "Maria Jones"
    elif action == "help":
        service.watcher.actions.request_help(VISIT, by="Asha Khan")
        assert visit(world, service, "help_requested_at") is not None
    else:
        service.watcher.actions.check_in(VISIT, by="Asha Khan", extend=timedelta(minutes=30))
        assert visit(world, service, "extended_until") is not None


def test_a_visit_that_keeps_changing_gives_a_clear_error_and_changes_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
):
    """Only a visit that never stops changing gives up, saying so, with nothing half-done."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    _bump_version_once(service, monkeypatch, always=True)
    with pytest.raises(ActionError, match="kept changing"):
        service.watcher.actions.check_in(VISIT, by="Asha Khan")
    assert visit(world, service, "state") == "overdue"
    assert service.store.query("SELECT * FROM checkins") == []


def test_calendar_edit_racing_the_sweep_is_applied(world: World, monkeypatch: pytest.MonkeyPatch):
    """The sweep changes the visit after sync read it: the edit is still applied, not dropped."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + 2 * MIN)
    tick(service)
    world.write_calendar(home_visit(description="Risk assessment: complete\nReturn by: 15:00"))
    real = service.syncer._process_safely
    raced: list[str] = []

    def racing(event, existing, now, report):  # type: ignore[no-untyped-def]
        if not raced:  # the sweep commits between sync's read and its write
            raced.append(event.uid)
            service.store.db.conn.execute(
                "UPDATE visits SET version = version + 1 WHERE id = ?", (VISIT,)
            )
        return real(event, existing, now, report)

    monkeypatch.setattr(service.syncer, "_process_safely", racing)
    world.at(DEADLINE + 3 * MIN)
    tick(service)
    assert raced == ["visit-1"]
    assert from_ts(visit(world, service, "deadline")) == DEADLINE + timedelta(hours=1)  # type: ignore[arg-type]
    assert service.store.query("SELECT * FROM problems") == []
    world.at(DEADLINE + timedelta(minutes=20))
    tick(service)
    assert world.messages("overrun") == []


def test_a_feed_whose_processing_failed_is_read_again_next_poll(
    world: World, monkeypatch: pytest.MonkeyPatch
):
    """An entry that failed once is retried at the next poll, not skipped as unchanged."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + 2 * MIN)
    tick(service)
    world.write_calendar(home_visit(description="Risk assessment: complete\nReturn by: 15:00"))
    real = service.syncer._process
    failures: list[str] = []

    def flaky(event, row, now, report):  # type: ignore[no-untyped-def]
        if not failures:
            failures.append(event.uid)
            raise RuntimeError("database is locked")
        return real(event, row, now, report)

    monkeypatch.setattr(service.syncer, "_process", flaky)
    world.at(DEADLINE + 3 * MIN)
    tick(service)
    assert failures == ["visit-1"]
    assert from_ts(visit(world, service, "deadline")) == DEADLINE  # type: ignore[arg-type]
    assert service.store.one("SELECT fingerprint FROM sources")["fingerprint"] is None
    world.at(DEADLINE + 4 * MIN)
    tick(service)  # the same, unchanged file
    assert from_ts(visit(world, service, "deadline")) == DEADLINE + timedelta(hours=1)  # type: ignore[arg-type]
    assert service.store.one("SELECT fingerprint FROM sources")["fingerprint"] is not None


# --------------------------------------------------------------------------- defect 11: sweep


def test_one_sweep_raises_every_due_alert_however_many(world: World):
    """600 visits reaching their deadline together: one sweep reminds all 600 (no 500 cap)."""
    world.write_calendar(*many_visits(600))
    service = world.service()
    world.at(START)
    tick(service)
    world.at(DEADLINE)
    service.sync_all()
    assert service.sweep() == 600
    assert service.store.one("SELECT COUNT(*) AS n FROM notifications")["n"] == 600


def test_sweep_batches_isolate_one_bad_visit_and_log_it_once(world: World):
    """A visit that raises rolls back alone, is retried a minute later, and is logged once."""
    world.write_calendar(*many_visits(7))
    service = world.service()
    world.at(START)
    tick(service)
    bad = visit_id("team", "visit-3", "")
    real_notify = service.watcher.router.notify

    def notify(conn, visit, *args, **kwargs):  # type: ignore[no-untyped-def]
        if visit.id == bad:
            raise RuntimeError("poisoned")
        return real_notify(conn, visit, *args, **kwargs)

    service.watcher.router.notify = notify  # type: ignore[method-assign]
    world.at(DEADLINE)
    with capture_logs() as logs:
        assert service.watcher.sweep(batch=3) == 6
        world.at(DEADLINE + MIN)
        service.watcher.sweep(batch=3)
    assert [e["event"] for e in logs].count("sweep_failed") == 1
    states = {
        r["id"]: (r["state"], r["next_action_at"])
        for r in service.store.query("SELECT id, state, next_action_at FROM visits")
    }
    assert states[bad] == ("in_progress", ts(DEADLINE + 2 * MIN))
    assert sum(1 for s, _ in states.values() if s == "due") == 6
    del service.watcher.router.notify
    world.at(DEADLINE + 2 * MIN)
    with capture_logs() as logs:
        service.watcher.sweep(batch=3)
    assert service.store.one("SELECT state FROM visits WHERE id = ?", (bad,)) == {"state": "due"}
    assert "sweep_recovered" in [e["event"] for e in logs]


def test_next_due_is_the_earliest_next_action(world: World):
    """`next_due()` says when the sweep next has work: the start, then the deadline, then none."""
    world.write_calendar(home_visit())
    service = world.service()
    tick(service)
    assert service.watcher.next_due() == START
    world.at(START)
    tick(service)
    assert service.watcher.next_due() == DEADLINE
    service.watcher.actions.check_in(VISIT, by="Asha Khan")
    assert service.watcher.next_due() is None


def test_writes_that_make_something_due_sooner_wake_the_sweep(world: World):
    """A new visit, an edit, a check-in, an ack and a help request each wake the sweep."""
    woken: list[int] = []
    world.write_calendar(home_visit())
    service = world.service()
    watcher = Watcher(service.store, service.config, service.clock, wake=lambda: woken.append(1))
    service.watcher = service.syncer.watcher = watcher
    service.sync_all()
    assert len(woken) == 1
    service.sync_all()  # nothing changed: nothing to wake for
    assert len(woken) == 1
    world.at(START + MIN)
    service.sweep()
    watcher.actions.acknowledge(VISIT, by="Maria Jones")
    watcher.actions.check_in(VISIT, by="Asha Khan", extend=timedelta(minutes=10))
    watcher.actions.request_help(VISIT, by="Asha Khan")  # (an extension after help is refused)
    assert len(woken) == 4
