"""What an unchanged calendar costs at each poll, with and without the content hash.

A team calendar with 200 visits a week is read every few minutes and almost never changes
between two reads. The source's fingerprint (a hash of the body) lets the sync skip it; the
obvious alternative re-parses, re-expands and re-checks every entry each time.
"""

from __future__ import annotations

import statistics
import tempfile
import textwrap
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

from visitwatch.daemon.clock import FrozenClock
from visitwatch.daemon.config import load_config
from visitwatch.daemon.service import Service

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ENTRIES = 600  # three weeks of a busy team's visits inside the default window


def feed() -> str:
    events = []
    for index in range(ENTRIES):
        start = NOW - timedelta(days=2) + timedelta(minutes=45 * index)
        events.append(
            textwrap.dedent(f"""\
            BEGIN:VEVENT
            UID:visit-{index}@bench
            DTSTAMP:20261120T090000Z
            DTSTART:{start:%Y%m%dT%H%M%SZ}
            DTEND:{start + timedelta(hours=1):%Y%m%dT%H%M%SZ}
            SUMMARY:Home visit - family {index}
            LOCATION:{index} Long Road\\, Preston
            DESCRIPTION:Risk assessment: complete\\nReturn by: {start + timedelta(hours=1):%H:%M}
            CATEGORIES:Home Visit
            END:VEVENT""")
        )
    return (
        "BEGIN:VCALENDAR\nVERSION:2.0\nPRODID:-//bench//EN\n"
        + "\n".join(events)
        + "\nEND:VCALENDAR\n"
    )


CONFIG = """
[daemon]
database = "bench.db"
[[staff]]
id = "w@example.org"
name = "W"
manager = "m@example.org"
[[staff]]
id = "m@example.org"
name = "M"
role = "manager"
[[staff]]
id = "d@example.org"
name = "D"
role = "director"
[[sources]]
name = "team"
type = "ics"
path = "team.ics"
owner = "w@example.org"
[[channels]]
name = "outbox"
type = "outbox"
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "team.ics").write_text(feed().replace("\n", "\r\n"))
        (root / "visitwatch.toml").write_text(CONFIG)
        service = Service(load_config(root / "visitwatch.toml"), FrozenClock(NOW))
        began = time.perf_counter()
        first = service.sync("team")
        first_ms = (time.perf_counter() - began) * 1000

        def poll(force: bool) -> float:
            if force:  # forget the hash: what a sync without it does every time
                service.store.db.conn.execute("UPDATE sources SET fingerprint = NULL")
            began = time.perf_counter()
            report = service.sync("team")
            assert report.skipped is not force
            return (time.perf_counter() - began) * 1000

        skipped = statistics.median(poll(False) for _ in range(10))
        reprocessed = statistics.median(poll(True) for _ in range(5))
        tracemalloc.start()  # measured apart: tracing slows what it measures
        poll(True)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        service.close()
    print(f"\nsync of an ICS feed with {ENTRIES} entries ({first.visits} visits)")
    print(f"  first read (insert every visit):        {first_ms:8.1f} ms")
    print(f"  peak Python memory while re-processing: {peak / 2**20:8.1f} MiB")
    print(f"  unchanged, skipped by content hash:     {skipped:8.1f} ms")
    print(
        f"  unchanged, re-processed (no hash):      {reprocessed:8.1f} ms "
        f"({reprocessed / skipped:.0f}x slower)"
    )


if __name__ == "__main__":
    main()
