"""Hostile probes of the pages (issue 9): what a forger, a replayer or a careless proxy can
and cannot do. Passing tests pin the safe behaviour; strict xfails are open bugs."""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import T0, World, home_visit
from tests.web_client import WebWorld, web_world
from tests.web_world import enable_web
from visitwatch.core.visit_state import VisitState
from visitwatch.daemon.config import ConfigError, load_config
from visitwatch.daemon.config_types import Directory
from visitwatch.daemon.visits import Visit
from visitwatch.daemon.web.links import Purpose
from visitwatch.daemon.web.server import (
    CONNECTION_LIMIT,
    PER_CLIENT_CONNECTIONS,
    WebServer,
    build_app,
)
from visitwatch.daemon.web.sessions import COOKIE

ASHA = "asha.khan@example.org"
MARIA = "maria.jones@example.org"
START = T0 + timedelta(hours=1)  # 13:00; back by 14:00
HOSTILE = '<script>alert("x")</script> O\'Brien &amp; "Sons" \u202eevil\u200b'


def at(ww: WebWorld, minutes_after_start: int) -> None:
    ww.at(START + timedelta(minutes=minutes_after_start))
    ww.tick()


def current(ww: WebWorld) -> Visit:
    return ww.service.watcher.visits.current(ww.visit_id())


def record(ww: WebWorld) -> tuple[Any, ...]:
    """What a page could have changed: the visit row and the checkins."""
    visit = current(ww)
    rows = ww.service.store.query("SELECT action FROM checkins ORDER BY id")
    return (visit.state, visit.deadline, visit.acknowledged_by, tuple(r["action"] for r in rows))


@pytest.fixture
def ww(world: World) -> WebWorld:
    """Asha's 13:00-14:00 visit, synced, the clock at 13:30 (under way)."""
    web = web_world(world)
    world.write_calendar(home_visit())
    web.tick()
    at(web, 30)
    return web


# ------------------------------------------------------------------ links


def _mangled(token: str) -> list[str]:
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    return [
        token[: len(token) // 2],  # truncated in a message
        flipped,  # one character altered
        token + "A" * 20_000,  # huge
        "%2e%2e",  # ..
        "gAAAAA" + "A" * 200,  # Fernet-shaped noise
    ]


def test_mangled_links_and_wrong_methods_change_nothing(ww: WebWorld) -> None:
    """Truncated, altered, huge or noise tokens, and GET/HEAD/PUT/DELETE on the button
    routes, never act and never echo the token."""
    link = ww.link(Purpose.CHECKIN, ASHA)
    token = link.removeprefix("/v/")
    before = record(ww)
    for bad in _mangled(token):
        for path in (f"/v/{bad}", f"/a/{bad}"):
            page = ww.client.get(path)
            assert page.status_code in (403, 404), (bad[:40], page.status_code)
            assert bad not in page.text or len(bad) < 8
        post = ww.client.post(f"/v/{bad}/checkin", data={"csrf": ww.csrf(link)})
        assert post.status_code in (403, 404)
    for method in ("get", "put", "delete", "patch"):
        answer = getattr(ww.client, method)(f"{link}/checkin")
        assert answer.status_code == 405, (method, answer.status_code)
    assert ww.client.head(link).status_code == 200
    assert ww.client.open(f"{link}/checkin", method="OPTIONS").status_code == 200
    assert record(ww) == before


def test_a_form_token_from_another_page_is_refused(ww: WebWorld) -> None:
    """The CSRF token of the manager's page, or of another visit's page, does not work on
    the worker's page, and the other way round."""
    checkin, ack = ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)
    before = record(ww)
    assert ww.client.post(f"{checkin}/checkin", data={"csrf": ww.csrf(ack)}).status_code == 400
    assert ww.client.post(f"{ack}/safe", data={"csrf": ww.csrf(checkin)}).status_code == 400
    assert ww.client.post(f"{ack}/ack", data={"csrf": "x" * 5000}).status_code == 400
    assert record(ww) == before


def test_a_page_failure_shows_no_trace_or_token(ww: WebWorld, monkeypatch: Any) -> None:
    """An unexpected error is a plain 500 page: no traceback, no exception text, no token."""
    link = ww.link(Purpose.CHECKIN, ASHA)
    ww.app.testing = False  # as served: errors go to the handler, not the test

    def broken(*_: Any) -> None:
        raise RuntimeError("secret-detail-in-the-exception")

    monkeypatch.setattr(ww.service.watcher.visits, "get", broken)
    page = ww.client.get(link)
    assert page.status_code == 500
    assert "Nothing was changed" in page.text
    for leak in ("Traceback", "secret-detail", link.removeprefix("/v/")):
        assert leak not in page.text


# ------------------------------------------------------------------ what pages show


