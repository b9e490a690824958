"""A calendar never silently hides or removes a visit (issue 7): the sync's side.

Real ICS files, a real SQLite database and the real outbox; only time is moved.
"""

from __future__ import annotations

import textwrap
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import structlog

from tests.conftest import T0, World, home_visit, ics_event, tick
from visitwatch.core.calendar import FetchResult, TimeWindow
from visitwatch.daemon import cli
from visitwatch.daemon.config import ConfigError, load_config
from visitwatch.daemon.entries import visit_id

START = T0 + timedelta(hours=1)  # 13:00
DEADLINE = T0 + timedelta(hours=2)  # 14:00
MIN = timedelta(minutes=1)


def later_visit(uid: str, hours: int) -> str:
    """A visit by Asha Khan starting ``hours`` after T0, an hour long."""
    return home_visit(uid, start=T0 + timedelta(hours=hours), end=T0 + timedelta(hours=hours + 1))


def states(world: World, service) -> dict[str, str]:
    rows = service.store.query("SELECT uid, state FROM visits")
    return {r["uid"]: r["state"] for r in rows}


def admin(world: World, word: str) -> list[dict]:
    return [m for m in world.messages("admin") if word in m["subject"] + m["text"]]


# --------------------------------------------------------------------------- point 3


def test_empty_calendar_is_held_nothing_ended_and_an_admin_is_told(world: World):
    """An empty read ends nothing (the overdue visit keeps escalating); an admin hears how to confirm."""
    world.write_calendar(home_visit(), later_visit("v2", 5), later_visit("v3", 6))
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=50))
    tick(service)
    assert world.messages("escalation")
    world.write_calendar()
    world.clock.advance(MIN)
    tick(service)
    assert set(states(world, service).values()) - {"booked"} == {"escalated"}
    assert world.messages("ended") == []
    [notice] = admin(world, "sources confirm team")
    assert "3" in notice["text"] and "'team'" in notice["subject"]
    escalations = len(world.messages("escalation"))
    world.clock.advance(timedelta(minutes=15))
    tick(service)
    assert len(world.messages("escalation")) > escalations  # still escalating
    assert len(admin(world, "sources confirm team")) == 1  # told once per hold


def test_held_removal_is_applied_when_the_same_read_repeats_for_the_hold_time(world: World):
    """After removal_hold (30 min) of the same empty read, booked visits are ended."""
    world.write_calendar(later_visit("v1", 5), later_visit("v2", 6), later_visit("v3", 7))
    service = world.service()
    tick(service)
    world.write_calendar()
    for minutes in (1, 10, 20, 30):
        world.at(T0 + timedelta(minutes=minutes))
        tick(service)
        assert set(states(world, service).values()) == {"booked"}, minutes
    world.at(T0 + timedelta(minutes=31))
    tick(service)
    assert set(states(world, service).values()) == {"cancelled"}


def test_admin_confirms_a_held_removal_from_the_command_line(world: World, capsys):
    """`visitwatch sources confirm team` applies the held read at the next poll."""
    world.write_calendar(later_visit("v1", 5), later_visit("v2", 6), later_visit("v3", 7))
    service = world.service()
    tick(service)
    world.write_calendar()
    world.clock.advance(MIN)
    tick(service)
    assert cli.main(["--config", str(world.config_file), "status"]) == 0
    assert "HELD" in capsys.readouterr().out
    assert cli.main(["--config", str(world.config_file), "sources", "confirm", "team"]) == 0
    world.clock.advance(MIN)
    tick(service)
    assert set(states(world, service).values()) == {"cancelled"}
    assert cli.main(["--config", str(world.config_file), "sources", "confirm", "team"]) == 2


def test_small_removal_is_applied_at_once(world: World):
    """Removing one of four booked visits is an ordinary edit: ended at the next read."""
    visits = [later_visit(f"v{i}", 3 + i) for i in range(4)]
    world.write_calendar(*visits)
    service = world.service()
    tick(service)
    world.write_calendar(*visits[1:])
    world.clock.advance(MIN)
    tick(service)
    assert states(world, service)["v0"] == "cancelled"
    assert world.messages("admin") == []


def test_removal_guard_share_is_configurable(world: World):
    """With removal_guard = 0.2 and removal_guard_min = 1, removing one of four is held."""
    world.daemon = "removal_guard = 0.2\nremoval_guard_min = 1\n"
    visits = [later_visit(f"v{i}", 3 + i) for i in range(4)]
    world.write_calendar(*visits)
    service = world.service()
    tick(service)
    world.write_calendar(*visits[1:])
    world.clock.advance(MIN)
    tick(service)
    assert states(world, service)["v0"] == "booked"
    assert admin(world, "sources confirm team")


