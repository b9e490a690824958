"""Outlook changes in seconds: Graph change notifications against the Graph-shaped server.

The daemon's pieces are real: a :class:`Service` built from a config whose Graph source
points at :class:`FakeGraph` (TLS on loopback), the pages' own server (waitress) on
loopback, the subscription manager and the read queue. FakeGraph validates the endpoints
when a subscription is created and posts notifications to them, as Graph does.
"""

from __future__ import annotations

import stat
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from flask import Flask
from structlog.testing import capture_logs

from tests.conftest import STAFF
from tests.graph_server import FakeGraph, graph_event, toml_table
from tests.mailserver import free_port
from visitwatch.connectors.change_feed import Endpoints, Subscribed, SubscriptionGone
from visitwatch.connectors.graph import GraphCalendarSource
from visitwatch.connectors.graph_subscriptions import MAX_LIFETIME, GraphChangeFeed
from visitwatch.daemon.clock import FrozenClock
from visitwatch.daemon.config import load_config
from visitwatch.daemon.polls import Polls
from visitwatch.daemon.service import Service
from visitwatch.daemon.source_reads import SourceReads
from visitwatch.daemon.subscriptions import (
    FAILURES_BEFORE_NOTICE,
    Subscriptions,
    subscriptions_for,
)
from visitwatch.daemon.web import graph_hooks
from visitwatch.daemon.web.server import WebServer, build_app

ASHA = "asha.khan@example.org"
SOURCE = "team"


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def home_visit(event_id: str, start: datetime) -> dict[str, Any]:
    return graph_event(event_id, "Home visit", start, start + timedelta(hours=1),
                       body="Risk assessment: complete\nReturn by: 23:59")  # fmt: skip


@dataclass
class Daemon:
    """The daemon's side on loopback: service, web server, subscriptions, read queue."""

    service: Service
    subscriptions: Subscriptions
    reads: SourceReads
    app: Flask
    base_url: str
    clock: FrozenClock
    requested: list[str] = field(default_factory=list)
    told: list[tuple[str, str, str]] = field(default_factory=list)

    def visit_uids(self) -> set[str]:
        return {getattr(v, "uid", "") for v in self.service.watcher.visits.of_source(SOURCE)}


@pytest.fixture
def graph(start_fake_graph: Callable[..., FakeGraph]) -> FakeGraph:
    fake = start_fake_graph()
    fake.events[ASHA] = []
    return fake


@pytest.fixture
def daemon(graph: FakeGraph, tmp_path: Path) -> Iterator[Daemon]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    sources = toml_table(
        "sources",
        {
            "name": SOURCE,
            "type": "graph",
            **graph.config_table("VW_FAKE_GRAPH_SECRET", mailboxes=[ASHA]),
        },
    )
    config = tmp_path / "visitwatch.toml"
    config.write_text(
        textwrap.dedent(f"""
            [daemon]
            database = "visitwatch.db"
            public_base_url = "{base_url}"
            [web]
            enabled = true
            port = {port}
        """)
        + STAFF
        + '\n[[staff]]\nid = "admin@example.org"\nname = "Ada Admin"\nrole = "admin"\n'
        + "\n"
        + sources
        + '\n[[channels]]\nname = "outbox"\ntype = "outbox"\npath = "outbox.jsonl"\n'
        + '\n[policy]\npreset = "pan-lancashire"\n',
        encoding="utf-8",
    )
    clock = FrozenClock(datetime.now(UTC))
    service = Service(load_config(config), clock=clock)
    source = service.sources[SOURCE]
    assert isinstance(source, GraphCalendarSource)
    feed = GraphChangeFeed(SOURCE, source.client, source.mailboxes, source.targets)
    reads = SourceReads(service.sync, service.sources)
    requested: list[str] = []
    told: list[tuple[str, str, str]] = []

    def request_sync(name: str) -> bool:
        requested.append(name)
        return reads.request_sync(name)

    def tell(key: str, subject: str, text: str) -> None:
        told.append((key, subject, text))
        service._admin_notice(key, subject, text)  # what the service gives the manager

    subscriptions = Subscriptions(
        {SOURCE: feed}, base_url, service.config.daemon.state_dir, clock, request_sync, tell
    )
    context = service.web_context()
    context.extras["subscriptions"] = subscriptions
    app = build_app(context)
    if "graph_hooks" not in app.blueprints:  # until app.py registers it
        app.register_blueprint(graph_hooks.blueprint)
    server = WebServer(context, app)
    server.start()
    reads.start()
    yield Daemon(service, subscriptions, reads, app, base_url, clock, requested, told)
    reads.stop()
    server.stop()
    service.close()


