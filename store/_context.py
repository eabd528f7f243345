"""What a write sees and what it leaves: the writer's connection with its offset
bookkeeping (``WriterContext``), the append sources it takes batches from, and the changes
each commit publishes to the event loop. The writer thread itself is ``_writer.py``."""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import _blocks as blocks
from ._exceptions import StoreError, StreamClosed, StreamNotFound
from .types import AppendBatch, AppendResult, encode_field

INSERT_MESSAGE = "INSERT INTO messages (stream_id, offset, data) VALUES (?, ?, ?)"
CLOSE_STREAM = "UPDATE streams SET closed = 1 WHERE id = ?"
_LAST_OFFSET = "SELECT max(offset) FROM messages WHERE stream_id = ?"
# SQLite's primary result codes for errors that may pass (a full disk, I/O, a lock, memory).
_TRANSIENT_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)

# Open streams whose next offset the writer keeps (and checks for other processes' writes):
# past this many, the least recently appended are forgotten. The event loop normally has
# the writer forget a stream long before, when it drops the stream's state as idle.
MAX_TRACKED_STREAMS = 65_536


def stream_end(conn: sqlite3.Connection, stream_id: str, base_offset: int) -> int:
    """The offset after a stream's last message (``base_offset`` while it has none of its
    own: 0, or a fork's first offset)."""
    (last,) = conn.execute(_LAST_OFFSET, (stream_id,)).fetchone()
    if last is not None:
        return int(last) + 1
    compacted = blocks.end(conn, stream_id)  # its rows are all in blocks, or it has none
    return base_offset if compacted is None else compacted


class AppendSource(Protocol):
    """Something that buffers messages for one stream until the writer takes them.

    ``take`` and ``untake`` run on the writer thread and must be thread-safe against whoever
    fills the buffer; ``committed`` and ``failed`` run on the event loop afterwards.
    """

    stream_id: str

    def take(self) -> AppendBatch | None:
        """Hand over everything buffered (``None`` when there is nothing)."""

    def untake(self) -> None:
        """The batch from the last ``take`` was rolled back: hold it again, ahead of newer
        messages, for the next ``take``."""

    def committed(self, result: AppendResult) -> None:
        """The batch from the last ``take`` is durable at ``result``."""

    def failed(self, error: StoreError) -> None:
        """The batch from the last ``take`` can never be written (closed stream, …)."""


@dataclass(slots=True)
class StreamChange:
    """What one commit did to one stream, for the event loop to publish."""

    stream_id: str
    first_offset: int | None
    payloads: list[bytes] = field(default_factory=list)
    created: bool = False
    closed: bool = False
    deleted: bool = False
    stale: bool = False  # someone else wrote it: forget what this process knew


@dataclass(slots=True)
class Outcome:
    """One commit, handed to the event loop."""

    changes: list[StreamChange]
    callbacks: list[Callable[[], None]]
    external_change: bool = False


