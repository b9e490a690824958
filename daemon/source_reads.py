"""Calendar reads asked for from any thread: what a change notification triggers.

The web thread that receives a notification only calls :meth:`SourceReads.request_sync`
(a set and an event: it never blocks, never runs a sync); a small loop drains the requests
and reads each source on a thread of its own, so one slow calendar never delays another's
read. Reads of one source never overlap: a read asked for while one is under way makes
that one run once more when it ends. Give :meth:`SourceReads.read` to the polls as their
sync too, and a poll and a notification's read never overlap either.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from visitwatch.daemon.polls import guarded


class SourceReads:
    """Reads asked for from any thread, run on threads of their own, one at a time per
    source; give :meth:`read` to the polls too, so a poll and a notification's read never
    overlap either (a poll during a read makes that read run once more, and returns)."""

    def __init__(self, sync: Callable[[str], object], names: Iterable[str]) -> None:
        self._sync = sync
        self.names = set(names)
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._pending: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="sync-requests", daemon=True)

    def request_sync(self, name: str) -> bool:
        """Ask for ``name`` to be read now; returns at once. False for an unknown source."""
        if name not in self.names:
            return False
        with self._lock:
            self._pending.add(name)
        self._wake.set()
        return True

    def read(self, name: str) -> None:
        """Read ``name`` in this thread, unless a read of it is under way (then that read
        runs once more when it ends, and this returns at once)."""
        if self._claim(name):
            self._run(name)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _claim(self, name: str) -> bool:
        with self._lock:
            if name in self._running:
                self._again.add(name)
                return False
            self._running.add(name)
            return True

    def _run(self, name: str) -> None:
        try:
            while not self._stop.is_set():
                guarded("sync", self._sync, name)
                with self._lock:
                    if name not in self._again:
                        return
                    self._again.discard(name)
        finally:
            with self._lock:
                self._running.discard(name)
                self._again.discard(name)

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                names, self._pending = sorted(self._pending), set()
            for name in names:
                if not self._stop.is_set() and self._claim(name):
                    # A thread per source: one slow calendar never delays another's read.
                    # Named like a poll's, so a stop counts it among the polls in flight.
                    threading.Thread(
                        target=self._run, args=(name,), name=f"poll:{name}:notified", daemon=True
                    ).start()
