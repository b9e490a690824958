"""``visitwatch init [DIR]``: a commented starter config that is valid as written.

The template ships as package data (``daemon/starter/``), so an admin who installed the
package with pip has it too. It uses only the outbox and console channels and an empty
local calendar, so ``visitwatch check`` passes on it with no environment variables; the
real connectors are shown commented. The record's paths are written out: relative ones
would resolve against the config's folder, and ``/etc/visitwatch`` is read-only to the
service, so a config written there keeps its record in ``/var/lib/visitwatch``.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from visitwatch.core.errors import VisitwatchError

CONFIG_NAME = "visitwatch.toml"
CALENDAR_NAME = "calendar.ics"
# Readable by the service's group, never by everyone (0640 whatever the umask).
MODE = 0o640
# The systemd layout: ConfigurationDirectory= and StateDirectory= of systemd/visitwatch.service.
SYSTEM_CONFIG_DIR = Path("/etc/visitwatch")
SYSTEM_STATE_DIR = Path("/var/lib/visitwatch")


def default_state_dir(folder: Path) -> Path | None:
    """Where the record goes when not given: the state directory for /etc/visitwatch, else
    beside the config (``None``: relative paths)."""
    return SYSTEM_STATE_DIR if folder.absolute() == SYSTEM_CONFIG_DIR else None


def render(state_dir: Path | None) -> str:
    """The starter config's text, its record and outbox under ``state_dir`` (or beside it)."""
    text = resources.files("visitwatch.daemon").joinpath("starter", CONFIG_NAME).read_text()
    paths = {
        "@DATABASE@": state_dir / "visitwatch.db" if state_dir else "visitwatch.db",
        "@STATE_DIR@": state_dir if state_dir else ".",
        "@OUTBOX@": state_dir / "outbox.jsonl" if state_dir else "outbox.jsonl",
    }
    for marker, path in paths.items():
        # A JSON string is a valid TOML basic string: quotes and backslashes stay escaped.
        text = text.replace(f'"{marker}"', json.dumps(str(path)))
    return text


def write_starter(
    folder: Path,
    *,
    state_dir: Path | None = None,
    force: bool = False,
    group: str | None = None,
) -> list[Path]:
    """Write the config and its placeholder calendar into ``folder``; the paths written.

    Refuses (naming each) when a file is already there, unless ``force``. Each file is
    ``MODE``, owned by ``group`` when one is given (the service's, so it can read them).
    """
    gid = _group_id(group) if group else -1
    calendar = resources.files("visitwatch.daemon").joinpath("starter", CALENDAR_NAME)
    contents = {
        folder / CONFIG_NAME: render(state_dir).encode("utf-8"),
        folder / CALENDAR_NAME: calendar.read_bytes(),
    }
    present = [path for path in contents if path.exists()]
    if present and not force:
        names = ", ".join(str(path) for path in present)
        raise VisitwatchError(f"{names}: already there, not overwritten (--force replaces it)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, data in contents.items():
            _write(path, data, gid)
    except OSError as err:
        raise VisitwatchError(f"cannot write the starter config in {folder}: {err}") from err
    return list(contents)


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise VisitwatchError(
            f"no group named {name!r}: create the service's user and group first "
            "(systemd/visitwatch.sysusers, then `systemd-sysusers`)"
        ) from None


def _write(path: Path, data: bytes, gid: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, MODE)
    try:
        os.fchmod(fd, MODE)  # an existing file (--force), or a umask, may have left others
        if gid >= 0:
            os.fchown(fd, -1, gid)
        os.write(fd, data)
    finally:
        os.close(fd)


def next_steps(config: Path, state_dir: Path | None) -> str:
    """What the admin reads after ``init``: where things went and what to edit next."""
    record = state_dir / "visitwatch.db" if state_dir else config.parent / "visitwatch.db"
    return "\n".join(
        [
            f"wrote {config} (mode {MODE:04o}) and its placeholder calendar {CALENDAR_NAME}",
            f"the record will be {record}",
            "",
            "It is valid as written: alerts go to the outbox and the console only. Next:",
            f"  1. edit {config}: [[staff]], [[sources]], [[channels]], [policy], [web]",
            "     (each section says how; secrets go in { env }, { file } or { credential })",
            f"  2. visitwatch --config {config} check",
            "  3. under systemd: README, 'Running under systemd'; otherwise "
            f"visitwatch --config {config} run",
        ]
    )


def cmd_init(args: argparse.Namespace) -> int:
    folder = Path(args.dir).absolute()
    state_dir = Path(args.state_dir).absolute() if args.state_dir else default_state_dir(folder)
    written = write_starter(folder, state_dir=state_dir, force=args.force, group=args.group)
    print(next_steps(written[0], state_dir))
    return 0


def add_commands(command: Callable[[str, Any, str], argparse.ArgumentParser]) -> None:
    p = command("init", cmd_init, "write a commented starter config, valid as written")
    p.add_argument(
        "dir",
        nargs="?",
        default=".",
        help="folder to write visitwatch.toml in (default: the current folder; "
        "for the systemd service: /etc/visitwatch)",
    )
    p.add_argument("--force", action="store_true", help="replace files already there")
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where the record and outbox go (default: /var/lib/visitwatch for "
        "/etc/visitwatch, else beside the config)",
    )
    p.add_argument("--group", help="give the files to this group (the service's: visitwatch)")
