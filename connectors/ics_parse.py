"""Parsing a repaired iCalendar feed into events, within budgets of time and size.

The feed is taken apart by :mod:`~visitwatch.connectors.ics_repair`, parsed with
``icalendar`` (whole, or entry by entry when it will not parse whole), grouped into series
by UID and each series expanded on its own by :mod:`~visitwatch.connectors.ics_expand`,
so one broken entry becomes an :class:`EventProblem` instead of hiding everybody else's
visits.
"""

from __future__ import annotations

import hashlib
import time as monotonic_time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import icalendar
import structlog

from visitwatch.connectors.ics_convert import Feed, as_text
from visitwatch.connectors.ics_entries import first_clause, short, uid_of, unknown_zones, unreadable
from visitwatch.connectors.ics_expand import OverBudget, TooMany, expand, interrupt_at
from visitwatch.connectors.ics_repair import (
    Block,
    Layout,
    decode,
    describe_non_calendar,
    split_feed,
)
from visitwatch.core.calendar import CalendarEvent, EventProblem, FetchResult, TimeWindow
from visitwatch.core.errors import ConnectorError

log = structlog.get_logger(__name__)

_PARSE_GROUP = 500  # entries parsed at once; the parse budget is checked between groups


@dataclass(frozen=True)
class Limits:
    """How much of a feed is read, and for how long (the source's options)."""

    max_line: int
    max_entries: int
    max_occurrences: int
    series_budget: float  # seconds
    parse_budget: float  # seconds


