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

_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# Seconds a connection waits for another's write lock before "database is locked".
BUSY_TIMEOUT = 30.0
# The record holds names, mobiles and addresses: owner-only, whatever the umask.
PRIVATE_MODE = 0o600


def ts(moment: datetime | None) -> str | None:
    """Aware datetime -> sortable UTC text."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r} reached the store")
    return moment.astimezone(UTC).strftime(_TS_FORMAT)


def from_ts(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, _TS_FORMAT).replace(tzinfo=UTC)


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


# --------------------------------------------------------------------------- schema

# Ordered and named; each runs once, in its own transaction. Append, never edit.
MIGRATIONS: list[tuple[str, str]] = [
    (
        "0001_initial",
        """
        CREATE TABLE visits (
            id TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            uid TEXT NOT NULL,
            recurrence_id TEXT NOT NULL DEFAULT '',
            kind TEXT NOT NULL,
            worker_id TEXT NOT NULL DEFAULT '',
            worker_label TEXT NOT NULL DEFAULT '',
            worker_known INTEGER NOT NULL DEFAULT 0,
            subject TEXT NOT NULL DEFAULT '',
            address TEXT NOT NULL DEFAULT '',
            private INTEGER NOT NULL DEFAULT 0,
            start TEXT NOT NULL,
            "end" TEXT NOT NULL,
            expected_return TEXT,
            expected_return_from TEXT NOT NULL DEFAULT '',
            extended_until TEXT,
            deadline TEXT,
            risk_assessment TEXT NOT NULL DEFAULT '',
            risk_assessment_complete INTEGER NOT NULL DEFAULT 0,
            worker_mobile TEXT NOT NULL DEFAULT '',
            second_worker TEXT NOT NULL DEFAULT '',
            pair_required INTEGER NOT NULL DEFAULT 0,
            going_home_after INTEGER NOT NULL DEFAULT 0,
            findings TEXT NOT NULL DEFAULT '[]',
            state TEXT NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            repeats INTEGER NOT NULL DEFAULT 0,
            prestart_notice_sent INTEGER NOT NULL DEFAULT 0,
            next_action_at TEXT,
            version INTEGER NOT NULL DEFAULT 0,
            help_requested_at TEXT,
            checked_in_at TEXT,
            checked_in_by TEXT,
            acknowledged_at TEXT,
            acknowledged_by TEXT,
            ended_at TEXT,
            event_fingerprint TEXT NOT NULL DEFAULT '',
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            updated TEXT NOT NULL,
            UNIQUE (source, uid, recurrence_id)
        );
        -- The sweep asks "what needs attention now?" through this index only, so its cost
        -- follows the number of due visits, not the size of the history.
        CREATE INDEX visits_next_action ON visits (next_action_at)
            WHERE next_action_at IS NOT NULL;
        CREATE INDEX visits_source_start ON visits (source, start);
        CREATE INDEX visits_start ON visits (start);

        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            visit_id TEXT,
            at TEXT NOT NULL,
            from_state TEXT,
            to_state TEXT,
            cause TEXT NOT NULL,
            actor TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX audit_visit ON audit (visit_id, id);
        -- The record is append-only: history cannot be edited, only added to.
        CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit record is append-only'); END;
        CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit record is append-only'); END;

        CREATE TABLE checkins (
            id INTEGER PRIMARY KEY,
            visit_id TEXT NOT NULL,
            at TEXT NOT NULL,
            action TEXT NOT NULL,
            actor TEXT NOT NULL,
            via TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX checkins_visit ON checkins (visit_id);

        CREATE TABLE notifications (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            visit_id TEXT,
            kind TEXT NOT NULL,
            recipient_id TEXT NOT NULL,
            recipient_name TEXT NOT NULL,
            recipient_email TEXT NOT NULL DEFAULT '',
            recipient_mobile TEXT NOT NULL DEFAULT '',
            recipient_relation TEXT NOT NULL DEFAULT '',
            channel TEXT NOT NULL,
            subject TEXT NOT NULL,
            text TEXT NOT NULL,
            created TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at TEXT,
            last_error TEXT,
            sent_at TEXT,
            fallback_of INTEGER
        );
        CREATE INDEX notifications_pending ON notifications (next_attempt_at)
            WHERE status = 'pending';
        CREATE INDEX notifications_visit ON notifications (visit_id);

        CREATE TABLE sources (
            name TEXT PRIMARY KEY,
            type TEXT NOT NULL,
            last_attempt_at TEXT,
            last_success_at TEXT,
            last_error TEXT,
            failures INTEGER NOT NULL DEFAULT 0,
            fingerprint TEXT,
            processed_at TEXT,
            events INTEGER NOT NULL DEFAULT 0,
            visits INTEGER NOT NULL DEFAULT 0
        );

        CREATE TABLE problems (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            uid TEXT NOT NULL,
            reason TEXT NOT NULL,
            first_seen TEXT NOT NULL,
            last_seen TEXT NOT NULL,
            UNIQUE (source, uid, reason)
        );

        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """,
    ),
    (
        "0002_failed_notifications_index",
        """
        -- The health check looks for recent failed deliveries after every sweep.
        CREATE INDEX notifications_failed ON notifications (created) WHERE status = 'failed';
        CREATE INDEX notifications_fallback_of ON notifications (fallback_of)
            WHERE fallback_of IS NOT NULL;
        """,
    ),
    (
        "0003_acknowledgement_timeout",
        """
        -- An acknowledgement times out: how many times an unresolved acknowledged visit has
        -- been re-alerted since the acknowledgement (lifecycle.plan counts from it).
        ALTER TABLE visits ADD COLUMN ack_realerts INTEGER NOT NULL DEFAULT 0;
        """,
    ),
    (
        "0004_pending_notifications_by_created",
        """
        -- The dispatcher looks for notifications waiting past the delivery deadline on every
        -- pass: through this index its cost follows what is pending, not the history.
        CREATE INDEX notifications_pending_created ON notifications (created)
            WHERE status = 'pending';
        """,
    ),
    (
        "0005_calendar_safety",
        """
        -- A read that would remove many of a source's visits is held, not applied (sync.py):
        -- which visits it would remove (JSON ids), since when, out of how many, and whether
        -- an admin confirmed it (`visitwatch sources confirm NAME`).
        ALTER TABLE sources ADD COLUMN held_removals TEXT;
        ALTER TABLE sources ADD COLUMN held_since TEXT;
        ALTER TABLE sources ADD COLUMN held_live INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE sources ADD COLUMN held_confirmed_at TEXT;
        ALTER TABLE sources ADD COLUMN held_confirmed_by TEXT;
        -- Reads in a row that were incomplete (cut short, damaged): they never remove visits.
        ALTER TABLE sources ADD COLUMN incomplete INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE sources ADD COLUMN incomplete_since TEXT;
        ALTER TABLE sources ADD COLUMN incomplete_reason TEXT;
        -- A started visit whose entry left the calendar: still watched, people were asked.
        ALTER TABLE visits ADD COLUMN removed_at TEXT;
        -- The entry's categories at the last read (JSON): a check-in or help category counts
        -- only when it is new since then, never judged by modification times.
        ALTER TABLE visits ADD COLUMN categories TEXT;
        """,
    ),
]


class StoreUnavailable(VisitwatchError):
    """The record cannot be opened at all (not a database, unreadable, no space to create)."""


class Store:
    """One SQLite database; a connection per thread; explicit write transactions."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            # A COMMIT that fails (a full disk) leaves the transaction open: roll it back
            # below, or every later "transaction" would nest inside it and never commit.
            conn.execute("COMMIT")
        except BaseException:
            _quietly(conn, "ROLLBACK")
            raise

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
    fd = os.open(database, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        os.fchmod(fd, PRIVATE_MODE)
    finally:
        os.close(fd)
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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
        os.fchmod(fd, PRIVATE_MODE)  # an older release left it 0644
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
