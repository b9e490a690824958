"""Trying each source and channel once, as ``visitwatch check`` and ``doctor`` both do.

Each line starts ``ok   `` or ``FAIL `` so a person can scan it; nothing is sent and no
calendar is changed (each connector's ``check`` promises that).
"""

from __future__ import annotations

from collections.abc import Iterator

from visitwatch.core.errors import ConnectorError
from visitwatch.daemon.config import Config
from visitwatch.daemon.reach import unreachable
from visitwatch.daemon.service import Service


def connector_checks(service: Service) -> Iterator[tuple[bool, str]]:
    """``(ok, line)`` for each source (and its visits in the sync window) and channel."""
    for name, error in service.source_errors.items():
        yield False, f"FAIL source {name}: {error}"
    window = service.syncer.window(service.clock.now())
    for name, source in service.sources.items():
        try:
            summary = source.check()
            events = source.fetch(window).events
            visits = sum(1 for e in events if service.policy.recognise(e))
            yield True, f"ok   source {name}: {summary}; {visits} visits in the sync window"
        except ConnectorError as err:
            yield False, f"FAIL source {name}: {err}"
    for name, channel in service.channels.items():
        try:
            yield True, f"ok   channel {name}: {channel.check()}"
        except ConnectorError as err:
            yield False, f"FAIL channel {name}: {err}"


def reach_checks(config: Config) -> Iterator[tuple[bool, str]]:
    """Everyone the ladder may address but no channel reaches (names: the admin's terminal
    only, never logs)."""
    for person in unreachable(config):
        yield False, f"FAIL reach: {person}"
