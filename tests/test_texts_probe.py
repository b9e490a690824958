"""Issue 10 probed as a hostile sender and a careless admin would: forged and replayed
texts, empty secrets, odd numbers and commands, text fitting at the edges, what reaches a
shared channel, and how channel health treats flapping. Known bugs are strict xfails
naming the fix."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

from tests.conftest import T0, World, home_visit, tick
from tests.daemon_process import channel_block
from tests.scripted import OK, PERMANENT, Script
from tests.test_inbound_sms import (
    ASHA_MOBILE,
    CHANNELS,
    START,
    STRANGER,
    TWILIO_TOKEN,
    UUID,
    at,
    checkins,
    notify,
    reply_of,
    rows,
    texting_world,
    twilio,
    visit_state,
)
from tests.texts_probe_channels import RecordingPlace
from tests.web_client import BASE_URL, WebWorld, web_world
from visitwatch.connectors import registry
from visitwatch.core import sms
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.config import ConfigError, load_config
from visitwatch.daemon.sms_commands import Command, parse

ASHA = "asha.khan@example.org"
MARIA = "maria.jones@example.org"
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture
def ww(world: World, monkeypatch: pytest.MonkeyPatch) -> WebWorld:
    return texting_world(world, monkeypatch)


def audit_causes(ww: WebWorld) -> list[str]:
    return [r["cause"] for r in ww.service.store.query("SELECT cause FROM audit ORDER BY id")]


# ------------------------------------------------------------------ forged and odd posts


def test_a_signature_over_another_url_or_query_is_refused(ww: WebWorld) -> None:
    """Signed for another path, another host, or with a query the post does not carry
    (or the reverse): 403 every time, the visit untouched."""
    at(ww, 75)
    assert twilio(ww, "SAFE", sign_as=f"{BASE_URL}/sms/notify").status_code == 403
    assert twilio(ww, "SAFE", sign_as="https://evil.example.org/sms/twilio").status_code == 403
    assert twilio(ww, "SAFE", sign_as=f"{BASE_URL}/sms/twilio?x=1").status_code == 403
    form = {"MessageSid": "SM-q", "From": ASHA_MOBILE, "Body": "SAFE"}
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(f"{BASE_URL}/sms/twilio", form)
    moved = ww.client.post(
        "/sms/twilio?From=%2B447700900123", data=form, headers={"X-Twilio-Signature": signature}
    )
    assert moved.status_code == 403
    assert visit_state(ww) is VisitState.OVERDUE and checkins(ww) == []


def test_a_form_with_two_from_fields_cannot_be_forged(ww: WebWorld) -> None:
    """A second From appended to a signed form breaks the signature: 403."""
    at(ww, 75)
    form = {"MessageSid": "SM-two", "From": STRANGER, "Body": "SAFE"}
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(f"{BASE_URL}/sms/twilio", form)
    body = "MessageSid=SM-two&From=%2B447700900123&From=%2B447700900777&Body=SAFE"
    response = ww.client.post(
        "/sms/twilio",
        data=body,
        content_type="application/x-www-form-urlencoded",
        headers={"X-Twilio-Signature": signature},
    )
    assert response.status_code == 403 and checkins(ww) == []


def test_json_instead_of_a_form_acts_on_nothing(ww: WebWorld) -> None:
    """JSON to Twilio's endpoint signed over the bare URL (no form): nothing from it is read."""
    at(ww, 75)
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(f"{BASE_URL}/sms/twilio", {})
    response = ww.client.post(
        "/sms/twilio",
        json={"From": ASHA_MOBILE, "Body": "SAFE"},
        headers={"X-Twilio-Signature": signature},
    )
    assert response.status_code in (200, 403)
    assert visit_state(ww) is VisitState.OVERDUE and checkins(ww) == []


