"""Delivery never stops silently: lanes per channel, deadlines, poisoned rows, the watchdog."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.calendar_feeds import CalendarFeed
from tests.conftest import T0, World, home_visit, tick
from tests.daemon_process import OUTBOX_CHANNEL, channel_block
from tests.scripted import HANG, OK, PERMANENT, TEMPORARY, Script
from visitwatch.core.notification import NotificationKind
from visitwatch.daemon.config import load_config
from visitwatch.daemon.dispatch import MAX_RETRY, retry_delay
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import ts

DEADLINE = T0 + timedelta(hours=2)
FAST = 'sweep_interval = "1s"\n'

PAGER = channel_block("pager", "scripted")
SLOW_AND_OUTBOX = channel_block("slow", "scripted", fallback="outbox") + OUTBOX_CHANNEL


def _watching(
    world: World, channels: str, *visits: str, daemon: str = "", real_clock: bool = False
) -> Service:
    """A service watching ``visits`` (by default one, due back at DEADLINE) over ``channels``.

    ``real_clock`` for a daemon run in a thread: it sleeps for real, so the visit's times
    must be real too.
    """
    world.channels = channels
    world.daemon = daemon
    world.write_calendar(*(visits or [home_visit()]))
    return Service(load_config(world.write_config())) if real_clock else world.service()


def test_backoff_is_capped_before_it_can_overflow():
    """After hours (or years) of failures the retry delay stays at most five minutes."""
    for attempts in (1, 5, 44, 1_000, 10**9):
        assert timedelta(0) < retry_delay(attempts) <= MAX_RETRY * 1.1


def test_hours_of_failure_on_one_channel_never_stop_the_others(
    world: World, scripted_channels: dict[str, Script]
):
    """A row deep into its retries (attempt 44 overflowed before) neither crashes nor blocks."""
    service = _watching(world, SLOW_AND_OUTBOX)
    scripted_channels["slow"].set(TEMPORARY)
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    with service.store.transaction() as conn:
        conn.execute("UPDATE notifications SET attempts = 43 WHERE channel = 'slow'")
    world.at(DEADLINE + timedelta(hours=4))
    tick(service)
    assert {m["kind"] for m in world.messages()} >= {"reminder", "overrun", "escalation"}
    pending = service.store.query(
        "SELECT attempts, next_attempt_at FROM notifications WHERE channel = 'slow'"
        " AND status = 'pending'"
    )
    assert any(r["attempts"] >= 44 for r in pending)  # still retried, never given up on
    assert all(r["next_attempt_at"] for r in pending)


def test_an_unreadable_row_is_failed_and_reported_and_never_blocks_the_queue(
    world: World, scripted_channels: dict[str, Script]
):
    """A poisoned notification row is taken out of the queue; the alert behind it goes out."""
    service = _watching(world, OUTBOX_CHANNEL)
    world.at(DEADLINE - timedelta(minutes=1))
    tick(service)
    with service.store.transaction() as conn:
        conn.execute(
            "INSERT INTO notifications (key, visit_id, kind, recipient_id, recipient_name,"
            " channel, subject, text, created, next_attempt_at) VALUES"
            " ('poison', NULL, 'overrun', 'x', 'X', 'outbox', 's', 't', 'not a time', ?)",
            (ts(T0),),
        )
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)
    assert [m["kind"] for m in world.messages()] == ["reminder"]
    poison = service.store.one("SELECT * FROM notifications WHERE key = 'poison'")
    assert poison["status"] == "failed" and "could not be read" in poison["last_error"]
    tick(service)  # the health check tells an admin about the failed alert
    notices = world.messages("admin")
    assert notices and any(f"#{poison['id']}" in n["text"] for n in notices)


def test_a_hung_channel_delays_no_other_and_its_alerts_reach_the_fallback(
    world: World, scripted_channels: dict[str, Script]
):
    """A server that never answers holds only its own lane; past the deadline, fallback + notice."""
    service = _watching(world, SLOW_AND_OUTBOX)
    scripted_channels["slow"].set(HANG)
    world.at(DEADLINE + timedelta(minutes=16))
    service.sync_all()
    service.sweep()
    started = time.monotonic()
    report = service.dispatch(wait=1.0)
    assert time.monotonic() - started < 10  # a hang check, not a benchmark
    assert {m["kind"] for m in world.messages()} == {"reminder", "overrun"}
    assert all(m["channel"] == "outbox" for m in world.messages())
    assert report.sent == 2  # the outbox copies; the hung lane's are still in flight

    world.clock.advance(timedelta(minutes=3))  # past the delivery deadline (2 min)
    service.dispatch(wait=1.0)
    fallbacks = service.store.query("SELECT * FROM notifications WHERE fallback_of IS NOT NULL")
    assert {r["kind"] for r in fallbacks} == {"reminder", "overrun"}
    assert all(r["status"] == "sent" and r["channel"] == "outbox" for r in fallbacks)
    notices = world.messages("admin")
    assert len(notices) == 1  # to the director (no admin role here), on another channel
    assert {n["recipient"]["id"] for n in notices} == {"sam.webster@example.org"}
    assert "'slow' is not delivering" in notices[0]["subject"]
    assert "Maria" not in notices[0]["text"]  # who was alerted is in the record, not here

    world.clock.advance(timedelta(minutes=3))
    service.dispatch(wait=1.0)
    assert len(world.messages("admin")) == 1  # once per outage, not once per pass

    scripted_channels["slow"].set(OK)  # the server answers again (the hung send fails)
    _wait_until(service.dispatcher.idle)
    world.clock.advance(timedelta(minutes=1))  # the failed send's retry falls due
    service.dispatch(wait=2.0)
    accepted = scripted_channels["slow"].accepted
    assert {m.kind for m in accepted} >= {"reminder", "overrun"}  # the backlog drained
    back = "'slow' is delivering again"
    # Announced once it has delivered for the recovery hold with no failure of its own.
    assert not any(back in n["subject"] for n in world.messages("admin"))
    world.clock.advance(service.dispatcher.outages.recovery_hold)
    service.dispatch(wait=2.0)
    assert any(back in n["subject"] for n in world.messages("admin"))


def _wait_until(condition, seconds: float = 10) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _daemon_thread(service: Service) -> threading.Thread:
    thread = threading.Thread(target=service.run, kwargs={"install_signal_handlers": False})
    thread.start()
    return thread


def test_stop_finishes_in_seconds_while_a_channel_hangs(
    world: World, scripted_channels: dict[str, Script]
):
    """SIGTERM's path (stop) returns promptly even with a send that never returns."""
    now = datetime.now(UTC).replace(microsecond=0)  # the daemon runs on the real clock
    due_at_once = home_visit(start=now - timedelta(hours=1), end=now - timedelta(minutes=1))
    service = _watching(world, SLOW_AND_OUTBOX, due_at_once, daemon=FAST, real_clock=True)
    scripted_channels["slow"].set(HANG)
    thread = _daemon_thread(service)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not scripted_channels["slow"].attempts:
            time.sleep(0.05)
        assert scripted_channels["slow"].attempts, "the hung channel was never tried"
    finally:
        started = time.monotonic()
        service.stop()  # also when the assertion failed: a daemon left running hangs pytest
        thread.join(15)
    assert not thread.is_alive()
    assert time.monotonic() - started < 8


