"""``visitwatch doctor``'s checks of the host: files, the record, disk, clock, the daemon.

Each check only reads: it never creates, chmods or migrates anything (run as root, a
doctor that created the database's companion files would lock the service out of them).
"""

from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from visitwatch.core.options import Secret
from visitwatch.daemon.config import Config
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.schema import MIGRATIONS
from visitwatch.daemon.store import from_ts
from visitwatch.daemon.web.links import KEY_FILE, OLD_KEY_FILE

OK, PROBLEM, WARN, INFO = "ok", "PROBLEM", "warn", "--"
LOW_DISK = 200 * 1024 * 1024  # bytes: below this, a burst of alerts could fill the disk


@dataclass(frozen=True)
class Finding:
    """One check's outcome: ``level`` is ok, PROBLEM, warn or -- (cannot tell / not used)."""

    level: str
    what: str
    text: str
    fix: str = ""


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# ----------------------------------------------------------------------- permissions


def private_files(config: Config) -> Iterator[tuple[str, Path]]:
    """Every file holding personal data or a secret: ``(what, path)``, existing or not."""
    database = config.daemon.database
    yield "database", database
    for suffix in ("-wal", "-shm"):
        yield "database", Path(str(database) + suffix)
    if config.web.signing_key is None:
        for name in (KEY_FILE, OLD_KEY_FILE):
            yield "key file", config.daemon.state_dir / name
    for channel in config.channels:
        if channel.type == "outbox" and channel.settings.get("path"):
            yield f"outbox {channel.name}", Path(channel.settings["path"])
    for connector in (*config.sources, *config.channels):
        yield from _secret_files(f"secret of {connector.name}", connector.settings.values())
    yield from _secret_files("secret", [config.web.signing_key, config.daemon.heartbeat_url])


def _secret_files(what: str, values: Any) -> Iterator[tuple[str, Path]]:
    for value in values:
        if isinstance(value, Secret) and value.origin.startswith("file "):
            yield what, Path(value.origin.removeprefix("file "))


def permissions(config: Config) -> list[Finding]:
    findings = []
    if config.path is not None:
        mode = config.path.stat().st_mode & 0o777
        if mode & 0o002:
            findings.append(
                Finding(
                    PROBLEM,
                    f"config {config.path}",
                    f"anyone on this machine can change it (mode {mode:04o})",
                    f"chmod o-w {config.path}",
                )
            )
    state_dir = config.daemon.state_dir
    if state_dir.is_dir() and state_dir.stat().st_mode & 0o002:
        findings.append(
            Finding(
                PROBLEM,
                f"state folder {state_dir}",
                "anyone on this machine can write in it",
                f"chmod 750 {state_dir}",
            )
        )
    me = os.geteuid()
    for what, path in private_files(config):
        try:
            info = path.stat()
        except OSError:
            continue  # not there (yet): nothing to protect
        mode = info.st_mode & 0o777
        if mode & 0o007:
            findings.append(
                Finding(
                    PROBLEM,
                    f"{what} {path}",
                    f"other users can read or change it (mode {mode:04o}): it holds personal "
                    "data or a secret",
                    f"chmod 600 {path} (or 640 for the service's group)",
                )
            )
        elif mode & 0o030:
            findings.append(
                Finding(
                    PROBLEM,
                    f"{what} {path}",
                    f"its group can change it (mode {mode:04o})",
                    f"chmod 640 {path}",
                )
            )
        if info.st_uid != me:
            findings.append(
                Finding(
                    WARN,
                    f"{what} {path}",
                    f"owned by {owner_name(info.st_uid)}, not by you ({owner_name(me)})",
                    f"run doctor as the service's user (sudo -u {owner_name(info.st_uid)} "
                    "visitwatch doctor), or chown the file to it",
                )
            )
    if not findings:
        findings.append(Finding(OK, "permissions", "the config and private files are protected"))
    return findings


# ----------------------------------------------------------------------- the record


