"""Texts from workers (SAFE, OK, EXTEND, HOME, HELP) through Twilio's webhook and Notify's
callback, against the real store, sweep and actions; one test through the real server."""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator
from werkzeug.test import TestResponse

from tests.conftest import T0, World, home_visit
from tests.web_client import BASE_URL, WebWorld, web_world
from visitwatch.core.sms import SINGLE, septets, to_gsm
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon import replies
from visitwatch.daemon.sms_commands import Command, Parsed, parse
from visitwatch.daemon.web import board, pages
from visitwatch.daemon.web.server import WebServer

ASHA_MOBILE = "+447700900123"  # "07700 900123" in the directory
MARIA = "maria.jones@example.org"
SAM = "sam.webster@example.org"
STRANGER = "+447700900777"
START = T0 + timedelta(hours=1)  # 13:00; return by 14:00
TWILIO_TOKEN = "7e57c0de7e57c0de7e57c0de7e57c0de"  # 32 hex digits, as Twilio's are
NOTIFY_TOKEN = "notify-inbound-token-for-tests"
UUID = "f33517ff-2a88-4f6e-b855-c550268ce08a"
CHANNELS = textwrap.dedent(f"""
    [[channels]]
    name = "outbox"
    type = "outbox"
    path = "outbox.jsonl"

    [[channels]]
    name = "texts"
    type = "twilio_sms"
    account_sid = "AC00000000000000000000000000000000"
    auth_token = {{ env = "VW_TEST_TWILIO_TOKEN" }}
    from_number = "+447700900999"
    inbound = true
    kinds = ["reply"]

    [[channels]]
    name = "notify"
    type = "notify_sms"
    api_key = {{ env = "VW_TEST_NOTIFY_KEY" }}
    template_id = "{UUID}"
    inbound_token = {{ env = "VW_TEST_NOTIFY_INBOUND" }}
    base_url = "http://127.0.0.1:9"
    kinds = ["reply"]
""")


def texting_world(world: World, monkeypatch: pytest.MonkeyPatch) -> WebWorld:
    """Asha's 13:00-14:00 visit, synced; Twilio and Notify channels that hear replies
    (``world.channels`` if a test set it, else :data:`CHANNELS`)."""
    monkeypatch.setenv("VW_TEST_TWILIO_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", f"test-{UUID}-{UUID}")
    monkeypatch.setenv("VW_TEST_NOTIFY_INBOUND", NOTIFY_TOKEN)
    world.channels = world.channels or CHANNELS
    web = web_world(world)
    world.write_calendar(home_visit())
    web.tick()
    return web


@pytest.fixture
def ww(world: World, monkeypatch: pytest.MonkeyPatch) -> WebWorld:
    return texting_world(world, monkeypatch)


def at(ww: WebWorld, minutes_after_start: int) -> None:
    ww.at(START + timedelta(minutes=minutes_after_start))
    ww.tick()


SIDS = iter(range(10**6))


def twilio(
    ww: WebWorld,
    body: str,
    sender: str = ASHA_MOBILE,
    sid: str | None = None,
    *,
    sign_as: str = f"{BASE_URL}/sms/twilio",
    token: str = TWILIO_TOKEN,
    signed: bool = True,
) -> TestResponse:
    """Post Twilio's incoming-message webhook, signed as Twilio signs it."""
    form = {
        "MessageSid": sid or f"SM{next(SIDS):032d}",
        "AccountSid": "AC00000000000000000000000000000000",
        "From": sender,
        "To": "+447700900999",
        "Body": body,
        "NumMedia": "0",
    }
    headers = {}
    if signed:
        headers["X-Twilio-Signature"] = RequestValidator(token).compute_signature(sign_as, form)
    return ww.client.post("/sms/twilio", data=form, headers=headers)


def reply_of(response: TestResponse) -> str:
    """The text of the TwiML <Message>."""
    assert response.status_code == 200, response.text
    assert response.mimetype == "text/xml"
    found = re.search(r"<Response><Message>(.*)</Message></Response>", response.text, re.S)
    assert found, response.text
    return found.group(1).replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")


