"""The Graph mail channel, against ``responses`` at the Entra/Graph boundary and FakeGraph.

The ``responses`` tests pin the exact requests (body, headers, token) and how each of
Graph's failures is classed; the FakeGraph tests run msal, requests and TLS for real.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
import responses
from structlog.testing import capture_logs

from tests.connector_settings import config_problems
from tests.graph_mock import add_token
from tests.graph_server import (
    FakeGraph,
    graph_user,
    iter_sent_headers,
    jwt_claims,
    unsigned_token,
)
from visitwatch.connectors.graph_mail import GraphMailChannel, render_html
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, Recipient
from visitwatch.core.options import ConnectorContext, validate_options

TENANT = "00000000-0000-0000-0000-0000000000aa"
CLIENT_ID = "11111111-1111-1111-1111-111111111111"
SECRET = "not-a-real-secret-value"
SENDER = "visitwatch@contoso.org"
LOGIN = f"https://login.microsoftonline.com/{TENANT}"
TOKEN_URL = f"{LOGIN}/oauth2/v2.0/token"
SEND_URL = f"https://graph.microsoft.com/v1.0/users/{SENDER}/sendMail"
USER_URL = f"https://graph.microsoft.com/v1.0/users/{SENDER}"
MARIA = Recipient(id="maria.jones@contoso.org", name="Maria Jones", email="maria.jones@contoso.org")
TEXT = (
    "Sam Green's visit to 12 High Street was due to end at 14:00.\n"
    "Please call Sam on 07700 900123.\n"
    "\n"
    "Notes: <b>dog</b> & gate code 1234"
)


def make_token(roles: list[str]) -> str:
    """An access token shaped like Entra's: a JWT whose payload carries ``roles``."""
    return unsigned_token({"roles": roles, "tid": TENANT})


TOKEN = make_token(["Calendars.Read", "Mail.Send"])


def make_message(
    *, id: int = 41, kind: str = "overrun", recipient: Recipient = MARIA, text: str = TEXT
) -> Message:
    return Message(
        id=id,
        kind=kind,
        visit_id="visit-7f3a",
        recipient=recipient,
        channel="outlook",
        subject="Overdue: Sam Green at 12 High Street",
        text=text,
        created=datetime(2026, 11, 23, 14, 15, tzinfo=UTC),
    )


@pytest.fixture
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ConnectorContext:
    monkeypatch.setenv("VW_TEST_GRAPH_SECRET", SECRET)
    return ConnectorContext(
        timezone=ZoneInfo("Europe/London"),
        state_dir=tmp_path,
        config_dir=tmp_path,
        user_agent="visitwatch/test",
    )


