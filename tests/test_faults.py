"""Fault injection: crash storms, SIGTERM under load, a hung channel, hours of outage, clock steps.

Real daemons (``visitwatch run`` as child processes, tests.daemon_process) on the real clock,
except the hours-long outage, which runs in process on the injected clock. Every test prints
its figures; ``pytest -s tests/test_faults.py`` shows them.
"""

from __future__ import annotations

import glob
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import T0, World, home_visit, ics_calendar, tick
from tests.daemon_process import Daemon, Stop, poll_until, wait_for, write_config
from tests.hung_server import HungServer
from tests.scripted import OK, TEMPORARY, Script
from visitwatch.connectors.outbox import read_outbox
from visitwatch.core.notification import NotificationKind
from visitwatch.daemon.sync import visit_id

REMINDER, OVERRUN = NotificationKind.REMINDER, NotificationKind.OVERRUN
ASHA = "asha.khan@example.org"
MARIA = "maria.jones@example.org"
FAST = """
    poll_interval = "1s"
    sweep_interval = "1s"
"""
# Long enough for a clean exit on a loaded CI machine, far below a deadlock's minutes.
STOP_LIMIT = 5.0

Alert = tuple[str, str, str]  # (visit id, kind, recipient id)
ZERO = timedelta(0)


def ladder(overrun_after: str) -> str:
    """A short ladder: the worker reminded at the deadline, the manager ``overrun_after`` later."""
    return f"""
        [[policy.escalation]]
        after = "0s"
        to = ["worker"]
        kind = "reminder"

        [[policy.escalation]]
        after = "{overrun_after}"
        to = ["manager"]
        kind = "overrun"
    """


def next_second() -> datetime:
    """Now, rounded up to a whole second (calendar times have no fractions)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=0) + timedelta(seconds=1)


def write_visits(folder: Path, deadlines: list[datetime], prefix: str = "v") -> list[str]:
    """One of Asha's visits per deadline (started 30 min before it); returns their uids."""
    uids = [f"{prefix}-{i}" for i in range(len(deadlines))]
    events = [
        home_visit(uid, start=deadline - timedelta(minutes=30), end=deadline)
        for uid, deadline in zip(uids, deadlines, strict=True)
    ]
    (folder / "calendar.ics").write_text(ics_calendar(*events), encoding="utf-8")
    return uids


def required_alerts(uids: Iterable[str]) -> set[Alert]:
    """Every visit owes a reminder to its worker and an overrun alert to her manager."""
    return {
        (visit_id("team", uid, ""), kind, person)
        for uid in uids
        for kind, person in ((REMINDER, ASHA), (OVERRUN, MARIA))
    }


def due_times(
    uids: list[str], deadlines: list[datetime], overrun_after: timedelta
) -> dict[Alert, datetime]:
    """When each required alert falls due: the reminder at the deadline, the overrun later."""
    return {
        (visit_id("team", uid, ""), kind, person): deadline + (overrun_after if late else ZERO)
        for uid, deadline in zip(uids, deadlines, strict=True)
        for kind, person, late in ((REMINDER, ASHA, False), (OVERRUN, MARIA, True))
    }


def delivered(outbox: Path) -> Counter[Alert]:
    """Reminder and overrun records in an outbox file, counted per (visit, kind, recipient)."""
    return Counter(
        (r["visit_id"], r["kind"], r["recipient"]["id"])
        for r in read_outbox(outbox)
        if r["kind"] in (REMINDER, OVERRUN)
    )


def describe_stops(stops: list[Stop]) -> str:
    if not stops:
        return "none"
    times = ", ".join(
        f"{s.seconds:.1f}s" + (" HUNG" if s.hung else f" rc={s.returncode}") for s in stops
    )
    return f"max {max(s.seconds for s in stops):.2f}s [{times}]"


# ---------------------------------------------------------------------------- crash storm


