"""StreamStore: durable streams on SQLite, as seen from the event loop (its generation rows
and workers are in ``_generation_rows.py``)."""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from . import _queries as queries
from ._context import (
    CLOSE_STREAM,
    MAX_TRACKED_STREAMS,
    AppendSource,
    Op,
    Outcome,
    WriterContext,
)
from ._exceptions import (
    StoreError,
    StoreUnavailable,
    StreamNotFound,
)
from ._follow import follow_stream
from ._generation_rows import GenerationRows
from ._handoff import Completion, OneShotAppend, Readers, WriteRoom
from ._named import NamedRows
from ._schema import initialise, pending_migrations
from ._tails import StreamState
from ._writer import Writer
from .types import (
    AppendBatch,
    AppendResult,
    ReadResult,
    Synchronous,
)

T = TypeVar("T")

DEFAULT_FLUSH_INTERVAL = 0.01
DEFAULT_COALESCE_WINDOW = 0.05
DEFAULT_MAX_BATCH = 8192
DEFAULT_READ_LIMIT = 4096
DEFAULT_TAIL_MESSAGES = 8192
DEFAULT_TAIL_BYTES = 256 * 1024
# All streams' tails together stay within this many bytes: past it, the tails of the streams
# least recently appended to or read from are emptied (their readers read SQLite instead).
DEFAULT_TAIL_CACHE_BYTES = 64 * 1024 * 1024
# A stream with no append for this long, and no reader waiting on it, loses its state
# entirely (its readers then wait on the shared event, as for any stream of another process).
STREAM_IDLE_AFTER = 60.0
# At most this long between two sweeps for idle and closed states, busy or not.
MAX_SWEEP_INTERVAL = 1.0
DEFAULT_READERS = 4
DEFAULT_CHECKPOINT_EVERY = 16
# Writes (ops and plain appends) the writer may hold at once; more wait for room, up to
# DEFAULT_WRITE_WAIT seconds, and then fail with StoreBusy instead of piling up.
DEFAULT_MAX_PENDING_WRITES = 10_000
DEFAULT_WRITE_WAIT = 10.0
MIN_POLL_INTERVAL = 0.005
# A closed stream's tail stays in memory this long (within the tail cache's budget), so the
# followers that were live when it closed read its end without a query.
CLOSED_GRACE = 2.0


