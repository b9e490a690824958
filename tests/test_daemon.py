"""The daemon as admins run it: real processes, real servers on loopback, real signals."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog

from tests.conftest import T0, World, home_visit, tick
from tests.daemon_process import (
    OUTBOX_CHANNEL,
    REPO,
    VISITWATCH,
    channel_block,
    smtp_channel,
    wait_for,
)
from tests.mailserver import Recorder, free_port
from visitwatch.connectors.outbox import read_outbox
from visitwatch.daemon import demo
from visitwatch.daemon.dispatch import FALLBACK_AFTER_ATTEMPTS
from visitwatch.daemon.sync import visit_id

DEADLINE = T0 + timedelta(hours=2)
VISIT = visit_id("team", "visit-1", "")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VISITWATCH, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def run_at(config: Path, moment: datetime, *steps: str) -> int:
    """Daemon steps at a frozen moment, in a new process (tests.run_at)."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.run_at", str(config), moment.isoformat(), *steps],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    return result.returncode


def test_demo_runs_and_a_check_in_sends_the_all_clear(tmp_path: Path):
    """`visitwatch demo` shows the compliance notice, reminder and overrun alert; check-in clears."""
    folder = tmp_path / "demo"
    daemon = subprocess.Popen(
        [*VISITWATCH, "demo", "--dir", str(folder)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    outbox = folder / "outbox.jsonl"
    try:
        kinds = lambda: {r["kind"] for r in read_outbox(outbox)}  # noqa: E731
        wait_for(
            lambda: {"compliance", "reminder", "overrun"} <= kinds(),
            60,
            "the demo's first notifications",
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        stdout, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, stderr
    assert "OVERDUE: Asha Khan" in stdout  # the console channel printed the manager alert
    overrun = [r for r in read_outbox(outbox) if r["kind"] == "overrun"]
    assert overrun[0]["recipient"]["name"] == "Maria Jones"
    assert "14 Brook Street" in overrun[0]["text"]

    visit = visit_id(demo.SOURCE, demo.OVERRUN_UID, "")
    result = run_cli("--config", str(folder / "visitwatch.toml"), "checkin", visit)
    assert result.returncode == 0, result.stderr
    clear = [r for r in read_outbox(outbox) if r["kind"] == "all_clear"]
    assert [r["recipient"]["name"] for r in clear] == ["Maria Jones"]


def test_second_daemon_on_the_same_database_is_refused(tmp_path: Path):
    """While one daemon runs, a second refuses to start and says which process holds it."""
    config = demo.prepare(tmp_path / "demo")
    first = subprocess.Popen(
        [*VISITWATCH, "--config", str(config), "run"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (
                (tmp_path / "demo" / "visitwatch.db.lock").exists()
                and (tmp_path / "demo" / "visitwatch.db.lock").read_text().strip() != ""
            ),
            30,
            "the first daemon's lock",
        )
        second = run_cli("--config", str(config), "run", timeout=30)
        assert second.returncode == 2
        assert f"another visitwatch daemon (pid {first.pid})" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert first.returncode == 0


def test_restart_mid_escalation_sends_nothing_twice_and_misses_nothing(world: World):
    """Processes that stop (cleanly or by crash) mid-escalation: each alert arrives exactly once."""
    world.write_calendar(home_visit())
    config = world.write_config()
    assert run_at(config, T0, "sync", "sweep", "dispatch") == 0
    # Reminder and manager alert are written, then the process dies before delivering them.
    assert run_at(config, DEADLINE + timedelta(minutes=16), "sync", "sweep", "crash") == 137
    assert world.messages() == []
    # A new process delivers what the dead one committed, and raises nothing twice.
    assert run_at(config, DEADLINE + timedelta(minutes=16), "sync", "sweep", "dispatch") == 0
    assert run_at(config, DEADLINE + timedelta(minutes=17), "sync", "sweep", "dispatch") == 0
    assert [m["kind"] for m in world.messages()] == ["reminder", "overrun"]
    # The director's step comes due while no daemon runs; the next start catches up once.
    assert run_at(config, DEADLINE + timedelta(minutes=50), "sync", "sweep", "dispatch") == 0
    assert run_at(config, DEADLINE + timedelta(minutes=51), "sweep", "dispatch") == 0
    assert [m["kind"] for m in world.messages()] == ["reminder", "overrun", "escalation"]


def test_refused_smtp_is_retried_recorded_and_delivered_when_the_server_returns(
    world: World, smtp_server: Callable[..., tuple[Recorder, int]]
):
    """A mail server that is down: retries with backoff, the outbox fallback, then delivery."""
    port = free_port()
    world.channels = smtp_channel(port, fallback="outbox") + channel_block(
        "outbox", "outbox", path="outbox.jsonl", kinds=["admin"]
    )
    world.write_calendar(home_visit())
    service = world.service()
    world.at(DEADLINE + timedelta(minutes=16))
    tick(service)
    row = service.store.one("SELECT * FROM notifications WHERE kind = 'overrun'")
    assert row["status"] == "pending" and row["attempts"] == 1
    assert "refused" in row["last_error"].lower() or "connect" in row["last_error"].lower()
    # Not retried before its backoff, then retried; after three failures the fallback gets it.
    service.dispatch()
    assert (
        service.store.one("SELECT attempts FROM notifications WHERE id = ?", (row["id"],))[
            "attempts"
        ]
        == 1
    )
    for _ in range(FALLBACK_AFTER_ATTEMPTS - 1):
        world.clock.advance(timedelta(minutes=5))
        service.dispatch()
    assert [m["kind"] for m in world.messages()] == ["reminder", "overrun", "admin"]
    outage = world.messages("admin")[0]  # past the delivery deadline, the admin hears of it
    assert "'email' is not delivering" in outage["subject"]
    status = run_cli("--config", str(world.config_file), "status", "--json")
    undelivered = json.loads(status.stdout)["undelivered"]
    assert {n["kind"] for n in undelivered} == {"reminder", "overrun"}

    recorder, _ = smtp_server(port=port)
    world.clock.advance(timedelta(minutes=5))
    service.dispatch()
    delivered = sorted(e.rcpt_tos[0] for e in recorder.envelopes)
    assert delivered == ["asha.khan@example.org", "maria.jones@example.org"]  # the backlog
    # The director (the admin here) hears the channel is back once it has delivered for
    # the recovery hold with no failure of its own.
    world.clock.advance(service.dispatcher.outages.recovery_hold)
    service.dispatch()
    assert sorted(e.rcpt_tos[0] for e in recorder.envelopes)[-1] == "sam.webster@example.org"
    assert "'email' is delivering again" in world.messages("admin")[-1]["subject"]
    assert (
        service.store.one("SELECT status FROM notifications WHERE id = ?", (row["id"],))["status"]
        == "sent"
    )


def test_check_reports_each_source_and_channel(world: World):
    """`visitwatch check` prints a pass or fail line per connector and fails if any fails."""
    world.channels = OUTBOX_CHANNEL + smtp_channel(free_port(), timeout="3s")
    world.write_calendar(
        home_visit(start=_now() + timedelta(hours=1), end=_now() + timedelta(hours=2))
    )
    world.write_config()
    result = run_cli("--config", str(world.config_file), "check")
    assert result.returncode == 1
    assert "ok   source team: feed read: 1 entries in window" in result.stdout
    assert "1 visits in the sync window" in result.stdout
    assert "ok   channel outbox" in result.stdout
    assert "FAIL channel email" in result.stdout


def test_sync_and_status_commands(world: World):
    """`visitwatch sync` reads and sweeps once; `status --json` lists the visit and its findings."""
    # The CLI runs on the real clock, so the entry is timed from now.
    world.write_calendar(
        home_visit(
            start=_now() + timedelta(hours=1),
            end=_now() + timedelta(hours=2),
            description="Purpose: review",
        )
    )
    world.write_config()
    result = run_cli("--config", str(world.config_file), "sync")
    assert result.returncode == 0, result.stderr
    assert "team: 1 visits in 1 entries, 1 new" in result.stdout
    data = json.loads(run_cli("--config", str(world.config_file), "status", "--json").stdout)
    [visit] = data["visits"]
    assert visit["worker"] == "Asha Khan" and visit["state"] == "booked"
    assert "risk_assessment_missing" in visit["findings"]
    assert data["sources"][0]["name"] == "team" and data["sources"][0]["last_error"] is None


def test_logs_are_json_and_carry_no_personal_data(world: World):
    """Off a terminal the log is JSON lines, with visit ids but no names or addresses."""
    world.write_calendar(
        home_visit(start=_now() - timedelta(hours=2), end=_now() - timedelta(minutes=20))
    )
    world.write_config()
    result = run_cli("--config", str(world.config_file), "sync")
    # Only the log lines: a library may print its own warnings to stderr.
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert {"source_synced", "alert_raised", "notification_sent"} <= {e["event"] for e in events}
    assert any(e.get("visit_id") == VISIT for e in events)
    for secret in ("Asha", "Khan", "Brook Street", "Carter", "Maria", "07700"):
        assert secret not in result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path: Path):
    """systemd accepts the unit file (with ExecStart pointed at this installation)."""
    unit = (REPO / "systemd" / "visitwatch.service").read_text()
    executable = Path(sys.executable).parent / "visitwatch"
    unit = unit.replace("/usr/local/bin/visitwatch", str(executable))
    path = tmp_path / "visitwatch.service"
    path.write_text(unit)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_sweep_reads_due_visits_through_the_deadline_index(world: World):
    """The sweep's query uses the next-action index, so history does not slow it down."""
    world.write_calendar(home_visit())
    service = world.service()
    plan = service.store.query(
        "EXPLAIN QUERY PLAN SELECT * FROM visits WHERE next_action_at IS NOT NULL"
        " AND next_action_at <= ? ORDER BY next_action_at LIMIT 500",
        ("x",),
    )
    assert any("visits_next_action" in row["detail"] for row in plan), plan


def test_unchanged_feed_is_not_processed_again(world: World):
    """A second read of the same feed is recognised by its hash and skipped."""
    world.write_calendar(home_visit())
    service = world.service()
    [first] = service.sync_all()
    [second] = service.sync_all()
    assert (first.skipped, second.skipped) == (False, True)
    world.clock.advance(timedelta(hours=2))  # the window moved: look again
    [third] = service.sync_all()
    assert third.skipped is False


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def test_redaction_hides_personal_fields_above_debug():
    """Whatever a caller passes, names, addresses and staff ids are replaced above debug."""
    import io

    from visitwatch.daemon import logs

    stream = io.StringIO()
    logs.configure("debug", json=True, stream=stream)
    log = structlog.get_logger("test")
    log.warning("w", visit_id="v1", name="Asha Khan", address="14 Brook St", staff_id="a@x.org")
    log.debug("d", name="Asha Khan")
    warning, debug = (json.loads(line) for line in stream.getvalue().splitlines())
    assert warning["visit_id"] == "v1"
    assert {warning[k] for k in ("name", "address", "staff_id")} == {"[redacted]"}
    assert debug["name"] == "Asha Khan"


def test_demo_never_wipes_a_folder_it_did_not_make(tmp_path: Path):
    """`demo --dir` refuses a folder holding someone's files, and reuses its own."""
    precious = tmp_path / "work"
    precious.mkdir()
    (precious / "thesis.txt").write_text("four years of work")
    refused = run_cli("demo", "--dir", str(precious), "--prepare-only")
    assert refused.returncode == 2
    assert "not made by `visitwatch demo`" in refused.stderr
    assert (precious / "thesis.txt").read_text() == "four years of work"

    own = tmp_path / "demo"
    assert run_cli("demo", "--dir", str(own), "--prepare-only").returncode == 0
    (own / "leftover.jsonl").write_text("{}\n")
    assert run_cli("demo", "--dir", str(own), "--prepare-only").returncode == 0
    assert not (own / "leftover.jsonl").exists()  # its own folder is wiped and rebuilt
