"""The one-tap pages through Flask's test client, against the real store, sweep and actions."""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape

import pytest

from tests.conftest import T0, World, home_visit
from tests.web_client import WebWorld, web_world
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.visits import Visit
from visitwatch.daemon.web.links import Purpose

ASHA = "asha.khan@example.org"
BEN = "ben.okafor@example.org"
MARIA = "maria.jones@example.org"
SAM = "sam.webster@example.org"
START = T0 + timedelta(hours=1)  # 13:00
DEADLINE = T0 + timedelta(hours=2)  # 14:00: the manager is alerted at 14:15, the director 14:45


@pytest.fixture
def ww(world: World) -> WebWorld:
    """A world whose pages are served, with Asha's 13:00-14:00 visit synced."""
    web = web_world(world)
    world.write_calendar(home_visit())
    web.tick()
    return web


def at(ww: WebWorld, minutes_after_start: int) -> None:
    """Move the clock to START + minutes and run a daemon tick (sync, sweep, deliver)."""
    ww.at(START + timedelta(minutes=minutes_after_start))
    ww.tick()


def text(html: str) -> str:
    """What a person reads in the page's <main>: tags dropped, entities and spaces folded."""
    main = html.split("<main", 1)[-1].split("</main>", 1)[0]
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", "<" + main))).strip()


def visit(ww: WebWorld) -> Visit:
    return ww.service.watcher.visits.current(ww.visit_id())


def checkins(ww: WebWorld) -> list[dict[str, str]]:
    return ww.service.store.query("SELECT action, actor, via FROM checkins ORDER BY id")


def queued(ww: WebWorld, kind: str) -> list[str]:
    rows = ww.service.store.query(
        "SELECT DISTINCT recipient_id FROM notifications WHERE kind = ? ORDER BY recipient_id",
        (kind,),
    )
    return [r["recipient_id"] for r in rows]


# ------------------------------------------------------------------ end to end


def test_the_reminder_link_checks_the_worker_in_and_the_all_clear_goes_out(ww: WebWorld) -> None:
    """From the reminder's own link: open it, tap "I'm safe", and the manager gets the all clear."""
    at(ww, 75)  # 14:15: reminded at 14:00, manager alerted now
    links = ww.links_in("reminder", ASHA)
    assert len(links) == 1 and links[0].startswith("/v/")
    page = ww.client.get(links[0])
    assert page.status_code == 200
    shown = text(page.text)
    assert "Home visit - Carter family" in shown and "14 Brook Street, Preston PR1 3XX" in shown
    assert "Overdue by 15 minutes" in shown
    result = text(ww.press(links[0], "checkin"))
    assert "Checked in: thank you" in result
    assert "All clear sent to: Maria Jones (manager)" in result
    assert visit(ww).state is VisitState.RESOLVED
    assert checkins(ww) == [{"action": "checkin", "actor": "Asha Khan", "via": "web"}]
    audit = ww.service.store.query("SELECT actor, to_state FROM audit ORDER BY id DESC LIMIT 1")
    assert audit == [{"actor": "Asha Khan", "to_state": "resolved"}]
    assert ww.wakes, "the daemon was not woken to deliver"
    ww.tick()
    assert ww.world.recipients("all_clear") == [MARIA]


def test_the_overrun_link_opens_the_alert_page_with_what_a_manager_needs(ww: WebWorld) -> None:
    """The manager's page: overdue time, tap-to-call, maps link, risk assessment, instruction."""
    at(ww, 80)  # 14:20
    [link] = ww.links_in("overrun", MARIA)
    assert link.startswith("/a/")
    page = ww.client.get(link)
    assert page.status_code == 200
    assert 'href="tel:+447700900123"' in page.text
    maps = "https://www.google.com/maps/search/?api=1&amp;query=14+Brook+Street%2C+Preston+PR1+3XX"
    assert maps in page.text
    shown = text(page.text)
    assert "Asha Khan is 20 min overdue" in shown
    assert "Risk assessment complete" in shown
    assert "contact the worker now on their mobile" in shown  # the preset's overrun instruction
    assert "I’m on it" in shown and "Confirmed safe" in shown


