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


@migrations()
def m002_sessions(db: Database) -> None:
    """Sessions (conversations), their messages, and idempotency keys."""
    # An assistant message stores no text of its own: it names its generation, whose
    # snapshot row holds the text (so the message shows an answer in progress as it grows).
    db.executescript(
        """
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            owner TEXT,
            title TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL,
            closed_reason TEXT,
            context TEXT NOT NULL DEFAULT '{}',
            keep_open INTEGER NOT NULL DEFAULT 0,
            on_closed TEXT NOT NULL,
            on_busy TEXT NOT NULL,
            close_on_complete INTEGER NOT NULL DEFAULT 0,
            previous_session_id TEXT,
            message_count INTEGER NOT NULL DEFAULT 0,
            trimmed_messages INTEGER NOT NULL DEFAULT 0,
            next_seq INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            last_activity_at REAL NOT NULL,
            closed_at REAL
        );
        CREATE INDEX sessions_by_owner ON sessions (owner, last_activity_at);
        CREATE INDEX sessions_by_activity ON sessions (status, last_activity_at);
        CREATE TABLE session_messages (
            session_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            id TEXT NOT NULL UNIQUE,
            role TEXT NOT NULL,
            content TEXT,
            generation_id TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (session_id, seq)
        ) WITHOUT ROWID;
        CREATE TABLE idempotency_keys (
            owner TEXT NOT NULL,
            key TEXT NOT NULL,
            session_id TEXT NOT NULL,
            response TEXT NOT NULL,
            created_at REAL NOT NULL,
            PRIMARY KEY (owner, key)
        ) WITHOUT ROWID;
        ALTER TABLE generations ADD COLUMN session_id TEXT;
        CREATE INDEX generations_by_session ON generations (session_id, created_at)
            WHERE session_id IS NOT NULL;
        """
    )


@migrations()
def m003_open_sessions_index(db: Database) -> None:
    """An index of open sessions by owner: the open-session limit is checked inside the
    writer's transaction on every create, and must not grow with a user's closed history."""
    db.execute("CREATE INDEX sessions_open_by_owner ON sessions (owner) WHERE status != 'closed'")


@migrations()
def m004_durable_streams(db: Database) -> None:
    """What the Durable Streams protocol adds to a stream: names, forks, expiry, soft delete,
    ``Stream-Seq`` and idempotent producers."""
    # base_offset: a fork's first own offset (it reads its source below it). expiry_at: when
    # the stream expires (Expires-At, or last access + TTL). deleted: 1 soft-deleted (kept for
    # its forks, 410), 2 expired but kept for its forks (its name is free again).
    db.executescript(
        """
        ALTER TABLE streams ADD COLUMN base_offset INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE streams ADD COLUMN forked_from TEXT;
        ALTER TABLE streams ADD COLUMN fork_sub_offset INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE streams ADD COLUMN ttl INTEGER;
        ALTER TABLE streams ADD COLUMN expires_at REAL;
        ALTER TABLE streams ADD COLUMN expiry_at REAL;
        ALTER TABLE streams ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE streams ADD COLUMN stream_seq TEXT;
        ALTER TABLE streams ADD COLUMN closed_by TEXT;
        CREATE INDEX streams_forks ON streams (forked_from) WHERE forked_from IS NOT NULL;
        CREATE INDEX streams_expiry ON streams (expiry_at) WHERE expiry_at IS NOT NULL;
        CREATE TABLE stream_names (
            name TEXT PRIMARY KEY,
            stream_id TEXT NOT NULL UNIQUE
        ) WITHOUT ROWID;
        CREATE TABLE producers (
            stream_id TEXT NOT NULL,
            producer_id TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            last_seq INTEGER NOT NULL,
            PRIMARY KEY (stream_id, producer_id)
        ) WITHOUT ROWID;
        """
    )


@migrations()
def m005_stream_owners_and_bytes(db: Database) -> None:
    """Who owns each stream and how many bytes it holds, for per-user storage limits.

    A trigger counts every message as it is inserted, whichever path writes it (the hot
    batch insert, single appends, closing events), in the same transaction. The existing
    streams get their owner and size once, here.
    """
    db.executescript(
        """
        ALTER TABLE streams ADD COLUMN owner TEXT;
        ALTER TABLE streams ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
        UPDATE streams SET owner = (
            SELECT g.owner FROM generations g WHERE g.stream_id = streams.id
        );
        UPDATE streams SET owner = (
            SELECT nullif(substr(n.name, 1, instr(n.name, '/') - 1), '')
            FROM stream_names n WHERE n.stream_id = streams.id
        ) WHERE owner IS NULL;
        UPDATE streams SET bytes = (
            SELECT coalesce(sum(length(m.data)), 0) FROM messages m WHERE m.stream_id = streams.id
        );
        CREATE INDEX streams_by_owner ON streams (owner) WHERE owner IS NOT NULL;
        CREATE TRIGGER messages_count_bytes AFTER INSERT ON messages BEGIN
            UPDATE streams SET bytes = bytes + length(NEW.data) WHERE id = NEW.stream_id;
        END;
        """
    )


@migrations()
def m006_generation_continuations(db: Database) -> None:
    """How many times each generation was taken over and continued after its process died
    (its budget of continuations is checked against it, atomically with the takeover)."""
    db.execute("ALTER TABLE generations ADD COLUMN continuations INTEGER NOT NULL DEFAULT 0")


@migrations()
def m007_generation_provider_state(db: Database) -> None:
    """What a provider keeps from one answer of a conversation for the next (a JSON object,
    such as Dify's ``conversation_id``), with the answer that produced it."""
    db.execute("ALTER TABLE generations ADD COLUMN provider_state TEXT")


@migrations()
def m008_message_blocks(db: Database) -> None:
    """Closed streams' messages, compacted: runs of them packed into compressed blocks (see
    ``store/_blocks.py``). A stream's blocks hold a prefix of it, its rows the rest."""
    db.execute(
        """
        CREATE TABLE message_blocks (
            stream_id TEXT NOT NULL,
            first_offset INTEGER NOT NULL,
            count INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (stream_id, first_offset)
        )
        """
    )


@migrations()
def m009_active_generations_by_owner(db: Database) -> None:
    """Each owner's queued and running generations, counted when one more is created (the
    per-user limit holds across every process on the file)."""
    db.execute(
        "CREATE INDEX generations_active_by_owner ON generations (owner)"
        " WHERE status IN ('queued', 'running')"
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


def pending_migrations(conn: sqlite3.Connection) -> list[str]:
    """The migrations this code knows that the database has not had."""
    return [migration.name for migration in migrations.pending(Database(conn))]


def initialise(path: str) -> None:
    """Switch the file to WAL and apply pending migrations."""
    conn = connect(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        migrations.apply(Database(conn))
    finally:
        conn.close()
