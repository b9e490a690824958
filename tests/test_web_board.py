"""The board: today's visits grouped by state, rows a manager can act on, and its actions
(CSRF-protected, recorded as the signed-in person via the web). The day is driven by the
real sync, sweep and dispatch from an .ics calendar; the board is read as a browser gets it."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tests.conftest import T0, World, home_visit, tick
from tests.test_web_signin import MARIA, SAM, Web, form_csrf, sign_in, web_of, web_world
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.web.sessions import COOKIE

NO_RISK_ASSESSMENT = "Mobile: 07700 900123"  # the policy requires a risk assessment


def at(hours: float, minutes: int = 0) -> datetime:
    """A time on the test's Monday (London is on GMT: local equals UTC)."""
    return T0.replace(hour=0) + timedelta(hours=hours, minutes=minutes)


CALENDAR = (
    home_visit("escalated", start=at(9, 30), end=at(10, 45)),
    home_visit("overdue", start=at(10), end=at(11, 40)),
    home_visit("acknowledged", start=at(10), end=at(11, 30)),
    home_visit("due", start=at(11), end=at(11, 55)),
    home_visit("out", start=at(11, 30), end=at(13)),
    home_visit("out-noncompliant", start=at(11, 30), end=at(13), description=NO_RISK_ASSESSMENT),
    home_visit("noncompliant", start=at(14), end=at(15), description=NO_RISK_ASSESSMENT),
    home_visit("booked", start=at(15), end=at(16)),
    home_visit("done", start=at(9, 5), end=at(10)),
    home_visit(
        "private",
        start=at(11, 30),
        end=at(13),
        location="7 Secret Lane, Preston",
        extra="CLASS:PRIVATE",
    ),
    home_visit("yesterday", start=at(-14), end=at(-13)),
)
GROUP_OF = {
    "escalated": "escalated",
    "overdue": "overdue",
    "acknowledged": "acknowledged",
    "due": "due",
    "out": "out",
    "out-noncompliant": "out",
    "private": "out",
    "noncompliant": "noncompliant",
    "booked": "booked",
    "done": "done",
}


@pytest.fixture
def web(world: World, monkeypatch: pytest.MonkeyPatch) -> Web:
    """The day so far: ticked every quarter of an hour from 09:00 to 12:00; then Sam
    acknowledged one overdue visit and Asha checked in from another."""
    web = web_world(world, monkeypatch, *CALENDAR)
    moment = at(9)
    while moment <= T0:
        world.at(moment)
        tick(web.service)
        moment += timedelta(minutes=15)
    actions = web.service.watcher.actions
    actions.acknowledge(visit_id(web, "acknowledged"), by="Sam Webster")
    actions.check_in(visit_id(web, "done"))
    tick(web.service)
    return web


def visit_id(web: Web, uid: str) -> str:
    row = web.service.store.one("SELECT id FROM visits WHERE uid = ?", (uid,))
    assert row, f"visit {uid} is in the record"
    return str(row["id"])


def state_of(web: Web, uid: str) -> VisitState:
    visit = web.service.watcher.visits.get(visit_id(web, uid))
    assert visit is not None
    return visit.state


def sections(page: str) -> dict[str, str]:
    """Each group's HTML, by its key."""
    found = re.findall(r'<section class="group[^"]*" id="([a-z]+)".*?</section>', page, re.S)
    blocks = re.findall(r'<section class="group[^"]*" id="[a-z]+".*?</section>', page, re.S)
    return dict(zip(found, blocks, strict=True))


def row(page: str, vid: str) -> str:
    found = re.search(rf'<li data-visit="{vid}"[^>]*>.*?</li>', page, re.S)
    assert found, f"visit {vid} is on the board"
    return found.group(0)


def board(web: Web) -> str:
    answer = web.client.get("/board")
    assert answer.status_code == 200
    return answer.get_data(as_text=True)


def act(web: Web, uid: str, action: str, csrf: str | None = None) -> tuple[int, str]:
    csrf = form_csrf(web.client.get("/board")) if csrf is None else csrf
    answer = web.client.post(
        "/board/act", data={"csrf": csrf, "visit": visit_id(web, uid), "action": action}
    )
    return answer.status_code, answer.get_data(as_text=True)