def test_i_am_on_it_stops_the_repeats_and_tells_the_others_who_owns_it(ww: WebWorld) -> None:
    """Maria acknowledges from her link: recorded as her via web, and Sam is told she has it."""
    at(ww, 110)  # 14:50: the director has been alerted too
    [link] = ww.links_in("overrun", MARIA)
    result = text(ww.press(link, "ack"))
    assert "You are handling this alert" in result
    assert "Told that you are on it: Sam Webster (director)" in result
    current = visit(ww)
    assert current.state is VisitState.ACKNOWLEDGED and current.acknowledged_by == "Maria Jones"
    assert checkins(ww)[-1] == {"action": "ack", "actor": "Maria Jones", "via": "web"}
    ww.tick()
    [notice] = [m for m in ww.world.messages() if "Being handled" in m["subject"]]
    assert notice["recipient"]["id"] == SAM
    assert "Maria Jones acknowledged the alert about Asha Khan" in notice["text"]


def test_confirmed_safe_resolves_and_sends_the_all_clear_to_everyone_alerted(ww: WebWorld) -> None:
    """The director confirms safe: resolved, and the all clear goes to Maria and Sam."""
    at(ww, 110)
    [link] = ww.links_in("escalation", SAM)
    result = text(ww.press(link, "safe"))
    assert "Confirmed safe" in result
    assert "All clear sent to: Maria Jones (manager) Sam Webster (director)" in result
    assert visit(ww).state is VisitState.RESOLVED
    assert checkins(ww)[-1] == {"action": "confirmed_safe", "actor": "Sam Webster", "via": "web"}
    ww.tick()
    assert sorted(ww.world.recipients("all_clear")) == [MARIA, SAM]


def test_extend_moves_the_deadline_and_tells_whoever_was_alerted(ww: WebWorld) -> None:
    """ "Extend 30 min" after the manager was alerted: new deadline, ladder restarted, Maria told."""
    at(ww, 76)  # 14:16
    link = ww.link(Purpose.CHECKIN, ASHA)
    result = text(ww.press(link, "extend", minutes="30"))
    assert "Visit extended" in result
    assert "expected back by Mon 23 Nov 14:46" in result
    assert "Told of the new time: Maria Jones (manager)" in result
    current = visit(ww)
    assert current.deadline == START + timedelta(minutes=106)
    assert current.state is VisitState.IN_PROGRESS
    assert checkins(ww)[-1] == {"action": "extend", "actor": "Asha Khan", "via": "web"}


def test_an_extension_that_is_not_offered_changes_nothing(ww: WebWorld) -> None:
    """Only 15, 30 or 60 minutes: anything else is a 400 and the deadline stays."""
    at(ww, 30)
    link = ww.link(Purpose.CHECKIN, ASHA)
    csrf = ww.csrf(link)
    for minutes in ("45", "-15", "", "9999"):
        response = ww.client.post(f"{link}/extend", data={"csrf": csrf, "minutes": minutes})
        assert response.status_code == 400
    assert visit(ww).deadline == DEADLINE and checkins(ww) == []


def test_help_asks_for_confirmation_then_alerts_the_whole_ladder_at_once(ww: WebWorld) -> None:
    """ "I need help" names who will be alerted, and the POST raises help to them immediately."""
    at(ww, 30)  # 13:30, long before the deadline
    link = ww.link(Purpose.CHECKIN, ASHA)
    assert f'href="{link}/help"' in ww.client.get(link).text
    confirm = text(ww.client.get(f"{link}/help").text)
    assert "Maria Jones (manager)" in confirm and "Sam Webster (director)" in confirm
    assert checkins(ww) == [], "opening the confirmation must not ask for help yet"
    result = text(ww.press(link, "help"))
    assert "Help is on its way" in result
    assert "Being alerted now: Maria Jones (manager) Sam Webster (director)" in result
    assert checkins(ww) == [{"action": "help", "actor": "Asha Khan", "via": "web"}]
    assert queued(ww, "help") == [MARIA, SAM]
    ww.tick()
    help_text = ww.world.messages("help")[0]["text"]
    assert "14 Brook Street, Preston PR1 3XX" in help_text


# ------------------------------------------------------------------ going home after


