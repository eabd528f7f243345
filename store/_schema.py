"""The database schema, as sqlite-utils migrations, and connection set-up."""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from .types import Synchronous

migrations = Migrations("keepstream")

# How long a connection waits for another process's write lock before SQLITE_BUSY.
BUSY_TIMEOUT = 30.0


@migrations()
def m001_streams_and_generations(db: Database) -> None:
    """Streams, their messages, generation snapshots and workers."""
    # The log is keyed WITHOUT ROWID on (stream_id, offset): a range read of one stream is one
    # b-tree walk, and there is no second index to keep up on the hot append.
    db.executescript(
        """
        CREATE TABLE streams (
            id TEXT PRIMARY KEY,
            content_type TEXT NOT NULL,
            closed INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL
        );
        CREATE TABLE messages (
            stream_id TEXT NOT NULL,
            offset INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (stream_id, offset)
        ) WITHOUT ROWID;
        CREATE TABLE generations (
            id TEXT PRIMARY KEY,
            stream_id TEXT NOT NULL,
            status TEXT NOT NULL,
            provider TEXT NOT NULL,
            model TEXT,
            request TEXT NOT NULL DEFAULT '{}',
            owner TEXT,
            text TEXT NOT NULL DEFAULT '',
            next_offset INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            usage TEXT,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            worker_id TEXT,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL
        );
        CREATE INDEX generations_status ON generations (status)
            WHERE status IN ('queued', 'running');
        CREATE TABLE workers (
            id TEXT PRIMARY KEY,
            hostname TEXT NOT NULL,
            pid INTEGER NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL
        );
        """
    )


def connect(
    path: str, *, synchronous: Synchronous = "NORMAL", readonly: bool = False
) -> sqlite3.Connection:
    """Open a connection with keepstream's settings.

    Transactions are explicit (``isolation_level=None``): the writer issues its own
    ``BEGIN IMMEDIATE`` / ``COMMIT``, readers wrap multi-statement reads in ``BEGIN``.
    """
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
    )
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


def initialise(path: str) -> None:
    """Switch the file to WAL and apply pending migrations."""
    conn = connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        migrations.apply(Database(conn))
    finally:
        conn.close()
