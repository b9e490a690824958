"""The GOV.UK Notify channels, against Notify's API as its documentation describes it.

``responses`` answers for api.notifications.service.gov.uk: the requests are asserted as
Notify documents them (``POST /v2/notifications/sms`` and ``/email``, JSON payload,
``Authorization: Bearer <JWT>`` signed with the key's secret), and the error answers are
those of Notify's documented error tables. Timeouts and refused connections use real
loopback sockets.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jwt
import pytest
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
from tests.hung_server import HungServer
from tests.mailserver import free_port
from visitwatch.connectors.notify import NotifyEmailChannel, NotifySmsChannel
from visitwatch.connectors.registry import channel_class
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import NotificationKind
from visitwatch.core.options import ConnectorContext
from visitwatch.core.sms import segments

API = "https://api.notifications.service.gov.uk"
SERVICE_ID = str(uuid.uuid4())
SECRET = str(uuid.uuid4())
API_KEY = f"visitwatch_live-{SERVICE_ID}-{SECRET}"
SMS_TEMPLATE = str(uuid.uuid4())
EMAIL_TEMPLATE = str(uuid.uuid4())
HELP_TEMPLATE = str(uuid.uuid4())
SENDER = str(uuid.uuid4())
INBOUND = "inbound-token-" + uuid.uuid4().hex
ZARA_E164 = "+447700900999"
LINK = "https://vw.example.org/a/eyJ2IjoxLCJwIjoiYWNrIn0.Zx9Qk2"


def refusal(status: int, error: str, message: str) -> dict[str, Any]:
    """An error answer as Notify's v2 API writes it."""
    return {"status_code": status, "errors": [{"error": error, "message": message}]}


def accepted(template: str) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "reference": "visitwatch-42",
        "content": {"body": "...", "from_number": "visitwatch"},
        "uri": f"{API}/v2/notifications/{uuid.uuid4()}",
        "template": {"id": template, "version": 1, "uri": f"{API}/v2/template/{template}"},
    }


