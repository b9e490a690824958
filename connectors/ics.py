"""ICS (iCalendar) feeds read over HTTP(S) or from a local file.

The feed is fetched with a conditional GET, repaired where it is merely damaged (wrong
encoding, truncated), parsed with ``icalendar`` and expanded with
``recurring_ical_events``. Each series (the VEVENTs sharing a UID) is expanded on its own,
so one broken entry becomes an :class:`EventProblem` instead of hiding everybody else's
visits. Every time leaves this module as aware UTC.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time as monotonic_time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar
from urllib.parse import urlsplit

import icalendar
import recurring_ical_events
import requests
import structlog
import urllib3
import x_wr_timezone

from visitwatch.connectors.base import CalendarSource
from visitwatch.core.calendar import Attendee, CalendarEvent, EventProblem, FetchResult, TimeWindow
from visitwatch.core.errors import ConnectorError
from visitwatch.core.options import ConfigProblem, ConnectorContext, Option, Secret

log = structlog.get_logger(__name__)

# Marks put on source components before expansion. recurring_ical_events copies every
# property of a component into its occurrences, so these survive expansion and tell us
# what the feed itself said (the library fills in an end equal to the start otherwise).
_NO_END = "X-VISITWATCH-NO-END"

# Properties whose damage makes an entry unreadable: without them we cannot know when
# the visit happens, and guessing could put a lone worker's visit at the wrong time.
_TIME_PROPERTIES = frozenset(
    {"DTSTART", "DTEND", "DURATION", "RRULE", "RDATE", "EXDATE", "RECURRENCE-ID", "EXRULE"}
)
_ZONED_PROPERTIES = ("DTSTART", "DTEND", "RECURRENCE-ID", "RDATE", "EXDATE")

# Series are expanded over a padded window and then filtered exactly, because floating
# and all-day values are compared by the library before we have placed them in the
# organisation's zone (offsets reach +-14 h).
_EXPANSION_PAD = timedelta(days=2)
_PARSE_GROUP = 500  # entries parsed at once; the parse budget is checked between groups

_PERMANENT_STATUSES = frozenset({401, 403, 404, 410})
_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] [^'\")\]]+")
_FOLD = re.compile(rb"\r?\n[ \t]")
_REASON_MAX = 200
_BROKEN_TIME_LINE = re.compile(r"'(" + "|".join(sorted(_TIME_PROPERTIES)) + r")[;:]", re.IGNORECASE)


class IcsSource(CalendarSource):
    """Occurrences from one iCalendar feed (Google, Outlook, Nextcloud, a file...)."""

    type_name: ClassVar[str] = "ics"
    options: ClassVar[dict[str, Option]] = {
        "url": Option(
            "url",
            help="http(s) address of the feed; give secret addresses as { env = ... }",
        ),
        "path": Option("path", help="a local .ics file, instead of url"),
        "owner": Option("str", default="", help="staff id the calendar belongs to"),
        "timeout": Option(
            "duration", positive=True, default="30s", help="how long one download may take"
        ),
        "max_bytes": Option(
            "int",
            positive=True,
            default=20_000_000,
            help="a larger feed is refused (the read fails)",
        ),
        "max_line": Option(
            "int",
            positive=True,
            default=1_000_000,
            help="longer lines (unfolded) are left out and reported",
        ),
        "max_entries": Option(
            "int",
            positive=True,
            default=20_000,
            help="entries (VEVENTs) read from one feed; the rest reported",
        ),
        "max_occurrences": Option(
            "int",
            positive=True,
            default=500,
            help="a series with more in the window is reported; its first is watched",
        ),
        "series_budget": Option(
            "duration", positive=True, default="2s", help="time one series may take to expand"
        ),
        "parse_budget": Option(
            "duration",
            positive=True,
            default="60s",
            help="time one read may take to parse and expand",
        ),
    }

    @classmethod
    def settings_problems(cls, settings: Mapping[str, Any]) -> list[ConfigProblem]:
        url, path = settings.get("url"), settings.get("path")
        if (url is None) != (path is None):
            return []
        given = "both were given" if url is not None else "neither was given"
        return [
            ConfigProblem(
                "url",
                f"give exactly one of url or path ({given})",
                'url = "https://..." (or { env = "NAME" }) for a feed, path for a file',
            )
        ]

    @classmethod
    def owner(cls, settings: Mapping[str, Any]) -> str:
        return str(settings.get("owner") or "")

    def __init__(self, name: str, settings: dict[str, Any], context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        url = self.settings.get("url") or None
        path = self.settings.get("path") or None
        if (url is None) == (path is None):
            given = "both url and path" if url is not None else "neither url nor path"
            raise ConnectorError(
                f"source {name!r}: give exactly one of url or path ({given} given)",
                permanent=True,
            )
        self._url: str | None = None
        self._path: Path | None = Path(path) if path is not None else None
        if url is not None:
            self._url, self._where = _resolve_url(name, url)
        else:
            self._where = str(self._path)
        self._owner: str = self.settings.get("owner") or ""
        self._timeout: float = _seconds(self.settings.get("timeout"), default=30.0)
        self._max_bytes: int = _count(self.settings.get("max_bytes"), default=20_000_000)
        self._max_line: int = _count(self.settings.get("max_line"), default=1_000_000)
        self._max_entries: int = _count(self.settings.get("max_entries"), default=20_000)
        self._max_occurrences: int = _count(self.settings.get("max_occurrences"), default=500)
        self._series_budget: float = _seconds(self.settings.get("series_budget"), default=2.0)
        self._parse_budget: float = _seconds(self.settings.get("parse_budget"), default=60.0)
        self._session: requests.Session | None = None
        # The last body that parsed, with the validators the server sent for it.
        self._etag: str | None = None
        self._last_modified: str | None = None
        self._cached_body: bytes | None = None

    # ------------------------------------------------------------------ public API

    def fetch(self, window: TimeWindow, known: str | None = None) -> FetchResult:
        try:
            body, validators = self._read()
            fingerprint = hashlib.sha256(body).hexdigest()
            if known is not None and fingerprint == known:
                # The caller already holds what this body says: skip parsing altogether.
                return FetchResult(fingerprint=fingerprint, unchanged=True)
            result = self._parse(body, _utc_window(window))
        except ConnectorError:
            raise
        except Exception as err:
            # The contract allows nothing but ConnectorError out of a source; the text of
            # an arbitrary library error may quote the feed, so only its type is shown.
            log.warning("ics.unexpected_error", source=self.name, error=type(err).__name__)
            log.debug("ics.unexpected_error_detail", source=self.name, exc_info=True)
            raise ConnectorError(
                f"source {self.name!r}: unexpected error reading the feed ({type(err).__name__})"
            ) from err
        if validators is not None:
            # Only remember a body that parsed: a login page must not become the copy we
            # reuse on the next 304.
            self._cached_body = body
            self._etag, self._last_modified = validators
        return result

    def check(self) -> str:
        now = datetime.now(UTC)
        result = self.fetch(TimeWindow.around(now, timedelta(days=1), timedelta(days=14)))
        text = f"feed read: {len(result.events)} entries in window"
        if result.problems:
            text += f", {len(result.problems)} problem(s)"
        if not result.complete:
            text += "; the read was incomplete (damaged, cut off or over a limit)"
        return text

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    # ------------------------------------------------------------------ reading

    def _read(self) -> tuple[bytes, tuple[str | None, str | None] | None]:
        """Return the body and, for a fresh HTTP body, the validators to remember."""
        if self._path is not None:
            return self._read_file(self._path), None
        return self._read_http()

    def _read_file(self, path: Path) -> bytes:
        try:
            with path.open("rb") as handle:
                body = handle.read(self._max_bytes + 1)
        except FileNotFoundError:
            raise ConnectorError(
                f"source {self.name!r}: calendar file {path} does not exist", permanent=True
            ) from None
        except OSError as err:
            raise ConnectorError(
                f"source {self.name!r}: cannot read calendar file {path}: {err.strerror}"
            ) from None
        if len(body) > self._max_bytes:
            raise self._too_large()
        return body

    def _too_large(self) -> ConnectorError:
        return ConnectorError(
            f"source {self.name!r}: the feed from {self._where} is larger than max_bytes "
            f"({self._max_bytes} bytes); nothing was read from it. Raise the source's "
            "max_bytes option if the calendar really is this large"
        )

    def _read_http(self) -> tuple[bytes, tuple[str | None, str | None] | None]:
        assert self._url is not None
        if self._session is None:
            self._session = requests.Session()
        headers = {"User-Agent": self.context.user_agent}
        if self._cached_body is not None:
            if self._etag:
                headers["If-None-Match"] = self._etag
            if self._last_modified:
                headers["If-Modified-Since"] = self._last_modified
        try:
            response = self._session.get(
                self._url,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=True,
                stream=True,
            )
        except requests.Timeout:
            raise ConnectorError(
                f"source {self.name!r}: {self._where} did not answer within {self._timeout:g}s"
            ) from None
        except requests.RequestException as err:
            # requests' messages quote the full URL, query string included: never show them.
            raise ConnectorError(
                f"source {self.name!r}: cannot reach {self._where}: {_network_reason(err)}"
            ) from None
        with response:
            return self._answer(response)

    def _answer(
        self, response: requests.Response
    ) -> tuple[bytes, tuple[str | None, str | None] | None]:
        status = response.status_code
        if status == 304:
            log.info("ics.not_modified", source=self.name, status=status)
            if self._cached_body is None:
                raise ConnectorError(
                    f"source {self.name!r}: {self._where} answered 304 Not Modified "
                    "but no earlier copy is held"
                )
            return self._cached_body, None
        if not 200 <= status < 300:
            reason = (response.reason or "").strip()[:60]
            raise ConnectorError(
                f"source {self.name!r}: {self._where} answered HTTP {status} {reason}".rstrip(),
                permanent=status in _PERMANENT_STATUSES,
            )
        body = self._download(response)
        log.info("ics.downloaded", source=self.name, status=status, size=len(body))
        return body, (
            response.headers.get("ETag"),
            response.headers.get("Last-Modified"),
        )

    def _download(self, response: requests.Response) -> bytes:
        """The body, read in pieces and abandoned once it passes ``max_bytes``."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        deadline = monotonic_time.monotonic() + max(self._timeout, 1.0) * 4
        try:
            for chunk in _pieces(response):
                size += len(chunk)
                if size > self._max_bytes:
                    raise self._too_large()
                if monotonic_time.monotonic() > deadline:
                    raise ConnectorError(
                        f"source {self.name!r}: {self._where} sent the feed too slowly "
                        f"(not complete after {max(self._timeout, 1.0) * 4:g}s)"
                    )
                chunks.append(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            raise ConnectorError(
                f"source {self.name!r}: the download from {self._where} broke off: "
                f"{_network_reason(err)}"
            ) from None
        return b"".join(chunks)

    # ------------------------------------------------------------------ parsing

    def _parse(self, body: bytes, window: TimeWindow) -> FetchResult:
        began = monotonic_time.monotonic()
        fetch_deadline = began + self._parse_budget
        fingerprint = hashlib.sha256(body).hexdigest()
        text = _decode(body)
        start = text.upper().find("BEGIN:VCALENDAR")
        if start < 0:
            raise ConnectorError(
                f"source {self.name!r}: {self._where} did not return a calendar "
                f"({_describe_non_calendar(text)})"
            )
        layout = _split(text[start:], self._max_line)
        problems: list[EventProblem] = []
        complete = True
        if layout.truncated:
            problems.append(EventProblem(self.name, "", "the feed was cut off; read what arrived"))
            log.warning("ics.truncated", source=self.name)
            complete = False
        for reason in layout.damage:
            problems.append(EventProblem(self.name, "", _short(f"damaged feed: {reason}")))
            complete = False
        entries = layout.entries
        if len(entries) > self._max_entries:
            problems.append(
                EventProblem(
                    self.name,
                    "",
                    f"the feed holds {len(entries)} entries, more than max_entries "
                    f"({self._max_entries}); only the first {self._max_entries} are read. "
                    "Raise the source's max_entries option if the calendar is really this large",
                )
            )
            complete = False
            entries = entries[: self._max_entries]
        readable: list[_Block] = []
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
                reason = _short("damaged entry: " + "; ".join(block.damage))
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
        for component in events:
            if not _text(component.get("UID")).strip():
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
            uid = _uid_of(component)
            reason = self._unreadable(component)
            if reason:
                problems.append(EventProblem(self.name, uid, reason))
                log.warning("ics.entry_skipped", source=self.name, uid=uid)
                continue
            problems.extend(self._note_unknown_zones(component, uid))
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
            deadline = min(now + self._series_budget, fetch_deadline)
            expanded: list[CalendarEvent] = []
            try:
                # Only a rule can run away; single entries skip the cost of the tracer.
                runs_away = any("RRULE" in c for c in components)
                with _deadline(deadline) if runs_away else nullcontext():
                    for event in self._expand(
                        uid, components, timezones, wr_timezone, window, deadline
                    ):
                        expanded.append(event)
            except _OverBudget:
                problems.append(
                    EventProblem(self.name, uid, self._over_budget(deadline, fetch_deadline))
                )
                log.warning("ics.series_over_budget", source=self.name, uid=uid)
                if deadline >= fetch_deadline:
                    problems.append(self._out_of_time())
                    complete = False
                    break
            except _TooMany:
                # Not a believable entry (a visit every minute): watching hundreds of copies
                # would bury real alerts in a storm. Its first occurrence is the one someone
                # surely meant; it stays watched, and the rule is reported.
                expanded = expanded[:1]
                problems.append(
                    EventProblem(
                        self.name,
                        uid,
                        f"recurrence rule makes more than {self._max_occurrences} occurrences "
                        "in the window; only its first is watched: fix the rule "
                        "(or raise max_occurrences)",
                    )
                )
                log.warning("ics.series_capped", source=self.name, uid=uid)
            except Exception as err:
                problems.append(EventProblem(self.name, uid, _short(f"cannot expand: {err}")))
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
            f"reading the feed took longer than parse_budget ({self._parse_budget:g}s); the "
            "entries not yet read are kept as they were. Raise the source's parse_budget "
            "option if the feed is large",
        )

    def _over_budget(self, deadline: float, fetch_deadline: float) -> str:
        if deadline >= fetch_deadline:
            return (
                f"not read: the read ran out of parse_budget ({self._parse_budget:g}s) while "
                "expanding this entry; its occurrences are kept as they were"
            )
        return (
            f"expanding this entry took longer than series_budget ({self._series_budget:g}s); "
            "its occurrences are kept as they were (is its RRULE runaway, e.g. FREQ=SECONDLY?)"
        )

    def _load(
        self, layout: _Layout, entries: list[_Block], problems: list[EventProblem]
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
                    f"({_first_clause(str(err))})"
                ) from None
        calendars = [skeleton]
        for block in entries:
            try:
                calendars.append(icalendar.Calendar.from_ical(layout.text([block], zones=zones)))
            except Exception as err:
                problems.append(
                    EventProblem(
                        self.name, block.uid, _short(f"cannot be parsed: {_first_clause(str(err))}")
                    )
                )
        return calendars

    def _unreadable(self, component: icalendar.Component) -> str:
        """Why this VEVENT cannot be placed in time, or "" when it can."""
        for prop, message in getattr(component, "errors", []):
            if prop is not None and str(prop).upper() in _TIME_PROPERTIES:
                return _short(f"{prop}: {message}")
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
            return _short(f"unreadable time: {err}")
        if not isinstance(start, date):
            return "DTSTART is not a date or date-time"
        for rule in _as_list(component.get("RRULE")):
            reason = _invalid_rule(rule)
            if reason:
                return reason
        return ""

    def _note_unknown_zones(self, component: icalendar.Component, uid: str) -> list[EventProblem]:
        """Problems for TZIDs that neither icalendar nor a VTIMEZONE could resolve.

        icalendar quietly drops an unknown zone and leaves the value floating, which we
        then read in the organisation's zone; the admin should know we guessed.
        """
        unknown: list[str] = []
        for name in _ZONED_PROPERTIES:
            for prop in _as_list(component.get(name)):
                tzid = getattr(prop, "params", {}).get("TZID")
                if not tzid or tzid in unknown:
                    continue
                values = [getattr(p, "dt", None) for p in getattr(prop, "dts", [prop])]
                if any(isinstance(v, datetime) and v.tzinfo is None for v in values):
                    unknown.append(str(tzid))
        return [
            EventProblem(
                self.name,
                uid,
                f"unknown time zone {tzid!r}; times read in {self.context.timezone.key}",
            )
            for tzid in unknown
        ]

    def _expand(
        self,
        uid: str,
        components: list[icalendar.Component],
        timezones: list[icalendar.Component],
        wr_timezone: str | None,
        window: TimeWindow,
        deadline: float = float("inf"),
    ) -> Iterator[CalendarEvent]:
        recurring = len(components) > 1 or any(
            name in c for c in components for name in ("RRULE", "RDATE", "RECURRENCE-ID")
        )
        if not recurring and not wr_timezone and "EXDATE" not in components[0]:
            # A single entry: read it as it stands (what the library would do, without
            # building a calendar for it; large feeds are mostly single entries).
            single = components[0].copy()
            if "DTEND" not in single and "DURATION" not in single:
                single[_NO_END] = "TRUE"
            event = self._convert(uid, single, recurring)
            if event.end is None or event.end >= event.start:
                if _overlaps(event, window):
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
                copy[_NO_END] = "TRUE"
            mini.add_component(copy)
        if wr_timezone:
            mini = x_wr_timezone.to_standard(mini)
        shifts = _this_and_future_shifts(components, self.context.timezone)
        # In start order, a slice of the window at a time: a runaway rule is stopped after
        # max_occurrences instead of being materialised whole.
        earliest = window.start - _EXPANSION_PAD
        latest = window.end + _EXPANSION_PAD
        step = _slice_for(components, self._max_occurrences) or (latest - earliest)
        query = recurring_ical_events.of(mini)
        watched = 0
        seen: set[tuple[str, str]] = set()
        begin = earliest
        while begin < latest:
            if monotonic_time.monotonic() > deadline:
                raise _OverBudget
            stop = min(begin + step, latest)
            occurrences = [
                self._convert(uid, o, recurring, shifts) for o in query.between(begin, stop)
            ]
            occurrences.sort(key=lambda e: e.start)
            for event in occurrences:
                if (event.recurrence_id, event.start.isoformat()) in seen:
                    continue  # spans the edge of two slices
                seen.add((event.recurrence_id, event.start.isoformat()))
                if _overlaps(event, window):
                    watched += 1
                    if watched > self._max_occurrences:
                        raise _TooMany
                    yield event
            begin = stop

    def _convert(
        self,
        uid: str,
        occurrence: icalendar.Component,
        recurring: bool,
        shifts: dict[datetime, timedelta] | None = None,
    ) -> CalendarEvent:
        zone = self.context.timezone
        raw_start = occurrence.decoded("DTSTART")
        all_day = not isinstance(raw_start, datetime)
        start = _to_utc(raw_start, zone)
        end: datetime | None
        if "DTEND" in occurrence and (all_day or _NO_END not in occurrence):
            end = _to_utc(occurrence.decoded("DTEND"), zone)
        elif "DURATION" in occurrence and _NO_END not in occurrence:
            end = start + occurrence.decoded("DURATION")
        elif all_day:
            end = start + timedelta(days=1)  # RFC 5545: a DATE start alone lasts one day
        else:
            end = None
        recurrence_id = ""
        if recurring:
            original = start
            if "RECURRENCE-ID" in occurrence:
                marked = _to_utc(occurrence.decoded("RECURRENCE-ID"), zone)
                shift = (shifts or {}).get(marked)
                # An override with RANGE=THISANDFUTURE lends its RECURRENCE-ID to every
                # later occurrence it moves: key each by the start it had in the series.
                original = marked if shift is None else _to_utc(raw_start - shift, zone)
            recurrence_id = original.isoformat()
        modified = occurrence.get("LAST-MODIFIED") or occurrence.get("DTSTAMP")
        return CalendarEvent(
            source=self.name,
            uid=uid,
            recurrence_id=recurrence_id,
            subject=_text(occurrence.get("SUMMARY")),
            start=start,
            end=end,
            description=_text(occurrence.get("DESCRIPTION")),
            location=_text(occurrence.get("LOCATION")),
            categories=_categories(occurrence),
            attendees=tuple(_attendee(a) for a in _as_list(occurrence.get("ATTENDEE"))),
            organizer=_address(occurrence.get("ORGANIZER")),
            owner=self._owner,
            all_day=all_day,
            cancelled=_text(occurrence.get("STATUS")).upper() == "CANCELLED",
            private=_text(occurrence.get("CLASS")).upper() in ("PRIVATE", "CONFIDENTIAL"),
            last_modified=_safe_time(modified, zone),
        )


