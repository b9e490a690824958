"""What every page handler may use: the daemon's own objects, shared with the sweep.

The web server runs inside the daemon process on its own threads; pages read and write the
same database through the same :class:`Store` (one connection per thread) and act through
the same :class:`Actions` as the CLI, so a tap and a typed command do exactly the same.

:class:`Activity` is what the daemon's loops tell ``/healthz`` and ``/metrics`` beyond the
database: when the sweep and the delivery loop last finished a pass, and how long sweeps
and calendar reads take. The service records it (``extras["activity"]``); the pages only
read it.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from visitwatch.daemon.clock import Clock
from visitwatch.daemon.config import Config
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.store import Store
from visitwatch.daemon.web.links import Signer

# Seconds: a sweep or a calendar read, from a few milliseconds to a slow Graph read.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Durations:
    """A cumulative histogram of durations (Prometheus semantics), safe across threads."""

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """``([(upper bound, cumulative count), ..., ("+Inf", total)], sum)``."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total


@dataclass
class Activity:
    """The loops' pulse, kept in memory by the service (wall-clock times, aware UTC)."""

    started: datetime | None = None  # the loops were started; None: not running here
    last_sweep: datetime | None = None  # the sweep loop last finished a pass
    last_dispatch: datetime | None = None  # the delivery loop last finished a pass
    sweeps: Durations = field(default_factory=Durations)
    syncs: dict[str, Durations] = field(default_factory=dict)  # by source name
    sync_failures: dict[str, int] = field(default_factory=dict)  # since start, by source
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def synced(self, source: str, seconds: float, ok: bool) -> None:
        with self._lock:
            durations = self.syncs.setdefault(source, Durations())
            if not ok:
                self.sync_failures[source] = self.sync_failures.get(source, 0) + 1
        durations.observe(seconds)


@dataclass
class WebContext:
    config: Config
    store: Store
    watcher: Watcher
    clock: Clock
    signer: Signer
    # Wakes the daemon's delivery loop after a page queued notifications (Service.wake).
    wake: Callable[[], None] = lambda: None
    # Filled by the service: what /healthz and /metrics report beyond the database
    # ("activity": an :class:`Activity`; "source_errors": sources that could not be built).
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def activity(self) -> Activity:
        """The daemon's :class:`Activity` (an empty one when no loops run in this process)."""
        activity = self.extras.get("activity")
        if not isinstance(activity, Activity):
            activity = self.extras["activity"] = Activity()
        return activity
