"""Bounded expansion of one series (a master entry and its overrides) over a window.

``recurring_ical_events`` expands the series; this module keeps it to a budget of time
(:func:`interrupt_at`) and of occurrences (:class:`TooMany`), so that a runaway rule
(FREQ=SECONDLY begun years ago) costs one entry, never the whole feed.
"""

from __future__ import annotations

import re
import sys
import time as monotonic_time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, tzinfo
from types import FrameType
from typing import Any

import icalendar
import recurring_ical_events
import x_wr_timezone

from visitwatch.connectors.ics_convert import NO_END, Feed, as_list, to_event, to_utc
from visitwatch.core.calendar import CalendarEvent, TimeWindow, overlaps

# Series are expanded over a padded window and then filtered exactly, because floating
# and all-day values are compared by the library before we have placed them in the
# organisation's zone (offsets reach +-14 h).
_EXPANSION_PAD = timedelta(days=2)


class OverBudget(BaseException):
    """Raised inside expansion when its time is up.

    A BaseException, so that the ``except Exception`` of a tolerant library does not
    swallow it (Python unsets a trace function that raised: there is one chance).
    """


class TooMany(Exception):
    """Raised when a series has more occurrences in the window than are watched."""


# Raise only where the exception is sure to travel up to us: in the expansion code
# itself, never in a finaliser or a clean-up whose exceptions Python swallows.
_INTERRUPTIBLE = re.compile(r"(dateutil|recurring_ical_events|x_wr_timezone)[/\\]")
_NEVER_INTERRUPTED = frozenset({"__del__", "__exit__", "close", "__aexit__"})


@contextmanager
def interrupt_at(at: float) -> Iterator[None]:
    """Interrupt the Python code run inside once the monotonic clock passes ``at``.

    dateutil walks a rule from its DTSTART, so a FREQ=SECONDLY rule begun years ago, or a
    rule whose BY parts never match, can run for hours inside one library call. A trace
    function sees every Python call made there and raises once time is up; it chains to
    a tracer already installed (a debugger, coverage).
    """
    previous = sys.gettrace()

    def tracer(frame: FrameType, event: Any, arg: Any) -> Any:
        if (
            monotonic_time.monotonic() > at
            and frame.f_code.co_name not in _NEVER_INTERRUPTED
            and _INTERRUPTIBLE.search(frame.f_code.co_filename)
        ):
            raise OverBudget
        return previous(frame, event, arg) if previous is not None else None

    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def expand(
    feed: Feed,
    uid: str,
    components: list[icalendar.Component],
    timezones: list[icalendar.Component],
    wr_timezone: str | None,
    window: TimeWindow,
    most: int,
    deadline: float = float("inf"),
) -> Iterator[CalendarEvent]:
    """The occurrences of one series (its master and overrides) overlapping ``window``.

    Raises :class:`TooMany` after ``most`` occurrences and :class:`OverBudget` once the
    monotonic clock passes ``deadline`` (checked between slices of the window; the caller
    runs it under :func:`interrupt_at` to stop a runaway rule inside the library).
    """
    recurring = len(components) > 1 or any(
        name in c for c in components for name in ("RRULE", "RDATE", "RECURRENCE-ID")
    )
    if not recurring and not wr_timezone and "EXDATE" not in components[0]:
        # A single entry: read it as it stands (what the library would do, without
        # building a calendar for it; large feeds are mostly single entries).
        single = components[0].copy()
        if "DTEND" not in single and "DURATION" not in single:
            single[NO_END] = "TRUE"
        event = to_event(feed, uid, single, recurring)
        if event.end is None or event.end >= event.start:
            if overlaps(event, window):
                yield event
            return
    mini = icalendar.Calendar()
    mini.add("PRODID", "-//visitwatch//ics//EN")
    mini.add("VERSION", "2.0")
    if wr_timezone:
        mini.add("X-WR-TIMEZONE", wr_timezone)
    for tz_component in timezones:
        mini.add_component(tz_component)
    for component in components:
        copy = component.copy()
        for sub in component.subcomponents:
            copy.add_component(sub)
        if "DTEND" not in component and "DURATION" not in component:
            copy[NO_END] = "TRUE"
        mini.add_component(copy)
    if wr_timezone:
        mini = x_wr_timezone.to_standard(mini)
    shifts = _this_and_future_shifts(components, feed.zone)
    # In start order, a slice of the window at a time: a runaway rule is stopped after
    # max_occurrences instead of being materialised whole.
    earliest = window.start - _EXPANSION_PAD
    latest = window.end + _EXPANSION_PAD
    step = _slice_for(components, most) or (latest - earliest)
    query = recurring_ical_events.of(mini)
    watched = 0
    seen: set[tuple[str, str]] = set()
    begin = earliest
    while begin < latest:
        if monotonic_time.monotonic() > deadline:
            raise OverBudget
        stop = min(begin + step, latest)
        occurrences = [
            to_event(feed, uid, o, recurring, shifts) for o in query.between(begin, stop)
        ]
        occurrences.sort(key=lambda e: e.start)
        for event in occurrences:
            if (event.recurrence_id, event.start.isoformat()) in seen:
                continue  # spans the edge of two slices
            seen.add((event.recurrence_id, event.start.isoformat()))
            if overlaps(event, window):
                watched += 1
                if watched > most:
                    raise TooMany
                yield event
        begin = stop


_SUB_DAILY = {"SECONDLY": 1, "MINUTELY": 60, "HOURLY": 3600}


def _slice_for(components: list[icalendar.Component], most: int) -> timedelta | None:
    """How much of the window to expand at once for rules repeating within a day, so
    that one slice holds about ``most`` occurrences; None for other entries."""
    seconds: list[int] = []
    for component in components:
        for rule in as_list(component.get("RRULE")):
            try:
                parts = {str(k).upper(): v for k, v in dict(rule).items()}
                freq = str(as_list(parts.get("FREQ"))[0]).upper()
                interval = int(as_list(parts.get("INTERVAL") or [1])[0])
            except Exception:
                continue
            if freq in _SUB_DAILY:
                seconds.append(_SUB_DAILY[freq] * max(interval, 1))
    if not seconds:
        return None
    return timedelta(seconds=min(seconds) * (most + 1))


def _this_and_future_shifts(
    components: list[icalendar.Component], zone: tzinfo
) -> dict[datetime, timedelta]:
    """For each RANGE=THISANDFUTURE override (by its RECURRENCE-ID in UTC), how far it moves
    the occurrences after it, computed as recurring_ical_events computes it."""
    shifts: dict[datetime, timedelta] = {}
    for component in components:
        prop = component.get("RECURRENCE-ID")
        if prop is None or str(prop.params.get("RANGE", "")).upper() != "THISANDFUTURE":
            continue
        try:
            marked = component.decoded("RECURRENCE-ID")
            begins = component.decoded("DTSTART")
            if type(marked) is type(begins):
                shift = begins - marked
            else:
                shift = to_utc(begins, zone) - to_utc(marked, zone)
            shifts[to_utc(marked, zone)] = shift
        except Exception:
            continue
    return shifts
