"""The single writer thread: group commit, offsets, publish-after-commit, and faults.

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

Faults. A *transient* SQLite error (disk full, I/O error, busy past the timeout) rolls the
whole batch back; every taken batch is put back into its source (``untake``) and every op
back into the queue *before* anything else can be taken, and the writer retries with
backoff. Nothing is lost and no gap opens: the same messages get the same offsets once the
disk has room. A *permanent* error (a closed or missing stream, a constraint, a bad value,
any other exception) fails only the op or source it belongs to.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import _blocks as blocks
from ._exceptions import (
    StoreError,
    StoreUnavailable,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
)
from ._schema import connect
from .types import AppendBatch, AppendResult, Synchronous, encode_field

logger = logging.getLogger("keepstream.store")

INSERT_MESSAGE = "INSERT INTO messages (stream_id, offset, data) VALUES (?, ?, ?)"
CLOSE_STREAM = "UPDATE streams SET closed = 1 WHERE id = ?"
_LAST_OFFSET = "SELECT max(offset) FROM messages WHERE stream_id = ?"
_UPDATE_SNAPSHOT = "UPDATE generations SET text = text || ?, next_offset = ? WHERE id = ?"
# The hot path writes a whole commit's rows with one statement each, fed one JSON array.
# executemany steps SQLite once per row and gives the GIL up and takes it back around every
# step: under load that round trip, not SQLite, was most of the writer's time.
_INSERT_MESSAGES_JSON = (
    "INSERT INTO messages (stream_id, offset, data)"
    " SELECT value ->> 0, value ->> 1, CAST(value ->> 2 AS BLOB) FROM json_each(?)"
)
_UPDATE_SNAPSHOTS_JSON = (
    # Parentheses matter: || and ->> share a precedence level and group left to right.
    "UPDATE generations SET text = generations.text || (j.value ->> 1),"
    " next_offset = j.value ->> 2 FROM json_each(?) AS j WHERE generations.id = j.value ->> 0"
)

# SQLite primary result codes worth retrying: the same statements can succeed later.
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
MAX_BACKOFF = 1.0
STOP_ATTEMPTS = 3
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# A checkpoint runs after every ``checkpoint_every`` commits, and after any commit that
# leaves the WAL larger than this.
WAL_CHECKPOINT_AT = 16 * 1024 * 1024
# Compaction of closed streams into blocks runs while the writer is idle, in slices of at
# most this long, each transaction moving at most this many blocks (so new work waits for
# one such transaction at most), and finds those left from before a start this many
# streams per query.
COMPACT_SLICE = 0.02
COMPACT_BLOCKS = 4
SCAN_STREAMS = 1024
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


def is_transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed if tried again (disk full, I/O, busy)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _TRANSIENT_CODES


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


@dataclass(slots=True)
class _PendingOp:
    fn: Op
    done: Callable[[Any, BaseException | None], None]


class _Retry(Exception):
    """A transient error: roll everything back and try the batch again later."""


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
        on_commit: Callable[[float, int], None] | None = None,
        max_tracked_streams: int = MAX_TRACKED_STREAMS,
    ) -> None:
        self._path = path
        self._on_commit = on_commit
        self._max_tracked_streams = max_tracked_streams
        self._publish = publish
        self._synchronous: Synchronous = synchronous
        self._flush_interval = flush_interval
        self._coalesce_window = coalesce_window
        self._max_batch = max_batch
        self._poll_interval = poll_interval
        self._checkpoint_every = checkpoint_every
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._op_arrived = threading.Event()
        self._ops: deque[_PendingOp] = deque()
        # Keyed by the sources themselves, never by id(): a new source may get the address
        # of one that just went, and must not inherit its "taken recently" mark.
        self._dirty: dict[AppendSource, None] = {}
        self._last_take: dict[AppendSource, float] = {}
        # Sources to take again at a time they asked for (``AppendBatch.revisit_after``),
        # earliest first: every revisit waits as long, so insertion order is due order.
        self._revisits: dict[AppendSource, float] = {}
        self._forgotten: list[tuple[str, int]] = []  # for ``WriterContext.forget``
        # Closed streams whose message rows are still to be packed into blocks (when the
        # writer is idle), and where the scan for those from before this start got to.
        self._to_compact: deque[str] = deque()
        self._scan_from: int | None = 0
        self._context: WriterContext | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="keepstream-writer", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._failures = 0
        self.commits = 0
        self.rows_written = 0
        self.retries = 0
        self.compacted = 0  # messages moved into blocks

    def start(self) -> None:
        """Start the thread and wait until its connection is open."""
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise StoreUnavailable(f"cannot open the database: {self._start_error}")

    def stop(self) -> None:
        """Flush what is pending, then end the thread (blocking; call off the event loop).

        If the database keeps failing, pending work is given up after a few attempts and
        its waiters get ``StoreUnavailable``.
        """
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
        self._op_arrived.set()
        self._wake.set()

    @property
    def tracked_streams(self) -> int:
        """Streams whose next offset the writer keeps (a gauge; read from any thread)."""
        context = self._context
        return context.tracked_streams if context is not None else 0

    def forget(self, stream_id: str, next_offset: int) -> None:
        """The event loop dropped its state of ``stream_id``, which it knew up to
        ``next_offset``: stop tracking the stream too, unless appended to since. Applied
        between transactions; thread-safe."""
        with self._lock:
            self._forgotten.append((stream_id, next_offset))

    def mark_dirty(self, source: AppendSource) -> None:
        """Ask for ``source.take()`` at the next flush. Cheap to call per token."""
        with self._lock:
            if source in self._dirty:
                return
            if self._stopping:
                raise StoreUnavailable("the store is closed")
            self._dirty[source] = None
        self._wake.set()

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            conn = connect(self._path, synchronous=self._synchronous)
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            ctx = self._context = WriterContext(conn, max_streams=self._max_tracked_streams)
            version = conn.execute("PRAGMA data_version").fetchone()[0]
        except BaseException as exc:
            self._start_error = exc
            self._started.set()
            return
        self._started.set()
        last_commit = 0.0
        loaded = False  # whether work piled up during the last commit
        wal = Path(f"{self._path}-wal")
        try:
            while True:
                self._wake.wait(0.0 if self._can_compact() else self._until_next_revisit())
                self._revisit_due()
                # Other processes' commits change data_version (ours never do): polled on
                # every turn, busy or not, so followers of their streams are always woken.
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != version:
                    version = current
                    changes = self._changed_by_others(ctx)
                    self._safe_publish(Outcome(changes, [], external_change=True))
                with self._lock:
                    forgotten, self._forgotten = self._forgotten, []
                untracked = ctx.forget(forgotten)
                if untracked:
                    self._safe_publish(Outcome(untracked, []))
                with self._lock:
                    pending = len(self._ops) + len(self._dirty)
                    stopping = self._stopping
                    if not pending:
                        self._wake.clear()
                if not pending:
                    if stopping:
                        return
                    self._compact_while_idle(conn)
                    continue
                if stopping and self._failures >= STOP_ATTEMPTS:
                    self._give_up(StoreUnavailable("the store closed while writes kept failing"))
                    return
                # The group-commit window adapts: work that finds the writer idle is committed
                # at once; only appends that piled up during the last commit (load) wait out
                # the window, to be committed with what comes after them. An op ends the wait:
                # someone awaits it (a request, mostly), and the window is for batching the
                # generations' deltas, which the op's commit takes along anyway.
                delay = last_commit + self._flush_interval - time.monotonic() if loaded else 0.0
                if self._failures:
                    delay = max(delay, min(MAX_BACKOFF, 0.01 * 2**self._failures))
                if delay > 0 and (pending < self._max_batch or self._failures) and not stopping:
                    if self._failures:
                        time.sleep(delay)  # a retry's back-off
                    else:
                        self._op_arrived.clear()
                        if not self._ops:  # an op arriving meanwhile ends the wait
                            self._op_arrived.wait(delay)
                ops, sources = self._drain(everything=stopping)
                if ops or sources:
                    self._run_batch(ctx, ops, sources)
                    last_commit = time.monotonic()
                    with self._lock:
                        loaded = bool(self._ops or self._dirty)
                    if self.commits % self._checkpoint_every == 0 or _size(wal) > WAL_CHECKPOINT_AT:
                        self._checkpoint(conn)
        finally:
            conn.close()

    def _can_compact(self) -> bool:
        return bool(self._to_compact) or self._scan_from is not None

    def _compact_while_idle(self, conn: sqlite3.Connection) -> None:
        """Pack closed streams' rows into blocks for up to ``COMPACT_SLICE`` seconds, a few
        blocks per transaction, stopping as soon as other work arrives: it goes first."""
        until = time.monotonic() + COMPACT_SLICE
        while time.monotonic() < until and not self._wake.is_set():
            if not self._to_compact:
                if self._scan_from is None:
                    return
                self._scan_from = self._scan_for_uncompacted(conn, self._scan_from)
                continue
            stream_id = self._to_compact[0]
            try:
                conn.execute("BEGIN IMMEDIATE")
                moved, done = blocks.compact(conn, stream_id, max_blocks=COMPACT_BLOCKS)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if is_transient(exc):
                    return  # tried again on the next idle turn
                # Left as rows, which read as well; the next start's scan tries it again.
                logger.warning("could not compact stream %s: %s", stream_id, exc)
                done = True
                moved = 0
            self.compacted += moved
            if done:
                self._to_compact.popleft()

    def _scan_for_uncompacted(self, conn: sqlite3.Connection, after: int) -> int | None:
        """Queue closed streams past rowid ``after`` that still have message rows (closed
        by a process that died first, say); where the next scan starts, ``None`` when done."""
        try:
            rows = conn.execute(
                "SELECT rowid, closed AND EXISTS (SELECT 1 FROM messages WHERE stream_id = id),"
                " id FROM streams WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, SCAN_STREAMS),
            ).fetchall()
        except sqlite3.Error as exc:
            logger.warning("could not look for streams to compact: %s", exc)
            return None
        self._to_compact.extend(stream_id for _, uncompacted, stream_id in rows if uncompacted)
        return rows[-1][0] if len(rows) == SCAN_STREAMS else None

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """A PASSIVE checkpoint, here between two commits.

        Beside the writer (another thread, another connection) a checkpoint never caught
        up under load: commits kept landing while it copied, so the WAL was never fully
        copied back at the moment the next commit began, never restarted from its start,
        and grew past a gigabyte in seconds. Here it copies everything committed, and the
        next commit restarts the WAL (``journal_size_limit`` trims the file).
        """
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            logger.warning("WAL checkpoint failed: %s", exc)

    def _until_next_revisit(self) -> float:
        """How long the thread may sleep: the poll interval, or less if a revisit is due."""
        with self._lock:
            due = next(iter(self._revisits.values()), math.inf)
        return max(0.0, min(self._poll_interval, due - time.monotonic()))

    def _revisit_due(self) -> None:
        """Mark dirty the sources whose revisit is due."""
        now = time.monotonic()
        with self._lock:
            while self._revisits:
                source, due = next(iter(self._revisits.items()))
                if due > now:
                    break
                del self._revisits[source]
                self._dirty[source] = None

    def _schedule_revisits(self, batches: list[tuple[AppendSource, AppendBatch]]) -> None:
        now = time.monotonic()
        with self._lock:
            for source, batch in batches:
                self._revisits.pop(source, None)
                if batch.revisit_after is not None:
                    self._revisits[source] = now + batch.revisit_after

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
                sources = list(self._dirty)
                self._dirty.clear()
            else:
                sources = []
                waiting: dict[AppendSource, None] = {}
                for source in self._dirty:
                    if now - self._last_take.get(source, -window) >= window:
                        sources.append(source)
                    else:
                        waiting[source] = None
                self._dirty = waiting
        if window > 0:
            last_take = self._last_take
            for key in [k for k, t in last_take.items() if now - t >= window]:
                del last_take[key]
            for source in sources:
                last_take[source] = now
        return ops, sources

    def _requeue(self, ops: list[_PendingOp], sources: Iterable[AppendSource]) -> None:
        """Put rolled-back work back, ahead of anything newer."""
        with self._lock:
            self._ops.extendleft(reversed(ops))
            for source in sources:
                self._dirty.setdefault(source, None)

    def _give_up(self, error: StoreUnavailable) -> None:
        with self._lock:
            ops = list(self._ops)
            sources = list(self._dirty)
            self._ops.clear()
            self._dirty.clear()
        callbacks = [_bind(op.done, None, error) for op in ops]
        callbacks.extend(_bind(source.failed, error) for source in sources)
        self._safe_publish(Outcome([], callbacks))

    def _safe_publish(self, outcome: Outcome) -> None:
        try:
            self._publish(outcome)
        except Exception:  # the loop may be gone during shutdown
            logger.exception("could not publish a commit to the event loop")

    def _changed_by_others(self, ctx: WriterContext) -> list[StreamChange]:
        """Streams this writer appends to that another process closed (it took them over)
        or appended to (a Durable Stream written through two processes): what this
        process knows of them no longer holds."""
        streams = ctx.written_streams()
        if not streams:
            return []
        try:
            # One JSON array, not one parameter per stream: there may be more streams than
            # SQLite allows parameters.
            rows = ctx.conn.execute(
                "SELECT s.id, s.closed, (SELECT max(offset) + 1 FROM messages m"
                " WHERE m.stream_id = s.id) FROM streams s"
                " WHERE s.id IN (SELECT value FROM json_each(?))",
                (json.dumps(streams),),
            ).fetchall()
        except sqlite3.Error as exc:
            logger.warning("could not check for streams changed by another process: %s", exc)
            return []
        gone = set(streams)
        for stream_id, closed, length in rows:
            gone.discard(stream_id)
            if closed or (length is not None and length != ctx.next_offset(stream_id)):
                ctx.mark_stale(stream_id)
        for stream_id in gone:  # deleted by another process
            ctx.mark_stale(stream_id)
        changes = list(ctx.changes.values())
        ctx.changes = {}
        return changes

    # -- one batch ----------------------------------------------------------------------------

    def _run_batch(
        self, ctx: WriterContext, ops: list[_PendingOp], sources: list[AppendSource]
    ) -> None:
        callbacks: list[Callable[[], None]] = []
        batches: list[tuple[AppendSource, AppendBatch]] = []
        for source in sources:
            try:
                batch = source.take()
            except Exception as exc:
                logger.exception("append source for %s failed to hand over", source.stream_id)
                callbacks.append(_bind(source.failed, StoreError(f"bad append: {exc}")))
                continue
            if batch is not None:
                batches.append((source, batch))
        started = time.monotonic()
        rows_before = self.rows_written
        try:
            try:
                callbacks += self._write(ctx, ops, batches, isolated=False)
            except _Retry:
                raise
            except Exception as exc:
                # A permanent error somewhere in the fast path: find whose, one by one.
                logger.warning(
                    "batch refused (%s: %s); writing it source by source", type(exc).__name__, exc
                )
                self._rollback(ctx)
                callbacks += self._write(ctx, ops, batches, isolated=True)
        except _Retry as retry:
            self._rollback(ctx)
            self._failures += 1
            self.retries += 1
            logger.warning("write failed (%s); retrying, attempt %d", retry, self._failures)
            for source, _ in batches:
                source.untake()
            self._requeue(ops, [source for source, _ in batches])
            self._safe_publish(Outcome([], callbacks))
            return
        self._failures = 0
        self.commits += 1
        self._schedule_revisits(batches)
        if self._on_commit is not None:
            try:
                self._on_commit(time.monotonic() - started, self.rows_written - rows_before)
            except Exception:
                logger.exception("the commit observer failed")
        changes = list(ctx.changes.values())
        ctx.changes = {}
        self._to_compact.extend(c.stream_id for c in changes if c.closed and not c.deleted)
        self._safe_publish(Outcome(changes, callbacks))

    def _rollback(self, ctx: WriterContext) -> None:
        if ctx.conn.in_transaction:
            ctx.conn.execute("ROLLBACK")
        ctx.reset()

    def _write(
        self,
        ctx: WriterContext,
        ops: list[_PendingOp],
        batches: list[tuple[AppendSource, AppendBatch]],
        *,
        isolated: bool,
    ) -> list[Callable[[], None]]:
        """One transaction: ops, then appends, then COMMIT. Raises ``_Retry`` on a transient
        error; otherwise returns the callbacks to run once published."""
        conn = ctx.conn
        callbacks: list[Callable[[], None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            callbacks.extend(self._run_op(ctx, op) for op in ops)
            if isolated:
                callbacks.extend(self._append_one(ctx, source, batch) for source, batch in batches)
            else:
                callbacks += self._append_all(ctx, batches)
            conn.execute("COMMIT")
        except _Retry:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise _Retry(str(exc)) from exc
            raise
        return callbacks

    def _run_op(self, ctx: WriterContext, op: _PendingOp) -> Callable[[], None]:
        conn = ctx.conn
        conn.execute("SAVEPOINT op")
        saved_changes = dict(ctx.changes)
        try:
            result = op.fn(ctx)
        except Exception as exc:
            if is_transient(exc):
                raise _Retry(str(exc)) from exc
            # Ops change the offset bookkeeping only after their SQL succeeded, so undoing
            # the savepoint and the batch's change list is all a failed op needs.
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            ctx.changes = saved_changes
            error = exc if isinstance(exc, StoreError | ValueError) else _store_error(exc)
            return _bind(op.done, None, error)
        conn.execute("RELEASE op")
        return _bind(op.done, result, None)

    def _append_all(
        self, ctx: WriterContext, batches: list[tuple[AppendSource, AppendBatch]]
    ) -> list[Callable[[], None]]:
        """The fast path: every batch's messages in one statement, every snapshot in one."""
        conn = ctx.conn
        callbacks: list[Callable[[], None]] = []
        rows: list[tuple[str, int, str]] = []
        binary_rows: list[tuple[str, int, bytes]] = []
        snapshots: list[tuple[str, str, int]] = []
        for source, batch in batches:
            sid = source.stream_id
            try:
                first = ctx.next_offset(sid)
            except StoreError as exc:
                callbacks.append(self._permanently_failed(ctx, source, exc))
                continue
            for i, payload in enumerate(batch.payloads):
                # Payloads travel as JSON strings and are CAST back to the same UTF-8 bytes;
                # the rare payload that is not UTF-8 is bound as it is.
                try:
                    rows.append((sid, first + i, payload.decode()))
                except UnicodeDecodeError:
                    binary_rows.append((sid, first + i, payload))
            if batch.generation_id is not None:
                if batch.text is not None:
                    end = first + len(batch.payloads)
                    snapshots.append((batch.generation_id, batch.text, end))
                if batch.fields:
                    update_fields(conn, batch.generation_id, batch.fields)
            if batch.close:
                conn.execute(CLOSE_STREAM, (sid,))
            ctx.record_append(sid, first, batch.payloads, close=batch.close)
            callbacks.append(
                _bind(source.committed, AppendResult(first, first + len(batch.payloads)))
            )
        if rows:
            conn.execute(_INSERT_MESSAGES_JSON, (json.dumps(rows, ensure_ascii=False),))
        conn.executemany(INSERT_MESSAGE, binary_rows)
        if snapshots:
            conn.execute(_UPDATE_SNAPSHOTS_JSON, (json.dumps(snapshots, ensure_ascii=False),))
        self.rows_written += len(rows) + len(binary_rows)
        return callbacks

    def _append_one(
        self, ctx: WriterContext, source: AppendSource, batch: AppendBatch
    ) -> Callable[[], None]:
        """The slow path: one batch in its own savepoint, failing alone."""
        conn = ctx.conn
        sid = source.stream_id
        conn.execute("SAVEPOINT append")
        try:
            first = ctx.next_offset(sid)
            conn.executemany(
                INSERT_MESSAGE, [(sid, first + i, p) for i, p in enumerate(batch.payloads)]
            )
            if batch.generation_id is not None:
                if batch.text is not None:
                    next_offset = first + len(batch.payloads)
                    conn.execute(_UPDATE_SNAPSHOT, (batch.text, next_offset, batch.generation_id))
                if batch.fields:
                    update_fields(conn, batch.generation_id, batch.fields)
            if batch.close:
                conn.execute(CLOSE_STREAM, (sid,))
        except Exception as exc:
            if is_transient(exc):
                raise _Retry(str(exc)) from exc
            conn.execute("ROLLBACK TO append")
            conn.execute("RELEASE append")
            if isinstance(exc, sqlite3.IntegrityError):
                exc = StreamConflict(sid)  # another writer took offsets we thought were ours
            return self._permanently_failed(ctx, source, exc)
        conn.execute("RELEASE append")
        ctx.record_append(sid, first, batch.payloads, close=batch.close)
        self.rows_written += len(batch.payloads)
        return _bind(source.committed, AppendResult(first, first + len(batch.payloads)))

    def _permanently_failed(
        self, ctx: WriterContext, source: AppendSource, exc: BaseException
    ) -> Callable[[], None]:
        error = exc if isinstance(exc, StoreError) else _store_error(exc)
        if isinstance(error, StreamClosed | StreamNotFound | StreamConflict):
            ctx.mark_stale(source.stream_id)
        return _bind(source.failed, error)


def update_fields(conn: sqlite3.Connection, generation_id: str, fields: dict[str, Any]) -> int:
    """Set columns of one generation row (names are trusted); return the rows changed."""
    names = sorted(fields)
    assignments = ", ".join(f"{name} = ?" for name in names)
    values = [encode_field(name, fields[name]) for name in names]
    sql = f"UPDATE generations SET {assignments} WHERE id = ?"
    return conn.execute(sql, (*values, generation_id)).rowcount


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _store_error(exc: BaseException) -> StoreError:
    return StoreError(f"write refused: {type(exc).__name__}: {exc}")


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)
