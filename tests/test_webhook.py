"""The webhook channel, against a real HTTP receiver on loopback (http.server).

The contract (tests/channel_contract.py) gives the common promises; the tests after it pin
what is particular to webhooks: Standard Webhooks signatures a receiver can verify, extra
headers, the timeout, and how each answer is classed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from standardwebhooks import Webhook

from tests.channel_contract import ChannelContract, Delivered, build_channel, contract_message
from tests.connector_settings import config_problems
from tests.http_receiver import Receiver, running_receiver
from tests.mailserver import free_port
from visitwatch.connectors.registry import channel_class
from visitwatch.connectors.webhook import WebhookChannel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import ConnectorContext

KEY = os.urandom(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as receiver:
        yield receiver


@pytest.fixture
def context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ConnectorContext:
    monkeypatch.setenv("VW_TEST_WEBHOOK_SECRET", SECRET)
    return ConnectorContext(
        timezone=ZoneInfo("Europe/London"),
        state_dir=tmp_path,
        config_dir=tmp_path,
        user_agent="visitwatch/test",
    )


def webhook(receiver: Receiver, context: ConnectorContext, **extra: Any) -> WebhookChannel:
    table = {"url": receiver.url, "secret": {"env": "VW_TEST_WEBHOOK_SECRET"}, **extra}
    channel: WebhookChannel = build_channel(WebhookChannel, table, context)
    return channel


class TestWebhookContract(ChannelContract):
    """The webhook keeps the channel contract."""

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [SECRET, base64.b64encode(KEY).decode()]

    @pytest.fixture
    def make_channel(
        self, receiver: Receiver, context: ConnectorContext
    ) -> Callable[[], WebhookChannel]:
        return lambda: webhook(receiver, context)

    @pytest.fixture
    def delivered(self, receiver: Receiver) -> Callable[[], list[Delivered]]:
        def read() -> list[Delivered]:
            records = [json.loads(body) for _, body in receiver.accepted()]
            return [Delivered(r["subject"], r["text"]) for r in records]

        return read

    @pytest.fixture
    def break_far_side(self, receiver: Receiver) -> Callable[[bool], None]:
        def fail(permanent: bool) -> None:
            receiver.status = 422 if permanent else 503

        return fail


# --------------------------------------------------------------------------- signatures


def test_a_receiver_following_standard_webhooks_verifies_the_signature(
    receiver: Receiver, context: ConnectorContext
) -> None:
    """HMAC-SHA256 of "id.timestamp.body" under the whsec_ key, as "v1,<base64>"."""
    webhook(receiver, context).send(contract_message())
    [(headers, body)] = receiver.requests
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    assert "." not in msg_id and timestamp.isdigit()
    assert abs(int(timestamp) - time.time()) < 300  # the receiver's replay window
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(KEY, signed, hashlib.sha256).digest()).decode()
    assert f"v1,{expected}" in headers["webhook-signature"].split(" ")
    # ... and the reference library's receiver agrees.
    assert Webhook(SECRET).verify(body, headers)["visit_id"] == "visit-5150"


def test_a_body_changed_on_the_way_fails_verification(
    receiver: Receiver, context: ConnectorContext
) -> None:
    """The signature covers the body: one changed byte and the receiver refuses it."""
    webhook(receiver, context).send(contract_message())
    [(headers, body)] = receiver.requests
    with pytest.raises(Exception, match="signature"):
        Webhook(SECRET).verify(body.replace(b"overrun", b"all_clear"), headers)


def test_the_body_is_the_notification_record(receiver: Receiver, context: ConnectorContext):
    """JSON with kind, visit, recipient, subject, text and creation time, UTF-8."""
    webhook(receiver, context).send(contract_message())
    [(headers, body)] = receiver.requests
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "visitwatch/test"
    record = json.loads(body.decode("utf-8"))
    assert record == contract_message().as_record()


def test_a_retry_keeps_the_webhook_id_and_another_message_gets_its_own(
    receiver: Receiver, context: ConnectorContext
) -> None:
    """webhook-id is the receiver's idempotency key: the same for one notification's retries."""
    channel = webhook(receiver, context)
    channel.send(contract_message(id=7))
    channel.send(contract_message(id=7))
    channel.send(contract_message(id=8))
    ids = [headers["webhook-id"] for headers, _ in receiver.requests]
    assert ids[0] == ids[1] != ids[2]


# --------------------------------------------------------------------------- options


def test_extra_headers_are_sent(receiver: Receiver, context: ConnectorContext) -> None:
    """The headers table adds headers to every request."""
    channel = webhook(receiver, context, headers={"X-Team": "north", "X-Env": "prod"})
    channel.send(contract_message())
    [(headers, _)] = receiver.requests
    assert (headers["x-team"], headers["x-env"]) == ("north", "prod")


def problems(table: dict[str, Any], context: ConnectorContext) -> dict[str, str]:
    found = config_problems(WebhookChannel, table, context.config_dir)
    return {p.key: p.message for p in found}


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ({"url": "ftp://example.org/x"}, "channels[0].url", "http:// or https://"),
        ({"url": "http://hooks.example.org/x"}, "url", "https://"),
        ({"headers": {"webhook-id": "x"}}, "headers.webhook-id", "set by the webhook"),
        ({"headers": {"Content-Type": "text/plain"}}, "headers.Content-Type", "set by the"),
        ({"headers": {"Bad Name": "x"}}, "headers.Bad Name", "not a header name"),
        ({"headers": {"X-A": "one\r\nX-B: two"}}, "headers.X-A", "control character"),
        ({"headers": {"X-A": 3}}, "channels[0].headers", "table of strings"),
        ({"timeout": "0s"}, "channels[0].timeout", "longer than zero"),
        ({"secret": "whsec_inline"}, "channels[0].secret", "cannot be written"),
    ],
)
def test_settings_that_cannot_work_are_config_problems(
    context: ConnectorContext, extra: dict[str, Any], key: str, words: str
) -> None:
    """Bad URLs, clashing or broken headers and inline secrets are found at config time."""
    table = {"url": "https://hooks.example.org/x", "secret": {"env": "VW_TEST_WEBHOOK_SECRET"}}
    found = problems({**table, **extra}, context)
    assert list(found) == [key] and words in found[key]


@pytest.mark.parametrize(
    "secret",
    ["whsec_not*base64", "whsec_" + base64.b64encode(b"short").decode(), ""],
)
def test_a_secret_that_is_not_a_signing_key_is_a_config_problem(
    context: ConnectorContext, monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    """The key must be base64 of 24 to 64 bytes; the problem names where it was read."""
    monkeypatch.setenv("VW_TEST_WEBHOOK_SECRET", secret)
    table = {"url": "https://hooks.example.org/x", "secret": {"env": "VW_TEST_WEBHOOK_SECRET"}}
    found = problems(table, context)
    assert "env VW_TEST_WEBHOOK_SECRET" in found["secret"]
    if secret:
        assert secret not in found["secret"]


def test_visitwatch_check_reports_a_broken_webhook(tmp_path: Path) -> None:
    """`visitwatch check` exits 2 and names the key for plain http and a bad secret."""
    path = tmp_path / "visitwatch.toml"
    path.write_text(
        textwrap.dedent("""
            [[staff]]
            id = "sam@example.org"
            name = "Sam"
            role = "director"

            [[channels]]
            name = "hook"
            type = "webhook"
            url = "http://hooks.example.org/visitwatch"
            secret = { env = "VW_TEST_WEBHOOK_SECRET" }
        """),
        encoding="utf-8",
    )
    env = {**os.environ, "VW_TEST_WEBHOOK_SECRET": "whsec_c2hvcnQ="}
    result = subprocess.run(
        [sys.executable, "-m", "visitwatch.daemon.cli", "--config", str(path), "check"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 2
    assert "channels[0].secret: is not a Standard Webhooks key" in result.stderr
    assert "channels[0].url: alerts carry names and places" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("status", "permanent"),
    [
        (400, True),
        (401, True),
        (404, True),
        (410, True),
        (422, True),
        (301, True),
        (408, False),
        (429, False),
        (500, False),
        (502, False),
        (503, False),
    ],
)
def test_each_answer_is_classed(
    receiver: Receiver, context: ConnectorContext, status: int, permanent: bool
) -> None:
    """4xx and redirects are permanent (but 408 and 429), 5xx temporary; the status is named."""
    receiver.status = status
    receiver.headers = {"Location": "https://elsewhere.example.org/"} if status == 301 else {}
    with pytest.raises(ConnectorError, match=str(status)) as caught:
        webhook(receiver, context).send(contract_message())
    assert caught.value.permanent is permanent
    assert len(receiver.requests) == 1  # no redirect followed, no retry inside the channel


def test_410_gone_says_the_receiver_wants_no_more(
    receiver: Receiver, context: ConnectorContext
) -> None:
    """Standard Webhooks: 410 means stop sending; the admin is told to remove or fix it."""
    receiver.status = 410
    with pytest.raises(ConnectorError, match="410 Gone") as caught:
        webhook(receiver, context).send(contract_message())
    assert caught.value.permanent is True and "remove the channel" in str(caught.value)


def test_a_receiver_that_does_not_answer_hits_the_timeout(
    receiver: Receiver, context: ConnectorContext
) -> None:
    """A receiver that holds the request past `timeout` is a temporary failure."""
    receiver.hold = threading.Event()
    channel = webhook(receiver, context, timeout="0.3s")
    with pytest.raises(ConnectorError, match=r"did not answer within 0\.3s") as caught:
        channel.send(contract_message())
    assert caught.value.permanent is False


def test_nothing_listening_is_temporary(context: ConnectorContext) -> None:
    """A refused connection is retried later, and check() says the receiver is unreachable."""
    channel = webhook(Receiver(port=free_port()), context)
    with pytest.raises(ConnectorError, match="cannot reach webhook") as caught:
        channel.send(contract_message())
    assert caught.value.permanent is False
    with pytest.raises(ConnectorError):
        channel.check()


def test_check_connects_without_posting(receiver: Receiver, context: ConnectorContext) -> None:
    """check() proves the receiver is reachable and sends it nothing."""
    message = webhook(receiver, context).check()
    assert (
        message
        == f"webhook http://127.0.0.1:{receiver.port} accepts connections (nothing was posted)"
    )
    assert receiver.requests == []


def test_the_registry_knows_the_webhook() -> None:
    """type = "webhook" in a config names this class."""
    assert channel_class("webhook") is WebhookChannel


def test_the_webhook_is_a_broadcast_channel(context: ConnectorContext) -> None:
    """A receiver is a place: the daemon sends it one message per event, and no replies."""
    settings = {"url": "https://hooks.example.org/x", "secret": {"env": "VW_TEST_WEBHOOK_SECRET"}}
    assert WebhookChannel.broadcast is True
    assert WebhookChannel.address_field is None
    assert WebhookChannel.takes_replies(settings) is False