# --------------------------------------------------------------------------- handshake


def test_validation_token_is_echoed_as_plain_text(daemon: Daemon) -> None:
    """Both endpoints answer Graph's validation request with the token, 200 text/plain."""
    client = daemon.app.test_client()
    token = "Validation: Testing client application reachability for subscription <b>1</b>"
    for path in ("/graph/notify", "/graph/lifecycle"):
        answer = client.post(path, query_string={"validationToken": token})
        assert answer.status_code == 200
        assert answer.mimetype == "text/plain"
        assert answer.get_data(as_text=True) == token
        assert answer.headers["X-Content-Type-Options"] == "nosniff"


def test_creating_a_subscription_passes_graphs_handshake(daemon: Daemon, graph: FakeGraph) -> None:
    """A step subscribes the mailbox's events; Graph validated both URLs over HTTP first;
    the secret is kept 0600 and never logged."""
    with capture_logs() as logs:
        daemon.subscriptions.step()
    [made] = graph.subscriptions.of(ASHA)
    assert made["resource"] == f"users/{ASHA}/events"
    assert made["changeType"] == "created,updated,deleted"
    assert made["notificationUrl"] == daemon.base_url + "/graph/notify"
    assert made["lifecycleNotificationUrl"] == daemon.base_url + "/graph/lifecycle"
    handshakes = [d for d in graph.subscriptions.deliveries if "validationToken=" in d.url]
    assert [(d.status, d.content_type.split(";")[0]) for d in handshakes] == [
        (200, "text/plain"), (200, "text/plain")]  # fmt: skip
    state = daemon.service.config.daemon.state_dir / "graph-subscriptions.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert made["clientState"] in state.read_text()
    assert len(made["clientState"]) >= 32
    assert made["clientState"] not in repr(logs)


# --------------------------------------------------------------------------- notifications


def test_a_change_notification_reads_the_calendar_within_a_second(
    daemon: Daemon, graph: FakeGraph
) -> None:
    """An entry booked after the subscription is in the record within a second of Graph's
    notification, with no poll running: the read came from the notification."""
    daemon.subscriptions.step()
    event = home_visit("new-visit", datetime.now(UTC) + timedelta(hours=2))
    graph.add_event(ASHA, event)
    assert event["iCalUId"] not in daemon.visit_uids()
    assert graph.subscriptions.notify(ASHA, "created", "new-visit") == [202]
    assert wait_for(lambda: event["iCalUId"] in daemon.visit_uids(), 1.0)
    assert daemon.requested == [SOURCE]


def test_a_notification_with_the_wrong_client_state_changes_nothing(
    daemon: Daemon, graph: FakeGraph
) -> None:
    """A forged notification (right subscription, wrong secret) gets 202, asks for no read,
    and the log says it was ignored without the secret or the mailbox."""
    daemon.subscriptions.step()
    [made] = graph.subscriptions.of(ASHA)
    forged = {"value": [{"subscriptionId": made["id"], "clientState": "guessed",
                         "changeType": "updated", "resource": f"Users/{ASHA}/Events/x"}]}  # fmt: skip
    unknown = {"value": [{"subscriptionId": "not-ours", "clientState": made["clientState"]}]}
    with capture_logs() as logs:
        statuses = [graph.subscriptions.post(daemon.base_url + path, body)
                    for path in ("/graph/notify", "/graph/lifecycle")
                    for body in (forged, unknown, {"not": "graph"})]  # fmt: skip
    assert statuses == [202] * 6
    assert daemon.requested == []
    ignored = [e for e in logs if e["event"] == "graph_notification_ignored"]
    assert len(ignored) == 6 and all(e["log_level"] == "info" for e in ignored)
    assert ASHA not in repr(logs) and made["clientState"] not in repr(logs)