def notify(
    ww: WebWorld,
    message: str,
    source: str = "447700900123",
    nid: str = "",
    token: str = NOTIFY_TOKEN,
) -> TestResponse:
    """Post Notify's received-text callback."""
    body = {
        "id": nid or f"{next(SIDS):08d}-1111-4222-8333-444444444444",
        "source_number": source,
        "destination_number": "07700900999",
        "message": message,
        "date_received": "2026-11-23 14:05:00.000000",
    }
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return ww.client.post("/sms/notify", json=body, headers=headers)


def visit_state(ww: WebWorld, visit_id: str | None = None) -> VisitState:
    return ww.service.watcher.visits.current(visit_id or ww.visit_id()).state


def checkins(ww: WebWorld) -> list[dict[str, Any]]:
    return ww.service.store.query("SELECT visit_id, action, actor, via FROM checkins ORDER BY id")


def rows(ww: WebWorld, kind: str) -> list[dict[str, Any]]:
    return ww.service.store.query("SELECT * FROM notifications WHERE kind = ? ORDER BY id", (kind,))


def refusals(ww: WebWorld) -> list[dict[str, Any]]:
    return ww.service.store.query(
        "SELECT * FROM audit WHERE cause = 'inbound_sms_refused' ORDER BY id"
    )


# ------------------------------------------------------------------ the commands


@pytest.mark.parametrize(
    ("body", "command", "minutes"),
    [
        ("SAFE", Command.SAFE, None),
        ("ok", Command.SAFE, None),
        ("Ok thanks!", Command.SAFE, None),
        ("I'm safe, all fine.", Command.SAFE, None),
        ("leaving now, heading home", Command.SAFE, None),
        ("HOME", Command.HOME, None),
        ("safe at home :)", Command.HOME, None),
        ("not home yet, all ok", Command.SAFE, None),
        ("help", Command.HELP, None),
        ("HELP!!!", Command.HELP, None),
        ("not safe", Command.HELP, None),
        ("safe? no, HELP", Command.HELP, None),
        ("EXTEND", Command.EXTEND, None),
        ("extend 30", Command.EXTEND, 30),
        ("Extend 45 mins please", Command.EXTEND, 45),
        ("EXTEND 1h", Command.EXTEND, 60),
        ("extend 1 hour 30", Command.EXTEND, 90),
        ("extend 1.5h", Command.EXTEND, 90),
        ("extend by 20m", Command.EXTEND, 20),
        ("what time is it", Command.UNKNOWN, None),
        ("", Command.UNKNOWN, None),
    ],
)
def test_commands_are_read_whatever_the_case_punctuation_and_extra_words(
    body: str, command: Command, minutes: int | None
) -> None:
    """Each command is read from real-world phrasings; help wins; "not safe" is help."""
    assert parse(body) == Parsed(command, minutes)


def test_the_text_limits_follow_the_page_and_the_board() -> None:
    """EXTEND's range is the page's buttons' range; urgency is the board's group order."""
    assert (
        min(pages.EXTEND_MINUTES),
        max(pages.EXTEND_MINUTES),
    ) == (replies.EXTEND_MIN, replies.EXTEND_MAX)
    order = [g.key for g in board.GROUPS]
    keys = [board._BY_STATE.get(s, "booked") for s in replies.URGENCY]
    assert keys == sorted(keys, key=order.index)


# ------------------------------------------------------------------ Twilio