# --------------------------------------------------------------------- structure

# Components that sit directly in a VCALENDAR. A BEGIN of one of these inside an open
# entry means the entry's END line is missing.
_TOP_LEVEL = frozenset({"VEVENT", "VTODO", "VJOURNAL", "VFREEBUSY", "VTIMEZONE", "VAVAILABILITY"})
# Lines that belong to an entry, never to the calendar itself (RFC 7986 allows UID,
# DESCRIPTION... on a calendar, so those alone prove nothing before the first entry).
_ENTRY_ONLY = re.compile(r"^(DTSTART|DTEND|DURATION|RRULE|RDATE|EXDATE|RECURRENCE-ID)[;:]", re.I)
_CALENDAR_ONLY = re.compile(
    r"^(VERSION|PRODID|CALSCALE|METHOD|NAME|REFRESH-INTERVAL|SOURCE|COLOR|X-[^:;]*)[;:]", re.I
)
_UID_LINE = re.compile(r"^UID[;:](?:[^:]*:)?(.*)$", re.I)


@dataclass
class _Block:
    """The lines of one component found directly in a calendar."""

    kind: str
    lines: list[str]
    damage: list[str] = field(default_factory=list)
    cut: bool = False  # the feed ended inside it: its content is incomplete

    @property
    def uid(self) -> str:
        uids = self.uids
        return uids[0] if uids else ""

    @property
    def uids(self) -> list[str]:
        found: list[str] = []
        for line in self.lines:
            match = _UID_LINE.match(line)
            if match and match.group(1).strip() not in found:
                found.append(match.group(1).strip())
        return found


