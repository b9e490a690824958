"""From a calendar entry to reminders, manager alerts, escalation and the all clear.

Each test runs once per kind of calendar source, from the same entries: an .ics file, an
.ics feed over loopback HTTP, and Microsoft Graph (``tests/calendar_feeds.py``). A real
SQLite database and the real outbox channel; only time is moved.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta

import pytest

from tests.calendar_feeds import SOURCE_KINDS
from tests.conftest import MANAGER_AND_DIRECTOR, T0, World, home_visit, ics_event, tick
from visitwatch.daemon.entries import visit_id
from visitwatch.daemon.visits import ActionError

START = T0 + timedelta(hours=1)  # 13:00
DEADLINE = T0 + timedelta(hours=2)  # 14:00, the entry's end
MIN = timedelta(minutes=1)
VISIT = visit_id("team", "visit-1", "")

pytestmark = pytest.mark.sources(*SOURCE_KINDS)


def test_overrun_reminds_worker_then_alerts_manager_then_escalates(world: World):
    """No check-in: reminder at the deadline, manager at +15, director at +45, then repeats."""
    world.write_calendar(home_visit())
    service = world.service()
    for moment in (T0, START, DEADLINE - MIN):
        world.at(moment)
        tick(service)
    assert world.messages() == []

    world.at(DEADLINE)
    tick(service)
    assert world.recipients("reminder") == ["asha.khan@example.org"]

    world.at(DEADLINE + timedelta(minutes=14))
    tick(service)
    assert world.messages("overrun") == []
    world.at(DEADLINE + timedelta(minutes=15))
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]

    world.at(DEADLINE + timedelta(minutes=45))
    tick(service)
    assert world.recipients("escalation") == ["sam.webster@example.org"]
    world.at(DEADLINE + timedelta(minutes=60))
    tick(service)
    assert world.recipients("escalation") == ["sam.webster@example.org"] * 2
    state = service.store.one("SELECT state FROM visits WHERE id = ?", (VISIT,))["state"]
    assert state == "escalated"


def test_manager_alert_says_who_where_since_when_and_how_to_acknowledge(world: World):
    """The overrun alert carries worker, mobile, address, times, lateness, RA and the ack command."""
    world.write_calendar(home_visit(description="RA: RA-0113\nReturn by: 14:30"))
    service = world.service()
    world.at(START)
    tick(service)
    world.at(DEADLINE + timedelta(minutes=30 + 17))  # 14:47: 17 minutes past 14:30
    tick(service)
    [alert] = world.messages("overrun")
    text = alert["text"]
    for expected in (
        "Asha Khan",
        "07700 900123",
        "14 Brook Street, Preston PR1 3XX",
        "Mon 23 Nov 13:00",
        "Mon 23 Nov 14:30",
        "17 minutes",
        "RA-0113",
        f"visitwatch ack {VISIT}",
        "Team Manager to contact worker",
    ):
        assert expected in text, expected
    assert "17 min" in alert["subject"]


def test_check_in_before_the_deadline_resolves_early_and_nothing_is_sent(world: World):
    """A worker who checks in on time hears nothing more, and neither does anyone else."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START + timedelta(minutes=50))
    tick(service)
    service.watcher.actions.check_in(VISIT, by="Asha Khan")
    for minutes in (0, 15, 45, 120):
        world.at(DEADLINE + timedelta(minutes=minutes))
        tick(service)
    assert world.messages() == []
    row = service.store.one("SELECT state, checked_in_by FROM visits WHERE id = ?", (VISIT,))
    assert row == {"state": "resolved", "checked_in_by": "Asha Khan"}


