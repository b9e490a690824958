"""How long does a burst of due reminders wait before it reaches the outbox?

10,000 visits are in progress and their deadlines (expected returns) fall evenly within a
short window. On the default config (the outbox channel only, ``sweep_interval`` 10 s,
the pan-lancashire policy) each deadline raises one reminder to the worker. The latency
of a reminder is the ``sent`` time of its line in the outbox minus the visit's deadline.

Two designs run the same scenario, one after the other:

- **today**: the real daemon loops (:meth:`Service.start` on the system clock). The sweep
  wakes at the next deadline, advances every due visit in batches of 500 per transaction,
  and each channel's lane writes its batch with one write and one fsync.
- **4135e09**: the design before issue 6, reproduced here. APScheduler ran the sweep every
  ``sweep_interval`` (10 s) with ``sweep(limit=500)``, one transaction per visit, and woke
  the dispatch after it: ``dispatch(limit=200)``, up to 3 rounds (a second round only for
  fallback copies), each row sent with the channel's single-message ``send()`` (one fsync
  per outbox line) and committed on its own. The runner below does that work for real
  (same Watcher per-visit step, same store, same outbox file) but does not sleep between
  ticks: the idle time is skipped on its clock and added back to each outbox line's
  ``sent`` time. The old design would need over 8 minutes of wall time to drain the
  burst; its waiting costs nothing to simulate, its work is what it was.

The window defaults to 60 s, a harsher burst (167 deadlines a second) than the issue's
three minutes (56 a second), so that ``make bench`` stays short; ``python -m bench.latency
--window 180`` runs the issue's scenario exactly.
"""

from __future__ import annotations

import argparse
import bisect
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.visits import insert_visits, visit_row
from visitwatch.connectors.outbox import read_outbox
from visitwatch.core.errors import ConnectorError
from visitwatch.core.notification import NotificationKind
from visitwatch.daemon import lifecycle, logs
from visitwatch.daemon.clock import SystemClock
from visitwatch.daemon.config import load_config
from visitwatch.daemon.dispatch import to_message
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.daemon.visits import Visit

VISITS = 10_000
WINDOW = 60.0  # seconds over which the deadlines fall (the issue: 180)
LEAD = 3.0  # seconds from the start of a run to the first deadline
WORKERS = 40
DRAIN_LIMIT = 120.0  # give up this long after the last deadline (today's design)
TICK = 10.0  # the example config's sweep_interval, and the old design's tick
OLD_SWEEP_LIMIT = 500  # 4135e09: Watcher.sweep(limit=500)
OLD_DISPATCH_LIMIT = 200  # 4135e09: Dispatcher.dispatch(limit=200)
OLD_DISPATCH_ROUNDS = 3


def config_text() -> str:
    staff = [
        '[[staff]]\nid = "director@example.org"\nname = "Dee Rector"\nrole = "director"',
        '[[staff]]\nid = "manager@example.org"\nname = "Manny Jer"\nrole = "manager"\n'
        'manager = "director@example.org"',
    ]
    staff += [
        f'[[staff]]\nid = "worker{i}@example.org"\nname = "Worker {i}"\n'
        f'mobile = "07700 900{i:03d}"\nmanager = "manager@example.org"'
        for i in range(WORKERS)
    ]
    # Everything else as shipped: sweep_interval 10s, the pan-lancashire policy.
    return (
        '[daemon]\ndatabase = "visitwatch.db"\n\n'
        + "\n\n".join(staff)
        + '\n\n[[channels]]\nname = "outbox"\ntype = "outbox"\npath = "outbox.jsonl"\n'
    )


def build(folder: Path, first_deadline: datetime, window: float) -> dict[str, datetime]:
    """Write the config and 10,000 in-progress visits; return each visit's deadline."""
    (folder / "visitwatch.toml").write_text(config_text())
    store = Store(folder / "visitwatch.db")
    rows = []
    for i in range(VISITS):
        deadline = first_deadline + timedelta(seconds=window * i / VISITS)
        rows.append(
            visit_row(
                i,
                start=deadline - timedelta(hours=1),
                end=deadline,
                state=lifecycle.IN_PROGRESS,
                next_action=deadline,
                worker=i % WORKERS,
            )
        )
    insert_visits(store, rows)
    store.close()
    return {r["id"]: from_ts(r["deadline"]) for r in rows}


