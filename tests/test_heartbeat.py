"""The external heartbeat: a loopback monitor standing in for Healthchecks and Uptime Kuma."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from structlog.testing import capture_logs

from tests.conftest import World, home_visit, ics_calendar
from tests.daemon_process import OUTBOX_CHANNEL, Daemon, channel_block, wait_for, write_config
from tests.hung_server import HungServer
from tests.scripted import Script
from visitwatch.connectors.outbox import read_outbox
from visitwatch.daemon.clock import FrozenClock
from visitwatch.daemon.config import load_config
from visitwatch.daemon.heartbeat import (
    FAIL,
    META_ERROR,
    META_FAILING_SINCE,
    META_LAST_OK,
    START,
    SUCCESS,
    Heartbeat,
    Judgement,
    ping_request,
    style_of,
)
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import Store

CHECK = "5a1f0a52-93c1-4bd2-9d7e-2f4c4b8a0e11"  # the secret part of a ping URL


@dataclass
class Ping:
    method: str
    path: str
    query: dict[str, list[str]]
    body: str


@dataclass
class Monitor:
    """What the monitor received, and what it answers."""

    port: int = 0
    answer: bytes = b"OK"
    pings: list[Ping] = field(default_factory=list)

    def url(self, path: str = f"/ping/{CHECK}") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def paths(self) -> list[str]:
        return [p.path for p in self.pings]


@contextmanager
def running_monitor() -> Iterator[Monitor]:
    monitor = Monitor()

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            parts = urlsplit(self.path)
            monitor.pings.append(
                Ping(self.command, parts.path, parse_qs(parts.query), body.decode())
            )
            self.send_response(200)
            self.send_header("Content-Length", str(len(monitor.answer)))
            self.end_headers()
            self.wfile.write(monitor.answer)

        do_GET = do_POST = _record

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    monitor.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield monitor
    finally:
        server.shutdown()
        server.server_close()


def test_healthchecks_pings_are_start_success_and_fail_with_the_reason():
    """Healthchecks' protocol: /start, the bare URL, /fail with the reason as the body."""
    url = f"https://hc-ping.com/{CHECK}/"
    assert style_of(url, "auto") == "healthchecks"
    start, success, fail = (
        ping_request(url, "auto", k, r) for k, r in ((START, ""), (SUCCESS, ""), (FAIL, "stuck"))
    )
    assert start.full_url == f"https://hc-ping.com/{CHECK}/start"
    assert success.full_url == f"https://hc-ping.com/{CHECK}"
    assert fail.full_url == f"https://hc-ping.com/{CHECK}/fail" and fail.data == b"stuck"


def test_uptime_kuma_push_is_up_with_ok_and_down_with_the_reason():
    """A /api/push/ URL is Uptime Kuma's push monitor: status=up&msg=OK, status=down&msg=..."""
    url = "https://kuma.example.org/api/push/tok3n?status=up&msg=OK&ping="
    assert style_of(url, "auto") == "uptime-kuma"
    up = urlsplit(ping_request(url, "auto", SUCCESS).full_url)
    down = urlsplit(ping_request(url, "auto", FAIL, "no channel can deliver").full_url)
    assert up.path == "/api/push/tok3n" and parse_qs(up.query)["status"] == ["up"]
    assert parse_qs(up.query)["msg"] == ["OK"]
    assert parse_qs(down.query) == {"status": ["down"], "msg": ["no channel can deliver"]}


def test_a_refusing_monitor_is_logged_once_per_episode_and_kept_for_status(tmp_path: Path):
    """Uptime Kuma's {"ok": false} is a failure: one log line, the record says since when."""
    store = Store(tmp_path / "visitwatch.db")
    judged = Judgement(None, (1.0, 1.0))
    with running_monitor() as monitor, capture_logs() as logs:
        monitor.answer = b'{"ok":false,"msg":"Monitor not found or not active."}'
        url = monitor.url("/api/push/tok3n")
        beat = Heartbeat(url, "auto", 0.0, lambda: judged, store, FrozenClock(datetime.now(UTC)))
        for _ in range(3):
            judged = Judgement(None, (judged.progress[0] + 1, judged.progress[1] + 1))
            beat.beat()
        assert len(monitor.pings) == 3 and monitor.pings[0].query["status"] == ["up"]
        assert [e["event"] for e in logs].count("heartbeat_failing") == 1
        assert store.get_meta(META_FAILING_SINCE)
        assert "Monitor not found" in (store.get_meta(META_ERROR) or "")
        assert "tok3n" not in str(logs) and "tok3n" not in (store.get_meta(META_ERROR) or "")
        monitor.answer = b'{"ok":true}'
        judged = Judgement(None, (9.0, 9.0))
        beat.beat()
        assert [e["event"] for e in logs].count("heartbeat_delivering_again") == 1
        assert store.get_meta(META_FAILING_SINCE) == "" and store.get_meta(META_LAST_OK)
    store.close()


