"""Every file the daemon writes (record, WAL, lock, state files, outbox, link key) is private
whatever the umask: 0600, the outbox 0640 to the service group, folders it makes 0750."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from tests.conftest import STAFF, home_visit, ics_calendar
from tests.daemon_process import REPO, VISITWATCH, Daemon, wait_for
from tests.ics_feed import Feed, serving
from tests.mailserver import free_port
from visitwatch.connectors.outbox import OutboxChannel
from visitwatch.core.notification import Message, Recipient
from visitwatch.core.options import ConnectorContext
from visitwatch.daemon.store import Store

OUTBOX = "out/outbox.jsonl"
# What the test itself writes into the folder; everything else is the daemon's.
OURS = {"visitwatch.toml", "calendar.ics", "daemon.log"}


class StateDaemon(Daemon):
    """The daemon with its record in ``state/`` (the lock the helper waits on is there)."""

    @property
    def lock(self) -> Path:
        return self.config.parent / "state" / "visitwatch.db.lock"


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of everything under ``folder`` the daemon made, by relative path."""
    found = {}
    for path in folder.rglob("*"):
        name = str(path.relative_to(folder))
        if name not in OURS:
            found[name] = stat.S_IMODE(path.lstat().st_mode)
    return found


def too_open(found: dict[str, int], folder: Path) -> dict[str, str]:
    """Files and folders with more permission than allowed, as octal for the message."""
    bad = {}
    for name, mode in found.items():
        if (folder / name).is_dir():
            allowed = 0o750
        elif name == OUTBOX:
            allowed = 0o640
        else:
            allowed = 0o600
        if mode & ~allowed:
            bad[name] = oct(mode)
    return bad


def config_text(feed_url: str, port: int) -> str:
    return (
        '[daemon]\ndatabase = "state/visitwatch.db"\nstate_dir = "state"\n'
        'timezone = "Europe/London"\npoll_interval = "1s"\nsweep_interval = "1s"\n'
        f'public_base_url = "http://127.0.0.1:{port}"\n'
        f'[web]\nenabled = true\nlisten = "127.0.0.1"\nport = {port}\n'
        + STAFF
        + '\n[[sources]]\nname = "team"\ntype = "ics"\npath = "calendar.ics"\n'
        'owner = "asha.khan@example.org"\n'
        f'\n[[sources]]\nname = "published feed"\ntype = "ics"\nurl = "{feed_url}"\n'
        'owner = "ben.okafor@example.org"\n'
        f'\n[[channels]]\nname = "outbox"\ntype = "outbox"\npath = "{OUTBOX}"\n'
        '\n[policy]\npreset = "pan-lancashire"\n'
        '[[policy.escalation]]\nafter = "0s"\nto = ["worker"]\nkind = "reminder"\n'
    )


def test_every_file_the_daemon_creates_is_private_under_umask_000(tmp_path: Path):
    """umask 000 and a running daemon with pages, a feed and an alert: nothing is readable
    by other users, nothing writable by the group, while it runs and after it stops."""
    deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
    calendar = ics_calendar(home_visit("v-1", start=deadline - timedelta(minutes=30), end=deadline))
    (tmp_path / "calendar.ics").write_text(calendar, encoding="utf-8")
    feed = Feed(body=calendar.replace("v-1", "v-2").encode(), etag='"feed-1"')
    with serving(feed) as server:
        config = tmp_path / "visitwatch.toml"
        config.write_text(config_text(server.url(), free_port()), encoding="utf-8")
        daemon = StateDaemon(config)
        try:
            with umask(0o000):
                daemon.start()
            state = tmp_path / "state"
            expected = [
                tmp_path / OUTBOX,
                state / "visitwatch.db-wal",
                state / "web-signing.key",
                state / "ics-published_feed.json",
            ]
            wait_for(lambda: all(p.exists() for p in expected), 20, "the daemon's files")
            running = modes(tmp_path)
            daemon.terminate(10)
        finally:
            daemon.close()
    stopped = modes(tmp_path)
    for name in ("state/visitwatch.db", "state/visitwatch.db.lock", OUTBOX, "state"):
        assert name in running, f"{name} missing: {sorted(running)}"
    assert "state/visitwatch.db-shm" in running
    assert too_open(running, tmp_path) == {}, daemon.log_tail()
    assert too_open(stopped, tmp_path) == {}


def test_files_left_loose_by_an_older_release_are_tightened(tmp_path: Path):
    """A 0644 record and a 0666 outbox are tightened on the next open; never loosened."""
    database, outbox = tmp_path / "visitwatch.db", tmp_path / "outbox.jsonl"
    Store(database).close()
    database.chmod(0o644)
    outbox.write_text("")
    outbox.chmod(0o666)
    Store(database).close()
    context = ConnectorContext(ZoneInfo("UTC"), tmp_path, tmp_path)
    channel = OutboxChannel("outbox", {"path": str(outbox)}, context)
    message = Message(1, "admin", None, Recipient("x", "X"), "outbox", "s", "t", datetime.now(UTC))
    channel.send(message)
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o640
    outbox.chmod(0o600)  # an admin made it stricter: it stays so
    channel.send(message)
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o600


def test_a_state_folder_apart_from_the_record_is_not_world_writable(tmp_path: Path):
    """state_dir made by the daemon (record elsewhere, pages on) is 0750 at most, umask 000."""
    config = tmp_path / "visitwatch.toml"
    config.write_text(
        config_text("http://127.0.0.1:9/feed.ics", free_port()).replace(
            'database = "state/visitwatch.db"', 'database = "db/visitwatch.db"'
        ),
        encoding="utf-8",
    )
    (tmp_path / "calendar.ics").write_text(ics_calendar(), encoding="utf-8")
    with umask(0o000):
        done = subprocess.run(
            [*VISITWATCH, "--config", str(config), "status"],
            cwd=REPO,
            capture_output=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert too_open(modes(tmp_path), tmp_path) == {}
