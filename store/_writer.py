"""The single writer thread: group commit, offsets, and publish-after-commit.

Every write to the database goes through one thread with one connection. Work arrives in
two forms:

* **ops** — a function run against the connection (create a stream, update a row, …), each
  inside its own savepoint so that one failing op does not take its neighbours down;
* **append sources** — objects that buffer messages (a generation's deltas, say) and hand
  them over with ``take()`` when the writer flushes. Pulling at flush time is what coalesces
  a generation's deltas into one message per flush window.

The writer sleeps until there is work, waits out the rest of the flush window (unless a batch
is already full), runs everything pending in **one** transaction, commits, and only then hands
the outcome to the event loop (``publish``). Nothing is visible to a reader before its
transaction committed. A source taken less than ``coalesce_window`` ago waits for a later
commit: a stream gets at most one batch per window, while an idle stream's first message
still goes out with the very next commit.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._exceptions import StoreError, StoreUnavailable, StreamClosed, StreamNotFound
from ._schema import connect
from .types import AppendBatch, AppendResult, Synchronous, encode_field

logger = logging.getLogger("keepstream.store")

_INSERT_MESSAGE = "INSERT INTO messages (stream_id, offset, data) VALUES (?, ?, ?)"
_UPDATE_SNAPSHOT = "UPDATE generations SET text = text || ?, next_offset = ? WHERE id = ?"
_CLOSE_STREAM = "UPDATE streams SET closed = 1 WHERE id = ?"


class AppendSource(Protocol):
    """Something that buffers messages for one stream until the writer takes them.

    ``take`` runs on the writer thread and must be thread-safe against whoever fills the
    buffer; ``committed`` and ``failed`` run on the event loop after the transaction ended.
    """

    stream_id: str

    def take(self) -> AppendBatch | None:
        """Hand over everything buffered (``None`` when there is nothing)."""

    def committed(self, result: AppendResult) -> None:
        """The batch from the last ``take`` is durable at ``result``."""

    def failed(self, error: StoreError) -> None:
        """The batch from the last ``take`` was not written."""


class WriterContext:
    """What an op sees: the connection and the writer's offset bookkeeping."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._next_offsets: dict[str, int] = {}
        self._closed: set[str] = set()
        self.changes: dict[str, StreamChange] = {}

    def next_offset(self, stream_id: str) -> int:
        """The offset the next message of an open stream gets; raises if closed or missing."""
        if stream_id in self._next_offsets:
            return self._next_offsets[stream_id]
        row = self.conn.execute("SELECT closed FROM streams WHERE id = ?", (stream_id,)).fetchone()
        if row is None:
            raise StreamNotFound(stream_id)
        if row[0]:
            raise StreamClosed(stream_id)
        (last,) = self.conn.execute(
            "SELECT max(offset) FROM messages WHERE stream_id = ?", (stream_id,)
        ).fetchone()
        offset = 0 if last is None else last + 1
        self._next_offsets[stream_id] = offset
        return offset

    def record_append(self, stream_id: str, first: int, payloads: list[bytes], close: bool) -> None:
        """Note appended messages (already written) for offsets and for publishing."""
        self._next_offsets[stream_id] = first + len(payloads)
        change = self.changes.get(stream_id)
        if change is None:
            change = self.changes[stream_id] = StreamChange(stream_id, first)
        change.payloads.extend(payloads)
        if close:
            self.mark_closed(stream_id)

    def mark_created(self, stream_id: str) -> None:
        """Note a new, empty stream."""
        self._next_offsets[stream_id] = 0
        self.changes[stream_id] = StreamChange(stream_id, 0, created=True)

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

    def forget(self) -> None:
        """Drop cached offsets (after a rollback they may be wrong)."""
        self._next_offsets.clear()
        self.changes = {}


@dataclass(slots=True)
class StreamChange:
    """What one commit did to one stream, for the event loop to publish."""

    stream_id: str
    first_offset: int | None
    payloads: list[bytes] = field(default_factory=list)
    created: bool = False
    closed: bool = False
    deleted: bool = False


@dataclass(slots=True)
class Outcome:
    """One committed (or failed) batch, handed to the event loop."""

    changes: list[StreamChange]
    callbacks: list[Callable[[], None]]
    external_change: bool = False


Op = Callable[[WriterContext], Any]


@dataclass(slots=True)
class _PendingOp:
    fn: Op
    done: Callable[[Any, BaseException | None], None]