def test_a_huge_or_non_utf8_body_changes_nothing_it_should_not(ww: WebWorld) -> None:
    """A body over [web] max_body is refused before it is read; a signed text of 1,500
    characters or of bytes that are not UTF-8 gets a one- or two-segment reply."""
    at(ww, 75)
    limit = ww.service.config.web.max_body
    oversized = ww.client.post(
        "/sms/twilio", data={"Body": "x" * (limit + 1)}, headers={"X-Twilio-Signature": "x"}
    )
    assert oversized.status_code == 413
    long_reply = reply_of(twilio(ww, "please " * 200 + "extend 45"))
    assert long_reply.startswith("Extended by 45 minutes") and sms.segments(long_reply) <= 2
    raw = b"MessageSid=SM-latin&From=%2B447700900123&Body=%FF%FEsafe"
    form = {"MessageSid": "SM-latin", "From": ASHA_MOBILE, "Body": "\ufffd\ufffdsafe"}
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(f"{BASE_URL}/sms/twilio", form)
    answer = ww.client.post(
        "/sms/twilio",
        data=raw,
        content_type="application/x-www-form-urlencoded",
        headers={"X-Twilio-Signature": signature},
    )
    assert answer.status_code in (200, 403)
    assert sms.segments(reply_of(twilio(ww, "\U0001f600" * 300))) <= 2


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer "])
def test_the_bearer_scheme_is_read_in_any_case(ww: WebWorld, scheme: str) -> None:
    """RFC 6750: "bearer" in any case (and an extra space) is the same scheme."""
    at(ww, 75)
    response = ww.client.post(
        "/sms/notify",
        json={"id": "n-case", "source_number": "447700900123", "message": "ok"},
        headers={"Authorization": f"{scheme} notify-inbound-token-for-tests"},
    )
    assert response.status_code == 200 and visit_state(ww) is VisitState.RESOLVED


@pytest.mark.parametrize(
    "header",
    ["Basic notify-inbound-token-for-tests", "Bearer", "Bearer notify-inbound-token-for-test",
     "Bearer notify-inbound-token-for-testsX", "notify-inbound-token-for-tests"],
)  # fmt: skip
def test_anything_but_the_exact_token_is_refused(ww: WebWorld, header: str) -> None:
    """Another scheme, no token, a prefix or an extension of the token: 403."""
    at(ww, 75)
    response = ww.client.post(
        "/sms/notify",
        json={"id": "n-x", "source_number": "447700900123", "message": "ok"},
        headers={"Authorization": header},
    )
    assert response.status_code == 403 and visit_state(ww) is VisitState.OVERDUE


def test_a_captured_safe_replayed_days_later_acts_on_nothing(ww: WebWorld) -> None:
    """A signed SAFE captured on Monday and replayed on Thursday does not check in
    Thursday's visit."""
    at(ww, 75)
    form = {"MessageSid": "SM-captured", "From": ASHA_MOBILE, "Body": "SAFE"}
    signature = RequestValidator(TWILIO_TOKEN).compute_signature(f"{BASE_URL}/sms/twilio", form)
    first = ww.client.post("/sms/twilio", data=form, headers={"X-Twilio-Signature": signature})
    assert first.status_code == 200 and visit_state(ww) is VisitState.RESOLVED
    later = START + timedelta(days=3)
    ww.world.write_calendar(home_visit(), home_visit("visit-thu", start=later,
                                                     end=later + timedelta(hours=1)))  # fmt: skip
    ww.at(later - timedelta(hours=1))
    assert twilio(ww, "what now").status_code == 200  # any genuine text prunes old ids
    ww.at(later + timedelta(minutes=75))
    ww.tick()
    replayed = ww.client.post("/sms/twilio", data=form, headers={"X-Twilio-Signature": signature})
    assert replayed.status_code in (200, 403)
    thursday = ww.service.store.one("SELECT state FROM visits WHERE uid = 'visit-thu'")
    assert thursday == {"state": "overdue"}


# ------------------------------------------------------------------ careless secrets


def _load(world: World, channels: str) -> Any:
    world.channels = channels
    world.daemon += f'public_base_url = "{BASE_URL}"\n\n[web]\nenabled = true\n'
    return load_config(world.write_config())


