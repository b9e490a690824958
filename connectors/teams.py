"""The Teams channel: an Adaptive Card in a team channel, through a Workflows webhook.

Office 365 connectors (the old "Incoming Webhook") are retired; their replacement is a
Workflows flow made from the template "Post to a channel when a webhook request is
received". Its trigger gives an https URL whose query carries a signature (``sig=``): the
URL is the credential, so it is read as a secret and shown only as scheme, host and port.

The request is the one that template reads (``attachments[0].content`` is the card)::

    {"type": "message", "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive",
     "contentUrl": null, "content": {<an AdaptiveCard, version 1.4>}}]}

The card: the subject as a bold heading (in the attention colour for alerts), each line of
the text as a wrapped TextBlock, and when the message has a link an "Open on the board"
button. A channel is shared, so the daemon gives a broadcast channel the visit on the board
(behind sign-in), never a person's signed acknowledge link that anyone could tap.

Teams is a place, not a person: a broadcast channel, one card per event, whose text lists
who was alerted. Workflows answers 202 Accepted when the flow was triggered; whether the
card then reached the channel shows in the flow's run history, not here.

Error classes: no connection, a timeout, 408, 429 (Power Automate throttles) and 5xx are
temporary; any other answer outside 2xx is permanent, with a hint for the admin.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import structlog

from visitwatch.connectors.base import Channel
from visitwatch.connectors.http_target import HttpTarget, plain_http_problem, retryable
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, NotificationKind
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option, Secret

log = structlog.get_logger(__name__)

CARD_TYPE = "application/vnd.microsoft.card.adaptive"
# 1.4 renders on every Teams client (desktop, web, mobile); Workflows posts it as is.
CARD_VERSION = "1.4"
BUTTON = "Open on the board"

_HINTS = {
    400: "the flow refused the card; check that it was made from the template "
    '"Post to a channel when a webhook request is received"',
    401: "the URL's signature (sig=) is not accepted; copy the URL again from the flow's trigger",
    403: "the URL's signature (sig=) is not accepted; copy the URL again from the flow's trigger",
    404: "the flow was deleted or turned off; turn it on, or make a new one and set url",
    413: "the card is too large for the flow",
}


class TeamsChannel(Channel):
    """Posts one Adaptive Card per event to a Teams channel through a Workflows URL."""

    type_name: ClassVar[str] = "teams"
    broadcast: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "url": Option(
            "url",
            required=True,
            help='the flow\'s "HTTP POST URL"; it holds a signature, so read it as a secret: '
            '{ env = "VISITWATCH_TEAMS_URL" }',
        ),
        "timeout": Option(
            "duration",
            default="15s",
            positive=True,
            help="to connect, and for each read of the answer (send_timeout bounds the whole)",
        ),
    }

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        """https only (but to this machine), and a signed URL never written in clear."""
        problems = []
        plain = plain_http_problem(settings["url"])
        if plain:
            problems.append(plain)
        url = settings["url"]
        if not isinstance(url, Secret) and "sig" in parse_qs(urlsplit(url).query):
            problems.append(
                ConfigProblem(
                    "url",
                    "holds the flow's signature (sig=) in clear in the config file",
                    'read it as a secret, e.g. url = { env = "VISITWATCH_TEAMS_URL" }',
                )
            )
        return problems

    def __init__(self, name: str, settings: Mapping[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        self.target = HttpTarget.from_settings(
            "Teams workflow",
            self.settings,
            tls_hint="is a proxy on this network intercepting TLS?",
        )

    def send(self, message: Message) -> None:
        body = json.dumps(teams_payload(message), ensure_ascii=False, separators=(",", ":"))
        headers = {"User-Agent": self.context.user_agent, "Content-Type": "application/json"}
        told = self.delivery_log(message, server=self.target.where)
        told.debug("teams.sending", body=body)
        self.target.deliver(
            told, "teams", body.encode("utf-8"), headers, lambda s: _refusal(self.target.where, s)
        )

    def check(self) -> str:
        """Connect only: a test card would appear in the channel as a real alert."""
        return (
            f"{self.target.connect()}; the card itself cannot be verified without posting "
            "one (nothing was posted)"
        )


def teams_payload(message: Message) -> dict[str, Any]:
    """The request body the Workflows template reads: one Adaptive Card attachment."""
    return {
        "type": "message",
        "attachments": [{"contentType": CARD_TYPE, "contentUrl": None, "content": card(message)}],
    }


def card(message: Message) -> dict[str, Any]:
    """The Adaptive Card for ``message``: heading, one TextBlock per line, the board button."""
    body: list[dict[str, Any]] = [
        {
            "type": "TextBlock",
            "text": message.subject,
            "weight": "Bolder",
            "size": "Medium",
            "color": _colour(message.kind),
            "wrap": True,
        }
    ]
    spacing = "Default"
    for line in message.text.splitlines():
        if not line.strip():
            spacing = "Medium"  # a blank line in the text: a paragraph break on the card
            continue
        body.append({"type": "TextBlock", "text": line, "wrap": True, "spacing": spacing})
        spacing = "None"
    content: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": CARD_VERSION,
        "msteams": {"width": "Full"},
        "body": body,
    }
    if message.link:
        content["actions"] = [{"type": "Action.OpenUrl", "title": BUTTON, "url": message.link}]
    return content


def _colour(kind: str) -> str:
    try:
        known = NotificationKind(kind)
    except ValueError:  # a kind newer than this module: shown plainly
        return "Default"
    if known.is_alert:
        return "Attention"
    return "Good" if known is NotificationKind.ALL_CLEAR else "Default"


def _refusal(where: str, status: int) -> ConnectorError:
    if 300 <= status < 400:
        return ConnectorError(
            f"Teams workflow {where} answered {status} (a redirect); set url to the flow's "
            "HTTP POST URL",
            permanent=True,
        )
    hint = _HINTS.get(status, "")
    text = f"Teams workflow {where} answered {status}" + (f": {hint}" if hint else "")
    return ConnectorError(text, permanent=not retryable(status))