def crash_storm(
    folder: Path, *, visits: int, spread: float, overrun_after: int, storm: float, seed: int
) -> None:
    """Visits overrun while the daemon is SIGKILLed at random and sometimes SIGTERMed."""
    rng = random.Random(seed)
    first = next_second() + timedelta(seconds=2)
    deadlines = [first + timedelta(seconds=spread * i / visits) for i in range(visits)]
    required = required_alerts(write_visits(folder, deadlines))
    config = write_config(folder, daemon=FAST, policy=ladder(f"{overrun_after}s"))
    outbox = folder / "outbox.jsonl"
    daemon = Daemon(config)
    started = time.monotonic()
    try:
        daemon.start()
        while time.monotonic() - started < storm:
            time.sleep(rng.uniform(0.2, 2.0))
            if rng.random() < 0.25:
                daemon.terminate(STOP_LIMIT)
            else:
                daemon.kill()
            daemon.start()
        last_due = deadlines[-1].replace(microsecond=0) + timedelta(seconds=overrun_after)
        settle = (last_due - datetime.now(UTC)).total_seconds() + 15
        poll_until(lambda: required <= set(delivered(outbox)), max(settle, 15), poll=0.25)
        daemon.terminate(STOP_LIMIT)
    finally:
        daemon.close()
    counts = delivered(outbox)
    missing = required - set(counts)
    duplicates = sum(n - 1 for n in counts.values() if n > 1)
    print(
        f"\ncrash storm (seed {seed}): {visits} visits, {len(required)} required alerts, "
        f"{len(required) - len(missing)} delivered, {len(missing)} missing, "
        f"{duplicates} duplicates; {daemon.kills} SIGKILLs, {len(daemon.stops)} SIGTERMs, "
        f"{daemon.starts} starts in {time.monotonic() - started:.1f}s; "
        f"SIGTERM stops: {describe_stops(daemon.stops)}"
    )
    assert not missing, (
        f"{len(missing)} required alerts never delivered, e.g. {sorted(missing)[:3]}"
    )
    assert duplicates <= daemon.kills, f"{duplicates} duplicates for {daemon.kills} SIGKILLs"
    assert not [s for s in daemon.stops if s.hung or s.returncode != 0], (
        f"a SIGTERM stop hung or failed: {describe_stops(daemon.stops)}\n{daemon.log_tail()}"
    )


def test_crash_storm_delivers_every_alert_with_at_most_one_duplicate_per_kill(tmp_path: Path):
    """200 visits overrun while the daemon is killed at random: every alert out, stops quick."""
    crash_storm(tmp_path, visits=200, spread=12, overrun_after=4, storm=14, seed=_seed())


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_long_crash_storm(tmp_path: Path):
    """1,000 visits over two minutes, about a hundred kills: every alert out, stops quick."""
    crash_storm(tmp_path, visits=1000, spread=120, overrun_after=30, storm=150, seed=_seed())


def _seed() -> int:
    return int(os.environ.get("VISITWATCH_FAULT_SEED") or random.randrange(1_000_000))


# ---------------------------------------------------------------------------- SIGTERM


# Every visit long overdue and the last rung repeating every second: each sweep raises an
# alert per visit, so the sweep is busy (and writing) whenever the SIGTERM lands.
STORM_VISITS = 1000
STORM_SIGTERM_WITHIN = 1.0
STORM_LADDER = (
    ladder("1s")
    + """
        [[policy.escalation]]
        after = "2s"
        to = ["role:director"]
        kind = "escalation"
        repeat = "1s"
"""
)


