"""What this process keeps in memory of the streams it writes."""

from __future__ import annotations

import anyio


class StreamState:
    """What this process knows of a stream it writes: recent messages and a wake-up event.

    Only streams this process appended to have a state, for as long as they are appended to
    or waited on (see ``StreamStore._sweep``); a closed one for ``CLOSED_GRACE`` more. Their
    committed length is known exactly, whether or not the tail holds any messages: the tail
    is capped per stream and by the store's budget for all tails, and older offsets are read
    from SQLite. The event is *replaced* on every commit: a reader takes the current one
    before it reads, so a commit between its read and its wait still wakes it. It is made
    only once a reader asks for it: most streams written are never followed live.
    """

    __slots__ = ("closed", "event", "swept_at", "tail", "tail_bytes", "tail_start")

    def __init__(self, tail_start: int, now: float) -> None:
        self.tail: list[bytes] = []
        self.tail_bytes = 0
        self.tail_start = tail_start
        self.closed = False
        self.event: anyio.Event | None = None
        self.swept_at = now  # the last append, or the last sweep that found a reader waiting

    @property
    def next_offset(self) -> int:
        return self.tail_start + len(self.tail)

    def extend(self, payloads: list[bytes], *, max_messages: int, max_bytes: int) -> int:
        """Add committed messages, dropping the oldest half once a cap is passed; return by
        how many bytes the tail grew (or shrank)."""
        before = self.tail_bytes
        self.tail.extend(payloads)
        self.tail_bytes += sum(map(len, payloads))
        if len(self.tail) > max_messages or self.tail_bytes > max_bytes:
            drop = max(len(self.tail) // 2, len(self.tail) - max_messages // 2)
            self.tail_bytes -= sum(map(len, self.tail[:drop]))
            del self.tail[:drop]
            self.tail_start += drop
        return self.tail_bytes - before

    def empty(self) -> int:
        """Drop the whole tail (the length stays known); return the bytes freed."""
        freed = self.tail_bytes
        self.tail_start = self.next_offset
        self.tail = []
        self.tail_bytes = 0
        return freed

    def change_event(self) -> anyio.Event:
        """The event the next commit sets (made now if nobody asked since the last one)."""
        if self.event is None:
            self.event = anyio.Event()
        return self.event

    def wake(self) -> None:
        """Wake whoever holds the event; the next reader gets a new one."""
        if self.event is not None:
            self.event.set()
            self.event = None

    def waited_on(self) -> bool:
        """Whether a reader is waiting on the event right now."""
        return self.event is not None and self.event.statistics().tasks_waiting > 0
