"""Where text messages from workers come in: ``/sms/twilio`` and ``/sms/notify``.

- **Twilio** posts its incoming-message webhook (form fields ``From``, ``To``, ``Body``,
  ``MessageSid``...) signed in ``X-Twilio-Signature``: an HMAC of the URL Twilio was given
  and the form, under the account's auth token. The URL is rebuilt from
  ``public_base_url`` (the daemon sits behind a proxy: the request's own host is not what
  Twilio signed). The reply goes back as TwiML in the answer, on the same number, at no
  extra API call.
- **GOV.UK Notify** posts its received-text callback (JSON ``id``, ``source_number``,
  ``message``...) with ``Authorization: Bearer <inbound_token>``, compared in constant
  time. It gets 200 at once; the reply is queued on the ``notify_sms`` channel and the
  dispatcher is woken.

Only channels configured to hear replies count: ``twilio_sms`` with ``inbound = true``,
``notify_sms`` with an ``inbound_token``. Anything not believed (no such channel, a
missing or wrong signature or token) is a plain 403 and an audit line naming the provider
and why, never the number or the text; refusals are audited at most once a minute per
provider and reason (with the count since), so a flood of forged posts cannot fill the
record. What is believed is acted on by :class:`~visitwatch.daemon.replies.Replies`.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from xml.sax.saxutils import escape

import structlog
from flask import Blueprint, Response, current_app, request
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

from visitwatch.connectors.base import Channel
from visitwatch.daemon.config import ConnectorConfig
from visitwatch.daemon.replies import Inbound, Replies
from visitwatch.daemon.web.app import context_of
from visitwatch.daemon.web.context import WebContext

log = structlog.get_logger(__name__)

blueprint = Blueprint("inbound", __name__)

TWILIO_PATH = "/sms/twilio"
NOTIFY_PATH = "/sms/notify"
REFUSALS = "visitwatch-inbound-refusals"  # the app.extensions key of its RefusalLog
AUDIT_EVERY = timedelta(minutes=1)


class RefusalLog:
    """Counts refusals; says when one should be written to the audit (once a minute per
    provider and reason), with how many were refused since the last line."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[datetime, int]] = {}
        self._lock = threading.Lock()

    def count(self, provider: str, reason: str, now: datetime) -> int:
        """How many to audit now (this one and those held back); 0: not yet."""
        with self._lock:
            last, held = self._last.get((provider, reason), (None, 0))
            if last is not None and now - last < AUDIT_EVERY:
                self._last[(provider, reason)] = (last, held + 1)
                return 0
            self._last[(provider, reason)] = (now, 0)
            return held + 1


def _refuse(context: WebContext, provider: str, reason: str) -> Response:
    now = context.clock.now()
    log.warning("inbound_sms_refused", provider=provider, reason=reason)
    refusals = current_app.extensions.setdefault(REFUSALS, RefusalLog())
    count = refusals.count(provider, reason, now)
    if count:
        with context.store.transaction() as conn:
            context.store.audit(
                conn, None, now, "inbound_sms_refused", "visitwatch",
                provider=provider, reason=reason, refused=count,
            )  # fmt: skip
    return Response("forbidden\n", 403, mimetype="text/plain")


def _secret(settings: Mapping[str, Any], name: str) -> str:
    """The named secret; never empty: a blank key is one anyone can sign with (config
    refuses it; this makes sure a blank one can prove nothing if it ever got through)."""
    value = settings.get(name)
    reveal = getattr(value, "reveal", None)
    text = str(reveal() if callable(reveal) else value or "").strip()
    return text or secrets.token_hex(32)  # a key nobody holds


def channels(context: WebContext, type_name: str) -> list[ConnectorConfig]:
    """The configured channels of ``type_name`` that hear replies (``takes_replies``)."""
    return [
        c
        for c in context.config.channels
        if c.type == type_name and issubclass(c.cls, Channel) and c.cls.takes_replies(c.settings)
    ]


def _replies(context: WebContext) -> Replies:
    return Replies(context.watcher, context.wake)


@blueprint.post(TWILIO_PATH)
def twilio() -> Response:
    context = context_of(current_app)
    hearing = channels(context, "twilio_sms")
    if not hearing:
        return _refuse(context, "twilio", "no twilio_sms channel has inbound = true")
    signature = request.headers.get(SIGNATURE_HEADER, "")
    if not signature:
        return _refuse(context, "twilio", "no X-Twilio-Signature header")
    # What Twilio was given, not what this request says its host is (a proxy is in front).
    url = context.config.daemon.public_base_url.rstrip("/") + TWILIO_PATH
    if request.query_string:
        url += "?" + request.query_string.decode("latin-1")
    algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
    channel = next(
        (
            c
            for c in hearing
            if RequestValidator(_secret(c.settings, "auth_token")).validate(
                url, request.form, signature, algorithm
            )
        ),
        None,
    )
    if channel is None:
        return _refuse(context, "twilio", "X-Twilio-Signature does not match")
    form = request.form
    inbound = Inbound(
        "twilio", form.get("MessageSid", ""), form.get("From", ""), form.get("Body", ""),
        channel.name,
    )  # fmt: skip
    answer = _replies(context).answer(inbound, queue_reply=False)
    twiml = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Message>{escape(answer.text)}</Message></Response>"
    )
    return Response(twiml, 200, mimetype="text/xml")


@blueprint.post(NOTIFY_PATH)
def notify() -> Response:
    context = context_of(current_app)
    hearing = channels(context, "notify_sms")
    if not hearing:
        return _refuse(context, "notify", "no notify_sms channel has an inbound_token")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _refuse(context, "notify", "no bearer token")
    given = token.strip().encode()
    matches = [
        c
        for c in hearing
        if hmac.compare_digest(given, _secret(c.settings, "inbound_token").encode())
    ]
    if not matches:
        return _refuse(context, "notify", "wrong bearer token")
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or not body.get("id") or not body.get("source_number"):
        log.warning("inbound_sms_unreadable", provider="notify")
        return Response("expected Notify's received-text JSON\n", 400, mimetype="text/plain")
    inbound = Inbound(
        "notify", str(body["id"]), str(body["source_number"]), str(body.get("message") or ""),
        matches[0].name,
    )  # fmt: skip
    _replies(context).answer(inbound, queue_reply=True)
    return Response("", 200, mimetype="text/plain")