def checkins(web: Web, uid: str) -> list[tuple[str, str, str]]:
    rows = web.service.store.query(
        "SELECT action, actor, via FROM checkins WHERE visit_id = ? ORDER BY id",
        (visit_id(web, uid),),
    )
    return [(r["action"], r["actor"], r["via"]) for r in rows]


# ---------------------------------------------------------------------- what it shows


def test_every_visit_of_the_day_in_its_group(web: Web) -> None:
    """Each of today's visits is in exactly the group its state puts it in (escalated,
    overdue, acknowledged, due, out now, non-compliant, later today, done), and
    yesterday's visit is not on the board."""
    assert state_of(web, "escalated") is VisitState.ESCALATED
    assert state_of(web, "overdue") is VisitState.OVERDUE
    assert state_of(web, "due") is VisitState.DUE
    sign_in(web)
    page = board(web)
    groups = sections(page)
    assert list(groups) == [
        "escalated", "overdue", "acknowledged", "due", "out", "noncompliant", "booked", "done",
    ]  # fmt: skip
    for uid, group in GROUP_OF.items():
        where = [
            key for key, html in groups.items() if f'data-visit="{visit_id(web, uid)}"' in html
        ]
        assert where == [group], uid
    assert f'data-visit="{visit_id(web, "yesterday")}"' not in page
    assert "Out now (3)" in page and "Done (1)" in page


def test_rows_say_who_when_how_late_and_who_is_on_it(web: Web) -> None:
    """A row names the worker, the time window, the deadline, minutes overdue and who
    acknowledged, in the organisation's time."""
    sign_in(web)
    page = board(web)
    overdue = row(page, visit_id(web, "overdue"))
    assert "Asha Khan" in overdue and "10:00–11:40" in overdue
    assert "<dt>Deadline</dt><dd>11:40</dd>" in overdue and "20 min overdue" in overdue
    assert 'href="tel:07700900123"' in overdue
    acknowledged = row(page, visit_id(web, "acknowledged"))
    assert "<dt>On it</dt><dd>Sam Webster at 12:00</dd>" in acknowledged
    assert "min overdue" not in row(page, visit_id(web, "out"))
    assert "I&#39;m on it" not in row(page, visit_id(web, "done"))
    assert "I&#39;m on it" not in row(page, visit_id(web, "booked"))


def test_non_compliant_visits(web: Web) -> None:
    """A visit not started without its risk assessment is under "Non-compliant" with what
    is missing; one already under way stays under "Out now", marked non-compliant."""
    sign_in(web)
    page = board(web)
    waiting = row(page, visit_id(web, "noncompliant"))
    assert "Non-compliant" in waiting and "risk assessment" in waiting.lower()
    under_way = row(page, visit_id(web, "out-noncompliant"))
    assert '<span class="tag warn">Non-compliant</span>' in under_way
    assert '<span class="tag warn">' not in row(page, visit_id(web, "out"))


def test_private_entries_hidden(web: Web) -> None:
    """A private entry's subject and address never reach the board; others' do."""
    sign_in(web)
    page = board(web)
    private = row(page, visit_id(web, "private"))
    assert "(private entry)" in private and "Carter" not in private
    assert "Secret Lane" not in page
    assert "Home visit - Carter family" in row(page, visit_id(web, "out"))
    assert "14 Brook Street" in row(page, visit_id(web, "out"))


def test_board_refreshes_itself(web: Web) -> None:
    """Without JavaScript a "Refresh now" link reloads the board; with it, the board reloads
    every 30 seconds unless the reader pauses it (no timed meta refresh: WCAG 2.2.1)."""
    sign_in(web)
    page = board(web)
    assert 'id="refresh-now"' in page and ">Refresh now</a>" in page
    assert "var seconds = 30" in page and 'id="pause-refresh"' in page
    assert 'http-equiv="refresh"' not in page