def test_a_source_can_set_its_own_removal_hold(world: World):
    """removal_hold = "5m" on the source: the held empty read applies after five minutes."""
    world.sources = textwrap.dedent("""
        [[sources]]
        name = "team"
        type = "ics"
        path = "calendar.ics"
        owner = "asha.khan@example.org"
        removal_hold = "5m"
    """)
    world.write_calendar(later_visit("v1", 5), later_visit("v2", 6))
    service = world.service()
    tick(service)
    world.write_calendar()
    world.at(T0 + MIN)
    tick(service)
    assert set(states(world, service).values()) == {"booked"}
    world.at(T0 + 7 * MIN)
    tick(service)
    assert set(states(world, service).values()) == {"cancelled"}


def test_overdue_visit_removed_from_calendar_keeps_escalating_and_people_are_asked(world: World):
    """Removed while overdue: not ended; worker and manager asked if she is safe; ladder goes on."""
    world.write_calendar(home_visit(), later_visit("v2", 5))
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    world.write_calendar(later_visit("v2", 5))
    world.clock.advance(MIN)
    tick(service)
    assert states(world, service)["visit-1"] == "overdue"
    asked = [
        m for m in world.messages() if "removed from the calendar while in progress" in m["text"]
    ]
    assert {m["recipient"]["id"] for m in asked} == {
        "asha.khan@example.org",
        "maria.jones@example.org",
    }
    vid = visit_id("team", "visit-1", "")
    causes = [
        r["cause"]
        for r in service.store.query("SELECT cause FROM audit WHERE visit_id = ?", (vid,))
    ]
    assert "removed_from_calendar" in causes
    world.at(DEADLINE + timedelta(minutes=46))
    tick(service)
    assert world.messages("escalation")
    world.clock.advance(MIN)
    tick(service)
    assert len(asked) == len(
        [m for m in world.messages() if "removed from the calendar while in progress" in m["text"]]
    )  # asked once
    assert (
        cli.main(["--config", str(world.config_file), "ack", vid, "--by", "Maria", "--safe"]) == 0
    )
    assert states(world, service)["visit-1"] == "resolved"


def test_overdue_visit_no_longer_marked_as_a_visit_is_still_watched(world: World):
    """An overdue entry edited into a team meeting: not ended, the worker is asked."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    world.write_calendar(ics_event("visit-1", "Team meeting", START, DEADLINE, categories=()))
    world.clock.advance(MIN)
    tick(service)
    assert states(world, service)["visit-1"] == "overdue"
    assert [m for m in world.messages("removed") if m["recipient"]["id"] == "asha.khan@example.org"]
    world.at(DEADLINE + timedelta(minutes=46))
    tick(service)
    assert world.messages("escalation")


def test_in_progress_visit_removed_is_still_watched(world: World):
    """Removed during the visit: the worker is asked, and the deadline still raises the reminder."""
    world.write_calendar(home_visit(), later_visit("v2", 5))
    service = world.service()
    world.at(START + timedelta(minutes=10))
    tick(service)
    world.write_calendar(later_visit("v2", 5))
    world.clock.advance(MIN)
    tick(service)
    assert states(world, service)["visit-1"] == "in_progress"
    assert [m["recipient"]["id"] for m in world.messages() if "is Asha Khan safe" in m["subject"]]
    world.at(DEADLINE)
    tick(service)
    assert world.messages("reminder")


# --------------------------------------------------------------------------- point 4


def write_source(world: World, body: str) -> Path:
    world.sources = textwrap.dedent(body)
    return world.write_config()


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('type = "ics"\n', "sources[0].url", "exactly one of url or path"),
        (
            'type = "ics"\npath = "calendar.ics"\nurl = "https://example.org/c.ics"\n',
            "sources[0].url",
            "exactly one of url or path",
        ),
        ('type = "ics"\nurl = "ftp://example.org/c.ics"\n', "sources[0].url", "http"),
        ('type = "ics"\npath = "c.ics"\nparse_budget = "0s"\n', "sources[0].parse_budget", "zero"),
        ('type = "ics"\npath = "c.ics"\ntimeout = "0s"\n', "sources[0].timeout", "zero"),
        ('type = "ics"\npath = "c.ics"\nmax_bytes = 0\n', "sources[0].max_bytes", "1 or more"),
        (
            'type = "graph"\ntenant_id = ""\nclient_id = "x"\nmailboxes = ["a@example.org"]\n'
            'client_secret = { env = "VW_TEST_SECRET" }\n',
            "sources[0].tenant_id",
            "tenant",
        ),
    ],
)
def test_a_source_that_cannot_be_built_is_a_config_problem(
    world: World, monkeypatch: pytest.MonkeyPatch, body: str, key: str, words: str
):
    """Neither/both of url and path, an ftp URL, an empty tenant: config errors with the key."""
    monkeypatch.setenv("VW_TEST_SECRET", "s")
    path = write_source(world, '[[sources]]\nname = "team"\n' + body)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and words in str(err.value)
    assert "example.org/c.ics" not in str(err.value)  # a feed's address may be its secret


def test_a_source_that_fails_while_running_is_an_admin_notice_once(world: World):
    """A source the daemon could not build is told to an admin once, not on every sweep."""
    world.write_calendar(home_visit())
    service = world.service()
    service.source_errors["outlook"] = "certificate file is missing"
    service.health.source_errors = service.source_errors
    tick(service)
    tick(service)
    [notice] = admin(world, "outlook")
    assert "certificate file is missing" in notice["text"]


# --------------------------------------------------------------------------- point 5


def test_failing_source_reaches_an_admin_after_two_failed_reads(world: World):
    """No visit under way: two failed reads (within two poll intervals) raise the notice."""
    world.write_calendar(later_visit("v1", 8))
    service = world.service()
    tick(service)
    world.calendar.unlink()
    world.clock.advance(timedelta(minutes=5))
    tick(service)
    assert world.messages("admin") == []
    world.clock.advance(timedelta(minutes=5))
    tick(service)
    assert len(admin(world, "cannot be read")) == 1


def test_failing_source_reaches_an_admin_at_once_when_a_visit_is_under_way(world: World):
    """A visit in progress from the source: the first failed read raises the notice."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START + MIN)
    tick(service)
    world.calendar.unlink()
    world.clock.advance(MIN)
    tick(service)
    assert len(admin(world, "cannot be read")) == 1


