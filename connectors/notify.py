"""GOV.UK Notify channels: text messages (``notify_sms``) and e-mail (``notify_email``).

Both send through Notify's official client (``notifications-python-client``) with one
generic template of the right type: a text template whose content is ``((body))``, an
e-mail template with subject ``((subject))`` and content ``((body))``. ``templates`` may
name another template for some kinds (a louder one for ``help``), with the same
placeholders. Each notification carries ``reference = "visitwatch-<message id>"``, so a
delivery can be found in Notify's dashboard and traced back to the alert.

A text carries the message's short form (two GSM-7 segments, its link whole), or, for rows
written before short forms existed, the subject fitted with the link. An e-mail carries the
subject and the full text. Notify's errors are classed in :mod:`notify_errors`.

Privacy: the number or address goes only to Notify (and to debug logs); errors name the
recipient by staff id; the API key and the inbound token are never shown.
"""

from __future__ import annotations

import re
import threading
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urlsplit

import requests
from notifications_python_client.errors import APIError
from notifications_python_client.notifications import NotificationsAPIClient

from visitwatch.connectors.base import Channel
from visitwatch.connectors.notify_errors import translate
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, NotificationKind
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option, Secret, did_you_mean
from visitwatch.core.phone import InvalidNumber, e164
from visitwatch.core.sms import text_of

NOTIFY_API = "https://api.notifications.service.gov.uk"
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# "{key name}-{service id}-{secret}"; the client reads the last 73 characters only.
_API_KEY = re.compile(rf"(?s)^(?:.*-)?({_UUID})-({_UUID})$")
_IS_UUID = re.compile(rf"^{_UUID}$")
# ((name)), or ((name??text shown when name is "yes")); Notify ignores case, spaces, "_", "-".
_PLACEHOLDER = re.compile(r"\(\(([^()]+?)(?:\?\?[^()]*)?\)\)")
_EXAMPLE_ID = "f33517ff-2a88-4f6e-b855-c550268ce08a"
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def _options(*, sender: str, extra: Mapping[str, Option] | None = None) -> dict[str, Option]:
    return {
        "api_key": Option(
            "secret",
            required=True,
            help='a Notify API key "{name}-{service id}-{secret}", e.g. { env = "NAME" }',
        ),
        "template_id": Option(
            "str",
            required=True,
            nonempty=True,
            help="the template for every kind (API info in Notify)",
        ),
        "templates": Option("table", default={}, help="kind -> template id, overriding some"),
        "sender_id": Option("str", default=None, help=f"{sender} (from the service's Settings)"),
        "base_url": Option("url", default=NOTIFY_API, help="https:// (http:// on loopback)"),
        "timeout": Option(
            "duration", default="15s", positive=True, help="to connect, and for each read"
        ),
        **(extra or {}),
    }