class Writer:
    """The writer thread. ``publish`` is called (from this thread) with each outcome."""

    def __init__(
        self,
        path: str,
        *,
        publish: Callable[[Outcome], None],
        synchronous: Synchronous,
        flush_interval: float,
        coalesce_window: float,
        max_batch: int,
        poll_interval: float,
        checkpoint_every: int,
    ) -> None:
        self._path = path
        self._publish = publish
        self._synchronous: Synchronous = synchronous
        self._flush_interval = flush_interval
        self._coalesce_window = coalesce_window
        self._last_take: dict[int, float] = {}
        self._max_batch = max_batch
        self._poll_interval = poll_interval
        self._checkpoint_every = checkpoint_every
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._ops: deque[_PendingOp] = deque()
        self._dirty: dict[int, AppendSource] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="keepstream-writer", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self.commits = 0
        self.rows_written = 0

    def start(self) -> None:
        """Start the thread and wait until its connection is open."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise StoreUnavailable(f"cannot open the database: {self._start_error}")

    def stop(self) -> None:
        """Flush what is pending, then end the thread (blocking; call off the event loop)."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        self._thread.join()

    def submit(self, fn: Op, done: Callable[[Any, BaseException | None], None]) -> None:
        """Queue ``fn`` for the next transaction; ``done(result, error)`` runs on publish."""
        with self._lock:
            if self._stopping:
                raise StoreUnavailable("the store is closed")
            self._ops.append(_PendingOp(fn, done))
        self._wake.set()

    def mark_dirty(self, source: AppendSource) -> None:
        """Ask for ``source.take()`` at the next flush. Cheap to call per token."""
        key = id(source)
        with self._lock:
            if key in self._dirty:
                return
            if self._stopping:
                raise StoreUnavailable("the store is closed")
            self._dirty[key] = source
        self._wake.set()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = connect(self._path, synchronous=self._synchronous)
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            ctx = WriterContext(conn)
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        last_commit = 0.0
        checkpointer = _Checkpointer(self._path, self._checkpoint_every)
        try:
            while True:
                self._wake.wait(self._poll_interval)
                # Other processes' commits change data_version (ours never do): polled on
                # every turn, busy or not, so followers of their streams are always woken.
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != version:
                    version = current
                    self._safe_publish(Outcome([], [], external_change=True))
                with self._lock:
                    pending = len(self._ops) + len(self._dirty)
                    stopping = self._stopping
                    if not pending:
                        self._wake.clear()
                if not pending:
                    if stopping:
                        return
                    continue
                delay = last_commit + self._flush_interval - time.monotonic()
                if delay > 0 and pending < self._max_batch and not stopping:
                    time.sleep(delay)
                ops, sources = self._drain(everything=stopping)
                if ops or sources:
                    self._run_batch(ctx, ops, sources)
                    last_commit = time.monotonic()
                    checkpointer.maybe_run()
        finally:
            checkpointer.close()
            conn.close()

    def _drain(self, *, everything: bool) -> tuple[list[_PendingOp], list[AppendSource]]:
        """Everything pending, except sources taken less than ``coalesce_window`` ago.

        Those stay dirty for a later commit. So each stream gets at most one message batch
        per window, however fast its tokens come, and streams spread themselves over the
        commits instead of all landing in every one.
        """
        now = time.monotonic()
        window = self._coalesce_window
        with self._lock:
            self._wake.clear()
            ops = list(self._ops)
            self._ops.clear()
            if everything or window <= 0:
                sources = list(self._dirty.values())
                self._dirty.clear()
            else:
                sources = []
                waiting: dict[int, AppendSource] = {}
                for key, source in self._dirty.items():
                    if now - self._last_take.get(key, -window) >= window:
                        sources.append(source)
                    else:
                        waiting[key] = source
                self._dirty = waiting
        if window > 0:
            last_take = self._last_take
            for key in [k for k, t in last_take.items() if now - t >= window]:
                del last_take[key]
            for source in sources:
                last_take[id(source)] = now
        return ops, sources

    def _safe_publish(self, outcome: Outcome) -> None:
        try:
            self._publish(outcome)
        except Exception:  # the loop may be gone during shutdown
            logger.exception("could not publish a commit to the event loop")

    def _run_batch(
        self, ctx: WriterContext, ops: list[_PendingOp], sources: list[AppendSource]
    ) -> None:
        conn = ctx.conn
        callbacks: list[Callable[[], None]] = []
        taken: list[tuple[AppendSource, AppendBatch, int]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            callbacks.extend(self._run_op(ctx, op) for op in ops)
            rows: list[tuple[str, int, bytes]] = []
            snapshots: list[tuple[str, int, str]] = []
            for source in sources:
                batch = source.take()
                if batch is None:
                    continue
                try:
                    first = ctx.next_offset(source.stream_id)
                except StoreError as exc:
                    callbacks.append(_bind_failed(source, exc))
                    continue
                sid = source.stream_id
                rows.extend((sid, first + i, p) for i, p in enumerate(batch.payloads))
                next_offset = first + len(batch.payloads)
                if batch.generation_id is not None:
                    snapshots.append((batch.text, next_offset, batch.generation_id))
                    if batch.fields:
                        update_fields(conn, batch.generation_id, batch.fields)
                if batch.close:
                    conn.execute(_CLOSE_STREAM, (sid,))
                ctx.record_append(sid, first, batch.payloads, batch.close)
                taken.append((source, batch, first))
            conn.executemany(_INSERT_MESSAGE, rows)
            conn.executemany(_UPDATE_SNAPSHOT, snapshots)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            logger.error("write transaction failed: %s", exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            ctx.forget()
            error = StoreUnavailable(f"write failed: {exc}")
            failures: list[Callable[[], None]] = [_bind_op_failed(op, error) for op in ops]
            failures.extend(_bind_failed(source, error) for source in sources)
            self._safe_publish(Outcome([], failures))
            return
        self.commits += 1
        self.rows_written += len(rows)
        for source, batch, first in taken:
            callbacks.append(_bind_committed(source, first, first + len(batch.payloads)))
        changes = list(ctx.changes.values())
        ctx.changes = {}
        self._safe_publish(Outcome(changes, callbacks))

    def _run_op(self, ctx: WriterContext, op: _PendingOp) -> Callable[[], None]:
        conn = ctx.conn
        conn.execute("SAVEPOINT op")
        saved_changes = dict(ctx.changes)
        try:
            result = op.fn(ctx)
        except (StoreError, sqlite3.IntegrityError, ValueError) as exc:
            # Ops change the offset bookkeeping only after their SQL succeeded, so undoing
            # the savepoint and the batch's change list is all a failed op needs.
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            ctx.changes = saved_changes
            return _bind_op_failed(op, exc)
        conn.execute("RELEASE op")
        return _bind_op_done(op, result)


def update_fields(conn: sqlite3.Connection, generation_id: str, fields: dict[str, Any]) -> int:
    """Set columns of one generation row (names are trusted); return the rows changed."""
    names = sorted(fields)
    assignments = ", ".join(f"{name} = ?" for name in names)
    values = [encode_field(name, fields[name]) for name in names]
    sql = f"UPDATE generations SET {assignments} WHERE id = ?"
    return conn.execute(sql, (*values, generation_id)).rowcount


def _bind_failed(source: AppendSource, error: StoreError) -> Callable[[], None]:
    return lambda: source.failed(error)


def _bind_committed(source: AppendSource, first: int, next_offset: int) -> Callable[[], None]:
    return lambda: source.committed(AppendResult(first, next_offset))


def _bind_op_done(op: _PendingOp, result: Any) -> Callable[[], None]:
    return lambda: op.done(result, None)


def _bind_op_failed(op: _PendingOp, error: BaseException) -> Callable[[], None]:
    return lambda: op.done(None, error)


class _Checkpointer:
    """Runs a PASSIVE WAL checkpoint every ``every`` commits, on a thread of its own.

    Left alone under load the WAL grows without bound (automatic checkpoints are off);
    checkpointing on the writer's connection would stall commits, so it happens beside it.
    PASSIVE never takes the write lock; once a pass completes, the next commit reuses the WAL
    from its start, and ``journal_size_limit`` trims the file.
    """

    def __init__(self, path: str, every: int) -> None:
        self._path = path
        self._every = every
        self._busy = threading.Lock()
        self._commits = 0
        self._closed = False

    def maybe_run(self) -> None:
        self._commits += 1
        if self._closed or self._commits % self._every or not self._busy.acquire(blocking=False):
            return
        threading.Thread(target=self._checkpoint, name="keepstream-checkpoint", daemon=True).start()

    def _checkpoint(self) -> None:
        try:
            conn = connect(self._path)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            logger.warning("WAL checkpoint failed: %s", exc)
        finally:
            self._busy.release()

    def close(self) -> None:
        self._closed = True
        with self._busy:
            pass
