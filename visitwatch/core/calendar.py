"""What a calendar source returns: occurrences inside a half-open UTC window.

Glossary
--------
occurrence
    One concrete instance of a calendar entry. A single event has one occurrence; a
    recurring series has one per date, each identified by ``(uid, recurrence_id)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class TimeWindow:
    """The half-open interval ``[start, end)`` a source is asked about (aware UTC)."""

    start: datetime
    end: datetime

    @classmethod
    def around(cls, now: datetime, past: timedelta, ahead: timedelta) -> TimeWindow:
        return cls(now - past, now + ahead)


@dataclass(frozen=True)
class Attendee:
    email: str  # lower-cased
    name: str = ""
    response: str = ""  # accepted, declined, tentative, needs-action, or ""
    role: str = ""  # required, optional, resource, or ""


@dataclass(frozen=True)
class CalendarEvent:
    """One occurrence of a calendar entry, normalised. All times are aware UTC."""

    source: str  # the configured source name
    uid: str
    recurrence_id: str  # "" for a single event; the original start (ISO, UTC) otherwise
    subject: str
    start: datetime
    end: datetime | None  # None when the feed gave neither an end nor a duration
    description: str = ""
    location: str = ""
    categories: tuple[str, ...] = ()
    attendees: tuple[Attendee, ...] = ()
    organizer: str = ""  # e-mail address, lower-cased, or ""
    owner: str = ""  # the staff id the calendar belongs to, when the source says so
    all_day: bool = False
    cancelled: bool = False
    private: bool = False
    last_modified: datetime | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.source, self.uid, self.recurrence_id)


@dataclass(frozen=True)
class EventProblem:
    """An entry (or a whole feed, uid "") that could not be read, and why."""

    source: str
    uid: str
    reason: str


@dataclass
class FetchResult:
    """What one fetch produced.

    ``complete`` is true when the source returned everything in the window, so an entry
    that is missing has really been removed, unless its uid is named in ``problems`` (an
    entry that could not be read is not a removed one). ``fingerprint`` is a hash of the content:
    the same fingerprint for the same window means the same events. ``unchanged`` is true
    when the content matched the fingerprint the caller already knew: ``events`` is then
    empty and the caller keeps what it has.
    """

    events: list[CalendarEvent] = field(default_factory=list)
    problems: list[EventProblem] = field(default_factory=list)
    complete: bool = True
    fingerprint: str | None = None
    unchanged: bool = False


def utc_window(window: TimeWindow) -> TimeWindow:
    """``window`` with both ends aware UTC (a naive end is taken to be UTC already)."""

    def fix(moment: datetime) -> datetime:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    return TimeWindow(fix(window.start), fix(window.end))


def overlaps(event: CalendarEvent, window: TimeWindow) -> bool:
    """Whether ``event`` falls in ``[window.start, window.end)``.

    An event with no length (no end, or an end not after its start) is in the window
    when its start is.
    """
    if event.end is None or event.end <= event.start:
        return window.start <= event.start < window.end
    return event.start < window.end and event.end > window.start
