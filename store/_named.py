"""Named streams on SQLite: the primitives the Durable Streams view (``web``) stands on.

What a named stream adds to a plain stream: a name in its owner's namespace, forks (a fork
reads its source below its ``base_offset`` and its own messages above), expiry (a sliding
TTL or an absolute time), soft delete (a deleted stream that forks still read answers 410
and is removed with its last fork), ``Stream-Seq`` and idempotent producers. Every check is
made inside the write's own transaction on the writer thread, so concurrent appends from
any number of requests (or processes) are serialised exactly once.

Storage: one message row per append (for JSON streams, its values joined by commas), so an
offset is the stream's message index, as everywhere in keepstream.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from . import _blocks as blocks
from ._context import INSERT_MESSAGE, Op, WriterContext, stream_end
from ._exceptions import (
    ConfigConflict,
    ContentTypeMismatch,
    EpochSeq,
    InvalidFork,
    SeqConflict,
    SeqGap,
    StaleEpoch,
    StreamClosed,
    StreamGone,
    StreamNotFound,
)
from ._named_types import (
    DEFAULT_CONTENT_TYPE,
    EXPIRED_KEPT,
    SOFT_DELETED,
    AppendOutcome,
    CreateRequest,
    Producer,
    StreamInfo,
    is_json,
    media_type,
    sub_offset_prefix,
)

T = TypeVar("T")

_COLUMNS = (
    "id, content_type, closed, base_offset, forked_from, fork_sub_offset, ttl, expires_at,"
    " expiry_at, deleted, stream_seq, closed_by"
)


@dataclass(slots=True)
class _Row:
    id: str
    content_type: str
    closed: bool
    base_offset: int
    forked_from: str | None
    fork_sub_offset: int
    ttl: int | None
    expires_at: float | None
    expiry_at: float | None
    deleted: int
    stream_seq: str | None
    closed_by: list[Any] | None

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> _Row:
        values = list(row)
        values[2] = bool(values[2])
        values[11] = json.loads(values[11]) if values[11] else None
        return cls(*values)

    def end(self, conn: sqlite3.Connection) -> int:
        """The offset after the stream's last message."""
        return stream_end(conn, self.id, self.base_offset)

    def expired(self, now: float, touched: float | None) -> bool:
        if self.expiry_at is None:
            return False
        expiry = self.expiry_at
        if touched is not None and self.ttl is not None:
            expiry = max(expiry, touched + self.ttl)
        return now >= expiry


def _name_key(owner: str | None, name: str) -> str:
    return f"{owner or ''}/{name}"


def _load_where(conn: sqlite3.Connection, where: str, params: tuple[Any, ...]) -> _Row | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM streams WHERE {where}", params).fetchone()
    return None if row is None else _Row.of(row)


def _load(conn: sqlite3.Connection, stream_id: str) -> _Row | None:
    return _load_where(conn, "id = ?", (stream_id,))


def _load_named(conn: sqlite3.Connection, key: str) -> _Row | None:
    return _load_where(conn, "id = (SELECT stream_id FROM stream_names WHERE name = ?)", (key,))


def _load_unexpired(
    ctx: WriterContext,
    owner: str | None,
    name: str,
    now: float,
    touched: Callable[[str], float | None],
) -> _Row | None:
    """A named stream's row, in a write; ``None`` if there is none or if it had expired
    (by ``now`` and its last access, ``touched(id)``), which retires it."""
    row = _load_named(ctx.conn, _name_key(owner, name))
    if row is not None and row.expired(now, touched(row.id)):
        _retire(ctx, row, EXPIRED_KEPT)
        return None
    return row


def _load_live(conn: sqlite3.Connection, info: StreamInfo) -> _Row:
    """The stream's row, as long as it has neither been deleted nor expired."""
    row = _load(conn, info.stream_id)
    if row is None or row.deleted == EXPIRED_KEPT:
        raise StreamNotFound(info.name)
    if row.deleted == SOFT_DELETED:
        raise StreamGone(info.name)
    return row