@pytest.fixture
def notify() -> Iterator[responses.RequestsMock]:
    """Notify's API, accepting every notification until a test says otherwise."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        for kind in ("sms", "email"):
            mock.add(
                responses.POST, f"{API}/v2/notifications/{kind}", json=accepted(""), status=201
            )
        yield mock


@pytest.fixture
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ConnectorContext:
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", API_KEY)
    monkeypatch.setenv("VW_TEST_NOTIFY_INBOUND", INBOUND)
    return ConnectorContext(
        timezone=ZoneInfo("Europe/London"),
        state_dir=tmp_path,
        config_dir=tmp_path,
        user_agent="visitwatch/test",
    )


def sms(context: ConnectorContext, **extra: Any) -> NotifySmsChannel:
    table = {"api_key": {"env": "VW_TEST_NOTIFY_KEY"}, "template_id": SMS_TEMPLATE, **extra}
    channel: NotifySmsChannel = build_channel(NotifySmsChannel, table, context)
    return channel


def email(context: ConnectorContext, **extra: Any) -> NotifyEmailChannel:
    table = {"api_key": {"env": "VW_TEST_NOTIFY_KEY"}, "template_id": EMAIL_TEMPLATE, **extra}
    channel: NotifyEmailChannel = build_channel(NotifyEmailChannel, table, context)
    return channel


def sent(notify: responses.RequestsMock, kind: str) -> list[dict[str, Any]]:
    """The JSON bodies of the notifications Notify accepted, oldest first."""
    return [
        json.loads(call.request.body)
        for call in notify.calls
        if call.request.url == f"{API}/v2/notifications/{kind}"
        and getattr(call.response, "status_code", 0) == 201
    ]


def fail_with(notify: responses.RequestsMock, kind: str, status: int, answer: Any) -> None:
    notify.replace(responses.POST, f"{API}/v2/notifications/{kind}", json=answer, status=status)


BROKEN = {
    True: (403, refusal(403, "AuthError", "Invalid token: API key not found")),
    False: (500, refusal(500, "Exception", "Internal server error")),
}


class TestNotifySmsContract(ChannelContract):
    """notify_sms keeps the channel contract; a text carries the short form."""

    sends_short_form = True

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [API_KEY, SECRET]

    @pytest.fixture
    def make_channel(
        self, notify: responses.RequestsMock, context: ConnectorContext
    ) -> Callable[[], NotifySmsChannel]:
        return lambda: sms(context)

    @pytest.fixture
    def delivered(self, notify: responses.RequestsMock) -> Callable[[], list[Delivered]]:
        # A text has no subject line: the body is what the phone shows.
        return lambda: [
            Delivered(p["personalisation"]["body"], p["personalisation"]["body"])
            for p in sent(notify, "sms")
        ]

    @pytest.fixture
    def break_far_side(self, notify: responses.RequestsMock) -> Callable[[bool], None]:
        return lambda permanent: fail_with(notify, "sms", *BROKEN[permanent])


class TestNotifyEmailContract(ChannelContract):
    """notify_email keeps the channel contract."""

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [API_KEY, SECRET]

    @pytest.fixture
    def make_channel(
        self, notify: responses.RequestsMock, context: ConnectorContext
    ) -> Callable[[], NotifyEmailChannel]:
        return lambda: email(context)

    @pytest.fixture
    def delivered(self, notify: responses.RequestsMock) -> Callable[[], list[Delivered]]:
        return lambda: [
            Delivered(p["personalisation"]["subject"], p["personalisation"]["body"])
            for p in sent(notify, "email")
        ]

    @pytest.fixture
    def break_far_side(self, notify: responses.RequestsMock) -> Callable[[bool], None]:
        return lambda permanent: fail_with(notify, "email", *BROKEN[permanent])


# --------------------------------------------------------------------------- the wire


def assert_notify_auth(headers: Any) -> None:
    """Bearer JWT, HS256 under the key's secret part, iss = service id, iat = now."""
    scheme, _, token = headers["Authorization"].partition(" ")
    assert scheme == "Bearer"
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["iss"] == SERVICE_ID
    assert abs(claims["iat"] - time.time()) < 30  # Notify refuses tokens 30 s off
    assert headers["Content-type"] == "application/json"


def test_a_text_is_posted_as_notify_documents_it(
    notify: responses.RequestsMock, context: ConnectorContext
) -> None:
    """POST /v2/notifications/sms: E.164 number, template, ((body)), reference, sender."""
    message = replace(contract_message(), short=f"Zara is overdue. Ack: {LINK}")
    sms(context, sender_id=SENDER).send(message)
    [call] = notify.calls
    assert call.request.method == "POST"
    assert call.request.url == f"{API}/v2/notifications/sms"
    assert json.loads(call.request.body) == {
        "phone_number": ZARA_E164,
        "template_id": SMS_TEMPLATE,
        "personalisation": {"body": message.short},
        "reference": "visitwatch-42",
        "sms_sender_id": SENDER,
    }
    assert_notify_auth(call.request.headers)


def test_an_email_is_posted_as_notify_documents_it(
    notify: responses.RequestsMock, context: ConnectorContext
) -> None:
    """POST /v2/notifications/email: address, template, ((subject)) and ((body)), reply-to."""
    message = contract_message()
    email(context, sender_id=SENDER).send(message)
    [call] = notify.calls
    assert call.request.url == f"{API}/v2/notifications/email"
    assert json.loads(call.request.body) == {
        "email_address": ZARA.email,
        "template_id": EMAIL_TEMPLATE,
        "personalisation": {"subject": message.subject, "body": message.text},
        "reference": "visitwatch-42",
        "email_reply_to_id": SENDER,
    }
    assert_notify_auth(call.request.headers)


