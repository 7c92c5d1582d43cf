"""The embedded cache for local use: one SQLite file, safe under threads, survives restarts.

WAL journaling makes each write batch one atomic transaction, so a process killed
mid-write leaves only whole rows behind; readers never wait for writers.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence

from .base import Entry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS embedding_cache (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    dimensions INTEGER NOT NULL,
    vector BLOB NOT NULL CHECK (length(vector) = 4 * dimensions),
    created_at REAL NOT NULL
) WITHOUT ROWID
"""

# A row whose vector has the wrong length (written by a bug or an old version) is replaced.
_PUT = """
INSERT INTO embedding_cache (key, model, dimensions, vector, created_at) VALUES (?, ?, ?, ?, ?)
ON CONFLICT(key) DO UPDATE SET model = excluded.model, dimensions = excluded.dimensions,
    vector = excluded.vector, created_at = excluded.created_at
WHERE length(embedding_cache.vector) != length(excluded.vector)
"""

_CHUNK = 500  # stay well below SQLite's bound-parameter limit


class SQLiteCache:
    name = "sqlite"
    trusted = False

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self._local = threading.local()
        # Connections (and the schema) are made on first use, so a broken file degrades requests
        # to cache misses instead of stopping the server from starting.

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(_SCHEMA)
            except sqlite3.Error:
                conn.close()
                raise
            self._local.conn = conn
        return conn

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        conn = self._conn()
        found: dict[str, bytes] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, vector in conn.execute(
                f"SELECT key, vector FROM embedding_cache WHERE key IN ({marks})", chunk
            ):
                found[key] = vector
        return found

    def put_many(self, entries: Sequence[Entry]) -> int:
        if not entries:
            return 0
        conn = self._conn()
        now = time.time()
        before = conn.total_changes
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_PUT, [(e.key, e.model, e.dimensions, e.vector, now) for e in entries])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return conn.total_changes - before

    def ping(self) -> bool:
        self._conn().execute("SELECT 1").fetchone()
        return True
