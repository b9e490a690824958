"""IcsSource against a real HTTP server on loopback and hand-written feeds.

Each feed case asserts what a user would notice: the UTC start and end of the visits
that come out, under the organisation time zones where the answer depends on it.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.bounded import run_bounded
from tests.connector_settings import config_problems
from tests.ics_feed import Server, calendar, make_source
from visitwatch.connectors.ics import IcsSource
from visitwatch.core.calendar import Attendee, FetchResult, TimeWindow
from visitwatch.core.errors import ConnectorError

# --------------------------------------------------------------------------- helpers

WIDE = TimeWindow(datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))


def event(uid: str, *props: str) -> str:
    return "\n".join(
        ["BEGIN:VEVENT", f"UID:{uid}", "DTSTAMP:20260101T000000Z", *props, "END:VEVENT"]
    )


def fetch(
    server: Server,
    tmp_path: Path,
    body: bytes,
    zone: str = "Europe/London",
    window: TimeWindow = WIDE,
) -> FetchResult:
    server.feed.body = body
    source = make_source(tmp_path, {"url": server.url()}, zone)
    try:
        return source.fetch(window)
    finally:
        source.close()


def times(result: FetchResult) -> list[tuple[str, str, str | None]]:
    """(uid, start, end) in UTC, minutes precision: what a user compares."""

    def fmt(moment: datetime | None) -> str | None:
        if moment is None:
            return None
        assert moment.tzinfo is UTC or moment.utcoffset() == timedelta(0)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%MZ")

    return [(e.uid, fmt(e.start), fmt(e.end)) for e in result.events]  # type: ignore[misc]


OUTLOOK_GMT = """
BEGIN:VTIMEZONE
TZID:GMT Standard Time
BEGIN:STANDARD
DTSTART:16010101T020000
TZOFFSETFROM:+0100
TZOFFSETTO:+0000
RRULE:FREQ=YEARLY;INTERVAL=1;BYDAY=-1SU;BYMONTH=10
END:STANDARD
BEGIN:DAYLIGHT
DTSTART:16010101T010000
TZOFFSETFROM:+0000
TZOFFSETTO:+0100
RRULE:FREQ=YEARLY;INTERVAL=1;BYDAY=-1SU;BYMONTH=3
END:DAYLIGHT
END:VTIMEZONE
"""

OUTLOOK_EASTERN = """
BEGIN:VTIMEZONE
TZID:Eastern Standard Time
BEGIN:STANDARD
DTSTART:16010101T020000
TZOFFSETFROM:-0400
TZOFFSETTO:-0500
RRULE:FREQ=YEARLY;INTERVAL=1;BYDAY=1SU;BYMONTH=11
END:STANDARD
BEGIN:DAYLIGHT
DTSTART:16010101T020000
TZOFFSETFROM:-0500
TZOFFSETTO:-0400
RRULE:FREQ=YEARLY;INTERVAL=1;BYDAY=2SU;BYMONTH=3
END:DAYLIGHT
END:VTIMEZONE
"""

ALL_ZONES = ("Europe/London", "America/New_York", "UTC")

# Each case: id, feed, organisation zones to run under, expected (uid, start, end) in UTC.
# The zone list says where the answer must NOT depend on the organisation's zone; cases
# whose answer does depend on it are listed once per zone.
CASES: list[tuple[str, bytes, tuple[str, ...], list[tuple[str, str, str | None]]]] = [
    (
        "windows-zone-names-without-vtimezone",
        calendar(
            event(
                "w1",
                "DTSTART;TZID=W. Europe Standard Time:20261123T140000",
                "DTEND;TZID=W. Europe Standard Time:20261123T150000",
            ),
            event(
                "w2",
                "DTSTART;TZID=Eastern Standard Time:20260701T090000",
                "DTEND;TZID=Eastern Standard Time:20260701T100000",
            ),
            event(
                "w3",
                "DTSTART;TZID=GMT Standard Time:20260701T090000",
                "DTEND;TZID=GMT Standard Time:20260701T093000",
            ),
        ),
        ALL_ZONES,
        [
            ("w3", "2026-07-01T08:00Z", "2026-07-01T08:30Z"),
            ("w2", "2026-07-01T13:00Z", "2026-07-01T14:00Z"),
            ("w1", "2026-11-23T13:00Z", "2026-11-23T14:00Z"),
        ],
    ),
    (
        "windows-zone-with-outlook-vtimezone-across-march-dst",
        calendar(
            event(
                "gmt",
                "DTSTART;TZID=GMT Standard Time:20260319T100000",
                "DTEND;TZID=GMT Standard Time:20260319T110000",
                "RRULE:FREQ=WEEKLY;COUNT=3",
            ),
            event(
                "est",
                "DTSTART;TZID=Eastern Standard Time:20261029T090000",
                "DTEND;TZID=Eastern Standard Time:20261029T100000",
                "RRULE:FREQ=WEEKLY;COUNT=2",
            ),
            head=OUTLOOK_GMT + OUTLOOK_EASTERN,
        ),
        ("Europe/London", "America/New_York"),
        [
            ("gmt", "2026-03-19T10:00Z", "2026-03-19T11:00Z"),
            ("gmt", "2026-03-26T10:00Z", "2026-03-26T11:00Z"),
            ("gmt", "2026-04-02T09:00Z", "2026-04-02T10:00Z"),
            ("est", "2026-10-29T13:00Z", "2026-10-29T14:00Z"),
            ("est", "2026-11-05T14:00Z", "2026-11-05T15:00Z"),
        ],
    ),
    (
        "broken-outlook-vtimezone-falls-back-to-windows-mapping",
        calendar(
            event("rom", "DTSTART;TZID=Romance Standard Time:20260601T100000", "DURATION:PT1H"),
            head="""
            BEGIN:VTIMEZONE
            TZID:Romance Standard Time
            BEGIN:STANDARD
            DTSTART:16010101T030000
            TZOFFSETFROM:garbage
            TZOFFSETTO:+0100
            END:STANDARD
            END:VTIMEZONE
            """,
        ),
        ("Europe/London",),
        [("rom", "2026-06-01T08:00Z", "2026-06-01T09:00Z")],
    ),
    (
        "europe-london-weekly-10am-across-both-dst-changes",
        calendar(
            event(
                "spring",
                "DTSTART;TZID=Europe/London:20260323T100000",
                "DTEND;TZID=Europe/London:20260323T110000",
                "RRULE:FREQ=WEEKLY;COUNT=2",
            ),
            event(
                "autumn",
                "DTSTART;TZID=Europe/London:20261019T100000",
                "DTEND;TZID=Europe/London:20261019T110000",
                "RRULE:FREQ=WEEKLY;COUNT=2",
            ),
        ),
        ALL_ZONES,
        [
            ("spring", "2026-03-23T10:00Z", "2026-03-23T11:00Z"),
            ("spring", "2026-03-30T09:00Z", "2026-03-30T10:00Z"),
            ("autumn", "2026-10-19T09:00Z", "2026-10-19T10:00Z"),
            ("autumn", "2026-10-26T10:00Z", "2026-10-26T11:00Z"),
        ],
    ),
    (
        "floating-time-in-london",
        calendar(event("f", "DTSTART:20260701T100000", "DTEND:20260701T110000")),
        ("Europe/London",),
        [("f", "2026-07-01T09:00Z", "2026-07-01T10:00Z")],
    ),
    (
        "floating-time-in-new-york",
        calendar(event("f", "DTSTART:20260701T100000", "DTEND:20260701T110000")),
        ("America/New_York",),
        [("f", "2026-07-01T14:00Z", "2026-07-01T15:00Z")],
    ),
    (
        "floating-weekly-series-follows-org-zone-dst",
        calendar(
            event("f", "DTSTART:20260326T100000", "DURATION:PT1H", "RRULE:FREQ=WEEKLY;COUNT=2")
        ),
        ("Europe/London",),
        [
            ("f", "2026-03-26T10:00Z", "2026-03-26T11:00Z"),
            ("f", "2026-04-02T09:00Z", "2026-04-02T10:00Z"),
        ],
    ),
    (
        "all-day-in-london-summer",
        calendar(
            event("d", "DTSTART;VALUE=DATE:20260701", "DTEND;VALUE=DATE:20260702"),
            event("d1", "DTSTART;VALUE=DATE:20260801"),
        ),
        ("Europe/London",),
        [
            ("d", "2026-06-30T23:00Z", "2026-07-01T23:00Z"),
            ("d1", "2026-07-31T23:00Z", "2026-08-01T23:00Z"),
        ],
    ),
    (
        "all-day-in-new-york",
        calendar(event("d", "DTSTART;VALUE=DATE:20260701", "DTEND;VALUE=DATE:20260703")),
        ("America/New_York",),
        [("d", "2026-07-01T04:00Z", "2026-07-03T04:00Z")],
    ),
    (
        "all-day-in-utc",
        calendar(event("d", "DTSTART;VALUE=DATE:20260701")),
        ("UTC",),
        [("d", "2026-07-01T00:00Z", "2026-07-02T00:00Z")],
    ),
    (
        "duration-without-dtend",
        calendar(event("dur", "DTSTART:20260701T100000Z", "DURATION:PT45M")),
        ALL_ZONES,
        [("dur", "2026-07-01T10:00Z", "2026-07-01T10:45Z")],
    ),
    (
        "neither-dtend-nor-duration-gives-no-end",
        calendar(
            event("open", "DTSTART:20260701T100000Z"),
            event(
                "open-series",
                "DTSTART;TZID=Europe/London:20260702T100000",
                "RRULE:FREQ=DAILY;COUNT=2",
            ),
        ),
        ALL_ZONES,
        [
            ("open", "2026-07-01T10:00Z", None),
            ("open-series", "2026-07-02T09:00Z", None),
            ("open-series", "2026-07-03T09:00Z", None),
        ],
    ),
    (
        "rrule-count-and-until",
        calendar(
            event(
                "count",
                "DTSTART:20260601T080000Z",
                "DTEND:20260601T090000Z",
                "RRULE:FREQ=DAILY;COUNT=3",
            ),
            event(
                "until",
                "DTSTART:20260610T080000Z",
                "DTEND:20260610T083000Z",
                "RRULE:FREQ=WEEKLY;UNTIL=20260624T080000Z",
            ),
        ),
        ALL_ZONES,
        [
            ("count", "2026-06-01T08:00Z", "2026-06-01T09:00Z"),
            ("count", "2026-06-02T08:00Z", "2026-06-02T09:00Z"),
            ("count", "2026-06-03T08:00Z", "2026-06-03T09:00Z"),
            ("until", "2026-06-10T08:00Z", "2026-06-10T08:30Z"),
            ("until", "2026-06-17T08:00Z", "2026-06-17T08:30Z"),
            ("until", "2026-06-24T08:00Z", "2026-06-24T08:30Z"),
        ],
    ),
    (
        "exdate-removes-and-rdate-adds",
        calendar(
            event(
                "ex",
                "DTSTART:20260601T080000Z",
                "DTEND:20260601T090000Z",
                "RRULE:FREQ=DAILY;COUNT=3",
                "EXDATE:20260602T080000Z",
                "RDATE:20260610T150000Z",
            )
        ),
        ALL_ZONES,
        [
            ("ex", "2026-06-01T08:00Z", "2026-06-01T09:00Z"),
            ("ex", "2026-06-03T08:00Z", "2026-06-03T09:00Z"),
            ("ex", "2026-06-10T15:00Z", "2026-06-10T16:00Z"),
        ],
    ),
    (
        "google-x-wr-timezone-floating-and-utc-series",
        calendar(
            event("g1", "DTSTART:20260701T100000", "DTEND:20260701T110000"),
            event(
                "g2",
                "DTSTART:20260326T100000Z",
                "DTEND:20260326T110000Z",
                "RRULE:FREQ=WEEKLY;COUNT=2",
            ),
            head="X-WR-TIMEZONE:Europe/London\nX-WR-CALNAME:Visits",
        ),
        ("America/New_York", "UTC"),
        [
            # X-WR-TIMEZONE means the wall clock in London repeats, not the UTC instant.
            ("g2", "2026-03-26T10:00Z", "2026-03-26T11:00Z"),
            ("g2", "2026-04-02T09:00Z", "2026-04-02T10:00Z"),
            ("g1", "2026-07-01T09:00Z", "2026-07-01T10:00Z"),
        ],
    ),
]


def _expand_cases() -> list[Any]:
    params = []
    for name, body, zones, expected in CASES:
        for zone in zones:
            params.append(pytest.param(body, zone, expected, id=f"{name}[{zone}]"))
    return params


@pytest.mark.parametrize(("body", "zone", "expected"), _expand_cases())
def test_feed_cases_give_expected_utc_times(
    server: Server, tmp_path: Path, body: bytes, zone: str, expected: list[Any]
) -> None:
    """Each edge-case feed yields exactly the expected UTC starts and ends."""
    result = fetch(server, tmp_path, body, zone)
    assert result.problems == []
    assert result.complete
    assert sorted(times(result), key=lambda t: (t[1], t[0])) == sorted(
        expected, key=lambda t: (t[1], t[0])
    )
    for found in result.events:
        assert found.start.tzinfo is UTC
        assert found.end is None or found.end.tzinfo is UTC


# --------------------------------------------------------------------------- recurrence


def test_moved_and_cancelled_overrides(server: Server, tmp_path: Path) -> None:
    """A RECURRENCE-ID override moves one occurrence; a cancelled override is flagged."""
    body = calendar(
        event(
            "s",
            "DTSTART;TZID=Europe/London:20260601T100000",
            "DTEND;TZID=Europe/London:20260601T110000",
            "RRULE:FREQ=DAILY;COUNT=3",
            "SUMMARY:Visit",
        ),
        event(
            "s",
            "RECURRENCE-ID;TZID=Europe/London:20260602T100000",
            "DTSTART;TZID=Europe/London:20260602T150000",
            "DTEND;TZID=Europe/London:20260602T153000",
            "SUMMARY:Visit (moved)",
        ),
        event(
            "s",
            "RECURRENCE-ID;TZID=Europe/London:20260603T100000",
            "DTSTART;TZID=Europe/London:20260603T100000",
            "DTEND;TZID=Europe/London:20260603T110000",
            "STATUS:CANCELLED",
            "SUMMARY:Visit",
        ),
    )
    result = fetch(server, tmp_path, body)
    by_rid = {e.recurrence_id: e for e in result.events}
    assert sorted(by_rid) == [
        "2026-06-01T09:00:00+00:00",
        "2026-06-02T09:00:00+00:00",
        "2026-06-03T09:00:00+00:00",
    ]
    moved = by_rid["2026-06-02T09:00:00+00:00"]
    assert (moved.start, moved.end) == (
        datetime(2026, 6, 2, 14, 0, tzinfo=UTC),
        datetime(2026, 6, 2, 14, 30, tzinfo=UTC),
    )
    assert moved.subject == "Visit (moved)"
    assert not moved.cancelled
    assert by_rid["2026-06-03T09:00:00+00:00"].cancelled
    assert not by_rid["2026-06-01T09:00:00+00:00"].cancelled


def test_override_moved_into_window_from_outside(server: Server, tmp_path: Path) -> None:
    """An occurrence moved weeks later appears in the new slot and not in the old one."""
    body = calendar(
        event("s", "DTSTART:20260601T100000Z", "DURATION:PT1H", "RRULE:FREQ=DAILY;COUNT=5"),
        event("s", "RECURRENCE-ID:20260602T100000Z", "DTSTART:20260620T100000Z", "DURATION:PT1H"),
    )
    late = TimeWindow(datetime(2026, 6, 19, tzinfo=UTC), datetime(2026, 6, 21, tzinfo=UTC))
    (moved,) = fetch(server, tmp_path, body, window=late).events
    assert (moved.start, moved.recurrence_id) == (
        datetime(2026, 6, 20, 10, tzinfo=UTC),
        "2026-06-02T10:00:00+00:00",
    )
    early = TimeWindow(datetime(2026, 6, 2, tzinfo=UTC), datetime(2026, 6, 3, tzinfo=UTC))
    assert fetch(server, tmp_path, body, window=early).events == []


def test_cancelled_single_event_is_returned_flagged(server: Server, tmp_path: Path) -> None:
    """A STATUS:CANCELLED single event comes back with cancelled=True and no recurrence id."""
    body = calendar(
        event("c", "DTSTART:20260701T100000Z", "DTEND:20260701T110000Z", "STATUS:CANCELLED")
    )
    (found,) = fetch(server, tmp_path, body).events
    assert found.cancelled
    assert found.recurrence_id == ""


def test_recurrence_id_is_original_start_in_utc(server: Server, tmp_path: Path) -> None:
    """Series occurrences carry their original start as an ISO UTC string; singles carry ""."""
    body = calendar(
        event(
            "series",
            "DTSTART;TZID=Europe/London:20261123T140000",
            "DURATION:PT1H",
            "RRULE:FREQ=WEEKLY;COUNT=1",
        ),
        event("single", "DTSTART:20261124T140000Z", "DURATION:PT1H"),
    )
    result = fetch(server, tmp_path, body)
    ids = {e.uid: e.recurrence_id for e in result.events}
    assert ids == {"series": "2026-11-23T14:00:00+00:00", "single": ""}


# --------------------------------------------------------------------------- fields


def test_fields_are_mapped(server: Server, tmp_path: Path) -> None:
    """Categories, attendees, organizer, privacy, owner and last-modified are normalised."""
    body = calendar(
        event(
            "m",
            "DTSTART:20260701T100000Z",
            "DTEND:20260701T110000Z",
            "SUMMARY:Home visit",
            "DESCRIPTION:Bring the forms",
            "LOCATION:12 High Street",
            "CATEGORIES:Visit, Lone working",
            "CATEGORIES:Visit,High risk",
            "ORGANIZER;CN=Team Lead:MAILTO:Lead@Example.ORG",
            "ATTENDEE;CN=Sam Worker;PARTSTAT=ACCEPTED;ROLE=REQ-PARTICIPANT:mailto:Sam@Example.org",
            "ATTENDEE;CN=Alex;PARTSTAT=TENTATIVE;ROLE=OPT-PARTICIPANT:mailto:alex@example.org",
            "ATTENDEE;CN=Car 3;CUTYPE=RESOURCE;ROLE=NON-PARTICIPANT:mailto:car3@example.org",
            "ATTENDEE:mailto:plain@example.org",
            "CLASS:PRIVATE",
            "LAST-MODIFIED:20260620T120000Z",
        ),
        event("conf", "DTSTART:20260702T100000Z", "CLASS:CONFIDENTIAL"),
        event("pub", "DTSTART:20260703T100000Z", "CLASS:PUBLIC"),
    )
    server.feed.body = body
    source = make_source(tmp_path, {"url": server.url(), "owner": "sam"})
    result = source.fetch(WIDE)
    source.close()
    found = {e.uid: e for e in result.events}
    m = found["m"]
    assert (m.source, m.owner) == ("home-visits", "sam")
    assert (m.subject, m.description, m.location) == (
        "Home visit",
        "Bring the forms",
        "12 High Street",
    )
    assert m.categories == ("Visit", "Lone working", "High risk")
    assert m.organizer == "lead@example.org"
    assert m.attendees == (
        Attendee("sam@example.org", "Sam Worker", "accepted", "required"),
        Attendee("alex@example.org", "Alex", "tentative", "optional"),
        Attendee("car3@example.org", "Car 3", "", "resource"),
        Attendee("plain@example.org", "", "", ""),
    )
    assert m.private and found["conf"].private and not found["pub"].private
    assert m.last_modified == datetime(2026, 6, 20, 12, 0, tzinfo=UTC)
    # Without LAST-MODIFIED, DTSTAMP stands in.
    assert found["pub"].last_modified == datetime(2026, 1, 1, tzinfo=UTC)
    assert not m.all_day


def test_missing_uid_gets_a_stable_synthetic_one(server: Server, tmp_path: Path) -> None:
    """An entry without UID gets the same made-up uid on every fetch; as its UID line may be
    damaged (the visit it was is unknown), the read says so and removes nothing."""
    body = calendar("BEGIN:VEVENT\nDTSTART:20260701T100000Z\nSUMMARY:No uid\nEND:VEVENT")
    first = fetch(server, tmp_path, body)
    second = fetch(server, tmp_path, body)
    assert [p.uid for p in first.problems] == [""]
    assert "no UID" in first.problems[0].reason
    assert not first.complete
    assert first.events[0].uid == second.events[0].uid
    assert first.events[0].uid.startswith("visitwatch-")


def test_todos_and_journals_are_skipped(server: Server, tmp_path: Path) -> None:
    """VTODO and VJOURNAL entries are not visits and are ignored."""
    body = calendar(
        event("visit", "DTSTART:20260701T100000Z"),
        "BEGIN:VTODO\nUID:todo\nDTSTART:20260701T100000Z\nDUE:20260702T100000Z\nEND:VTODO",
        "BEGIN:VJOURNAL\nUID:j\nDTSTART:20260701T100000Z\nEND:VJOURNAL",
    )
    assert [e.uid for e in fetch(server, tmp_path, body).events] == ["visit"]


def test_window_filtering(server: Server, tmp_path: Path) -> None:
    """Only occurrences overlapping the half-open window come back."""
    body = calendar(
        event("before", "DTSTART:20260701T080000Z", "DTEND:20260701T090000Z"),
        event("ends-at-start", "DTSTART:20260701T090000Z", "DTEND:20260701T100000Z"),
        event("straddles", "DTSTART:20260701T093000Z", "DTEND:20260701T103000Z"),
        event("inside", "DTSTART:20260701T110000Z"),
        event("at-end", "DTSTART:20260701T120000Z", "DTEND:20260701T130000Z"),
        event("series", "DTSTART:20260625T110000Z", "DURATION:PT30M", "RRULE:FREQ=DAILY;COUNT=20"),
    )
    window = TimeWindow(datetime(2026, 7, 1, 10, tzinfo=UTC), datetime(2026, 7, 1, 12, tzinfo=UTC))
    result = fetch(server, tmp_path, body, window=window)
    assert sorted(e.uid for e in result.events) == ["inside", "series", "straddles"]
    (series,) = [e for e in result.events if e.uid == "series"]
    assert series.start == datetime(2026, 7, 1, 11, tzinfo=UTC)


# --------------------------------------------------------------------------- damaged feeds


def test_folded_lines_are_unfolded(server: Server, tmp_path: Path) -> None:
    """A long DESCRIPTION folded per RFC 5545 (even inside a UTF-8 character) reads whole."""
    text = "Key safe code is with the duty manager; ring before arriving. Café stop é." * 3
    raw = f"DESCRIPTION:{text}".encode()
    folded = b"\r\n ".join(raw[i : i + 75] for i in range(0, len(raw), 75))
    body = calendar(event("fold", "DTSTART:20260701T100000Z", "X-PLACEHOLDER:1"))
    body = body.replace(b"X-PLACEHOLDER:1", folded)
    (found,) = fetch(server, tmp_path, body).events
    assert found.description == text


def test_non_utf8_bytes_are_read_as_cp1252(server: Server, tmp_path: Path) -> None:
    """cp1252 bytes in one SUMMARY are read, and UTF-8 lines elsewhere stay intact."""
    body = calendar(
        event("cp", "DTSTART:20260701T100000Z", "SUMMARY:PLACEHOLDER"),
        event("utf", "DTSTART:20260702T100000Z", "SUMMARY:Zoë"),
    ).replace(b"PLACEHOLDER", "Café £5".encode("cp1252"))
    result = fetch(server, tmp_path, body)
    assert {e.uid: e.subject for e in result.events} == {"cp": "Café £5", "utf": "Zoë"}


def test_truncated_feed_keeps_complete_entries(server: Server, tmp_path: Path) -> None:
    """A feed cut off mid-entry still yields the entries before the cut, marked incomplete."""
    full = calendar(
        event("one", "DTSTART:20260701T100000Z", "DTEND:20260701T110000Z"),
        event("two", "DTSTART:20260702T100000Z", "DTEND:20260702T110000Z", "SUMMARY:Cut"),
    )
    body = full[: full.index(b"SUMMARY:Cut") + len(b"SUMM")]
    result = fetch(server, tmp_path, body)
    assert ("one", "2026-07-01T10:00Z", "2026-07-01T11:00Z") in times(result)
    assert not result.complete
    assert any(p.uid == "" and "cut off" in p.reason for p in result.problems)


def test_one_broken_event_does_not_stop_the_others(server: Server, tmp_path: Path) -> None:
    """Bad DTSTART, bad RRULE and missing DTSTART become problems naming their uids."""
    body = calendar(
        event("good", "DTSTART:20260701T100000Z", "DTEND:20260701T110000Z"),
        event("bad-start", "DTSTART:2026070XT100000", "SUMMARY:Broken"),
        event("bad-rule", "DTSTART:20260701T100000Z", "RRULE:FREQ=WEEKLY;BYDAY=XX"),
        event("no-start", "SUMMARY:When?"),
        event("good-series", "DTSTART:20260702T100000Z", "RRULE:FREQ=DAILY;COUNT=2"),
    )
    result = fetch(server, tmp_path, body)
    assert sorted({e.uid for e in result.events}) == ["good", "good-series"]
    assert len(result.events) == 3
    reasons = {p.uid: p.reason for p in result.problems}
    assert set(reasons) == {"bad-start", "bad-rule", "no-start"}
    assert "DTSTART" in reasons["bad-start"]
    assert "RRULE" in reasons["bad-rule"]
    assert all(p.source == "home-visits" for p in result.problems)
    # The feed is whole; the dropped entries are named, so they are not taken as removed.
    assert result.complete


def test_broken_time_line_drops_entry_but_broken_metadata_does_not(
    server: Server, tmp_path: Path
) -> None:
    """An unsplittable DTEND line drops its entry; mangled ATTENDEE/LAST-MODIFIED do not."""
    body = calendar(
        event("bad-end", "DTSTART:20260701T100000Z", 'DTEND;TZID="Oops:20260701T110000'),
        event(
            "bad-meta",
            "DTSTART:20260701T120000Z",
            "LAST-MODIFIED:garbage",
            'ATTENDEE;CN="unterminated:mailto:a@example.org',
            "STATUS:CANCELLED",
        ),
    )
    result = fetch(server, tmp_path, body)
    assert [(e.uid, e.cancelled, e.last_modified) for e in result.events] == [
        ("bad-meta", True, None)
    ]
    assert [(p.uid, p.reason) for p in result.problems] == [
        ("bad-end", "DTEND line cannot be parsed")
    ]


def test_unknown_tzid_is_read_as_floating_with_a_problem(server: Server, tmp_path: Path) -> None:
    """An unknown TZID with no VTIMEZONE is read in the org zone and reported."""
    body = calendar(
        event(
            "odd",
            "DTSTART;TZID=Mars/Olympus:20260701T100000",
            "DTEND;TZID=Mars/Olympus:20260701T110000",
        )
    )
    result = fetch(server, tmp_path, body, "America/New_York")
    assert times(result) == [("odd", "2026-07-01T14:00Z", "2026-07-01T15:00Z")]
    (problem,) = result.problems
    assert problem.uid == "odd" and "Mars/Olympus" in problem.reason
    assert result.complete  # nothing was dropped


def test_expansion_failure_is_a_problem_not_an_exception(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the expansion library blows up on a series, fetch reports it instead of raising."""
    import visitwatch.connectors.ics_expand as ics

    real_of = ics.recurring_ical_events.of

    def flaky(calendar: Any, *args: Any, **kwargs: Any) -> Any:
        if any(str(c.get("UID")) == "cursed" for c in calendar.walk("VEVENT")):
            raise RuntimeError("library bug")
        return real_of(calendar, *args, **kwargs)

    monkeypatch.setattr(ics.recurring_ical_events, "of", flaky)
    body = calendar(
        event("ok", "DTSTART:20260701T100000Z", "RRULE:FREQ=DAILY;COUNT=2"),
        event("cursed", "DTSTART:20260701T100000Z", "RRULE:FREQ=DAILY;COUNT=2"),
    )
    result = fetch(server, tmp_path, body)
    assert [e.uid for e in result.events] == ["ok", "ok"]
    assert [p.uid for p in result.problems] == ["cursed"]


