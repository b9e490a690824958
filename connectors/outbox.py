"""The outbox channel: every notification appended to a JSON Lines file.

The outbox is the record of last resort (what visitwatch told whom, and when), so each
line is written with one ``write`` on a file opened with ``O_APPEND`` and then fsynced.
With ``O_APPEND`` the kernel places each write at the current end of the file, so
several processes (the daemon and an admin's ``visitwatch test-alert``) can append to
the same file without interleaving lines.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message
from visitwatch.core.options import Option
from visitwatch.core.private_files import make_dirs, open_private

# The records hold staff names and visit details: the service and its group (admins who
# read the outbox) only, whatever the umask; a looser file from an older release is tightened.
_FILE_MODE = 0o640


class OutboxChannel(Channel):
    """Appends each message as one JSON object per line to ``path``."""

    type_name: ClassVar[str] = "outbox"
    writes_locally: ClassVar[bool] = True
    sends_batches: ClassVar[bool] = True
    options: ClassVar[dict[str, Option]] = {
        "path": Option(
            "path",
            default="outbox.jsonl",
            help="the JSON Lines file notifications are appended to",
        ),
    }

    # Threads of one process share it; O_APPEND already keeps processes apart, the lock
    # only keeps a retry loop after a short write from racing another thread.
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @property
    def path(self) -> Path:
        return Path(self.settings["path"])

    def send(self, message: Message) -> None:
        error = self.send_many([message])[0]
        if error is not None:
            raise error

    def send_many(self, messages: list[Message]) -> list[BaseException | None]:
        """All lines in one write and one fsync: a burst costs one disk flush, not hundreds."""
        sent = datetime.now(UTC).isoformat()
        lines = []
        for message in messages:
            record = message.as_record()
            record["sent"] = sent
            lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        try:
            self._append("".join(lines).encode("utf-8"))
        except OSError as err:
            error = ConnectorError(
                f"cannot append to outbox file {self.path}: {err.strerror or err}",
                permanent=False,
            )
            return [error] * len(messages)
        return [None] * len(messages)

    def check(self) -> str:
        try:
            make_dirs(self.path.parent)
            os.close(open_private(self.path, os.O_WRONLY | os.O_APPEND, _FILE_MODE))
        except OSError as err:
            raise ConnectorError(
                f"outbox file {self.path} is not writable: {err.strerror or err}",
                permanent=False,
            ) from err
        return f"outbox file {self.path} is writable"

    def _append(self, data: bytes) -> None:
        make_dirs(self.path.parent)
        with self._lock:
            fd = open_private(self.path, os.O_WRONLY | os.O_APPEND, _FILE_MODE)
            try:
                written = os.write(fd, data)
                # Regular files practically never take a short write (a full disk raises
                # instead), but if one does the rest must still land on the same line.
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            finally:
                os.close(fd)


def read_outbox(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return the records in an outbox file, oldest first.

    A last line without its newline is a write still in progress (or cut short by a
    crash) and is skipped. A complete line that is not JSON raises :class:`ValueError`
    naming the line, because silently dropping part of a safety record would hide it.
    A missing file reads as empty: nothing has been sent yet.
    """
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    # The piece after the last newline is empty for a complete file, partial otherwise.
    complete = lines[:-1]
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(complete, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{file}, line {number}: not a JSON record ({err})") from err
        if not isinstance(record, dict):
            raise ValueError(f"{file}, line {number}: expected a JSON object")
        records.append(record)
    return records