def test_markup_from_the_calendar_is_shown_as_text(world: World) -> None:
    """A subject, address and risk assessment carrying <script>, quotes and entities are
    escaped on the worker's, the manager's and the result pages."""
    ww = web_world(world)
    world.write_calendar(
        home_visit(
            description=f"Risk assessment: complete {HOSTILE}\nMobile: 07700 900123",
            location=f"1 {HOSTILE} Street",
        ).replace("SUMMARY:Home visit - Carter family", f"SUMMARY:Home visit {HOSTILE}")
    )
    ww.tick()
    at(ww, 80)
    checkin, ack = ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)
    pages = [ww.client.get(checkin).text, ww.client.get(ack).text, ww.press(ack, "safe")]
    for page in pages:
        assert "<script>" not in page
        assert "&lt;script&gt;" in page
    assert 'href="https://www.google.com/maps/search/?api=1&amp;query=1+%3Cscript%3E' in pages[1]


def test_a_private_entry_stays_private_on_the_result_and_help_pages(world: World) -> None:
    """CLASS:PRIVATE: the subject is off the help confirmation and every result page."""
    ww = web_world(world)
    world.write_calendar(home_visit(extra="CLASS:PRIVATE"))
    ww.tick()
    at(ww, 30)
    checkin, ack = ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)
    shown = [ww.client.get(f"{checkin}/help").text, ww.press(checkin, "extend", minutes="15")]
    shown.append(ww.press(checkin, "help"))
    shown.append(ww.press(ack, "ack"))
    shown.append(ww.press(ack, "safe"))
    for page in shown:
        assert "Carter" not in page


# ------------------------------------------------------------------ logs and server


def test_no_token_name_or_address_in_the_logs(ww: WebWorld) -> None:
    """Viewing and pressing every kind of button logs visit ids only: no link token, no
    name, no address, above debug."""
    checkin, ack = ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)
    with capture_logs() as logs:
        ww.press(checkin, "extend", minutes="15")
        ww.press(checkin, "help")
        ww.press(ack, "ack")
        ww.client.get("/v/garbage-token-value")
        ww.press(ack, "safe")
        ww.tick()
    assert {"page_action", "help_requested"} <= {e["event"] for e in logs}
    text = repr([e for e in logs if e.get("log_level") != "debug"])
    for secret in (checkin.removeprefix("/v/")[:24], ack.removeprefix("/a/")[:24], "garbage"):
        assert secret not in text
    for personal in ("Asha", "Maria", "Sam Webster", "Brook Street", "Carter", "@example"):
        assert personal not in text, personal


def test_graph_notifications_are_never_rate_limited(world: World) -> None:
    """With the page rate limit spent, Graph's notification posts still get through
    (a refused one would only be seen at the next poll)."""
    world.write_calendar()
    enable_web(world, rate_limit=2)
    app = build_app(world.service().web_context())
    client = app.test_client()
    statuses = [client.get("/healthz").status_code for _ in range(4)]
    assert statuses[-1] == 429
    assert all(client.post("/graph/notify", json={}).status_code != 429 for _ in range(20))


def _serve(world: World, **web: object) -> WebServer:
    world.write_calendar()
    enable_web(world, **web)
    server = WebServer(world.service().web_context())
    server.start()
    return server


@pytest.fixture
def served(world: World) -> Iterator[WebServer]:
    """The pages with clients connecting directly (no proxy in front)."""
    server = _serve(world, proxy="none")
    yield server
    assert server.stop(5)


def _half_sent(port: int, source: str = "127.0.0.2") -> socket.socket:
    """A connection from ``source`` (any 127/8 address is this machine) that sends half a
    request and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
    return sock


def _closed_by_server(socks: list[socket.socket]) -> list[socket.socket]:
    """Those of ``socks`` the server has closed (within a second; none of them sent a
    whole request, so any that can be read from was closed)."""
    time.sleep(1.0)
    readable, _, _ = select.select(socks, [], [], 0)
    closed = []
    for sock in readable:
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            data = b""
        if data == b"":
            closed.append(sock)
    return closed


def _healthz_status(port: int, source: str = "127.0.0.1") -> int:
    """The status /healthz answers from ``source`` within 2 s (0: no answer)."""
    connection = http.client.HTTPConnection(
        "127.0.0.1", port, timeout=2, source_address=(source, 0)
    )
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    except (TimeoutError, ConnectionError):
        return 0
    finally:
        connection.close()


def test_one_slow_client_cannot_lock_everyone_out_of_the_pages(served: WebServer) -> None:
    """A manager's page still opens while one client tries to hold every connection open;
    that client's connections past its cap are closed at once."""
    slow = [_half_sent(served.port) for _ in range(CONNECTION_LIMIT + 5)]
    try:
        assert _healthz_status(served.port) == 503  # answered (no loops here: unhealthy)
        closed = _closed_by_server(slow)
        assert len(slow) - len(closed) == PER_CLIENT_CONNECTIONS
        assert closed == slow[PER_CLIENT_CONNECTIONS:]  # the first ones are served
    finally:
        for sock in slow:
            sock.close()


def test_a_proxy_in_front_is_not_capped_as_one_client(world: World) -> None:
    """Behind a reverse proxy every client comes from its address: more connections than
    one client's cap stay open, and the next request is still answered."""
    server = _serve(world)  # listening on loopback, proxy "auto": the peer is a proxy
    try:
        held = [_half_sent(server.port, "127.0.0.1") for _ in range(PER_CLIENT_CONNECTIONS + 10)]
        try:
            assert _healthz_status(server.port) == 503
            assert _closed_by_server(held) == []
        finally:
            for sock in held:
                sock.close()
    finally:
        assert server.stop(5)


