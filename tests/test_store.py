"""The record's storage: migrations, transactions, the one-daemon lock."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from visitwatch.daemon import store as store_module
from visitwatch.daemon.store import DaemonLock, Store, WriteGate, from_ts, ts


def test_fresh_database_gets_every_migration_once(tmp_path: Path):
    """A new database records each named migration; opening it again applies nothing."""
    first = Store(tmp_path / "v.db")
    names = [r["name"] for r in first.query("SELECT name FROM schema_migrations ORDER BY name")]
    assert names == [name for name, _ in store_module.MIGRATIONS]
    first.close()
    again = Store(tmp_path / "v.db")
    assert again.migrate() == []
    again.close()


def test_an_older_database_is_upgraded_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A database made by an older release gains only the newer migrations, keeping its rows."""
    monkeypatch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
    old = Store(tmp_path / "v.db")
    old.set_meta("kept", "yes")
    old.close()
    monkeypatch.undo()
    upgraded = Store(tmp_path / "v.db")
    assert upgraded.get_meta("kept") == "yes"
    indexes = {
        r["name"] for r in upgraded.query("SELECT name FROM sqlite_master WHERE type='index'")
    }
    assert "notifications_failed" in indexes
    upgraded.close()


def test_nested_failure_rolls_back_alone(tmp_path: Path):
    """Inside a batch, a failing entry's writes vanish while the others commit."""
    store = Store(tmp_path / "v.db")
    with store.transaction():
        store.set_meta("a", "1")
        with pytest.raises(RuntimeError), store.transaction():
            store.set_meta("b", "2")
            raise RuntimeError("broken entry")
        store.set_meta("c", "3")
    assert (store.get_meta("a"), store.get_meta("b"), store.get_meta("c")) == ("1", None, "3")
    with pytest.raises(RuntimeError), store.transaction():
        store.set_meta("d", "4")
        raise RuntimeError("whole batch fails")
    assert store.get_meta("d") is None
    store.close()


def test_times_are_stored_sortable_and_naive_times_refused():
    """Stored times sort as text in time order; a naive datetime never reaches the store."""
    early = datetime(2026, 3, 29, 0, 59, 59, 999999, tzinfo=UTC)
    late = datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert ts(early) < ts(late)
    assert from_ts(ts(late)) == late
    with pytest.raises(ValueError, match="naive"):
        ts(datetime(2026, 3, 29, 1, 0))


def test_lock_admits_one_holder(tmp_path: Path):
    """A second lock on the same database is refused until the first is released."""
    first, second = DaemonLock(tmp_path / "v.db"), DaemonLock(tmp_path / "v.db")
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


def test_audit_rows_cannot_be_changed(tmp_path: Path):
    """UPDATE on the audit table is refused: the record is append-only."""
    store = Store(tmp_path / "v.db")
    with store.transaction() as conn:
        store.audit(conn, "v1", datetime.now(UTC), "test", "tester")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.conn.execute("UPDATE audit SET actor = 'someone else'")
    store.close()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_record_files_are_private_whatever_the_umask(tmp_path: Path):
    """The database, its WAL and shared-memory files and the lock file are 0600 under umask 022."""
    old = os.umask(0o022)
    try:
        store = Store(tmp_path / "v.db")
        store.set_meta("written", "yes")  # a write makes SQLite create the -wal file
        lock = DaemonLock(tmp_path / "v.db")
        assert lock.acquire()
        files = [tmp_path / n for n in ("v.db", "v.db-wal", "v.db-shm", "v.db.lock")]
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
        lock.release()
        store.close()
    finally:
        os.umask(old)


def test_a_looser_existing_record_is_tightened_at_open(tmp_path: Path):
    """A database (and lock file) left 0644 by an older release is made 0600 when opened."""
    Store(tmp_path / "v.db").close()
    (tmp_path / "v.db.lock").write_text("")
    for name in ("v.db", "v.db.lock"):
        (tmp_path / name).chmod(0o644)
    store = Store(tmp_path / "v.db")
    lock = DaemonLock(tmp_path / "v.db")
    assert lock.acquire()
    assert (_mode(tmp_path / "v.db"), _mode(tmp_path / "v.db.lock")) == (0o600, 0o600)
    lock.release()
    store.close()


