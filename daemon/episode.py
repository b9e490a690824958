"""A trouble that lasts a while (a full disk, stuck delivery), logged once as it starts and
once as it ends, so that a loop meeting it every pass does not flood the journal."""

from __future__ import annotations

from typing import Any


class Episode:
    """Logs ``started`` (at error level) when the trouble begins and ``ended`` when it ends."""

    def __init__(self, log: Any, started: str, ended: str) -> None:
        self._log = log  # the caller's logger, so the lines keep their module's name
        self._started = started
        self._ended = ended
        self.on = False

    def begin(self, **fields: Any) -> bool:
        """The trouble is here; True only on the pass that found it first (then tell people)."""
        if self.on:
            return False
        self.on = True
        self._log.error(self._started, **fields)
        return True

    def end(self) -> None:
        """The trouble is over (a no-op when there was none)."""
        if self.on:
            self.on = False
            self._log.warning(self._ended)
