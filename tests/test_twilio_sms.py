"""The twilio_sms channel, with ``responses`` answering for api.twilio.com as Twilio documents.

Requests are asserted as Twilio's Message resource describes them (a form POST to
``/2010-04-01/Accounts/{AccountSid}/Messages.json`` with To, From or MessagingServiceSid and
Body, HTTP basic auth with the account SID and auth token); errors are answered in Twilio's
JSON shape (code, message, more_info, status) with the codes its error list gives.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from zoneinfo import ZoneInfo

import pytest
import requests
import responses
from structlog.testing import capture_logs

from tests.channel_contract import (
    ZARA,
    ChannelContract,
    Delivered,
    build_channel,
    contract_message,
)
from tests.connector_settings import config_problems
from visitwatch.connectors.registry import channel_class
from visitwatch.connectors.twilio_sms import TwilioSmsChannel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Recipient
from visitwatch.core.options import ConnectorContext

SID = "AC" + "0123456789abcdef" * 2
TOKEN = "f00dfeed0123456789abcdef0badcafe"
SERVICE = "MG" + "fedcba9876543210" * 2
SENDER = "+447700900123"
API = "https://api.twilio.com/2010-04-01"
MESSAGES = f"{API}/Accounts/{SID}/Messages.json"
NUMBERS = f"{API}/Accounts/{SID}/IncomingPhoneNumbers.json"
ACCOUNT = f"{API}/Accounts/{SID}.json"
SERVICE_URL = f"https://messaging.twilio.com/v1/Services/{SERVICE}"
LINK = "https://vw.example.org/a/Xk3"
PUBLIC = "https://visitwatch.example.org"


def refusal(status: int, code: int, message: str) -> dict[str, Any]:
    """An error answer as Twilio sends it."""
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def accepted(form: dict[str, str]) -> dict[str, Any]:
    """The Message resource Twilio answers a create with (201), trimmed to what matters."""
    return {
        "sid": "SM" + "a" * 32,
        "account_sid": SID,
        "to": form["To"],
        "from": form.get("From"),
        "messaging_service_sid": form.get("MessagingServiceSid"),
        "body": form["Body"],
        "status": "queued",
        "num_segments": "1",
        "error_code": None,
        "uri": f"/2010-04-01/Accounts/{SID}/Messages/SM{'a' * 32}.json",
    }


@dataclass
class Twilio:
    """The Messages endpoint: what was POSTed, and how it answers the next request."""

    mock: responses.RequestsMock
    answer: tuple[int, dict[str, Any]] | None = None  # None: accept

    def sent(self) -> list[dict[str, str]]:
        """The forms of the texts Twilio accepted."""
        return [
            {k: v[0] for k, v in parse_qs(str(call.request.body)).items()}
            for call in self.mock.calls
            if call.request.url == MESSAGES and call.response.status_code == 201
        ]

    def create(self, request: Any) -> tuple[int, dict[str, str], str]:
        form = {k: v[0] for k, v in parse_qs(str(request.body)).items()}
        if self.answer is not None:
            status, body = self.answer
            return status, {}, json.dumps(body)
        return 201, {}, json.dumps(accepted(form))


@pytest.fixture
def twilio() -> Iterator[Twilio]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        fake = Twilio(mock)
        mock.add_callback(responses.POST, MESSAGES, callback=fake.create)
        yield fake


@pytest.fixture
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ConnectorContext:
    monkeypatch.setenv("VW_TEST_TWILIO_TOKEN", TOKEN)
    return ConnectorContext(
        timezone=ZoneInfo("Europe/London"),
        state_dir=tmp_path,
        config_dir=tmp_path,
        user_agent="visitwatch/test",
    )


def table(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "account_sid": SID,
        "auth_token": {"env": "VW_TEST_TWILIO_TOKEN"},
        "from_number": "07700 900123",
    }
    return {k: v for k, v in {**base, **extra}.items() if v is not None}


def twilio_sms(context: ConnectorContext, **extra: Any) -> TwilioSmsChannel:
    channel: TwilioSmsChannel = build_channel(TwilioSmsChannel, table(**extra), context)
    return channel


class TestTwilioContract(ChannelContract):
    """twilio_sms keeps the channel contract; a text carries the short form."""

    sends_short_form = True

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [TOKEN, base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()]

    @pytest.fixture
    def make_channel(
        self, twilio: Twilio, context: ConnectorContext
    ) -> Callable[[], TwilioSmsChannel]:
        return lambda: twilio_sms(context)

    @pytest.fixture
    def delivered(self, twilio: Twilio) -> Callable[[], list[Delivered]]:
        # A text has no subject line: the body is what the phone shows.
        return lambda: [Delivered(form["Body"], form["Body"]) for form in twilio.sent()]

    @pytest.fixture
    def break_far_side(self, twilio: Twilio) -> Callable[[bool], None]:
        def fail(permanent: bool) -> None:
            twilio.answer = (
                (401, refusal(401, 20003, "Authenticate"))
                if permanent
                else (503, refusal(503, 20503, "Service Unavailable"))
            )

        return fail


# --------------------------------------------------------------------------- requests


def test_the_request_is_a_form_post_with_basic_auth(
    twilio: Twilio, context: ConnectorContext
) -> None:
    """To in E.164, From the sender, Body the text; basic auth with the SID and the token."""
    twilio_sms(context).send(replace(contract_message(), short=f"Zara is overdue. {LINK}"))
    [call] = twilio.mock.calls
    assert call.request.method == "POST" and call.request.url == MESSAGES
    assert call.request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    expected = base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    assert call.request.headers["Authorization"] == f"Basic {expected}"
    assert "visitwatch/test" in call.request.headers["User-Agent"]
    assert twilio.sent() == [
        {"To": "+447700900999", "From": SENDER, "Body": f"Zara is overdue. {LINK}"}
    ]


def test_every_call_has_the_timeout(twilio: Twilio, context: ConnectorContext) -> None:
    """The client is built with the channel's timeout, and requests carry it."""
    twilio_sms(context, timeout="7s").send(contract_message())
    [call] = twilio.mock.calls
    assert call.request.req_kwargs["timeout"] == 7.0