class WriterContext:
    """What an op sees: the connection and the writer's offset bookkeeping."""

    def __init__(self, conn: sqlite3.Connection, *, max_streams: int = MAX_TRACKED_STREAMS) -> None:
        self.conn = conn
        # The next offset of each open stream this writer appended to or created, least
        # recently appended first. More than a cache: these are the streams whose length
        # the event loop may hold (a tail), so the ones checked for other processes' writes.
        # A stream leaves it only together with the loop's state (see ``forget``).
        self._next_offsets: OrderedDict[str, int] = OrderedDict()
        self._max_streams = max_streams
        self.changes: dict[str, StreamChange] = {}

    @property
    def tracked_streams(self) -> int:
        """How many streams' next offsets are kept."""
        return len(self._next_offsets)

    def next_offset(self, stream_id: str) -> int:
        """The offset the next message of an open stream gets; raises if closed or missing."""
        offset = self._next_offsets.get(stream_id)
        if offset is not None:
            return offset
        row = self.conn.execute(
            "SELECT closed, base_offset FROM streams WHERE id = ?", (stream_id,)
        ).fetchone()
        if row is None:
            raise StreamNotFound(stream_id)
        if row[0]:
            raise StreamClosed(stream_id)
        offset = stream_end(self.conn, stream_id, row[1])
        self._next_offsets[stream_id] = offset
        return offset

    def written_streams(self) -> list[str]:
        """Open streams this writer has appended to (and so knows the length of)."""
        return list(self._next_offsets)

    def record_append(
        self, stream_id: str, first: int, payloads: list[bytes], *, close: bool
    ) -> None:
        """Note appended messages (already written) for offsets and for publishing."""
        self._next_offsets[stream_id] = first + len(payloads)
        self._next_offsets.move_to_end(stream_id)
        change = self.changes.get(stream_id)
        if change is None or change.first_offset is None:
            change = self.changes[stream_id] = StreamChange(stream_id, first)
        change.payloads.extend(payloads)
        if close:
            self.mark_closed(stream_id)

    def mark_created(self, stream_id: str, first_offset: int = 0) -> None:
        """Note a new, empty stream whose first message gets ``first_offset`` (replacing one
        deleted earlier in the batch, if any)."""
        previous = self.changes.get(stream_id)
        self._next_offsets[stream_id] = first_offset
        self._next_offsets.move_to_end(stream_id)
        self.changes[stream_id] = StreamChange(
            stream_id,
            first_offset,
            created=True,
            deleted=previous is not None and previous.deleted,
        )

    def mark_closed(self, stream_id: str) -> None:
        """Note that a stream was closed."""
        first = self._next_offsets.pop(stream_id, None)
        change = self.changes.get(stream_id)
        if change is None:
            change = self.changes[stream_id] = StreamChange(stream_id, first)
        change.closed = True

    def mark_deleted(self, stream_id: str) -> None:
        """Note that a stream is gone."""
        self._next_offsets.pop(stream_id, None)
        self.changes[stream_id] = StreamChange(stream_id, None, deleted=True)

    def mark_stale(self, stream_id: str) -> None:
        """Note that another writer changed the stream: nothing cached about it holds."""
        self._next_offsets.pop(stream_id, None)
        self.changes[stream_id] = StreamChange(stream_id, None, stale=True)

    def reset(self) -> None:
        """After a rollback: cached offsets may be wrong, and nothing of the batch is to be
        published. Every stream tracked until now is published as stale instead (with the
        next outcome that carries changes): the loop's states of them would otherwise go
        unchecked for other processes' writes."""
        self.changes = {sid: StreamChange(sid, None, stale=True) for sid in self._next_offsets}
        self._next_offsets.clear()

    def forget(self, dropped: Iterable[tuple[str, int]]) -> list[StreamChange]:
        """Stop tracking streams; call between transactions.

        ``dropped``: ``(stream, next offset)`` of streams whose state the event loop let go
        of, knowing them that long; one appended to since (its state is back) stays. Then,
        past ``max_streams``, the least recently appended go too: the returned changes make
        the loop drop their states, which nothing would keep up to date any more.
        """
        offsets = self._next_offsets
        for stream_id, offset in dropped:
            # Compared by offset: a later append moved it on, and the loop's new state for
            # it must stay tracked.
            if offsets.get(stream_id) == offset:
                del offsets[stream_id]
        changes = []
        while len(offsets) > self._max_streams:
            stream_id, _ = offsets.popitem(last=False)
            changes.append(StreamChange(stream_id, None, stale=True))
        return changes


Op = Callable[[WriterContext], Any]


def update_fields(conn: sqlite3.Connection, generation_id: str, fields: dict[str, Any]) -> int:
    """Set columns of one generation row (names are trusted); return the rows changed."""
    names = sorted(fields)
    assignments = ", ".join(f"{name} = ?" for name in names)
    values = [encode_field(name, fields[name]) for name in names]
    sql = f"UPDATE generations SET {assignments} WHERE id = ?"
    return conn.execute(sql, (*values, generation_id)).rowcount


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed if tried again (disk full, I/O, busy)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _TRANSIENT_CODES
