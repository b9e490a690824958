"""The Lone Working Record export: one row per visit, its whole story, as CSV or JSON Lines.

A row holds the visit (worker, subject, address, times, deadline and every extension),
every state change from the audit (when, what caused it, who), the check-ins, every
notification (to whom, when, over which channel, whether delivered), who acknowledged, and
how it ended. Times are in the organisation's zone with their offset. JSON Lines keeps the
lists as lists; CSV writes each list into one readable cell, and neutralises cells a
spreadsheet would run as a formula (OWASP "CSV injection"). Visits are read a page at a
time, so a year's record streams in bounded memory. Every export is audited: who, which
days, which team.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from visitwatch.core.errors import VisitwatchError
from visitwatch.daemon import logs
from visitwatch.daemon.config import Config, config_path, load_config
from visitwatch.daemon.config_types import Directory, StaffMember
from visitwatch.daemon.store import Store, from_ts, ts

PRIVATE = "(private entry)"
PAGE = 200
FORMATS = ("csv", "jsonl")
# Board roles that export the whole organisation; other board roles export their team.
WHOLE_RECORD_ROLES = ("director", "admin")
# A spreadsheet runs a cell starting with one of these as a formula (OWASP CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
COLUMNS = (
    "visit", "worker_id", "worker", "subject", "address", "start", "end",
    "expected_return", "deadline", "extensions", "state_changes", "check_ins",
    "notifications", "acknowledged_by", "acknowledged_at", "outcome", "ended_at",
    "minutes_late",
)  # fmt: skip
_ENDINGS = {
    "checkin": "checked in",
    "safe_home": "safe at home",
    "confirmed_safe": "confirmed safe",
}
_STATUS = {"superseded": "not sent: the visit was resolved first", "failed": "failed"}


class ExportRefused(VisitwatchError):
    """This person may not export the record (or not the part asked for)."""


@dataclass(frozen=True)
class Scope:
    """Which visits: those starting in [start, end), of ``workers`` (None: everyone's)."""

    first: date
    last: date
    start: datetime
    end: datetime
    team: str = ""
    workers: frozenset[str] | None = None


def team_of(directory: Directory, manager_id: str) -> frozenset[str]:
    """The staff ids managed by ``manager_id``, directly or down the chain."""
    found: set[str] = set()
    frontier = {manager_id.strip().lower()}
    while frontier:
        reports = {m.id for m in directory.members.values() if m.manager in frontier}
        frontier = reports - found
        found |= reports
    found.discard(manager_id.strip().lower())
    return frozenset(found)


def scope(
    first: date, last: date, tz: ZoneInfo, directory: Directory, team: str | None = None
) -> Scope:
    """Visits starting from ``first`` to ``last`` inclusive, local days; ``team``'s only."""
    if last < first:
        raise VisitwatchError(f"--to {last} is before --from {first}")
    start = datetime.combine(first, time(0), tz)
    end = datetime.combine(last + timedelta(days=1), time(0), tz)
    if not team:
        return Scope(first, last, start, end)
    if directory.get(team) is None:
        raise VisitwatchError(f"--team {team!r}: nobody with that id is in the staff directory")
    return Scope(first, last, start, end, team.strip().lower(), team_of(directory, team))


def board_team(member: StaffMember) -> str:
    """Whose visits ``member`` may export from the board: "" for all, else their own team."""
    if member.role == "worker":
        raise ExportRefused("workers cannot export the record")
    return "" if member.role in WHOLE_RECORD_ROLES else member.id


def audit_export(store: Store, chosen: Scope, actor: str, via: str, fmt: str) -> None:
    """Who exported which days (and whose), in the audit."""
    now = datetime.now(chosen.start.tzinfo)
    with store.transaction() as conn:
        store.audit(
            conn, None, now, "record exported", actor, via=via, format=fmt,
            first=str(chosen.first), last=str(chosen.last), team=chosen.team or "everyone",
        )  # fmt: skip


class RecordExport:
    """Reads the record of the visits in a scope, one visit's story at a time."""

    def __init__(self, store: Store, directory: Directory, tz: ZoneInfo) -> None:
        self.store = store
        self.directory = directory
        self.tz = tz

    def records(self, chosen: Scope) -> Iterator[dict[str, Any]]:
        """Each visit's record, in start order, read ``PAGE`` visits at a time."""
        team = "" if chosen.workers is None else json.dumps(sorted(chosen.workers))
        after = ("", "")
        while True:
            rows = self.store.query(
                "SELECT * FROM visits WHERE start >= ? AND start < ?"
                " AND (start > ? OR (start = ? AND id > ?))"
                " AND (? = '' OR worker_id IN (SELECT value FROM json_each(?)))"
                " ORDER BY start, id LIMIT ?",
                (ts(chosen.start), ts(chosen.end), after[0], after[0], after[1], team, team or "[]",
                 PAGE),
            )  # fmt: skip
            for row in rows:
                yield self.record(row)
            if len(rows) < PAGE:
                return
            after = (rows[-1]["start"], rows[-1]["id"])

    def record(self, visit: dict[str, Any]) -> dict[str, Any]:
        """One visit's story, structured (the JSON Lines form)."""
        vid = visit["id"]
        audit = self.store.query("SELECT * FROM audit WHERE visit_id = ? ORDER BY id", (vid,))
        checkins = self.store.query("SELECT * FROM checkins WHERE visit_id = ? ORDER BY id", (vid,))
        notes = self.store.query(
            "SELECT * FROM notifications WHERE visit_id = ? ORDER BY id", (vid,)
        )
        hidden = bool(visit["private"]) and not visit.get("anonymised")
        member = self.directory.get(visit["worker_id"]) if visit["worker_id"] else None
        deadline = from_ts(visit["deadline"])
        ended = from_ts(visit["ended_at"])
        late = None
        if deadline is not None and visit["state"] == "resolved" and ended is not None:
            late = max(0, int((ended - deadline).total_seconds() // 60))
        acknowledged = None
        if visit["acknowledged_by"]:
            acknowledged = {
                "by": visit["acknowledged_by"],
                "at": self.local(visit["acknowledged_at"]),
            }
        return {
            "visit": vid,
            "source": visit["source"],
            "worker": {
                "id": visit["worker_id"],
                "name": member.name if member else visit["worker_label"] or visit["worker_id"],
            },
            "subject": PRIVATE if hidden else visit["subject"],
            "address": PRIVATE if hidden else visit["address"],
            "anonymised": bool(visit.get("anonymised")),
            "start": self.local(visit["start"]),
            "end": self.local(visit["end"]),
            "expected_return": self.local(visit["expected_return"]),
            "deadline": self.local(visit["deadline"]),
            "extensions": [self._extension(c, audit) for c in checkins if c["action"] == "extend"],
            "state": visit["state"],
            "state_changes": [
                {
                    "at": self.local(a["at"]),
                    "from": a["from_state"],
                    "to": a["to_state"],
                    "cause": a["cause"],
                    "actor": a["actor"],
                }
                for a in audit
            ],
            "check_ins": [
                {
                    "at": self.local(c["at"]),
                    "action": c["action"],
                    "by": c["actor"],
                    "via": c["via"],
                }
                for c in checkins
            ],
            "notifications": [self._notification(n) for n in notes],
            "acknowledged": acknowledged,
            "outcome": self._outcome(visit, audit, checkins),
            "ended_at": self.local(visit["ended_at"]),
            "minutes_late": late,
        }

    def local(self, stored: str | None) -> str | None:
        moment = from_ts(stored)
        return moment.astimezone(self.tz).isoformat(timespec="seconds") if moment else None

    def _extension(self, checkin: dict[str, Any], audit: list[dict[str, Any]]) -> dict[str, Any]:
        detail = json.loads(checkin["detail"] or "{}")
        minutes = _minutes(detail.get("minutes"))
        if minutes is None:  # anonymised: the audit's cause still says how long
            for line in audit:
                if line["at"] == checkin["at"] and line["cause"].startswith("extended by "):
                    minutes = _minutes(line["cause"].removeprefix("extended by "))
        return {
            "at": self.local(checkin["at"]),
            "minutes": minutes,
            "by": checkin["actor"],
            "via": checkin["via"],
        }

    def _notification(self, note: dict[str, Any]) -> dict[str, Any]:
        return {
            "at": self.local(note["created"]),
            "kind": note["kind"],
            "to": note["recipient_name"],
            "relation": note["recipient_relation"],
            "channel": note["channel"],
            "status": note["status"],
            "delivered": note["status"] == "sent",
            "sent_at": self.local(note["sent_at"]),
            "fallback": note["fallback_of"] is not None,
        }

    def _outcome(
        self, visit: dict[str, Any], audit: list[dict[str, Any]], checkins: list[dict[str, Any]]
    ) -> str:
        state = visit["state"]
        last = next((a for a in reversed(audit) if a["to_state"] == state), None)
        if state == "resolved":
            ending = next((c for c in reversed(checkins) if c["action"] in _ENDINGS), None)
            if ending:
                return f"{_ENDINGS[ending['action']]} by {ending['actor']} via {ending['via']}"
            return f"resolved ({last['cause']}, {last['actor']})" if last else "resolved"
        if state == "cancelled":
            return f"monitoring ended: {last['cause']}" if last else "cancelled"
        if state == "expired":
            return "first seen after its deadline: recorded, never escalated"
        return f"not over: {state}"


def _minutes(value: Any) -> int | None:
    """Minutes from a stored duration ("0:30:00", "1 day, 0:30:00") or a number."""
    if isinstance(value, int | float):
        return int(value)
    if not isinstance(value, str) or ":" not in value:
        return None
    days, _, clock = value.rpartition(", ")
    parts = clock.split(":")
    try:
        total = int(days.split()[0]) * 1440 if days else 0
        return total + int(parts[0]) * 60 + int(parts[1])
    except (ValueError, IndexError):
        return None


# ---------------------------------------------------------------------- writing


def safe_cell(value: Any) -> str:
    """A cell a spreadsheet shows as text: a leading =, +, -, @, tab or CR gets a quote."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def csv_cells(record: dict[str, Any], tz: ZoneInfo) -> list[str]:
    """A record as one CSV row: each list flattened into a readable cell."""
    day = datetime.fromisoformat(record["start"]).date()

    def when(text: str | None) -> str:
        if not text:
            return ""
        moment = datetime.fromisoformat(text).astimezone(tz)
        return f"{moment:%H:%M}" if moment.date() == day else f"{moment:%d %b %H:%M}"

    def sent(n: dict[str, Any]) -> str:
        status = f"sent {when(n['sent_at'])}" if n["delivered"] else n["status"]
        status = _STATUS.get(n["status"], status)
        extra = ", fallback" if n["fallback"] else ""
        return f"{when(n['at'])} {n['kind']} to {n['to']} ({n['relation']}) by {n['channel']} ({status}{extra})"

    ack = record["acknowledged"] or {}
    cells = [
        record["visit"], record["worker"]["id"], record["worker"]["name"], record["subject"],
        record["address"], record["start"], record["end"], record["expected_return"],
        record["deadline"],
        "; ".join(f"{when(e['at'])} +{e['minutes']} min by {e['by']} via {e['via']}"
                  for e in record["extensions"]),
        "; ".join(f"{when(c['at'])} {c['from'] or 'new'} -> {c['to']} ({c['cause']}; {c['actor']})"
                  for c in record["state_changes"]),
        "; ".join(f"{when(c['at'])} {c['action']} by {c['by']} via {c['via']}"
                  for c in record["check_ins"]),
        "; ".join(sent(n) for n in record["notifications"]),
        ack.get("by", ""), ack.get("at", ""), record["outcome"], record["ended_at"],
        record["minutes_late"],
    ]  # fmt: skip
    return [safe_cell(cell) for cell in cells]


def csv_lines(records: Iterable[dict[str, Any]], tz: ZoneInfo) -> Iterator[str]:
    """The CSV text, a line at a time (for a streamed download)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for record in records:
        writer.writerow(csv_cells(record, tz))
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    if buffer.getvalue():
        yield buffer.getvalue()


def jsonl_lines(records: Iterable[dict[str, Any]]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record, ensure_ascii=False) + "\n"


def lines(records: Iterable[dict[str, Any]], fmt: str, tz: ZoneInfo) -> Iterator[str]:
    return csv_lines(records, tz) if fmt == "csv" else jsonl_lines(records)


# ---------------------------------------------------------------------- the commands


def add_commands(command: Callable[[str, Any, str], argparse.ArgumentParser]) -> None:
    """``visitwatch export`` and ``visitwatch purge`` (``cli.build_parser`` calls this)."""
    from visitwatch.daemon.retention import cmd_purge

    p = command("export", cmd_export, "the Lone Working Record: one row per visit, CSV or JSONL")
    p.add_argument(
        "--from",
        dest="first",
        required=True,
        type=_day,
        metavar="DATE",
        help="first day (YYYY-MM-DD, the organisation's time zone)",
    )
    p.add_argument(
        "--to", dest="last", required=True, type=_day, metavar="DATE", help="last day, included"
    )
    p.add_argument(
        "--team",
        metavar="MANAGER_ID",
        help="only the visits of people this person manages, down the chain",
    )
    p.add_argument("--format", choices=FORMATS, default="csv")
    p.add_argument("--output", "-o", metavar="PATH", help="file to write (default: stdout)")
    p = command("purge", cmd_purge, "apply the [retention] periods now (what is kept, how long)")
    p.add_argument("--dry-run", action="store_true", help="show what would go; change nothing")


def command_config(args: argparse.Namespace) -> Config:
    config = load_config(config_path(args.config))
    logs.configure(args.log_level or config.daemon.log_level)
    return config


def cmd_export(args: argparse.Namespace) -> int:
    config = command_config(args)
    tz = config.daemon.timezone
    chosen = scope(args.first, args.last, tz, config.directory, args.team)
    store = Store(config.daemon.database)
    try:
        audit_export(store, chosen, f"{getpass.getuser()} (cli)", "cli", args.format)
        records = RecordExport(store, config.directory, tz).records(chosen)
        if args.output:
            # The record names people: the file is the owner's alone, whatever the umask.
            fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with open(fd, "w", encoding="utf-8", newline="") as out:
                out.writelines(lines(records, args.format, tz))
        else:
            sys.stdout.writelines(lines(records, args.format, tz))
            sys.stdout.flush()
    finally:
        store.close()
    return 0


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; write e.g. 2026-11-23") from None