@dataclass
class _Layout:
    """A feed taken apart: calendar properties, time zones, entries, and the damage seen."""

    head: list[str] = field(default_factory=list)
    timezones: list[_Block] = field(default_factory=list)
    entries: list[_Block] = field(default_factory=list)
    damage: list[str] = field(default_factory=list)  # damage not tied to one entry
    truncated: bool = False

    def text(self, entries: list[_Block] | None = None, *, zones: bool = True) -> str:
        lines = ["BEGIN:VCALENDAR", *self.head]
        for block in (self.timezones if zones else []) + (
            self.entries if entries is None else entries
        ):
            lines.extend(block.lines)
        lines.append("END:VCALENDAR")
        return "\r\n".join(lines) + "\r\n"


def _split(text: str, max_line: int) -> _Layout:
    """Take a feed apart into its top-level components, line by line.

    icalendar nests whatever follows a missing END:VEVENT inside the open entry, and puts
    the lines of an entry whose BEGIN line is damaged on the calendar itself: either way
    the following visits vanish without a word. Here every entry is cut out on its own, a
    misspelt END closes the open component (as icalendar does, so nothing it would have
    read is lost) and every repair is recorded as damage of the entry it touched.
    """
    layout = _Layout()
    lines = text.split("\r\n")
    ends_cleanly = text.endswith("\r\n") or text.endswith("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    last = len(lines) - 1
    block: _Block | None = None
    stack: list[str] = []
    orphans: list[str] = []
    in_calendar = False
    seen_calendar = False
    after_first_block = False

    def close(reason: str = "") -> None:
        nonlocal block
        assert block is not None
        if reason:
            block.damage.append(reason)
        while len(stack) > 0:
            block.lines.append(f"END:{stack.pop()}")
        _file(layout, block)
        block = None

    def flush_orphans(end_name: str = "") -> None:
        if not any(line.strip() for line in orphans):
            orphans.clear()
            return
        damaged = _Block("VEVENT", ["BEGIN:VEVENT", *orphans, "END:VEVENT"])
        damaged.damage.append("its BEGIN:VEVENT line is damaged or missing")
        orphans.clear()
        _file(layout, damaged)

    for index, line in enumerate(lines):
        if len(line) > max_line:
            reason = (
                f"a line longer than max_line ({max_line} characters) was left out; "
                "raise the source's max_line option if such lines are expected"
            )
            (block.damage if block is not None else layout.damage).append(reason)
            continue
        upper = line.strip().upper()
        if upper.startswith("BEGIN:"):
            name = upper[6:].strip()
            if name == "VCALENDAR":
                if block is not None:
                    close(f"no END:{block.kind} before the next calendar")
                flush_orphans()
                in_calendar = seen_calendar = True
                after_first_block = False
                continue
            if not in_calendar:
                if seen_calendar:
                    layout.damage.append(f"BEGIN:{name} outside any calendar was read anyway")
                in_calendar = True
            if block is not None and name in _TOP_LEVEL:
                close(f"no END:{block.kind} before the next BEGIN:{name}")
            if block is None:
                flush_orphans()
                block = _Block(name, [f"BEGIN:{name}"])
                stack[:] = [name]
                after_first_block = True
            else:
                stack.append(name)
                block.lines.append(f"BEGIN:{name}")
            continue
        if upper.startswith("END:"):
            name = upper[4:].strip()
            if name == "VCALENDAR":
                if block is not None:
                    close(f"no END:{block.kind} before END:VCALENDAR")
                flush_orphans()
                in_calendar = False
                continue
            if block is None:
                if orphans:
                    flush_orphans(name)
                elif in_calendar:
                    layout.damage.append(f"a stray END:{name} line was ignored")
                continue
            if name != stack[-1]:
                if name in stack:
                    while stack[-1] != name:
                        inner = stack.pop()
                        block.lines.append(f"END:{inner}")
                        block.damage.append(f"no END:{inner} inside the entry")
                else:
                    # icalendar closes the open component on any END line: do the same.
                    block.damage.append(f"END:{name} read as END:{stack[-1]}")
                    name = stack[-1]
            stack.pop()
            block.lines.append(f"END:{name}")
            if not stack:
                close()
            continue
        if index == last and not ends_cleanly:
            continue  # a half line: its value is cut, so it would be wrong
        if block is not None:
            block.lines.append(line)
        elif not in_calendar:
            continue  # text between calendars (a trailing footer) belongs to no component
        elif orphans or (after_first_block and not upper.startswith("X-")):
            orphans.append(line)
        elif _ENTRY_ONLY.match(line):
            # An entry whose BEGIN line is damaged, before any other: its first lines
            # (UID, DTSTAMP...) were taken for calendar properties; take them back.
            while layout.head and not _CALENDAR_ONLY.match(layout.head[-1]):
                orphans.insert(0, layout.head.pop())
            orphans.append(line)
        else:
            layout.head.append(line)
    if block is not None:
        layout.truncated = True
        block.cut = True
        close("the feed was cut off inside this entry")
    elif in_calendar:
        layout.truncated = True
    flush_orphans()
    return layout


def _file(layout: _Layout, block: _Block) -> None:
    if block.kind == "VTIMEZONE":
        layout.timezones.append(block)
    elif block.kind == "VEVENT":
        layout.entries.append(block)
    elif block.kind in _TOP_LEVEL:
        if block.damage:
            layout.damage.append(f"a damaged {block.kind} was skipped")
    elif any(_ENTRY_ONLY.match(line) for line in block.lines):
        # An entry whose BEGIN line is damaged (BEGIN:VEVENU): read it as the entry it is.
        block.damage.append(f"its BEGIN line is damaged (BEGIN:{block.kind})")
        block.lines[0] = "BEGIN:VEVENT"
        block.lines[-1] = "END:VEVENT"
        block.kind = "VEVENT"
        layout.entries.append(block)
    else:
        layout.damage.append(f"an unknown component {block.kind[:40]} was skipped")


# ---------------------------------------------------------------------- helpers


def _resolve_url(name: str, url: str | Secret) -> tuple[str, str]:
    """The URL to fetch and a description of it that is safe to show."""
    if isinstance(url, Secret):
        value, where = url.reveal().strip(), f"the address from {url.origin}"
    else:
        value = url.strip()
        where = redact_url(value)
    scheme = urlsplit(value).scheme.lower()
    if scheme not in ("http", "https") or not urlsplit(value).hostname:
        raise ConnectorError(
            f"source {name!r}: url must be an http:// or https:// address ({where} is not)",
            permanent=True,
        )
    return value, where


def redact_url(url: str) -> str:
    """An address safe to show: no credentials, query, fragment or secret-looking path parts.

    Google (``/calendar/ical/<id>/private-<token>/basic.ics``) and Outlook
    (``/owa/calendar/<id>/<token>/calendar.ics``) put the secret in the path, so any long
    or random-looking segment is replaced by ``…``.
    """
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an address that cannot be read)"
    segments = [_redact_segment(segment) for segment in parts.path.split("/")]
    shown = f"{parts.scheme}://{host}{port}" + "/".join(segments)
    if parts.query or parts.fragment:
        shown += "?…"
    return shown