class FeedParser:
    """Turns the body of one feed into a :class:`FetchResult` for a window."""

    def __init__(self, feed: Feed, where: str, limits: Limits) -> None:
        self.name = feed.source
        self._feed = feed
        self._where = where  # the feed's address as it may be shown
        self._limits = limits

    def parse(self, body: bytes, window: TimeWindow) -> FetchResult:
        began = monotonic_time.monotonic()
        fetch_deadline = began + self._limits.parse_budget
        fingerprint = hashlib.sha256(body).hexdigest()
        text = decode(body)
        start = text.upper().find("BEGIN:VCALENDAR")
        if start < 0:
            raise ConnectorError(
                f"source {self.name!r}: {self._where} did not return a calendar "
                f"({describe_non_calendar(text)})"
            )
        layout = split_feed(text[start:], self._limits.max_line)
        problems: list[EventProblem] = []
        complete = True
        if layout.truncated:
            problems.append(EventProblem(self.name, "", "the feed was cut off; read what arrived"))
            log.warning("ics.truncated", source=self.name)
            complete = False
        for reason in layout.damage:
            problems.append(EventProblem(self.name, "", short(f"damaged feed: {reason}")))
            complete = False
        entries = layout.entries
        most = self._limits.max_entries
        if len(entries) > most:
            problems.append(
                EventProblem(
                    self.name,
                    "",
                    f"the feed holds {len(entries)} entries, more than max_entries "
                    f"({most}); only the first {most} are read. "
                    "Raise the source's max_entries option if the calendar is really this large",
                )
            )
            complete = False
            entries = entries[: self._limits.max_entries]
        readable: list[Block] = []
        for block in entries:
            uids = block.uids
            if len(uids) > 1:
                # Two entries' lines in one block: the BEGIN or END between them is damaged.
                block.damage.append(
                    f"it holds the lines of {len(uids)} entries (a BEGIN or END line between "
                    "them is damaged)"
                )
            if block.damage:
                complete = False
                reason = short("damaged entry: " + "; ".join(block.damage))
                for uid in uids or [""]:
                    problems.append(EventProblem(self.name, uid, reason))
                    log.warning("ics.entry_damaged", source=self.name, uid=uid)
            if not block.cut:
                readable.append(block)
        # In groups, so that a huge feed cannot spend more than parse_budget being parsed.
        calendars: list[icalendar.Calendar] = []
        for first in range(0, max(len(readable), 1), _PARSE_GROUP):
            if first and monotonic_time.monotonic() > fetch_deadline:
                problems.append(self._out_of_time())
                complete = False
                break
            calendars.extend(self._load(layout, readable[first : first + _PARSE_GROUP], problems))

        timezones: list[icalendar.Component] = []
        events: list[icalendar.Component] = []
        wr_timezone: str | None = None
        seen_zones: set[Any] = set()
        for calendar in calendars:
            if wr_timezone is None and calendar.get("X-WR-TIMEZONE"):
                wr_timezone = str(calendar["X-WR-TIMEZONE"])
            for component in calendar.subcomponents:
                if component.name == "VTIMEZONE":
                    if component.get("TZID") not in seen_zones:
                        seen_zones.add(component.get("TZID"))
                        timezones.append(component)
                elif component.name == "VEVENT":
                    events.append(component)

        series: dict[str, list[icalendar.Component]] = {}
        zone_name = self._feed.zone.key
        for component in events:
            if not as_text(component.get("UID")).strip():
                # RFC 5545 requires a UID; without one (or with a damaged UID line) the visit
                # cannot be matched with the one we know, so nothing may count as removed.
                complete = False
                problems.append(
                    EventProblem(
                        self.name,
                        "",
                        "an entry has no UID (a damaged line?); it is read under a made-up "
                        "uid and, until it has one, this feed removes no visit",
                    )
                )
            uid = uid_of(component)
            reason = unreadable(component)
            if reason:
                problems.append(EventProblem(self.name, uid, reason))
                log.warning("ics.entry_skipped", source=self.name, uid=uid)
                continue
            problems.extend(
                EventProblem(
                    self.name, uid, f"unknown time zone {tzid!r}; times read in {zone_name}"
                )
                for tzid in unknown_zones(component)
            )
            series.setdefault(uid, []).append(component)

        for uid, components in series.items():
            masters = sum(1 for c in components if "RECURRENCE-ID" not in c)
            if masters > 1:
                problems.append(
                    EventProblem(
                        self.name,
                        uid,
                        f"the feed holds {masters} entries with this UID and no RECURRENCE-ID; "
                        "their occurrences are read as one series",
                    )
                )
        found: list[CalendarEvent] = []
        for uid, components in series.items():
            now = monotonic_time.monotonic()
            if now > fetch_deadline:
                problems.append(self._out_of_time())
                complete = False
                break
            deadline = min(now + self._limits.series_budget, fetch_deadline)
            expanded: list[CalendarEvent] = []
            try:
                # Only a rule can run away; single entries skip the cost of the tracer.
                runs_away = any("RRULE" in c for c in components)
                with interrupt_at(deadline) if runs_away else nullcontext():
                    for event in expand(
                        self._feed,
                        uid,
                        components,
                        timezones,
                        wr_timezone,
                        window,
                        self._limits.max_occurrences,
                        deadline,
                    ):
                        expanded.append(event)
            except OverBudget:
                problems.append(
                    EventProblem(self.name, uid, self._over_budget(deadline, fetch_deadline))
                )
                log.warning("ics.series_over_budget", source=self.name, uid=uid)
                if deadline >= fetch_deadline:
                    problems.append(self._out_of_time())
                    complete = False
                    break
            except TooMany:
                # Not a believable entry (a visit every minute): watching hundreds of copies
                # would bury real alerts in a storm. Its first occurrence is the one someone
                # surely meant; it stays watched, and the rule is reported.
                expanded = expanded[:1]
                problems.append(
                    EventProblem(
                        self.name,
                        uid,
                        "recurrence rule makes more than "
                        f"{self._limits.max_occurrences} occurrences in the window; "
                        "only its first is watched: fix the rule "
                        "(or raise max_occurrences)",
                    )
                )
                log.warning("ics.series_capped", source=self.name, uid=uid)
            except Exception as err:
                problems.append(EventProblem(self.name, uid, short(f"cannot expand: {err}")))
                log.warning(
                    "ics.series_skipped", source=self.name, uid=uid, error=type(err).__name__
                )
            found.extend(expanded)
        found, duplicates = _without_duplicates(found)
        for uid, recurrence_id in duplicates:
            when = f" at {recurrence_id}" if recurrence_id else ""
            problems.append(
                EventProblem(
                    self.name, uid, f"the feed holds this entry{when} twice; the first is read"
                )
            )
        found.sort(key=lambda e: (e.start, e.uid, e.recurrence_id))
        log.info(
            "ics.parsed",
            source=self.name,
            events=len(found),
            series=len(series),
            problems=len(problems),
        )
        # A dropped entry is named in `problems`, so the daemon keeps watching it; damage
        # that may have hidden entries we cannot name makes the read incomplete.
        return FetchResult(
            events=found,
            problems=problems,
            complete=complete,
            fingerprint=fingerprint,
        )

    def _out_of_time(self) -> EventProblem:
        log.warning("ics.parse_budget_exceeded", source=self.name)
        return EventProblem(
            self.name,
            "",
            f"reading the feed took longer than parse_budget ({self._limits.parse_budget:g}s); "
            "the entries not yet read are kept as they were. Raise the source's parse_budget "
            "option if the feed is large",
        )

    def _over_budget(self, deadline: float, fetch_deadline: float) -> str:
        if deadline >= fetch_deadline:
            return (
                "not read: the read ran out of parse_budget "
                f"({self._limits.parse_budget:g}s) while expanding this entry; "
                "its occurrences are kept as they were"
            )
        return (
            "expanding this entry took longer than series_budget "
            f"({self._limits.series_budget:g}s); its occurrences are kept as they were "
            "(is its RRULE runaway, e.g. FREQ=SECONDLY?)"
        )

    def _load(
        self, layout: Layout, entries: list[Block], problems: list[EventProblem]
    ) -> list[icalendar.Calendar]:
        """Parse the repaired feed; if it will not parse whole, entry by entry."""
        try:
            return list(icalendar.Calendar.from_ical(layout.text(entries), multiple=True))
        except Exception as first:
            log.warning("ics.parse_failed_whole", source=self.name, error=type(first).__name__)
        # A broken VTIMEZONE is turned into a tzinfo while parsing and can sink the whole
        # feed; without it, Olson and Windows TZIDs still resolve.
        zones = True
        try:
            skeleton = icalendar.Calendar.from_ical(layout.text([]))
        except Exception:
            zones = False
            log.warning("ics.timezones_ignored", source=self.name)
            try:
                skeleton = icalendar.Calendar.from_ical(layout.text([], zones=False))
            except Exception as err:
                raise ConnectorError(
                    f"source {self.name!r}: the feed from {self._where} cannot be parsed "
                    f"({first_clause(str(err))})"
                ) from None
        calendars = [skeleton]
        for block in entries:
            try:
                calendars.append(icalendar.Calendar.from_ical(layout.text([block], zones=zones)))
            except Exception as err:
                problems.append(
                    EventProblem(
                        self.name, block.uid, short(f"cannot be parsed: {first_clause(str(err))}")
                    )
                )
        return calendars


def _without_duplicates(
    events: list[CalendarEvent],
) -> tuple[list[CalendarEvent], list[tuple[str, str]]]:
    kept: dict[tuple[str, str], CalendarEvent] = {}
    duplicates: list[tuple[str, str]] = []
    for event in events:
        key = (event.uid, event.recurrence_id)
        if key in kept:
            if key not in duplicates:
                duplicates.append(key)
            continue
        kept[key] = event
    return list(kept.values()), duplicates
