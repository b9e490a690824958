"""The contract every calendar source keeps, as a test class to subclass.

A source's contract module subclasses :class:`CalendarSourceContract` and provides:

``make_source``
    A fixture returning a factory: given a list of :class:`Entry` (calendar entries
    described neutrally), it renders them the way the real service would (an .ics body,
    Graph JSON...), serves them, and returns a built source whose ``fetch`` reads them.
    Calling the factory again in the same test serves the new entries instead, to the
    sources already built as well, as an edited calendar would.
``broken_source``
    A fixture returning a source whose service cannot be read at all (refused, an error
    answer, a body that is not a calendar). Parametrise it to cover several.
``secrets``
    A fixture returning the secrets the sources above were built with (a token in a URL,
    a client secret, an access token): none may ever reach a log or an error message.

Every test below then runs against the new source. Entries are placed in July 2026 and
read through :data:`WINDOW`; times are aware UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from dateutil.rrule import rrulestr  # type: ignore[import-untyped]
from structlog.testing import capture_logs

from visitwatch.connectors.base import CalendarSource
from visitwatch.core.calendar import Attendee, CalendarEvent, FetchResult, TimeWindow
from visitwatch.core.errors import ConnectorError

WINDOW = TimeWindow(datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 7, 15, tzinfo=UTC))
HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Entry:
    """One calendar entry as a person would describe it, whatever the source's format.

    ``rrule`` (an RFC 5545 rule such as ``"FREQ=DAILY;COUNT=3"``) makes it a series.
    ``original_start`` makes it an exception: it replaces the occurrence of series ``uid``
    that was due to start then. ``broken`` asks the renderer to damage the entry the way
    the source's service could (an unreadable start time), so the source cannot read it.
    """

    uid: str
    start: datetime
    end: datetime | None
    subject: str = "Home visit"
    description: str = ""
    location: str = ""
    categories: tuple[str, ...] = ()
    cancelled: bool = False
    rrule: str = ""
    original_start: datetime | None = None
    attendees: tuple[Attendee, ...] = ()
    broken: bool = False


MakeSource = Callable[[Sequence[Entry]], CalendarSource]


def series_starts(entry: Entry, until: datetime) -> list[datetime]:
    """The starts of ``entry``'s occurrences up to ``until``, for renderers of services
    that expand series themselves (Graph's calendarView)."""
    if not entry.rrule:
        return [entry.start]
    rule = rrulestr(entry.rrule, dtstart=entry.start)
    return list(rule.between(entry.start, until, inc=True))


def at(day: int, hour: int = 9, minute: int = 0) -> datetime:
    """A moment in July 2026, UTC."""
    return datetime(2026, 7, day, hour, minute, tzinfo=UTC)


def visit(uid: str, day: int, hour: int = 9, **fields: Any) -> Entry:
    """An hour-long visit on ``day`` of July 2026."""
    return Entry(uid, at(day, hour), at(day, hour) + HOUR, **fields)


def uids(result: FetchResult) -> list[str]:
    return sorted({event.uid for event in result.events})


def is_utc(moment: datetime | None) -> bool:
    return moment is None or (moment.tzinfo is not None and moment.utcoffset() == timedelta(0))


class CalendarSourceContract:
    """Behaviour every :class:`CalendarSource` must show; subclass and provide the fixtures."""

    @pytest.fixture
    def make_source(self) -> MakeSource:
        raise NotImplementedError("a source's contract module provides make_source")

    @pytest.fixture
    def broken_source(self) -> CalendarSource:
        raise NotImplementedError("a source's contract module provides broken_source")

    @pytest.fixture
    def secrets(self) -> list[str]:
        raise NotImplementedError("a source's contract module provides secrets")

    def reported_uid(self, uid: str) -> str:
        """The uid the source reports for the entry rendered with ``uid`` (a service may
        give entries ids of its own shape); the same for every occurrence of a series."""
        return uid

    # ------------------------------------------------------------------ the contract

    def test_times_are_aware_utc_and_exact(self, make_source: MakeSource) -> None:
        """Every start and end comes out as aware UTC, at the instant the entry gave."""
        entries = [visit("first", 2), visit("second", 3, 14, location="1 High Street")]
        result = make_source(entries).fetch(WINDOW)
        assert result.complete and result.problems == []
        assert all(is_utc(e.start) and is_utc(e.end) for e in result.events)
        assert all(is_utc(e.last_modified) for e in result.events)
        assert [(e.uid, e.start, e.end) for e in result.events] == [
            (self.reported_uid(entry.uid), entry.start, entry.end) for entry in entries
        ]

    def test_window_is_half_open(self, make_source: MakeSource) -> None:
        """An entry ending exactly at window.start or starting exactly at window.end is
        out; one touching the window from inside is in."""
        start, end = WINDOW.start, WINDOW.end
        entries = [
            Entry("ends-at-start", start - HOUR, start),
            Entry("starts-at-start", start, start + HOUR),
            Entry("straddles-start", start - HOUR / 2, start + HOUR / 2),
            Entry("ends-at-end", end - HOUR, end),
            Entry("starts-at-end", end, end + HOUR),
        ]
        result = make_source(entries).fetch(WINDOW)
        expected = ["ends-at-end", "starts-at-start", "straddles-start"]
        assert uids(result) == sorted(self.reported_uid(uid) for uid in expected)

    def test_a_bad_entry_is_a_problem_and_the_rest_come_through(
        self, make_source: MakeSource
    ) -> None:
        """One unreadable entry becomes a problem naming its uid; the others are read, and
        a read that says it is complete has named everything it left out."""
        entries = [visit("before", 2), visit("damaged", 3, broken=True), visit("after", 4)]
        result = make_source(entries).fetch(WINDOW)
        assert uids(result) == sorted(self.reported_uid(uid) for uid in ("before", "after"))
        named = {problem.uid for problem in result.problems}
        assert self.reported_uid("damaged") in named
        assert named <= {self.reported_uid("damaged"), ""}
        if not result.complete:
            assert result.problems  # an incomplete read always says why

    def test_a_known_fingerprint_is_unchanged_and_a_change_is_not(
        self, make_source: MakeSource
    ) -> None:
        """Fetching with the fingerprint just returned gives unchanged and no events; after
        the calendar changes, the same fingerprint gives the new content."""
        source = make_source([visit("visit", 2), visit("other", 3)])
        first = source.fetch(WINDOW)
        assert first.fingerprint and not first.unchanged and len(first.events) == 2
        again = source.fetch(WINDOW, known=first.fingerprint)
        assert again.unchanged and again.events == []
        make_source([visit("visit", 2, subject="Home visit (rescheduled)"), visit("other", 3)])
        changed = source.fetch(WINDOW, known=first.fingerprint)
        assert not changed.unchanged and changed.fingerprint != first.fingerprint
        assert "Home visit (rescheduled)" in [e.subject for e in changed.events]

    def test_cancelled_flag_is_carried(self, make_source: MakeSource) -> None:
        """A cancelled entry comes through marked cancelled; the others are not."""
        result = make_source([visit("off", 2, cancelled=True), visit("on", 3)]).fetch(WINDOW)
        flags = {e.uid: e.cancelled for e in result.events}
        assert flags == {self.reported_uid("off"): True, self.reported_uid("on"): False}

    def test_a_series_gives_one_occurrence_per_date(self, make_source: MakeSource) -> None:
        """A daily series gives one occurrence per date in the window, all with the
        series' uid, each with its original start (ISO, UTC) as recurrence id; a single
        entry has none."""
        begins = datetime(2026, 6, 29, 10, tzinfo=UTC)
        series = Entry("daily", begins, begins + HOUR, rrule="FREQ=DAILY;COUNT=5")
        result = make_source([series, visit("single", 5)]).fetch(WINDOW)
        occurrences = [e for e in result.events if e.uid == self.reported_uid("daily")]
        assert [e.start for e in occurrences] == [at(1, 10), at(2, 10), at(3, 10)]
        assert [e.recurrence_id for e in occurrences] == [e.start.isoformat() for e in occurrences]
        (single,) = [e for e in result.events if e.uid == self.reported_uid("single")]
        assert single.recurrence_id == ""

    def test_an_exception_overrides_its_occurrence(self, make_source: MakeSource) -> None:
        """A moved occurrence keeps the recurrence id of the date it was moved from and
        replaces it: no copy stays at the old time."""
        series = visit("daily-visits", 2, rrule="FREQ=DAILY;COUNT=3")
        moved = Entry(
            "daily-visits",
            at(3, 14),
            at(3, 15),
            subject="Home visit (moved)",
            original_start=at(3, 9),
        )
        result = make_source([series, moved]).fetch(WINDOW)
        events: dict[str, CalendarEvent] = {e.recurrence_id: e for e in result.events}
        assert sorted(events) == [at(day).isoformat() for day in (2, 3, 4)]
        assert len(result.events) == 3
        replaced = events[at(3).isoformat()]
        assert (replaced.start, replaced.subject) == (at(3, 14), "Home visit (moved)")
        assert at(3, 9) not in [e.start for e in result.events]

    def test_a_moved_occurrence_is_read_where_it_now_is(self, make_source: MakeSource) -> None:
        """An occurrence moved into the window from beyond its end comes through (with the
        recurrence id of its old date); one moved out of the window does not."""
        series = visit("late-series", 13, rrule="FREQ=DAILY;COUNT=3")  # 13, 14, 15 July
        moved_in = Entry("late-series", at(14, 15), at(14, 16), original_start=at(15))
        moved_out = Entry("late-series", at(16, 9), at(16, 10), original_start=at(13))
        result = make_source([series, moved_in, moved_out]).fetch(WINDOW)
        assert [(e.start, e.recurrence_id) for e in result.events] == [
            (at(14), at(14).isoformat()),
            (at(14, 15), at(15).isoformat()),
        ]

    def test_only_connector_error_escapes(self, broken_source: CalendarSource) -> None:
        """A source that cannot be read raises ConnectorError, never a library's error."""
        with pytest.raises(ConnectorError) as caught:
            broken_source.fetch(WINDOW)
        assert str(caught.value)  # says what went wrong

    def test_no_secret_in_logs_or_errors(
        self, make_source: MakeSource, broken_source: CalendarSource, secrets: list[str]
    ) -> None:
        """The source's secrets never appear in a log event or an error message."""
        assert secrets
        with capture_logs() as logs:
            make_source([visit("visit", 2), visit("damaged", 3, broken=True)]).fetch(WINDOW)
            with pytest.raises(ConnectorError) as caught:
                broken_source.fetch(WINDOW)
        shown = repr(logs) + str(caught.value)
        for secret in secrets:
            assert secret not in shown

    def test_no_personal_data_in_logs_above_debug(self, make_source: MakeSource) -> None:
        """Subjects, descriptions, locations and attendee names reach debug logs at most."""
        family = Attendee("carter.family@example.org", "Jo Carter", "accepted", "required")
        entries = [
            visit(
                "visit",
                2,
                subject="Carter family",
                description="Dog on site",
                location="14 Brook Street",
                attendees=(family,),
            ),
            visit("damaged", 3, subject="Carter family", location="14 Brook Street", broken=True),
        ]
        with capture_logs() as logs:
            result = make_source(entries).fetch(WINDOW)
        assert [e.location for e in result.events] == ["14 Brook Street"]  # it was read
        shown = repr([event for event in logs if event.get("log_level") != "debug"])
        for personal in ("Carter", "Dog on site", "Brook Street", "Jo Carter"):
            assert personal not in shown
