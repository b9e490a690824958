"""The console channel: notifications printed as readable blocks.

Meant for trying visitwatch out and for running it in a terminal
or under systemd, where stdout ends up in the journal. Output looks like::

    ────────────────────────────────────────────────────────────────────────
    [OVERRUN] to Maria Jones <maria@example.org> via console · 14:32:05
    Visit to 12 High Street has overrun
        Sam Green's visit was due to end at 14:00 and has not been closed.
        Please call Sam on 07700 900123.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import ClassVar, TextIO

from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message, NotificationKind
from visitwatch.core.options import Option

_RULE = "─" * 72
_BOLD = "\x1b[1m"
_RED = "\x1b[31m"
_GREEN = "\x1b[32m"
_RESET = "\x1b[0m"

# Kinds that ask someone to act now stand out; the all-clear is visibly good news.
_ALARM_KINDS = frozenset(kind for kind in NotificationKind if kind.urgent)
_GOOD_KINDS = frozenset({NotificationKind.ALL_CLEAR})

# One lock for every console channel: two configured consoles (or two threads) writing
# to the same terminal must not interleave their blocks.
_print_lock = threading.Lock()


class ConsoleChannel(Channel):
    """Prints each message to stdout or stderr."""

    type_name: ClassVar[str] = "console"
    options: ClassVar[dict[str, Option]] = {
        "stream": Option(
            "str",
            default="stdout",
            choices=("stdout", "stderr"),
            help="where to print notifications",
        ),
    }

    def _stream(self) -> TextIO:
        # Looked up on every send, not at construction: sys.stdout is replaced by pytest's
        # capsys, by redirect_stdout and by daemonising code after channels are built.
        stream: TextIO = getattr(sys, self.stream_name)
        return stream

    @property
    def stream_name(self) -> str:
        name: str = self.settings["stream"]
        return name

    def send(self, message: Message) -> None:
        stream = self._stream()
        block = self.format(message, colour=_wants_colour(stream))
        with _print_lock:
            try:
                _write(stream, block)
            except (OSError, ValueError) as err:
                # ValueError: "I/O operation on closed file".
                raise ConnectorError(
                    f"cannot print to {self.stream_name}: {err}",
                    permanent=False,
                ) from err

    def check(self) -> str:
        stream = self._stream()
        if getattr(stream, "closed", False):
            raise ConnectorError(f"{self.stream_name} is closed")
        return f"console prints to {self.stream_name}"

    def format(self, message: Message, *, colour: bool = False) -> str:
        """The block printed for ``message``, ending in a newline."""
        when = message.created.astimezone(self.context.timezone).strftime("%H:%M:%S")
        recipient = message.recipient
        who = recipient.name or recipient.id
        address = recipient.email or (recipient.id if recipient.id != who else "")
        if address:
            who = f"{who} <{address}>"
        header = f"[{message.kind.upper()}] to {who} via {message.channel} · {when}"
        subject = message.subject
        if colour:
            if message.kind in _ALARM_KINDS:
                header = f"{_BOLD}{_RED}{header}{_RESET}"
            elif message.kind in _GOOD_KINDS:
                header = f"{_BOLD}{_GREEN}{header}{_RESET}"
            else:
                header = f"{_BOLD}{header}{_RESET}"
            subject = f"{_BOLD}{subject}{_RESET}"
        body = "\n".join(f"    {line}" if line else "" for line in message.text.splitlines())
        parts = [_RULE, header, subject]
        if body:
            parts.append(body)
        return "\n".join(parts) + "\n"


def _wants_colour(stream: TextIO) -> bool:
    # https://no-color.org: any non-empty NO_COLOR turns colour off.
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def _write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text)
    except UnicodeEncodeError:
        # A journal or pipe with an ASCII locale must still get the alert, if uglier.
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, errors="replace").decode(encoding))
    stream.flush()
