"""Do check-ins through the pages slow down the alerts, or each other, during an alert storm?

The real daemon runs in its own process (``visitwatch run``: the loops and the waitress
server on loopback). An alert storm is under way: ``STORM_RATE`` in-progress visits a second
reach their deadline over the whole run (10,000 over 60 s by default, as in ``latency.py``),
each raising a reminder. Meanwhile this process, as a crowd of phones behind a reverse
proxy (each its own ``X-Forwarded-For`` address, so the per-client rate limit applies as in
production), sends ``--rate`` check-in requests a second (default 200) for ``--seconds``
(default 60): each a fresh connection and a POST of the "I'm safe" button with its CSRF
token, for a visit of its own, answered by a 303 to the result page.

Request latency is measured from when the request was due to be sent (an open-loop load:
a server that falls behind is charged for the queue it builds) to the answer. The sweep's
alert latency is each reminder's outbox time minus its visit's deadline, measured in the
same storm twice: without the load (the obvious alternative, no pages), then with it.
Figures are printed, not asserted.

    python -m bench.web_load                  # 200/s for 60 s (about 2 minutes in all)
    python -m bench.web_load --short          # 50/s for 10 s, for a quick look
    VISITWATCH_BENCH_SHORT=1 make bench
"""

from __future__ import annotations

import argparse
import http.client
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from bench.latency import WORKERS, Result, config_text, figures, latencies, percentile
from bench.visits import insert_visits, visit_row
from visitwatch.core.notification import NotificationKind
from visitwatch.daemon import lifecycle
from visitwatch.daemon.store import Store, from_ts
from visitwatch.daemon.web.csrf import csrf_token
from visitwatch.daemon.web.links import Links, Signer, load_keys

STORM_RATE = 10_000 / 60  # deadlines a second during the run, as latency.py's 60 s burst
LEAD = 3.0  # seconds from the daemon's start to the first deadline and the first request
DRAIN_LIMIT = 120.0  # give up on the storm this long after its last deadline
CLIENT_THREADS = 64
CHECKIN_OFFSET = 1_000_000  # check-in visits' ids start here, clear of the storm's
REMINDER = str(NotificationKind.REMINDER)


@dataclass
class Load:
    rate: float
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, sorted after the run
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status (0: no answer)
    lateness: list[float] = field(default_factory=list)  # how late the client sent each
    recorded: int = 0  # check-ins the record holds (via = web) after the run


def build(folder: Path, start: datetime, seconds: float, checkins: int, port: int) -> tuple[
    dict[str, datetime], list[str]
]:  # fmt: skip
    """The config, the storm's visits and the check-in visits; their deadlines and links."""
    base = f"http://127.0.0.1:{port}"
    (folder / "visitwatch.toml").write_text(
        config_text().replace(
            '[daemon]\ndatabase = "visitwatch.db"\n',
            f'[daemon]\ndatabase = "visitwatch.db"\npublic_base_url = "{base}"\n',
        )
        # The rate limit as shipped: each phone is its own client.
        + f'\n[web]\nenabled = true\nlisten = "127.0.0.1"\nport = {port}\n'
    )
    store = Store(folder / "visitwatch.db")
    storm = int(STORM_RATE * seconds)
    rows = []
    for i in range(storm):
        deadline = start + timedelta(seconds=LEAD + seconds * i / storm)
        rows.append(
            visit_row(i, start=deadline - timedelta(hours=1), end=deadline,
                      state=lifecycle.IN_PROGRESS, next_action=deadline, worker=i % WORKERS)
        )  # fmt: skip
    links = Links(Signer(load_keys(None, folder)), base, timedelta(hours=24))
    later = start + timedelta(hours=3)  # not due during the run: only the storm is
    targets = []
    for n in range(checkins):
        i = CHECKIN_OFFSET + n
        rows.append(
            visit_row(i, start=start - timedelta(hours=1), end=later,
                      state=lifecycle.IN_PROGRESS, next_action=later, worker=n % WORKERS)
        )  # fmt: skip
        targets.append(links.checkin(f"{i:012x}", f"worker{n % WORKERS}@example.org", later, start))
    insert_visits(store, rows)
    store.close()
    return {r["id"]: from_ts(r["deadline"]) for r in rows[:storm]}, targets


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return int(sock.getsockname()[1])


def start_daemon(folder: Path, port: int) -> subprocess.Popen[bytes]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "visitwatch.daemon.cli", "--config",
         str(folder / "visitwatch.toml"), "--log-level", "warning", "run"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return daemon
        except OSError:
            time.sleep(0.05)
    daemon.kill()
    raise RuntimeError("the daemon did not start serving within 30 s")


def check_in(link: str, signer: Signer, client: int) -> int:
    """POST "I'm safe" as the phone at ``client``; the HTTP status (0: no answer)."""
    url = urlsplit(link)
    token = url.path.rsplit("/", 1)[1]
    body = f"csrf={csrf_token(signer, token)}"
    connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        connection.request(
            "POST", f"{url.path}/checkin", body=body,
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "X-Forwarded-For": f"10.{client >> 16 & 255}.{client >> 8 & 255}.{client & 255}"},
        )  # fmt: skip
        answer = connection.getresponse()
        answer.read()
        return answer.status
    except OSError:
        return 0
    finally:
        connection.close()


