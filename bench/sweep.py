"""Does the sweep's cost stay flat as the lone-working record grows?

The sweep runs every few seconds for years. It asks SQLite for the visits whose next action
is due, through a partial index on ``next_action_at``. The obvious alternative is to load
every visit and let the pure lifecycle function decide; both are timed here on the same
database, with 20 active visits and a growing history of resolved ones.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench import visits
from visitwatch.daemon import lifecycle
from visitwatch.daemon.clock import FrozenClock
from visitwatch.daemon.config import parse_config
from visitwatch.daemon.escalation import Watcher
from visitwatch.daemon.store import Store
from visitwatch.daemon.visits import Visit

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ACTIVE = 20
HISTORY_SIZES = (1_000, 10_000, 100_000)
REPEATS = 30

CONFIG = {
    "staff": [
        {"id": "w@example.org", "name": "W", "manager": "m@example.org"},
        {"id": "m@example.org", "name": "M", "role": "manager"},
        {"id": "d@example.org", "name": "D", "role": "director"},
    ],
    "channels": [{"name": "outbox", "type": "outbox"}],
}


def visit_row(index: int, start: datetime, state: str, next_action: datetime | None) -> dict:
    return visits.visit_row(
        index, start=start, end=start + timedelta(hours=1), state=state, next_action=next_action
    )


def build(folder: Path, history: int) -> Store:
    store = Store(folder / f"bench-{history}.db")
    rows = [visit_row(i, NOW - timedelta(days=1 + i // 20), lifecycle.RESOLVED, None)
            for i in range(history)]  # fmt: skip
    # Active visits: in progress, next action (their deadline) an hour away.
    rows += [visit_row(history + i, NOW - timedelta(minutes=30), lifecycle.IN_PROGRESS,
                       NOW + timedelta(hours=1)) for i in range(ACTIVE)]  # fmt: skip
    visits.insert_visits(store, rows)
    store.db.conn.execute("ANALYZE")
    return store


def full_scan(store: Store, watcher: Watcher, now: datetime) -> int:
    """The obvious alternative: read every visit and ask the lifecycle what is due."""
    due = 0
    for row in store.query("SELECT * FROM visits"):
        visit = Visit.from_row(row)
        if visit.state in lifecycle.TERMINAL:
            continue
        clock = watcher.clock_of(visit)
        due += lifecycle.plan(clock, watcher.ladder, now).differs_from(clock)
    return due


def timed(func, repeats: int = REPEATS) -> float:
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        func()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples) * 1000


def main() -> None:
    config = parse_config(CONFIG, Path("."))
    print(f"sweep with {ACTIVE} active visits, none due (the common case every few seconds)")
    print(f"{'history':>10} {'indexed sweep':>15} {'full scan':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as folder:
        for history in HISTORY_SIZES:
            store = build(Path(folder), history)
            watcher = Watcher(store, config, FrozenClock(NOW))
            indexed = timed(watcher.sweep)
            scan = timed(lambda s=store, w=watcher: full_scan(s, w, NOW), repeats=5)
            print(f"{history:>10,} {indexed:>12.2f} ms {scan:>9.2f} ms {scan / indexed:>6.0f}x")
            store.close()


if __name__ == "__main__":
    main()
