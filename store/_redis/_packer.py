"""Closed streams, packed: a node moves the messages of a stream it saw close from their list
into zlib blocks (``store/_blocks.py``'s format, each prefixed with its message count), so a
finished answer takes a fraction of the memory in Redis. The ``PACK`` script swaps list for
blocks only if the stream is still exactly as read; reads then decode the blocks
(``unpack_reply``) and offsets, limits and ``at_end`` are unchanged.

Streams are packed ``PACK_DELAY`` after they close (their live followers read their end
from the node's tails meanwhile), one at a time, and on start a scan finds the closed
streams a node that died left unpacked.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.exceptions import RedisError

from .. import _blocks as blocks
from .._exceptions import StoreError
from ._codec import Arg, names

logger = logging.getLogger("keepstream.store.redis")

PACK_DELAY = 2.0
READ_BATCH = 4096
SCAN_COUNT = 1000
_COUNT = struct.Struct("<I")


def pack_block(messages: list[bytes]) -> bytes:
    """One stored block: its message count, then the compressed messages."""
    return _COUNT.pack(len(messages)) + blocks.pack(messages)


def unpack_reply(pairs: list[Any]) -> list[tuple[int, list[bytes]]]:
    """``(first offset, messages)`` of the blocks a packed read returned."""
    found = []
    for first, stored in zip(pairs[::2], pairs[1::2], strict=True):
        (count,) = _COUNT.unpack_from(stored)
        found.append((int(first), blocks.unpack(stored[_COUNT.size :], count)))
    return found


Read = Callable[[str, int], Awaitable[list[bytes]]]
Run = Callable[..., Awaitable[Any]]


class Packer:
    """Packs the streams it is told have closed, ``delay`` seconds later."""

    def __init__(
        self,
        client: Callable[[], Redis],
        prefix: str,
        read: Read,
        pack: Run,
        *,
        delay: float = PACK_DELAY,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._read = read
        self._pack = pack
        self._delay = delay
        self._due: OrderedDict[str, float] = OrderedDict()  # by closing time
        self._wake = anyio.Event()
        self.packed = 0  # messages moved into blocks

    def closed(self, stream_id: str) -> None:
        """``stream_id`` was closed: pack it once ``delay`` has passed."""
        self._due.setdefault(stream_id, time.monotonic() + self._delay)
        self._wake.set()

    async def run(self) -> None:
        """Pack forever (cancel to stop): first what a scan finds, then as streams close."""
        await self._scan()
        while True:
            if not self._due:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            stream_id, at = next(iter(self._due.items()))
            wait = at - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
                continue
            del self._due[stream_id]
            try:
                await self.pack(stream_id)
            except (StoreError, RedisError, OSError) as exc:
                logger.warning("packing stream %s failed (%s); it stays a list", stream_id, exc)

    async def pack(self, stream_id: str) -> bool:
        """Pack one closed stream now; whether it did (it may be gone, open, or packed)."""
        state = await self._client().hmget(
            self._prefix + "s:" + stream_id, ["closed", "next", "base", "packed"]
        )
        closed, next_raw, base_raw, packed = state
        if closed != b"1" or packed == b"1" or next_raw is None:
            return False
        next_offset, base = int(next_raw), int(base_raw or 0)
        messages: list[bytes] = []
        offset = base
        while offset < next_offset:
            got = await self._read(stream_id, offset)
            if not got:
                return False
            messages += got
            offset += len(got)
        args: list[Arg] = []
        for first, run in blocks.runs(enumerate(messages, base)):
            args += [first, pack_block(run)]
        done = bool(await self._pack(stream_id, next_offset, len(args) // 2, *args))
        if done:
            self.packed += len(messages)
        return done

    async def _scan(self) -> None:
        """Queue the closed streams no node packed (their node died first)."""
        client = self._client()
        pattern = self._prefix + "s:*"
        cursor = 0
        try:
            while True:  # a page of keys, then their states in one round trip
                cursor, found = await client.scan(cursor, match=pattern, count=SCAN_COUNT)
                keys = names(found)
                async with client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hmget(key, ["closed", "packed"])
                    states = await pipe.execute()
                for key, (closed, packed) in zip(keys, states, strict=True):
                    if closed == b"1" and packed != b"1":
                        self._due[key[len(self._prefix) + 2 :]] = time.monotonic()
                if cursor == 0:
                    return
        except (RedisError, OSError) as exc:  # a scan is best effort
            logger.warning("scanning for streams to pack failed (%s)", exc)
