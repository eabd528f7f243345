"""Following a stream as it grows, over any backend's ``read`` and ``change_event``."""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Awaitable
from typing import Protocol

import anyio

from .types import ReadResult


class Read(Protocol):
    """A backend's ``read``."""

    def __call__(self, stream_id: str, offset: int, *, max_bytes: int) -> Awaitable[ReadResult]:
        """Committed messages from ``offset``."""
        ...


class ChangeEvent(Protocol):
    """A backend's ``change_event``."""

    def __call__(self, stream_id: str) -> anyio.Event:
        """The event the next commit touching ``stream_id`` sets."""
        ...


async def follow_stream(
    read: Read,
    change_event: ChangeEvent,
    stream_id: str,
    offset: int,
    *,
    max_bytes: int,
    deadline: float = math.inf,
    max_wait: float = math.inf,
) -> AsyncGenerator[ReadResult, None]:
    """Reads of ``stream_id`` from ``offset`` as it is and as it grows: each read of at most
    about ``max_bytes`` that brings messages (and the first one, even empty), until the
    stream is closed and read to its end, or ``deadline`` (``anyio.current_time()``) passes.

    Between reads it waits for the stream's next commit (``change_event``, taken before
    each read, so no wake-up is lost), or ``max_wait`` at most; nothing is read that is not
    committed. ``read`` raises ``StreamNotFound``.
    """
    first = True
    while anyio.current_time() < deadline:
        changed = change_event(stream_id)
        result = await read(stream_id, offset, max_bytes=max_bytes)
        if result.messages or first or result.at_end:
            yield result
        first = False
        offset = result.next_offset
        if result.at_end:
            return
        if not result.messages:
            with anyio.move_on_after(min(deadline - anyio.current_time(), max_wait)):
                await changed.wait()
