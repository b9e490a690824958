"""`visitwatch backup`: a consistent, private copy taken while the daemon runs, and a restore
done as the README says that resumes what was pending."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import home_visit, ics_calendar
from tests.daemon_process import REPO, VISITWATCH, Daemon, wait_for, write_config
from visitwatch.connectors.outbox import read_outbox
from visitwatch.daemon.backup import BackupError, backup
from visitwatch.daemon.store import Store

ASHA = "asha.khan@example.org"
MARIA = "maria.jones@example.org"
FAST = """
    poll_interval = "1s"
    sweep_interval = "1s"
"""
# The manager is alerted this long after the deadline: time to back up and kill first.
OVERRUN_AFTER = 10
LADDER = f"""
    [[policy.escalation]]
    after = "0s"
    to = ["worker"]
    kind = "reminder"

    [[policy.escalation]]
    after = "{OVERRUN_AFTER}s"
    to = ["manager"]
    kind = "overrun"
"""


def alerts(outbox: Path) -> Counter[tuple[str, str]]:
    """(kind, recipient id) of every record in the outbox, counted."""
    return Counter((r["kind"], r["recipient"]["id"]) for r in read_outbox(outbox))


def sent_reminders(database: Path) -> int:
    """Reminders the record marks as sent (read-only: the daemon owns the database)."""
    with sqlite3.connect(database.resolve().as_uri() + "?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM notifications WHERE kind = 'reminder' AND status = 'sent'"
        ).fetchone()
    return int(row[0])


def test_restored_backup_resumes_and_escalates_what_was_pending(tmp_path: Path):
    """Backed up while the daemon runs, killed, database destroyed, backup restored: the
    manager's overdue alert still arrives, and the worker is not reminded a second time."""
    deadline = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    calendar = ics_calendar(home_visit("v-1", start=deadline - timedelta(minutes=30), end=deadline))
    (tmp_path / "calendar.ics").write_text(calendar, encoding="utf-8")
    config = write_config(tmp_path, daemon=FAST, policy=LADDER)
    database, outbox = tmp_path / "visitwatch.db", tmp_path / "outbox.jsonl"
    saved = tmp_path / "backups" / "visitwatch.db"
    daemon = Daemon(config)
    try:
        daemon.start()
        wait_for(lambda: sent_reminders(database) == 1, 20, "the worker's reminder")
        made = subprocess.run(
            [*VISITWATCH, "--config", str(config), "backup", str(saved)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert made.returncode == 0, made.stderr
        assert f"backup written: {saved}" in made.stdout
        assert "1 visits, integrity check ok" in made.stdout
        assert saved.stat().st_mode & 0o777 == 0o600
        assert ("overrun", MARIA) not in alerts(outbox), "too slow: overrun before the backup"
        daemon.kill()

        # The disk is lost: the record and its WAL are gone (or garbage).
        for suffix in ("-wal", "-shm"):
            Path(f"{database}{suffix}").unlink(missing_ok=True)
        database.write_bytes(b"\0" * 4096)

        # Restore as the README says: stop (done), remove, copy with mode 0600, start.
        database.unlink()
        shutil.copyfile(saved, database)
        os.chmod(database, 0o600)
        daemon.start()
        wait_for(
            lambda: ("overrun", MARIA) in alerts(outbox),
            OVERRUN_AFTER + 20,
            "the manager's overrun alert after the restore",
        )
        daemon.terminate(10)
    finally:
        daemon.close()
    sent = alerts(outbox)
    assert sent[("reminder", ASHA)] == 1, f"the restore forgot the reminder: {sent}"
    assert sent[("overrun", MARIA)] == 1


def test_backup_holds_transactions_still_in_the_wal_file(tmp_path: Path):
    """Rows committed but not yet checkpointed (only in -wal) are in the backup: no file copy."""
    database = tmp_path / "visitwatch.db"
    store = Store(database)
    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO meta (key, value) VALUES ('proof', 'only in the wal')")
    assert Path(f"{database}-wal").stat().st_size > 0
    try:
        made = backup(database, tmp_path / "copy.db")
    finally:
        writer.close()
        store.close()
    with sqlite3.connect(made.path) as copy:
        assert copy.execute("SELECT value FROM meta WHERE key = 'proof'").fetchone() == (
            "only in the wal",
        )
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert not Path(f"{made.path}-wal").exists()


def test_backup_completes_while_another_connection_keeps_writing(tmp_path: Path):
    """A busy writer neither blocks the backup nor is blocked; the copy is consistent."""
    database = tmp_path / "visitwatch.db"
    store = Store(database)
    stop = threading.Event()
    written = []

    def write() -> None:
        n = 0
        while not stop.is_set():
            with store.transaction() as conn:
                conn.execute("INSERT INTO meta (key, value) VALUES (?, 'x')", (f"k{n}",))
            written.append(n)
            n += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        wait_for(lambda: len(written) > 20, 10, "the writer to get going")
        made = backup(database, tmp_path / "copy.db", pages=1, pause=0.001)
        before = len(written)
        wait_for(lambda: len(written) > before + 20, 10, "the writer to go on after the backup")
    finally:
        stop.set()
        thread.join(timeout=10)
        store.close()
    with sqlite3.connect(made.path) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        keys = copy.execute("SELECT COUNT(*) FROM meta WHERE key LIKE 'k%'").fetchone()[0]
    assert 20 < keys <= len(written)


def test_backup_is_private_whatever_the_umask_and_a_folder_gets_a_dated_file(tmp_path: Path):
    """With umask 000 the copy is still 0600; a folder as PATH gets visitwatch-<time>.db."""
    database = tmp_path / "visitwatch.db"
    Store(database).close()
    folder = tmp_path / "backups"
    folder.mkdir()
    old = os.umask(0o000)
    try:
        made = backup(database, folder)
    finally:
        os.umask(old)
    assert made.path.parent == folder and made.path.name.startswith("visitwatch-")
    assert made.path.stat().st_mode & 0o777 == 0o600
    assert made.visits == 0
    assert sorted(p.name for p in folder.iterdir()) == [made.path.name]


def test_a_failed_backup_leaves_the_previous_one_untouched(tmp_path: Path):
    """A database that is not a record is refused; the old backup and no temp file remain."""
    stranger = tmp_path / "other.db"
    with sqlite3.connect(stranger) as conn:
        conn.execute("CREATE TABLE t (x)")
    target = tmp_path / "backups" / "visitwatch.db"
    target.parent.mkdir()
    target.write_bytes(b"yesterday's backup")
    with pytest.raises(BackupError, match="not a visitwatch record"):
        backup(stranger, target)
    assert target.read_bytes() == b"yesterday's backup"
    assert [p.name for p in target.parent.iterdir()] == ["visitwatch.db"]


def test_backup_refuses_to_overwrite_the_record_itself(tmp_path: Path):
    """Giving the database's own path as PATH is refused before anything is written."""
    database = tmp_path / "visitwatch.db"
    Store(database).close()
    size = database.stat().st_size
    with pytest.raises(BackupError, match="the record itself"):
        backup(database, tmp_path / "." / "visitwatch.db")
    assert database.stat().st_size == size


def test_backup_of_a_missing_record_says_so_and_creates_nothing(tmp_path: Path):
    """A wrong [daemon] database path is an error, not a new empty record and an empty backup."""
    with pytest.raises(BackupError, match="no record at"):
        backup(tmp_path / "missing.db", tmp_path / "copy.db")
    assert list(tmp_path.iterdir()) == []
