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
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import icalendar
import recurring_ical_events
import requests
import structlog
import x_wr_timezone

from visitwatch.connectors.base import (
    Attendee,
    CalendarEvent,
    CalendarSource,
    ConnectorContext,
    ConnectorError,
    EventProblem,
    FetchResult,
    Option,
    Secret,
    TimeWindow,
)

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
            "str_or_secret",
            help="http(s) address of the feed; give secret addresses as { env = ... }",
        ),
        "path": Option("path", help="a local .ics file, instead of url"),
        "owner": Option("str", default="", help="staff id the calendar belongs to"),
        "timeout": Option("duration", default="30s", help="how long one download may take"),
    }

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
            return path.read_bytes()
        except FileNotFoundError:
            raise ConnectorError(
                f"source {self.name!r}: calendar file {path} does not exist", permanent=True
            ) from None
        except OSError as err:
            raise ConnectorError(
                f"source {self.name!r}: cannot read calendar file {path}: {err.strerror}"
            ) from None

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
                self._url, headers=headers, timeout=self._timeout, allow_redirects=True
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
        log.info("ics.downloaded", source=self.name, status=status, size=len(response.content))
        return response.content, (
            response.headers.get("ETag"),
            response.headers.get("Last-Modified"),
        )

    # ------------------------------------------------------------------ parsing

    def _parse(self, body: bytes, window: TimeWindow) -> FetchResult:
        fingerprint = hashlib.sha256(body).hexdigest()
        text = _decode(body)
        start = text.upper().find("BEGIN:VCALENDAR")
        if start < 0:
            raise ConnectorError(
                f"source {self.name!r}: {self._where} did not return a calendar "
                f"({_describe_non_calendar(text)})"
            )
        text, truncated = _repair(text[start:])
        problems: list[EventProblem] = []
        if truncated:
            problems.append(EventProblem(self.name, "", "the feed was cut off; read what arrived"))
            log.warning("ics.truncated", source=self.name)
        calendars = self._load(text)

        timezones: list[icalendar.Component] = []
        events: list[icalendar.Component] = []
        wr_timezone: str | None = None
        for calendar in calendars:
            if wr_timezone is None and calendar.get("X-WR-TIMEZONE"):
                wr_timezone = str(calendar["X-WR-TIMEZONE"])
            for component in calendar.subcomponents:
                if component.name == "VTIMEZONE":
                    timezones.append(component)
                elif component.name == "VEVENT":
                    events.append(component)
                # VTODO, VJOURNAL, VFREEBUSY: not visits.

        series: dict[str, list[icalendar.Component]] = {}
        for component in events:
            uid = _uid_of(component)
            reason = self._unreadable(component)
            if reason:
                problems.append(EventProblem(self.name, uid, reason))
                log.warning("ics.entry_skipped", source=self.name, uid=uid)
                continue
            problems.extend(self._note_unknown_zones(component, uid))
            series.setdefault(uid, []).append(component)

        found: list[CalendarEvent] = []
        for uid, components in series.items():
            try:
                found.extend(self._expand(uid, components, timezones, wr_timezone, window))
            except Exception as err:
                problems.append(EventProblem(self.name, uid, _short(f"cannot expand: {err}")))
                log.warning(
                    "ics.series_skipped", source=self.name, uid=uid, error=type(err).__name__
                )
        found.sort(key=lambda e: (e.start, e.uid, e.recurrence_id))
        log.info(
            "ics.parsed",
            source=self.name,
            events=len(found),
            series=len(series),
            problems=len(problems),
        )
        # A dropped entry is named in `problems`, so the daemon keeps watching it; only a
        # feed cut off mid-way leaves unknown what is missing, so then nothing counts as removed.
        return FetchResult(
            events=found,
            problems=problems,
            complete=not truncated,
            fingerprint=fingerprint,
        )

    def _load(self, text: str) -> list[icalendar.Calendar]:
        try:
            calendars = icalendar.Calendar.from_ical(text, multiple=True)
        except Exception as first:
            # A broken VTIMEZONE is turned into a tzinfo while parsing and can sink the
            # whole feed; without it, Olson and Windows TZIDs still resolve.
            stripped = _without_timezones(text)
            try:
                calendars = icalendar.Calendar.from_ical(stripped, multiple=True)
            except Exception:
                raise ConnectorError(
                    f"source {self.name!r}: the feed from {self._where} cannot be parsed "
                    f"({_first_clause(str(first))})"
                ) from None
            log.warning("ics.timezones_ignored", source=self.name)
        if not calendars:
            raise ConnectorError(
                f"source {self.name!r}: the feed from {self._where} holds no calendar"
            )
        return list(calendars)

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
    ) -> Iterator[CalendarEvent]:
        recurring = len(components) > 1 or any(
            name in c for c in components for name in ("RRULE", "RDATE", "RECURRENCE-ID")
        )
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
        mini = x_wr_timezone.to_standard(mini)
        occurrences = recurring_ical_events.of(mini).between(
            window.start - _EXPANSION_PAD, window.end + _EXPANSION_PAD
        )
        for occurrence in occurrences:
            event = self._convert(uid, occurrence, recurring)
            if _overlaps(event, window):
                yield event

    def _convert(self, uid: str, occurrence: icalendar.Component, recurring: bool) -> CalendarEvent:
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
            original = (
                occurrence.decoded("RECURRENCE-ID") if "RECURRENCE-ID" in occurrence else raw_start
            )
            recurrence_id = _to_utc(original, zone).isoformat()
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


# ---------------------------------------------------------------------- helpers


def _resolve_url(name: str, url: str | Secret) -> tuple[str, str]:
    """The URL to fetch and a description of it that is safe to show."""
    if isinstance(url, Secret):
        value, where = url.reveal().strip(), f"the address from {url.origin}"
    else:
        value = url.strip()
        parts = urlsplit(value)
        where = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
    scheme = urlsplit(value).scheme.lower()
    if scheme not in ("http", "https") or not urlsplit(value).hostname:
        raise ConnectorError(
            f"source {name!r}: url must be an http:// or https:// address ({where} is not)",
            permanent=True,
        )
    return value, where


def _seconds(value: Any, *, default: float) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _network_reason(err: requests.RequestException) -> str:
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


def _repair(text: str) -> tuple[str, bool]:
    """Balance BEGIN/END lines; report whether the text looked cut off.

    A download that stops mid-way leaves open components and usually a half line; the
    half line is dropped (its value is cut, so it would be wrong) and the missing END
    lines are added, so every complete entry before the cut is still read.
    """
    lines = text.split("\r\n")
    ends_cleanly = text.endswith("\r\n") or text.endswith("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    stack: list[str] = []
    out: list[str] = []
    for index, line in enumerate(lines):
        upper = line.strip().upper()
        if upper.startswith("BEGIN:"):
            stack.append(upper[6:])
        elif upper.startswith("END:"):
            name = upper[4:]
            if name not in stack:
                continue  # a stray END would make icalendar reject the whole feed
            while stack and stack[-1] != name:
                out.append(f"END:{stack.pop()}")
            stack.pop()
        elif not stack:
            continue  # text between calendars (a trailing footer) belongs to no component
        elif index == len(lines) - 1 and not ends_cleanly:
            continue
        out.append(line)
    truncated = bool(stack)
    while stack:
        out.append(f"END:{stack.pop()}")
    return "\r\n".join(out) + "\r\n", truncated


def _without_timezones(text: str) -> str:
    return re.sub(r"BEGIN:VTIMEZONE\r\n.*?END:VTIMEZONE\r\n", "", text, flags=re.S | re.I)


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
