"""The daemon's loops under a flood of wakes, and the sweep's idle pass.

Under load, page actions wake the sweep and the delivery loop hundreds of times a second.
Each pass is a write transaction on the lock the pages need too, so wakes close together
share one pass (``loops.WAKE_GAP``), and a sweep pass with nothing due writes nothing.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from tests.conftest import World, home_visit, tick
from tests.daemon_process import poll_until
from visitwatch.daemon.loops import WAKE_GAP, Loop


@contextmanager
def _running(
    steps: list[float], step_returns: float | None = None
) -> Iterator[tuple[Loop, threading.Event]]:
    """A loop whose step notes when it ran, and its stop; stopped (and joined) on leaving."""
    stop = threading.Event()

    def step() -> float | None:
        steps.append(time.monotonic())
        return step_returns

    loop = Loop("test", step, 30.0, stop)
    loop.start()
    try:
        yield loop, stop
    finally:
        stop.set()
        loop.wake()
        assert loop.join(5)


def _until(condition: Callable[[], bool]) -> bool:
    return poll_until(condition, 5.0, poll=0.005)


def test_a_flood_of_wakes_shares_passes_and_the_last_wake_is_never_lost():
    steps: list[float] = []
    with _running(steps) as (loop, _stop):
        assert _until(lambda: len(steps) == 1)  # the first pass, at start
        began = time.monotonic()
        while time.monotonic() - began < 1.0:  # 1,000 wakes a second for a second
            loop.wake()
            time.sleep(0.001)
        last_wake = time.monotonic()
        loop.wake()
        assert _until(lambda: steps[-1] >= last_wake), "the last wake ran no pass"
        passes = [t for t in steps if began <= t < last_wake]
        assert 2 <= len(passes) <= 1.0 / WAKE_GAP + 2, len(passes)
        gaps = [b - a for a, b in itertools.pairwise(steps)]
        assert min(gaps) >= WAKE_GAP * 0.9


def test_a_single_wake_runs_a_pass_at_once_after_a_quiet_spell():
    """The gap only joins wakes that come close together: a lone wake is not delayed."""
    steps: list[float] = []
    with _running(steps) as (loop, _stop):
        assert _until(lambda: len(steps) == 1)
        time.sleep(WAKE_GAP * 2)
        woken = time.monotonic()
        loop.wake()
        assert _until(lambda: len(steps) == 2)
        assert steps[1] - woken < WAKE_GAP / 2


def test_a_stop_during_the_gap_ends_the_loop_at_once():
    steps: list[float] = []
    with _running(steps) as (loop, stop):
        assert _until(lambda: len(steps) == 1)
        loop.wake()
        stop.set()
        assert loop.join(WAKE_GAP * 5)


def test_a_sweep_with_nothing_due_writes_nothing_until_its_pulse_is_owed(world: World):
    world.write_calendar(home_visit())
    service = world.service()
    tick(service)
    watch = sqlite3.connect(world.folder / "visitwatch.db")
    version = lambda: watch.execute("PRAGMA data_version").fetchone()[0]  # noqa: E731
    before = version()
    for _ in range(20):  # page actions wake the sweep like this, many times a second
        world.at(service.clock.now() + timedelta(seconds=0.2))
        assert service.sweep(health=False) == 0
    assert version() == before, "an idle sweep pass committed a write"
    pulse = service.store.get_meta("last_sweep_at")
    world.at(service.clock.now() + timedelta(seconds=6))  # past PULSE_EVERY since the tick
    service.sweep(health=False)
    assert version() != before
    assert service.store.get_meta("last_sweep_at") > pulse  # status and doctor see it alive
    watch.close()


def test_a_step_that_keeps_asking_to_run_again_at_once_does_not_spin():
    """A step returning 0 again and again (a moment already past) runs ten times a
    second, not as fast as the core allows."""
    steps: list[float] = []
    with _running(steps, step_returns=0.0):
        time.sleep(0.55)
    assert 3 <= len(steps) <= 0.55 / WAKE_GAP + 2, len(steps)