def test_sigterm_during_an_alert_storm_stops_within_seconds_ten_times_running(tmp_path: Path):
    """Defect 4: SIGTERM while the sweep raises hundreds of alerts always exits in seconds."""
    rng = random.Random(_seed())
    now = next_second()
    write_visits(
        tmp_path, [now - timedelta(seconds=30 - 20 * i / STORM_VISITS) for i in range(STORM_VISITS)]
    )
    daemon = Daemon(write_config(tmp_path, daemon=FAST, policy=STORM_LADDER))
    outbox = tmp_path / "outbox.jsonl"
    try:
        for _run in range(10):
            size = outbox.stat().st_size if outbox.exists() else 0
            daemon.start()
            wait_for(
                lambda: outbox.exists() and outbox.stat().st_size > size,  # noqa: B023
                30,
                "this run's first alerts",
            )
            time.sleep(rng.uniform(0, STORM_SIGTERM_WITHIN))
            daemon.terminate(STOP_LIMIT)
    finally:
        daemon.close()
    stops = daemon.stops
    print(
        f"\nSIGTERM during an alert storm ({STORM_VISITS} visits escalating every second), "
        f"{len(stops)} runs: {describe_stops(stops)}"
    )
    bad = [s for s in stops if s.hung or s.returncode != 0]
    assert not bad, (
        f"{len(bad)} of {len(stops)} SIGTERMs hung (killed after {STOP_LIMIT}s) or failed: "
        f"{describe_stops(stops)}\n{daemon.log_tail()}"
    )


# ---------------------------------------------------------------------------- hung channel

HUNG_CHANNELS = """
    [[channels]]
    name = "outbox"
    type = "outbox"
    path = "outbox.jsonl"

    [[channels]]
    name = "office-mail"
    type = "smtp"
    host = "127.0.0.1"
    port = {port}
    security = "none"
    sender = "visitwatch@example.org"
    fallback = "fallback-box"

    [[channels]]
    name = "fallback-box"
    type = "outbox"
    path = "fallback.jsonl"
    kinds = ["admin"]
"""
DELIVERY_DEADLINE = 5
HEALTHY_LATENESS = 5.0  # a generous hang bound: the sweep runs every second


def test_a_hung_mail_server_delays_no_other_channel_and_its_alerts_reach_the_fallback(
    tmp_path: Path,
):
    """SMTP that accepts and never answers: outbox on time, fallback within the deadline."""
    overrun_after = 2
    now = next_second()
    deadlines = [now + timedelta(seconds=2 + i) for i in range(4)]
    uids = write_visits(tmp_path, deadlines)
    required = required_alerts(uids)
    due = {
        alert: moment.timestamp()
        for alert, moment in due_times(uids, deadlines, timedelta(seconds=overrun_after)).items()
    }
    outbox, fallback = tmp_path / "outbox.jsonl", tmp_path / "fallback.jsonl"
    seen: dict[tuple[str, Alert], float] = {}
    admin_notices: dict[int, str] = {}  # outbox record id -> subject and text

    def look() -> bool:
        moment = time.time()
        for name, path in (("outbox", outbox), ("fallback", fallback)):
            for record in read_outbox(path):
                if record["kind"] == "admin":
                    if name == "outbox":
                        admin_notices[record["id"]] = f"{record['subject']}\n{record['text']}"
                    continue
                alert = (record["visit_id"], record["kind"], record["recipient"]["id"])
                seen.setdefault((name, alert), moment)
        return all(("outbox", a) in seen and ("fallback", a) in seen for a in required) and any(
            "office-mail" in notice for notice in admin_notices.values()
        )

    with HungServer() as server:
        config = write_config(
            tmp_path,
            daemon=FAST + f'    delivery_deadline = "{DELIVERY_DEADLINE}s"\n',
            channels=HUNG_CHANNELS.format(port=server.port),
            policy=ladder(f"{overrun_after}s"),
        )
        daemon = Daemon(config)
        try:
            daemon.start()
            last_due = max(due.values())
            poll_until(look, last_due - time.time() + DELIVERY_DEADLINE + 10)
            stop = daemon.terminate(STOP_LIMIT)
        finally:
            daemon.close()
        connections = len(server.connections)

    def lateness(channel: str) -> dict[Alert, float]:
        return {a: seen.get((channel, a), float("inf")) - due[a] for a in required}

    healthy, rescued = lateness("outbox"), lateness("fallback")
    print(
        f"\nhung SMTP ({connections} connections held): outbox lateness max "
        f"{max(healthy.values()):.1f}s, fallback lateness max {max(rescued.values()):.1f}s "
        f"(deadline {DELIVERY_DEADLINE}s), {len(admin_notices)} admin notices, "
        f"SIGTERM {describe_stops([stop])}"
    )
    assert max(healthy.values()) <= HEALTHY_LATENESS, (
        f"the healthy outbox was held up by the hung channel: {sorted(healthy.values())}"
    )
    assert max(rescued.values()) <= DELIVERY_DEADLINE + 5, (
        f"the hung channel's alerts did not reach its fallback in time: {sorted(rescued.values())}"
    )
    naming = [notice for notice in admin_notices.values() if "office-mail" in notice]
    assert len(naming) == 1, f"expected one admin notice naming the hung channel: {naming}"
    assert not stop.hung and stop.returncode == 0, (
        f"SIGTERM with a send hanging: {describe_stops([stop])}\n{daemon.log_tail()}"
    )