def test_a_going_home_visit_ends_with_safe_at_home(world: World) -> None:
    """ "Heading home" records the departure and keeps watching; "Safe at home" resolves."""
    ww = web_world(world)
    world.write_calendar(home_visit(description="Risk assessment: complete\nGoing home after: yes"))
    ww.tick()
    at(ww, 40)
    link = ww.link(Purpose.CHECKIN, ASHA)
    page = text(ww.client.get(link).text)
    assert "Safe at home" in page and "Visit finished — heading home" in page
    assert "I’m safe — visit finished" not in page
    result = text(ww.press(link, "left"))
    assert "Recorded that you left the visit at 13:40" in result
    assert "Nobody has been alerted" in result
    assert visit(ww).state is VisitState.IN_PROGRESS  # still watched on the road
    assert "left the visit Mon 23 Nov 13:40" in text(ww.client.get(link).text)
    assert "left the visit Mon 23 Nov 13:40" in text(
        ww.client.get(ww.link(Purpose.ACK, MARIA)).text
    )
    at(ww, 70)
    result = text(ww.press(link, "home"))
    assert "Your safe arrival at home was recorded at 14:10" in result
    assert visit(ww).state is VisitState.RESOLVED
    assert [c["action"] for c in checkins(ww)] == ["left", "safe_home"]
    assert {c["via"] for c in checkins(ww)} == {"web"}


# ------------------------------------------------------------------ every state renders


def _reach(ww: WebWorld, state: VisitState) -> None:
    actions = ww.service.watcher.actions
    if state is VisitState.CANCELLED:
        ww.world.write_calendar(home_visit(status="CANCELLED"))
        ww.tick()
        return
    minutes = {
        VisitState.BOOKED: -30,
        VisitState.IN_PROGRESS: 30,
        VisitState.DUE: 61,
        VisitState.OVERDUE: 76,
        VisitState.ESCALATED: 106,
        VisitState.ACKNOWLEDGED: 76,
        VisitState.RESOLVED: 30,
    }[state]
    at(ww, minutes)
    if state is VisitState.ACKNOWLEDGED:
        actions.acknowledge(ww.visit_id(), by="Maria Jones")
    if state is VisitState.RESOLVED:
        actions.check_in(ww.visit_id())


STATE_WORDS = {
    VisitState.BOOKED: "Booked: starts Mon 23 Nov 13:00 (GMT). Not started yet.",
    VisitState.IN_PROGRESS: "Under way. Expected back by Mon 23 Nov 14:00 (GMT).",
    VisitState.DUE: "The return time, Mon 23 Nov 14:00 (GMT), passed 1 minute ago",
    VisitState.OVERDUE: "Overdue by 16 minutes: the manager has been alerted.",
    VisitState.ESCALATED: "Overdue by 46 minutes: the manager and director have been alerted.",
    VisitState.ACKNOWLEDGED: "Maria Jones is handling the alert (since 14:16)",
    VisitState.RESOLVED: "This visit was already resolved at 13:30 by Asha Khan.",
    VisitState.CANCELLED: "its calendar entry was cancelled or removed",
}


@pytest.mark.parametrize("state", list(STATE_WORDS))
def test_every_state_renders_on_both_pages_in_plain_words(ww: WebWorld, state: VisitState) -> None:
    """Each state shows its plain words; a finished visit offers no buttons, a live one does."""
    _reach(ww, state)
    assert visit(ww).state is state
    for path in (ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)):
        page = ww.client.get(path)
        assert page.status_code == 200, page.text
        assert STATE_WORDS[state] in text(page.text)
        # Nothing to acknowledge before the start; nothing to do at all once it is over.
        offered = not state.terminal and (path.startswith("/v/") or state is not VisitState.BOOKED)
        assert ("<form" in page.text) is offered
        assert page.text.count("<h1") == 1 and '<html lang="en">' in page.text
        assert "<main" in page.text and "<title>" in page.text


def test_an_expired_visit_renders_and_offers_nothing(world: World) -> None:
    """A visit first seen long after it ended is shown as never watched, without buttons."""
    ww = web_world(world)
    world.write_calendar(home_visit(start=T0 - timedelta(hours=20), end=T0 - timedelta(hours=19)))
    ww.tick()
    assert visit(ww).state is VisitState.EXPIRED
    for path in (ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)):
        page = ww.client.get(path)
        assert "first seen after it had already ended" in text(page.text)
        assert "<form" not in page.text