# ------------------------------------------------------------------ open bugs


def test_an_old_link_does_not_act_on_a_reopened_visit(ww: WebWorld) -> None:
    """Checked in, then moved to tomorrow: yesterday's link must not check in tomorrow's
    visit (a back-button or history replay would close a visit nobody checked in from)."""
    link = ww.link(Purpose.CHECKIN, ASHA)
    csrf = ww.csrf(link)  # the form as it was on the phone
    ww.press(link, "checkin")
    tomorrow = START + timedelta(days=1, hours=-3)  # 10:00 tomorrow, within the link's life
    ww.world.write_calendar(home_visit(start=tomorrow, end=tomorrow + timedelta(hours=1)))
    ww.tick()
    assert current(ww).state is VisitState.BOOKED  # re-opened: watched afresh
    ww.at(tomorrow + timedelta(minutes=70))
    ww.tick()
    assert current(ww).state is VisitState.DUE
    answer = ww.client.post(f"{link}/checkin", data={"csrf": csrf})
    assert answer.status_code == 410 and "earlier booking" in answer.text
    assert current(ww).state is VisitState.DUE


def test_an_extension_does_not_cancel_a_help_request(ww: WebWorld) -> None:
    """After "I need help", an "Extend" tap (a slip, or someone else holding the phone) is
    refused with the reason and leaves the help request standing: only a check-in or a
    manager closes it; the page no longer offers Extend."""
    link = ww.link(Purpose.CHECKIN, ASHA)
    ww.press(link, "help")
    assert current(ww).state is VisitState.ESCALATED
    answer = ww.client.post(f"{link}/extend", data={"csrf": ww.csrf(link), "minutes": "60"})
    assert answer.status_code == 409 and "cannot be extended" in answer.text
    visit = current(ww)
    assert visit.help_requested_at is not None
    assert visit.state is VisitState.ESCALATED
    assert "Extend 60 min" not in ww.client.get(link).text


def test_a_person_removed_from_the_directory_cannot_confirm_safe(ww: WebWorld) -> None:
    """As the board does at every click: a manager removed from the staff directory
    (left the organisation) can no longer close a visit from an old alert link."""
    ack = ww.link(Purpose.ACK, MARIA)
    staff = ww.service.watcher.staff
    members = {k: v for k, v in staff.current.members.items() if k != MARIA}
    staff._directory = Directory(members)  # the admin removed her and restarted
    answer = ww.client.get(ack)
    assert answer.status_code == 403
    assert current(ww).state is not VisitState.RESOLVED


# ------------------------------------------------------------------ sessions and races


def test_a_link_token_is_no_board_session(ww: WebWorld) -> None:
    """A check-in or acknowledge link's token set as the board cookie opens nothing (each
    purpose has its own key)."""
    for path in (ww.link(Purpose.CHECKIN, ASHA), ww.link(Purpose.ACK, MARIA)):
        ww.client.set_cookie(COOKIE, path[3:])
        answer = ww.client.get("/board")
        assert answer.status_code == 303 and answer.headers["Location"].endswith("/signin")


def test_an_ack_racing_the_sweeps_escalation_loses_neither(ww: WebWorld) -> None:
    """Maria taps "I'm on it" while the sweep raises the director's rung: both land."""
    ack = ww.link(Purpose.ACK, MARIA)
    csrf = ww.csrf(ack)
    ww.at(START + timedelta(minutes=105))  # 14:45: the director's rung is due
    ww.service.sync_all()
    gate = threading.Barrier(2)
    answers: list[int] = []

    def tap() -> None:
        gate.wait()
        answers.append(ww.client.post(f"{ack}/ack", data={"csrf": csrf}).status_code)

    tapper = threading.Thread(target=tap)
    tapper.start()
    gate.wait()
    ww.service.sweep()
    tapper.join(10)
    assert answers == [303]
    assert current(ww).acknowledged_by == "Maria Jones"
    director = ww.service.store.query(
        "SELECT 1 FROM notifications WHERE recipient_id = ? AND kind != 'acknowledged'",
        ("sam.webster@example.org",),
    )
    assert director, "the director's rung was lost"


@pytest.mark.parametrize(
    ("proxy", "listen", "trusted"),
    [("auto", "127.0.0.1", "*"), ("auto", "0.0.0.0", None), ("none", "127.0.0.1", None),
     ("10.0.0.5", "0.0.0.0", "10.0.0.5")],
)  # fmt: skip
def test_whose_forwarded_address_is_believed(
    world: World, proxy: str, listen: str, trusted: str | None
) -> None:
    enable_web(world, proxy=proxy, listen=listen)
    assert load_config(world.write_config()).web.trusted_proxy() == trusted


def test_a_proxy_that_is_not_an_address_is_a_config_problem(world: World) -> None:
    enable_web(world, proxy="nginx.local")
    with pytest.raises(ConfigError, match=r"web\.proxy.*not an IP address"):
        load_config(world.write_config())
