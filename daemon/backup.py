"""``visitwatch backup PATH``: a consistent copy of the record, taken while the daemon runs.

A file copy of a live WAL database can miss committed transactions (they may still be in
the -wal file) or catch a page half written. SQLite's online backup API copies a
consistent snapshot instead: a few hundred pages at a time, with a short pause between
steps so the daemon's writes never wait long. A write by the daemon between two steps
restarts the copy from a fresh snapshot; after a few restarts (a busy record) the rest is
copied in one step, which in WAL mode still blocks no writer (it only holds a snapshot). The copy is written to a temporary file beside the target,
checked with ``PRAGMA integrity_check``, made a single self-contained file (rollback
journal mode) and only then renamed into place: a failed backup never leaves a truncated
file under the name an admin trusts. The copy holds the same personal data as the record,
so it is 0600 whatever the umask.

Restoring (README, "Backup and restore"): stop the daemon, remove the database and its
-wal and -shm files, put the copy in place with the service's owner and mode 0600, start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from visitwatch.core.errors import VisitwatchError
from visitwatch.core.private_files import make_dirs, open_private, sync_folder
from visitwatch.daemon import logs
from visitwatch.daemon.config import config_path, load_config
from visitwatch.daemon.store import BUSY_TIMEOUT

log = structlog.get_logger(__name__)

# Pages copied per step (4 KiB each: 1 MiB), and the pause after each step, during which
# the daemon may write.
STEP_PAGES = 256
STEP_PAUSE = 0.005
# Restarts tolerated before the copy is done in one step.
MAX_RESTARTS = 3


class BackupError(VisitwatchError):
    """The backup could not be made; nothing was left under the target's name."""


@dataclass(frozen=True)
class Backup:
    """A verified copy of the record."""

    path: Path
    size: int
    visits: int


def backup(
    database: Path, target: Path, *, pages: int = STEP_PAGES, pause: float = STEP_PAUSE
) -> Backup:
    """Copy ``database`` to ``target`` (a file, or a folder to put a dated file in)."""
    target = _target_file(target)
    if not database.is_file():
        raise BackupError(f"no record at {database} to back up (check [daemon] database)")
    if target.exists() and target.samefile(database):
        raise BackupError(f"{target} is the record itself: give another path")
    make_dirs(target.parent)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        # Created 0600 before SQLite writes a byte into it (SQLite keeps an existing mode).
        os.close(open_private(temporary, os.O_WRONLY | os.O_TRUNC))
        visits = _copy(database, temporary, pages, _pausing(pause))
        _fsync(temporary)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    sync_folder(target.parent)
    return Backup(target, target.stat().st_size, visits)


def _target_file(target: Path) -> Path:
    if target.is_dir():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return target / f"visitwatch-{stamp}.db"
    return target


class _Restarting(Exception):
    """The record keeps changing under a stepped copy: copy it in one step instead."""


def _pausing(pause: float) -> Callable[[int, int, int], None]:
    """Pause after each step; give up stepping after ``MAX_RESTARTS`` restarts."""
    last = [0, 0]  # pages remaining after the previous step, restarts seen

    def progress(_status: int, remaining: int, _total: int) -> None:
        if remaining > last[0] > 0:  # SQLite began again: the record changed meanwhile
            last[1] += 1
            if last[1] > MAX_RESTARTS:
                raise _Restarting
        last[0] = remaining
        if remaining:
            time.sleep(pause)  # the daemon's writers get the database between steps

    return progress


def _copy(
    database: Path, copy_path: Path, pages: int, progress: Callable[[int, int, int], None]
) -> int:
    """Copy through the online backup API, verify the copy; returns its number of visits."""
    try:
        # mode=rw: never create an empty database where the record should be.
        source = sqlite3.connect(
            database.resolve().as_uri() + "?mode=rw", uri=True, timeout=BUSY_TIMEOUT
        )
    except sqlite3.Error as err:
        raise BackupError(f"cannot open the record {database}: {err}") from err
    try:
        copy = sqlite3.connect(copy_path, isolation_level=None)
        try:
            try:
                try:
                    source.backup(copy, pages=pages, progress=progress)
                except _Restarting:
                    log.info("backup_in_one_step", restarts=MAX_RESTARTS)
                    source.backup(copy, pages=-1)
            except sqlite3.Error as err:
                raise BackupError(f"cannot copy the record {database}: {err}") from err
            # The copy inherits the record's WAL mode; as a backup it should be one file.
            copy.execute("PRAGMA journal_mode=DELETE")
            return _verified(copy, database)
        finally:
            copy.close()
    finally:
        source.close()


def _verified(copy: sqlite3.Connection, database: Path) -> int:
    problems = [row[0] for row in copy.execute("PRAGMA integrity_check")]
    if problems != ["ok"]:
        shown = "; ".join(problems[:5])
        raise BackupError(
            f"the copy of {database} failed SQLite's integrity check ({shown}); the record "
            "itself may be damaged: run `visitwatch doctor`"
        )
    try:
        return int(copy.execute("SELECT COUNT(*) FROM visits").fetchone()[0])
    except sqlite3.Error as err:
        raise BackupError(f"{database} is not a visitwatch record ({err})") from err


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def size_text(size: int) -> str:
    """1536 -> "1.5 KiB": sizes as an admin reads them."""
    if size < 1024:
        return f"{size} bytes"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# ----------------------------------------------------------------------- command


def add_commands(command: Callable[[str, Any, str], argparse.ArgumentParser]) -> None:
    p = command(
        "backup",
        cmd_backup,
        "copy the record to PATH while the daemon runs (SQLite online backup, checked, 0600)",
    )
    p.add_argument("path", type=Path, help="the backup file, or a folder for a dated file")
    p.add_argument(
        "--database",
        type=Path,
        help="the record to copy (default: [daemon] database in the config)",
    )


def cmd_backup(args: argparse.Namespace) -> int:
    database = args.database
    if database is None:
        config = load_config(config_path(args.config))
        logs.configure(args.log_level or config.daemon.log_level)
        database = config.daemon.database
    made = backup(Path(database), args.path)
    log.info("backup_written", size=made.size, visits=made.visits)
    print(
        f"backup written: {made.path} ({size_text(made.size)}, {made.visits} visits, "
        "integrity check ok)"
    )
    return 0