def cpu_seconds() -> float:
    """User + system time of this process, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sent_reminders(store: Store) -> int:
    row = store.one(
        "SELECT COUNT(*) AS n FROM notifications WHERE kind = ? AND status = 'sent'",
        (NotificationKind.REMINDER,),
    )
    return row["n"] if row else 0


@dataclass
class Result:
    design: str
    latencies: list[float]  # seconds, one per reminder found in the outbox
    missing: int  # reminders not in the outbox when the run ended
    duplicates: int
    cpu: float  # CPU seconds used by the design
    span: float  # seconds from the start of the run to the last line (as the design saw it)


def latencies(
    outbox: Path, deadlines: dict[str, datetime], offset: Callable[[datetime], float]
) -> tuple[list[float], int, int]:
    """Per reminder: outbox ``sent`` (plus the time skipped then) minus the deadline."""
    seen: dict[str, float] = {}
    duplicates = 0
    for record in read_outbox(outbox):
        if record["kind"] != NotificationKind.REMINDER:
            continue
        sent = datetime.fromisoformat(record["sent"])
        latency = (sent - deadlines[record["visit_id"]]).total_seconds() + offset(sent)
        if record["visit_id"] in seen:
            duplicates += 1
            continue
        seen[record["visit_id"]] = latency
    return sorted(seen.values()), len(deadlines) - len(seen), duplicates


# ---------------------------------------------------------------------- today's design


def run_today(folder: Path, window: float) -> Result:
    deadlines = build(folder, datetime.now(UTC) + timedelta(seconds=LEAD), window)
    service = Service(load_config(folder / "visitwatch.toml"), SystemClock())
    began, cpu = time.monotonic(), cpu_seconds()
    service.start()
    give_up = began + LEAD + window + DRAIN_LIMIT
    try:
        while sent_reminders(service.store) < VISITS and time.monotonic() < give_up:
            time.sleep(0.25)
    finally:
        service.stop_loops()
        cpu = cpu_seconds() - cpu
        span = time.monotonic() - began
        service.close()
    found, missing, duplicates = latencies(folder / "outbox.jsonl", deadlines, lambda _: 0.0)
    return Result("today (woken at each deadline)", found, missing, duplicates, cpu, span)


# ---------------------------------------------------------------------- the old design


class SkippingClock:
    """The system clock plus the idle time the old design's runner did not sleep through."""

    def __init__(self) -> None:
        self.skipped = 0.0
        self._changes: list[tuple[datetime, float]] = [(datetime.now(UTC), 0.0)]

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.skipped)

    def skip(self, seconds: float) -> None:
        self.skipped += seconds
        self._changes.append((datetime.now(UTC), self.skipped))

    def skipped_at(self, real: datetime) -> float:
        """How much had been skipped at the real moment ``real`` (an outbox ``sent``)."""
        index = bisect.bisect_right(self._changes, real, key=lambda change: change[0]) - 1
        return self._changes[max(0, index)][1]


def old_sweep(service: Service, now: datetime) -> None:
    """4135e09's Watcher.sweep(limit=500): at most 500 due visits, one transaction each."""
    store, watcher = service.store, service.watcher
    rows = store.query(
        "SELECT * FROM visits WHERE next_action_at IS NOT NULL AND next_action_at <= ?"
        " ORDER BY next_action_at LIMIT ?",
        (ts(now), OLD_SWEEP_LIMIT),
    )
    for row in rows:
        try:
            watcher._advance(Visit.from_row(row), now)  # today's step: its own transaction
        except Exception:
            with store.transaction() as conn:
                conn.execute(
                    "UPDATE visits SET next_action_at = ? WHERE id = ?",
                    (ts(now + timedelta(minutes=1)), row["id"]),
                )
    store.set_meta("last_sweep_at", ts(now) or "")
    service.health.check()  # 4135e09's Service.sweep ran it after every sweep