def test_several_calendars_in_one_file(server: Server, tmp_path: Path) -> None:
    """Concatenated VCALENDAR blocks are all read."""
    body = calendar(event("a", "DTSTART:20260701T100000Z")) + calendar(
        event("b", "DTSTART:20260702T100000Z")
    )
    assert [e.uid for e in fetch(server, tmp_path, body).events] == ["a", "b"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"<!DOCTYPE html><html><body>Sign in</body></html>", id="html-login"),
        pytest.param(b"", id="empty"),
        pytest.param(b"   \r\n", id="blank"),
        pytest.param(b'{"error": "gone"}', id="json"),
    ],
)
def test_non_calendar_body_is_an_error(server: Server, tmp_path: Path, body: bytes) -> None:
    """A 200 whose body is not a calendar raises ConnectorError naming the source."""
    with pytest.raises(ConnectorError, match="home-visits") as caught:
        fetch(server, tmp_path, body)
    assert "calendar" in str(caught.value)


# --------------------------------------------------------------------------- HTTP


@pytest.mark.parametrize(
    ("status", "permanent"),
    [(404, True), (410, True), (401, True), (403, True), (500, False), (503, False), (429, False)],
)
def test_http_errors(server: Server, tmp_path: Path, status: int, permanent: bool) -> None:
    """Non-2xx answers raise ConnectorError; 401/403/404/410 are permanent, others not."""
    server.feed.status = status
    with pytest.raises(ConnectorError) as caught:
        fetch(server, tmp_path, b"")
    assert caught.value.permanent is permanent
    assert str(status) in str(caught.value) and "home-visits" in str(caught.value)


