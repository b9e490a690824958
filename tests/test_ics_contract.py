"""IcsSource keeps the calendar source contract: entries served as an .ics feed.

The feed is served by the loopback HTTP server of ``tests/ics_feed.py`` at a secret
address (a token in the path and the query, as Google and Outlook publish them) given to
the source as ``{ env = ... }``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.ics_feed import Feed, Server, calendar, serving
from tests.ics_feed import make_source as build_source
from tests.source_contract import WINDOW, CalendarSourceContract, Entry, MakeSource
from visitwatch.connectors.base import CalendarSource

TOKEN = "private-5f1c2a9e7b3d4c6a8e0f"


def ics_time(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def ics_text(value: str) -> str:
    """A TEXT value escaped as RFC 5545 asks."""
    return value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,").replace("\n", "\\n")


def vevent(entry: Entry) -> str:
    """``entry`` as a VEVENT; a broken one gets a start time nobody can read."""
    lines = [
        "BEGIN:VEVENT",
        f"UID:{entry.uid}",
        "DTSTAMP:20260601T080000Z",
        f"SUMMARY:{ics_text(entry.subject)}",
        "DTSTART:2026-07-0X" if entry.broken else f"DTSTART:{ics_time(entry.start)}",
    ]
    if entry.end is not None:
        lines.append(f"DTEND:{ics_time(entry.end)}")
    if entry.original_start is not None:
        lines.append(f"RECURRENCE-ID:{ics_time(entry.original_start)}")
    if entry.rrule:
        lines.append(f"RRULE:{entry.rrule}")
    if entry.description:
        lines.append(f"DESCRIPTION:{ics_text(entry.description)}")
    if entry.location:
        lines.append(f"LOCATION:{ics_text(entry.location)}")
    if entry.categories:
        lines.append("CATEGORIES:" + ",".join(ics_text(c) for c in entry.categories))
    if entry.cancelled:
        lines.append("STATUS:CANCELLED")
    for person in entry.attendees:
        lines.append(f'ATTENDEE;CN="{person.name}";PARTSTAT=ACCEPTED:mailto:{person.email}')
    lines.append("END:VEVENT")
    return "\n".join(lines)


def secret_path() -> str:
    return f"/calendar/ical/visits/{TOKEN}/basic.ics?key={TOKEN}"


class TestIcsSourceContract(CalendarSourceContract):
    """The contract, for an .ics feed read over HTTP from a secret address."""

    @pytest.fixture
    def make_source(
        self, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> MakeSource:
        monkeypatch.setenv("VW_ICS_URL", server.url(secret_path()))

        def build(entries: Sequence[Entry]) -> CalendarSource:
            server.feed.body = calendar(*(vevent(entry) for entry in entries))
            return build_source(tmp_path, {"url": {"env": "VW_ICS_URL"}})

        return build

    @pytest.fixture(params=["refused", "http-500", "login-page", "too-large", "missing-file"])
    def broken_source(
        self, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[CalendarSource]:
        kind = request.param
        if kind == "missing-file":
            yield build_source(tmp_path, {"path": "visits.ics"})
            return
        feed = Feed(body=calendar(vevent(Entry("v", WINDOW.start, None))))
        if kind == "http-500":
            feed.status = 500
        elif kind == "login-page":
            feed.body = b"<html><body>Sign in to see this calendar</body></html>"
        table: dict[str, Any] = {"url": {"env": "VW_ICS_BROKEN_URL"}}
        if kind == "too-large":
            table["max_bytes"] = len(feed.body) - 1
        with serving(feed) as other:
            url = other.url(secret_path())
            if kind == "refused":
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    url = f"http://127.0.0.1:{probe.getsockname()[1]}{secret_path()}"
            monkeypatch.setenv("VW_ICS_BROKEN_URL", url)
            yield build_source(tmp_path, table)

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [TOKEN]