# ---------------------------------------------------------------------------- hours of outage

OUTAGE_CHANNELS = """
[[channels]]
name = "pager"
type = "scripted"

[[channels]]
name = "desk"
type = "scripted"
"""
OUTAGE = timedelta(hours=4)


def test_hours_of_one_channel_failing_stop_no_other_and_the_backlog_drains(
    world: World, scripted_channels: dict[str, Script]
):
    """Defects 1-2: 4 h of a failing channel; the other delivers all, the admin is told once."""
    world.channels = OUTAGE_CHANNELS
    world.policy = textwrap.dedent(ladder("15m"))
    deadlines = [T0 + timedelta(minutes=5 + 10 * i) for i in range(24)]  # across the outage
    uids = [f"v-{i}" for i in range(len(deadlines))]
    world.write_calendar(
        *(
            home_visit(uid, start=d - timedelta(hours=1), end=d)
            for uid, d in zip(uids, deadlines, strict=True)
        )
    )
    required = required_alerts(uids)
    due = due_times(uids, deadlines, timedelta(minutes=15))
    service = world.service()
    pager, desk = scripted_channels["pager"], scripted_channels["desk"]
    pager.set(TEMPORARY)
    seen_on_desk: dict[Alert, datetime] = {}
    notices: list[tuple[datetime, str]] = []  # admin notices naming the pager, as the desk got them
    read = 0
    end = T0 + OUTAGE + timedelta(minutes=30)
    while world.clock.now() < end:
        world.clock.advance(timedelta(minutes=1))
        if world.clock.now() >= T0 + OUTAGE:
            pager.set(OK)
        tick(service)
        for message in desk.accepted[read:]:
            if message.kind == "admin":
                text = f"{message.subject}\n{message.text}"
                if "pager" in text:
                    notices.append((world.clock.now(), text))
            else:
                alert = (message.visit_id, message.kind, message.recipient.id)
                seen_on_desk.setdefault(alert, world.clock.now())
        read = len(desk.accepted)
    on_desk = Counter(
        (m.visit_id, m.kind, m.recipient.id) for m in desk.accepted if m.kind != "admin"
    )
    on_pager = Counter(
        (m.visit_id, m.kind, m.recipient.id) for m in pager.accepted if m.kind != "admin"
    )
    # Ticks are a minute apart: two minutes is on time, anything later was held up.
    late = [a for a in required if seen_on_desk.get(a, end) - due[a] > timedelta(minutes=2)]
    print(
        f"\n4 h pager outage: desk got {len(set(on_desk) & required)}/{len(required)} alerts "
        f"({len(late)} late or missing), pager attempts {pager.attempts}, pager backlog "
        f"delivered {len(set(on_pager) & required)}/{len(required)}; admin notices naming the "
        f"pager on the desk: {len(notices)}"
    )
    assert not late, f"{len(late)} alerts on the working channel late or missing"
    assert set(on_pager) == required, "the pager's backlog did not drain when it came back"
    assert max(on_pager.values(), default=1) == 1 and max(on_desk.values(), default=1) == 1, (
        "an alert went twice"
    )
    during = [n for t, n in notices if t < T0 + OUTAGE]
    after = [n for t, n in notices if t >= T0 + OUTAGE]
    assert len(during) == 1, f"expected one outage notice to the admin, got {len(during)}"
    assert len(after) == 1, (
        f"expected one 'recovered' notice after the pager came back, got {len(after)}: "
        + "; ".join(f"{t:%H:%M} {n.splitlines()[0]}" for t, n in notices if t >= T0 + OUTAGE)
    )
    assert re.search(r"recover|again", after[0], re.IGNORECASE), after[0]


