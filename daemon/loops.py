"""The daemon's loop threads, and noticing when the wall clock steps.

Every wait is measured on the monotonic clock and every deadline compared on the wall
clock when the loop wakes, so a wall-clock step (NTP after a VM resume) delays nothing by
more than ``sweep_interval``; what was timed by the wall clock (the polls) is re-armed when
:class:`ClockSteps` notices a step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime

import structlog

log = structlog.get_logger(__name__)

# The sweep loop's shortest sleep between passes it schedules itself.
SWEEP_GAP = 0.2
# The shortest time between the starts of two passes of a loop. Under load, wakes (page
# actions, calendar reads, finished sends) come hundreds of times a second; each pass is a
# write transaction, and the write lock is shared with the pages, so wakes within this gap
# share one pass (a tenth of a second on an alert, at most).
WAKE_GAP = 0.1


class Loop:
    """A thread that runs ``step`` when woken, or when the time ``step`` returned has come.

    Waits are measured on the monotonic clock (``Event.wait``), so a wall-clock step can
    neither stall nor hurry it; ``step`` compares deadlines on the wall clock each time it
    runs, and runs at least every ``max_wait`` seconds whatever it returned.
    """

    def __init__(
        self,
        name: str,
        step: Callable[[], float | None],
        max_wait: float,
        stop: threading.Event,
        min_gap: float = WAKE_GAP,
    ) -> None:
        self.name = name
        self._step = step
        self._max_wait = max_wait
        self._min_gap = min_gap
        self._stop = stop
        self._wake = threading.Event()
        self.heartbeat = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"loop:{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self._wake.clear()  # a wake during the step runs it again (after min_gap)
            try:
                delay = self._step()
            except Exception:
                log.exception("loop_crashed", loop=self.name)
                delay = None
            self.heartbeat = time.monotonic()
            wait = self._max_wait if delay is None else min(max(delay, 0.0), self._max_wait)
            # Passes start at least min_gap apart, woken or scheduled: wakes meanwhile stay
            # set and the pass after the pause takes them all, and a step that keeps
            # asking to run again at once costs ten passes a second, not a spinning core.
            pause = max(began + self._min_gap - self.heartbeat, 0.0)
            if pause and self._stop.wait(pause):
                break
            self._wake.wait(max(wait - pause, 0.0))


class ClockSteps:
    """Notices when the wall clock jumps (NTP after a suspend, an admin's ``date -s``)."""

    TOLERANCE = 2.0  # seconds of disagreement between the wall and the monotonic clock

    def __init__(self) -> None:
        self._wall = time.time()
        self._mono = time.monotonic()

    def check(self, on_step: Callable[[], None]) -> None:
        wall, mono = time.time(), time.monotonic()
        drift = (wall - self._wall) - (mono - self._mono)
        self._wall, self._mono = wall, mono
        if abs(drift) > self.TOLERANCE:
            log.warning("clock_stepped", seconds=round(drift, 1))
            on_step()


def seconds_until(moment: datetime | None, now: datetime) -> float | None:
    """What a loop's step returns: seconds from ``now`` to ``moment`` (None: no moment)."""
    return None if moment is None else (moment - now).total_seconds()
