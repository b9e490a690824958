"""What an admin sees at the terminal when a command meets bad input: a clear line, never a
traceback, and an exit status a script can act on."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import structlog.testing

from tests.conftest import STAFF, World, home_visit
from tests.daemon_process import OUTBOX_CHANNEL, smtp_channel
from tests.mailserver import Recorder
from visitwatch.daemon import cli
from visitwatch.daemon.config import load_config

Run = Callable[..., tuple[int, str, str]]
POLICY = '\n[policy]\npreset = "pan-lancashire"\n'


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run ``visitwatch ARGS`` in this process; returns (exit status, stdout, stderr)."""

    def go(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            status = cli.main(list(argv))
        except SystemExit as stop:  # argparse refuses its input this way
            status = stop.code if isinstance(stop.code, int) else 2
        out, err = capsys.readouterr()
        return status, out, err

    return go


def config_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "visitwatch.toml"
    path.write_text(textwrap.dedent(body) + STAFF + OUTBOX_CHANNEL, encoding="utf-8")
    return path


def assert_clear(err: str, *names: str) -> None:
    assert "Traceback" not in err
    for name in names:
        assert name in err, f"{name!r} not in {err!r}"


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("poll_interval", '"99999999999d"'),
        ("window_ahead", '"1000000000000000000000h"'),
        ("sweep_interval", "1e400"),
        ("adopt_overdue_within", "inf"),
        ("window_past", "nan"),
    ],
)
def test_an_overflowing_duration_is_a_config_error(tmp_path: Path, run: Run, key: str, value: str):
    """A duration too long for any clock is reported with its key, not as a traceback."""
    path = config_file(tmp_path, f"[daemon]\n{key} = {value}\n")
    status, _, err = run("--config", str(path), "check")
    assert status == 2
    assert_clear(err, f"daemon.{key}")


def test_an_overflowing_ladder_step_is_a_config_error(tmp_path: Path, run: Run):
    """The same holds for durations in the policy, such as a ladder step's repeat."""
    path = config_file(
        tmp_path,
        """
        [policy]
        preset = "pan-lancashire"
        [policy.timing]
        grace = "99999999999d"
        """,
    )
    status, _, err = run("--config", str(path), "check")
    assert status == 2
    assert_clear(err, "policy.timing.grace")


def test_a_config_file_that_is_not_utf8_is_named(tmp_path: Path, run: Run):
    """A config saved in Latin-1 is refused with the file's name and how to fix it."""
    path = tmp_path / "visitwatch.toml"
    path.write_bytes(b'[daemon]\ntimezone = "Europe/London"\n# Caf\xe9 team\n')
    status, _, err = run("--config", str(path), "check")
    assert status == 2
    assert_clear(err, str(path), "UTF-8", "line 3")


def test_a_secret_file_that_is_not_utf8_is_named_with_its_key(tmp_path: Path, run: Run):
    """A binary password file is refused naming the key and the file, never its content."""
    secret = tmp_path / "smtp-password"
    secret.write_bytes(b"hunter\xff\xfe2")
    path = config_file(
        tmp_path,
        f"""
        [[channels]]
        name = "mail"
        type = "smtp"
        host = "127.0.0.1"
        sender = "v@example.org"
        username = "v"
        password = {{ file = "{secret}" }}
        """,
    )
    status, _, err = run("--config", str(path), "check")
    assert status == 2
    assert_clear(err, "channels[0].password", str(secret), "UTF-8")
    assert "hunter" not in err


def test_a_database_path_that_is_a_folder_is_a_config_error(tmp_path: Path, run: Run):
    """daemon.database naming an existing folder is reported with the key."""
    (tmp_path / "records").mkdir()
    path = config_file(tmp_path, '[daemon]\ndatabase = "records"\n')
    status, _, err = run("--config", str(path), "check")
    assert status == 2
    assert_clear(err, "daemon.database", "folder")


def test_a_database_path_under_a_file_is_a_config_error(tmp_path: Path, run: Run):
    """daemon.database inside something that is a file, not a folder, is reported with the key."""
    (tmp_path / "records").write_text("not a folder")
    path = config_file(tmp_path, '[daemon]\ndatabase = "records/visitwatch.db"\n')
    status, _, err = run("--config", str(path), "check")
    assert status == 2
    assert_clear(err, "daemon.database", "records")


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("by", ["", "   "])
def test_ack_without_a_name_is_refused(tmp_path: Path, run: Run, by: str):
    """`ack --by ""` does not acknowledge anonymously: exit 2 and say a name is needed."""
    path = config_file(tmp_path, "")
    status, _, err = run("--config", str(path), "ack", "abc123", "--by", by)
    assert status == 2
    assert_clear(err, "--by", "name")
    assert not (tmp_path / "visitwatch.db").exists()  # refused before anything was opened