def test_etag_round_trip(server: Server, tmp_path: Path) -> None:
    """The second fetch sends If-None-Match, gets 304 and returns the same events and hash."""
    server.feed.body = calendar(event("e", "DTSTART:20260701T100000Z", "DURATION:PT1H"))
    server.feed.etag = '"v1"'
    source = make_source(tmp_path, {"url": server.url()})
    first = source.fetch(WIDE)
    second = source.fetch(WIDE)
    assert server.feed.requests[0]["headers"].get("If-None-Match") is None
    assert server.feed.requests[1]["headers"].get("If-None-Match") == '"v1"'
    assert second.events == first.events and len(second.events) == 1
    assert second.fingerprint == first.fingerprint is not None
    # A changed feed with a new tag is downloaded and fingerprinted afresh.
    server.feed.body = calendar(event("e2", "DTSTART:20260702T100000Z"))
    server.feed.etag = '"v2"'
    third = source.fetch(WIDE)
    assert [e.uid for e in third.events] == ["e2"]
    assert third.fingerprint != first.fingerprint
    source.close()


def test_known_fingerprint_skips_parsing(server: Server, tmp_path: Path) -> None:
    """Given the fingerprint it already processed, a 304 or same body comes back as unchanged."""
    server.feed.body = calendar(event("e", "DTSTART:20260701T100000Z", "DURATION:PT1H"))
    server.feed.etag = '"v1"'
    source = make_source(tmp_path, {"url": server.url()})
    first = source.fetch(WIDE)
    again = source.fetch(WIDE, known=first.fingerprint)
    assert again.unchanged and again.events == [] and again.fingerprint == first.fingerprint
    server.feed.body = calendar(event("e2", "DTSTART:20260702T100000Z"))
    server.feed.etag = '"v2"'
    changed = source.fetch(WIDE, known=first.fingerprint)
    assert not changed.unchanged and [e.uid for e in changed.events] == ["e2"]
    source.close()