def test_watchdog_is_pinged_only_while_delivery_makes_progress(
    world: World, scripted_channels: dict[str, Script], tmp_path: Path, monkeypatch
):
    """With the dispatch loop stuck, WATCHDOG=1 stops (systemd restarts us) and an admin hears."""
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    service = _watching(world, PAGER, daemon=FAST, real_clock=True)
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
        received = _datagrams(sock, seconds=1.5)
        assert "READY=1" in received and "WATCHDOG=1" in received
        stuck.set()
        service._loops["dispatch"].wake()
        _datagrams(sock, seconds=2.0)  # the limit passes
        assert "WATCHDOG=1" not in _datagrams(sock, seconds=2.0)
        notices = [m for m in scripted_channels["pager"].accepted if m.kind == "admin"]
        assert notices and "delivery has stopped" in notices[0].subject
    finally:
        release.set()
        service.stop()
        thread.join(15)
        sock.close()


def _datagrams(sock: socket.socket, seconds: float) -> list[str]:
    got: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            got.append(sock.recv(256).decode())
        except TimeoutError:
            continue
    return got


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX system")
def test_outbox_writes_a_burst_in_one_fsync(world: World, monkeypatch):
    """A burst of messages to the outbox costs one fsync, not one per line."""
    calls: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    world.write_calendar(*(home_visit(f"visit-{i}") for i in range(30)))
    service = world.service()
    world.at(DEADLINE + timedelta(seconds=1))
    service.sync_all()
    service.sweep()
    calls.clear()
    service.dispatch()
    assert len(world.messages("reminder")) == 30
    assert len(calls) == 1


