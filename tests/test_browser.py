"""The pages in headless Chromium, served by the daemon's real server on loopback.

Each flow runs at a desktop and at a phone-sized viewport, from the links in the messages
the outbox delivered, as a person would open them. Every page passes axe with no
violation, fits a 390 px phone with big buttons, and is screenshotted at phone size into
``$VISITWATCH_SCREENSHOTS`` (see ``tests/browser.py``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from playwright.sync_api import Page

from tests.browser import (  # noqa: F401  (fixtures)
    Served,
    browser_fixture,
    look_fixture,
    main_text,
    page_fixture,
    screenshots_fixture,
    served_fixture,
)
from tests.conftest import T0, home_visit
from visitwatch.core.visit_state import VisitState

ASHA = "asha.khan@example.org"
MARIA = "maria.jones@example.org"
SAM = "sam.webster@example.org"
START = T0 + timedelta(hours=1)  # Asha's visit: 13:00 to 14:00
DEADLINE = T0 + timedelta(hours=2)

Look = Callable[..., None]
Serve = Callable[..., Served]


def press(page: Page, button: str) -> None:
    page.get_by_role("button", name=button, exact=True).click()


def state_of(site: Served) -> VisitState:
    return site.service.watcher.visits.current(site.visit_id()).state


def checkins(site: Served) -> list[dict[str, str]]:
    return site.query("SELECT action, actor, via FROM checkins ORDER BY id")


def queued(site: Served, kind: str) -> list[dict[str, str]]:
    return site.query(
        "SELECT recipient_id, text FROM notifications WHERE kind = ? ORDER BY recipient_id", kind
    )


def test_a_worker_checks_in_from_the_reminder(page: Page, served: Serve, look: Look) -> None:
    """The reminder's link, "I'm safe": the result page names the manager given the all
    clear, and the record says Asha checked in via the web."""
    site = served(home_visit())
    site.at(DEADLINE + timedelta(minutes=16))  # reminded at 14:00, Maria alerted at 14:15
    [link] = site.links_to(ASHA, "reminder")
    page.goto(link)
    assert "Overdue by 16 minutes" in main_text(page)
    assert "14 Brook Street, Preston PR1 3XX" in main_text(page)
    look(page, "worker-visit-overdue")
    press(page, "I’m safe — visit finished")
    shown = main_text(page)
    assert page.get_by_role("heading", level=1).inner_text() == "Checked in: thank you"
    assert "All clear sent to" in shown and "Maria Jones (manager)" in shown
    look(page, "worker-done")
    assert state_of(site) is VisitState.RESOLVED
    assert checkins(site) == [{"action": "checkin", "actor": "Asha Khan", "via": "web"}]
    assert [row["recipient_id"] for row in queued(site, "all_clear")] == [MARIA]


def test_a_worker_extends_then_asks_for_help(page: Page, served: Serve, look: Look) -> None:
    """ "Extend 30 min" moves the deadline; "I need help" asks first, then alerts the
    manager and director at once with the address, and the page says who."""
    site = served(home_visit())
    site.at(DEADLINE + timedelta(minutes=5))  # reminded at 14:00
    [link] = site.links_to(ASHA, "reminder")
    page.goto(link)
    look(page, "worker-visit")
    press(page, "Extend 30 min")
    assert "expected back by Mon 23 Nov 14:35" in main_text(page)
    look(page, "worker-extended")
    assert site.service.watcher.visits.current(site.visit_id()).deadline == DEADLINE + timedelta(
        minutes=35
    )
    page.get_by_role("link", name="Back to the visit").click()
    page.get_by_role("link", name="I need help").click()
    confirm = main_text(page)
    assert "Ask for help now?" in confirm
    assert "Maria Jones (manager)" in confirm and "Sam Webster (director)" in confirm
    look(page, "worker-help-confirm")
    assert [c["action"] for c in checkins(site)] == ["extend"], "opening it asked for nothing"
    press(page, "Yes, send for help now")
    shown = main_text(page)
    assert page.get_by_role("heading", level=1).inner_text() == "Help is on its way"
    assert "Being alerted now" in shown
    assert "Maria Jones (manager)" in shown and "Sam Webster (director)" in shown
    look(page, "worker-help-sent")
    assert checkins(site)[-1] == {"action": "help", "actor": "Asha Khan", "via": "web"}
    alerts = queued(site, "help")
    assert [row["recipient_id"] for row in alerts] == [MARIA, SAM]
    assert all("14 Brook Street, Preston PR1 3XX" in row["text"] for row in alerts)


def test_a_manager_acknowledges_then_confirms_safe(page: Page, served: Serve, look: Look) -> None:
    """From the overrun alert's link: "I'm on it" tells Sam who has it; "Confirmed safe"
    resolves the visit and queues the all clear to Maria and Sam."""
    site = served(home_visit())
    site.at(DEADLINE + timedelta(minutes=50))  # Maria alerted at 14:15, Sam at 14:45
    [link] = site.links_to(MARIA, "overrun")
    page.goto(link)
    assert page.get_by_role("heading", level=1).inner_text() == "Asha Khan is 50 min overdue"
    call = page.get_by_role("link", name="Call Asha Khan: 07700 900123")
    assert call.get_attribute("href") == "tel:+447700900123"
    look(page, "manager-alert")
    press(page, "I’m on it")
    shown = main_text(page)
    assert "You are handling this alert" in shown
    assert "Sam Webster (director)" in shown
    look(page, "manager-acked")
    visit = site.service.watcher.visits.current(site.visit_id())
    assert visit.state is VisitState.ACKNOWLEDGED and visit.acknowledged_by == "Maria Jones"
    page.goto(link)
    assert "Maria Jones since" in main_text(page)
    look(page, "manager-alert-acked")
    press(page, "Confirmed safe")
    shown = main_text(page)
    assert "Maria Jones (manager)" in shown and "Sam Webster (director)" in shown
    look(page, "manager-safe")
    assert state_of(site) is VisitState.RESOLVED
    assert checkins(site) == [
        {"action": "ack", "actor": "Maria Jones", "via": "web"},
        {"action": "confirmed_safe", "actor": "Maria Jones", "via": "web"},
    ]
    assert [row["recipient_id"] for row in queued(site, "all_clear")] == [MARIA, SAM]


def sign_in(page: Page, site: Served, look: Look | None = None) -> None:
    """Sign Maria in as a person does: her address, the link from her e-mail, "Sign in"."""
    page.goto(f"{site.base}/board")
    assert page.get_by_role("heading", level=1).inner_text() == "Sign in to the board"
    if look:
        look(page, "signin")
    page.get_by_label("Your work e-mail address").fill(MARIA)
    press(page, "Send me a sign-in link")
    assert "a sign-in link is on its way" in main_text(page)
    if look:
        look(page, "signin-sent")
    site.service.dispatch()
    [link] = [url for url in site.links_to(MARIA, "admin") if "/signin/link/" in url]
    page.goto(link)
    assert page.get_by_role("heading", level=1).inner_text() == "Sign in as Maria Jones"
    if look:
        look(page, "signin-link")
    press(page, "Sign in")
    assert page.url == f"{site.base}/board"


def test_the_board_after_an_e_mailed_sign_in(page: Page, served: Serve, look: Look) -> None:
    """Maria signs in with the e-mailed link, finds Asha's visit under "Overdue", presses
    "I'm on it" and sees it under "Someone is on it"; when Asha checks in from her phone,
    the board shows it under "Done" on its next refresh."""
    later = home_visit("visit-2", start=T0 + timedelta(hours=4), end=T0 + timedelta(hours=5))
    site = served(home_visit(), later)
    site.at(DEADLINE + timedelta(minutes=20))
    sign_in(page, site, look)
    overdue = page.locator(f'#overdue li[data-visit="{site.visit_id()}"]')
    assert "Asha Khan" in overdue.inner_text() and "20 min overdue" in overdue.inner_text()
    assert page.locator(f'#booked li[data-visit="{site.visit_id("visit-2")}"]').count() == 1
    look(page, "board")
    overdue.get_by_role("button", name="I'm on it").click()
    assert "Recorded: Maria Jones is on it." in main_text(page)
    look(page, "board-result")
    page.get_by_role("link", name="Back to the board").click()
    handled = page.locator(f'#acknowledged li[data-visit="{site.visit_id()}"]')
    assert "On it Maria Jones" in " ".join(handled.inner_text().split())
    assert page.locator(f'#overdue li[data-visit="{site.visit_id()}"]').count() == 0
    # Asha checks in from her reminder on her own phone; the board shows it on its refresh.
    phone = page.context.browser.new_page()  # type: ignore[union-attr]
    [link] = site.links_to(ASHA, "reminder")
    phone.goto(link)
    press(phone, "I’m safe — visit finished")
    phone.close()
    page.reload()  # what the meta refresh does every 30 seconds
    done = page.locator(f'#done li[data-visit="{site.visit_id()}"]')
    assert "Ended safe (checked in or confirmed)" in " ".join(done.inner_text().split())
    look(page, "board-done")
    assert state_of(site) is VisitState.RESOLVED
    assert [(c["action"], c["actor"], c["via"]) for c in checkins(site)] == [
        ("ack", "Maria Jones", "web"),
        ("checkin", "Asha Khan", "web"),
    ]


@pytest.mark.parametrize("page", ["phone"], indirect=True)
def test_the_board_passes_axe_without_waivers(page: Page, served: Serve, look: Look) -> None:
    """The board passes every axe rule, its timed refresh included."""
    site = served(home_visit())
    sign_in(page, site)
    look(page, "board-unwaived")


def test_the_other_states_and_the_error_pages(page: Page, served: Serve, look: Look) -> None:
    """The worker's page before the start and on a going-home visit, a replay after the
    visit is over, a forged link (403) and an expired one (410): each is a plain page that
    passes axe."""
    going_home = "Risk assessment: complete\nGoing home after: yes"
    soon = DEADLINE + timedelta(minutes=20)  # no risk assessment: a notice 30 min before
    site = served(
        home_visit(),
        home_visit("visit-2", description=going_home),
        home_visit("visit-3", start=soon, end=soon + timedelta(hours=1), description=""),
    )
    site.at(DEADLINE)  # visits 1 and 2 reminded; Asha told what visit 3 lacks
    asha, home = site.links_to(ASHA, "reminder")
    later = site.links_to(ASHA, "compliance")[-1]  # when booked, and again as it nears
    page.goto(later)
    assert "You can check in once the visit has started." in main_text(page)
    look(page, "worker-visit-before-start")
    page.goto(home)
    assert page.get_by_role("button", name="Safe at home").is_visible()
    look(page, "worker-visit-going-home")
    press(page, "Visit finished — heading home")
    look(page, "worker-left")
    site.service.watcher.actions.check_in(site.visit_id(), by="Asha Khan")
    page.goto(asha)
    assert page.get_by_role("button").count() == 0, "a visit that is over offers no actions"
    look(page, "worker-visit-resolved")

    forged = asha[:-3] + ("AAA" if not asha.endswith("AAA") else "BBB")
    answer = page.goto(forged)
    assert answer is not None and answer.status == 403
    assert page.get_by_role("heading", level=1).inner_text() == "This link does not work"
    look(page, "link-invalid")
    site.world.at(DEADLINE + timedelta(hours=25))  # links work 24 h after the deadline
    answer = page.goto(home)
    assert answer is not None and answer.status == 410
    assert page.get_by_role("heading", level=1).inner_text() == "This link has expired"
    look(page, "link-expired")


def test_a_manager_downloads_the_record_from_the_board(
    page: Page, served: Serve, look: Look
) -> None:
    """From the board's link, the export page (axe, phone-sized), and a real CSV download
    holding Asha's visit and Maria's acknowledgement."""
    site = served(home_visit())
    site.at(DEADLINE + timedelta(minutes=20))
    site.service.sweep()
    sign_in(page, site)
    page.locator(f'#overdue li[data-visit="{site.visit_id()}"]').get_by_role(
        "button", name="I'm on it"
    ).click()
    page.goto(f"{site.base}/board")
    page.get_by_role("link", name="Export the record").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Export the Lone Working Record"
    look(page, "board-export")
    with page.expect_download() as download:
        press(page, "Download CSV")
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text("utf-8"))))
    assert [row["visit"] for row in rows] == [site.visit_id()]
    assert "Maria Jones" in " ".join(rows[0].values())