def test_today_is_the_organisations_day(web: Web) -> None:
    """At 12:00 UTC it is already Tuesday in Auckland: Monday morning's finished visit is
    off that board, while visits still under way stay on it."""
    auckland = web_of(web.world, web.service, timezone=ZoneInfo("Pacific/Auckland"))
    sign_in(auckland)
    page = board(auckland)
    assert f'data-visit="{visit_id(web, "done")}"' not in page
    assert f'data-visit="{visit_id(web, "escalated")}"' in page
    assert f'data-visit="{visit_id(web, "booked")}"' in page  # 04:00 on Tuesday there


# ---------------------------------------------------------------------- its actions


def test_im_on_it_records_the_signed_in_person_via_web(web: Web) -> None:
    """ "I'm on it" acknowledges as the signed-in manager, via the web; the director, also
    alerted, is told she is handling it, and the board then shows her on it."""
    sign_in(web, MARIA)
    status, page = act(web, "escalated", "ack")
    assert status == 200 and "Maria Jones is on it" in page
    assert "Told that you are handling it: Sam Webster" in page
    assert state_of(web, "escalated") is VisitState.ACKNOWLEDGED
    assert checkins(web, "escalated") == [("ack", "Maria Jones", "web")]
    web.service.dispatch()
    [notice] = [
        m
        for m in web.world.messages()
        if m["subject"].startswith("Being handled") and "Maria Jones" in m["subject"]
    ]
    assert notice["recipient"]["id"] == SAM and notice["visit_id"] == visit_id(web, "escalated")
    after = board(web)
    assert f'data-visit="{visit_id(web, "escalated")}"' in sections(after)["acknowledged"]
    assert "Maria Jones at 12:00" in row(after, visit_id(web, "escalated"))


def test_confirmed_safe_resolves_and_tells_everyone_alerted(web: Web) -> None:
    """ "Confirmed safe" resolves the visit as the signed-in director; the page names who
    gets the all clear, and they get it."""
    sign_in(web, SAM)
    status, page = act(web, "escalated", "safe")
    assert status == 200 and "Asha Khan is confirmed safe" in page
    assert "Maria Jones" in page and "Sam Webster" in page
    assert state_of(web, "escalated") is VisitState.RESOLVED
    assert checkins(web, "escalated") == [("confirmed_safe", "Sam Webster", "web")]
    web.service.dispatch()
    cleared = [
        m["recipient"]["id"]
        for m in web.world.messages("all_clear")
        if m["visit_id"] == visit_id(web, "escalated")
    ]
    assert sorted(cleared) == sorted([MARIA, SAM])
    assert f'data-visit="{visit_id(web, "escalated")}"' in sections(board(web))["done"]


@pytest.mark.parametrize("csrf", ["", "forged", "another session's"])
def test_action_without_the_sessions_csrf_changes_nothing(web: Web, csrf: str) -> None:
    """A POST without this session's CSRF token (none, forged, or one from Sam's session
    sent with Maria's cookie) gets a plain 400 and changes nothing."""
    if csrf == "another session's":
        other = sign_in(web, SAM, web.browser())
        csrf = form_csrf(other.get("/board"))
    sign_in(web, MARIA)
    status, page = act(web, "overdue", "safe", csrf=csrf)
    assert status == 400 and "nothing was changed" in page
    assert state_of(web, "overdue") is VisitState.OVERDUE
    assert checkins(web, "overdue") == []


def test_signed_out_browser_cannot_act(web: Web) -> None:
    """Without a session an action goes to the sign-in page and changes nothing."""
    sign_in(web, MARIA)
    csrf = form_csrf(web.client.get("/board"))
    web.client.delete_cookie(COOKIE)
    answer = web.client.post(
        "/board/act", data={"csrf": csrf, "visit": visit_id(web, "overdue"), "action": "ack"}
    )
    assert answer.status_code == 303 and answer.headers["Location"].endswith("/signin")
    assert checkins(web, "overdue") == []


def test_acting_on_a_finished_visit_says_so(web: Web) -> None:
    """A form left open after the visit was resolved elsewhere gets a plain 409 saying the
    visit is over, and changes nothing."""
    sign_in(web, MARIA)
    csrf = form_csrf(web.client.get("/board"))
    status, page = act(web, "done", "ack", csrf=csrf)
    assert status == 409 and "already resolved" in page
    assert [c[0] for c in checkins(web, "done")] == ["checkin"]
