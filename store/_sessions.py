"""SessionStore: conversations, their messages and idempotency keys, on the stream store's
writer and readers. Persistence only: the rules live in ``streaming``."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from ._context import WriterContext
from ._exceptions import SessionNotFound, WriteRejected
from ._queries import delete_stream
from ._session_writes import apply_session_write
from ._store import StreamStore
from .types import (
    TERMINAL_STATUSES,
    JSONDict,
    SessionMessage,
    SessionRecord,
    SessionSummary,
    SessionWrite,
    encode_field,
)

SESSION_COLUMNS = tuple(SessionRecord.blank("").to_row())
_INSERT_SESSION = "INSERT INTO sessions ({}) VALUES ({})".format(
    ", ".join(SESSION_COLUMNS), ", ".join("?" for _ in SESSION_COLUMNS)
)
# The newest generation of each session, for lists: what a sidebar shows a spinner for.
_LATEST_GENERATION = (
    "(SELECT g.id || ' ' || g.status FROM generations g WHERE g.session_id = s.id"
    " ORDER BY g.created_at DESC, g.rowid DESC LIMIT 1)"
)


class SessionStore:
    """Sessions and their messages, in the same database (and transactions) as the streams."""

    def __init__(self, streams: StreamStore) -> None:
        self.streams = streams

    async def add_messages(self, write: SessionWrite) -> None:
        """Apply a session write on its own (messages with no answer started: a paused
        session's). Raises ``SessionNotFound`` and ``WriteRejected``."""
        await self.streams.execute(lambda ctx: apply_session_write(ctx, write))

    async def create(self, record: SessionRecord, *, max_open: int | None = None) -> None:
        """Insert a new session; with ``max_open``, only while its owner has fewer open
        (active or paused) sessions, checked in the same transaction. Raises
        ``WriteRejected("open_sessions")`` otherwise."""
        row = record.to_row()

        def op(ctx: WriterContext) -> None:
            if max_open is not None:
                check_open_below(ctx, record.owner, max_open)
            ctx.conn.execute(_INSERT_SESSION, [row[c] for c in SESSION_COLUMNS])

        await self.streams.execute(op)

    async def create_if_absent(self, record: SessionRecord, *, max_open: int | None = None) -> bool:
        """Insert ``record`` unless a session with its id exists; returns whether it did.

        The check and the insert share one transaction, so callers racing to create the same
        session (in any process) create it once. ``max_open`` as for ``create``, checked only
        when inserting.
        """
        row = record.to_row()

        def op(ctx: WriterContext) -> bool:
            conn = ctx.conn
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (record.id,)).fetchone():
                return False
            if max_open is not None:
                check_open_below(ctx, record.owner, max_open)
            conn.execute(_INSERT_SESSION, [row[c] for c in SESSION_COLUMNS])
            return True

        created: bool = await self.streams.execute(op)
        return created

    async def get(self, session_id: str) -> SessionRecord:
        """A session. Raises ``SessionNotFound``."""
        return await self.streams.query(_get_session, session_id)

    async def update(
        self, session_id: str, fields: JSONDict, *, max_open: int | None = None
    ) -> None:
        """Set columns of a session (``context`` as a dict). Raises ``SessionNotFound``.

        With ``max_open`` (for a change that opens a closed session), only while its owner
        has fewer other open sessions, checked in the same transaction.
        """
        names = sorted(fields)
        if not names or set(names) - set(SESSION_COLUMNS) or "id" in fields:
            raise ValueError(f"cannot set session fields {names}")
        values = [encode_field(n, fields[n]) for n in names]
        sql = "UPDATE sessions SET {} WHERE id = ?".format(", ".join(f"{n} = ?" for n in names))

        def op(ctx: WriterContext) -> None:
            if max_open is not None:
                row = ctx.conn.execute(
                    "SELECT owner FROM sessions WHERE id = ?", (session_id,)
                ).fetchone()
                if row is None:
                    raise SessionNotFound(session_id)
                check_open_below(ctx, row[0], max_open, excluding=session_id)
            if ctx.conn.execute(sql, (*values, session_id)).rowcount == 0:
                raise SessionNotFound(session_id)

        await self.streams.execute(op)

    async def messages(self, session_id: str) -> list[SessionMessage]:
        """The stored messages, oldest first; assistant text from its generation's snapshot."""
        return await self.streams.query(_messages, session_id)

    async def list_for(
        self, owner: str | None, *, status: str | None = None, limit: int = 100
    ) -> list[SessionSummary]:
        """An owner's sessions, most recent activity first, with their newest generation."""
        return await self.streams.query(_list_sessions, owner, status, limit)

    async def generations(self, session_id: str) -> list[tuple[str, str]]:
        """``(generation id, status)`` of every generation of a session, oldest first."""
        return await self.streams.query(_session_generations, session_id)

    async def provider_state(self, session_id: str, provider: str) -> tuple[str, JSONDict] | None:
        """The newest ended generation of a session on ``provider`` that left a provider
        state, and that state; ``None`` if there is none."""
        return await self.streams.query(_latest_provider_state, session_id, provider)

    async def delete(self, session_id: str) -> None:
        """Delete a session, its messages, its generations and their streams."""

        def op(ctx: WriterContext) -> None:
            conn = ctx.conn
            if conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount == 0:
                raise SessionNotFound(session_id)
            conn.execute("DELETE FROM session_messages WHERE session_id = ?", (session_id,))
            conn.execute("DELETE FROM idempotency_keys WHERE session_id = ?", (session_id,))
            streams = conn.execute(
                "SELECT stream_id FROM generations WHERE session_id = ?", (session_id,)
            ).fetchall()
            conn.execute("DELETE FROM generations WHERE session_id = ?", (session_id,))
            for (stream_id,) in streams:
                delete_stream(ctx, stream_id)

        await self.streams.execute(op)

    async def idle(self, *, before: float, limit: int = 1000) -> list[str]:
        """Open sessions (not ``keep_open``) with no activity since ``before``."""
        return await self.streams.query(_idle_sessions, before, limit)

    async def closed_before(self, before: float, *, limit: int = 1000) -> list[str]:
        """Closed sessions closed before ``before``."""
        return await self.streams.query(_closed_sessions, before, limit)

    async def recall(self, owner: str | None, key: str) -> JSONDict | None:
        """The response stored for an idempotency key, if any."""
        return await self.streams.query(_recall, owner or "", key)