def read_only(database: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    return conn


def database(config: Config) -> list[Finding]:
    path = config.daemon.database
    what = f"database {path}"
    if not path.exists():
        return [Finding(INFO, what, "does not exist yet: the daemon creates it when it starts")]
    restore = (
        "stop visitwatch, move the damaged file aside and restore the latest backup "
        "(README: Backups); then start visitwatch"
    )
    try:
        conn = read_only(path)
        try:
            check = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
            applied = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:
        return [Finding(PROBLEM, what, f"cannot be read: {err}", restore)]
    if check != ["ok"]:
        shown = "; ".join(check[:3]) + (f" and {len(check) - 3} more" if len(check) > 3 else "")
        return [Finding(PROBLEM, what, f"is damaged: {shown}", restore)]
    known = [name for name, _ in MIGRATIONS]
    newer = sorted(applied - set(known))
    if newer:
        return [
            Finding(
                PROBLEM,
                what,
                f"was written by a newer visitwatch (migrations {', '.join(newer)})",
                "install that release again (an older one must not change this record)",
            )
        ]
    missing = [name for name in known if name not in applied]
    if missing:
        return [
            Finding(
                INFO,
                what,
                f"intact; {len(missing)} migration(s) are applied at the daemon's next start",
            )
        ]
    return [Finding(OK, what, f"intact (quick_check), all {len(known)} migrations applied")]


def disk(config: Config) -> list[Finding]:
    folder = config.daemon.database.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError as err:
        return [Finding(PROBLEM, f"disk {folder}", f"cannot be examined: {err.strerror}")]
    free = usage.free
    text = f"{free / 1024**3:.1f} GB free of {usage.total / 1024**3:.1f} GB"
    if free < LOW_DISK or free < usage.total * 0.02:
        return [
            Finding(
                PROBLEM,
                f"disk {folder}",
                f"only {text}: when it is full nothing is recorded (alerts still go out)",
                "free space on that filesystem (old logs, journald's vacuum)",
            )
        ]
    return [Finding(OK, f"disk {folder}", text)]


def clock_sync() -> Finding:
    """Deadlines are compared on the wall clock: is it kept right by NTP?"""
    if shutil.which("timedatectl") is None:
        return Finding(INFO, "clock", "cannot tell whether it is synchronised (no timedatectl)")
    try:
        answer = subprocess.run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return Finding(INFO, "clock", f"cannot tell whether it is synchronised ({err})")
    value = answer.stdout.strip()
    if answer.returncode != 0 or value not in ("yes", "no"):
        return Finding(
            INFO, "clock", "cannot tell whether it is synchronised (timedatectl gave no answer)"
        )
    if value == "no":
        return Finding(
            PROBLEM,
            "clock",
            "not synchronised by NTP: reminders and alerts go out by this clock",
            "timedatectl set-ntp true (and check systemd-timesyncd or chrony)",
        )
    return Finding(OK, "clock", "synchronised by NTP")


def clock_against(date_header: str | None, now: datetime, where: str) -> Finding | None:
    """Compare with an HTTP ``Date`` header from ``where``: more than 2 min apart is wrong."""
    from email.utils import parsedate_to_datetime

    if not date_header:
        return None
    try:
        theirs = parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return None
    apart = abs((now - theirs).total_seconds())
    if apart > 120:
        return Finding(
            PROBLEM,
            "clock",
            f"{round(apart)} s apart from {where}'s clock",
            "make sure NTP keeps this machine's clock right (timedatectl set-ntp true)",
        )
    return Finding(OK, "clock", f"within {round(apart)} s of {where}'s clock")


# ----------------------------------------------------------------------- the daemon


def daemon_holder(config: Config) -> str | None:
    """The pid of the daemon holding the database's lock, or None when none runs.

    Tried with a shared lock on a read-only descriptor: nothing is created or written.
    """
    path = Path(str(config.daemon.database) + ".lock")
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return path.read_text().strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def daemon_running(config: Config, now: datetime) -> Finding:
    limit = 3 * config.daemon.sweep_interval + timedelta(seconds=30)
    last = None
    if config.daemon.database.exists():
        try:
            conn = read_only(config.daemon.database)
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'last_sweep_at'").fetchone()
            finally:
                conn.close()
            last = from_ts(row[0]) if row else None
        except (sqlite3.Error, ValueError):
            last = None
    tz = config.daemon.timezone
    swept = f"last sweep {fmt_local(last, tz)}" if last else "no sweep recorded"
    pid = daemon_holder(config)
    if pid is None:
        return Finding(
            PROBLEM,
            "daemon",
            f"not running ({swept}): nothing is being watched",
            "systemctl start visitwatch; `journalctl -u visitwatch` says why it stopped",
        )
    if last is None or now - last > limit:
        ago = f"{round((now - last).total_seconds())} s ago" if last else "never"
        return Finding(
            PROBLEM,
            "daemon",
            f"running (pid {pid}) but its last sweep was {ago} (limit "
            f"{round(limit.total_seconds())} s): it is stuck",
            "systemctl restart visitwatch; keep `journalctl -u visitwatch` for a bug report",
        )
    return Finding(OK, "daemon", f"running (pid {pid}), {swept}")
