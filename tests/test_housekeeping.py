"""Issue 11's housekeeping: the ICS cache survives a restart, logs hide contact details,
commands keep their output apart from logs, a closed pipe is quiet, options go anywhere."""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import structlog

from tests.conftest import STAFF, T0, home_visit, ics_calendar
from tests.daemon_process import REPO, VISITWATCH
from tests.ics_feed import Feed, Server, serving
from visitwatch.daemon import logs
from visitwatch.daemon.cli import build_parser
from visitwatch.daemon.config import load_config
from visitwatch.daemon.service import Service

ETAG = '"feed-v1"'


def write_config(folder: Path, feed_url: str) -> Path:
    config = folder / "visitwatch.toml"
    config.write_text(
        '[daemon]\ndatabase = "visitwatch.db"\ntimezone = "Europe/London"\n'
        + STAFF
        + f'\n[[sources]]\nname = "team feed"\ntype = "ics"\nurl = "{feed_url}"\n'
        'owner = "asha.khan@example.org"\n'
        '\n[[channels]]\nname = "outbox"\ntype = "outbox"\npath = "outbox.jsonl"\n'
        '\n[policy]\npreset = "pan-lancashire"\n',
        encoding="utf-8",
    )
    return config


def feed_of(*uids: str) -> bytes:
    start = T0 + timedelta(days=400)  # far ahead: nothing falls due while the test runs
    return ics_calendar(*(home_visit(uid, start=start) for uid in uids)).encode()


def answered(feed: Feed) -> list[int]:
    """The status the loopback server gave each request (it answers 304 to its own ETag)."""
    return [304 if r["headers"].get("If-None-Match") == feed.etag else 200 for r in feed.requests]


def sync_once(config: Path) -> list[str]:
    """A fresh service (as after a restart) reads every source once; returns visit ids."""
    service = Service(load_config(config))
    try:
        report = service.sync_all()[0]
        assert report.ok, report.error
        return [row["id"] for row in service.store.query("SELECT id FROM visits")]
    finally:
        service.close()


# ------------------------------------------------------------------------ ICS cache


def test_first_poll_after_a_restart_is_a_304(tmp_path: Path):
    """Two service instances one after the other: one 200, then 304s, the visit still read."""
    feed = Feed(body=feed_of("v-1"), etag=ETAG)
    with serving(feed) as server:
        config = write_config(tmp_path, server.url())
        first = sync_once(config)
        second = sync_once(config)
        third = sync_once(config)
    assert answered(feed) == [200, 304, 304]
    assert len(first) == 1 and first == second == third
    cache = tmp_path / "ics-team_feed.json"
    assert cache.stat().st_mode & 0o777 == 0o600
    saved = json.loads(cache.read_text())
    assert saved["etag"] == ETAG and "BEGIN:VCALENDAR" not in cache.read_text()


def test_a_changed_feed_after_a_restart_is_downloaded_and_read(tmp_path: Path):
    """A new ETag after the restart: a 200, and the new visit is in the record."""
    feed = Feed(body=feed_of("v-1"), etag=ETAG)
    with serving(feed) as server:
        config = write_config(tmp_path, server.url())
        sync_once(config)
        feed.body, feed.etag = feed_of("v-1", "v-2"), '"feed-v2"'
        visits = sync_once(config)
    assert answered(feed) == [200, 200]
    assert len(visits) == 2


def test_a_304_for_a_body_the_record_does_not_hold_fetches_it_whole(tmp_path: Path):
    """Cache file kept but the record lost (restored from an old backup): the 304 is not
    trusted, the feed is downloaded again and its visits are read."""
    feed = Feed(body=feed_of("v-1"), etag=ETAG)
    with serving(feed) as server:
        config = write_config(tmp_path, server.url())
        sync_once(config)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{tmp_path / 'visitwatch.db'}{suffix}").unlink(missing_ok=True)
        visits = sync_once(config)
    assert answered(feed) == [200, 304, 200]
    assert "If-None-Match" not in feed.requests[-1]["headers"]
    assert len(visits) == 1


def test_a_damaged_cache_file_costs_only_a_full_download(tmp_path: Path):
    """A cache file that is not JSON is ignored: the read is a 200, nothing fails."""
    feed = Feed(body=feed_of("v-1"), etag=ETAG)
    (tmp_path / "ics-team_feed.json").write_text("{not json")
    with serving(feed) as server:
        assert len(sync_once(write_config(tmp_path, server.url()))) == 1
    assert answered(feed) == [200]


# ------------------------------------------------------------------------ redaction


def logged(level: str, emit: object) -> str:
    stream = io.StringIO()
    logs.configure(level, json=True, stream=stream)
    assert callable(emit)
    emit(structlog.get_logger("test"))
    return stream.getvalue()


