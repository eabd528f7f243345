"""The recent messages of the streams this node writes, kept in memory so its readers do not
ask Redis for what it has just written.

A tail holds exactly what this node's flusher committed, at the offsets Redis gave: offsets
never change once written, so whatever a tail holds is right. It may lack what another node
wrote since; every such write reaches this node on the ``changes`` channel, and so does
every write this node makes outside its flusher (a close, a delete, a final event written
for another worker): each drops the stream's tail, and readers read Redis again. A tail
says a stream is at its end only when this node's own commit closed it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .._queries import take_within
from ..types import ReadResult

DEFAULT_TAIL_MESSAGES = 4096
# A closed stream's tail stays this long, for the readers that were following it.
CLOSED_GRACE = 2.0


@dataclass(slots=True)
class Tail:
    """A stream's last messages, from ``start``."""

    start: int
    messages: list[bytes] = field(default_factory=list)
    size: int = 0
    closed_at: float | None = None

    @property
    def next_offset(self) -> int:
        """The offset after the last message held."""
        return self.start + len(self.messages)


class Tails:
    """Tails of the streams this node's flusher writes, within ``max_bytes`` in all (least
    recently written emptied first) and ``max_messages`` each."""

    def __init__(self, max_bytes: int, max_messages: int = DEFAULT_TAIL_MESSAGES) -> None:
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.bytes = 0
        self._tails: OrderedDict[str, Tail] = OrderedDict()  # least recently written first
        self._closed: OrderedDict[str, float] = OrderedDict()  # by closing time

    def __len__(self) -> int:
        return len(self._tails)

    def committed(self, stream_id: str, first: int, payloads: list[bytes], closed: bool) -> None:
        """This node's flusher committed ``payloads`` at ``first`` (and closed the stream)."""
        tail = self._tails.get(stream_id)
        if tail is None or tail.next_offset != first or tail.closed_at is not None:
            self.drop(stream_id)  # not a continuation of what is held: start again here
            tail = self._tails[stream_id] = Tail(first)
        self._tails.move_to_end(stream_id)
        tail.messages.extend(payloads)
        added = sum(map(len, payloads))
        tail.size += added
        self.bytes += added
        while len(tail.messages) > self.max_messages:
            dropped = tail.messages.pop(0)
            tail.start += 1
            tail.size -= len(dropped)
            self.bytes -= len(dropped)
        if closed:
            tail.closed_at = self._closed[stream_id] = time.monotonic()
        self._trim()

    def drop(self, stream_id: str) -> None:
        """Forget a stream's tail (someone else wrote it, or it was closed or deleted)."""
        tail = self._tails.pop(stream_id, None)
        if tail is not None:
            self.bytes -= tail.size
            self._closed.pop(stream_id, None)

    def clear(self) -> None:
        """Forget every tail (change messages may have been missed)."""
        self._tails.clear()
        self._closed.clear()
        self.bytes = 0

    def read(
        self, stream_id: str, offset: int, limit: int, max_bytes: int | None
    ) -> ReadResult | None:
        """Messages from ``offset`` out of the tail, or ``None`` when it does not hold them."""
        tail = self._tails.get(stream_id)
        if tail is None or not tail.start <= offset <= tail.next_offset:
            return None
        start = offset - tail.start
        messages = tail.messages[start : start + limit]
        cut = False
        if max_bytes is not None:
            messages, cut = take_within(messages, max_bytes)
        at_end = (
            tail.closed_at is not None and not cut and offset + len(messages) == tail.next_offset
        )
        return ReadResult(offset, messages, at_end)

    def _trim(self) -> None:
        """Within the byte budget, and closed tails gone after their grace."""
        while self._tails and self.bytes > self.max_bytes:
            self.drop(next(iter(self._tails)))
        now = time.monotonic()
        while self._closed:
            stream_id, at = next(iter(self._closed.items()))
            if now - at <= CLOSED_GRACE:
                break
            self.drop(stream_id)
