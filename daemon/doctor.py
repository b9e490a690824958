"""``visitwatch doctor``: one command an admin runs on a misbehaving install.

Each check prints ``ok`` or ``PROBLEM`` with the fix (``warn`` and ``--`` for what needs a
look or cannot be told); the exit status is 1 when any check found a problem. Checks: the
config loads; files are protected; the record is intact and migrated; disk space; the
clock; the daemon runs and sweeps; each source, channel and person's reach (the code
``visitwatch check`` uses); the external heartbeat; the pages.
"""

from __future__ import annotations

import argparse
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from visitwatch import __version__
from visitwatch.core.errors import VisitwatchError
from visitwatch.daemon import doctor_checks as checks
from visitwatch.daemon import logs
from visitwatch.daemon.clock import Clock, SystemClock
from visitwatch.daemon.config import Config, config_path, load_config
from visitwatch.daemon.doctor_checks import INFO, OK, PROBLEM, WARN, Finding
from visitwatch.daemon.heartbeat import (
    META_ERROR,
    META_FAILING_SINCE,
    META_LAST_OK,
    shown,
    url_text,
)
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.store import from_ts

Command = Callable[[str, Any, str], argparse.ArgumentParser]
CONNECTOR_FIX = "correct its entry in the config, or the service it talks to (its error says which)"


def add_commands(command: Command) -> None:
    command(
        "doctor", cmd_doctor, "check this install: config, files, record, clock, daemon, connectors"
    )


def cmd_doctor(args: argparse.Namespace) -> int:
    findings = examine(args.config, SystemClock())
    for finding in findings:
        print(format_finding(finding))
    problems = sum(1 for f in findings if f.level == PROBLEM)
    print(f"\n{problems} problem(s) found" if problems else "\nno problems found")
    return 1 if problems else 0


def format_finding(finding: Finding) -> str:
    line = f"{finding.level:<8} {finding.what}: {finding.text}"
    if finding.fix and finding.level in (PROBLEM, WARN):
        line += f"\n{'':<8} fix: {finding.fix}"
    return line


def examine(explicit: str | None, clock: Clock) -> list[Finding]:
    """Every check, in the order an admin would fix them."""
    try:
        path = config_path(explicit)
        config = load_config(path)
    except VisitwatchError as err:
        return [
            Finding(
                PROBLEM,
                "config",
                str(err),
                "correct the file: each problem names its key and how to fix it",
            )
        ]
    logs.configure("error")  # findings, not log lines, on the admin's terminal
    now = clock.now()
    findings = [
        Finding(
            OK,
            "config",
            f"{path.resolve()} loads ({len(config.directory.members)} staff, "
            f"{len(config.sources)} sources, {len(config.channels)} channels); visitwatch "
            f"{__version__}, running as {checks.owner_name(os.geteuid())}",
        )
    ]
    findings += checks.permissions(config)
    record = checks.database(config)
    findings += record
    findings += checks.disk(config)
    findings.append(checks.clock_sync())
    findings.append(checks.daemon_running(config, now))
    findings += heartbeat(config)
    findings += connectors(config, clock, usable=all(f.level != PROBLEM for f in record))
    return findings


def heartbeat(config: Config) -> list[Finding]:
    """Is the monitor's host reachable, and did the daemon's last pings get through?"""
    url = config.daemon.heartbeat_url
    if url is None:
        return [
            Finding(
                INFO,
                "heartbeat",
                "not configured: nobody outside hears if this machine or visitwatch dies "
                "(README: Watching the watcher)",
            )
        ]
    text = url_text(url)
    where = shown(text)
    parts = urlsplit(text)
    # Only the host's front page: a request to the ping URL itself would count as a ping.
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/",
        headers={"User-Agent": f"visitwatch/{__version__}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            date = answer.headers.get("Date")
    except urllib.error.HTTPError as err:  # an answer all the same
        date = err.headers.get("Date")
    except (OSError, ValueError) as err:
        return [
            Finding(
                PROBLEM,
                "heartbeat",
                f"{where} cannot be reached: {getattr(err, 'reason', err)}",
                "check the address, DNS, the firewall and any proxy between here and it",
            )
        ]
    findings = [Finding(OK, "heartbeat", f"{where} answers")]
    # This machine's clock itself, whatever clock the other checks are given.
    compared = checks.clock_against(date, datetime.now(UTC), where)
    if compared is not None:
        findings.append(compared)
    findings += _heartbeat_record(config)
    return findings


def _heartbeat_record(config: Config) -> list[Finding]:
    if not config.daemon.database.exists():
        return []
    try:
        conn = checks.read_only(config.daemon.database)
        try:
            meta = dict(
                conn.execute(
                    "SELECT key, value FROM meta WHERE key IN (?, ?, ?)",
                    (META_FAILING_SINCE, META_ERROR, META_LAST_OK),
                ).fetchall()
            )
        finally:
            conn.close()
    except Exception:  # the database check has said what is wrong with the record
        return []
    tz = config.daemon.timezone
    failing = from_ts(meta.get(META_FAILING_SINCE) or None)
    if failing is not None:
        return [
            Finding(
                PROBLEM,
                "heartbeat",
                f"the daemon's pings fail since {fmt_local(failing, tz)}: "
                f"{meta.get(META_ERROR, '')}",
                "check the check's address (heartbeat_url) and that it is not paused",
            )
        ]
    last = from_ts(meta.get(META_LAST_OK) or None)
    if last is not None:
        return [Finding(OK, "heartbeat", f"the daemon's last ping was taken {fmt_local(last, tz)}")]
    return []


def connectors(config: Config, clock: Clock, usable: bool) -> list[Finding]:
    """Each source, channel and person's reach, then the pages: as ``visitwatch check``."""
    if not usable:
        return [Finding(INFO, "sources and channels", "not tried until the record is fixed")]
    owner = _record_owner(config.daemon.database)
    if owner is not None and owner != os.geteuid():
        # As another user it could create the record's companion files the service
        # then cannot open.
        name = checks.owner_name(owner)
        return [
            Finding(
                WARN,
                "sources and channels",
                f"not tried: the record belongs to {name}",
                f"sudo -u {name} visitwatch --config {config.path} doctor",
            )
        ]
    from visitwatch.daemon.connector_checks import connector_checks, reach_checks
    from visitwatch.daemon.service import Service
    from visitwatch.daemon.status import pages_check

    try:
        service = Service(config, clock)
    except VisitwatchError as err:
        return [Finding(PROBLEM, "service", f"cannot be built: {err}", CONNECTOR_FIX)]
    findings = []
    try:
        for ok, line in [*connector_checks(service), *reach_checks(config)]:
            what, _, text = line[5:].partition(": ")
            findings.append(
                Finding(OK, what, text) if ok else Finding(PROBLEM, what, text, CONNECTOR_FIX)
            )
        if config.web.enabled:
            findings += _pages(pages_check(service)[0])
    finally:
        service.close()
    return findings


def _pages(lines: list[str]) -> list[Finding]:
    levels = {"ok": OK, "FAIL": PROBLEM, "WARN": WARN, "--": INFO}
    findings = []
    for line in lines:
        level, _, rest = line.partition(" ")
        what, _, text = rest.strip().partition(": ")
        fix = "see README: Pages and links" if level in ("FAIL", "WARN") else ""
        findings.append(Finding(levels.get(level, INFO), what, text, fix))
    return findings


def _record_owner(database: Path) -> int | None:
    try:
        return database.stat().st_uid
    except OSError:
        return None
