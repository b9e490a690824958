"""The lone-working record: SQLite, the single source of truth.

Every visit, state change, check-in, notification and delivery attempt is a row here. The
scheduler only wakes things up; what is due is always recomputed from these rows, so a
restart or a missed tick heals itself.

Times are stored as fixed-width UTC text (``2026-11-23T14:05:00.000000Z``) so that string
order is time order and indexes on deadlines work.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from visitwatch.core.errors import VisitwatchError
from visitwatch.core.private_files import PRIVATE_MODE, make_dirs, open_private
from visitwatch.daemon.schema import MIGRATIONS
from visitwatch.daemon.write_gate import WriteGate

_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# Seconds a connection waits for another's write lock before "database is locked".
BUSY_TIMEOUT = 30.0


def ts(moment: datetime | None) -> str | None:
    """Aware datetime -> sortable UTC text."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r} reached the store")
    return moment.astimezone(UTC).strftime(_TS_FORMAT)


def from_ts(text: str | None) -> datetime | None:
    """Stored UTC text -> aware datetime; anything not in the stored form is a ValueError."""
    if not text:
        return None
    # fromisoformat is ~10x faster than strptime (it runs dozens of times per visit read);
    # the shape check keeps it as strict as the format the store writes.
    if len(text) != 27 or text[10] != "T" or text[-1] != "Z":
        raise ValueError(f"{text!r} is not a stored time ({_TS_FORMAT})")
    return datetime.fromisoformat(text)


# SQLITE_FULL, SQLITE_IOERR, SQLITE_READONLY, SQLITE_CANTOPEN: primary result codes that
# mean nothing can be written now, whatever is being written.
_UNWRITABLE = {13, 10, 8, 14}


def record_unwritable(err: BaseException) -> bool:
    """Whether ``err`` means the record cannot be written at all (a full disk, I/O errors)."""
    if not isinstance(err, sqlite3.Error):
        return False
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _UNWRITABLE  # extended codes keep the primary in the low byte
    text = str(err).lower()
    return "disk" in text or "readonly" in text or "read-only" in text


class StoreUnavailable(VisitwatchError):
    """The record cannot be opened at all (not a database, unreadable, no space to create)."""


