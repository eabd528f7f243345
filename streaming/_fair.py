"""FairSlots: a counting semaphore that hands freed slots to waiting owners in turn.

A plain FIFO semaphore lets one user with 500 queued generations delay every other user's
one; here each owner has its own queue and a freed slot goes to the next owner in
round-robin order, so one waiting generation of another user starts after at most one of
the busy user's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

import anyio
import anyio.lowlevel


class FairSlots:
    """``capacity`` slots shared fairly between owners (round-robin over their queues)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._free = capacity
        # Owners with waiters, in turn order: the first one gets the next freed slot and
        # then goes to the back if it still has waiters.
        self._queues: dict[Hashable, deque[anyio.Event]] = {}

    @property
    def waiting(self) -> int:
        """Acquirers waiting for a slot."""
        return sum(len(queue) for queue in self._queues.values())

    async def acquire(self, owner: Hashable) -> None:
        """Wait for a slot for ``owner``. Cancellation while waiting gives up the place (or
        passes on a slot that was handed over at that very moment)."""
        if self._free and not self._queues:
            self._free -= 1
            await anyio.lowlevel.checkpoint()
            return
        handed = anyio.Event()
        self._queues.setdefault(owner, deque()).append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self.release()
            else:
                self._forget(owner, handed)
            raise

    def release(self) -> None:
        """Free a slot: hand it to the owner whose turn it is, if anyone waits."""
        if not self._queues:
            self._free += 1
            return
        owner = next(iter(self._queues))
        queue = self._queues.pop(owner)
        handed = queue.popleft()
        if queue:
            self._queues[owner] = queue  # to the back of the turn order
        handed.set()

    def _forget(self, owner: Hashable, handed: anyio.Event) -> None:
        queue = self._queues.get(owner)
        if queue is None:
            return
        try:
            queue.remove(handed)
        except ValueError:
            return
        if not queue:
            del self._queues[owner]