def test_the_endpoints_are_not_served_without_subscriptions(daemon: Daemon) -> None:
    """Without an active subscription manager the endpoints are 404: nobody can use them
    to make the daemon echo text."""
    daemon.app.extensions["visitwatch"].extras.pop("subscriptions")
    client = daemon.app.test_client()
    assert client.post("/graph/notify?validationToken=x").status_code == 404


# --------------------------------------------------------------------------- renewal


def test_subscriptions_are_renewed_before_they_expire(daemon: Daemon, graph: FakeGraph) -> None:
    """Nothing is renewed while two thirds of the life are left; then one PATCH moves the
    end, and the loop is told when the next renewal falls due."""
    first_wait = daemon.subscriptions.step()
    [made] = graph.subscriptions.of(ASHA)
    expires = daemon.subscriptions.subscriptions()[0].expires
    assert expires - daemon.clock.now() <= MAX_LIFETIME
    assert first_wait is not None
    assert abs(first_wait - (expires - MAX_LIFETIME / 3 - daemon.clock.now()).total_seconds()) < 1
    daemon.clock.advance(MAX_LIFETIME / 3)
    daemon.subscriptions.step()
    assert graph.requests_to("PATCH", "/v1.0/subscriptions") == []
    daemon.clock.advance(MAX_LIFETIME / 3)
    daemon.subscriptions.step()
    assert len(graph.requests_to("PATCH", f"/v1.0/subscriptions/{made['id']}")) == 1
    renewed = daemon.subscriptions.subscriptions()[0]
    assert renewed.id == made["id"] and renewed.expires > expires + MAX_LIFETIME / 2
    assert graph.subscriptions.of(ASHA)[0]["expirationDateTime"] != made["expirationDateTime"]


def test_a_subscription_graph_lost_is_created_again_at_renewal(
    daemon: Daemon, graph: FakeGraph
) -> None:
    """A renewal answered 404 makes a new subscription, not an error."""
    daemon.subscriptions.step()
    graph.subscriptions.active.clear()
    daemon.clock.advance(MAX_LIFETIME * 2 / 3)
    daemon.subscriptions.step()
    [made] = graph.subscriptions.of(ASHA)
    assert [s.id for s in daemon.subscriptions.subscriptions()] == [made["id"]]
    assert daemon.subscriptions.status()[SOURCE]["failures"] == 0


def test_stop_deletes_and_a_restart_after_a_crash_renews(daemon: Daemon, graph: FakeGraph) -> None:
    """A restart after a crash renews the subscription it kept on disk instead of making a
    second one; stopping deletes it at Graph and from the state file."""
    daemon.subscriptions.step()
    [made] = graph.subscriptions.of(ASHA)
    again = Subscriptions(daemon.subscriptions.feeds, daemon.base_url,
                          daemon.service.config.daemon.state_dir, daemon.clock,
                          daemon.requested.append)  # fmt: skip
    daemon.clock.advance(MAX_LIFETIME * 2 / 3)
    again.step()
    assert [s["id"] for s in graph.subscriptions.of(ASHA)] == [made["id"]]
    assert len(graph.requests_to("PATCH", "/v1.0/subscriptions")) == 1
    again.stop()
    assert graph.subscriptions.active == {}
    state = daemon.service.config.daemon.state_dir / "graph-subscriptions.json"
    assert state.read_text() == "[]"


# --------------------------------------------------------------------------- lifecycle


def test_lifecycle_events_renew_recreate_or_read(daemon: Daemon, graph: FakeGraph) -> None:
    """reauthorizationRequired renews at the next step; missed reads at once;
    subscriptionRemoved reads at once and subscribes again."""
    daemon.subscriptions.step()
    [made] = graph.subscriptions.of(ASHA)
    assert graph.subscriptions.lifecycle(made["id"], "reauthorizationRequired") == 202
    daemon.subscriptions.step()
    assert len(graph.requests_to("PATCH", f"/v1.0/subscriptions/{made['id']}")) == 1

    assert graph.subscriptions.lifecycle(made["id"], "missed") == 202
    assert daemon.requested == [SOURCE]

    assert graph.subscriptions.lifecycle(made["id"], "subscriptionRemoved") == 202
    assert daemon.requested == [SOURCE, SOURCE]
    daemon.subscriptions.step()
    [again] = graph.subscriptions.of(ASHA)
    assert again["id"] != made["id"]
    assert [s.id for s in daemon.subscriptions.subscriptions()] == [again["id"]]


