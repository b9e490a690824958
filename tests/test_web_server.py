"""The pages' real server on loopback: bounds, rate limit, a busy port, and the daemon's
loops going on whatever the clients do."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import World, home_visit
from tests.daemon_process import wait_for
from tests.web_world import enable_web
from visitwatch.connectors.outbox import read_outbox
from visitwatch.daemon import demo
from visitwatch.daemon.clock import SystemClock
from visitwatch.daemon.config import load_config
from visitwatch.daemon.service import Service
from visitwatch.daemon.web.server import PagesUnavailable, RateLimiter, WebServer


def _get(port: int, path: str, **headers: str) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path, headers=headers)
    return connection.getresponse()


@contextmanager
def _serving(world: World, **web: object) -> Iterator[WebServer]:
    enable_web(world, **web)
    server = WebServer(world.service().web_context())
    server.start()
    try:
        yield server
    finally:
        assert server.stop(5)


def test_the_real_server_answers_on_loopback(world: World) -> None:
    """waitress serves /healthz and /metrics on the configured loopback port."""
    world.write_calendar()
    with _serving(world) as server:
        health = _get(server.port, "/healthz")
        assert health.status == 503  # no loops run in this test: it says so
        assert "loops are not running" in json.loads(health.read())["reasons"][0]
        metrics = _get(server.port, "/metrics")
        assert metrics.status == 200
        assert b"visitwatch_visits" in metrics.read()
        assert health.getheader("Server") == "visitwatch"


def test_an_oversized_body_is_refused_with_a_plain_413(world: World) -> None:
    """A body over [web] max_body is refused before it is read: 413, no stack trace."""
    world.write_calendar()
    with _serving(world, max_body=1024) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("POST", "/healthz", body=b"x" * 50_000)
        answer = connection.getresponse()
        text = answer.read().decode()
        assert answer.status == 413
        assert "Too Large" in text and "Traceback" not in text


def test_a_client_over_the_rate_limit_gets_a_plain_429(world: World) -> None:
    """Past [web] rate_limit requests a minute one client gets 429 and Retry-After; another
    client (another address behind the proxy) is still served."""
    world.write_calendar()
    with _serving(world, rate_limit=5) as server:
        codes = [_get(server.port, "/metrics").status for _ in range(5)]
        assert codes == [200] * 5
        refused = _get(server.port, "/metrics")
        page = refused.read().decode()
        assert refused.status == 429
        assert int(refused.getheader("Retry-After") or 0) >= 1
        assert "Too many requests" in page and "Traceback" not in page
        other = _get(server.port, "/metrics", **{"X-Forwarded-For": "203.0.113.9"})
        assert other.status == 200


def test_the_rate_limiter_refills_and_keeps_a_bounded_table() -> None:
    """Tokens come back at rate_limit per minute; the table never holds more than its bound."""
    now = [0.0]
    limiter = RateLimiter(60, max_clients=3, clock=lambda: now[0])
    assert [limiter.wait("a") for _ in range(60)] == [0.0] * 60
    assert limiter.wait("a") == pytest.approx(1.0)
    now[0] += 1.0
    assert limiter.wait("a") == 0.0
    for client in "bcdef":
        limiter.wait(client)
    assert len(limiter) == 3


def test_a_port_in_use_is_a_clear_error_naming_the_address(world: World) -> None:
    """Starting on a busy port fails at once with the address and what to do, no thread left."""
    world.write_calendar()
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        enable_web(world, port=port)
        server = WebServer(world.service().web_context())
        threads = threading.active_count()
        with pytest.raises(PagesUnavailable, match=f"127.0.0.1:{port}.*in use.*port"):
            server.start()
        assert threading.active_count() == threads


@contextmanager
def _daemon(world: World, **web: object) -> Iterator[tuple[Service, threading.Thread]]:
    """The real daemon (system clock, 1 s sweeps) running in a thread, stopped after."""
    world.daemon += 'sweep_interval = "1s"\n'
    port = enable_web(world, **web)
    service = Service(load_config(world.write_config()), clock=SystemClock())
    world.services.append(service)
    runner = threading.Thread(target=service.run, kwargs={"install_signal_handlers": False})
    runner.start()
    try:
        wait_for(lambda: service.activity.started is not None, 10, "the daemon to start")
        # The loops start first, the pages a moment later (after retention's first run).
        wait_for(lambda: _listening(port), 10, "something to listen on the pages' port")
        service.port = port  # type: ignore[attr-defined]
        yield service, runner
    finally:
        service.stop()
        runner.join(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _due_in(world: World, seconds: float) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    world.write_calendar(
        home_visit(start=now - timedelta(hours=1), end=now + timedelta(seconds=seconds))
    )


def test_a_busy_port_leaves_visits_watched_and_tells_the_admins(world: World) -> None:
    """With the pages' port taken the daemon still sends the reminder, and an admin notice
    names the address."""
    _due_in(world, 2)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with _daemon(world, port=port) as (service, _):
            wait_for(lambda: world.messages("reminder"), 15, "the reminder")
            notices = service.store.query(
                "SELECT text FROM notifications WHERE kind = 'admin' AND subject LIKE '%pages%'"
            )
            assert notices and f"127.0.0.1:{port}" in notices[0]["text"]


def _slow_client(port: int) -> socket.socket:
    """A client that sends half a request line and then nothing (a phone on a bad signal)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST /v/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900\r\n\r\nabc")
    return sock


def test_slow_clients_do_not_stall_the_sweep_or_delivery(world: World) -> None:
    """Many clients holding half-sent requests open (more than the server's threads): the
    reminder still goes out at its deadline and /healthz still answers."""
    _due_in(world, 3)
    with _daemon(world, threads=2) as (service, _):
        slow = [_slow_client(service.port) for _ in range(20)]  # type: ignore[attr-defined]
        try:
            wait_for(lambda: world.messages("reminder"), 15, "the reminder")
            answers: list[tuple[int, bytes]] = []

            def healthy() -> bool:
                health = _get(service.port, "/healthz")  # type: ignore[attr-defined]
                answers.append((health.status, health.read()))
                return health.status == 200

            # It answers at once; "healthy" may wait for the first pass of every loop.
            wait_for(healthy, 10, f"/healthz 200 (answers: {answers[-3:]})")
        finally:
            for sock in slow:
                sock.close()


def test_stopping_the_daemon_stops_the_server(world: World) -> None:
    """After the daemon stops, nothing listens on the pages' port any more."""
    world.write_calendar()
    with _daemon(world) as (service, runner):
        port = service.port  # type: ignore[attr-defined]
        assert _get(port, "/healthz").status in (200, 503)
    assert not runner.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_the_demo_serves_working_links(tmp_path: Path) -> None:
    """`visitwatch demo` serves its pages on loopback: the links it prints and the links in
    its messages open."""
    config_file = demo.prepare(tmp_path / "demo")
    checkin, ack = demo.first_links(config_file)
    service = Service(load_config(config_file))
    runner = threading.Thread(target=service.run, kwargs={"install_signal_handlers": False})
    runner.start()
    try:
        outbox = tmp_path / "demo" / "outbox.jsonl"
        wait_for(lambda: outbox.exists() and read_outbox(outbox), 15, "the demo's first messages")
        carried = [
            link
            for message in read_outbox(outbox)
            for link in re.findall(r"http://127\.0\.0\.1:\d+/[va]/\S+", message["text"])
        ]
        assert carried, "the demo's messages carry links"
        for link in [checkin, ack, *carried]:
            url = urlsplit(link)
            assert _get(url.port or 80, url.path).status == 200, link
    finally:
        service.stop()
        runner.join(10)
    service.close()