def test_a_messaging_service_sends_instead_of_a_number(
    twilio: Twilio, context: ConnectorContext
) -> None:
    """With messaging_service_sid the form names the service and no From."""
    twilio_sms(context, from_number=None, messaging_service_sid=SERVICE).send(contract_message())
    [form] = twilio.sent()
    assert form["MessagingServiceSid"] == SERVICE and "From" not in form


def test_an_old_row_sends_its_subject_with_the_link_in_two_segments(
    twilio: Twilio, context: ConnectorContext
) -> None:
    """No short form: the subject, cut at a word, then the whole link, within 306 septets."""
    long_subject = "Overdue: " + "the visit to the family home at the end of the lane " * 8
    twilio_sms(context).send(replace(contract_message(), subject=long_subject, link=LINK))
    [form] = twilio.sent()
    assert form["Body"].endswith(f"... {LINK}")
    assert len(form["Body"]) <= 306


def test_an_impossible_mobile_is_the_recipients_fault_by_id(
    twilio: Twilio, context: ConnectorContext
) -> None:
    """A number that cannot be a mobile: permanent, recipient_fault, naming the id only."""
    bad = Recipient(id="staff-9001", name="Ola Berg", mobile="0770 090")
    with capture_logs() as logs, pytest.raises(ConnectorError) as caught:
        twilio_sms(context).send(contract_message(recipient=bad))
    assert caught.value.permanent is True and caught.value.recipient_fault is True
    assert "staff-9001" in str(caught.value) and "0770 090" not in str(caught.value)
    loud = json.dumps([e for e in logs if e["log_level"] != "debug"], default=str)
    assert "0770 090" not in loud and "Ola Berg" not in loud
    assert len(twilio.mock.calls) == 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "code", "permanent", "recipient_fault", "words"),
    [
        (400, 21211, True, True, "correct it in the staff directory"),
        (400, 21614, True, True, "mobile number"),
        (400, 21610, True, True, "text START"),
        (400, 21608, True, True, "verify the number"),
        (400, 21408, True, False, "Geo permissions"),
        (400, 21606, True, False, "from_number"),
        (400, 21659, True, False, "from_number"),
        (400, 21212, True, False, "from_number"),
        (401, 20003, True, False, "auth_token"),
        (404, 20404, True, False, "account_sid"),
        (400, 21999, True, False, "twilio.com/docs/errors/21999"),
        (429, 20429, False, False, "429"),
        (500, 20500, False, False, "500"),
        (503, 20503, False, False, "503"),
    ],
)
def test_each_twilio_error_is_classed_with_a_hint(
    twilio: Twilio,
    context: ConnectorContext,
    status: int,
    code: int,
    permanent: bool,
    recipient_fault: bool,
    words: str,
) -> None:
    """Twilio's codes decide: the person's fault, the channel's, or worth a retry."""
    twilio.answer = (status, refusal(status, code, f"The 'To' number {ZARA.mobile} is bad"))
    with capture_logs() as logs, pytest.raises(ConnectorError) as caught:
        twilio_sms(context).send(contract_message())
    error = caught.value
    assert (error.permanent, error.recipient_fault) == (permanent, recipient_fault)
    assert words in str(error) and str(code) in str(error)
    if recipient_fault:
        assert ZARA.id in str(error)
    # Twilio's message quotes the number: never above debug.
    assert ZARA.mobile not in str(error) and "+447700900999" not in str(error)
    loud = json.dumps([e for e in logs if e["log_level"] != "debug"], default=str)
    assert "+447700900999" not in loud and ZARA.mobile not in loud