def test_success_pings_wait_for_new_passes_of_both_loops(tmp_path: Path):
    """No success ping while a loop has not finished a pass since the last one."""
    progress = (1.0, 1.0)
    with running_monitor() as monitor:
        clock = FrozenClock(datetime.now(UTC))
        beat = Heartbeat(monitor.url(), "auto", 0.0, lambda: Judgement(None, progress), None, clock)
        beat.beat()
        beat.beat()  # the same passes: nothing new to vouch for
        progress = (2.0, 1.0)  # the sweep moved on, delivery did not
        beat.beat()
        progress = (3.0, 2.0)
        beat.beat()
    assert monitor.paths() == [f"/ping/{CHECK}"] * 2


FAST = 'sweep_interval = "1s"\nheartbeat_every = "1s"\n'
PAGER = channel_block("pager", "scripted")


def _daemon_thread(service: Service) -> threading.Thread:
    thread = threading.Thread(target=service.run, kwargs={"install_signal_handlers": False})
    thread.start()
    return thread


def test_a_daemon_pings_start_then_success_and_fail_while_dispatch_is_stuck(
    world: World, scripted_channels: dict[str, Script], monkeypatch: pytest.MonkeyPatch
):
    """/start, then success pings; a stuck delivery loop turns them into /fail with why."""
    with running_monitor() as monitor, capture_logs() as logs:
        world.channels = PAGER
        world.daemon = FAST + f'heartbeat_url = "{monitor.url()}"\n'
        world.write_calendar(home_visit())
        service = Service(load_config(world.write_config()))
        service.stall_limit = 1.0
        stuck, release = threading.Event(), threading.Event()
        real_dispatch = service.dispatcher.dispatch

        def dispatch(wait: float | None = None):  # type: ignore[no-untyped-def]
            if stuck.is_set():
                release.wait(60)  # a delivery loop that stopped making progress
            return real_dispatch(wait)

        monkeypatch.setattr(service.dispatcher, "dispatch", dispatch)
        thread = _daemon_thread(service)
        try:
            wait_for(lambda: monitor.paths().count(f"/ping/{CHECK}") >= 2, 10, "success pings")
            assert monitor.paths()[0] == f"/ping/{CHECK}/start"
            stuck.set()
            service._loops["dispatch"].wake()
            # A /fail naming the stuck loop (on a loaded machine the sweep may also be named
            # first: with a 1 s limit it can lag too).
            stuck_named = "dispatch loop has made no progress"
            wait_for(
                lambda: any(
                    p.path.endswith("/fail") and stuck_named in p.body for p in monitor.pings
                ),
                10,
                "a /fail ping naming the delivery loop",
            )
            fails = [p for p in monitor.pings if p.path.endswith("/fail")]
            assert all("Asha" not in p.body for p in fails)  # no personal data for the monitor
            failed_at = len(monitor.pings)
            release.set()
            stuck.clear()
            wait_for(lambda: f"/ping/{CHECK}" in monitor.paths()[failed_at:], 10, "success again")
        finally:
            release.set()
            service.stop()
            thread.join(15)
    assert CHECK not in str(logs)  # the ping URL's secret is never logged


def test_a_hung_monitor_delays_no_reminder(tmp_path: Path):
    """With the monitor accepting and never answering, the reminder still goes out at once."""
    now = datetime.now(UTC).replace(microsecond=0)
    (tmp_path / "calendar.ics").write_text(
        ics_calendar(home_visit(start=now - timedelta(minutes=30), end=now - timedelta(seconds=5))),
        encoding="utf-8",
    )
    with HungServer() as hung:
        config = write_config(
            tmp_path,
            daemon=f'sweep_interval = "1s"\nheartbeat_url = "http://127.0.0.1:{hung.port}/{CHECK}"\n',
            channels=OUTBOX_CHANNEL,
        )
        daemon = Daemon(config)
        try:
            daemon.start()
            wait_for(lambda: bool(hung.connections), 15, "the /start ping to hang")
            outbox = tmp_path / "outbox.jsonl"
            # The ping waits up to 10 s for an answer; the reminder must not wait for it.
            wait_for(
                lambda: (
                    outbox.exists() and any(m["kind"] == "reminder" for m in read_outbox(outbox))
                ),
                8,
                f"the reminder while the monitor hangs:\n{daemon.log_tail()}",
            )
        finally:
            daemon.close()
    assert CHECK not in daemon.log.read_text()
