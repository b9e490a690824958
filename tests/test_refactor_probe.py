"""Issue 8 must not change behaviour: what the refactor kept, and where it drifted from 3cbda88.

Each expectation below was observed by running the same scenario through the pre-refactor
commit 3cbda88 and through this tree (tests/probe_driver.py, tests/probe_graph.py print what
people see, for a diff between two checkouts). A hostile probe found the refactor had lost
some of 3cbda88's behaviour (one unreadable visit row stopped the whole sweep; blank
secret_expires and single-label senders no longer loaded); these tests keep it found.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import STAFF, T0, World, home_visit, tick
from visitwatch.daemon import cli
from visitwatch.daemon import clock as clock_module
from visitwatch.daemon.config import ConfigError, load_config
from visitwatch.daemon.entries import visit_id

Run = Callable[..., tuple[int, str, str]]

START, DEADLINE = T0 + timedelta(hours=1), T0 + timedelta(hours=2)


@pytest.fixture
def run(world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """``visitwatch --config <world> ARGS`` in this process, at the world's clock."""
    monkeypatch.setattr(clock_module.SystemClock, "now", lambda self: world.clock.now())
    config = str(world.write_config())

    def go(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            status = cli.main(["--config", config, *argv])
        except SystemExit as stop:
            status = stop.code if isinstance(stop.code, int) else 2
        out, err = capsys.readouterr()
        return status, out, err

    return go


def corrupt(world: World, uid: str, assignment: str) -> None:
    """Change one stored visit row behind the daemon's back (another version, a hand edit)."""
    service = world.service()
    with service.store.transaction() as conn:
        conn.execute(f"UPDATE visits SET {assignment} WHERE id = ?", (visit_id("team", uid, ""),))


# A finding as a later release might store it: one more field than this release's Finding.
FINDING_WITH_MORE = json.dumps(
    [{"rule": "x", "severity": "warning", "message": "m", "clause": "c", "fix": "y"}]
)


# --------------------------------------------------------------------------- preserved


def test_cli_refusals_read_as_before(world: World, run: Run):
    """Unknown visit, short prefix, unknown #N, check-in before start and after resolution
    print 3cbda88's words with exit status 2, never a traceback."""
    world.write_calendar(
        home_visit("visit-1"),
        home_visit("later", start=T0 + timedelta(hours=6), end=T0 + timedelta(hours=7)),
    )
    assert run("sync")[0] == 0
    v1, later = visit_id("team", "visit-1", ""), visit_id("team", "later", "")
    expected = {
        ("checkin", "zzzzzz"): "no visit 'zzzzzz'; `visitwatch status` lists them",
        ("checkin", "ab"): "give at least 4 characters of the visit id, not 'ab'",
        ("ack", "#999", "--by", "Maria"): "no alert #999; `visitwatch status` lists the visits",
        ("ack", "#abc", "--by", "Maria"): "no alert #abc; `visitwatch status` lists the visits",
        ("checkin", later[:6].upper()): f"cannot check in visit {later} yet: it starts at",
    }
    for argv, words in expected.items():
        status, _out, err = run(*argv)
        assert (status, "Traceback" in err) == (2, False), argv
        assert err.startswith(f"visitwatch: {words}"), (argv, err)
    world.at(DEADLINE + timedelta(minutes=16))
    assert run("sync")[0] == 0
    status, out, _ = run("ack", v1, "--by", "Maria Jones", "--safe")
    assert (status, out) == (
        0,
        f"visit {v1} resolved: confirmed safe by Maria Jones; all clear sent\n",
    )
    assert run("checkin", v1)[1:] == (
        "",
        f"visitwatch: visit {v1} is already resolved; nothing to check in\n",
    )


def test_a_row_written_before_the_refactor_is_escalated(world: World):
    """A row as 3cbda88 left it (categories, removed_at, extended_until NULL, acknowledged
    earlier) is read by Visit.from_row and goes up the ladder as before."""
    world.write_calendar(home_visit())
    tick(world.service())
    corrupt(world, "visit-1", "categories = NULL, removed_at = NULL, extended_until = NULL")
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=50))
    tick(service)
    assert [m["kind"] for m in world.messages()] == ["reminder", "overrun", "escalation"]


# --------------------------------------------------------------------------- regressions


