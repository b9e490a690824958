"""Which of the daemon's threads writes to the record next: the loops first, in turn.

SQLite lets one writer in at a time. A writer that finds the lock taken sleeps in its busy
handler (1 ms, then longer, up to 100 ms) and tries again, whoever took the lock
meanwhile: with many page threads writing, the sweep and the delivery lanes lost that race
again and again, and reminders went out seconds late (``bench/web_load.py``). So the
threads of this process queue for the lock here, in memory, before ``BEGIN IMMEDIATE``:

- **In turn.** Each waiter takes a ticket; the gate passes to a waiting ticket, never back
  to the thread that just let it go while others wait, so a thread committing batch after
  batch (a sweep of thousands of visits, a lane recording a fast channel's sends) cannot
  keep everyone else out until "database is locked".
- **The loops first.** A thread that said :meth:`Store.yield_writes` (the pages') goes
  after every loop thread waiting, unless it has waited :data:`PATIENCE` already: a help
  tap is written within about half a second even while the loops write back to back.

Other processes (``visitwatch ack`` on the same database) still meet SQLite's busy
handler, as before.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Seconds a page's write waits behind the loops' before it takes its turn among them.
PATIENCE = 0.5
# Seconds between a waiter's checks whether its turn came with nobody telling it (a page's
# patience running out while the gate changes hands): a backstop, the gate notifies.
RECHECK = 0.05


@dataclass(eq=False)
class _Ticket:
    polite: bool
    since: float = field(default_factory=time.monotonic)


class WriteGate:
    """First come, first served, the loops before the pages (see the module)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held = False
        self._queue: deque[_Ticket] = deque()

    def waiting(self) -> tuple[int, int]:
        """How many threads wait: ``(loops, pages)``."""
        with self._changed:
            pages = sum(1 for t in self._queue if t.polite)
            return len(self._queue) - pages, pages

    def _next(self, now: float) -> _Ticket:
        """Whose turn it is: the oldest loop's, unless an older page ran out of patience."""
        oldest = self._queue[0]
        if not oldest.polite or now - oldest.since >= PATIENCE:
            return oldest
        return next((t for t in self._queue if not t.polite), oldest)

    @contextmanager
    def hold(self, polite: bool, timeout: float) -> Iterator[None]:
        """The gate, for one write transaction; "database is locked" after ``timeout``."""
        with self._changed:
            ticket = _Ticket(polite)
            self._queue.append(ticket)
            try:
                while self._held or self._next(time.monotonic()) is not ticket:
                    left = ticket.since + timeout - time.monotonic()
                    if left <= 0:
                        raise sqlite3.OperationalError(
                            f"database is locked: other threads kept the write lock {timeout:g} s"
                        )
                    self._changed.wait(min(left, RECHECK))
                self._held = True
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()  # the next in turn may be someone else now
        try:
            yield
        finally:
            with self._changed:
                self._held = False
                self._changed.notify_all()
