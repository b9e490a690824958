"""Which of the daemon's threads writes to the record next: the loops first, none starved.

SQLite lets one writer in at a time. A writer that finds the lock taken sleeps in its busy
handler (1 ms, then longer, up to 100 ms) and tries again, whoever took the lock
meanwhile: with many page threads writing, the sweep and the delivery lanes lost that race
again and again, and reminders went out seconds late (``bench/web_load.py``). So the
threads of this process queue for the lock here, in memory, before ``BEGIN IMMEDIATE``,
and are woken the moment it is free:

- **The loops first.** A thread that said :meth:`Store.yield_writes` (the pages') takes
  the gate only while no loop thread waits for it.
- **Nobody starved.** Whoever is running when the gate frees may take it at once (the
  thread that just let it go, too): handing it to a particular sleeping thread instead
  leaves the lock idle until that thread is scheduled: under the benchmark's load it
  made check-ins take 6 s at p50 instead of 4 ms. But a waiter that has waited :data:`STARVING` or longer is served
  first, the oldest loop among them before the oldest page, so a thread committing batch
  after batch (a sweep of thousands of visits, a lane recording a fast channel's sends)
  cannot keep everyone else out until "database is locked", and a help tap is written
  within about a quarter of a second even while the loops write back to back. (Go's
  ``sync.Mutex`` has the same two modes.)

Other processes (``visitwatch ack`` on the same database) still meet SQLite's busy
handler, as before.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Seconds a waiter waits before the gate is kept for it (and the oldest like it).
STARVING = 0.2
# Seconds between a waiter's checks whether it is now starving (nobody tells it so).
RECHECK = 0.05


@dataclass(eq=False)
class _Ticket:
    polite: bool
    since: float = field(default_factory=time.monotonic)


class WriteGate:
    """The loops before the pages, and nobody starved (see the module)."""

    def __init__(self) -> None:
        self._free = threading.Condition()
        self._held = False
        self._queue: list[_Ticket] = []  # in arrival order

    def waiting(self) -> tuple[int, int]:
        """How many threads wait: ``(loops, pages)``."""
        with self._free:
            pages = sum(1 for t in self._queue if t.polite)
            return len(self._queue) - pages, pages

    def _may_take(self, ticket: _Ticket, now: float) -> bool:
        if self._held:
            return False
        starving = [t for t in self._queue if now - t.since >= STARVING]
        if starving:  # kept for the oldest starving loop, else the oldest starving page
            return ticket is next((t for t in starving if not t.polite), starving[0])
        return not ticket.polite or all(t.polite for t in self._queue)

    @contextmanager
    def hold(self, polite: bool, timeout: float) -> Iterator[None]:
        """The gate, for one write transaction; "database is locked" after ``timeout``."""
        with self._free:
            ticket = _Ticket(polite)
            self._queue.append(ticket)
            try:
                while not self._may_take(ticket, now := time.monotonic()):
                    left = ticket.since + timeout - now
                    if left <= 0:
                        raise sqlite3.OperationalError(
                            f"database is locked: other threads kept the write lock {timeout:g} s"
                        )
                    self._free.wait(min(left, RECHECK))
                self._held = True
            finally:
                self._queue.remove(ticket)
        try:
            yield
        finally:
            with self._free:
                self._held = False
                self._free.notify_all()
