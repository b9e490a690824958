"""Retention: personal data anonymised after the configured period and nothing sooner,
statistics kept (counts by state, deadlines, lateness, delivery times), message words
removed, anonymised rows deleted after keep_statistics; the audit stays append-only except
for retention's own audited runs; `purge --dry-run` changes nothing; the daemon runs it."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.conftest import T0, World, home_visit, tick
from visitwatch.daemon.cli import main
from visitwatch.daemon.config_types import RetentionSettings
from visitwatch.daemon.retention import ANONYMISED, SIGN_IN_LINK_TTL, Retention
from visitwatch.daemon.service import Service
from visitwatch.daemon.store import Store, from_ts, ts
from visitwatch.daemon.web import signin

WOULD = r"would: (.*?)\s+(\d+)(?:\s+\((\S+) to (\S+)\))?$"
PERSONAL = ("Asha", "Maria", "Carter", "Brook Street", "asha.khan", "maria.jones", "07700")


def story(world: World, start: datetime, uid: str) -> str:
    """A visit from ``start`` for an hour: overdue, Maria alerted and acknowledging, Asha
    checking in 30 minutes late. Its id."""
    service = world.services[0] if world.services else world.service()
    world.at(start - timedelta(hours=1))
    events = [home_visit(u, start=s, end=s + timedelta(hours=1)) for u, s in _booked(world)]
    world.write_calendar(*events, home_visit(uid, start=start, end=start + timedelta(hours=1)))
    _booked(world).append((uid, start))
    for minutes in (30, 60, 120, 135):
        world.at(start + timedelta(minutes=minutes - 60))
        tick(service)
    row = service.store.one("SELECT id FROM visits WHERE uid = ?", (uid,))
    assert row is not None
    actions = service.watcher.actions
    world.at(start + timedelta(minutes=80))
    actions.acknowledge(row["id"], by="Maria Jones", via="web")
    world.at(start + timedelta(minutes=90))
    actions.check_in(row["id"])
    tick(service)
    return str(row["id"])


def _booked(world: World) -> list[tuple[str, datetime]]:
    return world.__dict__.setdefault("booked", [])


def text_of(store: Store, visit_id: str) -> str:
    """Every stored value about the visit, as one string."""
    rows: list[dict[str, Any]] = []
    rows += store.query("SELECT * FROM visits WHERE id = ?", (visit_id,))
    for table in ("audit", "checkins", "notifications"):
        rows += store.query(f"SELECT * FROM {table} WHERE visit_id = ?", (visit_id,))
    return json.dumps(rows)


def statistics(store: Store) -> list[Any]:
    """What anonymisation must keep: states, times, lateness, relations, delivery times."""
    return [
        store.query('SELECT id, state, start, "end", deadline, ended_at, acknowledged_at'
                    " FROM visits ORDER BY id"),
        store.query("SELECT visit_id, at, from_state, to_state, cause FROM audit"
                    " WHERE cause != 'retention applied' ORDER BY id"),
        store.query("SELECT visit_id, at, action, via FROM checkins ORDER BY id"),
        store.query("SELECT visit_id, kind, channel, recipient_relation, status, created,"
                    " sent_at FROM notifications ORDER BY id"),
    ]  # fmt: skip


@pytest.fixture
def history(world: World) -> tuple[Service, str, str]:
    """Two visits: one on T0, one 80 days later; the clock 100 days after T0."""
    old = story(world, T0 + timedelta(hours=1), "old")
    recent = story(world, T0 + timedelta(days=80, hours=1), "recent")
    world.at(T0 + timedelta(days=100))
    return world.services[0], old, recent


def test_anonymises_exactly_what_is_past_the_cutoff(history: tuple[Service, str, str]) -> None:
    """After 90 days a visit keeps no name, address, subject or staff id anywhere (visit,
    audit, check-ins, notifications); an 20-day-old one keeps all; statistics are intact."""
    service, old, recent = history
    store = service.store
    before_recent = text_of(store, recent)
    before = statistics(store)
    assert all(word in text_of(store, old) for word in PERSONAL)
    done = Retention(store, service.config, service.clock).apply("test")
    assert done["visits anonymised"] == 1 and done["audit lines anonymised"] > 0
    assert done["check-ins anonymised"] == 2 and done["notifications anonymised"] > 0
    anonymous = text_of(store, old)
    assert [word for word in PERSONAL if word in anonymous] == []
    assert text_of(store, recent) == before_recent
    assert statistics(store) == before
    visit = store.one("SELECT * FROM visits WHERE id = ?", (old,))
    assert visit is not None
    assert (visit["worker_id"], visit["subject"], visit["address"]) == ("", ANONYMISED, "")
    actors = {r["actor"] for r in store.query("SELECT actor FROM audit WHERE visit_id = ?", (old,))}
    assert actors == {"calendar", "visitwatch", ANONYMISED}
    line = store.one("SELECT * FROM audit WHERE cause = 'retention applied'")
    assert line is not None and line["actor"] == "test"
    detail = json.loads(line["detail"])
    assert detail["done"]["visits anonymised"] == 1
    assert detail["personal_data_before"] == ts(T0 + timedelta(days=10))
    run = store.one("SELECT * FROM retention_runs")
    assert run is not None and run["finished"] is not None


def test_dry_run_changes_nothing(history: tuple[Service, str, str], capsys: Any) -> None:
    """--dry-run lists counts by kind and the dates they span, and writes nothing."""
    service, old, _recent = history
    real_now = datetime.now(UTC)
    # The CLI runs on the real clock: move the record so "100 days ago" is T0 for it too,
    # by whole days, so its times of day stay the test's own (a visit never crosses
    # midnight because the suite ran late in the evening).
    shift = timedelta(days=(real_now - service.clock.now()).days)
    conn = service.store.db.conn
    moved = {
        "visits": ("start", "end", "ended_at", "deadline", "expected_return"),
        "notifications": ("created",),
    }
    for table, columns in moved.items():
        for row in service.store.query(f"SELECT * FROM {table}"):
            values = [ts(from_ts(row[c]) + shift) if row[c] else None for c in columns]
            sets = ", ".join(f'"{c}" = ?' for c in columns)
            conn.execute(f"UPDATE {table} SET {sets} WHERE id = ?", (*values, row["id"]))
    dump = lambda: list(conn.iterdump())  # noqa: E731
    before = dump()
    config = str(service.config.path)
    assert main(["--config", config, "--log-level", "error", "purge", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert dump() == before
    would = {m[1]: m.groups()[1:] for m in re.finditer(WOULD, out, re.MULTILINE)}
    day = f"{(T0 + shift).astimezone(service.config.daemon.timezone):%Y-%m-%d}"
    assert would["visits anonymised"] == ("1", day, day)
    assert would["notifications anonymised"][0] == "3"  # reminder, overrun, all clear
    assert "nothing was changed" in out
    assert main(["--config", config, "--log-level", "error", "purge"]) == 0
    assert ANONYMISED in text_of(service.store, old)


def test_audit_stays_append_only(history: tuple[Service, str, str]) -> None:
    """Outside a retention run every UPDATE or DELETE of the audit or check-ins is refused;
    inside one, only the fixed anonymisation of a row older than its cutoff is allowed."""
    service, old, recent = history
    conn = service.store.db.conn
    refused = pytest.raises(sqlite3.IntegrityError, match="append-only")
    for sql in (
        "UPDATE audit SET actor = 'someone else'",
        f"UPDATE audit SET actor = '{ANONYMISED}', detail = '{{}}', anonymised = 'x'",
        "DELETE FROM audit",
        "UPDATE checkins SET actor = 'someone else'",
        "DELETE FROM checkins",
    ):
        with refused:
            conn.execute(sql)
    with service.store.transaction():
        now = ts(service.clock.now())
        cutoff = ts(T0 + timedelta(days=10))
        conn.execute(
            "INSERT INTO retention_runs (started, personal_cutoff, incident_cutoff,"
            " statistics_cutoff, body_cutoff, actor) VALUES (?, ?, ?, '', ?, 'test')",
            (now, cutoff, cutoff, cutoff),
        )
        anonymise = f"UPDATE audit SET actor = '{ANONYMISED}', detail = '{{}}', anonymised = ?"
        with refused:  # what happened may never change
            conn.execute(anonymise + ", cause = 'nothing' WHERE visit_id = ?", (now, old))
        with refused:  # nor a row newer than the cutoff
            conn.execute(anonymise + " WHERE visit_id = ?", (now, recent))
        with refused:  # nor to another value
            conn.execute("UPDATE audit SET actor = 'X', anonymised = ? WHERE visit_id = ?",
                         (now, old))  # fmt: skip
        with refused:  # a run's row is no delete permit before the statistics cutoff
            conn.execute("DELETE FROM audit WHERE visit_id = ?", (old,))
        allowed = conn.execute(anonymise + " WHERE visit_id = ?", (now, old)).rowcount
        assert allowed > 0
        conn.execute("UPDATE retention_runs SET finished = ?", (now,))
    with refused:
        conn.execute("UPDATE audit SET anonymised = NULL")
    with pytest.raises(sqlite3.IntegrityError, match="closed once"):
        conn.execute("UPDATE retention_runs SET finished = NULL")


def test_message_words_go_first_and_statistics_last(history: tuple[Service, str, str]) -> None:
    """At 30 days a message's words go and its recipient stays; after keep_statistics the
    anonymised rows (audit lines included) are deleted, through an audited run."""
    service, old, recent = history
    store = service.store
    retention = Retention(store, service.config, service.clock)
    service.clock.set(T0 + timedelta(days=115))  # the recent visit's messages: 35 days old
    retention.apply("test")
    note = store.one("SELECT * FROM notifications WHERE visit_id = ? AND kind = 'overrun'",
                     (recent,))  # fmt: skip
    assert note is not None and (note["subject"], note["text"], note["link"]) == ("", "", "")
    assert note["recipient_name"] == "Maria Jones"
    service.clock.set(T0 + timedelta(days=6 * 366 + 50))  # old: past it; recent: not
    retention.settings = RetentionSettings(keep_statistics=timedelta(days=6 * 366))
    done = retention.apply("test")
    assert done["visits deleted"] == 1 and done["audit lines deleted"] > 0
    assert store.one("SELECT 1 FROM visits WHERE id = ?", (old,)) is None
    assert store.query("SELECT 1 FROM audit WHERE visit_id = ?", (old,)) == []
    assert store.one("SELECT 1 FROM visits WHERE id = ?", (recent,)) is not None
    retention.settings = RetentionSettings(keep_statistics=None)
    service.clock.set(T0 + timedelta(days=20 * 366))
    assert retention.apply("test")["visits deleted"] == 0  # "forever": statistics stay


def test_an_incident_keeps_its_names_longer(world: World) -> None:
    """A visit where help was asked for keeps its personal data for incidents_after."""
    service = world.service()
    world.write_calendar(home_visit("help"))
    world.at(T0 + timedelta(minutes=70))
    tick(service)
    vid = service.store.query("SELECT id FROM visits")[0]["id"]
    service.watcher.actions.request_help(vid)
    world.at(T0 + timedelta(minutes=90))
    service.watcher.actions.check_in(vid)
    retention = Retention(service.store, service.config, service.clock)
    world.at(T0 + timedelta(days=400))
    assert retention.apply("test")["visits anonymised"] == 0
    world.at(T0 + timedelta(days=3 * 366 + 2))
    assert retention.apply("test")["visits anonymised"] == 1


def test_sign_in_link_lifetime_matches_the_pages() -> None:
    """Retention removes a sign-in message once its link has expired, as the pages say."""
    assert SIGN_IN_LINK_TTL == signin.LINK_TTL


def test_the_daemon_runs_it(history: tuple[Service, str, str], world: World) -> None:
    """Started, the daemon applies retention by itself, and again only a day later."""
    _service, old, _recent = history
    daemon = world.service()
    daemon.start()
    try:
        deadline = time.monotonic() + 10
        while ANONYMISED not in text_of(daemon.store, old):
            assert time.monotonic() < deadline, "the daemon did not anonymise the old visit"
            time.sleep(0.05)
    finally:
        assert daemon.stop_loops()
    runs = daemon.store.query("SELECT actor FROM retention_runs")
    assert [r["actor"] for r in runs] == ["visitwatch"]
