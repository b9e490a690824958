"""One expanded iCalendar occurrence turned into a :class:`CalendarEvent` in aware UTC."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

import icalendar

from visitwatch.core.calendar import Attendee, CalendarEvent

# Marks put on source components before expansion. recurring_ical_events copies every
# property of a component into its occurrences, so these survive expansion and tell us
# what the feed itself said (the library fills in an end equal to the start otherwise).
NO_END = "X-VISITWATCH-NO-END"


@dataclass(frozen=True)
class Feed:
    """What every event read from one feed carries, and the zone floating times are in."""

    source: str  # the configured source name
    owner: str  # the staff id the calendar belongs to, or ""
    zone: ZoneInfo  # the organisation's zone


def to_event(
    feed: Feed,
    uid: str,
    occurrence: icalendar.Component,
    recurring: bool,
    shifts: dict[datetime, timedelta] | None = None,
) -> CalendarEvent:
    """``occurrence`` (of series ``uid``) as an event; ``shifts`` are the moves made by
    RANGE=THISANDFUTURE overrides, keyed by their RECURRENCE-ID in UTC."""
    zone = feed.zone
    raw_start = occurrence.decoded("DTSTART")
    all_day = not isinstance(raw_start, datetime)
    start = to_utc(raw_start, zone)
    end: datetime | None
    if "DTEND" in occurrence and (all_day or NO_END not in occurrence):
        end = to_utc(occurrence.decoded("DTEND"), zone)
    elif "DURATION" in occurrence and NO_END not in occurrence:
        end = start + occurrence.decoded("DURATION")
    elif all_day:
        end = start + timedelta(days=1)  # RFC 5545: a DATE start alone lasts one day
    else:
        end = None
    recurrence_id = ""
    if recurring:
        original = start
        if "RECURRENCE-ID" in occurrence:
            marked = to_utc(occurrence.decoded("RECURRENCE-ID"), zone)
            shift = (shifts or {}).get(marked)
            # An override with RANGE=THISANDFUTURE lends its RECURRENCE-ID to every
            # later occurrence it moves: key each by the start it had in the series.
            original = marked if shift is None else to_utc(raw_start - shift, zone)
        recurrence_id = original.isoformat()
    modified = occurrence.get("LAST-MODIFIED") or occurrence.get("DTSTAMP")
    return CalendarEvent(
        source=feed.source,
        uid=uid,
        recurrence_id=recurrence_id,
        subject=as_text(occurrence.get("SUMMARY")),
        start=start,
        end=end,
        description=as_text(occurrence.get("DESCRIPTION")),
        location=as_text(occurrence.get("LOCATION")),
        categories=_categories(occurrence),
        attendees=tuple(_attendee(a) for a in as_list(occurrence.get("ATTENDEE"))),
        organizer=_address(occurrence.get("ORGANIZER")),
        owner=feed.owner,
        all_day=all_day,
        cancelled=as_text(occurrence.get("STATUS")).upper() == "CANCELLED",
        private=as_text(occurrence.get("CLASS")).upper() in ("PRIVATE", "CONFIDENTIAL"),
        last_modified=_safe_time(modified, zone),
    )


def to_utc(value: date | datetime, zone: tzinfo) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=zone)  # floating: the organisation's wall clock
        return value.astimezone(UTC)
    return datetime.combine(value, time(0), tzinfo=zone).astimezone(UTC)


def _safe_time(prop: Any, zone: tzinfo) -> datetime | None:
    try:
        value = getattr(prop, "dt", None)
    except ValueError:  # icalendar raises on reading a broken value; it is only metadata
        return None
    if isinstance(value, date):
        return to_utc(value, zone)
    return None


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(as_text(v) for v in value)
    return str(value)


def _categories(component: icalendar.Component) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for prop in as_list(component.get("CATEGORIES")):
        names: Iterable[Any] = getattr(prop, "cats", None) or str(prop).split(",")
        for name in names:
            cleaned = str(name).strip()
            if cleaned:
                seen.setdefault(cleaned, None)
    return tuple(seen)


def _address(value: Any) -> str:
    if value is None:
        return ""
    shown = str(value).strip()
    if shown.lower().startswith("mailto:"):
        shown = shown[7:]
    return shown.strip().lower()


def _attendee(prop: Any) -> Attendee:
    params = getattr(prop, "params", {})
    cutype = str(params.get("CUTYPE", "")).upper()
    role = str(params.get("ROLE", "")).upper()
    if cutype in ("RESOURCE", "ROOM"):
        mapped = "resource"
    elif role in ("REQ-PARTICIPANT", "CHAIR"):
        mapped = "required"
    elif role == "OPT-PARTICIPANT":
        mapped = "optional"
    else:
        mapped = ""
    return Attendee(
        email=_address(prop),
        name=str(params.get("CN", "")),
        response=str(params.get("PARTSTAT", "")).lower(),
        role=mapped,
    )