def old_dispatch(service: Service, clock: SkippingClock) -> int:
    """4135e09's Dispatcher.dispatch(limit=200): one send() and one commit per row."""
    store, failures = service.store, 0
    for _round in range(OLD_DISPATCH_ROUNDS):
        rows = store.query(
            "SELECT * FROM notifications WHERE status = 'pending' AND next_attempt_at <= ?"
            " ORDER BY id LIMIT ?",
            (ts(clock.now()), OLD_DISPATCH_LIMIT),
        )
        for row in rows:
            try:
                service.channels[row["channel"]].send(to_message(row))  # one fsync per line
            except ConnectorError:
                failures += 1  # the old design retried it later; here it should not happen
                continue
            with store.transaction() as conn:
                conn.execute(
                    "UPDATE notifications SET status = 'sent', sent_at = ?,"
                    " attempts = attempts + 1, last_error = NULL WHERE id = ?",
                    (ts(clock.now()), row["id"]),
                )
        break  # a further round only ran for fallback copies, and nothing failed here
    return failures


def run_old(folder: Path, window: float) -> Result:
    deadlines = build(folder, datetime.now(UTC) + timedelta(seconds=LEAD), window)
    clock = SkippingClock()
    service = Service(load_config(folder / "visitwatch.toml"), clock)
    began, cpu = clock.now(), cpu_seconds()
    failures = 0
    # 4135e09 started the sweep 1 s in, then every sweep_interval; a tick that overran was
    # coalesced into the next one. The sweep woke the dispatch when it left rows pending.
    tick = began + timedelta(seconds=1)
    give_up = began + timedelta(hours=1)
    while sent_reminders(service.store) < VISITS and tick < give_up:
        now = clock.now()
        if now < tick:
            clock.skip((tick - now).total_seconds())
        old_sweep(service, clock.now())
        failures += old_dispatch(service, clock)
        while tick <= clock.now():
            tick += timedelta(seconds=TICK)
    cpu = cpu_seconds() - cpu
    span = (clock.now() - began).total_seconds()
    service.close()
    if failures:
        print(f"  (old design: {failures} sends failed; its figures are not comparable)")
    found, missing, duplicates = latencies(folder / "outbox.jsonl", deadlines, clock.skipped_at)
    return Result("4135e09 (10 s tick, caps 500/200)", found, missing, duplicates, cpu, span)


# ---------------------------------------------------------------------- report


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (``inf`` when none)."""
    if not values:
        return float("inf")
    return values[min(len(values) - 1, max(0, round(share * len(values)) - 1))]


def figures(result: Result) -> dict[str, float]:
    values = result.latencies + [float("inf")] * result.missing  # missing counts as late
    return {
        "p50": percentile(values, 0.50),
        "p95": percentile(values, 0.95),
        "p99": percentile(values, 0.99),
        "max": percentile(values, 1.0),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument(
        "--window", type=float, default=WINDOW, help="seconds the deadlines fall within"
    )
    window = parser.parse_args(argv).window
    print(
        f"\nreminder latency (deadline to outbox line): {VISITS:,} visits in progress, "
        f"deadlines evenly over {window:g} s; default config (outbox only, 10 s sweep_interval)"
    )
    results = []
    for run in (run_today, run_old):
        with tempfile.TemporaryDirectory() as folder:
            results.append(run(Path(folder), window))
    header = (
        f"  {'design':<36}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}{'drained':>9}{'CPU':>8}"
        f"{'CPU %':>7}"
    )
    print(header)
    for result in results:
        f = figures(result)
        print(
            f"  {result.design:<36}"
            + "".join(f"{f[k]:>8.2f}s" for k in ("p50", "p95", "p99", "max"))
            + f"{result.span:>8.0f}s{result.cpu:>7.1f}s{100 * result.cpu / result.span:>6.1f}%"
        )
        if result.missing or result.duplicates:
            print(
                f"    {result.missing} reminders missing, {result.duplicates} sent twice "
                "(a duplicate's latency is its first copy's)"
            )
    today, old = (figures(r)["p99"] for r in results)
    print(f"  p99: {old / today:.0f}x lower today; target p99 <= 2 s: "
          f"{'met' if today <= 2.0 else 'MISSED'}")  # fmt: skip
    print(
        "  (drained: seconds from the start of the run until every reminder was out; CPU %: "
        "CPU time over that span. The old design's idle waits are skipped, not slept, and "
        "still counted in its span.)"
    )


if __name__ == "__main__":
    logs.configure("warning")  # as the daemon runs; per-alert info logs would dominate
    main()
