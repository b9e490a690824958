"""A channel whose behaviour a test scripts: accept, fail (temporarily or for good), or hang.

Register it with the ``scripted_channels`` fixture, then write ``type = "scripted"`` (or
``"scripted_email"``, which like e-mail needs the recipient's address) in a config's
``[[channels]]``. Each configured channel name has one :class:`Script`, shared by
every instance (a restarted service builds new channel objects over the same script), so a
test can flip a channel's mode between steps and read what it accepted.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from visitwatch.connectors import registry
from visitwatch.connectors.base import Channel
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import Message

OK = "ok"
TEMPORARY = "temporary"  # raises ConnectorError(permanent=False), like a refused connection
PERMANENT = "permanent"  # raises ConnectorError(permanent=True), like a rejected recipient
HANG = "hang"  # blocks until the script is released (a server that accepts and never answers)
MODES = (OK, TEMPORARY, PERMANENT, HANG)


@dataclass
class Script:
    mode: str = OK
    accepted: list[Message] = field(default_factory=list)
    attempts: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, mode: str) -> None:
        assert mode in MODES, mode
        self.mode = mode
        if mode == HANG:
            self.release.clear()
        else:
            self.release.set()  # anything hanging now finishes its send (and fails)


class ScriptedChannel(Channel):
    type_name: ClassVar[str] = "scripted"
    scripts: ClassVar[dict[str, Script]] = {}

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.script = self.scripts.setdefault(self.name, Script())

    def send(self, message: Message) -> None:
        script = self.script
        with script.lock:
            script.attempts += 1
            mode = script.mode
        if mode == HANG:
            script.release.wait()
            raise ConnectorError(f"{self.name}: no answer (scripted hang)", permanent=False)
        if mode == TEMPORARY:
            raise ConnectorError(f"{self.name}: connection refused (scripted)", permanent=False)
        if mode == PERMANENT:
            raise ConnectorError(f"{self.name}: recipient rejected (scripted)", permanent=True)
        with script.lock:
            script.accepted.append(message)


class ScriptedEmailChannel(ScriptedChannel):
    """The same, but like e-mail: only for recipients with an address (``scripted_email``)."""

    type_name: ClassVar[str] = "scripted_email"
    address_field: ClassVar[str | None] = "email"


@pytest.fixture
def scripted_channels(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Script]]:
    """Make ``type = "scripted"`` available; yields the scripts by channel name."""
    monkeypatch.setitem(registry.CHANNELS, "scripted", "tests.scripted:ScriptedChannel")
    monkeypatch.setitem(registry.CHANNELS, "scripted_email", "tests.scripted:ScriptedEmailChannel")
    ScriptedChannel.scripts = {}
    yield ScriptedChannel.scripts
    for script in ScriptedChannel.scripts.values():
        script.release.set()  # never leave a thread hanging after the test
