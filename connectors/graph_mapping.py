"""A Graph event resource (JSON) as a :class:`CalendarEvent`.

Times arrive as ``dateTimeTimeZone`` (asked for in UTC, but the zone may be any IANA or
Windows name) and leave as aware UTC; an all-day entry is midnight in the organisation's
zone. The uid is the series' iCalendar UID, so occurrences differ only by recurrence id.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Any, TypeGuard
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from icalendar.timezone.windows_to_olson import WINDOWS_TO_OLSON

from visitwatch.core.calendar import Attendee, CalendarEvent

# Only what the mapping reads: smaller pages, fewer throttling units. originalStart is the
# original time of an occurrence or exception, which is what recurrence ids are made of.
SELECT = (
    "id,iCalUId,type,seriesMasterId,originalStart,subject,body,bodyPreview,start,end,isAllDay,"
    "location,locations,categories,isCancelled,sensitivity,showAs,organizer,attendees,"
    "changeKey,lastModifiedDateTime"
)

# Outlook's GlobalObjectId (iCalUId) class id; bytes 16-19 hold the occurrence's date.
_GOID_PREFIX = "040000008200E00074C5B7101A82E008"
_GOID_DATE = slice(32, 40)

_RESPONSES = {
    "accepted": "accepted",
    "organizer": "accepted",
    "declined": "declined",
    "tentativelyaccepted": "tentative",
    "none": "needs-action",
    "notresponded": "needs-action",
}
_ROLES = {"required": "required", "optional": "optional", "resource": "resource"}
_UTC_NAMES = frozenset({"utc", "etc/utc", "tzone://microsoft/utc", "coordinated universal time"})
_FRACTION = re.compile(r"(\.\d{1,6})\d*")
_TAG = re.compile(r"<[^>]+>")
_BREAK = re.compile(r"<\s*(br|/p|/div|/li|/tr)\b[^>]*>", re.IGNORECASE)


class Malformed(ValueError):
    """An entry whose times cannot be read; becomes an EventProblem for that uid."""


@dataclass(frozen=True)
class Reading:
    """How a source reads its entries: whose they are and what it may show."""

    source: str  # the source's name
    zone: tzinfo  # the organisation's zone: all-day entries start at its midnight
    shared: bool  # a shared visits mailbox: the mailbox is nobody's, and not an attendee
    private_details: bool  # private entries are read as ordinary ones


def to_event(raw: Mapping[str, Any], mailbox: str, reading: Reading) -> CalendarEvent:
    """The entry ``raw`` read from ``mailbox``; raises :class:`Malformed`."""
    all_day = bool(raw.get("isAllDay"))
    start_value = raw.get("start")
    if not isinstance(start_value, dict) or not start_value.get("dateTime"):
        raise Malformed("no start time")
    end_value = raw.get("end")
    end: datetime | None
    if all_day:
        # An all-day entry is a date, not an instant: midnight in the organisation's zone.
        start = _all_day(start_value, reading.zone)
        end = (
            _all_day(end_value, reading.zone) if _has_time(end_value) else start + timedelta(days=1)
        )
    else:
        start = _graph_time(start_value)
        end = _graph_time(end_value) if _has_time(end_value) else None
    recurrence_id = ""
    if raw.get("type") in ("occurrence", "exception"):
        original = start
        if raw.get("originalStart"):
            try:
                original = _parse_iso(str(raw["originalStart"]), UTC)
            except ValueError as err:
                raise Malformed(f"originalStart cannot be read ({err})") from None
        recurrence_id = original.astimezone(UTC).isoformat()
    address = mailbox.lower()
    attendees = tuple(
        a
        for a in (_attendee(item) for item in raw.get("attendees") or [])
        if a.email and not (reading.shared and a.email == address)
    )
    sensitivity = str(raw.get("sensitivity") or "").lower()
    return CalendarEvent(
        source=reading.source,
        uid=uid(raw),
        recurrence_id=recurrence_id,
        subject=str(raw.get("subject") or ""),
        start=start,
        end=end,
        description=_description(raw),
        location=_location(raw),
        categories=tuple(str(c) for c in raw.get("categories") or []),
        attendees=attendees,
        organizer=_email(raw.get("organizer")),
        owner="" if reading.shared else address,
        all_day=all_day,
        cancelled=bool(raw.get("isCancelled")),
        private=sensitivity in ("private", "confidential") and not reading.private_details,
        last_modified=_optional_time(raw.get("lastModifiedDateTime")),
    )


def uid(raw: Mapping[str, Any]) -> str:
    """The entry's iCalendar UID, the same for every occurrence of a series.

    Graph gives each occurrence its own iCalUId: Outlook's GlobalObjectId with the
    occurrence's date in bytes 16-19. Zeroing them gives the series' id (what an ICS export
    calls UID); the recurrence id then tells the occurrences apart.
    """
    text = str(raw.get("iCalUId") or raw.get("id") or "")
    if (
        raw.get("type") in ("occurrence", "exception")
        and text.upper().startswith(_GOID_PREFIX)
        and len(text) >= _GOID_DATE.stop
    ):
        text = text[: _GOID_DATE.start] + "00000000" + text[_GOID_DATE.stop :]
    return text


def _has_time(value: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(value, dict) and bool(value.get("dateTime"))


def _parse_iso(text: str, default_zone: tzinfo) -> datetime:
    # Graph writes seven fractional digits; Python reads at most six.
    value = datetime.fromisoformat(_FRACTION.sub(r"\1", text.strip()))
    return value.replace(tzinfo=default_zone) if value.tzinfo is None else value


def _zone(name: str) -> tzinfo:
    """An IANA or Windows zone name (Graph uses both) as a tzinfo."""
    cleaned = name.strip()
    if not cleaned or cleaned.lower() in _UTC_NAMES:
        return UTC
    for candidate in (cleaned, WINDOWS_TO_OLSON.get(cleaned)):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    raise Malformed(f"unknown time zone {cleaned!r}")


def _graph_time(value: Mapping[str, Any]) -> datetime:
    """A dateTimeTimeZone as aware UTC."""
    zone = _zone(str(value.get("timeZone") or "UTC"))
    try:
        return _parse_iso(str(value["dateTime"]), zone).astimezone(UTC)
    except ValueError:
        raise Malformed(f"unreadable time {value.get('dateTime')!r}") from None


def _all_day(value: Mapping[str, Any], zone: tzinfo) -> datetime:
    text = str(value.get("dateTime") or "")
    try:
        day = datetime.fromisoformat(_FRACTION.sub(r"\1", text)).date()
    except ValueError:
        raise Malformed(f"unreadable date {text!r}") from None
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _optional_time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        return _parse_iso(str(text), UTC).astimezone(UTC)
    except ValueError:
        return None  # only metadata: not worth losing the entry over


def _email(recipient: Any) -> str:
    if not isinstance(recipient, Mapping):
        return ""
    address = (recipient.get("emailAddress") or {}).get("address") or ""
    return str(address).strip().lower()


def _attendee(item: Mapping[str, Any]) -> Attendee:
    status = str(((item.get("status") or {}).get("response")) or "").lower()
    return Attendee(
        email=_email(item),
        name=str((item.get("emailAddress") or {}).get("name") or ""),
        response=_RESPONSES.get(status, ""),
        role=_ROLES.get(str(item.get("type") or "").lower(), ""),
    )


def _description(raw: Mapping[str, Any]) -> str:
    body = raw.get("body") or {}
    content = str(body.get("content") or "")
    if content and str(body.get("contentType") or "text").lower() == "html":
        # Asked for text, given HTML anyway: keep line breaks, drop the markup.
        content = html.unescape(_TAG.sub("", _BREAK.sub("\n", content)))
    content = content.replace("\r\n", "\n").strip()
    return content or str(raw.get("bodyPreview") or "").strip()


def _location(raw: Mapping[str, Any]) -> str:
    location = raw.get("location") or {}
    text = str(location.get("displayName") or "").strip()
    address = location.get("address") or {}
    for key in ("street", "city", "postalCode"):
        part = str(address.get(key) or "").strip()
        if part and part.lower() not in text.lower():
            text = f"{text}, {part}" if text else part
    for other in raw.get("locations") or []:
        name = str((other or {}).get("displayName") or "").strip()
        if name and name.lower() not in text.lower():
            text = f"{text}; {name}" if text else name
    return text
