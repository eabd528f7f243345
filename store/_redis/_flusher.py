"""Group commit on Redis: the batches of every dirty append source go to Redis in one script
call, at most every ``flush_interval`` while busy (at once when idle), each source taken at
most once per ``coalesce_window``.

A call whose reply is lost (a dropped connection, a timeout) may or may not have run: its
batches are kept exactly as they were and sent again, each with the token it had, and the
script skips a batch whose token its stream already holds. So a batch lands once, and a
source's batches land in the order taken (a source with a batch held back is not taken
again until that batch is settled).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._context import AppendSource
from .._exceptions import Fenced, StoreError
from ..types import AppendBatch, AppendResult
from ._codec import Arg, dumps, error_for, field_pairs

logger = logging.getLogger("keepstream.store.redis")

RETRY_DELAYS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
# Exceptions after which a call may or may not have run: send the same batches again.
LOST_REPLY = (RedisConnectionError, RedisTimeoutError, OSError)


# Refusals that pass: out of memory (noeviction), a replica that is read-only during a
# failover, a primary that is down or asks to try again (and loading, a ConnectionError).
REFUSED_FOR_NOW = (OutOfMemoryError, ReadOnlyError, MasterDownError, TryAgainError)


def may_pass(exc: BaseException) -> bool:
    """Whether a failed call is worth sending again: a lost reply, or Redis refusing for
    now; not an error of the script itself."""
    return isinstance(exc, LOST_REPLY + REFUSED_FOR_NOW)


@dataclass(slots=True)
class Pending:
    """A batch taken from a source and not yet settled, with its token."""

    source: AppendSource
    batch: AppendBatch
    token: str

    def args(self) -> list[Arg]:
        """The batch as the append script reads it."""
        batch = self.batch
        has_text = batch.generation_id is not None and batch.text is not None
        text = batch.text if has_text and batch.text else ""
        pairs = field_pairs(batch.fields)
        return [
            self.token,
            self.source.stream_id,
            batch.generation_id or "",
            dumps(batch.worker_id) if batch.worker_id else "",
            int(batch.close),
            int(has_text),
            text,
            len(text),
            len(pairs) // 2,
            *pairs,
            len(batch.payloads),
            *batch.payloads,
        ]


Commit = Callable[[list[Arg]], Awaitable[list[Any]]]


@dataclass(frozen=True, slots=True)
class Committed:
    """What one batch wrote: ``payloads`` at ``first`` of ``stream_id`` (and closed it)."""

    stream_id: str
    first: int
    payloads: list[bytes]
    closed: bool


class Flusher:
    """Takes dirty sources' batches and commits them together (see the module's notes)."""

    def __init__(
        self,
        commit: Commit,
        *,
        node_id: str,
        flush_interval: float,
        coalesce_window: float,
        on_committed: Callable[[list[Committed], float, int], None],
    ) -> None:
        self._commit = commit
        self._node_id = node_id
        self._flush_interval = flush_interval
        self._coalesce_window = coalesce_window
        self._on_committed = on_committed
        self._dirty: dict[AppendSource, None] = {}
        self._taken_at: dict[AppendSource, float] = {}
        self._held: list[Pending] = []
        self._revisits: dict[AppendSource, asyncio.TimerHandle] = {}
        self._wake = anyio.Event()
        self._tokens = itertools.count()
        self._last_commit = -math.inf
        self._behind_held = False  # a source was left dirty behind its held batch
        self.commits = 0
        self.rows_written = 0
        self.retries = 0

    @property
    def pending(self) -> int:
        """Sources waiting to be taken, and batches held for a retry."""
        return len(self._dirty) + len(self._held)

    def mark_dirty(self, source: AppendSource) -> None:
        """Take ``source`` at the next flush. Cheap to call per token."""
        if source not in self._dirty:
            self._dirty[source] = None
            self._wake.set()

    async def run(self) -> None:
        """Flush forever (cancel to stop; ``drain`` first to write what is pending)."""
        failures = 0
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            wait = self._last_commit + self._flush_interval - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
            try:
                await self.flush()
                failures = 0
            except RedisError as exc:  # only those ``flush`` kept the batches for
                self.retries += 1
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                failures += 1
                logger.warning("append to Redis failed (%s); retrying in %.2f s", exc, delay)
                self._wake.set()
                await anyio.sleep(delay)

    async def flush(self) -> None:
        """One commit of everything due (held batches first). An error that may pass
        (``may_pass``) is raised after the batches are kept for the next attempt; any other
        fails them."""
        now = time.monotonic()
        pending = self._take_due(now)
        if not pending:
            return
        args: list[Arg] = [self._node_id, len(pending)]
        for item in pending:
            args += item.args()
        started = time.monotonic()
        try:
            results = await self._commit(args)
        except Exception as exc:
            if may_pass(exc):
                self._held = pending
                if isinstance(exc, RedisError):
                    raise
                raise RedisConnectionError(str(exc)) from exc  # an OSError: the same to us
            logger.exception("append script failed")  # the script itself: a bug
            error = StoreError(f"append failed: {exc}")
            for item in pending:
                item.source.failed(error)
            return
        self._last_commit = time.monotonic()
        self.commits += 1
        changed: list[Committed] = []
        rows = 0
        for item, result in zip(pending, results, strict=True):
            if isinstance(result, int):
                size = len(item.batch.payloads)
                rows += size
                changed.append(
                    Committed(item.source.stream_id, result, item.batch.payloads, item.batch.close)
                )
                self._schedule_revisit(item.source, item.batch.revisit_after)
                item.source.committed(AppendResult(result, result + size))
            elif result == b"E:fenced":
                gid = item.batch.generation_id or ""
                item.source.failed(Fenced(gid, item.batch.worker_id))
            else:
                item.source.failed(error_for(result.decode(), item.source.stream_id))
        self.rows_written += rows
        if self._behind_held:  # their sources are dirty again, and may not say so twice
            self._wake.set()
        self._on_committed(changed, self._last_commit - started, rows)

    def _take_due(self, now: float) -> list[Pending]:
        pending, self._held = self._held, []
        held = {item.source for item in pending}
        self._behind_held = False
        later = math.inf
        for source in list(self._dirty):
            if source in held:
                self._behind_held = True  # taken once its held batch is settled
                continue
            due = self._taken_at.get(source, -math.inf) + self._coalesce_window
            if due > now:
                later = min(later, due)
                continue
            del self._dirty[source]
            try:
                batch = source.take()
            except Exception as exc:
                logger.exception("append source for %s failed to hand over", source.stream_id)
                source.failed(StoreError(f"bad append: {exc}"))
                continue
            if batch is None:
                continue
            self._taken_at[source] = now
            pending.append(Pending(source, batch, f"{self._node_id}:{next(self._tokens)}"))
        if later < math.inf:
            asyncio.get_running_loop().call_later(later - now, self._set_wake)
        if len(self._taken_at) > 4 * len(self._dirty) + 1024:
            cutoff = now - self._coalesce_window
            self._taken_at = {s: t for s, t in self._taken_at.items() if t > cutoff}
        return pending

    def _set_wake(self) -> None:
        """Wake the loop (through the event it waits on now, not the one of the moment this
        was scheduled)."""
        self._wake.set()

    def _schedule_revisit(self, source: AppendSource, after: float | None) -> None:
        previous = self._revisits.pop(source, None)
        if previous is not None:
            previous.cancel()
        if after is not None:
            self._revisits[source] = asyncio.get_running_loop().call_later(
                after, self._revisit, source
            )

    def _revisit(self, source: AppendSource) -> None:
        self._revisits.pop(source, None)
        self.mark_dirty(source)

    async def drain(self, within: float) -> None:
        """Flush until nothing is dirty or held (or ``within`` seconds pass)."""
        with anyio.move_on_after(within):
            while self._dirty or self._held:
                try:
                    await self.flush()
                except RedisError:
                    await anyio.sleep(RETRY_DELAYS[0])
                if self._dirty and not self._held:
                    await anyio.sleep(min(self._coalesce_window, 0.05))
        for handle in self._revisits.values():
            handle.cancel()
        self._revisits.clear()