def run_load(load: Load, links: list[str], signer: Signer, began: float) -> None:
    """Open loop: request n is due at ``began + n / rate``, whoever is free sends it."""
    due: queue.Queue[tuple[int, float] | None] = queue.Queue()
    lock = threading.Lock()

    def phone() -> None:
        while (job := due.get()) is not None:
            n, when = job
            pause = when - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            late = time.monotonic() - when
            status = check_in(links[n], signer, n)
            took = time.monotonic() - when
            with lock:
                load.latencies.append(took)
                load.lateness.append(late)
                load.statuses[status] = load.statuses.get(status, 0) + 1

    threads = [threading.Thread(target=phone, daemon=True) for _ in range(CLIENT_THREADS)]
    for thread in threads:
        thread.start()
    for n in range(len(links)):
        due.put((n, began + n / load.rate))
    for _ in threads:
        due.put(None)
    for thread in threads:
        thread.join()
    load.latencies.sort()


def count(database: Path, sql: str, *params: str) -> int:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as conn:
        return int(conn.execute(sql, params).fetchone()[0])


REMINDERS_SENT = "SELECT COUNT(*) FROM notifications WHERE kind = ? AND status = 'sent'"
WEB_CHECKINS = "SELECT COUNT(*) FROM checkins WHERE via = 'web'"


@dataclass
class Storm:
    """One storm's reminders: outbox latencies, and the part the sweep took to raise them."""

    latencies: list[float]
    missing: int
    duplicates: int
    raised: list[float]  # the notification row's creation minus the deadline, sorted


RAISED = (
    "SELECT (julianday(n.created) - julianday(v.deadline)) * 86400.0 FROM notifications n"
    " JOIN visits v ON v.id = n.visit_id WHERE n.kind = ? ORDER BY 1"
)


def storm(seconds: float, load: Load | None) -> Storm:
    """One storm, with or without the load."""
    with tempfile.TemporaryDirectory() as name:
        folder, port = Path(name), free_port()
        database = folder / "visitwatch.db"
        checkins = int(load.rate * load.seconds) if load else 0
        deadlines, links = build(folder, datetime.now(UTC), seconds, checkins, port)
        signer = Signer(load_keys(None, folder))
        daemon = start_daemon(folder, port)
        began = time.monotonic() + LEAD
        try:
            if load is not None:
                run_load(load, links, signer, began)
            give_up = began + seconds + DRAIN_LIMIT
            while count(database, REMINDERS_SENT, REMINDER) < len(deadlines):
                if time.monotonic() > give_up:
                    break
                time.sleep(0.25)
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        if load is not None:
            load.recorded = count(database, WEB_CHECKINS)
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
            raised = [row[0] for row in conn.execute(RAISED, (REMINDER,))]
        found = latencies(folder / "outbox.jsonl", deadlines, lambda _: 0.0)
        return Storm(*found, raised)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.web_load", description=__doc__)
    short = bool(os.environ.get("VISITWATCH_BENCH_SHORT"))
    parser.add_argument("--short", action="store_true", default=short, help="50/s for 10 s")
    parser.add_argument("--rate", type=float, help="check-in requests a second (200)")
    parser.add_argument("--seconds", type=float, help="how long the load lasts (60)")
    args = parser.parse_args(argv)
    rate = args.rate or (50.0 if args.short else 200.0)
    seconds = args.seconds or (10.0 if args.short else 60.0)
    print(
        f"\ncheck-ins through the pages during an alert storm: {rate:g} requests/s for "
        f"{seconds:g} s, {int(STORM_RATE * seconds):,} deadlines over the same {seconds:g} s "
        "(the daemon in its own process, its pages on loopback)"
    )
    load = Load(rate, seconds)
    results = {"no load": storm(seconds, None), "with the load": storm(seconds, load)}
    values = load.latencies
    answered = ", ".join(f"{code or 'none'}: {n}" for code, n in sorted(load.statuses.items()))
    print(
        f"  check-in requests: {len(values):,} ({answered}); latency from due to answer "
        f"p50 {1000 * percentile(values, 0.5):.0f} ms, p95 {1000 * percentile(values, 0.95):.0f}"
        f" ms, p99 {1000 * percentile(values, 0.99):.0f} ms, max {1000 * percentile(values, 1):.0f}"
        f" ms (client sent late by up to {1000 * max(load.lateness, default=0):.0f} ms); "
        f"{load.recorded:,} check-ins in the record"
    )
    print(f"  reminder latency (deadline to outbox line; raised: to the sweep's row):\n"
          f"  {'':<16}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}  missing  twice"
          f"{'raised p50':>12}{'p99':>8}")  # fmt: skip
    for name, result in results.items():
        f = figures_of(result.latencies, result.missing)
        print(
            f"  {name:<16}"
            + "".join(f"{f[k]:>8.2f}s" for k in ("p50", "p95", "p99", "max"))
            + f"{result.missing:>9}{result.duplicates:>7}"
            + f"{percentile(result.raised, 0.5):>11.2f}s{percentile(result.raised, 0.99):>7.2f}s"
        )


def figures_of(found: list[float], missing: int) -> dict[str, float]:
    """``latency.figures`` for a storm's reminders (a missing one counts as late)."""
    return figures(Result("", found, missing, 0, 0.0, 0.0))


if __name__ == "__main__":
    main()
