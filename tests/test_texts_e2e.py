"""End to end by text: the overrun reaches the manager by SMS (GOV.UK Notify) with a link she
can open and acknowledge from; the worker's SAFE text resolves the visit; the all clear goes
out on every channel that carried an alert. The real store, sweep, dispatcher and pages; the
Notify API is the only thing stood in for (``responses``, as Notify documents its answers)."""

from __future__ import annotations

import json
import textwrap
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import responses

from tests.conftest import T0, World, home_visit
from tests.web_client import BASE_URL, WebWorld, web_world
from visitwatch.core import sms
from visitwatch.core.visit_state import VisitState

NOTIFY = "https://api.notifications.service.gov.uk"
TEMPLATE = "f33517ff-2a88-4f6e-b855-c550268ce08a"
INBOUND = "notify-inbound-token-for-tests"
ASHA_MOBILE, MARIA_MOBILE = "+447700900123", "+447700900321"
START = T0 + timedelta(hours=1)  # 13:00; return by 14:00, Maria alerted at 14:15
CHANNELS = textwrap.dedent("""
    [[channels]]
    name = "outbox"
    type = "outbox"
    path = "outbox.jsonl"

    [[channels]]
    name = "texts"
    type = "notify_sms"
    api_key = { env = "VW_TEST_NOTIFY_KEY" }
    template_id = "TEMPLATE"
    inbound_token = { env = "VW_TEST_NOTIFY_INBOUND" }
    kinds = ["reminder", "overrun", "escalation", "help", "all_clear", "reply"]
""").replace("TEMPLATE", TEMPLATE)


@pytest.fixture
def notify() -> Iterator[responses.RequestsMock]:
    """Notify's send-a-text endpoint, answering 201 as documented."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:

        def created(request: Any) -> tuple[int, dict[str, str], str]:
            sent = json.loads(request.body)
            answer = {
                "id": str(uuid.uuid4()),
                "reference": sent.get("reference"),
                "content": {"body": sent["personalisation"]["body"], "from_number": "visitwatch"},
                "uri": f"{NOTIFY}/v2/notifications/x",
                "template": {"id": TEMPLATE, "version": 1, "uri": f"{NOTIFY}/v2/template/x"},
            }
            return 201, {"Content-Type": "application/json"}, json.dumps(answer)

        mock.add_callback(responses.POST, f"{NOTIFY}/v2/notifications/sms", callback=created)
        mock.add_passthru("http://127.0.0.1")
        yield mock


def texts_to(mock: responses.RequestsMock, number: str) -> list[str]:
    return [
        json.loads(c.request.body)["personalisation"]["body"]
        for c in mock.calls
        if json.loads(c.request.body)["phone_number"] == number
    ]


def at(ww: WebWorld, minutes_after_start: int) -> None:
    ww.at(START + timedelta(minutes=minutes_after_start))
    ww.tick()


def test_an_overrun_by_text_acknowledged_by_link_and_resolved_by_a_safe_text(
    world: World, monkeypatch: pytest.MonkeyPatch, notify: responses.RequestsMock
) -> None:
    """The whole path a manager driving between visits and a worker without data would take."""
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", f"test-{TEMPLATE}-{TEMPLATE}")
    monkeypatch.setenv("VW_TEST_NOTIFY_INBOUND", INBOUND)
    world.channels = CHANNELS
    ww = web_world(world)
    world.write_calendar(home_visit())
    ww.tick()

    at(ww, 61)  # 14:01: the worker's reminder, by text too, inviting a reply
    [reminder] = texts_to(notify, ASHA_MOBILE)
    assert "Reply SAFE, EXTEND 30 or HELP" in reminder

    at(ww, 80)  # 14:20: Maria is alerted by text, with a short link, within two segments
    [overrun] = texts_to(notify, MARIA_MOBILE)
    assert overrun.startswith("OVERDUE: Asha Khan is 20 min past the expected return")
    assert sms.segments(overrun) <= 2
    link = overrun.rsplit(" ", 1)[1]
    assert link.startswith(f"{BASE_URL}/s/")

    # She taps it: the short link opens her acknowledge page; "I'm on it".
    hop = ww.client.get(link.removeprefix(BASE_URL))
    assert hop.status_code == 303 and hop.headers["Location"].startswith("/a/")
    result = ww.press(hop.headers["Location"], "ack")
    assert "Maria Jones" in result
    visit = ww.service.watcher.visits.current(ww.visit_id())
    assert visit.acknowledged_by == "Maria Jones"

    # Asha, with signal for texts only, replies SAFE through Notify's received-text callback.
    callback = {
        "id": str(uuid.uuid4()),
        "source_number": ASHA_MOBILE.removeprefix("+"),
        "destination_number": "07797000001",
        "message": "Safe",
        "date_received": "2026-11-23T14:22:00.000000Z",
    }
    answer = ww.client.post(
        "/sms/notify", json=callback, headers={"Authorization": f"Bearer {INBOUND}"}
    )
    assert answer.status_code == 200
    visit = ww.service.watcher.visits.current(ww.visit_id())
    assert visit.state is VisitState.RESOLVED
    checkins = ww.service.store.query("SELECT actor, via FROM checkins ORDER BY id")
    assert {"actor": "Asha Khan", "via": "sms"} in checkins

    ww.tick()  # the all clear on every channel that carried an alert to Maria
    assert any(t.startswith("All clear: Asha Khan is safe") for t in texts_to(notify, MARIA_MOBILE))
    assert world.recipients("all_clear") == ["maria.jones@example.org"]  # the e-mail stand-in
    # and Asha's reply, by text, says it is done and who was told.
    replies = [t for t in texts_to(notify, ASHA_MOBILE) if t != reminder]
    assert len(replies) == 1 and "Maria Jones" in replies[0]
