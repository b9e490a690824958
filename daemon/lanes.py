"""A channel's delivery lane: one daemon thread with its own queue (principle 9).

A mail server that accepts the connection and never answers holds up its own lane and
nothing else: the console, the outbox and every other channel keep delivering, and the
sweep never waits for a send. A lane that stays busy longer than ``send_timeout`` is
*stalled*.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger(__name__)


@dataclass
class DispatchReport:
    sent: int = 0
    retried: int = 0
    failed: int = 0
    fallbacks: int = 0
    notices: int = 0  # admin notices written (a channel's outage or recovery)

    def add(self, other: DispatchReport) -> None:
        self.sent += other.sent
        self.retried += other.retried
        self.failed += other.failed
        self.fallbacks += other.fallbacks
        self.notices += other.notices


@dataclass
class Batch:
    """Notification rows handed to one lane together, and what became of them."""

    rows: list[dict[str, Any]]
    report: DispatchReport = field(default_factory=DispatchReport)
    done: threading.Event = field(default_factory=threading.Event)


class Lane:
    """One channel's delivery thread and queue."""

    def __init__(self, name: str, work: Callable[[Batch], None]) -> None:
        self.name = name
        self._work = work
        self._queue: queue.Queue[Batch | None] = queue.Queue()
        self._lock = threading.Lock()
        self.in_flight: set[int] = set()  # row ids queued or being sent
        self.busy_since: float | None = None  # monotonic start of the batch being sent
        self._thread = threading.Thread(target=self._run, name=f"lane:{name}", daemon=True)
        self._thread.start()

    def submit(self, rows: list[dict[str, Any]]) -> Batch | None:
        with self._lock:
            fresh = [r for r in rows if r["id"] not in self.in_flight]
            self.in_flight.update(r["id"] for r in fresh)
        if not fresh:
            return None
        batch = Batch(fresh)
        self._queue.put(batch)
        return batch

    def held(self) -> set[int]:
        with self._lock:
            return set(self.in_flight)

    def stalled(self, limit: float) -> bool:
        started = self.busy_since
        return started is not None and time.monotonic() - started > limit

    def stop(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            self.busy_since = time.monotonic()
            try:
                self._work(batch)
            except Exception:  # never let a lane die: the next batch must still go out
                log.exception("lane_crashed", channel=self.name)
            finally:
                self.busy_since = None
                with self._lock:
                    self.in_flight.difference_update(r["id"] for r in batch.rows)
                batch.done.set()


class Lanes:
    """Every channel's lane, each started when its channel first has something to send."""

    def __init__(self, work: Callable[[Batch], None]) -> None:
        self._work = work
        self._lanes: dict[str, Lane] = {}
        self._lock = threading.Lock()

    def submit(self, name: str, rows: list[dict[str, Any]]) -> Batch | None:
        """Queue ``rows`` on channel ``name``'s lane; None when it holds them all already."""
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = Lane(name, self._work)
        return lane.submit(rows)

    def held(self) -> set[int]:
        """Ids of the rows some lane has queued or is sending."""
        with self._lock:
            lanes = list(self._lanes.values())
        held: set[int] = set()
        for lane in lanes:
            held |= lane.held()
        return held

    def idle(self) -> bool:
        """True when no lane has anything queued or in a send."""
        return not any(lane.in_flight for lane in list(self._lanes.values()))

    def stalled(self, limit: float) -> list[str]:
        """Channels whose lane has been inside one batch for more than ``limit`` seconds."""
        return [n for n, lane in list(self._lanes.items()) if lane.stalled(limit)]

    def close(self, timeout: float) -> bool:
        """Stop the lanes; True when every one finished (a hung send is left behind)."""
        with self._lock:
            lanes = list(self._lanes.values())
            self._lanes.clear()
        for lane in lanes:
            lane.stop()
        deadline = time.monotonic() + timeout
        return all(lane.join(max(0.0, deadline - time.monotonic())) for lane in lanes)
