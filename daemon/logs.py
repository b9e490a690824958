"""structlog set-up: JSON when not on a terminal, readable when on one; no personal data.

Logs carry visit ids, never family names, addresses or workers' names (principle 6). The
redaction step below enforces that for every event above debug, whatever a caller passes.
"""

from __future__ import annotations

import logging
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
    }
)

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
        event_dict[key] = "[redacted]"
    return event_dict


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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
