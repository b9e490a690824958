"""From a config ``type`` string to the connector class, imported only when used.

Lazy imports keep start-up fast and mean a broken optional connector (say, a missing
library for one channel) cannot stop the others from loading.
"""

from __future__ import annotations

import importlib

from visitwatch.connectors.base import CalendarSource, Channel
from visitwatch.core.errors import VisitwatchError
from visitwatch.core.options import did_you_mean

SOURCES: dict[str, str] = {
    "ics": "visitwatch.connectors.ics:IcsSource",
    "graph": "visitwatch.connectors.graph:GraphCalendarSource",
}

CHANNELS: dict[str, str] = {
    "outbox": "visitwatch.connectors.outbox:OutboxChannel",
    "console": "visitwatch.connectors.console:ConsoleChannel",
    "smtp": "visitwatch.connectors.smtp:SmtpChannel",
    "graph_mail": "visitwatch.connectors.graph_mail:GraphMailChannel",
    "webhook": "visitwatch.connectors.webhook:WebhookChannel",
    "notify_sms": "visitwatch.connectors.notify:NotifySmsChannel",
    "notify_email": "visitwatch.connectors.notify:NotifyEmailChannel",
    "twilio_sms": "visitwatch.connectors.twilio_sms:TwilioSmsChannel",
    "teams": "visitwatch.connectors.teams:TeamsChannel",
}


class UnknownConnectorType(VisitwatchError):
    pass


def _load(table: dict[str, str], kind: str, type_name: str) -> type:
    try:
        target = table[type_name]
    except KeyError:
        hint = did_you_mean(type_name, table).replace("known: ", "known types: ", 1)
        raise UnknownConnectorType(f"unknown {kind} type {type_name!r}; {hint}") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def source_class(type_name: str) -> type[CalendarSource]:
    return _load(SOURCES, "source", type_name)


def channel_class(type_name: str) -> type[Channel]:
    return _load(CHANNELS, "channel", type_name)