def test_last_modified_round_trip(server: Server, tmp_path: Path) -> None:
    """Without an ETag, If-Modified-Since is sent and a 304 reuses the cached body."""
    server.feed.body = calendar(event("lm", "DTSTART:20260701T100000Z"))
    server.feed.last_modified = "Wed, 01 Jul 2026 08:00:00 GMT"
    source = make_source(tmp_path, {"url": server.url()})
    first = source.fetch(WIDE)
    second = source.fetch(WIDE)
    headers = server.feed.requests[1]["headers"]
    assert headers.get("If-Modified-Since") == "Wed, 01 Jul 2026 08:00:00 GMT"
    assert "If-None-Match" not in headers
    assert second.events == first.events and second.fingerprint == first.fingerprint
    source.close()


def test_bad_body_does_not_replace_cached_copy(server: Server, tmp_path: Path) -> None:
    """A login page served in between does not become the copy reused on the next 304."""
    good = calendar(event("e", "DTSTART:20260701T100000Z"))
    server.feed.body, server.feed.etag = good, '"v1"'
    source = make_source(tmp_path, {"url": server.url()})
    first = source.fetch(WIDE)
    server.feed.body, server.feed.etag = b"<html>login</html>", '"login"'
    with pytest.raises(ConnectorError):
        source.fetch(WIDE)
    server.feed.body, server.feed.etag = good, '"v1"'
    again = source.fetch(WIDE)
    assert server.feed.requests[-1]["headers"].get("If-None-Match") == '"v1"'
    assert again.events == first.events
    source.close()