# --------------------------------------------------------------------------- point 8


def test_duplicate_uid_and_start_is_a_problem_not_a_traceback(world: World):
    """A second entry with the same UID and start: a recorded problem, no error-level log."""
    world.write_calendar(home_visit(), later_visit("v2", 5))
    service = world.service()
    source = service.sources["team"]
    real_fetch = source.fetch

    def doubled(window: TimeWindow, known: str | None = None) -> FetchResult:
        # As a meeting read from two mailboxes (Graph) or a feed listing an entry twice.
        result = real_fetch(window, known)
        result.events.append(replace(result.events[0], subject="Home visit - copy"))
        return result

    source.fetch = doubled  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        tick(service)
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    problems = service.store.query("SELECT uid, reason FROM problems")
    assert [p["uid"] for p in problems] == ["visit-1"]
    assert "twice" in problems[0]["reason"]
    assert set(states(world, service)) == {"visit-1", "v2"}


# --------------------------------------------------------------------------- point 9


def test_safe_category_copied_in_before_the_start_is_no_check_in(world: World):
    """'Safe' already on the entry before the start does not resolve it, even if edited later."""
    world.write_calendar(home_visit(categories=("Home Visit", "Safe")))
    service = world.service()
    tick(service)
    world.at(START + MIN)
    # Write-back or any edit bumps LAST-MODIFIED after the start: still no check-in.
    world.write_calendar(home_visit(categories=("Home Visit", "Safe"), last_modified=START + MIN))
    tick(service)
    assert states(world, service)["visit-1"] == "in_progress"
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    assert world.messages("overrun")
    assert world.messages("all_clear") == []


def test_safe_category_added_after_the_start_checks_in(world: World):
    """'Safe' absent at the last read and present after the start resolves the visit."""
    world.write_calendar(home_visit())
    service = world.service()
    world.at(START + MIN)
    tick(service)
    world.write_calendar(home_visit(categories=("Home Visit", "Safe")))  # no LAST-MODIFIED
    world.clock.advance(MIN)
    tick(service)
    assert states(world, service)["visit-1"] == "resolved"


def test_help_category_present_before_start_does_not_raise_help(world: World):
    """'Help' set long before the visit does not fire the help ladder at the start."""
    world.write_calendar(home_visit(categories=("Home Visit", "Help")))
    service = world.service()
    tick(service)
    world.at(START + MIN)
    world.write_calendar(home_visit(categories=("Home Visit", "Help"), last_modified=START))
    tick(service)
    assert world.messages("help") == []


# --------------------------------------------------------------------------- point 1


