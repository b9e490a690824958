"""The Lone Working Record export: a visit's whole story (extension, overrun alerts by two
channels, acknowledgement, all clear) from the real sync, sweep and dispatch, read back as
CSV and JSON Lines through the CLI; spreadsheet-safe cells; --team; local-day edges; and
the board's export behind sign-in, for the right roles only, audited."""

from __future__ import annotations

import csv
import io
import json
import os
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import T0, World, home_visit, tick
from tests.test_web_signin import MARIA, SAM, form_csrf, sign_in, web_of
from tests.web_world import enable_web
from visitwatch.daemon.cli import main
from visitwatch.daemon.export import FORMULA_STARTS, safe_cell, team_of
from visitwatch.daemon.service import Service

ASHA = "asha.khan@example.org"
TWO_CHANNELS = textwrap.dedent("""
    [[channels]]
    name = "email"
    type = "outbox"
    path = "outbox.jsonl"

    [[channels]]
    name = "sms"
    type = "outbox"
    path = "sms.jsonl"
    kinds = ["overrun", "escalation", "help"]
""")


def minutes(count: int) -> datetime:
    return T0 + timedelta(minutes=count)


def full_story(world: World) -> tuple[Service, str]:
    """Asha's 13:00-14:00 visit: extended by 30 min, overdue, alerts to Maria by e-mail and
    text, Maria acknowledges, Asha checks in (the all clear goes out)."""
    world.channels = TWO_CHANNELS
    world.write_calendar(home_visit("story"))
    service = world.service()
    actions = service.watcher.actions
    world.at(minutes(90))
    tick(service)
    visit = service.store.one("SELECT id FROM visits")
    assert visit is not None
    vid = visit["id"]
    world.at(minutes(110))
    actions.check_in(vid, via="web", extend=timedelta(minutes=30))
    for at in (150, 165, 166):
        world.at(minutes(at))
        tick(service)
    world.at(minutes(170))
    actions.acknowledge(vid, by="Maria Jones", via="web", person=MARIA)
    world.at(minutes(180))
    actions.check_in(vid)
    tick(service)
    return service, vid


