"""The embedded cache for local use: one SQLite file, safe under threads, survives restarts.

WAL journaling makes each write batch one atomic transaction, so a process killed
mid-write leaves only whole rows behind; readers never wait for writers.

Connections come from a small pool (a thread that ends leaves nothing open behind it),
and every wait for another writer's lock is bounded by the request's deadline: the
cache is a speed layer, so on doubt the service skips it (and says `x-cache-error`)
rather than make the caller wait. A file that turns out broken (truncated, replaced,
deleted) is reopened from scratch on the next call, without a restart.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone

from ..deadline import Deadline
from .base import CacheStats, Entry

# A rowid table with the vector last. Rows are ~1 KB (256 dims) to 6 KB (1536): in a WITHOUT ROWID table (an
# index B-tree, at most ~1 KB of a row on its page) every row spilled into an overflow page of its own, so 51 MB of
# vectors took a 233 MB file, and each write and each hit touched twice the pages (bench section 14).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS embedding_cache (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    dimensions INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL,
    vector BLOB NOT NULL CHECK (length(vector) = 4 * dimensions)
)
"""
# Files made before last use was tracked get the column (NULL: "as old as the row").
_ADD_LAST_USED = "ALTER TABLE embedding_cache ADD COLUMN last_used_at REAL"
# Files of the first layout (WITHOUT ROWID) are rewritten once into the one above, rows unchanged.
_MIGRATE = [
    _SCHEMA.replace("IF NOT EXISTS embedding_cache", "embedding_cache_new"),
    "INSERT INTO embedding_cache_new (key, model, dimensions, created_at, last_used_at, vector) "
    "SELECT key, model, dimensions, created_at, last_used_at, vector FROM embedding_cache ORDER BY key",
    "DROP TABLE embedding_cache",
    "ALTER TABLE embedding_cache_new RENAME TO embedding_cache",
]

# A row whose vector has the wrong length (written by a bug or an old version) is replaced.
_PUT = """
INSERT INTO embedding_cache (key, model, dimensions, vector, created_at, last_used_at) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET model = excluded.model, dimensions = excluded.dimensions,
    vector = excluded.vector, created_at = excluded.created_at, last_used_at = excluded.last_used_at
WHERE length(embedding_cache.vector) != length(excluded.vector)
"""
_LAST_USED = "coalesce(last_used_at, created_at)"
DAY_S = 86_400.0  # last use is refreshed at most once a day per row, as the Supabase table does

_CHUNK = 500  # stay well below SQLite's bound-parameter limit
POOL_SIZE = 8  # idle connections kept; more may be open at once under load, and are closed after use
MAX_WAIT_S = 1.0  # the longest a request waits for another writer's lock (a quarter of its time left, at most)
DEFAULT_WAIT_S = 5.0  # without a deadline (direct use, the command line)