# ---------------------------------------------------------------------------- clock step


def _faketime_library() -> str | None:
    for pattern in (
        "/usr/lib/*/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


FAKETIME = _faketime_library()
needs_faketime = pytest.mark.skipif(
    FAKETIME is None,
    reason="libfaketime not installed (Debian package 'faketime'; .ci/run installs it)",
)


def faketime_env(rc: Path) -> dict[str, str]:
    """Wall clock read from ``rc`` on every call; monotonic clock left real."""
    assert FAKETIME is not None
    return {
        "LD_PRELOAD": FAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(rc),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def set_offset(rc: Path, offset: str) -> None:
    """Step the faked wall clock (written whole: never a half-written file)."""
    partial = rc.with_suffix(".tmp")
    partial.write_text(offset + "\n")
    partial.replace(rc)


# Waits with threading.Event, not time.sleep: under FAKETIME_DONT_FAKE_MONOTONIC, libfaketime
# 0.9.10 turns Python 3.11's clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) into EINVAL
# (wolfcw/libfaketime#426), so time.sleep raises there. The daemon waits on events.
PROBE = """
import sys, threading, time
from pathlib import Path
print(time.time(), time.monotonic(), flush=True)
while not Path(sys.argv[1]).exists():
    threading.Event().wait(0.05)
print(time.time(), time.monotonic(), flush=True)
"""


@needs_faketime
def test_libfaketime_steps_the_wall_clock_python_sees_and_leaves_monotonic_alone(tmp_path: Path):
    """The tool works: after the file says -1h, time.time() is an hour back, monotonic is not."""
    rc, go = tmp_path / "faketime.rc", tmp_path / "go"
    set_offset(rc, "+0")
    child = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(go)],
        env={**os.environ, **faketime_env(rc)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        wall_before, mono_before = map(float, child.stdout.readline().split())
        set_offset(rc, "-1h")
        go.touch()
        wall_after, mono_after = map(float, child.stdout.readline().split())
    finally:
        child.kill()
        child.wait(timeout=10)
    print(
        f"\nfaketime probe: wall {wall_after - wall_before:+.1f}s, "
        f"monotonic {mono_after - mono_before:+.2f}s"
    )
    assert -3600 - 5 < wall_after - wall_before < -3600 + 5
    assert 0 <= mono_after - mono_before < 5


@needs_faketime
def test_a_wall_clock_step_back_does_not_stop_the_daemon(tmp_path: Path):
    """Defect 12: the clock stepped back an hour for 3 s; a reminder due later still goes out."""
    rc = tmp_path / "faketime.rc"
    set_offset(rc, "+0")
    deadline = next_second() + timedelta(seconds=15)
    [uid] = write_visits(tmp_path, [deadline])
    config = write_config(tmp_path, daemon=FAST)
    outbox = tmp_path / "outbox.jsonl"
    reminder = (visit_id("team", uid, ""), "reminder", ASHA)
    daemon = Daemon(config, env=faketime_env(rc))
    try:
        daemon.start()
        time.sleep(2)  # a few sweeps on the true time
        set_offset(rc, "-1h")
        time.sleep(3)
        set_offset(rc, "+0")
        poll_until(lambda: reminder in delivered(outbox), deadline.timestamp() - time.time() + 10)
        arrived = time.time()
    finally:
        daemon.close()
    lateness = arrived - deadline.timestamp()
    sent = reminder in delivered(outbox)
    print(f"\nclock step: reminder {'sent' if sent else 'NOT sent'}, {lateness:+.1f}s after due")
    assert sent, f"no reminder {lateness:.0f}s after its deadline\n{daemon.log_tail()}"
    assert lateness <= 5, f"the reminder came {lateness:.1f}s after its deadline"
