"""Following a generation's stream as Server-Sent Events.

A follower is a cursor: it reads everything committed after its offset, writes it as *one*
chunk of pre-formatted events (one socket write per wake-up, however many events), then
waits for the stream's next commit. Each event's ``id:`` is the offset *after* it, so a
browser's automatic ``Last-Event-ID`` is exactly where to resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import aclosing

from store import StreamBackend, StreamNotFound
from streaming import decode_event, encode_event

# One write to a client carries at most about this much: a reader that falls behind costs
# one bounded chunk of memory, and a send timeout can cut off a client that stopped reading.
CHUNK_BYTES = 64 * 1024
# One read from the store takes at most about this much (a single larger message excepted):
# with the chunk being written, a reader never holds more than about 192 KiB.
READ_BYTES = 128 * 1024
FRAME_OVERHEAD = 32  # "id: …\nevent: …\ndata: " and the blank line, roughly

_DELTA_PREFIX = b'{"type":"delta"'
_STATUS_PREFIX = b'{"type":"status"'


def event_name(payload: bytes) -> str:
    """The SSE ``event:`` name of a stored event."""
    if payload.startswith(_DELTA_PREFIX):
        return "delta"
    if payload.startswith(_STATUS_PREFIX):
        return "status"
    kind = json.loads(payload).get("type")
    return kind if isinstance(kind, str) and kind.isidentifier() else "message"


def format_events(first_offset: int, payloads: list[bytes], *, id_prefix: bytes = b"") -> bytes:
    """SSE frames for consecutive messages starting at ``first_offset``; each ``id:`` is
    ``id_prefix`` and the offset after the event."""
    parts: list[bytes] = []
    for i, payload in enumerate(payloads, start=first_offset + 1):
        # Stored events are compact JSON: no raw CR or LF can break the ``data:`` line.
        parts.append(
            b"id: %s%d\nevent: %s\ndata: %s\n\n"
            % (id_prefix, i, event_name(payload).encode(), payload)
        )
    return b"".join(parts)


def batched_writes(frames: Iterable[bytes]) -> Iterator[bytes]:
    """Formatted SSE ``frames`` joined into writes of about ``CHUNK_BYTES`` each (a single
    larger frame alone): for the views that translate stored events into their own frames."""
    batch: list[bytes] = []
    size = 0
    for frame in frames:
        if batch and size + len(frame) > CHUNK_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
        batch.append(frame)
        size += len(frame)
    if batch:
        yield b"".join(batch)


def _chunk_sizes(payloads: list[bytes]) -> list[int]:
    """How many consecutive payloads go into each write of about ``CHUNK_BYTES``."""
    sizes: list[int] = []
    count = size = 0
    for payload in payloads:
        if count and size + len(payload) > CHUNK_BYTES:
            sizes.append(count)
            count = size = 0
        count += 1
        size += len(payload) + FRAME_OVERHEAD
    if count:
        sizes.append(count)
    return sizes


def trim_delta(payload: bytes, skip_chars: int) -> bytes:
    """A delta event without its first ``skip_chars`` characters (for ``text_offset``)."""
    event = decode_event(payload)
    event["text"] = event["text"][skip_chars:]
    return encode_event(event)


async def follow(
    store: StreamBackend,
    stream_id: str,
    offset: int,
    *,
    skip_chars: int = 0,
    retry_ms: int | None = None,
    id_prefix: bytes = b"",
    deadline: float = math.inf,
) -> AsyncIterator[bytes]:
    """SSE chunks from ``offset`` until the stream is closed and fully sent, or until
    ``deadline`` (``anyio.current_time()``) passes between two chunks: the client then
    reconnects from its last event id.

    Ends quietly if the stream is deleted. Waiting costs nothing per reader beyond one
    event wait; the wait is woken only after a commit.
    """
    if retry_ms is not None:
        yield b"retry: %d\n\n" % retry_ms
    reads = store.follow(stream_id, offset, max_bytes=READ_BYTES, deadline=deadline)
    try:
        async with aclosing(reads):
            async for result in reads:
                payloads = result.messages
                if skip_chars and payloads:
                    payloads = [trim_delta(payloads[0], skip_chars), *payloads[1:]]
                    skip_chars = 0
                for count in _chunk_sizes(payloads):
                    yield format_events(offset, payloads[:count], id_prefix=id_prefix)
                    offset += count
                    payloads = payloads[count:]
    except StreamNotFound:
        return