def test_redirect_is_followed_and_user_agent_sent(server: Server, tmp_path: Path) -> None:
    """A 302 to the real feed is followed; every request carries the context's User-Agent."""
    server.feed.body = calendar(event("r", "DTSTART:20260701T100000Z"))
    source = make_source(tmp_path, {"url": server.url("/redirect")})
    assert [e.uid for e in source.fetch(WIDE).events] == ["r"]
    source.close()
    assert [r["path"] for r in server.feed.requests] == ["/redirect", "/feed.ics"]
    assert all(r["headers"]["User-Agent"] == "visitwatch" for r in server.feed.requests)


def test_timeout_is_a_temporary_error(server: Server, tmp_path: Path) -> None:
    """A server slower than the timeout gives a temporary ConnectorError."""
    server.feed.body = calendar(event("slow", "DTSTART:20260701T100000Z"))
    server.feed.delay = 1.0
    source = make_source(tmp_path, {"url": server.url(), "timeout": "0.2s"})
    with pytest.raises(ConnectorError, match="within") as caught:
        source.fetch(WIDE)
    source.close()
    assert not caught.value.permanent


def test_connection_refused_is_temporary_and_hides_query(tmp_path: Path) -> None:
    """A closed port gives a temporary error whose text has no query string."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = make_source(tmp_path, {"url": f"http://127.0.0.1:{port}/cal.ics?token=s3cr3t"})
    with pytest.raises(ConnectorError) as caught:
        source.fetch(WIDE)
    assert not caught.value.permanent
    assert "s3cr3t" not in str(caught.value)
    assert "/cal.ics" in str(caught.value)


def test_secret_url_never_shown(
    server: Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A URL given as a Secret is used but never appears in errors or logs."""
    token = "private-0123456789abcdef"
    monkeypatch.setenv("ICS_URL", server.url(f"/cal/{token}/basic.ics?key={token}"))
    source = make_source(tmp_path, {"url": {"env": "ICS_URL"}})
    server.feed.body = calendar(event("s", "DTSTART:20260701T100000Z"))
    assert len(source.fetch(WIDE).events) == 1
    assert server.feed.requests[0]["path"] == f"/cal/{token}/basic.ics?key={token}"
    server.feed.status = 404
    with pytest.raises(ConnectorError) as caught:
        source.fetch(WIDE)
    source.close()
    assert token not in str(caught.value)
    assert "env ICS_URL" in str(caught.value)
    out = capsys.readouterr()
    assert token not in out.out + out.err


# --------------------------------------------------------------------------- files, config


