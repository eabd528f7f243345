"""The Durable Streams view of the store: named streams per owner, generations' streams
read-only under their ids, reads across fork chains, and sliding TTLs.

Every check-and-write is the store's (``NamedStreamBackend``: one transaction on SQLite, one
script on Redis); this view adds what the protocol means by a name and by an access.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from store import (
    AppendOutcome,
    CreateRequest,
    GenerationNotFound,
    InvalidFork,
    NamedStreamBackend,
    Producer,
    StoreBackend,
    StreamInfo,
    StreamNotFound,
    StreamReadOnly,
)

GENERATION_PREFIX = "gen_"


class DurableStore(StoreBackend, NamedStreamBackend, Protocol):
    """What the view needs of a store: named streams, plain streams and generations."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """Messages read from ``offset`` up to ``next_offset``.

    ``up_to_date``: nothing committed lies beyond; ``closed``: nothing ever will.
    """

    offset: int
    messages: list[bytes]
    next_offset: int
    up_to_date: bool
    closed: bool


class DurableStreams:
    """The Durable Streams protocol's operations on a store.

    Streams are named per owner; ``gen_…`` names are generations' streams, read-only.
    Reads (not HEAD) and writes slide a stream's TTL: reads only in this process's memory,
    written out by ``sweep()``, which also removes expired streams; any access to an expired
    stream finds it gone at once.
    """

    def __init__(self, store: DurableStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock
        self._touched: dict[str, float] = {}

    # -- reading ------------------------------------------------------------------------------

    async def info(self, owner: str | None, name: str, *, touch: bool = False) -> StreamInfo:
        """A stream's metadata. Raises ``StreamNotFound`` (missing or expired) and
        ``StreamGone`` (soft-deleted)."""
        if name.startswith(GENERATION_PREFIX):
            return await self._generation_info(owner, name)
        now = self._clock()
        info = await self.store.named_info(owner, name, now=now, touched=self._touched)
        if touch and info.ttl is not None:
            self._touched[info.stream_id] = now
        return info

    async def _generation_info(self, owner: str | None, name: str) -> StreamInfo:
        """A generation's stream, as its owner sees it (anyone else: not found)."""
        try:
            record = await self.store.locate_generation(name)
        except GenerationNotFound:
            raise StreamNotFound(name) from None
        if record.owner != owner:
            raise StreamNotFound(name)
        stream_id = record.stream_id
        next_offset, closed = await self.store.stream_length(stream_id)
        return StreamInfo(
            name=name,
            stream_id=stream_id,
            content_type="application/json",
            closed=closed,
            next_offset=next_offset,
            ttl=None,
            expires_at=None,
            expiry_at=None,
            writable=False,
            segments=((stream_id, 0),),
        )

    def touch(self, info: StreamInfo) -> None:
        """Count an access now (a live reader's), sliding a TTL as a read does."""
        if info.ttl is not None:
            self._touched[info.stream_id] = self._clock()

    async def read(self, info: StreamInfo, offset: int, *, limit: int, max_bytes: int) -> Chunk:
        """Messages from ``offset`` on, across the fork chain, within ``limit`` messages and
        about ``max_bytes``."""
        segments = info.segments
        index = max(i for i, (_, base) in enumerate(segments) if base <= offset or i == 0)
        messages: list[bytes] = []
        size = 0
        position = offset
        closed = False
        up_to_date = False
        while len(messages) < limit and size < max_bytes:
            stream_id, _ = segments[index]
            end = segments[index + 1][1] if index + 1 < len(segments) else None
            if end is not None and position >= end:
                index += 1
                continue
            wanted = limit - len(messages)
            result = await self.store.read(
                stream_id, position, limit=wanted, max_bytes=max_bytes - size
            )
            if end is None and len(result.messages) < wanted and not result.at_end:
                if result.next_offset < info.next_offset:
                    # Short of the committed length: another process appended, and this
                    # one's in-memory tail (SQLite's) has not heard yet.
                    result = await self.store.read(
                        stream_id,
                        position,
                        limit=wanted,
                        max_bytes=max_bytes - size,
                        from_disk=True,
                    )
            got = result.messages if end is None else result.messages[: end - position]
            messages += got
            size += sum(map(len, got))
            position += len(got)
            if end is None:
                closed = result.at_end
                # Nothing returned means the tail; otherwise a cap may have cut the read.
                up_to_date = closed or not got
                if not up_to_date:
                    length, _ = await self.store.stream_length(stream_id)
                    up_to_date = position >= length
                break
            if not got:
                break
        return Chunk(offset, messages, position, up_to_date, closed)

    def change_event(self, info: StreamInfo) -> anyio.Event:
        """Set by the next commit to the stream itself (its sources' appends are not its)."""
        return self.store.change_event(info.stream_id)

    # -- writing ------------------------------------------------------------------------------

    async def create(
        self, owner: str | None, name: str, request: CreateRequest
    ) -> tuple[bool, StreamInfo]:
        """Create a stream, or find it already there with the same configuration.

        Returns ``(created, info)``. Raises ``ConfigConflict``, ``ContentTypeMismatch``,
        ``InvalidFork``, ``StreamNotFound`` (a missing fork source), ``StreamReadOnly``.
        """
        if name.startswith(GENERATION_PREFIX):
            raise StreamReadOnly(name)
        if request.forked_from is not None and request.forked_from.startswith(GENERATION_PREFIX):
            raise InvalidFork("a generation's stream cannot be forked")
        return await self.store.create_named(
            owner, name, request, now=self._clock(), touched=dict(self._touched)
        )

    async def append(
        self,
        owner: str | None,
        name: str,
        *,
        content_type: str | None,
        payload: bytes | None,
        close: bool = False,
        seq: str | None = None,
        producer: Producer | None = None,
    ) -> AppendOutcome:
        """Append one message (``payload``; ``None`` to only close) to a named stream, in one
        write: finding the stream (and expiring it if due) with every check and with closing.

        Raises ``StreamClosed``, ``ContentTypeMismatch``, ``SeqConflict``, ``StaleEpoch``,
        ``SeqGap``, ``EpochSeq``, ``StreamNotFound``, ``StreamGone``, ``StreamReadOnly``.
        """
        if name.startswith(GENERATION_PREFIX):
            await self.info(owner, name)  # a missing one is not found before it is read-only
            raise StreamReadOnly(name)
        # The store reads the access times it needs from the live mapping (``get`` is atomic)
        # instead of a copy of them all, which would cost every append the number of streams.
        return await self.store.append_named(
            owner,
            name,
            content_type=content_type,
            payload=payload,
            close=close,
            seq=seq,
            producer=producer,
            now=self._clock(),
            touched=self._touched,
        )

    async def delete(self, info: StreamInfo) -> None:
        """Delete a stream: soft-delete it while forks read it. Raises ``StreamNotFound``,
        ``StreamGone``, ``StreamReadOnly``."""
        if not info.writable:
            raise StreamReadOnly(info.name)
        await self.store.delete_named(info)
        self._touched.pop(info.stream_id, None)

    async def sweep(self) -> int:
        """Write out the TTLs that reads slid, and remove the streams that expired.

        Returns how many expired.
        """
        touched = dict(self._touched)
        expired = await self.store.sweep_named(now=self._clock(), touched=touched)
        # Forget only what is now on disk: until the commit, readers still need it in memory.
        for stream_id, at in touched.items():
            if self._touched.get(stream_id) == at:
                del self._touched[stream_id]
        return expired
