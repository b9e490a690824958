"""Shared fixtures: a small organisation, calendars written as real ICS, a movable clock.

The ``world`` reads its calendar through an .ics file unless a test module asks for more:
``pytestmark = pytest.mark.sources(*SOURCE_KINDS)`` runs each of its tests once per kind
of source (``tests/calendar_feeds.py``), and a test marked ``sources("ics-file")`` only
against the file.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import certifi
import pytest
import responses
import structlog
from aiosmtpd.controller import Controller

from tests.calendar_feeds import SOURCE_KINDS, CalendarFeed, calendar_feed
from tests.graph_server import FakeGraph
from tests.ics_feed import Server, serving
from tests.mailserver import Recorder, free_port
from tests.scripted import scripted_channels  # noqa: F401  (a fixture for every test)
from visitwatch.connectors import graph_client
from visitwatch.connectors.outbox import read_outbox
from visitwatch.daemon.clock import FrozenClock
from visitwatch.daemon.config import load_config
from visitwatch.daemon.service import Service

# Monday 23 November 2026: Europe/London is on GMT, so local time equals UTC.
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

# Two workers, their manager Maria and the director Sam; test_properties.py adds a team.
STAFF_WORKERS = """
[[staff]]
id = "asha.khan@example.org"
name = "Asha Khan"
mobile = "07700 900123"
manager = "maria.jones@example.org"

[[staff]]
id = "ben.okafor@example.org"
name = "Ben Okafor"
manager = "maria.jones@example.org"
"""
STAFF_MANAGERS = """
[[staff]]
id = "maria.jones@example.org"
name = "Maria Jones"
mobile = "07700 900321"
role = "manager"
manager = "sam.webster@example.org"

[[staff]]
id = "sam.webster@example.org"
name = "Sam Webster"
role = "director"
"""
STAFF = STAFF_WORKERS + STAFF_MANAGERS
MANAGER_AND_DIRECTOR = ["maria.jones@example.org", "sam.webster@example.org"]


def ics_event(
    uid: str,
    summary: str,
    start: datetime,
    end: datetime | None,
    *,
    description: str = "",
    location: str = "",
    categories: tuple[str, ...] = ("Home Visit",),
    attendees: tuple[str, ...] = (),
    status: str = "",
    extra: str = "",
    last_modified: datetime | None = None,
) -> str:
    fmt = "%Y%m%dT%H%M%SZ"
    lines = [
        "BEGIN:VEVENT",
        f"UID:{uid}",
        f"DTSTAMP:{T0:{fmt}}",
        f"SUMMARY:{summary}",
        f"DTSTART:{start.astimezone(UTC):{fmt}}",
    ]
    if end is not None:
        lines.append(f"DTEND:{end.astimezone(UTC):{fmt}}")
    if description:
        lines.append("DESCRIPTION:" + description.replace("\n", "\\n"))
    if location:
        lines.append("LOCATION:" + location.replace(",", "\\,"))
    if categories:
        lines.append("CATEGORIES:" + ",".join(categories))
    for email in attendees:
        lines.append(f"ATTENDEE;CN={email.split('@')[0]}:mailto:{email}")
    if status:
        lines.append(f"STATUS:{status}")
    if last_modified:
        lines.append(f"LAST-MODIFIED:{last_modified.astimezone(UTC):{fmt}}")
    if extra:
        lines.append(extra)
    lines.append("END:VEVENT")
    return "\r\n".join(lines)


def ics_calendar(*events: str) -> str:
    body = "\r\n".join(events)
    return f"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//visitwatch tests//EN\r\n{body}\r\nEND:VCALENDAR\r\n"


def home_visit(
    uid: str = "visit-1",
    *,
    start: datetime = T0 + timedelta(hours=1),
    end: datetime = T0 + timedelta(hours=2),
    description: str | None = None,
    **kwargs: Any,
) -> str:
    """A compliant home visit by Asha Khan: 13:00 to 14:00, return by the end."""
    if description is None:
        description = "Risk assessment: complete\nMobile: 07700 900123"
    kwargs.setdefault("location", "14 Brook Street, Preston PR1 3XX")
    return ics_event(
        uid, "Home visit - Carter family", start, end, description=description, **kwargs
    )


def many_visits(count: int) -> tuple[str, ...]:
    """``count`` compliant visits at the same time: visit-0, visit-1 ..."""
    return tuple(home_visit(f"visit-{n}") for n in range(count))


@dataclass
class World:
    """One organisation on disk: config, calendar file, database, outbox.

    The calendar is always written as an .ics file; ``feed`` serves it to the source.
    """

    folder: Path
    clock: FrozenClock
    feed: CalendarFeed
    shared: bool = False  # a shared calendar: the worker is found among the attendees
    policy: str = ""
    channels: str = ""
    sources: str = ""
    daemon: str = ""  # extra lines for the [daemon] table
    services: list[Service] = field(default_factory=list)

    @property
    def calendar(self) -> Path:
        return self.folder / "calendar.ics"

    @property
    def outbox(self) -> Path:
        return self.folder / "outbox.jsonl"

    @property
    def config_file(self) -> Path:
        return self.folder / "visitwatch.toml"

    def write_calendar(self, *events: str) -> None:
        self.calendar.write_text(ics_calendar(*events), encoding="utf-8")

    def write_config(self) -> Path:
        sources = self.sources or self.feed.source_table("team", shared=self.shared)
        channels = self.channels or textwrap.dedent("""
            [[channels]]
            name = "outbox"
            type = "outbox"
            path = "outbox.jsonl"
        """)
        self.config_file.write_text(
            textwrap.dedent("""
                [daemon]
                database = "visitwatch.db"
                timezone = "Europe/London"
            """)
            + self.daemon
            + "\n"
            + STAFF
            + sources
            + channels
            + '\n[policy]\npreset = "pan-lancashire"\n'
            + self.policy,
            encoding="utf-8",
        )
        return self.config_file

    def service(self) -> Service:
        service = Service(load_config(self.write_config()), clock=self.clock)
        self.services.append(service)
        return service

    def at(self, moment: datetime) -> None:
        self.clock.set(moment)

    def messages(self, kind: str | None = None) -> list[dict[str, Any]]:
        records = read_outbox(self.outbox)
        return [r for r in records if kind is None or r["kind"] == kind]

    def recipients(self, kind: str) -> list[str]:
        """Who got a ``kind`` message through the outbox, in the order they were sent."""
        return [m["recipient"]["id"] for m in self.messages(kind)]

    def close(self) -> None:
        for service in self.services:
            service.close()


@pytest.fixture
def world(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[World]:
    """The organisation, its calendar read by the source kind the test is run for."""
    kind = getattr(request, "param", "ics-file")
    with ExitStack() as stack:
        feed = stack.enter_context(calendar_feed(kind, tmp_path / "calendar.ics", monkeypatch))
        w = World(tmp_path, FrozenClock(T0), feed)
        stack.callback(w.close)
        yield w


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sources(*kinds): run the test's world once per kind of calendar source"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.sources(...)``: the ``world`` fixture once per named source kind."""
    marker = metafunc.definition.get_closest_marker("sources")
    if marker is None or "world" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(SOURCE_KINDS)
    assert not unknown, f"unknown source kinds {unknown}; known: {SOURCE_KINDS}"
    metafunc.parametrize("world", marker.args, indirect=True)


