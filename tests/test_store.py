"""The record's storage: migrations, transactions, the one-daemon lock."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest

from visitwatch.daemon import store as store_module
from visitwatch.daemon.store import DaemonLock, Store, from_ts, ts


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
