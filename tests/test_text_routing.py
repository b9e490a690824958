"""What the router writes for texts and for places: short words, short links, one post per event."""

from __future__ import annotations

import base64
import textwrap
from datetime import timedelta
from typing import Any

import pytest

from tests.conftest import T0, World, home_visit
from tests.web_client import BASE_URL, WebWorld, web_world
from visitwatch.core import sms

ASHA = "asha.khan@example.org"
MARIA = "maria.jones@example.org"
START = T0 + timedelta(hours=1)  # 13:00; the deadline is 14:00, the manager alerted 14:15
SECRET = "whsec_" + base64.b64encode(b"a-webhook-secret-of-32-bytes-ok!").decode()
NOTIFY_KEY = "test-00000000-0000-0000-0000-000000000001-00000000-0000-0000-0000-000000000002"
# The providers are never reached here: only the rows the router writes are read.
CHANNELS = textwrap.dedent("""
    [[channels]]
    name = "outbox"
    type = "outbox"
    path = "outbox.jsonl"

    [[channels]]
    name = "texts"
    type = "notify_sms"
    api_key = { env = "VW_TEST_NOTIFY_KEY" }
    template_id = "f33517ff-2a88-4f6e-b855-c550268ce08a"
    base_url = "http://127.0.0.1:9"

    [[channels]]
    name = "team"
    type = "webhook"
    url = "http://127.0.0.1:9/hook"
    secret = { env = "VW_TEST_WEBHOOK_SECRET" }
    kinds = ["overrun", "escalation", "help", "all_clear", "reminder"]
""")


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", NOTIFY_KEY)
    monkeypatch.setenv("VW_TEST_WEBHOOK_SECRET", SECRET)


def texts_world(world: World, policy: str = "") -> WebWorld:
    world.channels = CHANNELS
    world.policy += policy
    web = web_world(world)
    world.write_calendar(home_visit())
    web.tick()
    return web


def rows(ww: WebWorld, kind: str, channel: str) -> list[dict[str, Any]]:
    return ww.service.store.query(
        "SELECT recipient_id, subject, text, short, link FROM notifications"
        " WHERE kind = ? AND channel = ? ORDER BY id",
        (kind, channel),
    )


def at(ww: WebWorld, minutes_after_start: int) -> None:
    ww.at(START + timedelta(minutes=minutes_after_start))
    ww.tick()


def test_a_managers_text_fits_two_segments_and_its_short_link_opens_the_alert_page(world: World):
    """Overrun by text: who, how late, where, the mobile, and a short link to the ack page."""
    ww = texts_world(world)
    at(ww, 80)  # 14:20
    [row] = rows(ww, "overrun", "texts")
    assert row["recipient_id"] == MARIA
    short = row["short"]
    assert sms.segments(short) <= 2 and sms.to_gsm(short) == short
    assert short.startswith("OVERDUE: Asha Khan is 20 min past the expected return")
    assert "14 Brook Street" in short and "07700 900123" in short
    link = short.rsplit(" ", 1)[1]
    assert link.startswith(f"{BASE_URL}/s/") and len(link) < 60
    hop = ww.client.get(link.removeprefix(BASE_URL))
    assert hop.status_code == 303
    assert hop.headers["Location"] == row["link"].removeprefix(BASE_URL)
    assert hop.headers["Location"].startswith("/a/")
    page = ww.client.get(hop.headers["Location"])
    assert page.status_code == 200 and "Asha Khan is 20 min overdue" in page.text
    # The e-mail-sized text still goes to the outbox, whole.
    [mail] = rows(ww, "overrun", "outbox")
    assert "Risk assessment" in mail["text"] and mail["link"] == row["link"]


def test_the_workers_reminder_by_text_links_to_their_check_in_page(world: World):
    """No channel hears replies here, so the text asks for a tap, not a reply."""
    ww = texts_world(world)
    at(ww, 61)  # 14:01
    [row] = rows(ww, "reminder", "texts")
    assert row["recipient_id"] == ASHA
    assert "Reply" not in row["short"] and "due to end at 14:00" in row["short"]
    code = row["short"].rsplit("/s/", 1)[1]
    hop = ww.client.get(f"/s/{code}")
    assert hop.status_code == 303 and hop.headers["Location"].startswith("/v/")


@pytest.mark.parametrize("code", ["nope", "A" * 12, "x" * 200])
def test_an_unknown_short_link_is_a_plain_404(world: World, code: str):
    """A guessed or mangled code changes nothing and says so."""
    ww = texts_world(world)
    page = ww.client.get(f"/s/{code}")
    assert page.status_code == 404 and "does not work" in page.text


def test_an_expired_short_link_stops_working(world: World):
    """The short link lives as long as the signed link it stands for, not longer."""
    ww = texts_world(world)
    at(ww, 80)
    [row] = rows(ww, "overrun", "texts")
    code = row["short"].rsplit("/s/", 1)[1]
    ww.at(START + timedelta(hours=1, minutes=1) + timedelta(hours=24))  # deadline + ttl + 1 min
    assert ww.client.get(f"/s/{code}").status_code == 404


def test_the_policy_can_keep_names_and_addresses_out_of_texts(world: World):
    """[policy.texts] names/address = false: the text says neither, the e-mail still does."""
    ww = texts_world(world, "\n[policy.texts]\nnames = false\naddress = false\n")
    at(ww, 80)
    [row] = rows(ww, "overrun", "texts")
    assert "Asha" not in row["short"] and "Brook Street" not in row["short"]
    assert row["short"].startswith("OVERDUE: A colleague is 20 min past")
    [mail] = rows(ww, "overrun", "outbox")
    assert "Asha Khan" in mail["text"] and "Brook Street" in mail["text"]


def test_a_place_gets_one_post_per_event_listing_who_was_told(world: World):
    """The webhook (a broadcast channel) gets one overrun, naming everyone alerted; the
    worker's own reminder is not posted to the team; its link is the board, never a
    person's signed page."""
    ww = texts_world(world)
    at(ww, 80)
    assert rows(ww, "reminder", "team") == []
    [post] = rows(ww, "overrun", "team")
    assert post["recipient_id"] == "team"
    assert "Told: Maria Jones (manager)" in post["text"]
    assert post["link"].endswith("/board#visit-" + ww.visit_id())
    assert "/a/" not in post["text"] + post["short"] and "/v/" not in post["short"]
    at(ww, 110)  # 14:50: the director too, one more post for that rung
    assert len(rows(ww, "escalation", "team")) == 1


def test_people_are_never_addressed_through_a_place(world: World):
    """Per-person routing skips broadcast channels: sign-in links and admin notices to a
    person never land in a shared channel."""
    ww = texts_world(world)
    router = ww.service.watcher.router
    staff = ww.service.watcher.staff.current
    maria = staff.get(MARIA)
    assert maria is not None
    from visitwatch.core.notification import NotificationKind, Recipient

    person = Recipient(maria.id, maria.name, maria.email, maria.mobile)
    names = {c.name for c in router.channels_for(NotificationKind.ADMIN, person, any_kind=True)}
    assert names == {"outbox", "texts"}