def test_a_429_without_json_is_still_temporary(twilio: Twilio, context: ConnectorContext) -> None:
    """A throttling answer that is not Twilio's JSON (a proxy's) is retried too."""
    twilio.mock.replace(responses.POST, MESSAGES, body="Too Many Requests", status=429)
    with pytest.raises(ConnectorError) as caught:
        twilio_sms(context).send(contract_message())
    assert caught.value.permanent is False


@pytest.mark.parametrize(
    ("failure", "words"),
    [
        (requests.ConnectTimeout("slow"), "did not answer within 15s"),
        (requests.ReadTimeout("slow"), "did not answer within 15s"),
        (requests.ConnectionError("refused"), "cannot reach Twilio"),
    ],
)
def test_no_answer_is_temporary(
    twilio: Twilio, context: ConnectorContext, failure: Exception, words: str
) -> None:
    """No connection or a timeout: retried later, and the token is not in the error."""
    twilio.mock.replace(responses.POST, MESSAGES, body=failure)
    with pytest.raises(ConnectorError, match=words) as caught:
        twilio_sms(context).send(contract_message())
    assert caught.value.permanent is False and TOKEN not in str(caught.value)


# --------------------------------------------------------------------------- check


def account(status: str = "active", kind: str = "Full") -> dict[str, Any]:
    return {"sid": SID, "friendly_name": "Visit safety", "status": status, "type": kind}


def numbers(sms_url: str = f"{PUBLIC}/sms/twilio", sms: bool = True) -> dict[str, Any]:
    found = [
        {
            "sid": "PN" + "b" * 32,
            "phone_number": SENDER,
            "sms_url": sms_url,
            "sms_method": "POST",
            "capabilities": {"sms": sms, "voice": True, "mms": False},
        }
    ]
    return {"incoming_phone_numbers": found, "next_page_uri": None, "page": 0, "page_size": 20}


def answer_check(twilio: Twilio, account_answer: dict[str, Any], numbers_answer: Any) -> None:
    twilio.mock.add(responses.GET, ACCOUNT, json=account_answer)
    twilio.mock.add(responses.GET, NUMBERS, json=numbers_answer)


def test_check_sends_nothing_and_says_what_it_could_not_verify(
    twilio: Twilio, context: ConnectorContext
) -> None:
    """Account active, sender owned; no text sent, and it says a phone was not reached."""
    answer_check(twilio, account(), numbers())
    summary = twilio_sms(context).check()
    assert f"Twilio account {SID} is active" in summary
    assert f"from_number {SENDER} is an SMS number of the account" in summary
    assert "not verified: that a text reaches a phone (nothing was sent)" in summary
    assert twilio.sent() == []
    lookup = next(c for c in twilio.mock.calls if c.request.url.startswith(NUMBERS))
    assert parse_qs(lookup.request.url.partition("?")[2])["PhoneNumber"] == [SENDER]


@pytest.mark.parametrize(("status", "words"), [("suspended", "suspended"), ("closed", "closed")])
def test_check_fails_for_an_account_that_is_not_active(
    twilio: Twilio, context: ConnectorContext, status: str, words: str
) -> None:
    """A suspended or closed account cannot text: check says so."""
    answer_check(twilio, account(status), numbers())
    with pytest.raises(ConnectorError, match=words) as caught:
        twilio_sms(context).check()
    assert caught.value.permanent is True


def test_check_notes_a_trial_account(twilio: Twilio, context: ConnectorContext) -> None:
    """A trial account texts verified numbers only: check says it."""
    answer_check(twilio, account(kind="Trial"), numbers())
    assert "trial account" in twilio_sms(context).check()