class SQLiteCache:
    name = "sqlite"
    trusted = False

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._idle: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        # Writers of this process queue here, not in SQLite: its busy handler sleeps and polls (1, 2, 5, 10 ...
        # ms), which costs a busy corpus run tens of milliseconds a batch; a Python lock wakes the next at once.
        self._writer = threading.Lock()
        self._generation = 0  # bumped when the file is found broken: older connections are not reused
        self._identity: tuple[int, int, bool] | None = None  # see _identity(): the file our connections have open
        # Connections (and the schema) are made on first use, so a broken file degrades requests
        # to cache misses instead of stopping the server from starting.

    def _open(self, wait: float) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=wait, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            if "last_used_at" not in {row[1] for row in conn.execute("PRAGMA table_info(embedding_cache)")}:
                try:
                    conn.execute(_ADD_LAST_USED)
                except sqlite3.OperationalError as exc:  # another process added it first
                    if "duplicate column" not in str(exc):
                        raise
            if _first_layout(conn):
                _migrate(conn)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._identity = _identity(self.path)
        return conn

    def _acquire(self, wait: float) -> tuple[sqlite3.Connection, int]:
        identity = _identity(self.path)
        with self._lock:
            if identity != self._identity:  # deleted or replaced under us: our connections hold the old file
                self._generation += 1
                stale, self._idle = self._idle, []
            else:
                stale = []
            conn = self._idle.pop() if self._idle else None
            generation = self._generation
        for old in stale:
            old.close()
        if conn is not None:
            return conn, generation
        try:
            return self._open(wait), generation
        except sqlite3.DatabaseError:
            # A file truncated or rewritten under us: our own older connections hold its locks and a stale
            # view of it. Let them all go and open afresh (those in use are closed when they come back).
            # Idle ones close at once; a second long wait would only be for those in use.
            self._forget_all()
            with self._lock:
                generation = self._generation
            return self._open(min(wait, 0.05)), generation

    @contextmanager
    def _connection(self, deadline: Deadline | None) -> Iterator[sqlite3.Connection]:
        wait = _wait(deadline)
        conn, generation = self._acquire(wait)
        healthy = False
        try:
            conn.execute(f"PRAGMA busy_timeout = {max(1, int(wait * 1000))}")
            yield conn
            healthy = True
        except sqlite3.DatabaseError as exc:
            if not _is_lock_wait(exc):
                self._forget_all()  # the file itself is suspect: reopen from scratch next time
            else:
                healthy = True
            raise
        finally:
            with self._lock:
                keep = healthy and generation == self._generation and len(self._idle) < POOL_SIZE
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def _forget_all(self) -> None:
        with self._lock:
            self._generation += 1
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self._forget_all()

    def get_many(self, keys: Sequence[str], deadline: Deadline | None = None) -> Mapping[str, bytes]:
        found: dict[str, bytes] = {}
        stale: list[str] = []
        old = time.time() - DAY_S
        with self._connection(deadline) as conn:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for key, vector, used in conn.execute(
                    f"SELECT key, vector, {_LAST_USED} FROM embedding_cache WHERE key IN ({marks})", chunk
                ):
                    found[key] = vector
                    if used < old:
                        stale.append(key)
            if stale:  # rare (once a day per row): a hit costs no write otherwise
                try:
                    for i in range(0, len(stale), _CHUNK):
                        chunk = stale[i : i + _CHUNK]
                        conn.execute(f"UPDATE embedding_cache SET last_used_at = ? WHERE key IN "
                                     f"({','.join('?' * len(chunk))})", [time.time(), *chunk])
                except sqlite3.OperationalError:
                    pass  # best effort: another writer holds the lock; the next read retries
        return found

    def put_many(self, entries: Sequence[Entry], deadline: Deadline | None = None) -> int:
        if not entries:
            return 0
        if not self._writer.acquire(timeout=_wait(deadline)):
            raise sqlite3.OperationalError("database is locked (by another writer of this process)")
        try:
            return self._put(entries, deadline)
        finally:
            self._writer.release()

    def _put(self, entries: Sequence[Entry], deadline: Deadline | None) -> int:
        with self._connection(deadline) as conn:
            now = time.time()
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            try:
                # In key order: the key's index is a B-tree, and random keys inserted in order touch each of its
                # pages once instead of splitting pages all over the file.
                conn.executemany(_PUT, [(key, model, dims, vector, now, now)
                                        for key, model, dims, vector in sorted(entries)])  # by key: keys are unique
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return conn.total_changes - before

    def ping(self) -> bool:
        with self._connection(Deadline(2.0)) as conn:
            conn.execute("SELECT 1").fetchone()
        return True

    # -- administration (the command line's `stats` and `prune`) --------------------------------------

    def stats(self) -> list[CacheStats]:
        now = time.time()
        with self._connection(None) as conn:
            rows = conn.execute(
                f"""SELECT model, dimensions, count(*), sum(length(vector)), min(created_at), max(created_at),
                           sum({_LAST_USED} < ?), sum({_LAST_USED} < ?)
                      FROM embedding_cache GROUP BY model, dimensions ORDER BY model, dimensions""",
                (now - 30 * DAY_S, now - 90 * DAY_S)).fetchall()
        return [CacheStats(m, d, n, b, _utc(lo), _utc(hi), u30, u90) for m, d, n, b, lo, hi, u30, u90 in rows]

    def prune(self, unused_days: float | None = None, max_rows: int | None = None, dry_run: bool = False) -> int:
        """Delete rows unused for `unused_days`, then the least recently used beyond `max_rows`: the rule of
        Supabase's `embedding_cache_prune`. Returns how many rows were (or, dry, would be) deleted."""
        cutoff = None if unused_days is None else time.time() - unused_days * DAY_S
        old_rule = f"{_LAST_USED} < ?"
        with self._connection(None) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                old = conn.execute(f"SELECT count(*) FROM embedding_cache WHERE {old_rule}",
                                   (cutoff,)).fetchone()[0] if cutoff is not None else 0
                total = conn.execute("SELECT count(*) FROM embedding_cache").fetchone()[0]
                over = max(0, total - old - max_rows) if max_rows is not None else 0
                if not dry_run:
                    if cutoff is not None:
                        conn.execute(f"DELETE FROM embedding_cache WHERE {old_rule}", (cutoff,))
                    if over:
                        conn.execute(f"""DELETE FROM embedding_cache WHERE key IN (
                            SELECT key FROM embedding_cache ORDER BY {_LAST_USED} DESC, key LIMIT -1 OFFSET ?)""",
                                     (max_rows,))
                conn.execute("COMMIT" if not dry_run else "ROLLBACK")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return old + over


def _first_layout(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'embedding_cache'").fetchone()
    return row is not None and "WITHOUT ROWID" in row[0].upper()


def _migrate(conn: sqlite3.Connection) -> None:
    """Rewrite a first-layout file into the rowid layout, in one transaction: readers of other processes see the
    old table or the new one, whole. A process that finds the file locked leaves it to a later open (both layouts
    answer the same statements); one that finds it already migrated does nothing."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        return
    try:
        if _first_layout(conn):
            for statement in _MIGRATE:
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _utc(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc)


def _identity(path: str) -> tuple[int, int, bool] | None:
    """Which file the path names now. A WAL database is never empty once opened (its header says WAL),
    so an empty file is one truncated under us."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size == 0


def _wait(deadline: Deadline | None) -> float:
    """How long one call may wait for a lock: a quarter of the request's time left, at most a second."""
    return DEFAULT_WAIT_S if deadline is None else max(0.001, min(MAX_WAIT_S, deadline.remaining() / 4))


def _is_lock_wait(exc: sqlite3.DatabaseError) -> bool:
    """Another writer held the lock past our wait: the file is fine, this call was just unlucky."""
    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