def _segments(conn: sqlite3.Connection, row: _Row) -> tuple[tuple[str, int], ...]:
    """Where each offset of the stream is read: ``(stream id, first offset)`` from the root
    of its fork chain down, each up to the next one's first offset. A source forked below
    its own source's fork point hides that source entirely, so it is left out."""
    chain = [(row.id, row.base_offset)]
    limit = row.base_offset
    source = row.forked_from
    while source is not None:
        found = conn.execute(
            "SELECT base_offset, forked_from FROM streams WHERE id = ?", (source,)
        ).fetchone()
        if found is None:
            break  # cannot happen while forks hold their sources; read what is there
        base, upstream = found
        if base < limit:
            chain.append((source, base))
            limit = base
        source = upstream
    chain.reverse()
    return tuple(chain)


def _info(conn: sqlite3.Connection, row: _Row, name: str, *, writable: bool) -> StreamInfo:
    return StreamInfo(
        name=name,
        stream_id=row.id,
        content_type=row.content_type,
        closed=row.closed,
        next_offset=row.end(conn),
        ttl=row.ttl,
        expires_at=row.expires_at,
        expiry_at=row.expiry_at,
        writable=writable,
        segments=_segments(conn, row),
    )


def _has_forks(conn: sqlite3.Connection, stream_id: str) -> bool:
    found = conn.execute("SELECT 1 FROM streams WHERE forked_from = ? LIMIT 1", (stream_id,))
    return found.fetchone() is not None


def _hard_delete(ctx: WriterContext, row: _Row) -> None:
    """Remove a stream and everything of it; then its sources that only it kept."""
    conn = ctx.conn
    while True:
        conn.execute("DELETE FROM streams WHERE id = ?", (row.id,))
        blocks.delete(conn, row.id)
        conn.execute("DELETE FROM stream_names WHERE stream_id = ?", (row.id,))
        conn.execute("DELETE FROM producers WHERE stream_id = ?", (row.id,))
        ctx.mark_deleted(row.id)
        if row.forked_from is None:
            return
        source = _load(conn, row.forked_from)
        if source is None or not source.deleted or _has_forks(conn, source.id):
            return
        row = source


def _retire(ctx: WriterContext, row: _Row, kept_as: int) -> None:
    """Remove a stream; while forks read it, keep it for them instead, as ``kept_as``:
    ``SOFT_DELETED`` (410 to everyone else) or ``EXPIRED_KEPT`` (its name free again)."""
    if not _has_forks(ctx.conn, row.id):
        _hard_delete(ctx, row)
        return
    ctx.conn.execute(
        "UPDATE streams SET deleted = ?, expiry_at = NULL WHERE id = ?", (kept_as, row.id)
    )
    if kept_as == EXPIRED_KEPT:
        ctx.conn.execute("DELETE FROM stream_names WHERE stream_id = ?", (row.id,))
    ctx.mark_stale(row.id)


def _expire_if_due(ctx: WriterContext, stream_id: str, now: float, touched: float | None) -> None:
    row = _load(ctx.conn, stream_id)
    if row is not None and not row.deleted and row.expired(now, touched):
        _retire(ctx, row, EXPIRED_KEPT)


def _message_at(conn: sqlite3.Connection, segments: tuple[tuple[str, int], ...], at: int) -> bytes:
    """The message at offset ``at`` of a stream with these segments."""
    for stream_id, base in reversed(segments):
        if base <= at:
            with contextlib.closing(blocks.read(conn, stream_id, at, 1)) as found:
                message = next(found, None)
            if message is None:
                break
            return bytes(message)
    raise InvalidFork("Stream-Fork-Sub-Offset needs a message at the fork offset")


