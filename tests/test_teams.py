"""The Teams channel, against a real HTTP receiver on loopback standing in for Workflows.

The contract gives the common promises; the tests after it pin the request the Workflows
template reads (one Adaptive Card attachment), the card's heading, text and button, how
each answer is classed, and the settings an admin can get wrong.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from structlog.testing import capture_logs

from tests.channel_contract import ChannelContract, Delivered, build_channel, contract_message
from tests.connector_settings import config_problems
from tests.http_receiver import Receiver, running_receiver
from tests.mailserver import free_port
from visitwatch.connectors.registry import channel_class
from visitwatch.connectors.teams import TeamsChannel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import NotificationKind
from visitwatch.core.options import ConnectorContext

SIG = "kR3v9QpL2xY7-signature-of-the-flow"
BOARD = "https://visitwatch.example.org/board/visit/visit-5150"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as receiver:
        receiver.status = 202  # what Workflows answers
        yield receiver


@pytest.fixture
def context(tmp_path: Path) -> ConnectorContext:
    return ConnectorContext(
        timezone=ZoneInfo("Europe/London"),
        state_dir=tmp_path,
        config_dir=tmp_path,
        user_agent="visitwatch/test",
    )


def signed_url(receiver: Receiver) -> str:
    """A Workflows-shaped URL: the signature rides in the query."""
    return (
        f"http://127.0.0.1:{receiver.port}/workflows/4f1c/triggers/manual/paths/invoke"
        f"?api-version=1&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={SIG}"
    )


def teams(
    receiver: Receiver, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> TeamsChannel:
    monkeypatch.setenv("VW_TEST_TEAMS_URL", signed_url(receiver))
    table = {"url": {"env": "VW_TEST_TEAMS_URL"}, **extra}
    channel: TeamsChannel = build_channel(TeamsChannel, table, context)
    return channel


def posted(receiver: Receiver) -> list[dict[str, Any]]:
    """The JSON bodies the receiver accepted."""
    return [json.loads(body) for _, body in receiver.accepted()]


def card_of(request: dict[str, Any]) -> dict[str, Any]:
    [attachment] = request["attachments"]
    content: dict[str, Any] = attachment["content"]
    return content


class TestTeamsContract(ChannelContract):
    """The Teams channel keeps the channel contract."""

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [SIG]

    @pytest.fixture
    def make_channel(
        self, receiver: Receiver, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
    ) -> Callable[[], TeamsChannel]:
        return lambda: teams(receiver, context, monkeypatch)

    @pytest.fixture
    def delivered(self, receiver: Receiver) -> Callable[[], list[Delivered]]:
        def read() -> list[Delivered]:
            cards = [card_of(request) for request in posted(receiver)]
            return [
                Delivered(card["body"][0]["text"], "\n".join(b["text"] for b in card["body"][1:]))
                for card in cards
            ]

        return read

    @pytest.fixture
    def break_far_side(self, receiver: Receiver) -> Callable[[bool], None]:
        def fail(permanent: bool) -> None:
            receiver.status = 404 if permanent else 503

        return fail


# --------------------------------------------------------------------------- the card


def test_the_request_is_one_adaptive_card_attachment(
    receiver: Receiver, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shape the Workflows template reads: a message with one card, contentUrl null."""
    teams(receiver, context, monkeypatch).send(contract_message())
    [(headers, _)] = receiver.requests
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "visitwatch/test"
    [request] = posted(receiver)
    assert request["type"] == "message"
    [attachment] = request["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert attachment["contentUrl"] is None
    card = attachment["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    assert all(block["type"] == "TextBlock" and block["wrap"] for block in card["body"])


@pytest.mark.parametrize(
    ("kind", "colour"),
    [
        (NotificationKind.OVERRUN, "Attention"),
        (NotificationKind.ESCALATION, "Attention"),
        (NotificationKind.HELP, "Attention"),
        (NotificationKind.REMINDER, "Attention"),
        (NotificationKind.ALL_CLEAR, "Good"),
        (NotificationKind.ACKNOWLEDGED, "Default"),
        ("a_kind_from_the_future", "Default"),
    ],
)
def test_the_heading_is_the_subject_in_bold_coloured_by_kind(
    receiver: Receiver,
    context: ConnectorContext,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    colour: str,
) -> None:
    """Alerts stand out in the attention colour, the all clear in green; unknown kinds post."""
    message = contract_message(kind)
    teams(receiver, context, monkeypatch).send(message)
    heading = card_of(posted(receiver)[0])["body"][0]
    assert heading["text"] == message.subject
    assert heading["weight"] == "Bolder"
    assert heading["color"] == colour


def test_each_line_of_the_text_is_its_own_block_and_blank_lines_part_paragraphs(
    receiver: Receiver, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines stay lines on the card (markdown would run them together)."""
    text = "Zara Quinn has not checked in.\nDue back 14:00.\n\nAlerted: Maria Jones, Sam Reed"
    message = replace(contract_message(), text=text)
    teams(receiver, context, monkeypatch).send(message)
    blocks = card_of(posted(receiver)[0])["body"][1:]
    assert [b["text"] for b in blocks] == [
        "Zara Quinn has not checked in.",
        "Due back 14:00.",
        "Alerted: Maria Jones, Sam Reed",
    ]
    assert [b["spacing"] for b in blocks] == ["Default", "None", "Medium"]


def test_a_link_becomes_the_board_button(
    receiver: Receiver, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The message's link (the board, behind sign-in) is an "Open on the board" button."""
    teams(receiver, context, monkeypatch).send(replace(contract_message(), link=BOARD))
    card = card_of(posted(receiver)[0])
    assert card["actions"] == [
        {"type": "Action.OpenUrl", "title": "Open on the board", "url": BOARD}
    ]


def test_no_link_no_button(
    receiver: Receiver, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a link ([web] off, admin notices) the card has no dead button."""
    teams(receiver, context, monkeypatch).send(contract_message())
    assert "actions" not in card_of(posted(receiver)[0])


def test_teams_is_a_broadcast_channel_without_replies() -> None:
    """A team channel is a place: one card per event, no address needed, no text replies."""
    assert TeamsChannel.broadcast is True
    assert TeamsChannel.address_field is None
    assert TeamsChannel.takes_replies({}) is False


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    ("status", "permanent", "words"),
    [
        (400, True, "template"),
        (401, True, "sig="),
        (403, True, "sig="),
        (404, True, "deleted or turned off"),
        (413, True, "too large"),
        (302, True, "redirect"),
        (408, False, "408"),
        (429, False, "429"),
        (500, False, "500"),
        (502, False, "502"),
    ],
)
def test_each_answer_is_classed_with_a_hint(
    receiver: Receiver,
    context: ConnectorContext,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    permanent: bool,
    words: str,
) -> None:
    """4xx are permanent with what to do (404: the flow is gone); 429 and 5xx are retried."""
    receiver.status = status
    receiver.headers = {"Location": "https://elsewhere.example.org/"} if status == 302 else {}
    with pytest.raises(ConnectorError) as caught:
        teams(receiver, context, monkeypatch).send(contract_message())
    assert caught.value.permanent is permanent
    assert str(status) in str(caught.value) and words in str(caught.value)
    assert SIG not in str(caught.value)
    assert len(receiver.requests) == 1  # no redirect followed, no retry inside the channel


def test_a_flow_that_does_not_answer_hits_the_timeout(
    receiver: Receiver, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request held past `timeout` is a temporary failure naming the host, not the URL."""
    receiver.hold = threading.Event()
    channel = teams(receiver, context, monkeypatch, timeout="0.3s")
    with capture_logs() as logs, pytest.raises(ConnectorError) as caught:
        channel.send(contract_message())
    assert caught.value.permanent is False
    assert str(caught.value) == (
        f"Teams workflow http://127.0.0.1:{receiver.port} did not answer within 0.3s"
    )
    assert SIG not in json.dumps(logs, default=str)


def test_nothing_listening_is_temporary_and_check_fails(
    context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused connection is retried later, and check() says the flow is unreachable."""
    channel = teams(Receiver(port=free_port()), context, monkeypatch)
    with pytest.raises(ConnectorError, match="cannot reach Teams workflow") as caught:
        channel.send(contract_message())
    assert caught.value.permanent is False
    with pytest.raises(ConnectorError, match="cannot reach Teams workflow"):
        channel.check()


def test_check_connects_posts_nothing_and_says_what_it_cannot_verify(
    receiver: Receiver, context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check() proves the host answers, and says the card is unverified without a post."""
    summary = teams(receiver, context, monkeypatch).check()
    assert summary.startswith(f"Teams workflow http://127.0.0.1:{receiver.port} accepts")
    assert "cannot be verified without posting" in summary
    assert SIG not in summary
    assert receiver.requests == []


# --------------------------------------------------------------------------- settings


def problems(table: dict[str, Any], context: ConnectorContext) -> dict[str, str]:
    return {p.key: p.message for p in config_problems(TeamsChannel, table, context.config_dir)}


@pytest.mark.parametrize(
    ("url", "key", "words"),
    [
        ("https://prod.westeurope.logic.azure.com/x?sig=abc", "url", "signature (sig=) in clear"),
        ("http://prod.westeurope.logic.azure.com/x", "url", "https://"),
        ("ftp://example.org/x", "channels[0].url", "http:// or https://"),
    ],
)
def test_settings_that_cannot_work_are_config_problems(
    context: ConnectorContext, url: str, key: str, words: str
) -> None:
    """A signed URL written in clear, plain http to another host, not a URL at all."""
    found = problems({"url": url}, context)
    assert list(found) == [key] and words in found[key]
    assert "abc" not in found[key]


def test_a_signed_url_read_from_the_environment_is_fine(
    context: ConnectorContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The way the example config writes it: url = { env = ... }."""
    monkeypatch.setenv("VW_TEST_TEAMS_URL", "https://prod.westeurope.logic.azure.com/x?sig=abc")
    assert problems({"url": {"env": "VW_TEST_TEAMS_URL"}}, context) == {}


def test_the_registry_knows_teams() -> None:
    """type = "teams" in a config names this class."""
    assert channel_class("teams") is TeamsChannel