def check_open_below(
    ctx: WriterContext, owner: str | None, maximum: int, *, excluding: str | None = None
) -> None:
    """Raise ``WriteRejected("open_sessions")`` unless ``owner`` has fewer than ``maximum``
    open sessions (besides ``excluding``)."""
    # Counts at most ``maximum`` rows, through the partial index of open sessions (the
    # WHERE repeats the index's condition exactly, or SQLite would not use it).
    (count,) = ctx.conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM sessions WHERE owner IS ? AND status != 'closed'"
        " AND id IS NOT ? LIMIT ?)",
        (owner, excluding, maximum),
    ).fetchone()
    if count >= maximum:
        raise WriteRejected("open_sessions", str(count))


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.row_factory = None


def _get_session(conn: sqlite3.Connection, session_id: str) -> SessionRecord:
    rows = _rows(conn, "SELECT * FROM sessions WHERE id = ?", (session_id,))
    if not rows:
        raise SessionNotFound(session_id)
    return SessionRecord.from_row(rows[0])


def _messages(conn: sqlite3.Connection, session_id: str) -> list[SessionMessage]:
    rows = _rows(
        conn,
        "SELECT m.id, m.seq, m.role, coalesce(m.content, g.text, '') AS content,"
        " m.generation_id, g.status AS generation_status, m.created_at"
        " FROM session_messages m LEFT JOIN generations g ON g.id = m.generation_id"
        " WHERE m.session_id = ? ORDER BY m.seq",
        (session_id,),
    )
    return [SessionMessage(**dict(row)) for row in rows]


def _list_sessions(
    conn: sqlite3.Connection, owner: str | None, status: str | None, limit: int
) -> list[SessionSummary]:
    where = "s.owner IS ?"
    params: list[Any] = [owner]
    if status is not None:
        where += " AND s.status = ?"
        params.append(status)
    rows = _rows(
        conn,
        f"SELECT s.*, {_LATEST_GENERATION} AS latest FROM sessions s WHERE {where}"
        " ORDER BY s.last_activity_at DESC, s.id LIMIT ?",
        [*params, limit],
    )
    summaries = []
    for row in rows:
        latest = row["latest"]
        gid, _, gstatus = latest.partition(" ") if latest else (None, "", None)
        summaries.append(SessionSummary(SessionRecord.from_row(row), gid, gstatus or None))
    return summaries


def _session_generations(conn: sqlite3.Connection, session_id: str) -> list[tuple[str, str]]:
    return [
        (gid, status)
        for gid, status in conn.execute(
            "SELECT id, status FROM generations WHERE session_id = ? ORDER BY created_at, rowid",
            (session_id,),
        )
    ]


def _latest_provider_state(
    conn: sqlite3.Connection, session_id: str, provider: str
) -> tuple[str, JSONDict] | None:
    terminal = sorted(TERMINAL_STATUSES)
    row = conn.execute(
        "SELECT id, provider_state FROM generations"
        " WHERE session_id = ? AND provider = ? AND provider_state IS NOT NULL"
        " AND status IN ({}) ORDER BY created_at DESC, rowid DESC LIMIT 1".format(
            ", ".join("?" for _ in terminal)
        ),
        (session_id, provider, *terminal),
    ).fetchone()
    if row is None:
        return None
    state = json.loads(row[1])
    return (row[0], state) if isinstance(state, dict) else None


def _idle_sessions(conn: sqlite3.Connection, before: float, limit: int) -> list[str]:
    return [
        sid
        for (sid,) in conn.execute(
            "SELECT id FROM sessions WHERE status != 'closed' AND keep_open = 0"
            " AND last_activity_at < ? ORDER BY last_activity_at LIMIT ?",
            (before, limit),
        )
    ]


def _closed_sessions(conn: sqlite3.Connection, before: float, limit: int) -> list[str]:
    return [
        sid
        for (sid,) in conn.execute(
            "SELECT id FROM sessions WHERE status = 'closed' AND closed_at < ?"
            " ORDER BY closed_at LIMIT ?",
            (before, limit),
        )
    ]


def _recall(conn: sqlite3.Connection, owner: str, key: str) -> JSONDict | None:
    row = conn.execute(
        "SELECT response FROM idempotency_keys WHERE owner = ? AND key = ?", (owner, key)
    ).fetchone()
    if row is None:
        return None
    response: JSONDict = json.loads(row[0])
    return response