def test_mailbox_sender_and_contact_details_in_error_text_are_redacted_at_info():
    """mailbox=, sender= and addresses or phone numbers inside any text never reach logs."""

    def emit(log: structlog.BoundLogger) -> None:
        log.info(
            "graph.mailbox_failed",
            visit_id="0a1b2c3d4e5f",
            mailbox="asha.khan@example.org",
            sender="visitwatch@example.org",
            error="mailbox maria.jones@example.org: 404; text to +447700 900123 or 07700 900321",
            attempts=3,
        )
        try:
            raise RuntimeError("SMTP 550 <sam.webster@example.org> unknown")
        except RuntimeError:
            log.exception("send_crashed", visit_id="0a1b2c3d4e5f")

    text = logged("info", emit)
    for secret in ("asha.khan", "visitwatch@", "maria.jones", "sam.webster", "900123", "900321"):
        assert secret not in text
    first = json.loads(text.splitlines()[0])
    assert first["visit_id"] == "0a1b2c3d4e5f" and first["attempts"] == 3
    assert first["error"] == "mailbox [redacted]: 404; text to [redacted] or [redacted]"
    assert "RuntimeError: SMTP 550 <[redacted]> unknown" in text


def test_times_ids_and_counts_are_not_mistaken_for_phone_numbers():
    """Redaction leaves what admins need: timestamps, visit ids, sizes, durations, ports."""
    event = json.loads(
        logged(
            "info",
            lambda log: log.info(
                "ics.downloaded",
                visit_id="01234567890a",
                size="12345678901 bytes",
                took="0.1234567890s",
                at="2026-11-23T14:05:00.000000Z",
                listen="127.0.0.1:8080",
            ),
        )
    )
    assert event["visit_id"] == "01234567890a"
    assert event["size"] == "12345678901 bytes"
    assert event["took"] == "0.1234567890s"
    assert event["at"] == "2026-11-23T14:05:00.000000Z"
    assert event["listen"] == "127.0.0.1:8080"


def test_debug_keeps_contact_details_for_an_admin_chasing_a_bug():
    """At debug level nothing is hidden (the admin's own machine, on purpose)."""
    text = logged("debug", lambda log: log.debug("d", error="mailbox a@example.org failed"))
    assert "a@example.org" in text


# ------------------------------------------------------------------ command output


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VISITWATCH, *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def log_lines(text: str) -> list[dict[str, object]]:
    found = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            found.append(record)
    return found


@pytest.fixture
def feed_server() -> Iterator[Server]:
    with serving(Feed(body=feed_of("v-1"), etag=ETAG)) as server:
        yield server


@pytest.mark.parametrize("command", ["sync", "check", "status"])
def test_human_output_on_stdout_logs_on_stderr(command: str, tmp_path: Path, feed_server: Server):
    """With logging at info, stdout has only the command's words; the JSON logs go to stderr."""
    config = write_config(tmp_path, feed_server.url())
    run("--config", str(config), "sync")  # status then has a record to show
    done = run(command, "--config", str(config), "--log-level", "info")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() and log_lines(done.stdout) == []
    if command != "status":  # status reads the record only: it may log nothing
        assert any(str(r["event"]).startswith("ics.") for r in log_lines(done.stderr))


def test_status_json_into_a_closed_pipe_exits_quietly(tmp_path: Path, feed_server: Server):
    """`status --json | head -1`: the reader goes away; no traceback, exit 141 (SIGPIPE)."""
    config = write_config(tmp_path, feed_server.url())
    process = subprocess.Popen(
        [*VISITWATCH, "--config", str(config), "status", "--json"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    process.stdout.close()  # before the command writes anything: like head after one line
    _, stderr = process.communicate(timeout=60)
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr.decode()
    assert process.returncode == 141


def test_status_json_piped_into_head_in_a_shell(tmp_path: Path, feed_server: Server):
    """The same through a real shell pipeline: head gets the first line, nothing else shows."""
    config = write_config(tmp_path, feed_server.url())
    command = " ".join([*VISITWATCH, "--config", str(config), "status", "--json", "--all"])
    done = subprocess.run(
        ["sh", "-c", f"{command} | head -1"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.stdout == "{\n" and done.stderr == ""


# ------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", "x.toml", "--log-level", "debug", "status"],
        ["status", "--config", "x.toml", "--log-level", "debug"],
        ["--config", "x.toml", "status", "--log-level", "debug"],
        ["--log-level", "debug", "status", "-c", "x.toml"],
        ["sources", "confirm", "team", "--config", "x.toml", "--log-level", "debug"],
    ],
)
def test_config_and_log_level_work_before_or_after_the_command(argv: list[str]):
    """Either order gives the same settings; one given before is not reset by the command."""
    args = build_parser().parse_args(argv)
    assert (args.config, args.log_level) == ("x.toml", "debug")


def test_without_the_options_the_defaults_stay():
    """Neither given: config None (VISITWATCH_CONFIG decides), log level from the config."""
    args = build_parser().parse_args(["status"])
    assert (args.config, args.log_level) == (None, None)


def test_a_real_command_reads_the_config_given_after_it(tmp_path: Path, feed_server: Server):
    """`visitwatch status --config FILE` runs against FILE (not $VISITWATCH_CONFIG)."""
    config = write_config(tmp_path, feed_server.url())
    done = run("status", "--config", str(config), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["visits"] == []