def test_safe_by_twilio_checks_the_worker_in_and_answers_with_twiml(ww: WebWorld) -> None:
    """A signed SAFE resolves the visit, sends the all clear, and replies on the same number."""
    at(ww, 75)  # 14:15: the manager has been alerted
    response = twilio(ww, "Safe")
    text = reply_of(response)
    assert text.startswith("Checked in at 14:15: thank you. Your 13:00 visit is closed.")
    assert "All clear sent to Maria Jones" in text
    assert septets(to_gsm(text)) <= SINGLE and to_gsm(text) == text
    assert visit_state(ww) is VisitState.RESOLVED
    assert checkins(ww) == [
        {"visit_id": ww.visit_id(), "action": "checkin", "actor": "Asha Khan", "via": "sms"}
    ]
    audit = ww.service.store.one(
        "SELECT actor, cause FROM audit WHERE to_state = 'resolved' ORDER BY id DESC"
    )
    assert audit == {"actor": "Asha Khan", "cause": "checked in"}
    (reply,) = rows(ww, "reply")
    assert (reply["channel"], reply["status"], reply["recipient_mobile"]) == (
        "texts", "sent", ASHA_MOBILE,
    )  # fmt: skip
    assert reply["short"] == text
    assert ww.wakes, "the dispatcher was not woken for the all clear"


def test_a_wrong_or_missing_twilio_signature_is_refused_and_audited(ww: WebWorld) -> None:
    """Forged, unsigned, wrongly keyed: 403, nothing changes, an audit line with no number."""
    at(ww, 75)
    forged = twilio(ww, "SAFE", token="not-the-auth-token")
    assert (forged.status_code, forged.mimetype) == (403, "text/plain")
    unsigned = twilio(ww, "SAFE", signed=False)
    assert unsigned.status_code == 403
    # Signed over the host the request came to, not the public URL Twilio was given.
    local = twilio(ww, "SAFE", sign_as="http://localhost/sms/twilio")
    assert local.status_code == 403
    assert visit_state(ww) is VisitState.OVERDUE and checkins(ww) == []
    lines = refusals(ww)
    reasons = [json.loads(line["detail"])["reason"] for line in lines]
    assert reasons == ["X-Twilio-Signature does not match", "no X-Twilio-Signature header"]
    assert all(json.loads(line["detail"])["provider"] == "twilio" for line in lines)
    assert not any("900123" in line["detail"] or "SAFE" in line["detail"] for line in lines)


def test_refusals_are_audited_once_a_minute_with_a_count(ww: WebWorld) -> None:
    """A flood of forged posts writes one audit line a minute per reason, counting the rest."""
    for _ in range(5):
        assert twilio(ww, "SAFE", token="forged").status_code == 403
    assert len(refusals(ww)) == 1
    ww.at(T0 + timedelta(minutes=2))
    assert twilio(ww, "SAFE", token="forged").status_code == 403
    assert [json.loads(r["detail"])["refused"] for r in refusals(ww)] == [1, 5]


