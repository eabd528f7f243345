"""Session writes applied inside another write's transaction (``SessionWrite``): adding
messages, replacing an answer, refusing a second answer, keeping an idempotent response."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ._context import WriterContext
from ._exceptions import SessionNotFound, WriteRejected
from .types import KeptResponse, NewMessage, SessionWrite


def apply_session_write(
    ctx: WriterContext, write: SessionWrite, *, generation_id: str | None = None
) -> None:
    """Apply ``write`` in the current transaction; ``generation_id``: the generation it is
    written with (not counted as another one by ``only_if_idle``)."""
    if write.only_if_idle:
        check_not_busy(ctx, write.session_id, new_generation_id=generation_id)
    if write.replace_answer:
        drop_last_answer(ctx, write.session_id, now=write.now)
    if write.messages:
        insert_messages(
            ctx, write.session_id, write.messages, now=write.now, max_messages=write.max_messages
        )
    if write.kept is not None:
        keep_response(ctx, write.kept, write.session_id, write.now)


def insert_messages(
    ctx: WriterContext,
    session_id: str,
    messages: Sequence[NewMessage],
    *,
    now: float,
    max_messages: int,
) -> list[int]:
    """Append messages; trim the oldest past ``max_messages``; touch the session. Returns
    the new messages' sequence numbers."""
    conn = ctx.conn
    row = conn.execute(
        "SELECT next_seq, message_count FROM sessions WHERE id = ?", (session_id,)
    ).fetchone()
    if row is None:
        raise SessionNotFound(session_id)
    next_seq, count = row
    seqs = list(range(next_seq, next_seq + len(messages)))
    conn.executemany(
        "INSERT INTO session_messages (session_id, seq, id, role, content, generation_id,"
        " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (session_id, seq, m.id, m.role, m.content, m.generation_id, now)
            for seq, m in zip(seqs, messages, strict=True)
        ],
    )
    count += len(messages)
    trimmed = max(0, count - max_messages)
    if trimmed:
        conn.execute(
            "DELETE FROM session_messages WHERE session_id = ? AND seq IN"
            " (SELECT seq FROM session_messages WHERE session_id = ? ORDER BY seq LIMIT ?)",
            (session_id, session_id, trimmed),
        )
    conn.execute(
        "UPDATE sessions SET next_seq = ?, message_count = ?,"
        " trimmed_messages = trimmed_messages + ?, updated_at = ?, last_activity_at = ?"
        " WHERE id = ?",
        (next_seq + len(messages), count - trimmed, trimmed, now, now, session_id),
    )
    return seqs


def drop_last_answer(ctx: WriterContext, session_id: str, *, now: float) -> str | None:
    """Delete the session's last message if it is an assistant's answer; its generation
    (row, stream and events) stays. Returns the dropped answer's generation id, or
    ``None`` when the last message is not an answer."""
    conn = ctx.conn
    row = conn.execute(
        "SELECT seq, role, generation_id FROM session_messages WHERE session_id = ?"
        " ORDER BY seq DESC LIMIT 1",
        (session_id,),
    ).fetchone()
    if row is None or row[1] != "assistant":
        return None
    seq, _, generation_id = row
    conn.execute("DELETE FROM session_messages WHERE session_id = ? AND seq = ?", (session_id, seq))
    conn.execute(
        "UPDATE sessions SET message_count = message_count - 1, updated_at = ?,"
        " last_activity_at = ? WHERE id = ?",
        (now, now, session_id),
    )
    dropped: str | None = generation_id
    return dropped


def check_not_busy(ctx: WriterContext, session_id: str, *, new_generation_id: str | None) -> None:
    """Raise ``WriteRejected("busy", <generation id>)`` if another generation of the session
    is queued or running — checked inside the transaction that would start one more, so two
    processes cannot both start one."""
    row = ctx.conn.execute(
        "SELECT id FROM generations WHERE session_id = ? AND id IS NOT ?"
        " AND status IN ('queued', 'running') ORDER BY created_at DESC LIMIT 1",
        (session_id, new_generation_id),
    ).fetchone()
    if row is not None:
        raise WriteRejected("busy", row[0])


def keep_response(ctx: WriterContext, kept: KeptResponse, session_id: str, now: float) -> None:
    """Store the response for an idempotency key."""
    ctx.conn.execute(
        "INSERT INTO idempotency_keys (owner, key, session_id, response, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        (kept.owner or "", kept.key, session_id, json.dumps(kept.response), now),
    )