def _open_when_told(path: str, go: Any, errors: Any) -> None:
    go.wait(10)
    try:
        store = Store(Path(path))
        store.set_meta(f"opened-by-{os.getpid()}", "yes")
        store.close()
    except Exception as err:  # reported to the parent, which fails the test with it
        errors.put(f"{type(err).__name__}: {err}")
        raise SystemExit(1) from None


def test_processes_opening_a_new_database_at_once_all_succeed(tmp_path: Path):
    """Several processes racing to create and migrate the same new database all open it."""
    context = multiprocessing.get_context("fork")
    for round_number in range(10):
        path = tmp_path / f"race-{round_number}.db"
        go, errors = context.Event(), context.Queue()
        racers = [
            context.Process(target=_open_when_told, args=(str(path), go, errors)) for _ in range(5)
        ]
        for racer in racers:
            racer.start()
        go.set()
        for racer in racers:
            racer.join(60)
        failures = []
        while not errors.empty():
            failures.append(errors.get())
        assert failures == [], f"round {round_number}"
        assert [r.exitcode for r in racers] == [0] * 5
        store = Store(path)
        names = [r["name"] for r in store.query("SELECT name FROM schema_migrations")]
        assert sorted(names) == sorted(name for name, _ in store_module.MIGRATIONS)
        assert len(store.query("SELECT key FROM meta WHERE key LIKE 'opened-by-%'")) == 5
        store.close()


def _writer(store: Store, order: list[str], name: str, polite: bool) -> threading.Thread:
    def write() -> None:
        if polite:
            store.yield_writes()
        with store.transaction() as conn:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (name, name))
            order.append(name)

    return threading.Thread(target=write, name=name)


def _wait_for_waiters(gate: WriteGate, loops: int, polite: int) -> None:
    """Until ``loops`` loop writers and ``polite`` page writers wait at the gate."""
    for _ in range(500):
        if gate.waiting() == (loops, polite):
            return
        time.sleep(0.01)
    raise AssertionError(f"waiting at the gate: {gate.waiting()}, wanted {(loops, polite)}")


def test_the_loops_write_before_pages_that_were_waiting_longer(tmp_path: Path):
    """Pages say yield_writes(): while the record's write lock is held, a page that asked
    first still writes after the sweep that asked later (alerts first, store.WriteGate)."""
    store = Store(tmp_path / "v.db")
    order: list[str] = []
    release = threading.Event()

    def hold() -> None:
        with store.transaction():
            order.append("holder")
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    _wait_for_waiters(store._gate, 0, 0)
    while not order:
        time.sleep(0.01)
    pages = [_writer(store, order, f"page{i}", polite=True) for i in range(3)]
    for page in pages:
        page.start()
    _wait_for_waiters(store._gate, 0, 3)
    sweep = _writer(store, order, "sweep", polite=False)
    sweep.start()
    _wait_for_waiters(store._gate, 1, 3)
    release.set()
    for thread in [holder, sweep, *pages]:
        thread.join(10)
    assert order[:2] == ["holder", "sweep"]
    assert sorted(order[2:]) == ["page0", "page1", "page2"]  # every page wrote, after it
    assert {r["key"] for r in store.query("SELECT key FROM meta")} >= {"sweep", "page0"}


def test_a_writer_kept_out_too_long_is_told_the_record_is_locked():
    """The gate's wait is bounded like SQLite's own busy timeout, and says why."""
    gate = WriteGate()
    entered = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with gate.hold(polite=False, timeout=5):
            entered.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(5)
    locked = pytest.raises(sqlite3.OperationalError, match="database is locked")
    with locked, gate.hold(polite=True, timeout=0.1):
        pass
    assert gate.waiting() == (0, 0)
    release.set()
    holder.join(5)
    with gate.hold(polite=True, timeout=1):  # free again, for anyone
        pass


def test_a_nested_transaction_does_not_wait_for_its_own_gate(tmp_path: Path):
    store = Store(tmp_path / "v.db")
    done = threading.Event()

    def nested() -> None:
        store.yield_writes()
        with store.transaction() as conn, store.transaction():
            conn.execute("INSERT INTO meta (key, value) VALUES ('a', 'b')")
        done.set()

    thread = threading.Thread(target=nested)
    thread.start()
    assert done.wait(5), "a savepoint inside a transaction waited for the write gate"
    assert store.get_meta("a") == "b"
