"""``visitwatch``: the daemon and the commands admins, managers and staff type."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from visitwatch import __version__
from visitwatch.core.errors import VisitwatchError
from visitwatch.core.options import parse_duration
from visitwatch.daemon import backup, doctor, export, init_config, logs, status
from visitwatch.daemon.config import Config, config_path, load_config
from visitwatch.daemon.connector_checks import connector_checks, reach_checks
from visitwatch.daemon.messages import fmt_local
from visitwatch.daemon.reach import unreachable
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import record_unwritable, ts

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    # Until the config names a level: warnings and errors only, and on stderr (structlog's
    # default is stdout, where they would mix with the command's output).
    logs.configure("warning")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit as a traceback
    except BrokenPipeError:
        # `visitwatch status --json | head -1`: the reader has what it wanted. Python's
        # documented remedy: point stdout at /dev/null so the flush at exit cannot fail too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except VisitwatchError as err:
        # Errors written for people: no traceback, just what is wrong and how to fix it.
        print(f"visitwatch: {err}", file=sys.stderr)
        return 2
    except sqlite3.Error as err:
        if not record_unwritable(err):
            raise
        print(
            f"visitwatch: cannot write the record ({err}); the disk may be full. Nothing was "
            "recorded: if you were checking in or acknowledging, tell your manager another "
            "way, and tell your admin.",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visitwatch",
        description="Watches home visits in calendars and escalates overruns.",
    )
    parser.add_argument("--version", action="version", version=f"visitwatch {__version__}")
    _common_options(parser, default=None)
    # The same options after the command (`visitwatch status --config x.toml`). SUPPRESS:
    # a command's parser sets them only when given there, so it never clobbers a value
    # given before the command with its own default.
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        p.set_defaults(func=func)
        return p

    command("run", cmd_run, "run the daemon until stopped (SIGTERM/SIGINT)")
    command("sync", cmd_sync, "read every calendar once, sweep, deliver, then exit")
    p = command("status", cmd_status, "visits, source health and undelivered notifications")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="include resolved and cancelled visits")
    command("check", cmd_check, "validate the config and try each source and channel once")
    p = command("checkin", cmd_checkin, "check in from a visit (resolves it), or extend it")
    p.add_argument("visit", help="visit id (or a unique prefix)")
    p.add_argument("--extend", metavar="DURATION", help='more time instead, e.g. "30m"')
    p.add_argument("--by", default="", help="who is checking in (default: the worker)")
    p = command("ack", cmd_ack, "acknowledge an alert: stops repeats and records who")
    p.add_argument("alert", help="visit id (or a unique prefix), or #N for alert number N")
    p.add_argument("--by", required=True, type=_person, help="your name (kept in the record)")
    p.add_argument("--safe", action="store_true", help="the worker is confirmed safe: resolve")
    p = command("help", cmd_help, "ask for help during a visit: alerts the whole ladder now")
    p.add_argument("visit")
    p.add_argument("--by", default="")
    p = command("sources", cmd_sources, "calendar sources: confirm a held read")
    actions = p.add_subparsers(metavar="ACTION", dest="action", required=True)
    confirm = actions.add_parser(
        "confirm",
        parents=[common],
        help="apply a read held by the removal guard (its visits really were cancelled)",
        description="Apply a read held by the removal guard: the visits it no longer lists "
        "really were cancelled. Visits already under way are never ended.",
    )
    confirm.add_argument("name", help="the source's name, as in the config")
    confirm.add_argument("--by", default="", help="who confirms (kept in the record)")
    p = command("demo", cmd_demo, "run the daemon on a generated demo calendar")
    p.add_argument("--dir", default=".visitwatch-demo", help="state folder (wiped each run)")
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="write the demo config and calendar, print how to run, exit",
    )
    init_config.add_commands(command)
    export.add_commands(command)
    backup.add_commands(command)
    doctor.add_commands(command)
    return parser


def _common_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument(
        "--config", "-c", default=default, help="config file (default: $VISITWATCH_CONFIG)"
    )
    parser.add_argument(
        "--log-level", default=default, choices=["debug", "info", "warning", "error"]
    )


def _person(text: str) -> str:
    """Who is acting, for the record: a name, never empty or blank."""
    name = text.strip()
    if not name:
        raise argparse.ArgumentTypeError(
            'a name is required, e.g. --by "Maria Jones": the record keeps who acknowledged'
        )
    return name


def _load(args: argparse.Namespace) -> Config:
    config = load_config(config_path(args.config))
    logs.configure(args.log_level or config.daemon.log_level)
    return config


# ----------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    _warn_unreachable(config)
    service = Service(config)
    service.run()
    return 0


def _warn_unreachable(config: Config) -> None:
    """The daemon still watches everyone else; the admin hears the count (names: `check`)."""
    people = unreachable(config)
    if people:
        log.warning("staff_unreachable", count=len(people), see="visitwatch check")


def cmd_sync(args: argparse.Namespace) -> int:
    service = Service(_load(args))
    try:
        reports, changed, delivered = service.run_once()
    finally:
        service.close()
    for report in reports:
        if report.ok:
            extra = " (unchanged)" if report.skipped else ""
            print(
                f"{report.source}: {report.visits} visits in {report.events} entries, "
                f"{report.new} new, {report.changed} changed, {report.ended} ended, "
                f"{len(report.problems)} unreadable{extra}"
            )
        else:
            print(f"{report.source}: FAILED: {report.error}")
    print(
        f"sweep: {changed} visits advanced; delivery: {delivered.sent} sent, "
        f"{delivered.retried} to retry, {delivered.failed} failed"
    )
    failed_sources = sum(1 for r in reports if not r.ok)
    if failed_sources:
        print(f"FAILED: {failed_sources} calendar source(s) could not be read")
    if delivered.failed:
        print(
            f"FAILED: {delivered.failed} notification(s) failed permanently; "
            "`visitwatch status` lists them with their errors"
        )
    return 1 if failed_sources or delivered.failed else 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(
        f"config {config.path}: OK ({len(config.directory.members)} staff, "
        f"{len(config.sources)} sources, {len(config.channels)} channels, "
        f"policy {config.policy.name})"
    )
    service = Service(config)
    failures = 0
    try:
        lines, failures = status.pages_check(service)
        print("\n".join(lines))
        for ok, line in connector_checks(service):
            print(line)
            failures += not ok
    finally:
        service.close()
    # Names are shown here, on the admin's terminal; never in logs.
    for ok, line in reach_checks(config):
        print(line)
        failures += not ok
    return 1 if failures else 0


def cmd_checkin(args: argparse.Namespace) -> int:
    with _acting(args) as service:
        extend = _duration(args.extend) if args.extend else None
        visit = service.watcher.actions.check_in(args.visit, by=args.by, extend=extend)
        if extend:
            when = fmt_local(visit.deadline, service.config.daemon.timezone)
            print(f"visit {visit.id} extended: now expected back {when}")
        else:
            print(f"visit {visit.id} checked in: resolved, all clear sent to anyone alerted")
    return 0


def cmd_ack(args: argparse.Namespace) -> int:
    with _acting(args) as service:
        visit = service.watcher.actions.acknowledge(args.alert, by=args.by, safe=args.safe)
        if args.safe:
            print(f"visit {visit.id} resolved: confirmed safe by {args.by}; all clear sent")
        else:
            minutes = int(service.config.policy.ack_timeout.total_seconds() // 60)
            print(
                f"visit {visit.id} acknowledged by {args.by}: repeats paused. Later rungs "
                f"still go out (to you too), and if the worker is not confirmed safe within "
                f"{minutes} min you and the next rung are alerted again. When the worker is "
                f"confirmed safe: visitwatch ack {visit.id} --by ... --safe"
            )
    return 0


def cmd_help(args: argparse.Namespace) -> int:
    with _acting(args) as service:
        visit = service.watcher.actions.request_help(args.visit, by=args.by)
        print(f"help requested for visit {visit.id}: everyone on the ladder is being alerted")
    return 0


def cmd_sources(args: argparse.Namespace) -> int:
    service = Service(_load(args))
    try:
        return _confirm_held(service, args.name, args.by.strip() or "an admin")
    finally:
        service.close()


def _confirm_held(service: Service, name: str, by: str) -> int:
    """Mark the held read of ``name`` as confirmed: the next read applies it."""
    if name not in {s.name for s in service.config.sources}:
        known = ", ".join(s.name for s in service.config.sources) or "none"
        raise VisitwatchError(f"no calendar source is named {name!r} (sources: {known})")
    now = service.clock.now()
    with service.store.transaction() as conn:
        held = conn.execute(
            "SELECT held_removals, held_since FROM sources WHERE name = ?", (name,)
        ).fetchone()
        if held is None or not held["held_removals"]:
            raise VisitwatchError(
                f"calendar source {name!r} has no held read to confirm (`visitwatch status` "
                "shows held reads)"
            )
        conn.execute(
            "UPDATE sources SET held_confirmed_at = ?, held_confirmed_by = ? WHERE name = ?",
            (ts(now), by, name),
        )
        service.store.audit(conn, None, now, f"held read of {name!r} confirmed", by, source=name)
    count = len(json.loads(held["held_removals"]))
    poll = service.config.daemon.poll_interval
    print(
        f"confirmed: the {count} visits {name!r} no longer lists are removed at its next read "
        f"(within {int(poll.total_seconds() // 60) or 1} min), if the calendar still says so. "
        "Visits already under way are not ended: their worker is asked whether they are safe."
    )
    return 0


@contextmanager
def _acting(args: argparse.Namespace) -> Iterator[Service]:
    """A service for one action; what the action queued is delivered before closing."""
    service = Service(_load(args))
    try:
        yield service
        _deliver_now(service)
    finally:
        service.close()


def _deliver_now(service: Service) -> None:
    """Send what the command queued, or ask the running daemon to (SIGUSR1) at once."""
    if service.lock.acquire():
        try:
            service.dispatch()
        finally:
            service.lock.release()
        return
    try:
        os.kill(int(service.lock.holder()), signal.SIGUSR1)
        print("(the running daemon delivers the notifications now)")
    except (ValueError, OSError):  # another user's daemon: it looks within sweep_interval
        print("(the running daemon delivers the notifications within seconds)")


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as err:
        raise VisitwatchError(str(err)) from None


# ----------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    return status.cmd_status(args, _load)


def cmd_demo(args: argparse.Namespace) -> int:
    from visitwatch.daemon import demo

    folder = Path(args.dir).resolve()
    config_file = demo.prepare(folder)
    print(demo.introduction(folder, config_file))
    if args.prepare_only:
        return 0
    config = load_config(config_file)
    logs.configure(args.log_level or "warning")
    _warn_unreachable(config)
    Service(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