def test_local_file(tmp_path: Path) -> None:
    """A path source reads the file (relative to the config folder); a missing one errors."""
    (tmp_path / "visits.ics").write_bytes(calendar(event("f", "DTSTART:20260701T100000Z")))
    source = make_source(tmp_path, {"path": "visits.ics"})
    result = source.fetch(WIDE)
    assert [e.uid for e in result.events] == ["f"]
    assert result.fingerprint is not None
    (tmp_path / "visits.ics").unlink()
    with pytest.raises(ConnectorError, match="home-visits"):
        source.fetch(WIDE)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param({}, "give exactly one of url or path (neither was given)", id="neither"),
        pytest.param(
            {"url": "https://example.org/a.ics", "path": "a.ics"},
            "give exactly one of url or path (both were given)",
            id="both",
        ),
        pytest.param(
            {"url": "ftp://example.org/secret-token/a.ics"},
            "must be an http:// or https:// address (a ftp:// address)",
            id="not-http",
        ),
    ],
)
def test_bad_configuration_is_a_config_problem(
    tmp_path: Path, table: dict[str, Any], expected: str
) -> None:
    """Both/neither of url and path, or a non-http URL, is a problem on the url key,
    found once at config time, and the address itself is never repeated back."""
    problems = config_problems(IcsSource, table, tmp_path, "sources[0]")
    assert [p.message for p in problems] == [expected]
    assert problems[0].key.endswith("url")
    assert "secret-token" not in str(problems[0])


def test_check_reports_entries_in_window(server: Server, tmp_path: Path) -> None:
    """check() reads the feed once and says how many entries fall around now."""
    soon = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y%m%dT%H%M00Z")
    server.feed.body = calendar(
        event("soon", f"DTSTART:{soon}"), event("old", "DTSTART:20000101T100000Z")
    )
    source = make_source(tmp_path, {"url": server.url()})
    assert source.check() == "feed read: 1 entries in window"
    source.close()
    source.close()  # closing twice is harmless


# --------------------------------------------------------------------------- issue 7: bounds

GOOD_VISITS = (
    event("good-1", "SUMMARY:Home visit", "DTSTART:20260701T090000Z", "DTEND:20260701T100000Z"),
    event("good-2", "SUMMARY:Home visit", "DTSTART:20260702T090000Z", "DTEND:20260702T100000Z"),
    event("good-3", "SUMMARY:Home visit", "DTSTART:20260703T090000Z", "DTEND:20260703T100000Z"),
)
GOOD_TIMES = [
    ("good-1", "2026-07-01T09:00Z", "2026-07-01T10:00Z"),
    ("good-2", "2026-07-02T09:00Z", "2026-07-02T10:00Z"),
    ("good-3", "2026-07-03T09:00Z", "2026-07-03T10:00Z"),
]
JULY = TimeWindow(datetime(2026, 6, 28, tzinfo=UTC), datetime(2026, 7, 12, tzinfo=UTC))


def read_file_source(
    tmp_path: Path, body: bytes, window: TimeWindow = JULY, **options: Any
) -> FetchResult:
    (tmp_path / "feed.ics").write_bytes(body)
    source = make_source(tmp_path, {"path": "feed.ics", **options})
    return source.fetch(window)


def reasons(result: FetchResult) -> dict[str, str]:
    return {p.uid: p.reason for p in result.problems}


def test_interval_zero_is_a_problem_for_that_entry_only(tmp_path: Path) -> None:
    """RRULE INTERVAL=0 (which made expansion loop forever) names its uid; the visits stay."""
    body = calendar(
        GOOD_VISITS[0],
        event("meeting", "DTSTART:20260701T080000Z", "RRULE:FREQ=DAILY;INTERVAL=0"),
        *GOOD_VISITS[1:],
    )
    result = run_bounded(30, lambda: read_file_source(tmp_path, body))
    assert sorted(times(result)) == GOOD_TIMES
    assert "invalid RRULE" in reasons(result)["meeting"]
    assert "INTERVAL=0" in reasons(result)["meeting"]


def test_minutely_visit_is_capped_at_max_occurrences(tmp_path: Path) -> None:
    """A FREQ=MINUTELY visit is reported and only its first occurrence watched (no storm)."""
    body = calendar(
        event("runaway", "DTSTART:20260701T080000Z", "DURATION:PT30M", "RRULE:FREQ=MINUTELY"),
        *GOOD_VISITS,
    )
    result = run_bounded(30, lambda: read_file_source(tmp_path, body, max_occurrences=50))
    runaway = [e for e in result.events if e.uid == "runaway"]
    assert len(runaway) == 1
    assert runaway[0].start == datetime(2026, 7, 1, 8, 0, tzinfo=UTC)
    assert "more than 50 occurrences" in reasons(result)["runaway"]
    assert "only its first is watched" in reasons(result)["runaway"]
    assert sorted(t for t in times(result) if t[0] != "runaway") == GOOD_TIMES


def test_default_cap_holds_without_configuration(tmp_path: Path) -> None:
    """Without options, one FREQ=MINUTELY visit cannot become hundreds of visits."""
    body = calendar(event("runaway", "DTSTART:20260701T080000Z", "RRULE:FREQ=MINUTELY"))
    result = run_bounded(30, lambda: read_file_source(tmp_path, body))
    assert len(result.events) == 1
    assert "runaway" in reasons(result)


@pytest.mark.parametrize(
    "rule",
    [
        pytest.param("DTSTART:20250101T000000Z\nRRULE:FREQ=SECONDLY", id="secondly-since-2025"),
        pytest.param(
            "DTSTART:20260101T000000Z\nRRULE:FREQ=SECONDLY;BYMONTH=2;BYMONTHDAY=30",
            id="never-matching",
        ),
    ],
)
def test_slow_rule_is_stopped_by_series_budget(tmp_path: Path, rule: str) -> None:
    """A rule that makes the library walk millions of steps is cut off and named."""
    body = calendar(GOOD_VISITS[0], event("slow", *rule.split("\n")), *GOOD_VISITS[1:])
    result = run_bounded(
        30, lambda: read_file_source(tmp_path, body, series_budget="1s", parse_budget="20s")
    )
    assert sorted(times(result)) == GOOD_TIMES
    assert "series_budget" in reasons(result)["slow"]


@pytest.mark.parametrize("slow_first", [True, False])
def test_parse_budget_makes_the_read_incomplete(tmp_path: Path, slow_first: bool) -> None:
    """When the whole read runs out of time, what is left is not read and the read is incomplete."""
    slow = event("slow", "DTSTART:20260101T000000Z", "RRULE:FREQ=SECONDLY;BYMONTH=2;BYMONTHDAY=30")
    body = calendar(slow, *GOOD_VISITS) if slow_first else calendar(*GOOD_VISITS, slow)
    result = run_bounded(
        30, lambda: read_file_source(tmp_path, body, series_budget="1h", parse_budget="1s")
    )
    assert not result.complete
    assert "parse_budget" in reasons(result)[""]
    assert "slow" in reasons(result)


# --------------------------------------------------------------------------- structure


def test_missing_end_does_not_swallow_the_next_entries(tmp_path: Path) -> None:
    """An entry without END:VEVENT is reported; the visits after it are all read."""
    damaged = event("damaged", "DTSTART:20260704T090000Z", "DTEND:20260704T100000Z")
    damaged = damaged.replace("END:VEVENT", "")
    body = calendar(GOOD_VISITS[0], damaged, *GOOD_VISITS[1:])
    result = read_file_source(tmp_path, body)
    assert set(GOOD_TIMES) <= set(times(result))
    assert "END:VEVENT" in reasons(result)["damaged"]
    assert not result.complete


