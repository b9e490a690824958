"""The SMTP channel: notifications sent as plain-text e-mail.

One connection per message: alerts are rare, and a fresh connection cannot be left half
broken by an idle timeout between two overruns.

Error classes, which decide whether the dispatcher retries:

* temporary: connection refused or timed out, server disconnected, 4xx replies
  (greylisting, "try again later");
* permanent: bad credentials, 5xx replies, recipients refused with 5xx, a recipient
  without an e-mail address, STARTTLS or AUTH not offered, a certificate that fails
  verification.

Privacy: recipient names, addresses and subjects are logged at debug level only; the
password is never logged or put into an error message (only ``password.origin``).
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Mapping
from datetime import datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from pathlib import Path
from typing import Any, ClassVar

import structlog

from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option, Secret

log = structlog.get_logger(__name__)

_SECURITY = ("starttls", "tls", "none")
# Ports whose servers greet in plain text (STARTTLS may follow), and the implicit-TLS port.
_PLAIN_PORTS = frozenset({25, 587})
_TLS_PORTS = frozenset({465})


class SmtpChannel(Channel):
    """Sends each message as an e-mail to ``recipient.email``."""

    type_name: ClassVar[str] = "smtp"
    address_field: ClassVar[str | None] = "email"
    options: ClassVar[dict[str, Option]] = {
        "host": Option(
            "str", required=True, nonempty=True, help="the SMTP server, e.g. smtp.example.org"
        ),
        "port": Option(
            "int",
            default=587,
            positive=True,
            maximum=65535,
            help="587 for starttls, 465 for tls, 25 for none",
        ),
        "security": Option(
            "str",
            default="starttls",
            choices=_SECURITY,
            help="starttls (port 587), tls (implicit TLS, port 465) or none",
        ),
        "username": Option("str", default="", help="login name; empty means no login"),
        "password": Option(
            "secret", default=None, help='{ env = "NAME" }, { file = ... } or { credential = ... }'
        ),
        "sender": Option(
            "email",
            required=True,
            help='the From address, e.g. "visitwatch <alerts@example.org>"',
        ),
        "timeout": Option("duration", default="20s", positive=True, help="per network operation"),
        "verify_tls": Option(
            "bool",
            default=True,
            help="false accepts any certificate: only for test servers, never in production",
        ),
        "ca_file": Option("path", default=None, help="a PEM bundle of CAs to trust"),
    }

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        """A login half given, or a port that speaks another protocol than ``security``."""
        problems = []
        if settings["username"] and settings["password"] is None:
            problems.append(
                ConfigProblem(
                    "password",
                    "username is set but password is not",
                    'add password = { env = "NAME" } (or file/credential)',
                )
            )
        if settings["password"] is not None and not settings["username"]:
            problems.append(ConfigProblem("username", "password is set but username is empty"))
        security, port = settings["security"], settings["port"]
        if security == "tls" and port in _PLAIN_PORTS:
            problems.append(
                ConfigProblem(
                    "security",
                    f'"tls" starts TLS at once, but port {port} greets in plain text',
                    'use port 465 for "tls", or security = "starttls"',
                )
            )
        if security != "tls" and port in _TLS_PORTS:
            problems.append(
                ConfigProblem(
                    "security",
                    f"port {port} expects TLS from the first byte, not {security!r}",
                    'set security = "tls"',
                )
            )
        return problems

    def __init__(self, name: str, settings: Mapping[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        # Validated once at config time (options and settings_problems): trusted here.
        self.host: str = self.settings["host"]
        self.port: int = self.settings["port"]
        self.security: str = self.settings["security"]
        self.username: str = self.settings["username"]
        self.password: Secret | None = self.settings["password"]
        self.sender: str = self.settings["sender"]
        self.timeout: float = self.settings["timeout"].total_seconds()
        self.verify_tls: bool = self.settings["verify_tls"]
        self.ca_file: Path | None = self.settings["ca_file"]
        self.sender_address = parseaddr(self.sender)[1]

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ public API

    def send(self, message: Message) -> None:
        recipient = message.recipient
        address = self.address_of(message)
        mail = self._build(message)
        told = self.delivery_log(message, server=self.where)
        told.debug("smtp.sending", to=address, subject=message.subject)
        smtp: smtplib.SMTP | None = None
        try:
            smtp = self._connect()
            smtp.send_message(mail, from_addr=self.sender_address, to_addrs=[recipient.email])
        except Exception as err:
            problem = self._translate(err, hide=(recipient.email, recipient.id, recipient.name))
            if problem is None:
                raise
            told.warning(
                "smtp.send_failed",
                permanent=problem.permanent,
                error=type(err).__name__,
                code=getattr(err, "smtp_code", None),
            )
            raise problem from err
        finally:
            if smtp is not None:
                _quit_quietly(smtp)
        told.info("smtp.sent", mail_id=mail["Message-ID"])

    def check(self) -> str:
        smtp: smtplib.SMTP | None = None
        try:
            smtp = self._connect()
            smtp.noop()
        except Exception as err:
            problem = self._translate(err, hide=())
            if problem is None:
                raise
            raise problem from err
        finally:
            if smtp is not None:
                _quit_quietly(smtp)
        security = "" if self.security == "none" else f" over {self.security}"
        if self.username:
            return f"SMTP {self.where} accepted login as {self.username}{security}"
        return f"SMTP {self.where} answered{security} (no login configured)"

    # ------------------------------------------------------------------ internals

    def _build(self, message: Message) -> EmailMessage:
        mail = EmailMessage()
        mail["From"] = self.sender
        try:
            mail["To"] = Address(
                display_name=message.recipient.name, addr_spec=message.recipient.email
            )
        except (ValueError, IndexError, HeaderParseError) as err:
            raise ConnectorError(
                f"recipient {message.recipient.id} has an e-mail address that is not valid",
                permanent=True,
                recipient_fault=True,
            ) from err
        mail["Subject"] = message.subject
        mail["Date"] = format_datetime(datetime.now(self.context.timezone))
        # make_msgid() without a domain calls socket.getfqdn(), which can hang on DNS.
        mail["Message-ID"] = make_msgid(domain=self.sender_address.rpartition("@")[2])
        mail["Auto-Submitted"] = "auto-generated"  # RFC 3834: no out-of-office replies
        mail["X-Visitwatch-Notification"] = str(message.id)
        if message.visit_id is not None:
            mail["X-Visitwatch-Visit"] = message.visit_id
        mail.set_content(message.text)
        return mail

    def _tls_context(self) -> ssl.SSLContext:
        if not self.verify_tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        try:
            return ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
        except (OSError, ssl.SSLError) as err:
            raise ConnectorError(
                f"cannot load ca_file {self.ca_file}: {getattr(err, 'strerror', None) or err}",
                permanent=True,
            ) from err

    def _connect(self) -> smtplib.SMTP:
        """An open, greeted, secured and (if configured) logged-in connection."""
        # The host goes to the constructor, not to connect(): smtplib only remembers it
        # there, and TLS needs it to check the certificate's name.
        smtp: smtplib.SMTP
        if self.security == "tls":
            smtp = smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=self._tls_context()
            )
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            smtp.ehlo()
            if self.security == "starttls":
                smtp.starttls(context=self._tls_context())
                smtp.ehlo()
            if self.username and self.password is not None:
                smtp.login(self.username, self.password.reveal())
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _translate(self, err: BaseException, hide: tuple[str, ...]) -> ConnectorError | None:
        """The ConnectorError for a failure, or None when it is not a network problem."""
        if isinstance(err, ConnectorError):
            return err
        secrets = tuple(s for s in (*hide, self._password_text()) if s)
        where = self.where
        if isinstance(err, smtplib.SMTPAuthenticationError):
            origin = self.password.origin if self.password is not None else "nowhere"
            return ConnectorError(
                f"SMTP {where} refused the login as {self.username!r} "
                f"({err.smtp_code} {_reply(err.smtp_error, secrets)}); check the username "
                f"and the password secret (read from {origin})",
                permanent=True,
            )
        if isinstance(err, smtplib.SMTPRecipientsRefused):
            codes = [code for code, _ in err.recipients.values()]
            replies = "; ".join(
                f"{code} {_reply(text, secrets)}" for code, text in err.recipients.values()
            )
            # A 4xx here is greylisting or a full mailbox: worth another try.
            temporary = bool(codes) and all(400 <= code < 500 for code in codes)
            # Refused for this person (no such mailbox, policy): the server itself works.
            return ConnectorError(
                f"SMTP {where} refused the recipient ({replies})",
                permanent=not temporary,
                recipient_fault=not temporary,
            )
        if isinstance(err, smtplib.SMTPNotSupportedError):
            hint = (
                'set security to "tls" or "none"'
                if "STARTTLS" in str(err)
                else "check that the server offers what the settings ask for"
            )
            return ConnectorError(f"SMTP {where}: {err}; {hint}", permanent=True)
        if isinstance(err, smtplib.SMTPConnectError):
            return ConnectorError(
                f"SMTP {where} refused the session ({err.smtp_code} "
                f"{_reply(err.smtp_error, secrets)})",
                permanent=False,
            )
        if isinstance(err, smtplib.SMTPResponseException):
            permanent = err.smtp_code >= 500
            return ConnectorError(
                f"SMTP {where} answered {err.smtp_code} {_reply(err.smtp_error, secrets)}",
                permanent=permanent,
            )
        if isinstance(err, smtplib.SMTPServerDisconnected):
            if isinstance(err.__context__, TimeoutError):
                # smtplib turns a read timeout into "disconnected"; say what happened.
                return ConnectorError(
                    f"SMTP {where} did not answer within {self.timeout:g}s", permanent=False
                )
            return ConnectorError(f"SMTP {where} closed the connection: {err}", permanent=False)
        if isinstance(err, ssl.SSLCertVerificationError):
            return ConnectorError(
                f"SMTP {where}: the server's certificate failed verification "
                f"({err.verify_message}); set ca_file to the CA that signed it",
                permanent=True,
            )
        if isinstance(err, smtplib.SMTPException):
            return ConnectorError(f"SMTP {where}: {_scrub(str(err), secrets)}", permanent=False)
        if isinstance(err, TimeoutError):
            return ConnectorError(
                f"SMTP {where} did not answer within {self.timeout:g}s", permanent=False
            )
        if isinstance(err, ConnectionRefusedError):
            return ConnectorError(
                f"SMTP {where} refused the connection (is the host and port right?)",
                permanent=False,
            )
        if isinstance(err, OSError):
            return ConnectorError(
                f"cannot reach SMTP {where}: {err.strerror or err}", permanent=False
            )
        return None

    def _password_text(self) -> str:
        return self.password.reveal() if self.password is not None else ""


def _reply(raw: bytes | str, secrets: tuple[str, ...]) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return _scrub(" ".join(text.split()), secrets)


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    # Servers echo addresses ("550 <maria@example.org> unknown"); error texts end up in
    # warning-level logs, where names and addresses must not appear.
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return text


def _quit_quietly(smtp: smtplib.SMTP) -> None:
    # The message is already accepted (or already failed): a QUIT that goes wrong must
    # not turn a delivered alert into a retry and a duplicate.
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()
