"""GOV.UK Notify's answers, translated into errors the dispatcher can act on.

Notify answers a refused request with ``{"status_code": 400, "errors": [{"error":
"BadRequestError", "message": "..."}]}`` (API documentation, "Error codes" for each call).
The documented ones, and what becomes of them:

===  ================================================  ======================================
400  ValidationError ``phone_number ...`` or           permanent, the recipient's fault (the
     ``email_address ...``                             directory holds a bad address)
400  BadRequestError "Can't send to this recipient     permanent, the recipient's: the key or
     using a team-only API key" / "... when service    the service may only reach its team and
     is in trial mode", "Cannot send to international  guest list, or not abroad
     mobile numbers"
400  anything else (missing personalisation, unknown   permanent, the channel's (its config)
     template, sender id not in the service)
403  AuthError                                         permanent, the channel's: a wrong,
                                                       revoked or expired key, a clock more
                                                       than 30 s out, a suspended service
429  RateLimitError, TooManyRequestsError              temporary
5xx  and no answer at all (no connection, timeout)     temporary
===  ================================================  ======================================

A suspended service is deactivated and its keys revoked, so Notify then answers every
request with 403 "Invalid token: service is archived" (notifications-api,
``app/authentication/auth.py`` and ``dao_suspend_service``).

Notify's messages never hold a recipient's address, but each is passed through
:func:`_without` anyway before it reaches an error text (which is logged at warning).
"""

from __future__ import annotations

from typing import Any

import requests
from notifications_python_client.errors import APIError, InvalidResponse

from visitwatch.core.errors import ConnectorError

_REACH_HINT = {
    "team-only": "a team key reaches only the service's team members and guest list: add "
    "them in Notify (Team members, or Settings > Guest list) or use a live key",
    "trial mode": "a service in trial mode reaches only its team members and guest list: add "
    "them in Notify, or go live (Notify: Settings > Make your service live)",
    "international": "turn on 'Send text messages to international numbers' in the "
    "service's Settings in Notify, or give them a UK mobile",
}
_AUTH_HINT = {
    "system clock": "Notify's tokens are valid for 30 seconds: set this machine's clock by "
    "NTP (timedatectl set-ntp true)",
    "archived": "the Notify service is suspended or archived (its keys were revoked): ask "
    "your Notify service's manager or the Notify team to resume it",
    "revoked": "the key was revoked: create a new API key in Notify (API integration > API "
    "keys) and put it where api_key is read from",
}


def translate(
    err: BaseException,
    *,
    where: str,
    timeout: float,
    recipient: str = "",
    address: str = "",
    key_origin: str = "",
) -> ConnectorError:
    """The :class:`ConnectorError` for ``err`` raised by the Notify client.

    ``where`` names the channel ("GOV.UK Notify (channel sms)"), ``recipient`` the staff id
    a send was for (never their address: ``address`` is only cut out of Notify's text),
    ``key_origin`` where the API key was read from.
    """
    cause = err.__cause__ if isinstance(err, APIError) else err
    response = getattr(err, "response", None)
    if response is None:
        return _unreached(cause, where, timeout)
    if isinstance(err, InvalidResponse):
        return ConnectorError(
            f"{where} answered {response.status_code} without Notify's JSON: a proxy in the "
            "way, or base_url is not Notify's API (retried)",
            permanent=False,
        )
    status = response.status_code
    kind, text = _first_error(response)
    text = _without(text, address)
    said = f"{where} answered {status} {kind}: {text}".rstrip(": ")
    lowered = text.lower()
    if status == 400 and recipient:
        for marker, hint in _REACH_HINT.items():
            if marker in lowered:
                return _recipient_fault(f"{where} cannot send to {recipient}: {text} ({hint})")
        if kind == "ValidationError" and lowered.startswith(("phone_number", "email_address")):
            return _recipient_fault(
                f"{where} refused the address of {recipient}: {text} (correct it in the "
                "staff directory)"
            )
    if status == 403:
        key = f"the API key{f' read from {key_origin}' if key_origin else ''}"
        default = (
            f"{key} is wrong, revoked or expired; check it in Notify (API integration > API "
            "keys) and that this machine's clock is right (Notify's tokens last 30 seconds)"
        )
        auth = next((h for marker, h in _AUTH_HINT.items() if marker in lowered), default)
        return ConnectorError(f"{said} ({auth})", permanent=True)
    if status == 429:
        hint = (
            "the service's daily limit is reached: ask Notify to raise it; alerts go to the "
            "fallback channel meanwhile"
            if kind == "TooManyRequestsError"
            else "too many requests for this key: retried with backoff"
        )
        return ConnectorError(f"{said} ({hint})", permanent=False)
    if status >= 500:
        return ConnectorError(f"{said} (Notify is failing: retried with backoff)")
    return ConnectorError(f"{said} ({_config_hint(status, lowered)})", permanent=True)


def _config_hint(status: int, lowered: str) -> str:
    if "personalisation" in lowered:
        return (
            "the template's placeholders must be ((body)) for texts, ((subject)) and ((body)) "
            "for e-mail, and nothing else; visitwatch check shows which"
        )
    if "sender_id" in lowered or "reply_to_id" in lowered:
        return "sender_id does not belong to this service: copy it from the service's Settings"
    if "template" in lowered or status == 404:
        return "check template_id and templates (and base_url): visitwatch check tests each"
    return "a refusal a retry cannot fix: see Notify's message"


def _recipient_fault(text: str) -> ConnectorError:
    return ConnectorError(text, permanent=True, recipient_fault=True)


def _unreached(cause: BaseException | None, where: str, timeout: float) -> ConnectorError:
    if isinstance(cause, requests.Timeout):
        text = f"{where} did not answer within {timeout:g}s (retried)"
    elif isinstance(cause, requests.exceptions.SSLError):
        text = f"{where}: TLS failed (a proxy that intercepts TLS needs its CA trusted)"
    else:
        name = type(cause).__name__ if cause is not None else "no answer"
        text = (
            f"cannot reach {where} ({name}): check that this machine may connect to "
            "api.notifications.service.gov.uk on port 443 (firewall, proxy, DNS)"
        )
    return ConnectorError(text, permanent=False)


def _first_error(response: Any) -> tuple[str, str]:
    """The first documented ``(error, message)``; ``("", "")`` for a body that has none."""
    try:
        body = response.json()
    except ValueError:
        return "", ""
    errors = body.get("errors") if isinstance(body, dict) else body
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        return str(errors[0].get("error", "")), str(errors[0].get("message", ""))[:300]
    return "", ""


def _without(text: str, address: str) -> str:
    return text.replace(address, "<address>") if address else text