def test_check_in_after_the_alert_sends_the_all_clear_to_everyone_alerted(world: World):
    """Once the manager and director were alerted, a check-in tells both that the worker is safe."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=50))
    tick(service)
    service.watcher.actions.check_in(VISIT[:6], by="Asha Khan")  # a unique prefix is enough
    service.dispatch()
    assert sorted(world.recipients("all_clear")) == MANAGER_AND_DIRECTOR
    world.at(DEADLINE + timedelta(hours=3))
    tick(service)
    assert len(world.messages("escalation")) == 1  # no repeats after the check-in


def test_extension_moves_the_deadline_and_restarts_the_ladder(world: World):
    """`checkin --extend 30m` after the reminder: no manager alert at +15, a new reminder at +35."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + 5 * MIN)
    tick(service)
    assert len(world.messages("reminder")) == 1
    service.watcher.actions.check_in(VISIT, by="Asha Khan", extend=timedelta(minutes=30))
    world.at(DEADLINE + timedelta(minutes=20))
    tick(service)
    assert world.messages("overrun") == []
    world.at(DEADLINE + timedelta(minutes=35))
    tick(service)
    assert len(world.messages("reminder")) == 2
    world.at(DEADLINE + timedelta(minutes=50))
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]


def test_acknowledgement_stops_repeats_and_records_who(world: World):
    """After an ack the 15-minute repeats stop until the ack times out; the record says who."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=46))
    tick(service)
    [alert] = world.messages("escalation")
    service.watcher.actions.acknowledge(f"#{alert['id']}", by="Maria Jones")  # by alert number
    world.at(DEADLINE + timedelta(minutes=75))  # one minute before the ack times out
    tick(service)
    assert len(world.messages("escalation")) == 1
    row = service.store.one("SELECT state, acknowledged_by FROM visits WHERE id = ?", (VISIT,))
    assert row == {"state": "acknowledged", "acknowledged_by": "Maria Jones"}
    # Before this issue an ack silenced the visit for good; now it re-alerts (test_escalation_
    # safety.py covers the timeout in detail).
    world.at(DEADLINE + timedelta(minutes=76))
    tick(service)
    assert sorted(world.recipients("escalation")[1:]) == MANAGER_AND_DIRECTOR
    service.watcher.actions.acknowledge(VISIT, by="Maria Jones", safe=True)
    service.dispatch()
    assert "sam.webster@example.org" in world.recipients("all_clear")


def test_help_request_alerts_the_whole_ladder_at_once(world: World):
    """A help request mid-visit reaches manager and director immediately."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START + 10 * MIN)
    tick(service)
    service.watcher.actions.request_help(VISIT, by="Asha Khan")
    service.dispatch()
    assert sorted(world.recipients("help")) == MANAGER_AND_DIRECTOR


def test_calendar_edit_that_moves_the_return_time_moves_the_deadline(world: World):
    """The office edits "Return by" to 15:00 after the reminder: the ladder waits for 15:00."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + 2 * MIN)
    tick(service)
    assert len(world.messages("reminder")) == 1
    world.write_calendar(home_visit(description="Risk assessment: complete\nReturn by: 15:00"))
    world.at(DEADLINE + timedelta(minutes=20))
    tick(service)
    assert world.messages("overrun") == []
    world.at(DEADLINE + timedelta(minutes=75))
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]


def test_cancelled_entries_stop_monitoring_and_tell_those_alerted(world: World):
    """A cancelled entry ends monitoring; a manager already alerted hears that it ended."""
    world.write_calendar(home_visit(), home_visit("visit-2"))
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    assert len(world.messages("overrun")) == 2
    world.write_calendar(home_visit(status="CANCELLED"), home_visit("visit-2", status="CANCELLED"))
    tick(service)
    states = {r["uid"]: r["state"] for r in service.store.query("SELECT uid, state FROM visits")}
    assert states == {"visit-1": "cancelled", "visit-2": "cancelled"}
    assert len(world.messages("ended")) == 2
    world.at(DEADLINE + timedelta(hours=2))
    tick(service)
    assert world.messages("escalation") == []


def test_removed_booked_entry_stops_monitoring_but_an_overdue_one_is_still_watched(world: World):
    """Removing a booked visit ends it; removing an overdue one does not: the ladder goes on."""
    later = T0 + timedelta(hours=5)
    world.write_calendar(
        home_visit(),
        home_visit("visit-2", start=later, end=later + timedelta(hours=1)),
        home_visit("visit-3", start=later, end=later + timedelta(hours=1)),
        home_visit("visit-4", start=later, end=later + timedelta(hours=1)),
    )
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    world.write_calendar(
        home_visit("visit-3", start=later, end=later + timedelta(hours=1)),
        home_visit("visit-4", start=later, end=later + timedelta(hours=1)),
    )
    tick(service)
    states = {r["uid"]: r["state"] for r in service.store.query("SELECT uid, state FROM visits")}
    assert states["visit-1"] == "overdue" and states["visit-2"] == "cancelled"
    world.at(DEADLINE + timedelta(minutes=46))
    tick(service)
    assert world.recipients("escalation") == ["sam.webster@example.org"]


def test_safe_category_set_in_outlook_checks_the_worker_in(world: World):
    """Setting the "Safe" category on the entry resolves the visit at the next sync."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=20))
    tick(service)
    world.write_calendar(
        home_visit(
            categories=("Home Visit", "Safe"), last_modified=DEADLINE + timedelta(minutes=21)
        )
    )
    world.at(DEADLINE + timedelta(minutes=22))
    tick(service)
    row = service.store.one("SELECT state, checked_in_at FROM visits WHERE id = ?", (VISIT,))
    assert row["state"] == "resolved"
    assert world.recipients("all_clear") == ["maria.jones@example.org"]