def test_incomplete_read_never_ends_a_visit_and_repeats_reach_an_admin(world: World):
    """A read cut short (time budget) ends nothing, records a problem, and twice tells an admin."""
    world.write_calendar(later_visit("v1", 5), later_visit("v2", 6))
    service = world.service()
    tick(service)
    source = service.sources["team"]
    real_fetch = source.fetch

    def cut_short(window: TimeWindow, known: str | None = None) -> FetchResult:
        result = real_fetch(window, None)
        return FetchResult(result.events[:0], result.problems, False, result.fingerprint)

    source.fetch = cut_short  # type: ignore[method-assign]
    world.write_calendar(later_visit("v1", 5))
    world.clock.advance(MIN)
    tick(service)
    assert set(states(world, service).values()) == {"booked"}
    problems = service.store.query("SELECT uid, reason FROM problems")
    assert any("incomplete" in p["reason"] for p in problems)
    assert admin(world, "incomplete") == []
    world.clock.advance(timedelta(minutes=5))
    tick(service)
    assert len(admin(world, "incomplete")) == 1
    assert set(states(world, service).values()) == {"booked"}


def test_a_visit_removed_then_back_in_the_calendar_is_watched_again(world: World):
    """A booked visit deleted (and cancelled), then restored: watched again, alerts on time."""
    keep = home_visit("keep", start=T0 + timedelta(hours=3), end=T0 + timedelta(hours=4))
    back = home_visit("back")  # 13:00 to 14:00
    world.write_calendar(keep, back)
    service = world.service()
    tick(service)
    world.write_calendar(keep)  # someone deletes it by mistake ...
    tick(service)
    row = service.store.one("SELECT * FROM visits WHERE uid = 'back'")
    assert row["state"] == "cancelled"
    world.write_calendar(keep, back)  # ... and restores it (Outlook "undo delete")
    tick(service)
    row = service.store.one("SELECT * FROM visits WHERE uid = 'back'")
    assert row["state"] == "booked"
    causes = [a["cause"] for a in service.store.query(
        "SELECT cause FROM audit WHERE visit_id = ? ORDER BY id", (row["id"],)
    )]  # fmt: skip
    assert causes[-1] == "re-opened: back in the calendar"
    world.at(T0 + timedelta(hours=2, seconds=5))
    tick(service)
    assert [m["recipient"]["id"] for m in world.messages("reminder")] == ["asha.khan@example.org"]


def test_an_unreadable_entry_is_logged_without_the_feed_text_it_quotes(world: World):
    """A damaged line quoting a family's address reaches the log above debug only as a uid."""
    from structlog.testing import capture_logs

    damaged = home_visit("damaged").replace(
        "DTSTART:",
        "DTSTART:20261123T170000ZLOCATION:14 Brook Street - Jane Doe (DV risk)\r\nX-OLD:",
    )
    world.write_calendar(damaged, home_visit("fine"))
    service = world.service()
    with capture_logs() as events:
        tick(service)
    loud = [e for e in events if e["log_level"] in ("info", "warning", "error")]
    assert any(e["event"] == "entry_unreadable" and e["uid"] == "damaged" for e in loud)
    assert not any("Jane Doe" in str(e) or "Brook Street" in str(e) for e in loud)


def test_a_help_category_added_well_before_the_start_raises_help(world: World):
    """Help set on a booked visit (after a first read) alerts at once: it can only raise alerts."""
    world.write_calendar(home_visit())  # starts at 13:00
    service = world.service()
    tick(service)
    world.write_calendar(home_visit(categories=("Home Visit", "Help")))
    world.at(T0 + timedelta(minutes=10))  # 50 minutes before the start
    tick(service)
    assert {m["recipient"]["id"] for m in world.messages("help")} >= {"maria.jones@example.org"}


def test_an_unreadable_new_entry_reaches_an_admin_once(world: World):
    """A new visit with a damaged start is told to an admin by uid, once, not only in status."""
    broken = home_visit("broken").replace("DTSTART:20261123T130000Z", "DTSTART:99991399T990000Z")
    world.write_calendar(home_visit("fine"), broken)
    service = world.service()
    tick(service)
    tick(service)
    notices = [n for n in world.messages("admin") if "cannot be read" in n["subject"]]
    assert len(notices) == 1 and "broken" in notices[0]["text"]
    assert "Brook Street" not in notices[0]["text"]  # the reason (feed text) stays in status
    world.clock.advance(timedelta(minutes=10))
    tick(service)
    assert len([n for n in world.messages("admin") if "cannot be read" in n["subject"]]) == 1