def test_check_fails_for_wrong_credentials(twilio: Twilio, context: ConnectorContext) -> None:
    """Twilio's 20003 at check time names the keys to fix and never the token."""
    twilio.mock.add(responses.GET, ACCOUNT, json=refusal(401, 20003, "Authenticate"), status=401)
    with pytest.raises(ConnectorError, match="auth_token") as caught:
        twilio_sms(context).check()
    assert caught.value.permanent is True and TOKEN not in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ({"incoming_phone_numbers": [], "next_page_uri": None}, "is not a number of"),
        (numbers(sms=False), "cannot send texts"),
    ],
)
def test_check_fails_for_a_sender_the_account_cannot_use(
    twilio: Twilio, context: ConnectorContext, answer: dict[str, Any], words: str
) -> None:
    """A from_number not among the account's numbers, or one without SMS, is a failure."""
    answer_check(twilio, account(), answer)
    with pytest.raises(ConnectorError, match=words):
        twilio_sms(context).check()


def test_check_finds_the_messaging_service(twilio: Twilio, context: ConnectorContext) -> None:
    """With a messaging service, check fetches it; a missing one (20404) fails."""
    twilio.mock.add(responses.GET, ACCOUNT, json=account())
    twilio.mock.add(responses.GET, SERVICE_URL, json={"sid": SERVICE, "friendly_name": "x"})
    channel = twilio_sms(context, from_number=None, messaging_service_sid=SERVICE)
    assert f"messaging service {SERVICE} exists" in channel.check()
    twilio.mock.replace(
        responses.GET, SERVICE_URL, json=refusal(404, 20404, "not found"), status=404
    )
    with pytest.raises(ConnectorError, match="messaging_service_sid"):
        channel.check()


@pytest.mark.parametrize(
    ("sms_url", "ok"),
    [(f"{PUBLIC}/sms/twilio", True), ("https://demo.twilio.com/welcome/sms/reply", False)],
)
def test_check_verifies_where_incoming_texts_go(
    twilio: Twilio, context: ConnectorContext, sms_url: str, ok: bool
) -> None:
    """inbound on and the public address known: the number's webhook must be ours."""
    answer_check(twilio, account(), numbers(sms_url=sms_url))
    public = replace(context, public_base_url=PUBLIC + "/")
    channel = twilio_sms(public, inbound=True)
    if ok:
        assert f"incoming texts to {SENDER} reach {PUBLIC}/sms/twilio" in channel.check()
    else:
        with pytest.raises(ConnectorError, match=f"set its .* webhook to {PUBLIC}/sms/twilio"):
            channel.check()


def test_check_says_when_it_cannot_know_where_texts_should_go(
    twilio: Twilio, context: ConnectorContext
) -> None:
    """Without the daemon's public address the webhook is named as not verified."""
    answer_check(twilio, account(), numbers(sms_url="https://elsewhere.example.org/"))
    summary = twilio_sms(context, inbound=True).check()
    assert "not verified: where incoming texts go" in summary


# --------------------------------------------------------------------------- settings


def problems(context: ConnectorContext, **extra: Any) -> dict[str, str]:
    found = config_problems(TwilioSmsChannel, table(**extra), context.config_dir)
    return {p.key: p.message for p in found}


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"account_sid": "AC123"}, "account_sid", "not a Twilio account SID"),
        ({"account_sid": "SK" + "0" * 32}, "account_sid", "not a Twilio account SID"),
        ({"from_number": "0770"}, "from_number", "not a possible mobile"),
        ({"messaging_service_sid": SERVICE}, "from_number", "exactly one"),
        ({"from_number": None}, "from_number", "exactly one"),
        (
            {"from_number": None, "messaging_service_sid": "MG12"},
            "messaging_service_sid",
            "not a Messaging Service SID",
        ),
        ({"auth_token": TOKEN}, "channels[0].auth_token", "cannot be written"),
        ({"timeout": "0s"}, "channels[0].timeout", "longer than zero"),
    ],
)
def test_settings_that_cannot_work_are_config_problems(
    context: ConnectorContext, extra: dict[str, Any], key: str, words: str
) -> None:
    """A malformed SID, no sender or two, an impossible number, an inline token."""
    found = problems(context, **extra)
    assert list(found) == [key] and words in found[key]


def test_takes_replies_follows_inbound() -> None:
    """Only a number whose incoming texts reach visitwatch invites replies."""
    assert TwilioSmsChannel.takes_replies({"inbound": True}) is True
    assert TwilioSmsChannel.takes_replies({"inbound": False}) is False
    assert TwilioSmsChannel.address_field == "mobile" and TwilioSmsChannel.broadcast is False


def test_the_registry_knows_twilio_sms() -> None:
    """type = "twilio_sms" in a config names this class."""
    assert channel_class("twilio_sms") is TwilioSmsChannel