def test_a_private_entry_never_shows_its_subject(world: World) -> None:
    """CLASS:PRIVATE: the family's name in the subject stays off both pages."""
    ww = web_world(world)
    world.write_calendar(home_visit(extra="CLASS:PRIVATE"))
    ww.tick()
    at(ww, 80)
    for path in (ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)):
        page = ww.client.get(path).text
        assert "Carter" not in page and "(private entry)" in page


def test_check_in_is_not_offered_before_the_visit_starts_and_is_refused_if_forced(
    ww: WebWorld,
) -> None:
    """Booked: no check-in button; a POST anyway is a 409 with the reason, and nothing changes."""
    link = ww.link(Purpose.CHECKIN, ASHA)
    page = ww.client.get(link).text
    assert "visit finished" not in page and "once the visit has started" in page
    response = ww.client.post(f"{link}/checkin", data={"csrf": ww.csrf(link)})
    assert response.status_code == 409
    assert "only counts once the visit has started" in text(response.text)
    assert visit(ww).state is VisitState.BOOKED and checkins(ww) == []


# ------------------------------------------------------------------ replays and CSRF


def test_a_replay_after_resolution_shows_who_resolved_it_and_changes_nothing(
    ww: WebWorld,
) -> None:
    """The same POST again (and the manager's too) after the check-in: no error, no action."""
    at(ww, 80)
    link, alert = ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)
    forms = {link: ww.csrf(link), alert: ww.csrf(alert)}  # the pages as they were opened
    first = ww.client.post(f"{link}/checkin", data={"csrf": forms[link]})
    assert first.status_code == 303
    all_clears = queued(ww, "all_clear")
    for path, action in ((link, "checkin"), (link, "help"), (link, "extend"), (alert, "safe")):
        again = ww.client.post(f"{path}/{action}", data={"csrf": forms[path], "minutes": "30"})
        assert again.status_code == 303 and again.headers["Location"] == path
        shown = text(ww.client.get(path).text)
        assert "This visit was already resolved at 14:20 by Asha Khan" in shown
    assert len(checkins(ww)) == 1 and queued(ww, "all_clear") == all_clears
    assert queued(ww, "help") == []


def test_a_replayed_form_on_the_managers_page_changes_nothing_after_resolution(
    ww: WebWorld,
) -> None:
    """Maria's open page, submitted after Asha checked in, just shows it is over."""
    at(ww, 80)
    alert = ww.link(Purpose.ACK, MARIA)
    csrf = ww.csrf(alert)
    ww.service.watcher.actions.check_in(ww.visit_id(), via="cli")
    response = ww.client.post(f"{alert}/ack", data={"csrf": csrf})
    assert response.status_code == 303 and response.headers["Location"] == alert
    assert "already resolved at 14:20 by Asha Khan" in text(ww.client.get(alert).text)
    assert visit(ww).acknowledged_by is None
    assert [c["action"] for c in checkins(ww)] == ["checkin"]


@pytest.mark.parametrize("csrf", [None, "", "forged", "other-link"])
def test_a_post_without_the_right_csrf_token_is_a_400_and_changes_nothing(
    ww: WebWorld, csrf: str | None
) -> None:
    """Missing, empty, forged, or a token from another link's page: 400, nothing recorded."""
    at(ww, 80)
    link = ww.link(Purpose.CHECKIN, ASHA)
    if csrf == "other-link":
        csrf = ww.csrf(ww.link(Purpose.ACK, SAM))  # valid, but bound to Sam's link
    for path, action in ((link, "checkin"), (link, "help"), (ww.link(Purpose.ACK, MARIA), "safe")):
        data = {} if csrf is None else {"csrf": csrf}
        response = ww.client.post(f"{path}/{action}", data=data)
        assert response.status_code == 400
        assert "nothing was changed" in text(response.text)
        assert "Traceback" not in response.text
    assert visit(ww).state is VisitState.OVERDUE and checkins(ww) == []
    assert ww.wakes == []


# ------------------------------------------------------------------ bad links


def test_an_altered_link_is_a_plain_403(ww: WebWorld) -> None:
    """One character changed: 403 with a short explanation, never a stack trace."""
    link = ww.link(Purpose.CHECKIN, ASHA)
    altered = link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB")
    for path in (altered, "/v/not-a-token", "/a/x.y"):
        response = ww.client.get(path)
        assert response.status_code == 403
        assert "This link does not work" in text(response.text)
        assert "Traceback" not in response.text
    assert ww.client.post(f"{altered}/checkin", data={"csrf": "x"}).status_code == 403