def test_a_kind_with_its_own_template_uses_it_and_others_the_generic_one(
    notify: responses.RequestsMock, context: ConnectorContext
) -> None:
    """templates.help overrides template_id for help messages only."""
    channel = sms(context, templates={"help": HELP_TEMPLATE})
    channel.send(contract_message(NotificationKind.HELP))
    channel.send(contract_message(NotificationKind.OVERRUN))
    assert [p["template_id"] for p in sent(notify, "sms")] == [HELP_TEMPLATE, SMS_TEMPLATE]


def test_a_long_subject_is_cut_to_two_segments_keeping_the_link_whole(
    notify: responses.RequestsMock, context: ConnectorContext
) -> None:
    """An old row without a short form: its subject, cut at a word, then the whole link."""
    long = "Overrun: " + " ".join(["Zara Quinn has not checked in from 9 Elm Row"] * 12)
    message = replace(contract_message(), subject=long, link=LINK)
    sms(context).send(message)
    [payload] = sent(notify, "sms")
    body = payload["personalisation"]["body"]
    assert segments(body) == 2
    assert body.endswith(f"... {LINK}")
    assert body.startswith("Overrun: Zara Quinn")


def test_an_invalid_number_is_the_recipients_fault_named_by_staff_id(
    notify: responses.RequestsMock, context: ConnectorContext
) -> None:
    """No request is made; the error names the staff id, never the number, above debug."""
    bad = replace(ZARA, mobile="07700 9009")
    with capture_logs() as logs, pytest.raises(ConnectorError) as caught:
        sms(context).send(contract_message(recipient=bad))
    assert caught.value.permanent and caught.value.recipient_fault
    assert ZARA.id in str(caught.value)
    assert "9009" not in str(caught.value)
    assert "9009" not in json.dumps([e for e in logs if e["log_level"] != "debug"])
    assert len(notify.calls) == 0


# --------------------------------------------------------------------------- errors

CASES = [
    # (status, error, Notify's message, permanent, recipient's fault, words of the hint)
    (400, "ValidationError", "phone_number Not a UK mobile number", True, True, "directory"),
    (400, "BadRequestError", "Can't send to this recipient using a team-only API key",
     True, True, "guest list"),
    (400, "BadRequestError", "Can't send to this recipient when service is in trial mode - "
     "see https://www.notifications.service.gov.uk/trial-mode", True, True, "go live"),
    (400, "BadRequestError", "Cannot send to international mobile numbers", True, True,
     "international numbers"),
    (400, "BadRequestError", "Missing personalisation: name", True, False, "((body))"),
    (400, "BadRequestError", f"sms_sender_id {SENDER} does not exist in database for service "
     f"id {SERVICE_ID}", True, False, "sender_id"),
    (403, "AuthError", "Invalid token: API key not found", True, False, "env VW_TEST_NOTIFY_KEY"),
    (403, "AuthError", "Error: Your system clock must be accurate to within 30 seconds", True,
     False, "NTP"),
    (403, "AuthError", "Invalid token: API key revoked", True, False, "new API key"),
    (403, "AuthError", "Invalid token: service is archived", True, False, "suspended"),
    (429, "RateLimitError", "Exceeded rate limit for key type LIVE of 3000 requests per 60 "
     "seconds", False, False, "backoff"),
    (429, "TooManyRequestsError", "Exceeded send limits (250000) for today", False, False,
     "daily limit"),
    (500, "Exception", "Internal server error", False, False, "retried"),
]  # fmt: skip