def export(world: World, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    code = main(["--config", str(world.config_file), "--log-level", "error", "export", *args])
    assert code == 0
    return capsys.readouterr().out


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_tells_the_whole_story(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """One CSV row holds the visit, its extension, every state change, both channels'
    alerts and whether they were delivered, the acknowledgement and how it ended."""
    _service, vid = full_story(world)
    (row,) = csv_rows(export(world, capsys, "--from", "2026-11-23", "--to", "2026-11-23"))
    assert row["visit"] == vid and row["worker"] == "Asha Khan" and row["worker_id"] == ASHA
    assert row["subject"] == "Home visit - Carter family"
    assert row["address"] == "14 Brook Street, Preston PR1 3XX"
    assert row["start"] == "2026-11-23T13:00:00+00:00"
    assert row["expected_return"] == "2026-11-23T14:00:00+00:00"
    assert row["deadline"] == "2026-11-23T14:30:00+00:00"
    assert row["extensions"] == "13:50 +30 min by Asha Khan via web"
    changes = row["state_changes"]
    assert "-> in_progress" in changes and "-> due" in changes and "-> overdue" in changes
    assert "14:50 overdue -> acknowledged (acknowledged; Maria Jones)" in changes
    notes = row["notifications"]
    assert "14:30 reminder to Asha Khan (worker) by email (sent 14:30)" in notes
    assert "14:45 overrun to Maria Jones (manager) by email (sent 14:45)" in notes
    assert "14:45 overrun to Maria Jones (manager) by sms (sent 14:45)" in notes
    assert "15:00 all_clear to Maria Jones (manager) by email (sent 15:00)" in notes
    assert row["check_ins"].endswith("15:00 checkin by Asha Khan via cli")
    assert (row["acknowledged_by"], row["acknowledged_at"]) == (
        "Maria Jones",
        "2026-11-23T14:50:00+00:00",
    )
    assert row["outcome"] == "checked in by Asha Khan via cli"
    assert row["ended_at"] == "2026-11-23T15:00:00+00:00" and row["minutes_late"] == "30"


def test_jsonl_keeps_the_structure(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """JSON Lines keeps lists as lists: each alert with its channel and delivery."""
    full_story(world)
    out = export(world, capsys, "--from", "2026-11-23", "--to", "2026-11-23", "--format", "jsonl")
    (record,) = [json.loads(line) for line in out.splitlines()]
    overruns = [n for n in record["notifications"] if n["kind"] == "overrun"]
    assert {(n["to"], n["channel"], n["delivered"]) for n in overruns} == {
        ("Maria Jones", "email", True),
        ("Maria Jones", "sms", True),
    }
    assert overruns[0]["sent_at"] == "2026-11-23T14:45:00+00:00"
    assert record["extensions"] == [
        {"at": "2026-11-23T13:50:00+00:00", "minutes": 30, "by": "Asha Khan", "via": "web"}
    ]
    assert record["acknowledged"] == {"by": "Maria Jones", "at": "2026-11-23T14:50:00+00:00"}
    assert [c["to"] for c in record["state_changes"]][-1] == "resolved"


def test_export_is_audited_and_the_file_private(
    world: World, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--output writes a 0600 file whatever the umask, and the audit says who exported what."""
    service, _vid = full_story(world)
    target = tmp_path / "record.csv"
    old = os.umask(0o022)
    try:
        export(world, capsys, "--from", "2026-11-23", "--to", "2026-11-24", "-o", str(target))
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o600
    assert len(csv_rows(target.read_text())) == 1
    line = service.store.one("SELECT * FROM audit WHERE cause = 'record exported'")
    assert line is not None and line["actor"].endswith("(cli)")
    assert json.loads(line["detail"])["first"] == "2026-11-23"


def test_cells_a_spreadsheet_would_run_are_neutralised(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """A subject, address, worker or actor starting with =, +, -, @, tab or CR is exported
    with a leading quote, so a spreadsheet shows it instead of running it."""
    service, vid = full_story(world)
    service.store.db.conn.execute(
        "UPDATE visits SET subject = ?, address = ?, worker_id = '', worker_label = ? WHERE id = ?",
        ('=HYPERLINK("http://evil.example","x")', "+44 1 2", "@SUM(A1)", vid),
    )
    (row,) = csv_rows(export(world, capsys, "--from", "2026-11-23", "--to", "2026-11-23"))
    assert row["subject"] == '\'=HYPERLINK("http://evil.example","x")'
    assert row["address"] == "'+44 1 2"
    assert row["worker"] == "'@SUM(A1)"
    for start in FORMULA_STARTS:
        assert safe_cell(f"{start}cmd") == f"'{start}cmd"
    assert safe_cell("Maria -= Jones") == "Maria -= Jones"  # only a leading character counts


def test_team_is_everyone_down_the_chain(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """--team keeps the visits of people the manager manages, directly or further down."""
    service, vid = full_story(world)
    directory = service.config.directory
    assert team_of(directory, SAM) == {MARIA, ASHA, "ben.okafor@example.org"}
    assert team_of(directory, MARIA) == {ASHA, "ben.okafor@example.org"}
    # Another visit, Sam's own: not in Maria's team, nor in his (he manages, he is not managed).
    row = service.store.one("SELECT * FROM visits WHERE id = ?", (vid,))
    assert row is not None
    row.update(id="sams-visit", uid="sams", worker_id=SAM, worker_label="Sam Webster")
    names = ", ".join(f'"{k}"' for k in row)
    service.store.db.conn.execute(
        f"INSERT INTO visits ({names}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
    )
    days = ("--from", "2026-11-23", "--to", "2026-11-23")

    def workers(*team: str) -> list[str]:
        return [r["worker_id"] for r in csv_rows(export(world, capsys, *days, *team))]

    assert sorted(workers()) == [ASHA, SAM]
    assert workers("--team", MARIA) == [ASHA]
    assert workers("--team", SAM) == [ASHA]
    assert workers("--team", "ben.okafor@example.org") == []
    assert main(["--config", str(world.config_file), "export", *days, "--team", "nobody"]) == 2


def test_days_are_the_organisations_days(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """In summer time a day runs 23:00 to 23:00 UTC: visits starting at 00:30 and 23:30
    London time are in it, 23:30 the evening before and 00:30 the morning after are not."""
    starts = {
        "evening-before": datetime(2026, 6, 9, 22, 30, tzinfo=UTC),
        "just-after-midnight": datetime(2026, 6, 9, 23, 30, tzinfo=UTC),
        "late-evening": datetime(2026, 6, 10, 22, 30, tzinfo=UTC),
        "morning-after": datetime(2026, 6, 10, 23, 30, tzinfo=UTC),
    }
    world.at(datetime(2026, 6, 10, 12, tzinfo=UTC))
    world.write_calendar(
        *(home_visit(uid, start=s, end=s + timedelta(minutes=45)) for uid, s in starts.items())
    )
    world.service().sync_all()
    rows = csv_rows(export(world, capsys, "--from", "2026-06-10", "--to", "2026-06-10"))
    assert [r["start"] for r in rows] == [
        "2026-06-10T00:30:00+01:00",
        "2026-06-10T23:30:00+01:00",
    ]


# ---------------------------------------------------------------------- the board


def test_board_export_needs_sign_in_and_a_manager(world: World) -> None:
    """Signed out: sent to sign in. A worker (even one allowed on the board) is refused.
    A manager downloads their team's CSV, and the audit names them and the days."""
    enable_web(world, board_roles=["manager", "director", "worker"])
    world.write_calendar(home_visit("board"))
    web = web_of(world, world.service())
    tick(web.service)
    signed_out = web.browser()
    assert signed_out.get("/board/export").status_code == 303
    answer = signed_out.post("/board/export", data={"from": "2026-11-23", "to": "2026-11-23"})
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/signin")

    worker = sign_in(web, ASHA, web.browser())
    assert worker.get("/board/export").status_code == 403

    manager = sign_in(web, MARIA)
    page = manager.get("/board/export")
    assert page.status_code == 200 and "Your team" in page.get_data(as_text=True)
    form: dict[str, Any] = {"from": "2026-11-23", "to": "2026-11-23", "csrf": form_csrf(page)}
    assert manager.post("/board/export", data={**form, "csrf": "forged"}).status_code == 400
    download = manager.post("/board/export", data=form)
    assert download.status_code == 200 and download.mimetype == "text/csv"
    assert "attachment" in download.headers["Content-Disposition"]
    (row,) = csv_rows(download.get_data(as_text=True))
    assert row["worker"] == "Asha Khan"
    line = web.service.store.one("SELECT * FROM audit WHERE cause = 'record exported'")
    assert line is not None and line["actor"] == "Maria Jones"
    assert json.loads(line["detail"]) == {
        "via": "web", "format": "csv", "first": "2026-11-23", "last": "2026-11-23",
        "team": MARIA,
    }  # fmt: skip