class _NotifyChannel(Channel):
    """What texts and e-mail through Notify share: the key, templates, errors, check."""

    template_type: ClassVar[str]  # Notify's template type: "sms" or "email"
    placeholders: ClassVar[tuple[str, ...]]  # what personalisation fills
    noun: ClassVar[str]

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        """A key shaped like Notify's, template and sender ids that are ids, known kinds."""
        problems = []
        key: Secret = settings["api_key"]
        if not _API_KEY.match(key.reveal().strip()):
            problems.append(
                ConfigProblem(
                    "api_key",
                    f"is not a Notify API key (read from {key.origin})",
                    'copy the whole key from Notify (API integration > API keys): "{key name}-'
                    '{service id}-{secret}", the last two parts 36 characters each',
                )
            )
        ids = {"template_id": settings["template_id"], "sender_id": settings["sender_id"] or ""}
        for kind, template in settings["templates"].items():
            if kind not in {str(k) for k in NotificationKind}:
                problems.append(
                    ConfigProblem(
                        f"templates.{kind}",
                        "is not a notification kind",
                        did_you_mean(kind, [str(k) for k in NotificationKind]),
                    )
                )
            ids[f"templates.{kind}"] = template
        for name, value in ids.items():
            if value and not _IS_UUID.match(value.strip()):
                problems.append(
                    ConfigProblem(
                        name, f"{value!r} is not an id", f"Notify's ids look like {_EXAMPLE_ID}"
                    )
                )
        parts = urlsplit(_text(settings["base_url"]))
        if parts.scheme.lower() == "http" and parts.hostname not in _LOOPBACK:
            problems.append(
                ConfigProblem(
                    "base_url",
                    "the API key and the messages must travel over https://",
                    "http:// is accepted for a server on this machine only",
                )
            )
        return problems

    def __init__(self, name: str, settings: Mapping[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        # Validated once at config time (options and settings_problems): trusted here.
        self._key: Secret = self.settings["api_key"]
        self.base_url: str = _text(self.settings["base_url"]).rstrip("/")
        self.timeout: float = self.settings["timeout"].total_seconds()
        self.template_id: str = self.settings["template_id"].strip()
        self.templates: dict[str, str] = {
            kind: template.strip() for kind, template in self.settings["templates"].items()
        }
        self.sender_id: str | None = (self.settings["sender_id"] or "").strip() or None
        self.where = f"GOV.UK Notify (channel {name})"
        # The client keeps a requests.Session and says it is not thread-safe: one per thread
        # (the channel's delivery lane, and `visitwatch check`).
        self._local = threading.local()
        self._clients: list[NotificationsAPIClient] = []  # list.append is atomic

    def client(self) -> NotificationsAPIClient:
        """This thread's Notify client. Its ``timeout`` goes to every requests call it makes
        (``BaseAPIClient._create_request_objects``), so it bounds the connect and each read."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = NotificationsAPIClient(
                self._key.reveal().strip(), base_url=self.base_url, timeout=self.timeout
            )
            self._local.client = client
            self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.request_session.close()

    def template_for(self, kind: str) -> str:
        return self.templates.get(kind, self.template_id)

    def send(self, message: Message) -> None:
        address = self.recipient_address(message)
        told = self.delivery_log(message, template=self.template_for(message.kind))
        told.debug("notify.sending", to=address, personalisation=self.personalisation(message))
        try:
            answer = self.post(address, message)
        except (APIError, requests.RequestException) as err:
            error = translate(
                err,
                where=self.where,
                timeout=self.timeout,
                recipient=message.recipient.id,
                address=address,
                key_origin=self._key.origin,
            )
            told.warning(
                "notify.send_failed",
                permanent=error.permanent,
                recipient_fault=error.recipient_fault,
                error=str(error),
            )
            raise error from err
        notification = answer.get("id", "") if isinstance(answer, dict) else ""
        told.info("notify.sent", notification=notification)

    def recipient_address(self, message: Message) -> str:
        return self.address_of(message)

    @abstractmethod
    def personalisation(self, message: Message) -> dict[str, str]:
        """What fills the template's placeholders."""

    @abstractmethod
    def post(self, address: str, message: Message) -> Any:
        """Send through the client; Notify's answer (a dict)."""

    def reference(self, message: Message) -> str:
        return f"visitwatch-{message.id}"

    def check(self) -> str:
        """Fetch each template (nothing is sent): the key works, types and placeholders fit."""
        uses: dict[str, list[str]] = {self.template_id: ["template_id"]}
        for kind, template in self.templates.items():
            uses.setdefault(template, []).append(f"templates.{kind}")
        problems = []
        for template, keys in uses.items():
            try:
                found = self.client().get_template(template)
            except (APIError, requests.RequestException) as err:
                if getattr(getattr(err, "response", None), "status_code", 0) in (400, 404):
                    problems.append(f"{' and '.join(keys)}: no template {template} in the service")
                    continue
                raise translate(
                    err, where=self.where, timeout=self.timeout, key_origin=self._key.origin
                ) from err
            problems += [f"{' and '.join(keys)}: {p}" for p in self.template_problems(found)]
        if problems:
            raise ConnectorError(f"{self.where}: " + "; ".join(problems), permanent=True)
        return (
            f"Notify accepted the API key; {len(uses)} {self.noun} template(s) fill "
            f"{', '.join(f'(({p}))' for p in self.placeholders)} and nothing else. "
            "Not verified (only a send shows it): "
            + ("the sender id, " if self.sender_id else "")
            + "whether the key or trial mode lets it reach every recipient"
        )

    def template_problems(self, template: Mapping[str, Any]) -> list[str]:
        """What would make a send with ``template`` fail or lose words."""
        kind = template.get("type", "")
        if kind != self.template_type:
            return [f"template {template.get('id')} is a {kind} template, not {self.noun}"]
        text = f"{template.get('subject') or ''}\n{template.get('body') or ''}"
        used = {_plain(name): name.strip() for name in _PLACEHOLDER.findall(text)}
        ours = {_plain(name) for name in self.placeholders}
        problems = [f"does not show (({p}))" for p in self.placeholders if _plain(p) not in used]
        problems += [
            f"needs (({name})), which visitwatch does not fill"
            for plain, name in sorted(used.items())
            if plain not in ours
        ]
        return problems


def _text(url: str | Secret) -> str:
    return (url.reveal() if isinstance(url, Secret) else url).strip()


def _plain(placeholder: str) -> str:
    """A placeholder's name as Notify compares them: case, spaces, ``_`` and ``-`` ignored."""
    return re.sub(r"[\s_-]", "", placeholder).lower()


INBOUND_TOKEN_MIN = 16  # characters; Notify's own form asks for at least 10


class NotifySmsChannel(_NotifyChannel):
    """Text messages through GOV.UK Notify."""

    type_name: ClassVar[str] = "notify_sms"
    address_field: ClassVar[str | None] = "mobile"
    template_type: ClassVar[str] = "sms"
    placeholders: ClassVar[tuple[str, ...]] = ("body",)
    noun: ClassVar[str] = "text message"
    options: ClassVar[dict[str, Option]] = _options(
        sender="the text message sender's id",
        extra={
            "inbound_token": Option(
                "secret",
                default=None,
                help="the bearer token Notify sends with received texts (its callback); "
                "set, replies such as SAFE or HELP act on visits",
            )
        },
    )

    @classmethod
    def takes_replies(cls, settings: Mapping[str, Any]) -> bool:
        """Replies are heard when Notify's received-text callback is set up (its token)."""
        token = settings.get("inbound_token")
        return token is not None and len(token.reveal().strip()) >= INBOUND_TOKEN_MIN

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        """The shared checks, and an inbound token long enough to be a secret: a blank one
        would make texts invite replies that every callback then fails to prove."""
        problems = super().settings_problems(settings)
        token = settings.get("inbound_token")
        if token is not None and len(token.reveal().strip()) < INBOUND_TOKEN_MIN:
            problems.append(
                ConfigProblem(
                    "inbound_token",
                    f"is under {INBOUND_TOKEN_MIN} characters (read from {token.origin})",
                    'make a long random one, e.g. python -c "import secrets; '
                    'print(secrets.token_urlsafe(32))", and give Notify the same',
                )
            )
        return problems

    def recipient_address(self, message: Message) -> str:
        try:
            return e164(self.address_of(message))
        except InvalidNumber as err:
            self.delivery_log(message).debug("notify.invalid_number", reason=str(err))
            raise ConnectorError(
                f"the mobile number of {message.recipient.id} in the staff directory {err}",
                permanent=True,
                recipient_fault=True,
            ) from None

    def personalisation(self, message: Message) -> dict[str, str]:
        # short is already fitted, its link inside; older rows have only a subject.
        return {"body": text_of(message)}

    def post(self, address: str, message: Message) -> Any:
        return self.client().send_sms_notification(
            phone_number=address,
            template_id=self.template_for(message.kind),
            personalisation=self.personalisation(message),
            reference=self.reference(message),
            sms_sender_id=self.sender_id,
        )


class NotifyEmailChannel(_NotifyChannel):
    """E-mail through GOV.UK Notify."""

    type_name: ClassVar[str] = "notify_email"
    address_field: ClassVar[str | None] = "email"
    template_type: ClassVar[str] = "email"
    placeholders: ClassVar[tuple[str, ...]] = ("subject", "body")
    noun: ClassVar[str] = "e-mail"
    options: ClassVar[dict[str, Option]] = _options(sender="the e-mail reply-to address's id")

    def personalisation(self, message: Message) -> dict[str, str]:
        return {"subject": message.subject, "body": message.text}

    def post(self, address: str, message: Message) -> Any:
        return self.client().send_email_notification(
            email_address=address,
            template_id=self.template_for(message.kind),
            personalisation=self.personalisation(message),
            reference=self.reference(message),
            email_reply_to_id=self.sender_id,
        )
