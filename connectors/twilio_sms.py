"""The twilio_sms channel: text messages through Twilio's Programmable Messaging API.

It uses the official ``twilio`` client rather than plain ``requests``: the daemon already
needs ``twilio.request_validator`` to check the signature of inbound texts, and the client
keeps the API's error codes, paging and regional edges right. Every call has a timeout
(``TwilioHttpClient(timeout=...)``, to connect and for each read).

A text is ``Message.short`` (the daemon composed it in GSM-7 within two segments, its link
included), or for an older row the subject with the link fitted into two segments. The
number is the recipient's mobile in E.164. The sender is ``from_number`` (a Twilio number of
the account: people can reply to it) or ``messaging_service_sid`` (a Messaging Service with
its own sender pool, alphanumeric sender IDs included).

Errors come back as HTTP status plus a Twilio code (https://www.twilio.com/docs/api/errors):

* the recipient's fault, permanent (the channel stays healthy, the admins hear about that
  person): 21211 invalid number, 21614 not a mobile, 21610 they replied STOP, 21608 a trial
  account's unverified number;
* the channel's fault, permanent: 21408 country not enabled (geo permissions), 21606,
  21659, 21212 the sender cannot send, 20003 credentials, 20404 no such account or service;
* temporary: 20429 or HTTP 429 (throttled), 5xx, no connection, a timeout.

Privacy: Twilio's own error text quotes the number, so it is logged at debug level only;
errors name the staff id and the Twilio code; the auth token is never logged. The client's
own request log (URLs and headers at INFO) is kept quiet.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, ClassVar, NoReturn

import requests
import structlog

# twilio ships no type hints; pyproject's mypy overrides should name "twilio.*".
from twilio.base.exceptions import TwilioException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option, Secret
from visitwatch.core.phone import InvalidNumber, e164
from visitwatch.core.sms import text_of

log = structlog.get_logger(__name__)

_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_AUTH_TOKEN = re.compile(r"^[0-9a-fA-F]{32}$")
_SERVICE_SID = re.compile(r"^MG[0-9a-fA-F]{32}$")
INBOUND_PATH = "/sms/twilio"  # where the daemon's web server hears Twilio's inbound texts
_QUIET = logging.getLogger("visitwatch.twilio_client")
_QUIET.setLevel(logging.WARNING)  # its INFO lines echo request URLs and headers

_SENDER_HINT = (
    "set from_number to an SMS-capable number of this Twilio account, or use messaging_service_sid"
)
# code -> (what went wrong, the recipient's fault, what the admin can do)
_CODES: dict[int, tuple[str, bool, str]] = {
    21211: ("the number is not a valid phone number", True, "correct it in the staff directory"),
    21614: (
        "the number cannot receive texts (not a mobile)",
        True,
        "give a mobile number in the staff directory",
    ),
    21610: (
        "they replied STOP to this sender, so Twilio blocks texts to them",
        True,
        "they must text START to the sender's number to get alerts by text again",
    ),
    21608: (
        "a trial account texts only verified numbers",
        True,
        "verify the number in the Twilio console, or upgrade the account",
    ),
    21408: (
        "texts to this number's country are not enabled for the account",
        False,
        "enable the country in the Twilio console: Messaging > Settings > Geo permissions",
    ),
    21606: ("the sender cannot text this number", False, _SENDER_HINT),
    21659: ("the sender is not a Twilio number of this account", False, _SENDER_HINT),
    21212: ("the sender number is not valid", False, _SENDER_HINT),
    20003: (
        "Twilio refused the credentials",
        False,
        "check account_sid and auth_token (was the token rotated?)",
    ),
    20404: (
        "Twilio does not know the account or the messaging service",
        False,
        "check account_sid and messaging_service_sid",
    ),
}
_THROTTLED = 20429


class TwilioSmsChannel(Channel):
    """Sends each message as a text through Twilio."""

    type_name: ClassVar[str] = "twilio_sms"
    address_field: ClassVar[str | None] = "mobile"
    options: ClassVar[dict[str, Option]] = {
        "account_sid": Option("str", required=True, help='"AC" and 32 hex digits'),
        "auth_token": Option(
            "secret", required=True, help='e.g. { env = "VISITWATCH_TWILIO_TOKEN" }'
        ),
        "from_number": Option("str", help="the Twilio number texts come from, e.g. +447700900123"),
        "messaging_service_sid": Option(
            "str", help='instead of from_number: a Messaging Service, "MG" and 32 hex digits'
        ),
        "inbound": Option(
            "bool",
            default=False,
            help="the number's incoming-message webhook points at visitwatch "
            f"({{public_base_url}}{INBOUND_PATH}): people can reply SAFE, HELP...",
        ),
        "timeout": Option(
            "duration",
            default="15s",
            positive=True,
            help="to connect, and for each read of Twilio's answer",
        ),
    }

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        """A well-formed account SID, and exactly one sender that can be one."""
        problems = []
        if not _ACCOUNT_SID.match(settings["account_sid"].strip()):
            problems.append(
                ConfigProblem(
                    "account_sid",
                    "is not a Twilio account SID",
                    '"AC" and 32 hex digits, from the Twilio console\'s account info',
                )
            )
        token: Secret = settings["auth_token"]
        if not _AUTH_TOKEN.match(token.reveal().strip()):
            # Also the key inbound texts are verified with: a blank one anyone can sign with.
            problems.append(
                ConfigProblem(
                    "auth_token",
                    f"is not a Twilio auth token (read from {token.origin})",
                    "32 hex digits, from the Twilio console's account info",
                )
            )
        number, service = settings["from_number"], settings["messaging_service_sid"]
        if (number is None) == (service is None):
            problems.append(
                ConfigProblem(
                    "from_number",
                    "set exactly one of from_number and messaging_service_sid",
                    "from_number for one Twilio number; messaging_service_sid for a sender pool",
                )
            )
        if number is not None:
            try:
                e164(number)
            except InvalidNumber as err:
                problems.append(
                    ConfigProblem("from_number", str(err), "write it as +44... (E.164)")
                )
        if service is not None and not _SERVICE_SID.match(service.strip()):
            problems.append(
                ConfigProblem(
                    "messaging_service_sid",
                    "is not a Messaging Service SID",
                    '"MG" and 32 hex digits, from Messaging > Services in the Twilio console',
                )
            )
        return problems

    @classmethod
    def takes_replies(cls, settings: Mapping[str, Any]) -> bool:
        return bool(settings.get("inbound", False))

    def __init__(self, name: str, settings: Mapping[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        # Validated once at config time (options and settings_problems): trusted here.
        self.account_sid: str = self.settings["account_sid"].strip()
        number = self.settings["from_number"]
        self.sender: dict[str, str] = (
            {"from_": e164(number)}
            if number is not None
            else {"messaging_service_sid": self.settings["messaging_service_sid"].strip()}
        )
        self.timeout: float = self.settings["timeout"].total_seconds()
        self.http = TwilioHttpClient(timeout=self.timeout, logger=_QUIET)
        self.client = Client(
            self.account_sid,
            self.settings["auth_token"].reveal(),
            http_client=self.http,
            user_agent_extensions=[context.user_agent],
        )

    def send(self, message: Message) -> None:
        told = self.delivery_log(message)
        try:
            number = e164(self.address_of(message))
        except InvalidNumber as err:
            error = ConnectorError(
                f"the mobile number of {message.recipient.id} in the staff directory {err}",
                permanent=True,
                recipient_fault=True,
            )
            _failed(told, error, err)
        body = text_of(message)
        told.debug("twilio.sending", to=number, body=body)
        try:
            sent = self.client.messages.create(to=number, body=body, **self.sender)
        except (TwilioException, requests.RequestException) as err:
            _failed(told, self._translated(err, message.recipient.id), err)
        told.info("twilio.sent", twilio_sid=sent.sid, status=sent.status)

    def check(self) -> str:
        """Sends nothing: the account is active, the sender is the account's, replies reach us."""
        try:
            account = self.client.api.v2010.accounts(self.account_sid).fetch()
            if account.status != "active":
                raise ConnectorError(
                    f"Twilio account {self.account_sid} is {account.status}: "
                    "texts cannot be sent; see the Twilio console",
                    permanent=True,
                )
            found = [f"Twilio account {self.account_sid} is active"]
            if account.type == "Trial":
                found.append("a trial account: it texts verified numbers only")
            found.extend(self._check_sender())
        except (TwilioException, requests.RequestException) as err:
            raise self._translated(err, None) from err
        found.append("not verified: that a text reaches a phone (nothing was sent)")
        return "; ".join(found)

    def close(self) -> None:
        if self.http.session is not None:
            self.http.session.close()

    def _check_sender(self) -> list[str]:
        base = self.context.public_base_url
        expected = f"{base.rstrip('/')}{INBOUND_PATH}" if base else ""
        if "from_" in self.sender:
            number = self.sender["from_"]
            owned = self.client.incoming_phone_numbers.list(phone_number=number, limit=20)
            mine = next((n for n in owned if n.phone_number == number), None)
            if mine is None:
                raise ConnectorError(
                    f"from_number {number} is not a number of Twilio account "
                    f"{self.account_sid}; {_SENDER_HINT}",
                    permanent=True,
                )
            if not (mine.capabilities or {}).get("sms", False):
                raise ConnectorError(
                    f"from_number {number} cannot send texts; {_SENDER_HINT}", permanent=True
                )
            found = [f"from_number {number} is an SMS number of the account"]
            if self.takes_replies(self.settings):
                found.append(_inbound(expected, mine.sms_url, mine.sms_method, number))
            return found
        sid = self.sender["messaging_service_sid"]
        service = self.client.messaging.v1.services(sid).fetch()
        found = [f"messaging service {sid} exists"]
        if self.takes_replies(self.settings):
            if service.use_inbound_webhook_on_number:
                found.append(
                    "not verified: the incoming-message webhook of each number in the "
                    "service (the service defers to them)"
                )
            else:
                where = f"messaging service {sid}"
                found.append(_inbound(expected, service.inbound_request_url, "POST", where))
        return found

    def _translated(self, err: BaseException, staff_id: str | None) -> ConnectorError:
        """A Twilio failure as a ConnectorError: temporary or not, whose fault, what to do."""
        if isinstance(err, requests.Timeout):
            return ConnectorError(f"Twilio did not answer within {self.timeout:g}s")
        if isinstance(err, requests.RequestException):
            return ConnectorError(f"cannot reach Twilio ({type(err).__name__})")
        status = getattr(err, "status", 0) or 0
        code = getattr(err, "code", None) or status
        log.debug("twilio.refused", status=status, code=code, answer=getattr(err, "msg", ""))
        more = f"https://www.twilio.com/docs/errors/{code}"
        if code == _THROTTLED or status == 429 or status >= 500:
            return ConnectorError(f"Twilio answered {status} (code {code}): busy, try again")
        what, recipient_fault, hint = _CODES.get(
            code, ("Twilio refused the request", False, f"see {more}")
        )
        if recipient_fault and staff_id is not None:
            what = f"cannot text {staff_id}: {what}"
        return ConnectorError(
            f"Twilio {status} (code {code}): {what}; {hint}",
            permanent=True,
            recipient_fault=recipient_fault and staff_id is not None,
        )


def _inbound(expected: str, url: str | None, method: str | None, where: str) -> str:
    """Whether Twilio posts the incoming texts of ``where`` to visitwatch; raises if not."""
    if not expected:
        return (
            "not verified: where incoming texts go (the daemon's public_base_url is not "
            "known to the channel)"
        )
    if (url or "").rstrip("/") != expected or (method or "POST").upper() != "POST":
        raise ConnectorError(
            f"inbound is on, but incoming texts to {where} do not reach visitwatch: set its "
            f'"A message comes in" webhook to {expected} (HTTP POST)',
            permanent=True,
        )
    return f"incoming texts to {where} reach {expected}"


def _failed(told: Any, error: ConnectorError, cause: BaseException | None) -> NoReturn:
    told.warning(
        "twilio.send_failed",
        permanent=error.permanent,
        recipient_fault=error.recipient_fault,
        error=str(error),
    )
    raise error from cause