def test_missing_risk_assessment_is_told_when_first_seen_and_again_before_start(world: World):
    """A visit without RA: notice to worker and manager on first sight, again 30 min before."""
    world.write_calendar(
        home_visit(
            start=T0 + timedelta(hours=3),
            end=T0 + timedelta(hours=4),
            description="Purpose: review",
        )
    )
    service = world.service()
    tick(service)
    first = world.messages("compliance")
    assert sorted(world.recipients("compliance")) == [
        "asha.khan@example.org",
        "maria.jones@example.org",
    ]
    assert "Risk assessment" in first[0]["text"] or "risk assessment" in first[0]["text"]
    world.at(T0 + timedelta(hours=2, minutes=29))
    tick(service)
    assert len(world.messages("compliance")) == 2
    world.at(T0 + timedelta(hours=2, minutes=30))
    tick(service)
    world.at(T0 + timedelta(hours=2, minutes=40))
    tick(service)
    assert len(world.messages("compliance")) == 4  # once more, to both, and only once


def test_a_broken_entry_is_recorded_and_every_other_visit_is_still_watched(world: World):
    """One unreadable VEVENT becomes a problem row; the good visit still escalates."""
    broken = ics_event("broken-1", "Home visit - Lee", START, DEADLINE).replace(
        "DTSTART:", "DTSTART:not-a-date"
    )
    world.write_calendar(broken, home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]
    problems = service.store.query("SELECT source, uid FROM problems")
    assert problems == [{"source": "team", "uid": "broken-1"}]


def test_an_unreadable_calendar_keeps_its_visits_watched(world: World):
    """When the feed disappears, the error is recorded and the known visit still escalates."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START)
    tick(service)
    world.calendar.unlink()  # over HTTP a 404; in Graph a mailbox that no longer exists
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]
    source = service.store.one("SELECT last_error, failures FROM sources WHERE name = 'team'")
    assert source["failures"] == 1 and world.feed.named_in_errors in source["last_error"]


def test_visit_long_over_at_first_sight_is_recorded_but_not_escalated(world: World):
    """Yesterday's visits found at first start-up are kept in the record without an alert storm."""
    world.write_calendar(home_visit(start=T0 - timedelta(hours=30), end=T0 - timedelta(hours=29)))
    service = world.service()
    tick(service)
    assert world.messages() == []
    row = service.store.one("SELECT state FROM visits")
    assert row["state"] == "expired"


def test_worker_found_from_attendee_on_a_shared_calendar(world: World):
    """On a shared calendar the invited worker gets the reminder and their manager the alert."""
    world.shared = True
    world.write_calendar(home_visit(attendees=("ben.okafor@example.org",)))
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    assert world.recipients("reminder") == ["ben.okafor@example.org"]
    assert "Ben Okafor" in world.messages("overrun")[0]["text"]


