"""From a config ``type`` string to the connector class, imported only when used.

Lazy imports keep start-up fast and mean a broken optional connector (say, a missing
library for one channel) cannot stop the others from loading.
"""

from __future__ import annotations

import importlib

from visitwatch.connectors.base import CalendarSource, Channel
from visitwatch.core.errors import VisitwatchError

SOURCES: dict[str, str] = {
    "ics": "visitwatch.connectors.ics:IcsSource",
    "graph": "visitwatch.connectors.graph:GraphCalendarSource",
}

CHANNELS: dict[str, str] = {
    "outbox": "visitwatch.connectors.outbox:OutboxChannel",
    "console": "visitwatch.connectors.console:ConsoleChannel",
    "smtp": "visitwatch.connectors.smtp:SmtpChannel",
    "graph_mail": "visitwatch.connectors.graph_mail:GraphMailChannel",
}


class UnknownConnectorType(VisitwatchError):
    pass


def _load(table: dict[str, str], kind: str, type_name: str) -> type:
    try:
        target = table[type_name]
    except KeyError:
        known = ", ".join(sorted(table))
        raise UnknownConnectorType(
            f"unknown {kind} type {type_name!r}; known types: {known}"
        ) from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def source_class(type_name: str) -> type[CalendarSource]:
    return _load(SOURCES, "source", type_name)


def channel_class(type_name: str) -> type[Channel]:
    return _load(CHANNELS, "channel", type_name)