_SECRET_PREFIX = re.compile(r"^(private|secret|token|key)[-_]", re.I)
_KNOWN_SEGMENT = re.compile(r"^[a-z][a-z.]*(\.ics)?$", re.I)


def _redact_segment(segment: str) -> str:
    if not segment:
        return segment
    match = _SECRET_PREFIX.match(segment)
    if match:
        return match.group(0) + "…"
    if len(segment) < 16 and not any(ch.isdigit() for ch in segment):
        return segment
    if _KNOWN_SEGMENT.match(segment) and len(segment) < 24:
        return segment  # ordinary words: calendar.ics, reachcalendar.ics, basic.ics
    if len(segment) < 8:
        return segment
    return "…"


def _count(value: Any, *, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return default


def _seconds(value: Any, *, default: float) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _pieces(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives: each piece as soon as any bytes come, so the caller's
    deadline holds against a server that drips a byte at a time (``iter_content`` waits
    for whole 64 KiB pieces, each under its own read timeout)."""
    raw = response.raw
    if not hasattr(raw, "read1"):
        yield from response.iter_content(chunk_size=65536)
        return
    while True:
        piece = raw.read1(65536, decode_content=True)
        if not piece:
            return
        yield piece


def _network_reason(err: requests.RequestException | urllib3.exceptions.HTTPError) -> str:
    match = _ERRNO_TEXT.search(str(err))
    if match:
        return match.group(0).strip()
    if isinstance(err, requests.TooManyRedirects):
        return "too many redirects"
    if isinstance(err, requests.exceptions.SSLError):
        return "TLS error"
    return type(err).__name__


def _utc_window(window: TimeWindow) -> TimeWindow:
    def fix(moment: datetime) -> datetime:
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)

    return TimeWindow(fix(window.start), fix(window.end))


def _decode(body: bytes) -> str:
    """Bytes to text, line by line, so one cp1252 line cannot spoil the UTF-8 ones.

    Folding is undone on the bytes first: RFC 5545 folds at octets, so a multi-byte
    character may be split across two physical lines.
    """
    body = _FOLD.sub(b"", body.removeprefix(b"\xef\xbb\xbf"))
    lines: list[str] = []
    for raw in body.split(b"\n"):
        raw = raw.rstrip(b"\r")
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            try:
                lines.append(raw.decode("cp1252"))
            except UnicodeDecodeError:
                lines.append(raw.decode("latin-1"))
    return "\r\n".join(lines)


def _describe_non_calendar(text: str) -> str:
    stripped = text.strip()
    if not stripped:
        return "the body is empty"
    if stripped.startswith("<"):
        return "got an HTML/XML page, perhaps a login page or an expired link"
    return "the body does not start with BEGIN:VCALENDAR"


def _without_timezones(text: str) -> str:
    return re.sub(r"BEGIN:VTIMEZONE\r\n.*?END:VTIMEZONE\r\n", "", text, flags=re.S | re.I)


class _OverBudget(BaseException):
    """Raised inside expansion when its time is up.

    A BaseException, so that the ``except Exception`` of a tolerant library does not
    swallow it (Python unsets a trace function that raised: there is one chance).
    """


class _TooMany(Exception):
    """Raised when a series has more occurrences in the window than are watched."""


# Raise only where the exception is sure to travel up to us: in the expansion code
# itself, never in a finaliser or a clean-up whose exceptions Python swallows.
_INTERRUPTIBLE = re.compile(r"(dateutil|recurring_ical_events|x_wr_timezone)[/\\]")
_NEVER_INTERRUPTED = frozenset({"__del__", "__exit__", "close", "__aexit__"})


@contextmanager
def _deadline(at: float) -> Iterator[None]:
    """Interrupt the Python code run inside once the monotonic clock passes ``at``.

    dateutil walks a rule from its DTSTART, so a FREQ=SECONDLY rule begun years ago, or a
    rule whose BY parts never match, can run for hours inside one library call. A trace
    function sees every Python call made there and raises once time is up; it chains to
    a tracer already installed (a debugger, coverage).
    """
    previous = sys.gettrace()

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if (
            monotonic_time.monotonic() > at
            and frame.f_code.co_name not in _NEVER_INTERRUPTED
            and _INTERRUPTIBLE.search(frame.f_code.co_filename)
        ):
            raise _OverBudget
        return previous(frame, event, arg) if previous is not None else None

    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


_FREQUENCIES = frozenset({"SECONDLY", "MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY"})


def _invalid_rule(rule: Any) -> str:
    """Why an RRULE is invalid, or "" (RFC 5545: INTERVAL and COUNT are positive)."""
    try:
        parts = {str(k).upper(): v for k, v in dict(rule).items()}
    except Exception:
        return "invalid RRULE: it cannot be read"
    freq = [str(v).upper() for v in _as_list(parts.get("FREQ"))]
    if len(freq) != 1 or freq[0] not in _FREQUENCIES:
        return "invalid RRULE: FREQ is missing or unknown"
    for name in ("INTERVAL", "COUNT"):
        for value in _as_list(parts.get(name)):
            try:
                number = int(value)
            except (TypeError, ValueError):
                return f"invalid RRULE: {name} is not a number"
            if number < 1:
                return f"invalid RRULE: {name}={number} (it must be 1 or more)"
    return ""


_SUB_DAILY = {"SECONDLY": 1, "MINUTELY": 60, "HOURLY": 3600}


def _slice_for(components: list[icalendar.Component], most: int) -> timedelta | None:
    """How much of the window to expand at once for rules repeating within a day, so
    that one slice holds about ``most`` occurrences; None for other entries."""
    seconds: list[int] = []
    for component in components:
        for rule in _as_list(component.get("RRULE")):
            try:
                parts = {str(k).upper(): v for k, v in dict(rule).items()}
                freq = str(_as_list(parts.get("FREQ"))[0]).upper()
                interval = int(_as_list(parts.get("INTERVAL") or [1])[0])
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
                shift = _to_utc(begins, zone) - _to_utc(marked, zone)
            shifts[_to_utc(marked, zone)] = shift
        except Exception:
            continue
    return shifts


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


def _uid_of(component: icalendar.Component) -> str:
    uid = _text(component.get("UID")).strip()
    if uid:
        return uid
    # Stable across fetches so the daemon recognises the same entry next time.
    try:
        start = component["DTSTART"].to_ical()
        start = start.decode() if isinstance(start, bytes) else str(start)
    except Exception:
        start = ""
    digest = hashlib.sha256(f"{start}|{_text(component.get('SUMMARY'))}".encode())
    uid = f"visitwatch-{digest.hexdigest()[:32]}"
    component["UID"] = uid
    return uid


def _to_utc(value: date | datetime, zone: tzinfo) -> datetime:
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
        return _to_utc(value, zone)
    return None


def _overlaps(event: CalendarEvent, window: TimeWindow) -> bool:
    if event.end is None or event.end <= event.start:
        return window.start <= event.start < window.end
    return event.start < window.end and event.end > window.start


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _categories(component: icalendar.Component) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for prop in _as_list(component.get("CATEGORIES")):
        names: Iterable[Any] = getattr(prop, "cats", None) or str(prop).split(",")
        for name in names:
            cleaned = str(name).strip()
            if cleaned:
                seen.setdefault(cleaned, None)
    return tuple(seen)


def _address(value: Any) -> str:
    if value is None:
        return ""
    text = str(value).strip()
    if text.lower().startswith("mailto:"):
        text = text[7:]
    return text.strip().lower()


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


def _first_clause(message: str) -> str:
    """The part of a parser message before it quotes the offending line."""
    return _short(message.split(":", 1)[0])


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"