def test_an_empty_twilio_auth_token_never_lets_a_forged_post_in(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auth_token from an empty environment variable: either the config is refused, or a
    post signed under the empty key (anyone can compute it) is refused."""
    monkeypatch.setenv("VW_PROBE_EMPTY", "")
    world.channels = CHANNELS.replace("VW_TEST_TWILIO_TOKEN", "VW_PROBE_EMPTY")
    try:
        web = texting_world(world, monkeypatch)
    except ConfigError as err:
        assert "auth_token" in str(err)
        return
    at(web, 75)
    assert twilio(web, "SAFE", token="").status_code == 403
    assert visit_state(web) is VisitState.OVERDUE


def test_a_blank_notify_inbound_token_is_a_config_problem(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """inbound_token from an empty environment variable: the config is refused."""
    monkeypatch.setenv("VW_TEST_TWILIO_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", f"test-{UUID}-{UUID}")
    monkeypatch.setenv("VW_TEST_NOTIFY_INBOUND", "")
    with pytest.raises(ConfigError, match="inbound_token"):
        _load(world, CHANNELS)


# ------------------------------------------------------------------ Twilio's own keywords


@pytest.mark.parametrize("word", ["STOP", "end", "Cancel"])
def test_a_worker_who_texts_a_twilio_opt_out_word_is_reported(ww: WebWorld, word: str) -> None:
    """A worker texting END (the visit ended) or STOP is opted out by Twilio itself: the
    admins hear that texts to them are blocked."""
    at(ww, 30)
    reply_of(twilio(ww, word))
    notices = [r for r in rows(ww, "admin") if "Asha Khan" in r["text"]]
    assert notices and any("START" in r["text"] for r in notices)


def test_the_readme_warns_that_twilio_reserves_help_stop_and_end() -> None:
    """The admin is told which words Twilio intercepts before visitwatch hears them."""
    text = README.read_text(encoding="utf-8")
    replies = text[text.index("### Replies by text") :]
    replies = replies[: replies.index("\n## ")] if "\n## " in replies else replies
    assert "opt-out" in replies.lower() and "END" in replies and "INFO" in replies


@pytest.mark.parametrize(
    ("body", "command"),
    [("\U0001f198 HELP \U0001f198", Command.HELP), ("sAfE \U0001f44d", Command.SAFE),
     ("Stop", Command.OPT_OUT), ("ＳＡＦＥ", Command.UNKNOWN), ("h.e.l.p", Command.UNKNOWN),
     ("I am NOT ok", Command.HELP), ("ok not safe", Command.HELP)],
)  # fmt: skip
def test_commands_with_emoji_and_mixed_case(body: str, command: Command) -> None:
    """Emoji and case do not hide a command; a "not ok" anywhere is help."""
    assert parse(body).command is command


@pytest.mark.parametrize(
    ("body", "said", "moved"),
    [
        ("EXTEND 99999", "Extended by 60 minutes (60 minutes is the most at once)", 60),
        ("EXTEND -5", "EXTEND takes 15 to 60 minutes", 0),
        ("EXTEND 1e9", "EXTEND takes 15 to 60 minutes", 0),
        ("extend 0", "EXTEND takes 15 to 60 minutes", 0),
        ("extend 1000h", "Extended by 60 minutes (60 minutes is the most at once)", 60),
    ],
)
def test_absurd_extensions_are_bounded_or_refused(
    ww: WebWorld, body: str, said: str, moved: int
) -> None:
    """Huge, negative or scientific amounts never move the deadline past the page's most."""
    at(ww, 30)
    assert reply_of(twilio(ww, body)).startswith(said)
    deadline = ww.service.watcher.visits.current(ww.visit_id()).deadline
    assert deadline == START + timedelta(hours=1, minutes=moved)


# ------------------------------------------------------------------ who is texting


@pytest.mark.parametrize(
    "source", ["447700900123", "07700900123", "+447700900123", "00447700900123", "+44 7700 900123"]
)
def test_a_workers_number_in_any_usual_form_finds_them(ww: WebWorld, source: str) -> None:
    """Notify's source_number in any form a UK mobile is written: the worker is found."""
    at(ww, 75)
    assert notify(ww, "ok", source=source).status_code == 200
    assert visit_state(ww) is VisitState.RESOLVED


def test_help_then_safe_before_delivery_still_tells_the_manager(ww: WebWorld) -> None:
    """HELP then SAFE before anything was sent: the manager still hears of the help."""
    at(ww, 20)
    assert reply_of(twilio(ww, "HELP")).startswith("Help is on its way: Maria Jones")
    assert reply_of(twilio(ww, "safe")).startswith("Checked in at 13:20")
    assert [c["action"] for c in checkins(ww)] == ["help", "checkin"]
    ww.tick()
    heard = [m for m in ww.world.messages() if m["recipient"]["id"] == MARIA]
    assert any(m["kind"] in ("help", "all_clear") for m in heard)


def test_a_visit_removed_from_the_calendar_while_under_way_still_takes_safe(
    ww: WebWorld,
) -> None:
    """Asha's entry deleted at 13:30 mid-visit: still watched, and SAFE by text closes it."""
    later = [home_visit(f"later-{n}", start=START + timedelta(hours=3 + n),
                        end=START + timedelta(hours=4 + n)) for n in range(3)]  # fmt: skip
    ww.world.write_calendar(home_visit(), *later)
    at(ww, 10)
    first = ww.service.store.one("SELECT id FROM visits WHERE uid = 'visit-1'")
    assert first
    ww.world.write_calendar(*later)
    at(ww, 30)
    assert visit_state(ww, first["id"]) is not VisitState.RESOLVED
    assert reply_of(twilio(ww, "SAFE")).startswith("Checked in at 13:30")
    assert visit_state(ww, first["id"]) is VisitState.RESOLVED


def test_a_stranger_texting_help_never_reaches_a_shared_channel(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HELP from an unknown number (its number in the notice) goes to the admins only, even
    with a place that takes admin notices."""
    monkeypatch.setitem(
        registry.CHANNELS, "probe_place", f"{RecordingPlace.__module__}:RecordingPlace"
    )
    world.channels = CHANNELS + channel_block("team", "probe_place", kinds=["admin", "help"])
    web = texting_world(world, monkeypatch)
    reply_of(twilio(web, "help", sender=STRANGER))
    assert rows(web, "admin") and all(r["channel"] != "team" for r in rows(web, "admin"))


# ------------------------------------------------------------------ what reaches a place


def _place_world(world: World, scripted: dict[str, Script], **sms: Any) -> WebWorld:
    """Alerts by a scripted per-person "sms"; a recording place "team"; admin outbox."""
    RecordingPlace.posts.clear()
    world.channels = (
        channel_block("sms", "scripted", **sms)
        + channel_block("team", "probe_place", kinds=["overrun", "escalation", "help"])
        + channel_block("outbox", "outbox", path="outbox.jsonl", kinds=["admin"])
    )
    web = web_world(world)
    world.write_calendar(home_visit())
    web.tick()
    scripted.setdefault("sms", Script())
    return web


def test_a_place_as_fallback_never_gets_a_persons_signed_link(
    world: World, scripted_channels: dict[str, Script], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-person channel refuses for good, its fallback is a shared place: no
    person's message (nor their signed page) is posted there."""
    monkeypatch.setitem(
        registry.CHANNELS, "probe_place", f"{RecordingPlace.__module__}:RecordingPlace"
    )
    try:
        web = _place_world(world, scripted_channels, fallback="team")
    except ConfigError as err:
        assert "fallback" in str(err)
        return
    scripted_channels["sms"].set(PERMANENT)
    at(web, 76)
    web.tick()
    personal = [p for p in RecordingPlace.posts if p.recipient.id != "team"]
    assert personal == []
    assert not any("/a/" in p.link or "/v/" in p.link for p in RecordingPlace.posts)


def test_admin_notices_never_reach_a_place_even_when_its_kinds_say_admin(
    world: World, scripted_channels: dict[str, Script], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A place whose kinds include admin gets no admin notice (they name people and why
    they could not be reached): only the admins' own channels do."""
    monkeypatch.setitem(
        registry.CHANNELS, "probe_place", f"{RecordingPlace.__module__}:RecordingPlace"
    )
    RecordingPlace.posts.clear()
    world.channels = (
        channel_block("sms", "scripted")
        + channel_block("team", "probe_place", kinds=["admin", "overrun"])
        + channel_block("outbox", "outbox", path="outbox.jsonl", kinds=["admin"])
    )
    web = web_world(world)
    world.write_calendar(home_visit())
    scripted_channels.setdefault("sms", Script()).set(PERMANENT)
    for minutes in (0, 61, 76, 110):
        at(web, minutes)
    assert world.messages("admin"), "the outage should have been announced"
    assert [p.kind for p in RecordingPlace.posts if p.kind == "admin"] == []
    assert all(p.recipient.id == "team" for p in RecordingPlace.posts)


# ------------------------------------------------------------------ channel health


def test_a_flapping_channel_does_not_flood_the_admins(
    world: World, scripted_channels: dict[str, Script]
) -> None:
    """Refused, delivered, refused... six times in an hour: a handful of notices, not twelve."""
    world.channels = channel_block("sms", "scripted", fallback="outbox") + channel_block(
        "outbox", "outbox", path="outbox.jsonl", kinds=["admin"]
    )
    visits = [home_visit(f"v{n}", start=T0, end=T0 + timedelta(minutes=10 + 5 * n))
              for n in range(12)]  # fmt: skip
    world.write_calendar(*visits)
    service = world.service()
    script = scripted_channels.setdefault("sms", Script())
    for n in range(12):
        script.set(PERMANENT if n % 2 == 0 else OK)
        world.at(T0 + timedelta(minutes=10 + 5 * n, seconds=5))
        tick(service)
    about = [m for m in world.messages("admin") if "'sms'" in m["subject"]]
    assert len(about) <= 4, [m["subject"] for m in about]


# ------------------------------------------------------------------ fitting a text


GSM_WORDS = st.text(alphabet=st.characters(codec="utf-8"), max_size=400)


@settings(max_examples=200, deadline=None)
@given(body=GSM_WORDS, base=st.integers(min_value=10, max_value=120))
def test_the_link_survives_whole_and_the_text_stays_within_two_segments(
    body: str, base: int
) -> None:
    """Any words (emoji, accents, extended GSM characters, 400 of them) with a short link
    under a base URL up to 120 characters: GSM-7, two segments at most, the link whole at
    the end."""
    link = f"https://{'v' * base}.org/s/AbCdEf-_1234"
    text = sms.fit(body, link)
    assert sms.to_gsm(text) == text
    assert sms.segments(text) <= 2
    assert text.endswith(link)


def test_a_300_character_address_and_non_gsm_names_keep_the_link(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An overrun at a 300-character address of Polish letters and curly quotes at a 300-character address: the text is
    GSM-7, at most two segments, and ends with a short link that opens the alert page."""
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", f"test-{UUID}-{UUID}")
    world.channels = channel_block("outbox", "outbox", path="outbox.jsonl") + textwrap.dedent(f"""
        [[channels]]
        name = "texts"
        type = "notify_sms"
        api_key = {{ env = "VW_TEST_NOTIFY_KEY" }}
        template_id = "{UUID}"
        base_url = "http://127.0.0.1:9"
    """)
    web = web_world(world)
    place = "Flat 3, " + "Łódź Street ‘The Old Mill’ " * 11
    world.write_calendar(home_visit(location=place[:300]))
    web.tick()
    at(web, 80)
    [row] = web.service.store.query(
        "SELECT short, link FROM notifications WHERE kind = 'overrun' AND channel = 'texts'"
    )
    text = row["short"]
    assert sms.to_gsm(text) == text and sms.segments(text) <= 2
    link = text.rsplit(" ", 1)[1]
    assert link.startswith(f"{BASE_URL}/s/")
    hop = web.client.get(link.removeprefix(BASE_URL))
    assert hop.status_code == 303 and hop.headers["Location"].startswith("/a/")


def test_a_base_url_too_long_for_a_text_is_a_config_problem(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """public_base_url of 320 characters: the config says texts cannot carry it."""
    monkeypatch.setenv("VW_TEST_TWILIO_TOKEN", TWILIO_TOKEN)
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", f"test-{UUID}-{UUID}")
    monkeypatch.setenv("VW_TEST_NOTIFY_INBOUND", "x" * 32)
    world.channels = CHANNELS
    long_base = "https://vw.example.org/" + "p" * 297
    world.daemon += f'public_base_url = "{long_base}"\n\n[web]\nenabled = true\n'
    assert sms.segments(sms.fit("OVERDUE: Asha", long_base + "/s/AbCdEfGhIjKl")) > 2
    with pytest.raises(ConfigError, match="public_base_url"):
        load_config(world.write_config())
