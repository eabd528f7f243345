"""SQL shared by the store: statements run inside writer ops, and reads on reader threads."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from . import _blocks as blocks
from ._context import WriterContext, stream_end
from ._exceptions import GenerationNotFound, StreamExists, StreamNotFound
from .types import ActiveGeneration, GenerationRecord, ReadResult, WorkerRecord

# -- SQL run on the writer thread --------------------------------------------------------------


def insert_stream(
    ctx: WriterContext,
    stream_id: str,
    content_type: str,
    *,
    mark: bool = True,
    owner: str | None = None,
) -> None:
    """Create a stream row (of ``owner``, whose stored bytes it counts toward); raises
    ``StreamExists``."""
    try:
        ctx.conn.execute(
            "INSERT INTO streams (id, content_type, closed, created_at, owner)"
            " VALUES (?, ?, 0, ?, ?)",
            (stream_id, content_type, time.time(), owner),
        )
    except sqlite3.IntegrityError as exc:
        raise StreamExists(stream_id) from exc
    if mark:
        ctx.mark_created(stream_id)


def delete_stream(ctx: WriterContext, stream_id: str) -> None:
    """Delete a stream and its messages; raises ``StreamNotFound``."""
    if ctx.conn.execute("DELETE FROM streams WHERE id = ?", (stream_id,)).rowcount == 0:
        raise StreamNotFound(stream_id)
    blocks.delete(ctx.conn, stream_id)
    ctx.mark_deleted(stream_id)


# -- SQL run on reader threads -----------------------------------------------------------------


def take_within(messages: Iterable[bytes], max_bytes: int) -> tuple[list[bytes], bool]:
    """The leading messages that fit in ``max_bytes`` (at least one, if there is one), and
    whether any were left out."""
    taken: list[bytes] = []
    size = 0
    for message in messages:
        if taken and size + len(message) > max_bytes:
            return taken, True
        taken.append(message)
        size += len(message)
    return taken, False


def read_messages(
    conn: sqlite3.Connection,
    stream_id: str,
    offset: int,
    limit: int,
    max_bytes: int | None = None,
) -> ReadResult:
    """Up to ``limit`` messages (and about ``max_bytes``) from ``offset``, and whether they
    end a closed stream."""
    conn.execute("BEGIN")  # one snapshot for the closed flag, the messages and the end
    row = conn.execute(
        "SELECT closed, base_offset FROM streams WHERE id = ?", (stream_id,)
    ).fetchone()
    if row is None:
        raise StreamNotFound(stream_id)
    with contextlib.closing(blocks.read(conn, stream_id, offset, limit)) as found:
        if max_bytes is None:
            messages, cut = list(found), False
        else:
            messages, cut = take_within(found, max_bytes)
    at_end = bool(row[0]) and not cut
    if at_end and len(messages) == limit:  # the limit may have taken exactly the rest
        at_end = offset + len(messages) >= stream_end(conn, stream_id, row[1])
    conn.execute("COMMIT")
    return ReadResult(offset, messages, at_end)


def stream_length(conn: sqlite3.Connection, stream_id: str) -> tuple[int, bool]:
    """``(next_offset, closed)`` in one snapshot."""
    conn.execute("BEGIN")
    row = conn.execute(
        "SELECT closed, base_offset FROM streams WHERE id = ?", (stream_id,)
    ).fetchone()
    if row is None:
        raise StreamNotFound(stream_id)
    end = stream_end(conn, stream_id, row[1])
    conn.execute("COMMIT")
    return end, bool(row[0])


# Every column but the two that grow with the answer and the prompt.
_LIGHT_COLUMNS = ", ".join(
    "'' AS text" if name == "text" else "NULL AS request" if name == "request" else name
    for name in GenerationRecord.blank().to_row()
)


def get_generation(
    conn: sqlite3.Connection, generation_id: str, with_text: bool = True
) -> GenerationRecord:
    """One generation row; raises ``GenerationNotFound``. Without ``with_text``, its text
    and request are left out (empty): a row to route by, a few hundred bytes at most."""
    columns = "*" if with_text else _LIGHT_COLUMNS
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute(
            f"SELECT {columns} FROM generations WHERE id = ?", (generation_id,)
        ).fetchone()
    finally:
        conn.row_factory = None
    if row is None:
        raise GenerationNotFound(generation_id)
    return GenerationRecord.from_row(row)


def snapshot_length(conn: sqlite3.Connection, generation_id: str) -> tuple[int, int]:
    """``(characters, next_offset)`` of a generation's snapshot; raises
    ``GenerationNotFound``. SQLite counts the characters, unless the text holds a NUL (its
    ``length()`` stops there): such a text is loaded and counted here instead."""
    row = conn.execute(
        "SELECT length(text), next_offset, instr(CAST(text AS BLOB), x'00')"
        " FROM generations WHERE id = ?",
        (generation_id,),
    ).fetchone()
    if row is None:
        raise GenerationNotFound(generation_id)
    characters, next_offset, nul = row
    if nul:
        ((text, next_offset),) = conn.execute(
            "SELECT text, next_offset FROM generations WHERE id = ?", (generation_id,)
        ).fetchall()
        characters = len(text)
    return int(characters), int(next_offset)


def query_generations(
    conn: sqlite3.Connection, sql: str, params: list[Any]
) -> list[GenerationRecord]:
    """Generation rows for a ``SELECT * FROM generations`` query."""
    conn.row_factory = sqlite3.Row
    try:
        return [GenerationRecord.from_row(row) for row in conn.execute(sql, params)]
    finally:
        conn.row_factory = None


def query_active(conn: sqlite3.Connection, sql: str, params: list[Any]) -> list[ActiveGeneration]:
    """Active-generation summaries for an ``id, worker_id, cancel_requested, provider,
    created_at, continuations`` query."""
    return [
        ActiveGeneration(gid, worker, bool(flag), provider, created_at, continuations)
        for gid, worker, flag, provider, created_at, continuations in conn.execute(sql, params)
    ]


def list_workers(conn: sqlite3.Connection) -> list[WorkerRecord]:
    """Every registered worker, oldest first."""
    return [
        WorkerRecord(*row)
        for row in conn.execute(
            "SELECT id, hostname, pid, started_at, heartbeat_at FROM workers ORDER BY started_at"
        )
    ]


def stored_bytes(conn: sqlite3.Connection, owner: str) -> int:
    """What ``owner`` stores: the bytes of their streams (generations' event logs and
    Durable Streams), session contexts and session messages."""
    conn.execute("BEGIN")
    (streams,) = conn.execute(
        "SELECT coalesce(sum(bytes), 0) FROM streams WHERE owner = ?", (owner,)
    ).fetchone()
    (sessions,) = conn.execute(
        "SELECT coalesce(sum(length(CAST(context AS BLOB)) + length(CAST(title AS BLOB))), 0)"
        " FROM sessions WHERE owner = ?",
        (owner,),
    ).fetchone()
    (messages,) = conn.execute(
        "SELECT coalesce(sum(length(CAST(m.content AS BLOB))), 0) FROM session_messages m"
        " JOIN sessions s ON s.id = m.session_id WHERE s.owner = ?",
        (owner,),
    ).fetchone()
    conn.execute("COMMIT")
    return int(streams) + int(sessions) + int(messages)