@pytest.mark.parametrize("broken", ["BEGIX:VEVENT", "BEGIN:VEVENU", "BEGIN;VEVENT", "BEG"])
def test_damaged_begin_line_is_reported_and_neighbours_survive(tmp_path: Path, broken: str) -> None:
    """A flipped byte in BEGIN:VEVENT names the entry as damaged; the others are read."""
    damaged = event("damaged", "DTSTART:20260704T090000Z", "DTEND:20260704T100000Z")
    damaged = damaged.replace("BEGIN:VEVENT", broken)
    body = calendar(GOOD_VISITS[0], damaged, *GOOD_VISITS[1:])
    result = read_file_source(tmp_path, body)
    assert set(GOOD_TIMES) <= set(times(result))
    assert "damaged" in reasons(result)
    assert not result.complete


def test_damaged_first_begin_line_is_not_read_as_calendar_properties(tmp_path: Path) -> None:
    """Even the very first entry with a damaged BEGIN is named, not silently dropped."""
    damaged = event("damaged", "DTSTART:20260704T090000Z", "DTEND:20260704T100000Z")
    body = calendar(damaged.replace("BEGIN:VEVENT", "BEGIX:VEVENT"), *GOOD_VISITS)
    result = read_file_source(tmp_path, body)
    assert set(GOOD_TIMES) <= set(times(result))
    assert "damaged" in reasons(result)
    assert not result.complete


def test_misspelt_end_loses_nothing_icalendar_reads(tmp_path: Path) -> None:
    """END:VTOOD closes the entry as icalendar does: it and every later entry are read."""
    odd = event("odd", "DTSTART:20260704T090000Z", "DTEND:20260704T100000Z")
    later = [
        event(f"later-{n}", f"DTSTART:202607{5 + n:02d}T090000Z", "DURATION:PT1H") for n in range(5)
    ]
    body = calendar(odd.replace("END:VEVENT", "END:VTOOD"), *later)
    result = read_file_source(tmp_path, body)
    assert {e.uid for e in result.events} == {"odd"} | {f"later-{n}" for n in range(5)}
    assert "END:VTOOD" in reasons(result)["odd"]
    assert not result.complete


def test_undamaged_feed_is_complete_and_silent(tmp_path: Path) -> None:
    """The structure check raises nothing on a sound feed with alarms and time zones."""
    alarm = "BEGIN:VALARM\nACTION:DISPLAY\nTRIGGER:-PT15M\nEND:VALARM"
    body = calendar(
        event("tz", "DTSTART;TZID=GMT Standard Time:20260705T090000", "DURATION:PT1H", alarm),
        *GOOD_VISITS,
        head="X-WR-CALNAME:Visits\n" + OUTLOOK_GMT,
    )
    result = read_file_source(tmp_path, body)
    assert result.complete
    assert result.problems == []
    assert ("tz", "2026-07-05T08:00Z", "2026-07-05T09:00Z") in times(result)


# --------------------------------------------------------------------------- size limits


def test_feed_over_max_bytes_is_a_failed_read(server: Server, tmp_path: Path) -> None:
    """A feed larger than max_bytes fails (known visits are kept) with a message naming it."""
    server.feed.body = calendar(*GOOD_VISITS) + b"X" * 5000
    source = make_source(tmp_path, {"url": server.url(), "max_bytes": 2000})
    with pytest.raises(ConnectorError, match="max_bytes") as caught:
        source.fetch(JULY)
    source.close()
    assert "2000" in str(caught.value)


def test_feed_over_max_bytes_without_length_stops_reading(server: Server, tmp_path: Path) -> None:
    """Without Content-Length the download is still abandoned past max_bytes."""
    server.feed.body = calendar(*GOOD_VISITS, *[GOOD_VISITS[0]] * 400)
    server.feed.content_type = "text/calendar"
    source = make_source(tmp_path, {"url": server.url(), "max_bytes": 3000})
    server.feed.send_length = False
    with pytest.raises(ConnectorError, match="max_bytes"):
        source.fetch(JULY)
    source.close()


def test_file_over_max_bytes_is_a_failed_read(tmp_path: Path) -> None:
    """A local file larger than max_bytes is refused the same way."""
    with pytest.raises(ConnectorError, match="max_bytes"):
        read_file_source(tmp_path, calendar(*GOOD_VISITS), max_bytes=100)


def test_huge_line_is_left_out_and_reported(tmp_path: Path) -> None:
    """A line over max_line is dropped; its entry is named and still read."""
    big = event("big", "DTSTART:20260704T090000Z", "DURATION:PT1H", "DESCRIPTION:" + "x" * 5000)
    result = read_file_source(tmp_path, calendar(big, *GOOD_VISITS), max_line=1000)
    assert set(GOOD_TIMES) <= set(times(result))
    assert "big" in {e.uid for e in result.events}
    assert "max_line" in reasons(result)["big"]
    assert not result.complete


def test_entries_over_max_entries_are_reported(tmp_path: Path) -> None:
    """Past max_entries the rest is not read, the admin is told why, the read is incomplete."""
    result = read_file_source(tmp_path, calendar(*GOOD_VISITS), max_entries=2)
    assert len(result.events) == 2
    assert "max_entries" in reasons(result)[""]
    assert not result.complete


# --------------------------------------------------------------------------- secret URLs


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        (
            "https://calendar.google.com/calendar/ical/jo%40example.org/"
            "private-9f8e7d6c5b4a39281706f5e4d3c2b1a0/basic.ics",
            "9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        ),
        (
            "https://outlook.office365.com/owa/calendar/"
            "0a1b2c3d4e5f40718293a4b5c6d7e8f9@example.org/"
            "Zk3mQp7XvT2rLw9YhB4nC6sD8fG1jK5a/calendar.ics",
            "Zk3mQp7XvT2rLw9YhB4nC6sD8fG1jK5a",
        ),
        (
            "https://outlook.live.com/owa/calendar/00000000-0000-0000-0000-000000000000/"
            "1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f/reachcalendar.ics",
            "1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f",
        ),
        ("https://cal.example.org/visits.ics?token=abc123", "abc123"),
        ("https://user:hunter2@cal.example.org/visits.ics", "hunter2"),
    ],
)
def test_redact_url_hides_path_and_query_secrets(url: str, secret: str) -> None:
    """Tokens in the path (Google, Outlook), the query or userinfo never survive redaction."""
    from visitwatch.connectors.ics import redact_url

    shown = redact_url(url)
    assert secret not in shown
    assert shown.startswith("https://")
    assert urlsplit_host(url) in shown


def urlsplit_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def test_redact_url_keeps_ordinary_paths() -> None:
    """An address without secrets is shown as written, so the admin can recognise it."""
    from visitwatch.connectors.ics import redact_url

    assert redact_url("https://cal.example.org/team/visits.ics") == (
        "https://cal.example.org/team/visits.ics"
    )


