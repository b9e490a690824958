"""The Graph mail channel: notifications sent as Outlook mail through Microsoft Graph.

``POST /users/{sender}/sendMail`` as the app itself (application permission ``Mail.Send``),
from a mailbox of the organisation: a shared mailbox such as ``visitwatch@contoso.org``
needs no licence. Graph answers 202 when Exchange has accepted the message.

Error classes, which decide whether the dispatcher retries:

* temporary: throttling (429) and Graph or Exchange being unavailable (5xx), which the shared
  client has already retried with backoff; the network failing; Entra not answering;
* permanent: access denied (no ``Mail.Send`` permission, or the sender mailbox outside the
  app's RBAC scope or application access policy), an unknown sender mailbox, a recipient
  without (or with an invalid) e-mail address, a refused client secret or certificate.

Privacy: recipient names, addresses and subjects are logged at debug level only; error
texts that echo an address have it replaced before they can reach a warning.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any, ClassVar

import structlog

from visitwatch.connectors.base import Channel
from visitwatch.connectors.graph_auth import token_roles
from visitwatch.connectors.graph_client import (
    GRAPH_OPTIONS,
    GraphClient,
    GraphConnector,
    GraphError,
    mailbox_path,
)
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, NotificationKind
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option

log = structlog.get_logger(__name__)

# Kinds that need someone to act now: Outlook flags them and sorts them to the top.
URGENT_KINDS = frozenset(kind for kind in NotificationKind if kind.urgent)

# Outlook desktop renders HTML with Word, which ignores much CSS (white-space among it), so
# the text goes into plain paragraphs with <br> line breaks and inline styles only.
_PARAGRAPH_STYLE = (
    "margin:0 0 12px 0;font-family:'Segoe UI',Calibri,Arial,sans-serif;"
    "font-size:11pt;line-height:1.4;color:#201f1e"
)

_ACCESS_HINT = (
    "The app needs the Microsoft Graph application permission Mail.Send with admin consent, "
    "and the sender mailbox must be inside its Exchange RBAC for Applications scope "
    '("Application Mail.Send" role assignment) or its application access policy'
)


class GraphMailChannel(GraphConnector, Channel):
    """Sends each message as Outlook mail from ``sender`` to ``recipient.email``."""

    type_name: ClassVar[str] = "graph_mail"
    address_field: ClassVar[str | None] = "email"
    options: ClassVar[dict[str, Option]] = {
        **GRAPH_OPTIONS,
        "sender": Option(
            "email",
            required=True,
            help="mailbox that sends, e.g. visitwatch@contoso.org (a shared mailbox works)",
        ),
        "save_to_sent_items": Option("bool", default=False),
        "html": Option("bool", default=True),
    }

    def __init__(self, name: str, settings: dict[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        self.sender: str = str(self.settings["sender"]).strip()
        self.save_to_sent_items: bool = self.settings["save_to_sent_items"]
        self.html: bool = self.settings["html"]
        # Shared with the calendar source when both use one app registration: one token
        # cache, one connection pool.
        self.client: GraphClient = self.app_client()

    @property
    def where(self) -> str:
        return f"Graph sendMail as {self.sender}"

    # ------------------------------------------------------------------ public API

    def send(self, message: Message) -> None:
        recipient = message.recipient
        address = self.address_of(message)
        payload = self.payload(message)
        told = self.delivery_log(message)
        told.debug("graph_mail.sending", to=address, subject=message.subject)
        try:
            response = self.client.request(
                "POST",
                f"{mailbox_path(self.sender)}/sendMail",
                json=payload,
                mailbox=self.sender,
            )
        except ConnectorError as err:
            problem = self._translate(err, hide=(recipient.email, recipient.name))
            told.warning(
                "graph_mail.send_failed",
                permanent=problem.permanent,
                status=getattr(err, "status", 0),
                code=getattr(err, "code", ""),
            )
            raise problem from err
        if response.status_code != 202:
            # Graph documents 202 only; any other 2xx still means Exchange took it.
            told.info("graph_mail.unexpected_status", status=response.status_code)
        told.info(
            "graph_mail.sent",
            sender=self.sender,
            request_id=response.headers.get("request-id", ""),
        )

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        problems = super().settings_problems(settings)
        sender = str(settings.get("sender") or "").strip()
        if any(c.isspace() for c in sender) or "<" in sender:
            # Graph addresses the mailbox by its address alone; a display name cannot be set.
            problems.append(
                ConfigProblem(
                    "sender",
                    f"{sender!r} must be the sending mailbox's address alone",
                    'write e.g. "visitwatch@contoso.org"',
                )
            )
        return problems

    def check(self) -> str:
        """Token, permission and sender, as far as they can be seen without sending.

        With Exchange RBAC for Applications (the mailbox-scoped set-up the README advises)
        ``Mail.Send`` is granted in Exchange and never appears in the token, and the sender
        cannot be looked up without ``User.Read.All``: neither is a fault, so check() says
        what it could not verify instead of asking for a tenant-wide grant.
        """
        client = self.client
        token = client.token()
        roles = token_roles(token)
        if roles is None:
            permission = "token ok (its permissions could not be read)"
        elif "Mail.Send" in roles:
            permission = "token ok (Mail.Send granted)"
        else:
            permission = (
                "token ok (no Mail.Send in the token: expected with RBAC for Applications, "
                f'where the "Application Mail.Send" role must cover {self.sender})'
            )
        try:
            client.request(
                "GET",
                mailbox_path(self.sender),
                params={"$select": "id,mail"},
                mailbox=self.sender,
            )
        except GraphError as err:
            if err.status == 403:
                # Looking users up needs User.Read.All, which sending does not, and RBAC
                # scoping may restrict it: cannot verify, not a fault.
                return (
                    f"{permission}; cannot verify sender {self.sender}: the lookup was denied "
                    "(no User.Read.All, or RBAC for Applications scoping restricts it), so the "
                    "first message checks it"
                )
            if err.status == 404:
                raise ConnectorError(
                    f"the sender mailbox {self.sender} does not exist in the tenant; set sender "
                    "to an existing user or shared mailbox",
                    permanent=True,
                ) from err
            raise
        return f"{permission}; sender {self.sender} found"

    def close(self) -> None:
        """Nothing to release: the Graph client is shared and outlives this channel."""

    # ------------------------------------------------------------------ internals

    def payload(self, message: Message) -> dict[str, Any]:
        """The ``sendMail`` request body for ``message``."""
        recipient = message.recipient
        address: dict[str, str] = {"address": recipient.email}
        if recipient.name:
            address["name"] = recipient.name
        headers = [
            {"name": "X-Visitwatch-Notification", "value": str(message.id)},
            # Exchange's own header: no out-of-office or delivery-report replies to a robot.
            {"name": "X-Auto-Response-Suppress", "value": "All"},
        ]
        if message.visit_id is not None:
            headers.insert(1, {"name": "X-Visitwatch-Visit", "value": message.visit_id})
        mail: dict[str, Any] = {
            "subject": message.subject,
            "body": (
                {"contentType": "HTML", "content": render_html(message.text)}
                if self.html
                else {"contentType": "Text", "content": message.text}
            ),
            "toRecipients": [{"emailAddress": address}],
            "internetMessageHeaders": headers,
        }
        if message.kind in URGENT_KINDS:
            mail["importance"] = "high"
        return {"message": mail, "saveToSentItems": self.save_to_sent_items}

    def _translate(self, err: ConnectorError, hide: tuple[str, ...]) -> ConnectorError:
        status = getattr(err, "status", 0)
        code = getattr(err, "code", "")
        detail = _scrub(str(err), tuple(h for h in hide if h))
        if status == 429 or status >= 500:
            # The client has already waited and retried; the dispatcher retries much later.
            return ConnectorError(
                f"{self.where}: Graph is busy or unavailable ({status}); will retry: {detail}",
                permanent=False,
            )
        if status == 403 or code == "ErrorAccessDenied":
            return ConnectorError(
                f"{self.where}: access denied ({code or status}). {_ACCESS_HINT}",
                permanent=True,
            )
        if status == 404:
            return ConnectorError(
                f"{self.where}: the sender mailbox was not found, or has no Exchange Online "
                f"mailbox ({code or status}); check the sender setting",
                permanent=True,
            )
        if code == "ErrorInvalidRecipients":
            return ConnectorError(
                f"{self.where}: Exchange refused the recipient address ({code}); check the "
                "e-mail address in the staff directory",
                permanent=True,
                recipient_fault=True,
            )
        if 400 <= status < 500:
            return ConnectorError(f"{self.where}: {detail}", permanent=status not in (408, 409))
        # status 0: no HTTP answer (network, or Entra refusing the token): keep its verdict.
        return ConnectorError(f"{self.where}: {detail}", permanent=err.permanent)


def render_html(text: str) -> str:
    """``text`` as HTML that reads like the plain text in Outlook, escaped throughout.

    Blank lines separate paragraphs; single line breaks stay line breaks.
    """
    paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    body = "".join(
        f'<p style="{_PARAGRAPH_STYLE}">'
        + "<br>".join(html.escape(line) for line in paragraph.strip("\n").split("\n"))
        + "</p>"
        for paragraph in paragraphs
    )
    return f'<html><head><meta charset="utf-8"></head><body>{body}</body></html>'


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    # Graph echoes addresses ("Recipient 'maria@...' is not resolved"); error texts end up
    # in warning-level logs, where names and addresses must not appear.
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text
