"""The test world's calendar read through each kind of source, from the same entries.

A test writes its calendar once, as ICS text (``World.write_calendar``); each kind serves
that file as it is at the moment of each read:

``ics-file``
    the file itself, read from disk;
``ics-http``
    the file over a real loopback HTTP server (``tests/ics_feed.py``), gone: 404;
``graph``
    Microsoft Graph through ``responses`` (``tests/graph_mock.py``): each VEVENT parsed with
    ``icalendar`` and served as a calendarView resource (subject, UTC times, text body,
    location, categories, attendees, the mailbox as organiser, the UID as iCalUId,
    isCancelled, lastModifiedDateTime); gone: Graph's answer for a mailbox that no longer
    exists. The source reads with ``delta = false``: a full calendarView on every sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import icalendar
import pytest
import requests
import responses

from tests.graph_mock import CLIENT, TENANT, Mailbox, add_token, view_url
from tests.ics_feed import Feed, serving
from tests.source_contract import Entry
from visitwatch.core.calendar import Attendee

SOURCE_KINDS = ("ics-file", "ics-http", "graph")
WORKER = "asha.khan@example.org"  # whose calendar it is, unless it is shared
SHARED_MAILBOX = "home-visits@example.org"  # a shared calendar: nobody's, workers invited
GRAPH_SECRET_ENV = "VW_WORLD_GRAPH_SECRET"


@dataclass
class CalendarFeed:
    """How the world's calendar file reaches a source of one kind."""

    kind: str
    calendar: Path
    url: str = ""  # ics-http: where the file is served

    def source_table(self, name: str, *, shared: bool) -> str:
        """The ``[[sources]]`` table reading the calendar (a shared one has no owner)."""
        if self.kind == "graph":
            mailbox = SHARED_MAILBOX if shared else WORKER
            lines = [
                'type = "graph"',
                f'tenant_id = "{TENANT}"',
                f'client_id = "{CLIENT}"',
                f'client_secret = {{ env = "{GRAPH_SECRET_ENV}" }}',
                f'mailboxes = ["{mailbox}"]',
                f"shared = {str(shared).lower()}",
                "delta = false",
            ]
        else:
            where = f'url = "{self.url}"' if self.kind == "ics-http" else 'path = "calendar.ics"'
            lines = ['type = "ics"', where] + ([] if shared else [f'owner = "{WORKER}"'])
        return "\n[[sources]]\n" + f'name = "{name}"\n' + "\n".join(lines) + "\n"

    @property
    def named_in_errors(self) -> str:
        """What a read error of this feed names, so an admin knows which calendar failed."""
        return {"ics-file": "calendar.ics", "ics-http": self.url, "graph": WORKER}[self.kind]


@contextmanager
def calendar_feed(
    kind: str, calendar: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CalendarFeed]:
    """Serve ``calendar`` to a source of ``kind`` until the block ends."""
    if kind == "ics-file":
        yield CalendarFeed(kind, calendar)
    elif kind == "ics-http":
        with serving(Feed(file=calendar)) as server:
            yield CalendarFeed(kind, calendar, server.url("/calendar.ics"))
    elif kind == "graph":
        monkeypatch.setenv(GRAPH_SECRET_ENV, "not-a-real-secret")
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            add_token(mock)
            for mailbox in (WORKER, SHARED_MAILBOX):
                answer = GraphCalendar(calendar, mailbox).answer
                mock.add_callback(responses.GET, view_url(mailbox), callback=answer)
            yield CalendarFeed(kind, calendar)
    else:
        raise ValueError(f"unknown source kind {kind!r}; known: {', '.join(SOURCE_KINDS)}")


@dataclass
class GraphCalendar:
    """One mailbox's calendarView, read from the calendar file at each request."""

    calendar: Path
    mailbox: str

    def answer(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        mailbox = Mailbox()
        if not self.calendar.exists():
            message = f"The requested user '{self.mailbox}' is invalid."
            mailbox.failure = (404, {"error": {"code": "ErrorInvalidUser", "message": message}})
        else:
            parsed = icalendar.Calendar.from_ical(self.calendar.read_text(encoding="utf-8"))
            for vevent in parsed.walk("VEVENT"):
                entry, extra = graph_entry(vevent, self.mailbox)
                mailbox.entries.append(entry)
                mailbox.extra[entry.uid] = extra
        return mailbox.answer(request)


def graph_entry(vevent: icalendar.Component, mailbox: str) -> tuple[Entry, dict[str, Any]]:
    """A VEVENT as Outlook keeps it, and the Graph fields an :class:`Entry` does not hold."""
    uid = str(vevent.get("UID"))
    start = _moment(vevent.get("DTSTART"))
    end = _moment(vevent.get("DTEND"))
    categories = vevent.get("CATEGORIES")
    attendees = vevent.get("ATTENDEE") or []
    if not isinstance(attendees, list):
        attendees = [attendees]
    entry = Entry(
        uid=uid,
        start=start or datetime.min.replace(tzinfo=UTC),
        end=end,
        subject=str(vevent.get("SUMMARY") or ""),
        description=str(vevent.get("DESCRIPTION") or ""),
        location=str(vevent.get("LOCATION") or ""),
        categories=tuple(str(c) for c in categories.cats) if categories else (),
        cancelled=str(vevent.get("STATUS") or "").upper() == "CANCELLED",
        attendees=tuple(
            Attendee(email=str(a).removeprefix("mailto:"), name=str(a.params.get("CN", "")))
            for a in attendees
        ),
        broken=start is None,
    )
    extra: dict[str, Any] = {
        "iCalUId": uid,  # an entry from outside Exchange keeps its UID as its iCalUId
        "organizer": {"emailAddress": {"name": "", "address": mailbox}},
    }
    modified = _moment(vevent.get("LAST-MODIFIED"))
    if modified is not None:
        extra["lastModifiedDateTime"] = f"{modified:%Y-%m-%dT%H:%M:%S}.0000000Z"
    return entry, extra


def _moment(prop: Any) -> datetime | None:
    """A date-time property as aware UTC; None when absent or unreadable."""
    try:
        value = getattr(prop, "dt", None)
    except ValueError:  # icalendar keeps an unreadable value as vBroken, which has no dt
        return None
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(UTC)
    if isinstance(value, date | datetime):
        raise ValueError(f"the Graph feed serves only UTC date-times, not {value!r}")
    return None