# --------------------------------------------------------------------------- failures


def test_failing_subscriptions_tell_an_admin_once(daemon: Daemon, graph: FakeGraph) -> None:
    """Graph refusing the subscription is retried with a growing pause; after three failures
    an admin notice is queued, once, saying polling still works."""
    graph.subscriptions.validate = True
    graph.fail_next[("POST", "/v1.0/subscriptions")] = [(403, {})] * 6
    waits = []
    for _ in range(FAILURES_BEFORE_NOTICE + 2):
        waits.append(daemon.subscriptions.step())
        daemon.clock.advance(timedelta(hours=1))
    assert waits[0] == pytest.approx(60, abs=1) and waits[1] == pytest.approx(120, abs=1)
    assert len(daemon.told) == 1
    _key, subject, text = daemon.told[0]
    assert "only seen at each poll" in subject and "still read at every poll" in text
    rows = daemon.service.store.query(
        "SELECT recipient_id, subject FROM notifications WHERE kind = 'admin'"
    )
    assert [(r["recipient_id"], r["subject"]) for r in rows] == [("admin@example.org", subject)]
    assert daemon.subscriptions.status()[SOURCE]["failures"] == FAILURES_BEFORE_NOTICE + 2


def test_a_hung_subscription_never_delays_the_polls(daemon: Daemon, graph: FakeGraph) -> None:
    """With Graph never answering the subscription request, the poll still reads the
    calendar at once."""
    event = home_visit("polled", datetime.now(UTC) + timedelta(hours=2))
    graph.add_event(ASHA, event)
    graph.hang_next[("POST", "/v1.0/subscriptions")] = 1
    daemon.subscriptions.start()
    assert wait_for(lambda: bool(graph.hung), 2.0)
    polls = Polls(daemon.reads.read, [SOURCE], timedelta(minutes=5))
    try:
        assert wait_for(lambda: event["iCalUId"] in daemon.visit_uids(), 2.0)
    finally:
        polls.shutdown()
        daemon.subscriptions.stop(timeout=0.5)
        graph.release_hung()


# --------------------------------------------------------------------------- the read queue


def test_reads_of_one_source_never_overlap_and_none_is_lost() -> None:
    """Reads asked for during a read make it run once more, never alongside it."""
    running, overlaps, runs = [0], [0], []
    release = threading.Event()

    def sync(name: str) -> None:
        running[0] += 1
        overlaps[0] = max(overlaps[0], running[0])
        runs.append(name)
        release.wait(2)
        running[0] -= 1

    reads = SourceReads(sync, ["a"])
    reads.start()
    try:
        assert reads.request_sync("a") and not reads.request_sync("unknown")
        assert wait_for(lambda: runs == ["a"], 1.0)
        reads.request_sync("a")
        reads.read("a")  # a poll meanwhile returns at once
        reads.request_sync("a")
        assert wait_for(lambda: not reads._pending, 1.0)  # both taken up by the drain
        release.set()
        assert wait_for(lambda: len(runs) == 2, 1.0)
        time.sleep(0.1)
        assert runs == ["a", "a"] and overlaps[0] == 1
    finally:
        reads.stop()


class _Feed:
    """A change feed in memory that can be made to fail."""

    max_lifetime = timedelta(hours=3)

    def __init__(self) -> None:
        self.made: list[str] = []
        self.gone = False

    def resources(self) -> list[str]:
        return ["users/a/events", "users/b/events"]

    def subscribe(self, resource: str, endpoints: Endpoints, client_state: str,
                  expires: datetime) -> Subscribed:  # fmt: skip
        if resource.startswith("users/a") and self.gone:
            raise SubscriptionGone("no")
        self.made.append(resource)
        return Subscribed(f"id-{len(self.made)}", expires)

    def renew(self, subscription_id: str, expires: datetime) -> datetime:
        return expires

    def delete(self, subscription_id: str) -> None:
        pass