@pytest.mark.parametrize(("status", "error", "said", "permanent", "fault", "hint"), CASES)
def test_notify_errors_are_classed_with_a_hint_for_the_admin(
    notify: responses.RequestsMock,
    context: ConnectorContext,
    status: int,
    error: str,
    said: str,
    permanent: bool,
    fault: bool,
    hint: str,
) -> None:
    """Each documented answer: temporary or permanent, whose fault, and what to do."""
    fail_with(notify, "sms", status, refusal(status, error, said))
    with pytest.raises(ConnectorError) as caught:
        sms(context).send(contract_message())
    text = str(caught.value)
    assert (caught.value.permanent, caught.value.recipient_fault) == (permanent, fault), text
    assert hint in text
    assert said.split(" - ")[0] in text  # Notify's own words, for a search of its docs
    if fault:
        assert ZARA.id in text
    assert ZARA_E164 not in text and SECRET not in text


def test_an_invalid_email_address_is_the_recipients_fault(
    notify: responses.RequestsMock, context: ConnectorContext
) -> None:
    """400 ValidationError on email_address: permanent, about that person only."""
    answer = refusal(400, "ValidationError", "email_address Not a valid email address")
    fail_with(notify, "email", 400, answer)
    with pytest.raises(ConnectorError) as caught:
        email(context).send(contract_message())
    assert caught.value.permanent and caught.value.recipient_fault
    assert ZARA.id in str(caught.value) and ZARA.email not in str(caught.value)


def test_a_notify_that_does_not_answer_is_a_temporary_failure(context: ConnectorContext) -> None:
    """The timeout bounds the wait (connect accepted, no answer): temporary, says so."""
    with HungServer() as server:
        channel = sms(context, base_url=f"http://127.0.0.1:{server.port}", timeout="0.3s")
        with pytest.raises(ConnectorError) as caught:
            channel.send(contract_message())
    assert caught.value.permanent is False
    assert "did not answer within 0.3s" in str(caught.value)


def test_no_connection_is_a_temporary_failure_with_a_network_hint(
    context: ConnectorContext,
) -> None:
    """Connection refused: temporary, and the admin is told what to check."""
    channel = email(context, base_url=f"http://127.0.0.1:{free_port()}", timeout="2s")
    with pytest.raises(ConnectorError) as caught:
        channel.send(contract_message())
    assert caught.value.permanent is False
    assert "firewall" in str(caught.value)


# --------------------------------------------------------------------------- check


def template(kind: str, body: str, subject: str | None = None, id: str = "") -> dict[str, Any]:
    """A template as GET /v2/template/{id} returns it."""
    return {
        "id": id or str(uuid.uuid4()),
        "name": "visitwatch",
        "type": kind,
        "created_at": "2026-11-01 10:30:31.142535",
        "updated_at": None,
        "version": 2,
        "created_by": "admin@example.org",
        "subject": subject,
        "body": body,
        "letter_contact_block": None,
    }


def serve_template(notify: responses.RequestsMock, id: str, answer: Any, status: int = 200) -> None:
    notify.add(responses.GET, f"{API}/v2/template/{id}", json=answer, status=status)


def test_check_fetches_each_template_and_sends_nothing(
    notify: responses.RequestsMock, context: ConnectorContext
) -> None:
    """Good templates: one line saying what was verified and what only a send shows."""
    serve_template(notify, SMS_TEMPLATE, template("sms", "((body))", id=SMS_TEMPLATE))
    serve_template(notify, HELP_TEMPLATE, template("sms", "URGENT ((Body))", id=HELP_TEMPLATE))
    line = sms(context, templates={"help": HELP_TEMPLATE}, sender_id=SENDER).check()
    assert "2 text message template(s)" in line and "((body))" in line
    assert "sender id" in line and "trial mode" in line
    assert [c.request.method for c in notify.calls] == ["GET", "GET"]
    for call in notify.calls:
        assert_notify_auth(call.request.headers)


