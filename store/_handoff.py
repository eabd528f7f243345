"""How the event loop hands work to the writer and to reader threads: one-shot results,
one-shot appends, and the pool of read-only connections."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from ._exceptions import StoreBusy, StoreError, StoreUnavailable
from ._schema import connect
from .types import AppendBatch, AppendResult

T = TypeVar("T")


class WriteRoom:
    """A bounded count of writes in flight: ``reserve`` waits up to ``wait`` seconds for a
    place (``StoreBusy`` after that) and returns the function that gives it back."""

    def __init__(self, size: int, wait: float) -> None:
        if size < 1 or wait < 0:
            raise ValueError("max_pending_writes must be >= 1 and write_wait >= 0")
        self.size = size
        self.wait = wait
        self._room = anyio.Semaphore(size)

    @property
    def pending(self) -> int:
        """Places taken and not given back."""
        return self.size - self._room.value

    async def reserve(self) -> Callable[[], None]:
        """A place, waited for up to ``wait`` seconds; call the result once the write is done."""
        try:
            self._room.acquire_nowait()  # the usual case: no wait, not even a checkpoint
            return self._room.release
        except anyio.WouldBlock:
            pass
        with anyio.move_on_after(self.wait):
            await self._room.acquire()
            return self._room.release
        raise StoreBusy(self.size, self.wait)


class Completion:
    """A one-shot result set on the event loop by the writer's publish step; ``on_set`` runs
    when it is (to free the write's place in the queue)."""

    __slots__ = ("_error", "_event", "_on_set", "_value")

    def __init__(self, on_set: Callable[[], None] | None = None) -> None:
        self._event = anyio.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._on_set = on_set

    def set(self, value: Any, error: BaseException | None) -> None:
        self._value, self._error = value, error
        self._event.set()
        if self._on_set is not None:
            self._on_set()

    async def wait(self) -> Any:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._value


class OneShotAppend:
    """An append source holding one batch: how plain ``append()`` calls reach the writer."""

    __slots__ = ("_batch", "_taken", "done", "stream_id")

    def __init__(
        self, stream_id: str, batch: AppendBatch, on_done: Callable[[], None] | None = None
    ) -> None:
        self.stream_id = stream_id
        self._batch: AppendBatch | None = batch
        self._taken: AppendBatch | None = None
        self.done = Completion(on_done)

    def take(self) -> AppendBatch | None:
        """The batch, once."""
        batch, self._batch = self._batch, None
        self._taken = batch
        return batch

    def untake(self) -> None:
        """Hold the batch again: its transaction was rolled back and will be retried."""
        self._batch, self._taken = self._taken, None

    def committed(self, result: AppendResult) -> None:
        """Resolve the waiting ``append()``."""
        self.done.set(result, None)

    def failed(self, error: StoreError) -> None:
        """Fail the waiting ``append()``."""
        self.done.set(None, error)


class Readers:
    """A small pool of read-only connections used from worker threads."""

    def __init__(self, path: str, size: int) -> None:
        self._idle = [connect(path, readonly=True) for _ in range(size)]
        self._limiter = anyio.CapacityLimiter(size)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            conn = self._idle.pop()
            try:
                return fn(conn)
            finally:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._idle.append(conn)

        try:
            return await anyio.to_thread.run_sync(call, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"read failed: {exc}") from exc

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