def test_without_an_inbound_twilio_channel_the_endpoint_refuses(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inbound = false: even a correctly signed text is refused (403) and acts on nothing."""
    world.channels = CHANNELS.replace("inbound = true", "inbound = false")
    web = texting_world(world, monkeypatch)
    at(web, 75)
    assert twilio(web, "SAFE").status_code == 403
    assert visit_state(web) is VisitState.OVERDUE
    assert "no twilio_sms channel" in refusals(web)[0]["detail"]


def test_a_retried_webhook_does_not_act_twice(ww: WebWorld) -> None:
    """The same MessageSid again gets the same reply; one check-in, one extension, one row."""
    at(ww, 30)
    first = reply_of(twilio(ww, "extend 30", sid="SM-retried"))
    ww.at(START + timedelta(minutes=31))
    again = reply_of(twilio(ww, "extend 30", sid="SM-retried"))
    assert again == first and "expected back by 14:30" in first
    assert [c["action"] for c in checkins(ww)] == ["extend"]
    assert len(rows(ww, "reply")) == 1


# ------------------------------------------------------------------ Notify


def test_help_by_notify_alerts_the_ladder_and_queues_the_reply(ww: WebWorld) -> None:
    """A Notify HELP (bearer token) escalates the visit; the reply is queued on notify_sms."""
    at(ww, 20)
    response = notify(ww, "HELP")
    assert response.status_code == 200
    visit = ww.service.watcher.visits.current(ww.visit_id())
    assert visit.state is VisitState.ESCALATED and visit.help_requested_at is not None
    assert {r["recipient_id"] for r in rows(ww, "help")} == {MARIA, SAM}
    (reply,) = rows(ww, "reply")
    assert (reply["channel"], reply["status"], reply["recipient_mobile"]) == (
        "notify", "pending", ASHA_MOBILE,
    )  # fmt: skip
    assert reply["short"] == (
        "Help is on its way: Maria Jones, Sam Webster alerted now. If you are in danger call 999."
    )
    assert checkins(ww)[-1] == {
        "visit_id": visit.id, "action": "help", "actor": "Asha Khan", "via": "sms",
    }  # fmt: skip
    assert ww.wakes


def test_a_missing_or_wrong_notify_token_is_refused_and_audited(ww: WebWorld) -> None:
    """No bearer token, or the wrong one: 403, nothing changes, an audit line naming notify."""
    at(ww, 75)
    assert notify(ww, "SAFE", token="").status_code == 403
    assert notify(ww, "SAFE", token="wrong-token").status_code == 403
    assert visit_state(ww) is VisitState.OVERDUE and rows(ww, "reply") == []
    details = [json.loads(r["detail"]) for r in refusals(ww)]
    assert [(d["provider"], d["reason"]) for d in details] == [
        ("notify", "no bearer token"),
        ("notify", "wrong bearer token"),
    ]


def test_a_retried_notify_callback_does_not_act_twice(ww: WebWorld) -> None:
    """The same Notify id twice: one check-in, one reply queued."""
    at(ww, 75)
    nid = "a1b2c3d4-1111-4222-8333-444444444444"
    assert notify(ww, "ok", nid=nid).status_code == 200
    assert notify(ww, "ok", nid=nid).status_code == 200
    assert [c["action"] for c in checkins(ww)] == ["checkin"]
    assert len(rows(ww, "reply")) == 1


# ------------------------------------------------------------------ who


def test_an_unknown_number_is_told_so_and_nothing_changes(ww: WebWorld) -> None:
    """A number not in the directory: the short reply, no change, an audit line without it."""
    at(ww, 75)
    text = reply_of(twilio(ww, "SAFE", sender=STRANGER))
    assert text == ("This number is not registered with visitwatch. If you are in danger call 999.")
    assert visit_state(ww) is VisitState.OVERDUE and checkins(ww) == []
    line = ww.service.store.one(
        "SELECT detail FROM audit WHERE cause = 'inbound_sms_unknown_sender'"
    )
    assert line and "900777" not in line["detail"]


def test_a_number_two_staff_share_acts_on_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mobile on two directory entries cannot say whose visit; the reply says why."""
    world.channels = CHANNELS + textwrap.dedent("""
        [[staff]]
        id = "dan.shared@example.org"
        name = "Dan Shared"
        mobile = "+44 7700 900123"
    """)
    web = texting_world(world, monkeypatch)
    at(web, 75)
    text = reply_of(twilio(web, "SAFE"))
    assert "registered to more than one person" in text and "999" in text
    assert visit_state(web) is VisitState.OVERDUE and checkins(web) == []


def test_help_from_an_unknown_number_still_reaches_the_admins(ww: WebWorld) -> None:
    """A HELP nobody can place is not dropped: the admins hear it, with the number to call."""
    reply = reply_of(twilio(ww, "help me", sender=STRANGER))
    assert "admins have been told" in reply
    (notice,) = rows(ww, "admin")
    assert STRANGER in notice["text"] and notice["recipient_id"] == SAM


def test_help_again_and_again_from_one_unknown_number_is_not_a_flood(ww: WebWorld) -> None:
    """The first notice says to phone the number; more HELPs from it within ten minutes add
    none (each still gets its reply), and a HELP after that tells the admins again."""
    for _ in range(5):
        assert "admins have been told" in reply_of(twilio(ww, "HELP", sender=STRANGER))
    assert len(rows(ww, "admin")) == 1
    ww.at(ww.service.clock.now() + timedelta(minutes=11))
    reply_of(twilio(ww, "HELP", sender=STRANGER))
    assert len(rows(ww, "admin")) == 2


# ------------------------------------------------------------------ the commands, acted on


@pytest.mark.parametrize(
    ("body", "minutes", "said"),
    [
        ("EXTEND", 30, "Extended by 30 minutes: you are now expected back by 14:50"),
        ("extend 1h", 60, "Extended by 60 minutes: you are now expected back by 15:20"),
        ("Extend 45 mins", 45, "Extended by 45 minutes: you are now expected back by 15:05"),
        ("extend 2 hours", 60, "Extended by 60 minutes (60 minutes is the most at once)"),
    ],
)
def test_extend_moves_the_deadline(ww: WebWorld, body: str, minutes: int, said: str) -> None:
    """EXTEND (bare: 30), minutes or hours; past the page's most, the most, said so."""
    at(ww, 80)  # 14:20, overdue
    text = reply_of(twilio(ww, body))
    assert text.startswith(said)
    visit = ww.service.watcher.visits.current(ww.visit_id())
    assert visit.state is VisitState.IN_PROGRESS
    assert visit.deadline == START + timedelta(minutes=80 + minutes)
    assert checkins(ww)[-1]["via"] == "sms"


def test_too_short_an_extension_changes_nothing(ww: WebWorld) -> None:
    """EXTEND 5 is under the page's least: refused with the range, the deadline unchanged."""
    at(ww, 30)
    assert reply_of(twilio(ww, "extend 5")) == (
        "EXTEND takes 15 to 60 minutes, e.g. EXTEND 30. Nothing was changed."
    )
    assert ww.service.watcher.visits.current(ww.visit_id()).deadline == START + timedelta(hours=1)


def test_an_unknown_command_lists_the_commands(ww: WebWorld) -> None:
    """Anything else: the commands, in one segment; nothing changes."""
    at(ww, 75)
    text = reply_of(twilio(ww, "running late sorry"))
    assert text == replies.COMMANDS and septets(text) <= SINGLE
    assert visit_state(ww) is VisitState.OVERDUE and checkins(ww) == []


def test_going_home_safe_then_home(ww: WebWorld) -> None:
    """With a journey home: SAFE records leaving (still watched), HOME closes it as safe_home."""
    ww.world.write_calendar(
        home_visit(description="Risk assessment: complete\nGoing home after: yes")
    )
    at(ww, 50)
    left = reply_of(twilio(ww, "safe"))
    assert left.startswith("Recorded that you left your visit at 13:50. You are still watched")
    assert visit_state(ww) is VisitState.IN_PROGRESS
    home = reply_of(twilio(ww, "home"))
    assert home.startswith("Safe at home recorded at 13:50: thank you.")
    assert visit_state(ww) is VisitState.RESOLVED
    assert [(c["action"], c["via"]) for c in checkins(ww)] == [
        ("left", "sms"),
        ("safe_home", "sms"),
    ]


def test_two_visits_at_once_the_most_urgent_is_acted_on(ww: WebWorld) -> None:
    """An overdue visit and one still in progress: SAFE checks in the overdue one only."""
    later = home_visit(
        "visit-2", start=START + timedelta(minutes=30), end=START + timedelta(hours=3)
    )
    ww.world.write_calendar(home_visit(), later)
    at(ww, 80)  # visit-1 overdue since 14:15; visit-2 in progress until 16:00
    states = {r["uid"]: r["state"] for r in ww.service.store.query("SELECT uid, state FROM visits")}
    assert states == {"visit-1": "overdue", "visit-2": "in_progress"}
    reply_of(twilio(ww, "SAFE"))
    states = {r["uid"]: r["state"] for r in ww.service.store.query("SELECT uid, state FROM visits")}
    assert states == {"visit-1": "resolved", "visit-2": "in_progress"}


def test_a_text_after_the_visit_closed_says_when_and_by_whom(ww: WebWorld) -> None:
    """SAFE after the manager confirmed safe: already closed, when and by whom; no change."""
    at(ww, 75)
    ww.service.watcher.actions.acknowledge(ww.visit_id(), by="Maria Jones", safe=True, via="web")
    ww.at(START + timedelta(minutes=90))
    text = reply_of(twilio(ww, "SAFE"))
    assert text == (
        "Your 13:00 visit was already closed at 14:15 by Maria Jones on the web page. "
        "Nothing was changed."
    )
    assert [c["action"] for c in checkins(ww)] == ["confirmed_safe"]
    assert reply_of(twilio(ww, "extend 30")).startswith("Your 13:00 visit was already closed")


def test_safe_with_no_visit_watched_changes_nothing(ww: WebWorld) -> None:
    """Before the day's visit is near, SAFE says no visit is being watched."""
    ww.at(T0 - timedelta(minutes=30))  # 11:30: the 13:00 visit is not near yet
    text = reply_of(twilio(ww, "SAFE"))
    assert text.startswith("visitwatch: no visit of yours is being watched now")
    assert checkins(ww) == [] and visit_state(ww) is VisitState.BOOKED


def test_help_with_no_visit_watched_reaches_the_manager_and_the_admins(ww: WebWorld) -> None:
    """HELP with nothing watched: the manager gets a help notice, the admins too; the reply
    names who was told."""
    ww.at(T0 - timedelta(minutes=30))  # 11:30: the 13:00 visit is not current
    text = reply_of(twilio(ww, "HELP"))
    assert text == (
        "No visit of yours is being watched, so Maria Jones and the visitwatch admins have "
        "been told you need help. If you are in danger call 999."
    )
    (manager,) = rows(ww, "help")
    assert manager["recipient_id"] == MARIA and manager["visit_id"] is None
    assert "Asha Khan texted HELP" in manager["text"] and ASHA_MOBILE in manager["text"]
    assert [r["recipient_id"] for r in rows(ww, "admin")] == [SAM]
    assert visit_state(ww) is VisitState.BOOKED
    ww.tick()
    assert MARIA in ww.world.recipients("help")


# ------------------------------------------------------------------ the real server


@pytest.fixture
def served(ww: WebWorld) -> Iterator[tuple[WebWorld, int]]:
    context = ww.service.web_context()
    config = ww.service.config
    # A free port, and a rate limit the four texts below would pass for pages.
    web = dataclasses.replace(config.web, port=0, rate_limit=2)
    server = WebServer(dataclasses.replace(context, config=dataclasses.replace(config, web=web)))
    server.start()
    try:
        yield ww, server.port
    finally:
        assert server.stop(5)


def test_through_the_real_server_texts_are_never_rate_limited(
    served: tuple[WebWorld, int],
) -> None:
    """waitress on loopback: signed posts past [web] rate_limit all act; replies are TwiML."""
    ww, port = served
    at(ww, 20)
    answers = []
    for body in ("extend 15", "extend 15", "extend 15", "safe"):
        form = {"MessageSid": f"SM-real-{len(answers)}", "From": ASHA_MOBILE, "Body": body}
        signature = RequestValidator(TWILIO_TOKEN).compute_signature(f"{BASE_URL}/sms/twilio", form)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request(
            "POST", "/sms/twilio", urlencode(form),
            {"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature},
        )  # fmt: skip
        response = connection.getresponse()
        answers.append((response.status, response.read().decode()))
        connection.close()
    assert [status for status, _ in answers] == [200] * 4
    assert "Checked in at 13:20" in answers[-1][1]
    assert [c["action"] for c in checkins(ww)] == ["extend"] * 3 + ["checkin"]


@pytest.mark.parametrize("body", ["STOP", "end", " Cancel. ", "unsubscribe"])
def test_a_provider_stop_word_is_its_own_command(body: str) -> None:
    """A text that is exactly an opt-out word is read as one (the provider blocks texts)."""
    assert parse(body) == Parsed(Command.OPT_OUT)


@pytest.mark.parametrize("body", ["end of visit, safe", "I am ok, stop worrying"])
def test_stop_words_inside_a_sentence_are_not_opt_outs(body: str) -> None:
    """Twilio matches the whole text only; so does visitwatch."""
    assert parse(body).command is Command.SAFE