def tick(service: Service) -> None:
    """What the daemon does on every timer: sync, sweep, deliver."""
    service.sync_all()
    service.sweep()
    service.dispatch()


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    structlog.reset_defaults()
    structlog.configure(cache_logger_on_first_use=False)
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _fresh_graph_clients() -> Iterator[None]:
    """shared_client keeps one Graph client per app in a module dict: each test gets its own."""
    graph_client._clients.clear()
    yield
    for client in graph_client._clients.values():
        client.close()
    graph_client._clients.clear()


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    """Microsoft Entra and Graph answered by ``responses``; see ``tests/graph_mock.py``."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


FAKE_GRAPH_SECRET_ENV = "VW_FAKE_GRAPH_SECRET"


@pytest.fixture
def start_fake_graph(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeGraph]]:
    """Start FakeGraph (Entra and Graph over TLS on loopback), stopped after the test.

    Its client secret is in ``$VW_FAKE_GRAPH_SECRET``. requests lets REQUESTS_CA_BUNDLE /
    CURL_CA_BUNDLE override a session's own ``verify`` (psf/requests#3829); the client pins
    its ca_file, and pointing them elsewhere proves it.
    """
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    monkeypatch.setenv("CURL_CA_BUNDLE", certifi.where())
    with ExitStack() as stack:

        def start(**kwargs: Any) -> FakeGraph:
            graph = stack.enter_context(FakeGraph(**kwargs))
            monkeypatch.setenv(FAKE_GRAPH_SECRET_ENV, graph.client_secret)
            return graph

        yield start


@pytest.fixture
def server() -> Iterator[Server]:
    """A loopback HTTP server serving an .ics feed (``tests/ics_feed.py``)."""
    with serving() as running:
        yield running


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., tuple[Recorder, int]]]:
    """Start aiosmtpd servers on free ports; stop them all afterwards."""
    controllers: list[Controller] = []

    def start(**kwargs: Any) -> tuple[Recorder, int]:
        handler = Recorder()
        port = kwargs.pop("port", None) or free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return handler, port

    yield start
    for controller in controllers:
        controller.stop()


SOAK = bool(os.environ.get("VISITWATCH_SOAK"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long runs (marked ``soak``) run under ``make soak``; ``make test`` runs their short forms."""
    if SOAK:
        return
    skip = pytest.mark.skip(reason="long run: `make soak` runs it (its short form runs here)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