class Store:
    """One SQLite database; a connection per thread; explicit write transactions."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._gate = WriteGate()
        try:
            make_dirs(self.path.parent)
            _make_private(self.path)
            self.migrate()
        except (OSError, sqlite3.DatabaseError) as err:
            self.close()
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise StoreUnavailable(
                f"daemon.database: cannot open the record {self.path}: {reason}"
            ) from err

    # -- connections ---------------------------------------------------------------

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: no implicit transactions; we BEGIN IMMEDIATE ourselves so
            # two writers queue on the busy timeout instead of failing on lock upgrade.
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=BUSY_TIMEOUT, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            _use_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")  # a safety record: durable on commit
            conn.execute("PRAGMA foreign_keys=ON")
            db = sqlite_utils.Database(conn)
            self._local.db = db
            with self._guard:
                self._connections.append(conn)
        return db

    def close(self) -> None:
        with self._guard:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: everything inside commits together or not at all.

        Nested inside another, it is a savepoint: it rolls back alone on error, and commits
        with the outer one.
        """
        conn = self.db.conn
        if conn.in_transaction:
            self._local.depth = depth = getattr(self._local, "depth", 0) + 1
            name = f"nested_{depth}"
            conn.execute(f"SAVEPOINT {name}")
            try:
                yield conn
            except BaseException:
                _quietly(conn, f"ROLLBACK TO {name}", f"RELEASE {name}")
                raise
            finally:
                self._local.depth = depth - 1
            conn.execute(f"RELEASE {name}")
            return
        with self._gate.hold(getattr(self._local, "polite", False), BUSY_TIMEOUT):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                # A COMMIT that fails (a full disk) leaves the transaction open: roll it
                # back below, or every later "transaction" would nest inside it and never
                # commit.
                conn.execute("COMMIT")
            except BaseException:
                _quietly(conn, "ROLLBACK")
                raise

    def yield_writes(self) -> None:
        """This thread's write transactions wait while any other thread of this process
        waits to write (see :class:`WriteGate`): the pages' threads say so."""
        self._local.polite = True

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self.db.conn.execute(sql, params).fetchall()]

    def one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        row = self.db.conn.execute(sql, params).fetchone()
        return dict(row) if row else None

    # -- migrations ----------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply the migrations this database lacks; returns the names applied here.

        Each runs under BEGIN IMMEDIATE (the write lock) and is re-checked inside it, so two
        processes opening a new database at once queue instead of applying one twice.
        """
        conn = self.db.conn
        try:
            done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        except sqlite3.OperationalError as err:
            if "no such table" not in str(err):
                raise
            done = set()  # a new database
        if all(name in done for name, _ in MIGRATIONS):
            return []  # the usual open: no write lock taken, nothing written
        applied = []
        for name, sql in MIGRATIONS:
            with self.transaction():
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations"
                    " (name TEXT PRIMARY KEY, applied_at TEXT)"
                )
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE name = ?", (name,)
                ).fetchone()
                if done:
                    continue
                for statement in _split_sql(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?)",
                    (name, ts(datetime.now(UTC))),
                )
            applied.append(name)
        return applied

    # -- small helpers used across the daemon --------------------------------------

    def audit(
        self,
        conn: sqlite3.Connection,
        visit_id: str | None,
        at: datetime,
        cause: str,
        actor: str,
        from_state: str | None = None,
        to_state: str | None = None,
        **detail: Any,
    ) -> None:
        conn.execute(
            "INSERT INTO audit (visit_id, at, from_state, to_state, cause, actor, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (visit_id, ts(at), from_state, to_state, cause, actor, json.dumps(detail, default=str)),
        )

    def set_meta(self, key: str, value: str) -> None:
        self.db.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def get_meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        return row["value"] if row else None


def _make_private(database: Path) -> None:
    """Create the database file 0600, or tighten an existing one: it holds names, mobiles and
    addresses. SQLite gives its -wal and -shm files the database file's mode, whatever the
    umask; files left looser by an older release are tightened too."""
    os.close(open_private(database, os.O_RDWR))
    for suffix in ("-wal", "-shm", "-journal"):
        companion = Path(str(database) + suffix)
        try:
            if companion.stat().st_mode & 0o777 != PRIVATE_MODE:
                companion.chmod(PRIVATE_MODE)
        except FileNotFoundError:
            pass


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch to WAL, retrying while another process holds the lock the switch needs.

    The switch on a new database takes an exclusive lock; SQLite can report "database is
    locked" at once rather than wait on the busy timeout when another opener holds it.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) and "busy" not in str(err):
                raise
            mode = ""
        if mode.lower() == "wal":
            return
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError(
                f"could not switch the database to WAL mode (journal mode {mode or 'locked'})"
            )
        time.sleep(0.01)


def _quietly(conn: sqlite3.Connection, *statements: str) -> None:
    """Undo after an error without hiding it: SQLite may have rolled back already."""
    for statement in statements:
        if not conn.in_transaction:
            return
        try:
            conn.execute(statement)
        except sqlite3.Error:
            return


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies whole."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines():
        if line.strip().startswith("--"):
            continue
        buffer += line + "\n"
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


class DaemonLock:
    """Refuses a second daemon on the same database (an advisory lock on ``<db>.lock``)."""

    def __init__(self, database: Path) -> None:
        self.path = Path(str(database) + ".lock")
        self._file: Any = None

    def acquire(self) -> bool:
        fd = open_private(self.path, os.O_RDWR)  # an older release left it 0644
        self._file = os.fdopen(fd, "r+")  # held for the daemon's lifetime
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            self._file.close()
            self._file = None
            return False
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
