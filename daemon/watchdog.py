"""The watcher is watched (principle 5): systemd's notify socket and its watchdog.

Under systemd (``Type=notify``, ``WatchdogSec=``) the daemon says when it is ready and
stopping, and pings the watchdog only while the sweep and delivery both make progress: a
daemon whose delivery has stopped is restarted by systemd, and an admin hears of it first.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import structlog

from visitwatch.daemon.episode import Episode

log = structlog.get_logger(__name__)


class DeliveryWatchdog:
    """Pings systemd while delivery progresses; when it stops, goes quiet and tells admins."""

    def __init__(self, tell_admins: Callable[[str, str], None]) -> None:
        self._tell_admins = tell_admins  # (subject, text): must not wait for delivery
        self._stalled = Episode(log, "dispatch_stalled", "dispatch_progressing_again")

    def check(self, heartbeat: float, limit: float) -> None:
        """``heartbeat``: when the delivery loop last finished a pass (monotonic seconds)."""
        stuck_for = time.monotonic() - heartbeat
        if stuck_for <= limit:
            self._stalled.end()
            sd_notify("WATCHDOG=1")
            return
        if self._stalled.begin(seconds=round(stuck_for)):
            self._tell_admins(
                "visitwatch: alert delivery has stopped",
                f"The delivery loop has made no progress for {round(stuck_for)} s, so "
                "alerts may not be going out. systemd will restart visitwatch; if this "
                "repeats, run `visitwatch status` and check the journal.",
            )


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify, WatchdogSec=) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as err:
        log.warning("sd_notify_failed", error=str(err))