def make_channel(context: ConnectorContext, **extra: Any) -> GraphMailChannel:
    """Validate a table the way the config loader does, then construct the channel."""
    table: dict[str, Any] = {
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "client_secret": {"env": "VW_TEST_GRAPH_SECRET"},
        "sender": SENDER,
        **extra,
    }
    settings, problems = validate_options(
        table, GraphMailChannel.options, "channels[0]", context.config_dir
    )
    assert problems == [], [str(p) for p in problems]
    channel = GraphMailChannel("outlook", settings, context)
    channel.client._sleep = lambda seconds: None  # Retry-After waits cost no test time
    return channel


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    """Entra's discovery document and token endpoint; tests add the Graph answers."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        add_token(mock, TOKEN, tenant=TENANT)
        yield mock


def graph_error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def calls_to(mock: responses.RequestsMock, url: str) -> list[Any]:
    return [c for c in mock.calls if c.request.url.split("?")[0] == url]


# --------------------------------------------------------------------------- sending


def test_send_posts_html_mail_with_headers_and_high_importance(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """An overrun becomes one sendMail: escaped HTML body, recipient, headers, high importance."""
    rsps.post(SEND_URL, status=202)
    channel = make_channel(context)

    channel.send(make_message())

    (call,) = calls_to(rsps, SEND_URL)
    assert call.request.headers["Authorization"] == f"Bearer {TOKEN}"
    body = json.loads(call.request.body)
    assert body["saveToSentItems"] is False
    mail = body["message"]
    assert mail["subject"] == "Overdue: Sam Green at 12 High Street"
    assert mail["toRecipients"] == [
        {"emailAddress": {"address": "maria.jones@contoso.org", "name": "Maria Jones"}}
    ]
    assert mail["importance"] == "high"
    assert mail["body"]["contentType"] == "HTML"
    content = mail["body"]["content"]
    assert "Please call Sam on 07700 900123." in content
    assert "Sam Green&#x27;s visit" in content  # escaped, not markup
    assert "&lt;b&gt;dog&lt;/b&gt; &amp; gate code 1234" in content
    assert "<b>" not in content
    assert content.count("<p ") == 2  # the blank line separates two paragraphs
    assert {h["name"]: h["value"] for h in mail["internetMessageHeaders"]} == {
        "X-Visitwatch-Notification": "41",
        "X-Visitwatch-Visit": "visit-7f3a",
        "X-Auto-Response-Suppress": "All",
    }


def test_plain_text_when_html_is_off_and_normal_importance_for_reminders(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """html = false sends the text as is; a reminder is not flagged; saveToSentItems follows."""
    rsps.post(SEND_URL, status=202)
    channel = make_channel(context, html=False, save_to_sent_items=True)

    channel.send(make_message(kind="reminder"))

    body = json.loads(calls_to(rsps, SEND_URL)[0].request.body)
    assert body["message"]["body"] == {"contentType": "Text", "content": TEXT}
    assert "importance" not in body["message"]
    assert body["saveToSentItems"] is True


def test_render_html_keeps_lines_and_escapes() -> None:
    """Line breaks become <br>, blank lines paragraphs, and markup in the text is escaped."""
    page = render_html("one\ntwo <x>\n\nthree")
    assert "one<br>two &lt;x&gt;</p>" in page
    assert page.count("<p ") == 2


def test_throttled_send_waits_retry_after_then_succeeds(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """A 429 with Retry-After is waited out by the client and the retry's 202 is success."""
    rsps.post(
        SEND_URL,
        status=429,
        headers={"Retry-After": "7"},
        json=graph_error("ApplicationThrottled", "Too many requests"),
    )
    rsps.post(SEND_URL, status=202)
    channel = make_channel(context)
    waits: list[float] = []
    channel.client._sleep = waits.append

    channel.send(make_message())

    assert len(calls_to(rsps, SEND_URL)) == 2
    assert len(waits) == 1 and 7 <= waits[0] <= 7 * 1.2  # Retry-After plus at most 20 % jitter


