"""structlog set-up: JSON when not on a terminal, readable when on one; no personal data.

Logs carry visit ids, never family names, addresses or workers' names (principle 6). The
redaction step below enforces that for every event above debug, whatever a caller passes.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys that may hold personal data or secrets. At debug level they pass (an admin chasing a
# parsing bug on their own machine needs them); above it they are replaced.
PERSONAL_KEYS = frozenset(
    {
        "name",
        "worker",
        "worker_name",
        "recipient",
        "recipient_name",
        "email",
        "mobile",
        "address",
        "location",
        "subject",
        "summary",
        "description",
        "text",
        "attendees",
        "by",
        "url",
        "password",
        "secret",
        "token",
        "staff_id",
        "to",
        "mailbox",
        "sender",
        "number",
        "phone",
    }
)

# Addresses and telephone numbers inside free text (an error a server sent back, an
# exception): replaced wherever they appear above debug, whatever the key.
_EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# +44 7700 900123, 07700 900123, (01632) 960 001: a leading + or 0, then digits and the
# usual separators. Our own values (times, visit ids, counts) never start that way with
# this many digits, and a key that holds them is left alone.
_PHONE = re.compile(r"(?<![\w+.:/-])(?:\+|\(?0)[\d()][\d ()./-]{6,18}\d(?![\w:])")
_OWN_VALUES = frozenset({"timestamp", "level", "event", "visit_id", "id", "notification_id"})
REDACTED = "[redacted]"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def redact_personal_data(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if method == "debug":
        return event_dict
    for key in PERSONAL_KEYS.intersection(event_dict):
        event_dict[key] = REDACTED
    return event_dict


def redact_contact_details(
    _logger: Any, method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """E-mail addresses and phone numbers inside any text value (run after exceptions are
    formatted, so a traceback's message is covered too)."""
    if method == "debug":
        return event_dict
    for key, value in event_dict.items():
        if isinstance(value, str) and key not in _OWN_VALUES:
            event_dict[key] = scrub(value)
    return event_dict


def scrub(text: str) -> str:
    """``text`` with e-mail addresses and telephone numbers replaced."""
    if "@" in text:
        text = _EMAIL.sub(REDACTED, text)
    return _PHONE.sub(_phone_or_not, text)


def _phone_or_not(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group(0))
    international = match.group(0).startswith("+")
    # UK numbers have 10 or 11 digits from the 0; E.164 numbers 8 to 15.
    if (8 <= digits <= 15) if international else (10 <= digits <= 11):
        return REDACTED
    return match.group(0)


def configure(level: str = "info", *, json: bool | None = None, stream: Any = None) -> None:
    stream = stream or sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_personal_data,
            structlog.processors.format_exc_info,
            redact_contact_details,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