def test_a_full_disk_still_sends_due_alerts_from_memory_and_the_record_catches_up(
    world: World, scripted_channels: dict[str, Script], monkeypatch
):
    """With the record unwritable, alerts go out once from memory; nothing twice afterwards."""
    service = _watching(world, PAGER + OUTBOX_CHANNEL)
    world.at(DEADLINE - timedelta(minutes=1))
    tick(service)
    pager = scripted_channels["pager"]
    real_transaction = service.store.transaction

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(service.store, "transaction", full)
    world.at(DEADLINE + timedelta(seconds=5))
    for _ in range(3):  # three sweeps while the disk is full
        service.sweep()
        service.dispatch(wait=0.5)
    _wait_until(lambda: len(pager.accepted) >= 2)
    time.sleep(0.2)  # nothing more is on its way
    kinds = sorted(m.kind for m in pager.accepted)
    assert kinds == ["admin", "reminder"]  # each once, however many sweeps
    assert "cannot be written" in next(m for m in pager.accepted if m.kind == "admin").subject
    assert world.messages() == []  # the outbox is a local file: it waits for the disk

    monkeypatch.setattr(service.store, "transaction", real_transaction)  # space freed
    tick(service)
    tick(service)
    assert sorted(m.kind for m in pager.accepted) == ["admin", "reminder"]  # not sent twice
    assert [m["kind"] for m in world.messages()] == ["reminder"]  # the record caught up
    rows = service.store.query("SELECT channel, status FROM notifications WHERE kind = 'reminder'")
    assert sorted((r["channel"], r["status"]) for r in rows) == [
        ("outbox", "sent"),
        ("pager", "sent"),
    ]


def test_a_clock_stepped_back_an_hour_delays_the_sweep_by_one_interval_at_most(
    world: World, scripted_channels: dict[str, Script]
):
    """Loops wait on the monotonic clock: after a step back and forth, the reminder is on time."""
    service = _watching(world, PAGER, daemon=FAST)
    world.at(DEADLINE - timedelta(seconds=30))
    thread = _daemon_thread(service)
    try:
        _wait_until(lambda: service.store.get_meta("last_sweep_at") is not None)
        world.at(DEADLINE - timedelta(hours=1))  # NTP steps the clock back an hour ...
        time.sleep(1.5)
        world.at(DEADLINE + timedelta(seconds=1))  # ... and forward again, past the deadline
        stepped = time.monotonic()
        pager = scripted_channels["pager"]
        _wait_until(lambda: any(m.kind == "reminder" for m in pager.accepted), seconds=10)
        assert time.monotonic() - stepped < 5  # one sweep interval, not an hour (hang check)
    finally:
        service.stop()
        thread.join(15)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root only): a real filesystem that fills up."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_really_full_disk_sends_from_memory_and_leaves_no_transaction_open(
    small_disk: Path, scripted_channels: dict[str, Script]
):
    """On a full tmpfs the sweep fails at write or commit; alerts still go, then the record heals."""
    from visitwatch.daemon.clock import FrozenClock

    world = World(
        small_disk, FrozenClock(T0), CalendarFeed("ics-file", small_disk / "calendar.ics")
    )
    try:
        service = _watching(
            world, PAGER + OUTBOX_CHANNEL, *(home_visit(f"visit-{i}") for i in range(20))
        )
        world.at(DEADLINE - timedelta(minutes=1))
        tick(service)
        filler = _fill(small_disk)
        world.at(DEADLINE + timedelta(seconds=5))
        service.sweep()
        service.sweep()
        assert not service.store.db.conn.in_transaction
        pager = scripted_channels["pager"]
        _wait_until(lambda: sum(m.kind == "reminder" for m in pager.accepted) == 20)
        assert sum(m.kind == "admin" for m in pager.accepted) == 1

        filler.unlink()  # space freed
        tick(service)
        tick(service)
        assert sum(m.kind == "reminder" for m in pager.accepted) == 20  # none twice
        assert len(world.messages("reminder")) == 20  # the outbox and the record caught up
        sent = service.store.one(
            "SELECT COUNT(*) AS n FROM notifications WHERE kind = 'reminder' AND status = 'sent'"
        )
        assert sent["n"] == 40
    finally:
        world.close()


