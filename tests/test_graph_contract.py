"""GraphCalendarSource keeps the calendar source contract: entries served as Graph JSON.

Graph is mocked with ``responses`` as in ``tests/test_graph_source.py`` (its token set-up
is imported from there). The mocked ``calendarView`` does what Graph does: it expands
series on the server into ``occurrence`` and ``exception`` resources whose iCalUId carries
the occurrence's date, and answers the window a little generously (entries touching its
edges included), so the source's own half-open filtering is what the contract sees.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest
import requests
import responses

from tests.source_contract import CalendarSourceContract, Entry, MakeSource, series_starts
from tests.test_graph_source import (
    ASHA,
    CLIENT,
    GOID,
    TENANT,
    TOKEN,
    _fresh_clients,
    add_token,
    view_url,
)
from visitwatch.connectors.base import CalendarSource
from visitwatch.connectors.graph import GraphCalendarSource
from visitwatch.core.options import ConnectorContext, validate_options

__all__ = ["_fresh_clients"]  # the autouse fixture that gives each test its own client

CLIENT_SECRET = "vw-contract-client-secret-3f9a"
NO_DATE = "00000000"
GOID_TAIL = "00" * 16  # creation time and reserved bytes, unused here


def ical_uid(uid: str, occurrence: datetime | None = None) -> str:
    """Outlook's GlobalObjectId for ``uid``: bytes 16-19 hold an occurrence's date."""
    day = NO_DATE
    if occurrence is not None:
        day = f"{occurrence.year:04X}{occurrence.month:02X}{occurrence.day:02X}"
    return GOID + day + GOID_TAIL + uid.encode().hex().upper()


def graph_time(moment: datetime) -> dict[str, str]:
    return {"dateTime": f"{moment:%Y-%m-%dT%H:%M:%S}.0000000", "timeZone": "UTC"}


def resource(entry: Entry, kind: str, original: datetime | None) -> dict[str, Any]:
    """``entry`` as calendarView returns it (Prefer: outlook.timezone="UTC", text body)."""
    day = original or entry.start
    change = hashlib.sha256(repr(entry).encode()).hexdigest()[:16]
    return {
        "id": f"AAMk-{entry.uid}-{day:%Y%m%d}",
        "iCalUId": ical_uid(entry.uid, original),
        "changeKey": change,
        "lastModifiedDateTime": "2026-06-01T08:00:00.1234567Z",
        "type": kind,
        "seriesMasterId": f"AAMk-{entry.uid}" if original else None,
        "originalStart": f"{original:%Y-%m-%dT%H:%M:%S}Z" if original else None,
        "subject": entry.subject,
        "body": {"contentType": "text", "content": entry.description},
        "start": {"dateTime": "2026-07-0X", "timeZone": "UTC"}
        if entry.broken
        else graph_time(entry.start),
        "end": graph_time(entry.end) if entry.end else None,
        "isAllDay": False,
        "isCancelled": entry.cancelled,
        "sensitivity": "normal",
        "categories": list(entry.categories),
        "location": {"displayName": entry.location},
        "organizer": {"emailAddress": {"name": "Asha Khan", "address": ASHA}},
        "attendees": [
            {
                "type": "required",
                "status": {"response": "accepted", "time": "2026-06-01T08:00:00Z"},
                "emailAddress": {"name": person.name, "address": person.email},
            }
            for person in entry.attendees
        ],
    }


@dataclass
class Mailbox:
    """What the mocked Graph holds in Asha's calendar."""

    entries: list[Entry] = field(default_factory=list)

    def view(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """calendarView of [start, end]: series expanded, exceptions in their place."""
        moved = {(e.uid, e.original_start) for e in self.entries if e.original_start}
        found: list[tuple[Entry, dict[str, Any]]] = []
        for entry in self.entries:
            if entry.original_start is not None:
                found.append((entry, resource(entry, "exception", entry.original_start)))
            elif entry.rrule:
                length = entry.end - entry.start if entry.end else None
                for begins in series_starts(entry, end):
                    if (entry.uid, begins) in moved:
                        continue
                    ends = begins + length if length is not None else None
                    one = replace(entry, start=begins, end=ends)
                    found.append((one, resource(one, "occurrence", begins)))
            else:
                found.append((entry, resource(entry, "singleInstance", None)))
        return [
            raw
            for entry, raw in found
            if entry.broken or (entry.start <= end and (entry.end or entry.start) >= start)
        ]

    def answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        asked = {k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query).items()}
        start = datetime.fromisoformat(asked["startDateTime"]).astimezone(UTC)
        end = datetime.fromisoformat(asked["endDateTime"]).astimezone(UTC)
        body = {"value": self.view(start, end)}
        return 200, {"Content-Type": "application/json"}, json.dumps(body)


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def build_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> GraphCalendarSource:
    monkeypatch.setenv("VW_GRAPH_SECRET", CLIENT_SECRET)
    table = {
        "tenant_id": TENANT,
        "client_id": CLIENT,
        "client_secret": {"env": "VW_GRAPH_SECRET"},
        "mailboxes": [ASHA],
        "delta": False,
    }
    settings, problems = validate_options(table, GraphCalendarSource.options, "s", tmp_path)
    assert problems == []
    context = ConnectorContext(
        timezone=ZoneInfo("Europe/London"), state_dir=tmp_path / "state", config_dir=tmp_path
    )
    return GraphCalendarSource("outlook", settings, context)


class TestGraphSourceContract(CalendarSourceContract):
    """The contract, for one Outlook mailbox read with calendarView."""

    def reported_uid(self, uid: str) -> str:
        return ical_uid(uid)

    @pytest.fixture
    def make_source(
        self, mock: responses.RequestsMock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> MakeSource:
        mailbox = Mailbox()
        add_token(mock)
        mock.add_callback(responses.GET, view_url(), callback=mailbox.answer)

        def build(entries: Sequence[Entry]) -> CalendarSource:
            mailbox.entries = list(entries)
            return build_source(tmp_path, monkeypatch)

        return build

    @pytest.fixture(
        params=[
            "timeout",
            "mailbox-unknown",
            "access-denied",
            "not-json",
        ]
    )
    def broken_source(
        self,
        request: pytest.FixtureRequest,
        mock: responses.RequestsMock,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> CalendarSource:
        add_token(mock)
        url = view_url()
        kind = request.param
        if kind == "timeout":
            mock.get(url, body=requests.exceptions.ConnectTimeout("no answer"))
        elif kind == "mailbox-unknown":
            error = {"code": "ErrorInvalidUser", "message": f"The requested user '{ASHA}'"}
            mock.get(url, status=404, json={"error": error})
        elif kind == "access-denied":
            error = {"code": "ErrorAccessDenied", "message": "Access is denied."}
            mock.get(url, status=403, json={"error": error})
        else:
            mock.get(url, status=200, body="<html>Service unavailable</html>")
        return build_source(tmp_path, monkeypatch)

    @pytest.fixture
    def secrets(self) -> list[str]:
        return [CLIENT_SECRET, TOKEN]
