"""The webhook channel: each notification POSTed as signed JSON to a receiver's URL.

The request follows Standard Webhooks (https://www.standardwebhooks.com, spec 1.0.0,
"Signature scheme" and "Webhook headers"): headers ``webhook-id`` (the same on every retry
of one notification, so a receiver can drop duplicates), ``webhook-timestamp`` (Unix
seconds of this attempt) and ``webhook-signature`` (``v1,`` then the base64 HMAC-SHA256 of
``{id}.{timestamp}.{body}`` under the ``whsec_`` secret), signed with the ``standardwebhooks``
reference library. The body is the notification's record, the same fields the outbox keeps:
the receiver gets names and texts by design, so its URL should be https.

A receiver is a place, not a person, so the webhook is a broadcast channel: it gets one
POST per event (each rung, each all clear), whose text lists who was alerted, and whose
``recipient`` stands for the receiver itself (its id is the channel's name).

Error classes, which decide whether the dispatcher retries:

* temporary: no connection, a timeout, 5xx, 408 and 429 (the receiver is busy or down);
* permanent: any other answer outside 2xx, among them 410 Gone ("stop sending") and
  redirects (Standard Webhooks: update the URL instead of following them).

Privacy: the receiver's answer and the message are logged at debug level only; the URL is
shown as scheme, host and port (its path or query may be a secret); the secret never.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import structlog
from standardwebhooks import Webhook

from visitwatch.connectors.base import Channel
from visitwatch.connectors.http_target import HttpTarget, plain_http_problem, retryable
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option, Secret

log = structlog.get_logger(__name__)

_SECRET_PREFIX = "whsec_"
# Standard Webhooks: a symmetric secret is random, at least 24 bytes and at most 64.
_SECRET_BYTES = (24, 64)
# Set by the channel itself: an extra header of the same name would break the signature.
_RESERVED = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 header field name


class WebhookChannel(Channel):
    """POSTs each message as signed JSON to ``url``, once per event (a broadcast channel)."""

    type_name: ClassVar[str] = "webhook"
    # A receiver is a place, not a person: one POST per event, its text listing who was
    # alerted, instead of one per recipient with the same news.
    broadcast: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "url": Option(
            "url",
            required=True,
            help="the receiver, https:// (http:// only on this machine); may be a secret table",
        ),
        "secret": Option(
            "secret",
            required=True,
            help='the signing key "whsec_<base64>", e.g. { env = "VISITWATCH_WEBHOOK_SECRET" }',
        ),
        "headers": Option(
            "table",
            default={},
            help="extra HTTP headers, written in clear: no credentials here",
        ),
        "timeout": Option(
            "duration",
            default="15s",
            positive=True,
            help="to connect, and for each read of the answer (send_timeout bounds the whole)",
        ),
        "ca_file": Option("path", default=None, help="a PEM bundle of CAs to trust"),
    }

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        """A usable signing key, headers that do not clash, no personal data over plain http."""
        problems = []
        if not _SECRET_BYTES[0] <= len(_signing_key(settings["secret"])) <= _SECRET_BYTES[1]:
            problems.append(
                ConfigProblem(
                    "secret",
                    f"is not a Standard Webhooks key (read from {settings['secret'].origin})",
                    f'"whsec_" and {_SECRET_BYTES[0]} to {_SECRET_BYTES[1]} random bytes in '
                    "base64, e.g. from: python -c \"import base64,os; print('whsec_' + "
                    'base64.b64encode(os.urandom(32)).decode())"',
                )
            )
        plain = plain_http_problem(settings["url"])
        if plain:
            problems.append(plain)
        for name, value in settings["headers"].items():
            if name.lower() in _RESERVED:
                problems.append(ConfigProblem(f"headers.{name}", "is set by the webhook itself"))
            elif not _TOKEN.match(name):
                problems.append(ConfigProblem(f"headers.{name}", "is not a header name"))
            elif any(ord(char) < 32 or ord(char) == 127 for char in value):
                problems.append(ConfigProblem(f"headers.{name}", "holds a control character"))
        return problems

    def __init__(self, name: str, settings: Mapping[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        # Validated once at config time (options and settings_problems): trusted here.
        self.target = HttpTarget.from_settings("webhook", self.settings)
        self.signer = Webhook(_signing_key(self.settings["secret"]))
        self.where = self.target.where

    def send(self, message: Message) -> None:
        body = json.dumps(message.as_record(), ensure_ascii=False, separators=(",", ":"))
        webhook_id = f"visitwatch-{message.id}-{int(message.created.timestamp())}"
        now = datetime.now(UTC)
        headers = {
            **self.settings["headers"],
            "User-Agent": self.context.user_agent,
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self.signer.sign(webhook_id, now, body),
        }
        told = self.delivery_log(message, server=self.where)
        told.debug("webhook.sending", body=body)
        self.target.deliver(
            told, "webhook", body.encode("utf-8"), headers, lambda s: _refusal(self.where, s)
        )

    def check(self) -> str:
        """Connect only: a test POST would reach the receiver as a real notification."""
        return f"{self.target.connect()} (nothing was posted)"


def _refusal(where: str, status: int) -> ConnectorError:
    if status == 410:
        return ConnectorError(
            f"webhook {where} answered 410 Gone: the receiver wants no more; "
            "remove the channel or ask for its new URL",
            permanent=True,
        )
    if 300 <= status < 400:
        return ConnectorError(
            f"webhook {where} answered {status} (a redirect); set url to where it points",
            permanent=True,
        )
    return ConnectorError(f"webhook {where} answered {status}", permanent=not retryable(status))


def _signing_key(secret: Secret) -> bytes:
    """The key bytes of ``whsec_<base64>`` (or bare base64); empty when it is not base64."""
    text = secret.reveal().strip().removeprefix(_SECRET_PREFIX)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return b""
