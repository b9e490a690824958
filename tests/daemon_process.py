"""`visitwatch run` as a child process: a config on disk, start, SIGKILL, timed SIGTERM.

Every process a :class:`Daemon` starts is killed and reaped by :meth:`Daemon.close`, which
tests call in a ``finally``. Output goes to a log file in the test's folder (a pipe nobody
reads would fill and block the daemon), and :meth:`Daemon.log_tail` shows it on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import STAFF

REPO = Path(__file__).resolve().parents[1]
VISITWATCH = [sys.executable, "-m", "visitwatch.daemon.cli"]
TomlValue = str | int | bool | Sequence[str]


def channel_block(name: str, type_name: str, **options: TomlValue) -> str:
    """A ``[[channels]]`` table of a config: ``options`` are its other keys, in order."""
    lines = ["", "[[channels]]", f"name = {_toml(name)}", f"type = {_toml(type_name)}"]
    lines += [f"{key} = {_toml(value)}" for key, value in options.items()]
    return "\n".join(lines) + "\n"


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the plain text tests use
    return "[" + ", ".join(json.dumps(item) for item in value) + "]"


def smtp_channel(port: int, **options: TomlValue) -> str:
    """The "email" channel: plain SMTP to a loopback server on ``port``, 5 s timeout."""
    settings: dict[str, TomlValue] = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "sender": "visitwatch@example.org",
        "timeout": "5s",
    }
    return channel_block("email", "smtp", **{**settings, **options})


OUTBOX_CHANNEL = channel_block("outbox", "outbox", path="outbox.jsonl")


def write_config(
    folder: Path,
    *,
    daemon: str = "",
    channels: str = OUTBOX_CHANNEL,
    policy: str = "",
) -> Path:
    """A config for a real daemon reading ``calendar.ics`` (Asha Khan's) in ``folder``."""
    config = folder / "visitwatch.toml"
    config.write_text(
        textwrap.dedent("""
            [daemon]
            database = "visitwatch.db"
            timezone = "Europe/London"
        """)
        + textwrap.dedent(daemon)
        + STAFF
        + textwrap.dedent("""
            [[sources]]
            name = "team"
            type = "ics"
            path = "calendar.ics"
            owner = "asha.khan@example.org"
        """)
        + textwrap.dedent(channels)
        + '\n[policy]\npreset = "pan-lancashire"\n'
        + textwrap.dedent(policy),
        encoding="utf-8",
    )
    return config


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> float:
    """Poll ``condition``; return the seconds it took, or fail naming ``what``."""
    start = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def poll_until(condition: Callable[[], bool], timeout: float, poll: float = 0.1) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


@dataclass
class Stop:
    """How one SIGTERM went: seconds to exit (or to the limit), exit code, and whether it hung."""

    seconds: float
    returncode: int | None
    hung: bool


@dataclass
class Daemon:
    config: Path
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    stops: list[Stop] = field(default_factory=list)
    kills: int = 0

    @property
    def log(self) -> Path:
        return self.config.parent / "daemon.log"

    @property
    def lock(self) -> Path:
        return self.config.parent / "visitwatch.db.lock"

    def start(self, wait_ready: bool = True) -> None:
        """Start ``visitwatch run``; by default wait until it holds the database lock."""
        assert self.process is None or self.process.poll() is not None, "already running"
        env = {**os.environ, **(self.env or {})}
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts + 1}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [*VISITWATCH, "--config", str(self.config), "run"],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.starts += 1
        if wait_ready:
            pid = str(self.process.pid)
            wait_for(
                lambda: self._holds_lock(pid) or self.process.poll() is not None,  # type: ignore[union-attr]
                30,
                "the daemon to take its lock",
            )
            assert self.process.poll() is None, f"daemon exited at start:\n{self.log_tail()}"

    def _holds_lock(self, pid: str) -> bool:
        try:
            return self.lock.read_text().strip() == pid
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no clean-up, nothing in flight committed (a power cut, the OOM killer)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)
        self.kills += 1

    def terminate(self, limit: float) -> Stop:
        """SIGTERM, as systemd stops it; a daemon still running after ``limit`` s is killed."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            returncode: int | None = self.process.wait(timeout=limit)
            stop = Stop(time.monotonic() - started, returncode, hung=False)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            stop = Stop(time.monotonic() - started, None, hung=True)
        self.stops.append(stop)
        return stop

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        """Kill and reap whatever is still running (call it in a ``finally``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])