def test_during_an_announced_outage_a_help_request_goes_to_the_fallback_at_once(
    world: World, scripted_channels: dict[str, Script]
):
    """Once a channel is known to be out, new alerts do not wait out the deadline again."""
    admin_outbox = channel_block("outbox", "outbox", path="outbox.jsonl", kinds=["admin"])
    service = _watching(world, channel_block("slow", "scripted", fallback="outbox") + admin_outbox)
    scripted_channels["slow"].set(TEMPORARY)
    world.at(DEADLINE + timedelta(minutes=1))
    tick(service)
    world.clock.advance(timedelta(minutes=3))
    tick(service)  # the reminder waited past the deadline: outage announced
    assert any("'slow' is not delivering" in m["subject"] for m in world.messages("admin"))
    visit = service.store.one("SELECT id FROM visits")
    service.watcher.actions.request_help(visit["id"])
    service.dispatch(wait=1.0)  # no time passes
    helps = [m for m in world.messages() if m["kind"] == "help"]
    assert helps and all(m["channel"] == "outbox" for m in helps)


def _both_channels_refuse(world: World, scripts: dict[str, Script], last: str) -> Service:
    """mail -> sms -> ``last``, with an admin-only outbox; mail and sms refuse for good; one
    tick past due."""
    chain = (
        channel_block("mail", "scripted", fallback="sms")
        + channel_block("sms", "scripted", kinds=["admin"], fallback=last)
        + channel_block("outbox", "outbox", path="outbox.jsonl", kinds=["admin"])
    )
    service = _watching(world, chain)
    for name in ("mail", "sms"):
        scripts.setdefault(name, Script()).set(PERMANENT)
    world.at(DEADLINE + timedelta(seconds=5))
    tick(service)
    return service


def test_fallbacks_chain_to_a_channel_that_works(
    world: World, scripted_channels: dict[str, Script]
):
    """mail -> sms -> outbox: when the first two fail for good, the outbox gets the alert."""
    service = _both_channels_refuse(world, scripted_channels, last="outbox")
    assert [m["kind"] for m in world.messages() if m["kind"] != "admin"] == ["reminder"]
    chain = service.store.query(
        "SELECT channel, status FROM notifications WHERE kind = 'reminder' ORDER BY id"
    )
    assert [(r["channel"], r["status"]) for r in chain] == [
        ("mail", "failed"),
        ("sms", "failed"),
        ("outbox", "sent"),
    ]


def test_a_fallback_cycle_stops_at_a_channel_already_tried(
    world: World, scripted_channels: dict[str, Script]
):
    """mail -> sms -> mail: each channel is tried once, then the admin hears of the failure."""
    service = _both_channels_refuse(world, scripted_channels, last="mail")
    tick(service)
    chain = service.store.query(
        "SELECT channel, status FROM notifications WHERE kind = 'reminder' ORDER BY id"
    )
    assert [(r["channel"], r["status"]) for r in chain] == [("mail", "failed"), ("sms", "failed")]
    assert any("reminder" in n["subject"] for n in world.messages("admin"))


def test_after_the_clock_was_an_hour_fast_repeats_resume_at_once_not_an_hour_later(
    world: World, scripted_channels: dict[str, Script]
):
    """A clock fast by an hour then corrected must not silence the repeating escalation."""
    service = _watching(world, PAGER)
    pager = scripted_channels["pager"]
    world.at(DEADLINE + timedelta(minutes=50))
    tick(service)  # reminder, overrun, escalation
    world.clock.advance(timedelta(hours=1))  # the clock jumps an hour ahead ...
    tick(service)
    world.clock.advance(timedelta(hours=-1))  # ... and NTP sets it right
    service._on_clock_step()  # what the sweep loop does when it notices the step
    escalations = sum(m.kind == "escalation" for m in pager.accepted)
    world.clock.advance(timedelta(minutes=16))  # one repeat interval (15 min) later
    tick(service)
    assert sum(m.kind == "escalation" for m in pager.accepted) == escalations + 1


def test_an_outage_notice_takes_another_channel_even_one_not_meant_for_admin_notices(
    world: World, scripted_channels: dict[str, Script]
):
    """When only the broken channel carries admin notices, the notice goes on another anyway."""
    alerts_only = [k for k in NotificationKind if k.is_alert]  # no admin notices
    service = _watching(
        world,
        channel_block("mail", "scripted")
        + channel_block("outbox", "outbox", path="outbox.jsonl", kinds=alerts_only),
    )
    scripted_channels["mail"].set(HANG)
    world.at(DEADLINE + timedelta(seconds=5))
    tick_quickly = lambda: (service.sync_all(), service.sweep(), service.dispatch(wait=0.5))  # noqa: E731
    tick_quickly()
    world.clock.advance(timedelta(minutes=3))
    tick_quickly()
    notices = world.messages("admin")
    assert len(notices) == 1 and "'mail' is not delivering" in notices[0]["subject"]
