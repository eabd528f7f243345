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
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._compactor import Compactor
from ._context import (
    CLOSE_STREAM,
    INSERT_MESSAGE,
    MAX_TRACKED_STREAMS,
    AppendSource,
    Op,
    Outcome,
    StreamChange,
    WriterContext,
    is_transient,
    update_fields,
)
from ._exceptions import (
    Fenced,
    StoreError,
    StoreUnavailable,
    StreamClosed,
    StreamConflict,
    StreamNotFound,
)
from ._schema import connect
from .types import AppendBatch, AppendResult, Synchronous

logger = logging.getLogger("keepstream.store")

_UPDATE_SNAPSHOT = "UPDATE generations SET text = text || ?, next_offset = ? WHERE id = ?"
# The hot path writes a whole commit's rows with one statement each, fed one JSON array.
# executemany steps SQLite once per row and gives the GIL up and takes it back around every
# step: under load that round trip, not SQLite, was most of the writer's time.
# The owner of each generation a commit's fenced batches write, fed one JSON array.
_OWNERS = "SELECT id, worker_id FROM generations WHERE id IN (SELECT value FROM json_each(?))"
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
MAX_BACKOFF = 1.0
STOP_ATTEMPTS = 3
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# A checkpoint runs after every ``checkpoint_every`` commits, and after any commit that
# leaves the WAL larger than this.
WAL_CHECKPOINT_AT = 16 * 1024 * 1024
# Compaction of closed streams into blocks runs while the writer is idle, in slices of at
# most this long.
COMPACT_SLICE = 0.02


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
        self._compactor = Compactor()  # closed streams to pack into blocks when idle
        self._context: WriterContext | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="keepstream-writer", daemon=True)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._failures = 0
        self.commits = 0
        self.rows_written = 0
        self.retries = 0

    @property
    def compacted(self) -> int:
        """Messages moved into blocks since the start (read from any thread)."""
        return self._compactor.compacted

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
                idle_work = self._compactor.has_work
                self._wake.wait(0.0 if idle_work else self._until_next_revisit())
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
                    self._compactor.run(conn, COMPACT_SLICE, interrupted=self._wake.is_set)
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
        self._compactor.add(c.stream_id for c in changes if c.closed and not c.deleted)
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
        owners = _owners(conn, [batch for _, batch in batches])
        for source, batch in batches:
            sid = source.stream_id
            try:
                _check_fence(batch, owners)
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
            _check_fence(batch, _owners(conn, [batch]))
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


def _owners(conn: sqlite3.Connection, batches: list[AppendBatch]) -> dict[str, str | None]:
    """The owning worker of each generation the fenced ``batches`` write (one query)."""
    fenced = [b.generation_id for b in batches if b.worker_id and b.generation_id]
    if not fenced:
        return {}
    rows = conn.execute(_OWNERS, (json.dumps(fenced),)).fetchall()
    return dict(rows)


def _check_fence(batch: AppendBatch, owners: dict[str, str | None]) -> None:
    """Raise ``Fenced`` if ``batch`` is fenced and its generation belongs to another worker."""
    if batch.worker_id and batch.generation_id:
        if owners.get(batch.generation_id) != batch.worker_id:
            raise Fenced(batch.generation_id, batch.worker_id)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _store_error(exc: BaseException) -> StoreError:
    return StoreError(f"write refused: {type(exc).__name__}: {exc}")


def _bind(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
    return lambda: fn(*args)
