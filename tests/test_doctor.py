"""`visitwatch doctor`: a healthy install passes; each problem is named with its fix."""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import World, home_visit, tick
from tests.daemon_process import OUTBOX_CHANNEL, smtp_channel
from tests.http_receiver import running_receiver
from tests.mailserver import free_port
from tests.web_world import enable_web
from visitwatch.daemon import cli, doctor
from visitwatch.daemon.doctor_checks import OK, PROBLEM, Finding
from visitwatch.daemon.store import DaemonLock


def _examine(world: World) -> list[Finding]:
    return doctor.examine(str(world.config_file), world.clock)


def _problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == PROBLEM]


def _installed(world: World, **web: object) -> DaemonLock:
    """A watched calendar, read and swept, with its daemon "running" (its lock held)."""
    world.write_calendar(home_visit())
    tick(world.service())
    lock = DaemonLock(world.folder / "visitwatch.db")
    assert lock.acquire()
    return lock


@pytest.fixture
def running(world: World):  # type: ignore[no-untyped-def]
    world.write_config()
    lock = _installed(world)
    yield lock
    lock.release()


def test_a_healthy_install_has_no_problems(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """Config, files, record, disk, daemon, heartbeat host, source and channel: all ok, exit 0."""
    with running_receiver() as monitor:
        world.daemon = f'heartbeat_url = "http://127.0.0.1:{monitor.port}/ping/abc-123"\n'
        enable_web(world)
        lock = _installed(world)
        try:
            findings = _examine(world)
            monkeypatch.setattr(doctor, "SystemClock", lambda: world.clock)
            code = doctor.cmd_doctor(argparse.Namespace(config=str(world.config_file)))
        finally:
            lock.release()
    assert _problems(findings) == []
    oks = {f.what.split()[0] for f in findings if f.level == OK}
    assert {"config", "permissions", "database", "disk", "daemon", "heartbeat"} <= oks
    assert {"source", "channel"} <= oks
    assert monitor.requests == []  # the ping URL itself is never touched: no false "up"
    out = capsys.readouterr().out
    assert "no problems found" in out and "abc-123" not in out
    assert code == 0


def test_a_world_readable_key_file_is_a_problem_with_its_chmod(world: World, running: DaemonLock):
    """The signing key readable by everyone: PROBLEM naming the file, fix chmod 600."""
    enable_web(world)
    world.service()  # creates the key file
    key = world.folder / "web-signing.key"
    key.chmod(0o644)
    [problem] = _problems(_examine(world))
    assert problem.what == f"key file {key}" and "mode 0644" in problem.text
    assert problem.fix.startswith(f"chmod 600 {key}")


def test_a_corrupted_database_is_a_problem_and_nothing_is_built_on_it(
    world: World, running: DaemonLock
):
    """A damaged record file: PROBLEM with the restore steps; connectors are not tried."""
    database = world.folder / "visitwatch.db"
    for service in world.services:
        service.close()
    data = bytearray(database.read_bytes())
    data[4096:] = b"\x5a" * (len(data) - 4096)  # every page after the first overwritten
    database.write_bytes(bytes(data))
    for suffix in ("-wal", "-shm"):
        Path(str(database) + suffix).unlink(missing_ok=True)
    findings = _examine(world)
    [problem] = [f for f in _problems(findings) if f.what.startswith("database")]
    assert "damaged" in problem.text or "cannot be read" in problem.text
    assert "restore the latest backup" in problem.fix
    assert any(f.what == "sources and channels" for f in findings)


def test_an_unreachable_channel_is_a_problem(world: World):
    """A mail server nobody listens on: the channel's check fails, PROBLEM with its error."""
    world.channels = smtp_channel(free_port(), fallback="outbox") + OUTBOX_CHANNEL
    world.write_config()
    lock = _installed(world)
    try:
        problems = _problems(_examine(world))
    finally:
        lock.release()
    [problem] = problems
    assert problem.what == "channel email"
    assert "refused" in problem.text.lower() or "connect" in problem.text.lower()


def test_a_stopped_or_stuck_daemon_is_a_problem(world: World, running: DaemonLock):
    """No daemon holding the lock, or one whose last sweep is old: PROBLEM with the fix."""
    world.at(world.clock.now() + timedelta(minutes=5))  # limit: 3 x 10 s + 30 s
    [stuck] = [f for f in _problems(_examine(world)) if f.what == "daemon"]
    assert "is stuck" in stuck.text and "systemctl restart visitwatch" in stuck.fix
    running.release()
    [stopped] = [f for f in _problems(_examine(world)) if f.what == "daemon"]
    assert stopped.text.startswith("not running") and "systemctl start" in stopped.fix


def test_an_unreadable_config_stops_at_the_first_check(tmp_path: Path, capsys):  # type: ignore[no-untyped-def]
    """A config that does not load: one PROBLEM with every mistake, exit status 1."""
    config = tmp_path / "visitwatch.toml"
    config.write_text("[daemon]\ndatabse = 'x.db'\n", encoding="utf-8")
    assert doctor.cmd_doctor(argparse.Namespace(config=str(config))) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  config:" in out and "did you mean 'database'" in out


def test_doctor_is_a_command_whose_exit_status_says_so(world: World, capsys):  # type: ignore[no-untyped-def]
    """`visitwatch doctor` on an install with no daemon running exits 1, naming it."""
    world.write_calendar(home_visit())
    world.write_config()
    assert cli.main(["doctor", "--config", str(world.config_file)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  daemon: not running" in out and "1 problem(s) found" in out