def test_inline_token_url_is_redacted_in_errors(tmp_path: Path) -> None:
    """An inline Google private address in a failed read shows no token."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
    url = f"http://127.0.0.1:{port}/calendar/ical/jo%40example.org/private-{token}/basic.ics"
    source = make_source(tmp_path, {"url": url})
    with pytest.raises(ConnectorError) as caught:
        source.fetch(WIDE)
    assert token not in str(caught.value)
    assert "basic.ics" in str(caught.value)


# --------------------------------------------------------------------------- THISANDFUTURE


def test_this_and_future_override_keys_are_unique_and_stable(tmp_path: Path) -> None:
    """Occurrences moved by a RANGE=THISANDFUTURE override keep distinct, stable keys."""
    body = calendar(
        event(
            "weekly",
            "DTSTART:20260601T090000Z",
            "DTEND:20260601T100000Z",
            "RRULE:FREQ=WEEKLY;COUNT=12",
        ),
        event(
            "weekly",
            "RECURRENCE-ID;RANGE=THISANDFUTURE:20260615T090000Z",
            "DTSTART:20260615T110000Z",
            "DTEND:20260615T120000Z",
        ),
    )
    (tmp_path / "feed.ics").write_bytes(body)
    source = make_source(tmp_path, {"path": "feed.ics"})
    seen: dict[str, datetime] = {}
    for week in range(5):
        start = datetime(2026, 6, 1, tzinfo=UTC) + timedelta(weeks=week)
        result = source.fetch(TimeWindow(start, start + timedelta(weeks=4)))
        keys = [e.recurrence_id for e in result.events]
        assert len(keys) == len(set(keys)), keys
        for e in result.events:
            assert seen.setdefault(e.recurrence_id, e.start) == e.start
    # Each key is the occurrence's start in the series before the move (8 weeks seen).
    first = datetime(2026, 6, 1, 9, tzinfo=UTC)
    assert seen == {
        (first + timedelta(weeks=n)).isoformat(): first
        + timedelta(weeks=n, hours=2 if n >= 2 else 0)
        for n in range(8)
    }


# --------------------------------------------------------------------------- differential

DIFFERENTIAL_FEEDS = {
    "this-and-future": calendar(
        event(
            "s",
            "DTSTART;TZID=Europe/London:20260601T090000",
            "DTEND;TZID=Europe/London:20260601T100000",
            "RRULE:FREQ=WEEKLY;BYDAY=MO,WE",
        ),
        event(
            "s",
            "RECURRENCE-ID;RANGE=THISANDFUTURE;TZID=Europe/London:20260615T090000",
            "DTSTART;TZID=Europe/London:20260615T130000",
            "DTEND;TZID=Europe/London:20260615T143000",
        ),
        event(
            "s",
            "RECURRENCE-ID;TZID=Europe/London:20260624T090000",
            "DTSTART;TZID=Europe/London:20260625T080000",
            "DTEND;TZID=Europe/London:20260625T090000",
        ),
    ),
    "two-this-and-future": calendar(
        event("t", "DTSTART:20260601T090000Z", "DURATION:PT1H", "RRULE:FREQ=DAILY;COUNT=40"),
        event(
            "t",
            "RECURRENCE-ID;RANGE=THISANDFUTURE:20260605T090000Z",
            "DTSTART:20260605T100000Z",
            "DURATION:PT1H",
        ),
        event(
            "t",
            "RECURRENCE-ID;RANGE=THISANDFUTURE:20260620T090000Z",
            "DTSTART:20260620T070000Z",
            "DURATION:PT2H",
        ),
    ),
    "misspelt-end": calendar(
        event("odd", "DTSTART:20260604T090000Z", "DURATION:PT1H").replace(
            "END:VEVENT", "END:VTOOD"
        ),
        *[event(f"n{n}", f"DTSTART:202606{10 + n}T090000Z", "DURATION:PT1H") for n in range(5)],
    ),
    "exdate-rdate-windows-zone": calendar(
        event(
            "w",
            "DTSTART;TZID=GMT Standard Time:20260601T090000",
            "DTEND;TZID=GMT Standard Time:20260601T100000",
            "RRULE:FREQ=WEEKLY;COUNT=8",
            "EXDATE;TZID=GMT Standard Time:20260608T090000",
            "RDATE;TZID=GMT Standard Time:20260603T150000",
        ),
        head=OUTLOOK_GMT,
    ),
    "floating-and-all-day": calendar(
        event("f", "DTSTART:20260602T090000", "DTEND:20260602T100000", "RRULE:FREQ=DAILY;COUNT=3"),
        event("d", "DTSTART;VALUE=DATE:20260605", "DTEND;VALUE=DATE:20260606"),
    ),
}


def reference_times(body: bytes, window: TimeWindow, zone: str) -> list[tuple[str, str]]:
    """icalendar + recurring-ical-events alone: (start, end) in UTC of every occurrence."""
    import icalendar
    import recurring_ical_events

    tz = ZoneInfo(zone)

    def utc(value: Any) -> datetime:
        if not isinstance(value, datetime):
            value = datetime.combine(value, datetime.min.time())
        if value.tzinfo is None:
            value = value.replace(tzinfo=tz)
        return value.astimezone(UTC)

    found = []
    cal = icalendar.Calendar.from_ical(body.decode())
    for occurrence in recurring_ical_events.of(cal).between(window.start, window.end):
        start = utc(occurrence.decoded("DTSTART"))
        end = utc(occurrence.decoded("DTEND")) if "DTEND" in occurrence else start
        found.append((start.isoformat(), end.isoformat()))
    return sorted(found)


@pytest.mark.parametrize("name", sorted(DIFFERENTIAL_FEEDS))
def test_same_occurrences_as_the_reference(tmp_path: Path, name: str) -> None:
    """Every occurrence icalendar + recurring-ical-events find is read, each under its own key."""
    body = DIFFERENTIAL_FEEDS[name]
    window = TimeWindow(datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 7, 15, tzinfo=UTC))
    result = read_file_source(tmp_path, body, window)
    ours = sorted((e.start.isoformat(), (e.end or e.start).isoformat()) for e in result.events)
    assert ours == reference_times(body, window, "Europe/London")
    keys = [e.key for e in result.events]
    assert len(keys) == len(set(keys))


def test_check_says_when_the_read_was_incomplete(server: Server, tmp_path: Path) -> None:
    """check() on a damaged feed says the read was incomplete, not just 'feed read'."""
    soon = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y%m%dT%H%M00Z")
    damaged = event("cut", f"DTSTART:{soon}").replace("END:VEVENT", "")
    server.feed.body = calendar(damaged, event("soon", f"DTSTART:{soon}"))
    source = make_source(tmp_path, {"url": server.url()})
    text = source.check()
    source.close()
    assert "incomplete" in text
    assert "problem" in text


def test_parse_budget_bounds_parsing_a_huge_feed(tmp_path: Path) -> None:
    """A feed too large to parse within parse_budget is read in part and marked incomplete."""
    many = [
        event(f"v{n}", f"DTSTART:202607{1 + n % 9:02d}T{8 + n % 9:02d}0000Z", "DURATION:PT1H")
        for n in range(1200)
    ]
    result = read_file_source(tmp_path, calendar(*many), parse_budget="1ms")
    assert not result.complete
    assert "parse_budget" in reasons(result)[""]
    assert len(result.events) < 1200


def test_a_server_that_drips_the_feed_is_cut_off_at_the_deadline(tmp_path: Path):
    """A byte every 0.2 s passes every read timeout; the whole download still has a limit."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/calendar\r\nContent-Length: 5000\r\n\r\n"
        )
        while not stop.is_set():
            try:
                conn.sendall(b"X")
            except OSError:
                break
            stop.wait(0.2)
        conn.close()

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        source = make_source(tmp_path, {"url": f"http://127.0.0.1:{port}/cal.ics", "timeout": "1s"})
        started = time.monotonic()
        with pytest.raises(ConnectorError, match="too slowly"):
            source.fetch(WIDE)
        assert time.monotonic() - started < 15  # 5000 bytes would take 1000 s (hang check)
    finally:
        stop.set()
        listener.close()
        thread.join(5)
