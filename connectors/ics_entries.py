"""Checks on single iCalendar entries: can it be placed in time, under which uid, and
the short reasons a problem shows."""

from __future__ import annotations

import hashlib
import re
from datetime import date, datetime
from typing import Any

import icalendar

from visitwatch.connectors.ics_convert import as_list, as_text

# Properties whose damage makes an entry unreadable: without them we cannot know when
# the visit happens, and guessing could put a lone worker's visit at the wrong time.
_TIME_PROPERTIES = frozenset(
    {"DTSTART", "DTEND", "DURATION", "RRULE", "RDATE", "EXDATE", "RECURRENCE-ID", "EXRULE"}
)
_ZONED_PROPERTIES = ("DTSTART", "DTEND", "RECURRENCE-ID", "RDATE", "EXDATE")
_REASON_MAX = 200
_BROKEN_TIME_LINE = re.compile(r"'(" + "|".join(sorted(_TIME_PROPERTIES)) + r")[;:]", re.IGNORECASE)
_FREQUENCIES = frozenset({"SECONDLY", "MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY"})


def unreadable(component: icalendar.Component) -> str:
    """Why this VEVENT cannot be placed in time, or "" when it can."""
    for prop, message in getattr(component, "errors", []):
        if prop is not None and str(prop).upper() in _TIME_PROPERTIES:
            return short(f"{prop}: {message}")
        if prop is None:
            # icalendar skips a line it cannot split and names no property; only a
            # time line matters (a mangled ATTENDEE must not cost us the visit).
            match = _BROKEN_TIME_LINE.search(message)
            if match:
                return f"{match.group(1).upper()} line cannot be parsed"
    if "DTSTART" not in component:
        return "no DTSTART"
    try:
        start = component.decoded("DTSTART")
        if "DTEND" in component:
            component.decoded("DTEND")
        if "DURATION" in component:
            component.decoded("DURATION")
    except Exception as err:
        return short(f"unreadable time: {err}")
    if not isinstance(start, date):
        return "DTSTART is not a date or date-time"
    for rule in as_list(component.get("RRULE")):
        reason = _invalid_rule(rule)
        if reason:
            return reason
    return ""


def unknown_zones(component: icalendar.Component) -> list[str]:
    """The TZIDs that neither icalendar nor a VTIMEZONE could resolve.

    icalendar quietly drops an unknown zone and leaves the value floating, which we
    then read in the organisation's zone; the admin should know we guessed.
    """
    unknown: list[str] = []
    for name in _ZONED_PROPERTIES:
        for prop in as_list(component.get(name)):
            tzid = getattr(prop, "params", {}).get("TZID")
            if not tzid or tzid in unknown:
                continue
            values = [getattr(p, "dt", None) for p in getattr(prop, "dts", [prop])]
            if any(isinstance(v, datetime) and v.tzinfo is None for v in values):
                unknown.append(str(tzid))
    return unknown


def _invalid_rule(rule: Any) -> str:
    """Why an RRULE is invalid, or "" (RFC 5545: INTERVAL and COUNT are positive)."""
    try:
        parts = {str(k).upper(): v for k, v in dict(rule).items()}
    except Exception:
        return "invalid RRULE: it cannot be read"
    freq = [str(v).upper() for v in as_list(parts.get("FREQ"))]
    if len(freq) != 1 or freq[0] not in _FREQUENCIES:
        return "invalid RRULE: FREQ is missing or unknown"
    for name in ("INTERVAL", "COUNT"):
        for value in as_list(parts.get(name)):
            try:
                number = int(value)
            except (TypeError, ValueError):
                return f"invalid RRULE: {name} is not a number"
            if number < 1:
                return f"invalid RRULE: {name}={number} (it must be 1 or more)"
    return ""


def uid_of(component: icalendar.Component) -> str:
    uid = as_text(component.get("UID")).strip()
    if uid:
        return uid
    # Stable across fetches so the daemon recognises the same entry next time.
    try:
        start = component["DTSTART"].to_ical()
        start = start.decode() if isinstance(start, bytes) else str(start)
    except Exception:
        start = ""
    digest = hashlib.sha256(f"{start}|{as_text(component.get('SUMMARY'))}".encode())
    uid = f"visitwatch-{digest.hexdigest()[:32]}"
    component["UID"] = uid
    return uid


def first_clause(message: str) -> str:
    """The part of a parser message before it quotes the offending line."""
    return short(message.split(":", 1)[0])


def short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"