def test_one_calendar_failing_still_subscribes_the_others(tmp_path: Path) -> None:
    """A calendar Graph refuses does not keep the source's other calendars unsubscribed."""
    feed = _Feed()
    feed.gone = True
    clock = FrozenClock(datetime(2026, 11, 23, 12, tzinfo=UTC))
    manager = Subscriptions({"s": feed}, "https://vw.example.org/", tmp_path, clock, print)
    with capture_logs():
        manager.step()
    assert feed.made == ["users/b/events"]
    assert manager.status()["s"]["failures"] == 1
    structlog.reset_defaults()


def test_subscriptions_only_where_graph_can_post(daemon: Daemon) -> None:
    """Change notifications are set up only with [web] on, an HTTPS public_base_url and a
    source with a change feed; otherwise polling alone reads, as before."""
    config = daemon.service.config
    feeds = daemon.subscriptions.feeds
    https = replace(config, daemon=replace(config.daemon, public_base_url="https://vw.example.org"))
    web_off = replace(https, web=replace(https.web, enabled=False))
    made = subscriptions_for(https, feeds, daemon.clock, print)
    assert made is not None and made.endpoints.notify_url == "https://vw.example.org/graph/notify"
    assert subscriptions_for(config, feeds, daemon.clock, print) is None  # plain http
    assert subscriptions_for(web_off, feeds, daemon.clock, print) is None
    assert subscriptions_for(https, {}, daemon.clock, print) is None


# --------------------------------------------------------------------------- the daemon


def test_the_running_daemon_subscribes_reads_on_notice_and_unsubscribes_on_stop(
    graph: FakeGraph, tmp_path: Path
) -> None:
    """Started as `visitwatch run` starts it (https public_base_url, a TLS proxy in front
    forwarding /graph/* to the loopback pages), the daemon subscribes Asha's calendar, reads
    it within a second of a notification, and deletes the subscription when it stops."""
    graph.subscriptions.validate = False  # the proxy's https address is not reachable here
    port = free_port()
    sources = toml_table(
        "sources",
        {
            "name": SOURCE,
            "type": "graph",
            **graph.config_table("VW_FAKE_GRAPH_SECRET", mailboxes=[ASHA]),
        },
    )
    config = tmp_path / "visitwatch.toml"
    config.write_text(
        '[daemon]\ndatabase = "visitwatch.db"\npoll_interval = "1h"\n'
        'public_base_url = "https://visitwatch.example.org"\n'
        f"[web]\nenabled = true\nport = {port}\n"
        + STAFF
        + "\n"
        + sources
        + '\n[[channels]]\nname = "outbox"\ntype = "outbox"\npath = "outbox.jsonl"\n'
        + '\n[policy]\npreset = "pan-lancashire"\n',
        encoding="utf-8",
    )
    service = Service(load_config(config))
    subscriptions = service.subscriptions
    assert subscriptions is not None
    service.start()
    try:
        live = lambda: subscriptions.status().get(SOURCE, {}).get("subscriptions")  # noqa: E731
        assert wait_for(lambda: live() == 1, 5.0)
        [made] = graph.subscriptions.of(ASHA)
        assert made["notificationUrl"] == "https://visitwatch.example.org/graph/notify"
        assert wait_for(lambda: service.store.one("SELECT 1 FROM sources") is not None, 5.0)
        event = home_visit("booked-late", datetime.now(UTC) + timedelta(hours=2))
        graph.add_event(ASHA, event)
        local = made["notificationUrl"].replace(
            "https://visitwatch.example.org", f"http://127.0.0.1:{port}"
        )
        graph.subscriptions.active[made["id"]]["notificationUrl"] = local
        assert graph.subscriptions.notify(ASHA, "created", "booked-late") == [202]
        uids = lambda: {v.uid for v in service.watcher.visits.of_source(SOURCE)}  # noqa: E731
        assert wait_for(lambda: event["iCalUId"] in uids(), 2.0)
    finally:
        assert service.stop_loops(timeout=5.0)
        service.close()
    assert graph.subscriptions.active == {}