def test_sync_fails_when_a_notification_failed_for_good(
    world: World, smtp_server: Callable[..., tuple[Recorder, int]], run: Run
):
    """`sync` exits 1 and says so when the mail server rejected an alert for good."""
    recorder, port = smtp_server()
    recorder.rcpt_reply = "550 5.1.1 no such mailbox"
    world.channels = smtp_channel(port)
    now = datetime.now(UTC)  # the CLI runs on the real clock
    world.write_calendar(home_visit(start=now - timedelta(hours=1), end=now - timedelta(minutes=1)))
    status, out, _ = run("--config", str(world.write_config()), "sync")
    assert "team: 1 visits" in out
    assert status == 1
    assert "failed permanently" in out


def test_sync_succeeds_when_everything_was_delivered(
    world: World, smtp_server: Callable[..., tuple[Recorder, int]], run: Run
):
    """The same run against a server that accepts the alert exits 0."""
    recorder, port = smtp_server()
    world.channels = smtp_channel(port)
    now = datetime.now(UTC)
    world.write_calendar(home_visit(start=now - timedelta(hours=1), end=now - timedelta(minutes=1)))
    status, out, _ = run("--config", str(world.write_config()), "sync")
    assert status == 0, out
    assert "failed permanently" not in out
    assert recorder.envelopes  # the reminder really went out


# --------------------------------------------------------------------------- reach

SMTP_ONLY = """
[daemon]
database = "visitwatch.db"

[[staff]]
id = "asha.khan@example.org"
name = "Asha Khan"
manager = "maria"

[[staff]]
id = "maria"
name = "Maria Jones"
role = "manager"
manager = "sam.webster@example.org"
{maria_email}

[[staff]]
id = "sam.webster@example.org"
name = "Sam Webster"
role = "director"

[[sources]]
name = "team"
type = "ics"
path = "calendar.ics"
owner = "asha.khan@example.org"
"""


def smtp_only(tmp_path: Path, port: int, maria_email: str) -> Path:
    (tmp_path / "calendar.ics").write_text(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//t//EN\r\nEND:VCALENDAR\r\n"
    )
    path = tmp_path / "visitwatch.toml"
    text = SMTP_ONLY.format(maria_email=maria_email) + smtp_channel(port) + POLICY
    path.write_text(text, encoding="utf-8")
    return path


def test_check_names_a_manager_no_channel_can_reach(
    tmp_path: Path, smtp_server: Callable[..., tuple[Recorder, int]], run: Run
):
    """SMTP only and a manager without an e-mail address: `check` names her and exits 1."""
    _, port = smtp_server()
    status, out, err = run("--config", str(smtp_only(tmp_path, port, "")), "check")
    assert "ok   channel email" in out, out + err
    [line] = [line for line in out.splitlines() if line.startswith("FAIL reach")]
    assert "Maria Jones" in line and "manager" in line and "e-mail" in line
    assert status == 1


def test_check_is_quiet_about_reach_when_everyone_can_be_reached(
    tmp_path: Path, smtp_server: Callable[..., tuple[Recorder, int]], run: Run
):
    """With Maria's address on record there is no reach failure and `check` passes."""
    _, port = smtp_server()
    path = smtp_only(tmp_path, port, 'email = "maria.jones@example.org"')
    status, out, err = run("--config", str(path), "check")
    assert "FAIL reach" not in out
    assert status == 0, out + err


def test_the_daemon_warns_of_unreachable_staff_by_count_only(
    tmp_path: Path, smtp_server: Callable[..., tuple[Recorder, int]]
):
    """At start the log says how many people no channel reaches, never who."""
    _, port = smtp_server()
    config = load_config(smtp_only(tmp_path, port, ""))  # loading is not an error
    with structlog.testing.capture_logs() as events:
        cli._warn_unreachable(config)
    [warning] = [e for e in events if e["event"] == "staff_unreachable"]
    assert warning["log_level"] == "warning" and warning["count"] == 1
    assert "Maria" not in repr(events)


def test_a_database_file_that_is_not_a_database_is_named(tmp_path: Path, run: Run):
    """daemon.database pointing at some other file is a clear error naming it, not a traceback."""
    (tmp_path / "visitwatch.db").write_text("these are my notes, not a database\n" * 100)
    path = config_file(tmp_path, '[daemon]\ndatabase = "visitwatch.db"\n')
    status, _, err = run("--config", str(path), "check")
    assert status == 2
    assert_clear(err, "daemon.database", str(tmp_path / "visitwatch.db"))