def test_graph_unavailable_five_times_is_temporary(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """503 on every attempt ends in a temporary ConnectorError, so the dispatcher retries later."""
    for _ in range(5):
        rsps.post(SEND_URL, status=503, json=graph_error("ServiceUnavailable", "try later"))
    channel = make_channel(context)

    with pytest.raises(ConnectorError) as caught:
        channel.send(make_message())

    assert caught.value.permanent is False
    assert "503" in str(caught.value)
    assert len(calls_to(rsps, SEND_URL)) == 5


def test_access_denied_is_permanent_and_explains_mail_send(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """403 ErrorAccessDenied is permanent and names Mail.Send and the RBAC/access policy scope."""
    rsps.post(
        SEND_URL,
        status=403,
        json=graph_error("ErrorAccessDenied", "Access is denied. Check credentials."),
    )
    channel = make_channel(context)

    with pytest.raises(ConnectorError) as caught:
        channel.send(make_message())

    assert caught.value.permanent is True
    text = str(caught.value)
    assert "ErrorAccessDenied" in text
    assert "Mail.Send" in text and "application permission" in text
    assert "RBAC for Applications" in text and "application access policy" in text
    assert len(calls_to(rsps, SEND_URL)) == 1  # no retry of a refusal


def test_unknown_sender_mailbox_is_permanent(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """404 ErrorInvalidUser on sendMail is permanent and points at the sender setting."""
    rsps.post(
        SEND_URL,
        status=404,
        json=graph_error("ErrorInvalidUser", f"The requested user '{SENDER}' is invalid."),
    )
    channel = make_channel(context)

    with pytest.raises(ConnectorError) as caught:
        channel.send(make_message())

    assert caught.value.permanent is True
    assert "sender" in str(caught.value)


def test_invalid_recipient_is_permanent_and_address_is_not_repeated(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """A refused recipient is permanent, and Graph's echo of the address stays out of the error."""
    rsps.post(
        SEND_URL,
        status=400,
        json=graph_error(
            "ErrorInvalidRecipients", "Recipient 'maria.jones@contoso.org' is not resolved."
        ),
    )
    channel = make_channel(context)

    with pytest.raises(ConnectorError) as caught, capture_logs() as logs:
        channel.send(make_message())

    assert caught.value.permanent is True
    assert "maria.jones@contoso.org" not in str(caught.value)
    assert "maria.jones@contoso.org" not in json.dumps(
        [e for e in logs if e["log_level"] != "debug"], default=str
    )


def test_recipient_without_email_is_permanent_and_nothing_is_sent(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """A recipient with no e-mail address fails permanently before any request to Graph."""
    channel = make_channel(context)
    nobody = Recipient(id="ben.okafor@contoso.org", name="Ben Okafor")

    with pytest.raises(ConnectorError) as caught:
        channel.send(make_message(recipient=nobody))

    assert caught.value.permanent is True
    assert "no e-mail address" in str(caught.value)
    assert calls_to(rsps, SEND_URL) == []


def test_refused_client_secret_quotes_the_aadsts_code(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """Entra refusing the secret is a permanent error quoting AADSTS7000215 and what to fix."""
    rsps.replace(
        responses.POST,
        TOKEN_URL,
        status=401,
        json={
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret "
            "being sent in the request is the client secret value.",
            "error_codes": [7000215],
        },
    )
    channel = make_channel(context)

    with pytest.raises(ConnectorError) as caught:
        channel.send(make_message())

    assert caught.value.permanent is True
    assert "AADSTS7000215" in str(caught.value)
    assert "Value, not its ID" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert calls_to(rsps, SEND_URL) == []


def test_logs_name_message_and_visit_but_not_the_recipient(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """Above debug, logs carry message and visit ids, never recipient name, address, subject."""
    rsps.post(SEND_URL, status=202)
    channel = make_channel(context)

    with capture_logs() as logs:
        channel.send(make_message())

    sent = [e for e in logs if e["event"] == "graph_mail.sent"]
    assert sent and sent[0]["message_id"] == 41 and sent[0]["visit_id"] == "visit-7f3a"
    loud = json.dumps([e for e in logs if e["log_level"] != "debug"], default=str)
    for private in ("Maria Jones", "maria.jones@contoso.org", "Overdue: Sam Green"):
        assert private not in loud


def test_channels_of_one_app_share_a_client_that_close_leaves_open(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """Two channels with the same app registration share one client; close() does not close it."""
    rsps.post(SEND_URL, status=202)
    first = make_channel(context)
    second = make_channel(context, save_to_sent_items=True)
    assert first.client is second.client

    first.close()
    second.send(make_message())

    assert len(calls_to(rsps, SEND_URL)) == 1


@pytest.mark.parametrize(
    ("sender", "words"),
    [
        ("visitwatch <visitwatch@contoso.org>", "address alone"),
        ("visitwatch @contoso.org", "address"),
        ("visitwatch", "not an e-mail address"),
    ],
)
def test_sender_that_is_not_an_address_alone_is_a_config_problem(
    context: ConnectorContext, sender: str, words: str
) -> None:
    """A sender written as "Name <address>" (or no address) fails the config check, not an alert."""
    table = {
        "tenant_id": TENANT,
        "client_id": CLIENT_ID,
        "client_secret": {"env": "VW_TEST_GRAPH_SECRET"},
        "sender": sender,
    }
    problems = config_problems(GraphMailChannel, table, context.config_dir)
    assert len(problems) == 1
    assert problems[0].key.endswith("sender") and words in str(problems[0])


def test_entra_unreachable_at_start_is_retried_at_the_first_send(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """No network at boot does not stop the daemon: the send fails temporarily, then works."""
    discovery = f"{LOGIN}/v2.0/.well-known/openid-configuration"
    rsps.replace(responses.GET, discovery, body=requests.ConnectionError("network is down"))
    settings, _ = validate_options(
        {
            "tenant_id": TENANT,
            "client_id": CLIENT_ID,
            "client_secret": {"env": "VW_TEST_GRAPH_SECRET"},
            "sender": SENDER,
        },
        GraphMailChannel.options,
        "channels[0]",
        context.config_dir,
    )
    channel = GraphMailChannel("outlook", settings, context)  # does not raise

    with pytest.raises(ConnectorError) as caught:
        channel.send(make_message())
    assert caught.value.permanent is False

    rsps.replace(
        responses.GET,
        discovery,
        json={
            "token_endpoint": TOKEN_URL,
            "authorization_endpoint": f"{LOGIN}/oauth2/v2.0/authorize",
            "issuer": f"{LOGIN}/v2.0",
        },
    )
    rsps.post(SEND_URL, status=202)
    channel.send(make_message())
    assert len(calls_to(rsps, SEND_URL)) == 1


# --------------------------------------------------------------------------- check()


def test_check_confirms_mail_send_and_finds_the_sender(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """check() reads Mail.Send from the token's roles and looks the sender up with $select."""
    rsps.get(USER_URL, json={"id": "4c1a", "mail": SENDER})
    channel = make_channel(context)

    assert channel.check() == f"token ok (Mail.Send granted); sender {SENDER} found"
    (call,) = calls_to(rsps, USER_URL)
    assert "select=id%2Cmail" in call.request.url or "select=id,mail" in call.request.url


@pytest.mark.parametrize(
    "token",
    ["EwBwA8l6BAAUbDba3x2OMJElkF7gJ4z", make_token([]).rsplit(".", 2)[0] + ".bm90IGpzb24.sig"],
    ids=["opaque", "damaged-payload"],
)
def test_check_says_so_when_the_token_cannot_be_read(
    rsps: responses.RequestsMock, context: ConnectorContext, token: str
) -> None:
    """An opaque or damaged token is no fault: check() says its permissions could not be read."""
    rsps.replace(
        responses.POST,
        TOKEN_URL,
        json={"token_type": "Bearer", "expires_in": 3599, "access_token": token},
    )
    rsps.get(USER_URL, json={"id": "4c1a", "mail": SENDER})
    channel = make_channel(context)

    assert channel.check() == (
        f"token ok (its permissions could not be read); sender {SENDER} found"
    )


def test_check_passes_on_rbac_for_applications_without_demanding_tenant_wide_mail_send(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """RBAC for Applications (as the README advises): no Mail.Send in the token, the lookup
    denied; check() passes, says it cannot verify, and never asks for a tenant-wide grant."""
    rsps.replace(
        responses.POST,
        TOKEN_URL,
        json={"token_type": "Bearer", "expires_in": 3599, "access_token": make_token([])},
    )
    rsps.get(
        USER_URL,
        status=403,
        json=graph_error("ErrorAccessDenied", "Access is denied. Check credentials and try again."),
    )
    channel = make_channel(context)

    result = channel.check()

    assert "RBAC for Applications" in result and "cannot verify" in result
    assert f"sender {SENDER}" in result
    assert "admin consent" not in result and "grant" not in result.lower()


def test_check_passes_when_the_sender_cannot_be_looked_up(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """Without User.Read.All the lookup gets 403: check() still passes and says so."""
    rsps.get(
        USER_URL,
        status=403,
        json=graph_error(
            "Authorization_RequestDenied", "Insufficient privileges to complete the operation."
        ),
    )
    channel = make_channel(context)

    result = channel.check()

    assert result.startswith("token ok (Mail.Send granted)")
    assert f"cannot verify sender {SENDER}" in result


def test_check_fails_for_a_sender_that_does_not_exist(
    rsps: responses.RequestsMock, context: ConnectorContext
) -> None:
    """A 404 for the sender fails check(), naming the sender."""
    rsps.get(
        USER_URL,
        status=404,
        json=graph_error("Request_ResourceNotFound", f"Resource '{SENDER}' does not exist."),
    )
    channel = make_channel(context)

    with pytest.raises(ConnectorError, match=SENDER) as caught:
        channel.check()
    assert caught.value.permanent is True


# --------------------------------------------------------------------------- FakeGraph


@pytest.fixture
def fake_graph(start_fake_graph: Callable[..., FakeGraph]) -> FakeGraph:
    graph = start_fake_graph()
    graph.mailboxes.add(SENDER)
    return graph


def fake_channel(graph: FakeGraph, context: ConnectorContext, **extra: Any) -> GraphMailChannel:
    table = graph.config_table("VW_FAKE_GRAPH_SECRET", sender=SENDER, **extra)
    settings, problems = validate_options(
        table, GraphMailChannel.options, "channels[0]", context.config_dir
    )
    assert problems == [], [str(p) for p in problems]
    channel = GraphMailChannel("outlook", settings, context)
    channel.client._sleep = lambda seconds: None
    return channel


def test_send_through_fake_graph_over_tls(fake_graph: FakeGraph, context: ConnectorContext) -> None:
    """Over real HTTPS on loopback: discovery, token, then one sendMail FakeGraph records."""
    channel = fake_channel(fake_graph, context)

    channel.send(make_message())

    (body,) = fake_graph.sent
    assert body["message"]["subject"] == "Overdue: Sam Green at 12 High Street"
    assert body["message"]["toRecipients"][0]["emailAddress"]["address"] == MARIA.email
    assert dict(iter_sent_headers(body))["X-Visitwatch-Notification"] == "41"
    (request,) = fake_graph.requests_to("POST", f"/v1.0/users/{SENDER}/sendMail")
    token = (request.header("Authorization") or "").removeprefix("Bearer ")
    assert token in fake_graph.issued_tokens
    assert jwt_claims(token)["roles"] == ["Calendars.Read", "Mail.Send"]
    assert request.header("User-Agent") == "visitwatch/test"
    token_requests = fake_graph.requests_to("POST", f"/{fake_graph.tenant}/oauth2/v2.0/token")
    assert len(token_requests) == 1 and token_requests[0].body["grant_type"] == "client_credentials"


def test_fake_graph_throttling_and_expired_token_are_retried(
    fake_graph: FakeGraph, context: ConnectorContext
) -> None:
    """An injected 429 is waited out, and a revoked token is replaced after a 401."""
    channel = fake_channel(fake_graph, context)
    waits: list[float] = []
    channel.client._sleep = waits.append
    fake_graph.fail_next[("POST", f"/v1.0/users/{SENDER}/sendMail")] = [(429, {"Retry-After": "2"})]

    channel.send(make_message(id=1))
    fake_graph.revoke_tokens()
    channel.send(make_message(id=2))

    assert [dict(iter_sent_headers(b))["X-Visitwatch-Notification"] for b in fake_graph.sent] == [
        "1",
        "2",
    ]
    assert len(waits) == 1 and waits[0] >= 2
    assert len(fake_graph.requests_to("POST", f"/{fake_graph.tenant}/oauth2")) == 2


def test_fake_graph_check_without_user_read_all(
    fake_graph: FakeGraph, context: ConnectorContext
) -> None:
    """With roles enforced and no User.Read.All, check() passes but cannot look the sender up."""
    fake_graph.enforce_roles = True
    fake_graph.people[SENDER] = graph_user(SENDER, "visitwatch")
    channel = fake_channel(fake_graph, context)

    assert f"cannot verify sender {SENDER}" in channel.check()

    fake_graph.roles[:] = []  # RBAC for Applications: nothing in the token, not a failure
    fake_graph.revoke_tokens()
    channel.client.tokens.forget()  # and the client's cached token with them
    assert "no Mail.Send in the token" in channel.check()

    fake_graph.roles[:] = ["Mail.Send", "User.Read.All"]
    fake_graph.revoke_tokens()
    channel.client.tokens.forget()  # the next token carries the new role
    assert channel.check() == f"token ok (Mail.Send granted); sender {SENDER} found"


def test_wrong_secret_against_fake_graph_is_permanent(
    fake_graph: FakeGraph, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FakeGraph refuses a wrong secret the way Entra does, and the channel says which AADSTS."""
    monkeypatch.setenv("VW_FAKE_GRAPH_SECRET", "the-secret-id-not-its-value")
    channel = fake_channel(fake_graph, context)

    with pytest.raises(ConnectorError, match="AADSTS7000215") as caught:
        channel.send(make_message())

    assert caught.value.permanent is True
    assert fake_graph.sent == []