@pytest.mark.parametrize(
    ("found", "status", "problem"),
    [
        (template("sms", "((body))"), 200, "is a sms template, not e-mail"),
        (template("email", "((body))", subject="Alert"), 200, "does not show ((subject))"),
        (template("email", "((subject))", subject="((subject))"), 200, "does not show ((body))"),
        (
            template("email", "Dear ((first_name)) ((body))", subject="((subject))"),
            200,
            "needs ((first_name))",
        ),
        (refusal(404, "NoResultFound", "No result found"), 404, f"no template {EMAIL_TEMPLATE}"),
    ],
)
def test_check_reports_a_template_that_would_fail_a_send(
    notify: responses.RequestsMock,
    context: ConnectorContext,
    found: dict[str, Any],
    status: int,
    problem: str,
) -> None:
    """Wrong type, a placeholder we fill missing, one we do not fill, or no such template."""
    serve_template(notify, EMAIL_TEMPLATE, found, status)
    with pytest.raises(ConnectorError) as caught:
        email(context).check()
    assert caught.value.permanent
    assert problem in str(caught.value) and "template_id" in str(caught.value)


def test_check_with_a_refused_key_says_where_the_key_was_read(
    notify: responses.RequestsMock, context: ConnectorContext
) -> None:
    """403 on the template: the key is at fault, named by where it was read, never shown."""
    serve_template(
        notify, SMS_TEMPLATE, refusal(403, "AuthError", "Invalid token: API key not found"), 403
    )
    with pytest.raises(ConnectorError) as caught:
        sms(context).check()
    assert "env VW_TEST_NOTIFY_KEY" in str(caught.value)
    assert SECRET not in str(caught.value)


# --------------------------------------------------------------------------- settings


def test_replies_are_heard_only_with_the_inbound_token(context: ConnectorContext) -> None:
    """takes_replies: notify_sms with inbound_token; without it, or e-mail, never."""
    listening = sms(context, inbound_token={"env": "VW_TEST_NOTIFY_INBOUND"})
    assert NotifySmsChannel.takes_replies(listening.settings)
    assert listening.settings["inbound_token"].reveal() == INBOUND
    assert not NotifySmsChannel.takes_replies(sms(context).settings)
    assert not NotifyEmailChannel.takes_replies(email(context).settings)
    assert channel_class("notify_sms") is NotifySmsChannel
    assert channel_class("notify_email") is NotifyEmailChannel


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"api_key": {"env": "VW_TEST_BAD_KEY"}}, "api_key", "not a Notify API key (read from "
         "env VW_TEST_BAD_KEY)"),
        ({"template_id": "welcome-text"}, "template_id", "is not an id"),
        ({"templates": {"overun": HELP_TEMPLATE}}, "templates.overun", "did you mean 'overrun'"),
        ({"templates": {"help": "42"}}, "templates.help", "is not an id"),
        ({"sender_id": "visitwatch"}, "sender_id", "is not an id"),
        ({"base_url": "http://notify.example.org"}, "base_url", "https://"),
    ],
)  # fmt: skip
def test_settings_problems_name_the_key_and_never_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], key: str, words: str
) -> None:
    """A mistyped key, id, kind or plain-http URL is a config problem naming the option."""
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", API_KEY)
    monkeypatch.setenv("VW_TEST_BAD_KEY", f"{SERVICE_ID}-{SECRET[:-4]}")
    table = {"api_key": {"env": "VW_TEST_NOTIFY_KEY"}, "template_id": SMS_TEMPLATE, **extra}
    problems = config_problems(NotifySmsChannel, table, tmp_path)
    assert [p.key for p in problems] == [key]
    assert words in str(problems[0])
    assert SECRET[:-4] not in str(problems[0])


def test_a_key_without_its_name_and_a_loopback_url_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client reads the last 73 characters; http:// is fine on this machine."""
    monkeypatch.setenv("VW_TEST_NOTIFY_KEY", f"{SERVICE_ID}-{SECRET}")
    table = {
        "api_key": {"env": "VW_TEST_NOTIFY_KEY"},
        "template_id": EMAIL_TEMPLATE,
        "base_url": "http://127.0.0.1:8080",
    }
    assert config_problems(NotifyEmailChannel, table, tmp_path) == []