class StreamStore(GenerationRows, NamedRows):
    """Durable streams and generation snapshots in one SQLite file.

    * Writes go through one writer thread with group commit every ``flush_interval`` (see
      ``_writer``); an append returns once its transaction committed. A stream's buffered
      messages are taken at most once per ``coalesce_window``.
    * Readers are woken only after a commit (``change_event``), and read from an in-memory
      tail of the streams this process writes, or from SQLite off the event loop. All tails
      together hold at most ``tail_cache_bytes``; a stream appended to within
      ``idle_after`` seconds, or waited on, keeps a state (its length and wake-up event).
    * Another process on the same file is noticed through ``PRAGMA data_version``: its
      commits wake readers of streams this process does not write.

    One process writes a given stream at a time; any number may read it.
    Use as ``async with StreamStore(path) as store:``.
    """

    def __init__(
        self,
        path: str,
        *,
        synchronous: Synchronous = "NORMAL",
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        coalesce_window: float = DEFAULT_COALESCE_WINDOW,
        max_batch: int = DEFAULT_MAX_BATCH,
        tail_messages: int = DEFAULT_TAIL_MESSAGES,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        readers: int = DEFAULT_READERS,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
        write_wait: float = DEFAULT_WRITE_WAIT,
        tail_cache_bytes: int = DEFAULT_TAIL_CACHE_BYTES,
        idle_after: float = STREAM_IDLE_AFTER,
        max_tracked_streams: int = MAX_TRACKED_STREAMS,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        if tail_cache_bytes < 0 or idle_after < 0 or max_tracked_streams < 0:
            raise ValueError("tail_cache_bytes, idle_after and max_tracked_streams must be >= 0")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        if flush_interval < 0 or coalesce_window < 0:
            raise ValueError("flush_interval and coalesce_window must be >= 0")
        self.path = path
        self._synchronous: Synchronous = synchronous
        self._flush_interval = flush_interval
        self._coalesce_window = coalesce_window
        self._max_batch = max_batch
        self._tail_messages = tail_messages
        self._tail_bytes = tail_bytes
        self._reader_count = readers
        self._checkpoint_every = checkpoint_every
        self._room = WriteRoom(max_pending_writes, write_wait)
        self._on_commit = on_commit
        self._tail_cache_bytes = tail_cache_bytes
        self._idle_after = idle_after
        self._max_tracked_streams = max_tracked_streams
        # Every state, least recently appended to (or found waited on) first.
        self._states: OrderedDict[str, StreamState] = OrderedDict()
        # The streams whose tail holds messages, least recently appended to or read first:
        # the order the budget empties them in.
        self._cached: OrderedDict[str, None] = OrderedDict()
        self._tail_total = 0  # bytes in all tails, kept as they change: stats reads it often
        self._closed: dict[str, float] = {}  # closed states by closing time
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._external_event = anyio.Event()
        self._writer: Writer | None = None
        self._readers: Readers | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the database and start the writer."""
        self._loop = asyncio.get_running_loop()
        try:
            await anyio.to_thread.run_sync(initialise, self.path)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._writer = Writer(
            self.path,
            publish=self._publish_threadsafe,
            synchronous=self._synchronous,
            flush_interval=self._flush_interval,
            coalesce_window=self._coalesce_window,
            max_batch=self._max_batch,
            poll_interval=max(self._flush_interval, 0.005),
            checkpoint_every=self._checkpoint_every,
            on_commit=self._on_commit,
            max_tracked_streams=self._max_tracked_streams,
        )
        await anyio.to_thread.run_sync(self._writer.start)
        self._readers = await anyio.to_thread.run_sync(Readers, self.path, self._reader_count)
        self._schedule_sweep()

    async def aclose(self) -> None:
        """Write what is pending, then close every connection."""
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        writer, self._writer = self._writer, None
        if writer is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(writer.stop)
                # Deliver the final commits' callbacks queued by the writer before it ended.
                await anyio.lowlevel.checkpoint()
        readers, self._readers = self._readers, None
        if readers is not None:
            readers.close()

    async def __aenter__(self) -> StreamStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def stats(self) -> dict[str, int]:
        """Counters since open (commits, message rows written, write retries, messages
        compacted into blocks) and gauges
        (open streams this process holds a state of, the bytes of all in-memory tails and
        the budget they keep within, streams whose next offset the writer keeps, writes
        pending, WAL file bytes). Cheap: nothing is summed or queried per call."""
        writer = self._writer
        try:
            wal_bytes = os.path.getsize(self.path + "-wal")
        except OSError:
            wal_bytes = 0
        return {
            "commits": writer.commits if writer else 0,
            "rows_written": writer.rows_written if writer else 0,
            "live_streams": len(self._states) - len(self._closed),
            "tail_bytes": self._tail_total,
            "tail_cache_bytes": self._tail_cache_bytes,
            "tracked_streams": writer.tracked_streams if writer else 0,
            "write_retries": writer.retries if writer else 0,
            "messages_compacted": writer.compacted if writer else 0,
            "pending_writes": self.pending_writes,
            "wal_bytes": wal_bytes,
        }

    async def readiness(self, *, write_within: float) -> dict[str, bool]:
        """Whether the schema is current and a write commits within ``write_within`` seconds."""
        try:
            pending = await self.query(pending_migrations)
        except StoreError:
            pending = ["?"]
        writable = False
        with anyio.move_on_after(write_within):
            try:
                await self.execute(lambda ctx: None)
                writable = True
            except StoreError:
                pass
        return {"schema_current": not pending, "store_writable": writable}

    # -- writing ------------------------------------------------------------------------------

    def _require_writer(self) -> Writer:
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        return self._writer

    @property
    def pending_writes(self) -> int:
        """Writes (ops and plain appends) handed to the writer and not yet done."""
        return self._room.pending

    async def execute(self, fn: Op) -> Any:
        """Run ``fn(ctx)`` on the writer thread in the next transaction; return its result.

        Waits while the writer holds ``max_pending_writes`` writes; raises ``StoreBusy`` if
        no room frees within ``write_wait`` seconds.
        """
        release = await self._room.reserve()
        completion = Completion(release)
        try:
            self._require_writer().submit(fn, completion.set)
        except BaseException:
            release()
            raise
        return await completion.wait()

    def mark_dirty(self, source: AppendSource) -> None:
        """Have the writer take ``source``'s buffered messages at its next flush."""
        self._require_writer().mark_dirty(source)

    async def create_stream(
        self, stream_id: str, *, content_type: str = "application/json"
    ) -> None:
        """Create an empty, open stream. Raises ``StreamExists`` if the id is taken."""

        def op(ctx: WriterContext) -> None:
            queries.insert_stream(ctx, stream_id, content_type)

        await self.execute(op)

    async def append(
        self, stream_id: str, payloads: list[bytes], *, close: bool = False
    ) -> AppendResult:
        """Append messages (and optionally close the stream) atomically; return their offsets.

        Waits for room in the writer's queue as ``execute`` does."""
        release = await self._room.reserve()
        source = OneShotAppend(stream_id, AppendBatch(list(payloads), close=close), release)
        try:
            self.mark_dirty(source)
        except BaseException:
            release()
            raise
        result: AppendResult = await source.done.wait()
        return result

    async def close_stream(self, stream_id: str) -> None:
        """Close a stream. Closing a closed stream is a no-op."""

        def op(ctx: WriterContext) -> None:
            cursor = ctx.conn.execute(CLOSE_STREAM, (stream_id,))
            if cursor.rowcount == 0:
                raise StreamNotFound(stream_id)
            ctx.mark_closed(stream_id)

        await self.execute(op)

    async def delete_stream(self, stream_id: str) -> None:
        """Delete a stream and its messages; its readers see ``StreamNotFound``."""

        def op(ctx: WriterContext) -> None:
            queries.delete_stream(ctx, stream_id)

        await self.execute(op)

    # -- reading ------------------------------------------------------------------------------

    def change_event(self, stream_id: str) -> anyio.Event:
        """The event set by the next commit that touches ``stream_id``.

        Take it *before* reading; after a read that returned nothing new, wait on it.
        """
        state = self._states.get(stream_id)
        return state.change_event() if state is not None else self._external_event

    def follow(
        self,
        stream_id: str,
        offset: int,
        *,
        max_bytes: int,
        deadline: float = math.inf,
    ) -> AsyncGenerator[ReadResult, None]:
        """A stream from ``offset`` as it is and as it grows: each read of at most about
        ``max_bytes`` that brings messages (and the first one, even empty), until the
        stream is closed and read to its end, or ``deadline`` (``anyio.current_time()``)
        passes. Between reads it waits for the stream's next commit; nothing is read that
        is not committed. Raises ``StreamNotFound`` (also when it is deleted meanwhile).
        """
        return follow_stream(
            self.read, self.change_event, stream_id, offset, max_bytes=max_bytes, deadline=deadline
        )

    async def read(
        self,
        stream_id: str,
        offset: int,
        *,
        limit: int = DEFAULT_READ_LIMIT,
        max_bytes: int | None = None,
        from_disk: bool = False,
    ) -> ReadResult:
        """Committed messages from ``offset`` on: at most ``limit``, and no more than
        ``max_bytes`` in all unless the first alone is larger. ``from_disk`` skips this
        process's in-memory tail (which learns of other processes' appends a poll late).

        Raises ``StreamNotFound``. An offset past the end returns no messages.
        """
        if offset < 0:
            raise ValueError("offset must be >= 0")
        state = None if from_disk else self._states.get(stream_id)
        if state is not None and offset >= state.tail_start:
            if state.tail:
                self._cached.move_to_end(stream_id)  # read: the budget keeps it longer
            start = offset - state.tail_start
            messages = state.tail[start : start + limit]
            if max_bytes is not None:
                messages, _ = queries.take_within(messages, max_bytes)
            at_end = state.closed and offset + len(messages) >= state.next_offset
            return ReadResult(offset, messages, at_end)
        return await self.query(queries.read_messages, stream_id, offset, limit, max_bytes)

    async def stream_length(self, stream_id: str) -> tuple[int, bool]:
        """``(next_offset, closed)`` of a stream as committed. Raises ``StreamNotFound``."""
        state = self._states.get(stream_id)
        if state is not None:
            return state.next_offset, state.closed
        return await self.query(queries.stream_length, stream_id)

    async def stored_bytes(self, owner: str) -> int:
        """Bytes ``owner`` stores: streams, session contexts and messages (as committed)."""
        return await self.query(queries.stored_bytes, owner)

    async def query(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on a read-only connection off the event loop."""
        if self._readers is None:
            raise StoreUnavailable("the store is not open")
        return await self._readers.run(lambda conn: fn(conn, *args))

    # -- publishing (event loop side of the writer) -------------------------------------------

    def _publish_threadsafe(self, outcome: Outcome) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._publish, outcome)

    def _publish(self, outcome: Outcome) -> None:
        now = time.monotonic()
        wake_external = outcome.external_change
        for change in outcome.changes:
            sid = change.stream_id
            if change.deleted or change.stale:
                # What this process knew no longer holds: SQLite serves it from now on.
                self._drop(sid)
                wake_external = True
                if not change.created:
                    continue
            state = self._states.get(sid)
            if state is None:
                if change.first_offset is None:
                    # A stream this process holds nothing of (closed, say): its readers
                    # wait on the shared event.
                    wake_external = True
                    continue
                state = self._states[sid] = StreamState(change.first_offset, now)
                # Readers that read the stream before it was ours wait on the shared event.
                wake_external = True
            elif change.first_offset is not None and change.first_offset != state.next_offset:
                # Not a continuation of what we hold: forget it and let SQLite serve.
                self._drop(sid)
                wake_external = True
                continue
            else:
                state.swept_at = now
                self._states.move_to_end(sid)
            if change.payloads:
                self._tail_total += state.extend(
                    change.payloads, max_messages=self._tail_messages, max_bytes=self._tail_bytes
                )
                if state.tail:
                    self._cached[sid] = None
                    self._cached.move_to_end(sid)
                else:
                    self._cached.pop(sid, None)
            if change.closed and not state.closed:
                # Its live followers are about to read the end: keep the tail a moment.
                state.closed = True
                self._closed[sid] = now
            state.wake()
        self._trim_tails()
        self._sweep(now)
        if wake_external:
            self._external_event.set()
            self._external_event = anyio.Event()
        for callback in outcome.callbacks:
            callback()

    def _trim_tails(self) -> None:
        """Empty the least recently used tails until all fit in ``tail_cache_bytes``.

        Only messages go: the states keep their lengths and events, so readers stay exact
        and are woken as before; they read what was dropped from SQLite.
        """
        cached = self._cached
        while self._tail_total > self._tail_cache_bytes and cached:
            sid, _ = cached.popitem(last=False)
            self._tail_total -= self._states[sid].empty()

    def _drop(self, sid: str) -> None:
        """Forget a stream's state. Whoever holds its event is woken, takes
        ``change_event()`` again and gets the shared one: no later commit would set this."""
        state = self._states.pop(sid, None)
        if state is None:
            return
        self._closed.pop(sid, None)
        self._cached.pop(sid, None)
        self._tail_total -= state.tail_bytes
        state.wake()

    def _sweep(self, now: float) -> None:
        """Drop the states of closed streams after ``CLOSED_GRACE``, and of open streams
        not appended to for ``idle_after`` seconds that nobody waits on.

        A waited-on stream keeps its state (its tail may still be emptied by the budget):
        its readers keep their own event rather than share the one every commit to a
        stateless stream sets. It is looked at again ``idle_after`` later.
        """
        closed = self._closed
        while closed:
            sid, at = next(iter(closed.items()))
            if now - at < CLOSED_GRACE:
                break
            self._drop(sid)
        states = self._states
        writer = self._writer
        for _ in range(len(states)):  # each looked at once, even with idle_after 0
            sid, state = next(iter(states.items()))
            if now - state.swept_at < self._idle_after:
                break
            if not state.closed and state.waited_on():
                state.swept_at = now
                states.move_to_end(sid)
                continue
            self._drop(sid)
            if writer is not None and not state.closed:
                writer.forget(sid, state.next_offset)

    def _schedule_sweep(self) -> None:
        """Sweep even when nothing commits: an idle server lets go of its idle states too.

        A timer on the loop rather than a task: the store owns no task group, and the
        handle is cancelled in ``aclose``.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or self._writer is None:
            return
        interval = min(MAX_SWEEP_INTERVAL, CLOSED_GRACE / 2, max(self._idle_after / 4, 0.01))
        self._sweep_timer = loop.call_later(interval, self._sweep_and_reschedule)

    def _sweep_and_reschedule(self) -> None:
        self._sweep(time.monotonic())
        self._schedule_sweep()
