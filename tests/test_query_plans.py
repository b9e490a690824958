"""The daemon's every-pass queries search an index: their cost follows what is due or
pending, never the size of the record (years of visits and notifications).

A query that scans a whole table runs fine in a test and slows every sweep and delivery
pass in an organisation with a long history (it did: the outage check scanned every
notification ever sent, twice a pass). Timings cannot show this in a test; SQLite's own
query plan can. Every statement a sync, sweep, delivery pass and a check-in run is
captured and explained; none may scan a growing table.
"""

from __future__ import annotations

import re
import sqlite3
from datetime import timedelta
from typing import Any

import pytest

from tests.conftest import T0, World, home_visit
from tests.web_client import web_world
from visitwatch.daemon import store as store_module

GROWING = ("visits", "notifications", "audit", "checkins", "short_links", "web_used_nonces")
SCAN = re.compile(r"^SCAN (\w+)(?!.*USING)")  # a table, or its alias, read whole
TABLE = re.compile(r"\b(?:FROM|JOIN|UPDATE)\s+(\w+)(?:\s+(?:AS\s+)?(\w+))?", re.I)
START = T0 + timedelta(hours=1)


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement the store's connections run from now on."""
    seen: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(seen.append)
        return conn

    monkeypatch.setattr(store_module.sqlite3, "connect", traced)
    return seen


def scans(database: str, sql: list[str]) -> dict[str, list[str]]:
    """The statements among ``sql`` whose plan scans a growing table, with those steps."""
    found: dict[str, list[str]] = {}
    with sqlite3.connect(database) as conn:
        for statement in sorted(set(sql)):
            if not re.match(r"\s*(SELECT|UPDATE|DELETE)\b", statement, re.I):
                continue
            names = {}
            for table, alias in TABLE.findall(statement):
                names[table] = table
                if alias and alias.upper() not in ("WHERE", "SET", "INDEXED", "ON", "JOIN"):
                    names[alias] = table
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}")]
            bad = [
                step
                for step in plan
                if (match := SCAN.match(step)) and names.get(match[1], match[1]) in GROWING
            ]
            if bad:
                found[statement] = bad
    return found


def test_sync_sweep_delivery_and_a_check_in_never_scan_the_record(
    world: World, statements: list[str]
) -> None:
    """Through a whole overrun (reminder, manager, director, check-in, all clear)."""
    ww = web_world(world)
    world.write_calendar(home_visit())
    for minutes in (0, 61, 80, 110):
        ww.at(START + timedelta(minutes=minutes))
        ww.tick()
    [link] = ww.links_in("reminder", "asha.khan@example.org")
    ww.press(link, "checkin")
    ww.tick()
    assert world.recipients("all_clear"), "the story did not run to its end"
    assert scans(str(ww.service.config.daemon.database), statements) == {}