class NamedRows(ABC):
    """Named streams on a store's writer (``execute``) and readers (``query``): the
    ``NamedStreamBackend`` half of ``StreamStore`` (these are its methods, kept apart by
    job). ``touched`` is the caller's record of accesses that slid a TTL since its last
    ``sweep_named``, by stream id."""

    @abstractmethod
    async def execute(self, fn: Op) -> Any:
        """Run ``fn(ctx)`` on the writer in the next transaction."""

    @abstractmethod
    async def query(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on a reader."""

    async def named_info(
        self, owner: str | None, name: str, *, now: float, touched: Mapping[str, float]
    ) -> StreamInfo:
        """A named stream's metadata as committed. Raises ``StreamNotFound`` (missing, or
        expired: then it is retired now) and ``StreamGone`` (soft-deleted)."""

        def load(conn: sqlite3.Connection) -> tuple[_Row, StreamInfo] | None:
            conn.execute("BEGIN")
            row = _load_named(conn, _name_key(owner, name))
            return None if row is None else (row, _info(conn, row, name, writable=True))

        found = await self.query(load)
        if found is None:
            raise StreamNotFound(name)
        row, info = found
        if row.deleted == SOFT_DELETED:
            raise StreamGone(name)
        at = touched.get(row.id)
        if row.expired(now, at):
            await self.execute(lambda ctx: _expire_if_due(ctx, row.id, now, at))
            raise StreamNotFound(name)
        return info

    async def create_named(
        self,
        owner: str | None,
        name: str,
        request: CreateRequest,
        *,
        now: float,
        touched: Mapping[str, float],
    ) -> tuple[bool, StreamInfo]:
        """Create a named stream, or find it there with the same configuration:
        ``(created, info)``. Raises ``ConfigConflict``, ``ContentTypeMismatch``,
        ``InvalidFork`` and ``StreamNotFound`` (a missing fork source)."""
        result: tuple[bool, StreamInfo] = await self.execute(
            lambda ctx: _create(ctx, owner, name, request, now, touched)
        )
        return result

    async def append_named(
        self,
        owner: str | None,
        name: str,
        *,
        content_type: str | None,
        payload: bytes | None,
        close: bool,
        seq: str | None,
        producer: Producer | None,
        now: float,
        touched: Mapping[str, float],
    ) -> AppendOutcome:
        """Append one message (``payload``; ``None`` to only close) to a named stream in one
        write, with every check. Raises ``StreamNotFound`` (missing, or expired: retired
        now), ``StreamGone``, ``StreamClosed``, ``ContentTypeMismatch``, ``SeqConflict``,
        ``StaleEpoch``, ``SeqGap``, ``EpochSeq``."""
        outcome: AppendOutcome | None = await self.execute(
            lambda ctx: _append(
                ctx, owner, name, content_type, payload, close, seq, producer, now, touched
            )
        )
        if outcome is None:
            raise StreamNotFound(name)
        return outcome

    async def delete_named(self, info: StreamInfo) -> None:
        """Delete a named stream: soft-delete it while forks read it. Raises
        ``StreamNotFound`` and ``StreamGone``."""
        await self.execute(lambda ctx: _retire(ctx, _load_live(ctx.conn, info), SOFT_DELETED))

    async def sweep_named(self, *, now: float, touched: Mapping[str, float]) -> int:
        """Slide the TTLs of the streams ``touched`` and retire those expired by ``now``;
        how many expired."""
        expired: int = await self.execute(lambda ctx: _sweep(ctx, now, touched))
        return expired


def _sweep(ctx: WriterContext, now: float, touched: Mapping[str, float]) -> int:
    conn = ctx.conn
    conn.executemany(
        "UPDATE streams SET expiry_at = max(expiry_at, ? + ttl)"
        " WHERE id = ? AND ttl IS NOT NULL AND deleted = 0",
        [(at, stream_id) for stream_id, at in touched.items()],
    )
    due = conn.execute(
        "SELECT id FROM streams WHERE expiry_at <= ? AND deleted = 0", (now,)
    ).fetchall()
    for (stream_id,) in due:
        row = _load(conn, stream_id)  # a cascade may have removed it already
        if row is not None:
            _retire(ctx, row, EXPIRED_KEPT)
    return len(due)


def _create(
    ctx: WriterContext,
    owner: str | None,
    name: str,
    request: CreateRequest,
    now: float,
    touched: Mapping[str, float],
) -> tuple[bool, StreamInfo]:
    conn = ctx.conn
    key = _name_key(owner, name)
    existing = _load_named(conn, key)
    if existing is not None and existing.expired(now, touched.get(existing.id)):
        _retire(ctx, existing, EXPIRED_KEPT)
        existing = None
    source: _Row | None = None
    if request.forked_from is not None:
        source = _fork_source(ctx, owner, request.forked_from, now, touched)
    if existing is not None:
        if existing.deleted == SOFT_DELETED:
            raise ConfigConflict(
                f"stream {name!r} was deleted and is kept for its forks; its name is"
                " taken until they are gone"
            )
        _check_same(existing, request, source)
        return False, _info(conn, existing, name, writable=True)
    content_type = request.content_type or DEFAULT_CONTENT_TYPE
    ttl, expires_at = request.ttl, request.expires_at
    base = 0
    payloads = list(request.payloads)
    fork_sub_offset = 0
    if source is not None:
        if request.content_type is not None and media_type(request.content_type) != (
            media_type(source.content_type)
        ):
            raise ContentTypeMismatch(source.content_type, request.content_type)
        content_type = source.content_type
        tail = source.end(conn)
        base = tail if request.fork_offset is None else request.fork_offset
        if base > tail:
            raise InvalidFork(f"fork offset {base} is beyond the source's end ({tail})")
        if request.fork_sub_offset:
            data = _message_at(conn, _segments(conn, source), base)
            prefix = sub_offset_prefix(data, request.fork_sub_offset, is_json(content_type))
            payloads.insert(0, prefix)
            fork_sub_offset = request.fork_sub_offset
        if ttl is None and expires_at is None:
            ttl, expires_at = source.ttl, source.expires_at
    expiry_at = expires_at if expires_at is not None else None if ttl is None else now + ttl
    stream_id = "ds_" + secrets.token_urlsafe(12)
    conn.execute(
        "INSERT INTO streams (id, content_type, closed, created_at, base_offset, forked_from,"
        " fork_sub_offset, ttl, expires_at, expiry_at, owner)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            stream_id,
            content_type,
            int(request.closed),
            now,
            base,
            None if source is None else source.id,
            fork_sub_offset,
            ttl,
            expires_at,
            expiry_at,
            owner,
        ),
    )
    conn.execute("INSERT INTO stream_names (name, stream_id) VALUES (?, ?)", (key, stream_id))
    ctx.mark_created(stream_id, base)
    payloads = [p for p in payloads if p]
    conn.executemany(INSERT_MESSAGE, [(stream_id, base + i, p) for i, p in enumerate(payloads)])
    ctx.record_append(stream_id, base, payloads, close=request.closed)
    row = _load(conn, stream_id)
    assert row is not None
    return True, _info(conn, row, name, writable=True)


def _fork_source(
    ctx: WriterContext,
    owner: str | None,
    name: str,
    now: float,
    touched: Mapping[str, float],
) -> _Row:
    source = _load_unexpired(ctx, owner, name, now, touched.get)
    if source is None:
        raise StreamNotFound(name)
    if source.deleted == SOFT_DELETED:
        raise ConfigConflict(f"the fork source {name!r} was deleted")
    return source


def _check_same(existing: _Row, request: CreateRequest, source: _Row | None) -> None:
    inherits = existing.forked_from is not None
    wanted_type = request.content_type or (
        existing.content_type if inherits else DEFAULT_CONTENT_TYPE
    )
    same_expiry = (inherits and request.ttl is None and request.expires_at is None) or (
        request.ttl == existing.ttl and request.expires_at == existing.expires_at
    )
    same = (
        media_type(wanted_type) == media_type(existing.content_type)
        and same_expiry
        and request.closed == existing.closed
        and (None if source is None else source.id) == existing.forked_from
        and request.fork_offset in (None, existing.base_offset)
        and request.fork_sub_offset == existing.fork_sub_offset
    )
    if not same:
        raise ConfigConflict("the stream exists with a different configuration")


def _append(
    ctx: WriterContext,
    owner: str | None,
    name: str,
    content_type: str | None,
    payload: bytes | None,
    close: bool,
    seq: str | None,
    producer: Producer | None,
    now: float,
    touched: Mapping[str, float],
) -> AppendOutcome | None:
    """The append; ``None`` when there is no such stream, or it had expired (and is
    retired now, which the write commits)."""
    conn = ctx.conn
    row = _load_unexpired(ctx, owner, name, now, touched.get)
    if row is None:
        return None
    if row.deleted == SOFT_DELETED:
        raise StreamGone(name)
    stream_id = row.id
    state = None
    if producer is not None:
        state = conn.execute(
            "SELECT epoch, last_seq FROM producers WHERE stream_id = ? AND producer_id = ?",
            (stream_id, producer.id),
        ).fetchone()
    if row.closed:
        tail = row.end(conn)
        if producer is not None:
            if row.closed_by == [producer.id, producer.epoch, producer.seq]:
                return AppendOutcome(tail, True, True, producer.epoch, producer.seq)
            if state is not None and producer.epoch < state[0]:
                raise StaleEpoch(state[0])
        elif payload is None:
            return AppendOutcome(tail, True)  # closing a closed stream: idempotent
        raise StreamClosed(name, tail)
    if payload is not None and content_type is not None:
        if media_type(content_type) != media_type(row.content_type):
            raise ContentTypeMismatch(row.content_type, content_type)
    if producer is not None:
        if state is None:
            if producer.seq != 0:
                raise SeqGap(0, producer.seq)
        elif producer.epoch < state[0]:
            raise StaleEpoch(state[0])
        elif producer.epoch > state[0]:
            if producer.seq != 0:
                raise EpochSeq()
        elif producer.seq <= state[1]:
            return AppendOutcome(row.end(conn), False, True, state[0], state[1])
        elif producer.seq != state[1] + 1:
            raise SeqGap(state[1] + 1, producer.seq)
    if seq is not None and row.stream_seq is not None and seq <= row.stream_seq:
        raise SeqConflict(row.stream_seq, seq)
    # From the table, not the writer's cache: another process may append here too.
    first = row.end(conn)
    payloads = [] if payload is None else [payload]
    if payloads:
        conn.execute(INSERT_MESSAGE, (stream_id, first, payload))
    closed_by = None
    if close and producer is not None:
        closed_by = json.dumps([producer.id, producer.epoch, producer.seq])
    conn.execute(
        "UPDATE streams SET stream_seq = coalesce(?, stream_seq), closed = ?,"
        " closed_by = ?, expiry_at = CASE WHEN ttl IS NULL THEN expiry_at ELSE ? + ttl END"
        " WHERE id = ?",
        (seq, int(close), closed_by, now, stream_id),
    )
    if producer is not None:
        conn.execute(
            "INSERT OR REPLACE INTO producers (stream_id, producer_id, epoch, last_seq)"
            " VALUES (?, ?, ?, ?)",
            (stream_id, producer.id, producer.epoch, producer.seq),
        )
    ctx.record_append(stream_id, first, payloads, close=close)
    next_offset = first + len(payloads)
    if producer is None:
        return AppendOutcome(next_offset, close)
    return AppendOutcome(next_offset, close, False, producer.epoch, producer.seq)