def test_one_unreadable_visit_does_not_silence_the_others(world: World):
    """A row this release cannot read (a finding with a field it does not know) must not stop
    the reminder of another visit, nor the check-in of that visit."""
    world.write_calendar(home_visit("good"), home_visit("odd", end=DEADLINE + timedelta(minutes=5)))
    tick(world.service())
    corrupt(world, "odd", f"findings = '{FINDING_WITH_MORE}'")
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=1))
    try:
        tick(service)
    finally:
        reminded = [m["subject"] for m in world.messages("reminder")]
        assert reminded == ["Check in: your home visit was due to end at Mon 23 Nov 14:00 (GMT)"]


def test_one_unreadable_visit_does_not_stop_its_calendar_being_read(world: World):
    """A calendar edit to another visit is still applied when one stored row is unreadable."""
    world.write_calendar(home_visit("good"), home_visit("odd"))
    tick(world.service())
    corrupt(world, "odd", f"findings = '{FINDING_WITH_MORE}'")
    world.write_calendar(home_visit("good", end=DEADLINE + timedelta(hours=1)), home_visit("odd"))
    world.at(START)
    service = world.service()
    reports = service.sync_all()
    assert [r.ok for r in reports] == [True]
    row = service.store.one(
        "SELECT deadline FROM visits WHERE id = ?", (visit_id("team", "good", ""),)
    )
    assert row is not None
    assert row["deadline"].startswith("2026-11-23T15:00")


def test_an_unparseable_deadline_reaches_an_admin_and_the_others_escalate(world: World):
    """A hand-edited deadline ('2026-11-23 14:05:00') gets the admin notice; the other visit's
    overrun still goes out."""
    world.write_calendar(home_visit("good"), home_visit("odd"))
    tick(world.service())
    corrupt(world, "odd", "deadline = '2026-11-23 14:05:00'")
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=20))
    try:
        tick(service)
    finally:
        assert len(world.messages("overrun")) == 1
        assert [m["subject"] for m in world.messages("admin")] == [
            "visitwatch: a visit cannot be watched"
        ]


def _config(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "visitwatch.toml"
    (tmp_path / "calendar.ics").write_text("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nEND:VCALENDAR\r\n")
    path.write_text(
        '[daemon]\ndatabase = "v.db"\n'
        + STAFF
        + '[[sources]]\nname = "team"\ntype = "ics"\npath = "calendar.ics"\n'
        + '[[channels]]\nname = "outbox"\ntype = "outbox"\npath = "outbox.jsonl"\n'
        + extra
        + '\n[policy]\npreset = "pan-lancashire"\n',
        encoding="utf-8",
    )
    return path


GRAPH_MAIL = (
    '[[channels]]\nname = "outlook"\ntype = "graph_mail"\ntenant_id = "t"\nclient_id = "c"\n'
    'client_secret = { env = "VW_PROBE_SECRET" }\nsender = "vw@example.org"\n'
)


def test_an_empty_secret_expires_still_means_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A Graph block with secret_expires = "" loads, as it did before the refactor."""
    monkeypatch.setenv("VW_PROBE_SECRET", "x")
    config = load_config(_config(tmp_path, GRAPH_MAIL + 'secret_expires = ""\n'))
    assert [c.name for c in config.channels] == ["outbox", "outlook"]


def test_an_smtp_sender_on_a_single_label_domain_still_loads(tmp_path: Path):
    """sender = "alerts@mailhub" is a working address on an internal relay; it loads."""
    smtp = '[[channels]]\nname = "mail"\ntype = "smtp"\nhost = "127.0.0.1"\n'
    config = load_config(_config(tmp_path, smtp + 'sender = "alerts@mailhub"\n'))
    assert [c.name for c in config.channels] == ["outbox", "mail"]


@pytest.mark.parametrize("url", ["https://[calendar.example.org/feed.ics", "http://[::1/x"])
def test_a_malformed_url_is_a_config_problem_not_a_traceback(tmp_path: Path, url: str):
    """An ICS url with a broken IPv6 bracket is reported against its key."""
    path = _config(tmp_path, "")
    path.write_text(
        path.read_text().replace('path = "calendar.ics"', f'url = "{url}"'), encoding="utf-8"
    )
    try:
        load_config(path)
    except ConfigError as err:
        assert "sources[0].url" in str(err)
        assert "calendar.example.org" not in str(err)  # only the scheme is ever shown
    except ValueError as err:
        raise AssertionError(f"traceback: {err!r}") from err
    else:
        raise AssertionError("loaded")