def test_a_link_for_the_other_page_is_refused_with_a_reason(ww: WebWorld) -> None:
    """An acknowledge token on /v/ and a check-in token on /a/ are both 403."""
    at(ww, 80)
    checkin_token = ww.link(Purpose.CHECKIN, ASHA).removeprefix("/v/")
    ack_token = ww.link(Purpose.ACK, MARIA).removeprefix("/a/")
    on_visit = ww.client.get(f"/v/{ack_token}")
    assert on_visit.status_code == 403
    assert "cannot acknowledge" not in on_visit.text and "alert link" in text(on_visit.text)
    on_alert = ww.client.get(f"/a/{checkin_token}")
    assert on_alert.status_code == 403 and "cannot acknowledge an alert" in text(on_alert.text)
    response = ww.client.post(
        f"/a/{checkin_token}/safe", data={"csrf": ww.csrf(f"/v/{checkin_token}")}
    )
    assert response.status_code == 403
    assert visit(ww).state is VisitState.OVERDUE


def test_an_expired_link_is_a_410(ww: WebWorld) -> None:
    """A day after the deadline (link_ttl) the link is gone: 410 and a human explanation."""
    link = ww.link(Purpose.CHECKIN, ASHA)
    ww.at(DEADLINE + timedelta(hours=24))
    response = ww.client.get(link)
    assert response.status_code == 410
    assert "This link has expired" in text(response.text)


def test_a_link_to_a_visit_that_does_not_exist_is_a_404(ww: WebWorld) -> None:
    """A valid signature for an unknown visit id: 404 plain page."""
    signer = ww.service.signer
    assert signer is not None
    token = signer.sign(Purpose.ACK, "no-such-visit", MARIA, DEADLINE)
    response = ww.client.get(f"/a/{token}")
    assert response.status_code == 404 and "Visit not found" in text(response.text)


def test_a_check_in_link_only_works_for_the_visits_worker(ww: WebWorld) -> None:
    """Ben's check-in token for Asha's visit is refused: a token is bound to one person."""
    at(ww, 30)
    bens = ww.link(Purpose.CHECKIN, BEN)
    assert ww.client.get(bens).status_code == 403
    assert ww.client.post(f"{bens}/checkin", data={"csrf": "x"}).status_code == 403
    assert visit(ww).state is VisitState.IN_PROGRESS


def test_a_token_for_one_visit_cannot_act_on_another(world: World) -> None:
    """Two visits: visit A's link checks in A and leaves B untouched."""
    ww = web_world(world)
    world.write_calendar(home_visit("visit-a"), home_visit("visit-b"))
    ww.tick()
    at(ww, 30)
    ids = [r["id"] for r in ww.service.store.query("SELECT id, uid FROM visits ORDER BY uid")]
    link_a = ww.link(Purpose.CHECKIN, ASHA, ids[0])
    ww.press(link_a, "checkin")
    visits = ww.service.watcher.visits
    assert visits.current(ids[0]).state is VisitState.RESOLVED
    assert visits.current(ids[1]).state is VisitState.IN_PROGRESS


def test_asking_for_help_twice_says_who_already_has_it(ww: WebWorld) -> None:
    """A second tap on "I need help" names those already alerted, never "nobody"."""
    at(ww, 30)
    link = ww.link(Purpose.CHECKIN, ASHA)
    ww.press(link, "help")
    at(ww, 32)
    again = text(ww.press(link, "help"))
    assert "Already alerted for help (each person once): Maria Jones (manager)" in again
    assert "could not reach anyone" not in again
    assert [c["action"] for c in checkins(ww)] == ["help", "help"]


def test_a_result_page_claims_only_what_the_record_shows(ww: WebWorld) -> None:
    """A hand-made /done URL for a check-in that never happened shows nothing, changes nothing."""
    at(ww, 30)
    link = ww.link(Purpose.CHECKIN, ASHA)
    for query in ("did=checkin&at=2026-11-23T13:00:00Z", "did=checkin", "did=nope&at=x"):
        response = ww.client.get(f"{link}/done?{query}")
        assert response.status_code == 404
        assert "Checked in" not in response.text
    assert visit(ww).state is VisitState.IN_PROGRESS