def test_check_in_of_a_resolved_visit_is_refused_clearly(world: World):
    """Checking in twice says the visit is already resolved instead of failing obscurely."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START)
    tick(service)
    service.watcher.actions.check_in(VISIT, by="Asha Khan")
    with pytest.raises(ActionError, match="already resolved"):
        service.watcher.actions.check_in(VISIT, by="Asha Khan")
    with pytest.raises(ActionError, match="no visit"):
        service.watcher.actions.check_in("ffffffffffff", by="Asha Khan")
    with pytest.raises(ActionError, match="no alert #999"):
        service.watcher.actions.acknowledge("#999", by="Maria Jones")
    with pytest.raises(ActionError, match="at least 4 characters"):
        service.watcher.actions.check_in("%", by="Asha Khan")


def test_every_transition_is_in_the_append_only_audit(world: World):
    """The record holds each state change with time, cause and actor, and cannot be edited."""
    world.write_calendar(home_visit())
    service = world.service()
    tick(service)
    world.at(START)
    tick(service)
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    service.watcher.actions.check_in(VISIT, by="Asha Khan")
    audit = service.store.query(
        "SELECT to_state, cause, actor FROM audit WHERE visit_id = ? ORDER BY id", (VISIT,)
    )
    assert [a["to_state"] for a in audit] == ["booked", "in_progress", "overdue", "resolved"]
    assert audit[-1]["actor"] == "Asha Khan"
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        service.store.db.conn.execute("DELETE FROM audit")


def test_a_failed_multi_table_write_leaves_nothing_behind(world: World):
    """If writing the notifications fails, the state change is rolled back with them."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START)
    tick(service)
    world.at(DEADLINE + timedelta(minutes=16))

    def broken_notify(*args, **kwargs):
        raise RuntimeError("disk full")

    service.watcher.router.notify = broken_notify  # type: ignore[method-assign]
    service.sweep()  # logs the failure, tells an admin, and moves on
    row = service.store.one("SELECT state, step FROM visits WHERE id = ?", (VISIT,))
    assert row == {"state": "in_progress", "step": 0}
    assert service.store.query("SELECT * FROM notifications WHERE kind != 'admin'") == []
    [notice] = service.store.query("SELECT recipient_id, text FROM notifications")
    assert notice["recipient_id"] == "sam.webster@example.org" and VISIT in notice["text"]
    del service.watcher.router.notify
    world.at(DEADLINE + timedelta(minutes=17))
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]


def test_findings_are_stored_with_their_policy_clause(world: World):
    """The record keeps each finding with rule, severity, message and the clause it comes from."""
    world.write_calendar(home_visit(description="", location=""))
    service = world.service()
    tick(service)
    findings = json.loads(service.store.one("SELECT findings FROM visits")["findings"])
    rules = {f["rule"] for f in findings}
    assert {"risk_assessment_missing", "address_missing"} <= rules
    assert all(f["clause"] for f in findings if f["rule"] in rules)


@pytest.mark.sources("ics-file")  # about two sources of different kinds side by side
def test_unreachable_microsoft_365_does_not_stop_other_calendars(
    world: World, monkeypatch: pytest.MonkeyPatch
):
    """A Graph source whose Entra cannot be reached fails on its own; ICS visits still escalate."""
    from tests.mailserver import free_port

    monkeypatch.setenv("GRAPH_SECRET", "not-a-real-secret")
    port = free_port()
    world.sources = f"""
[[sources]]
name = "team"
type = "ics"
path = "calendar.ics"
owner = "asha.khan@example.org"

[[sources]]
name = "outlook"
type = "graph"
tenant_id = "contoso"
client_id = "visitwatch"
client_secret = {{ env = "GRAPH_SECRET" }}
authority_host = "https://127.0.0.1:{port}"
graph_url = "https://127.0.0.1:{port}/v1.0"
mailboxes = ["asha.khan@example.org"]
timeout = "2s"
"""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    assert world.recipients("overrun") == ["maria.jones@example.org"]
    outlook = service.store.one("SELECT last_error FROM sources WHERE name = 'outlook'")
    assert "cannot reach Entra" in outlook["last_error"]
    assert "not-a-real-secret" not in outlook["last_error"]
