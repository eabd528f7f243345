"""Closed streams packed into blocks on Redis: every read, from any offset, with any limit
and byte cap, is the same as before packing, on this node and on any other."""

from __future__ import annotations

import anyio
import pytest

from store import CreateRequest, RedisStore, StreamNotFound
from store._queries import take_within

from .redis_support import RedisServer

WAIT = 20.0


def messages() -> list[bytes]:
    """3,000 messages of mixed sizes (some near 30 KB), so a stream spans many blocks."""
    return [
        (b'{"type":"delta","text":"token %d ' % i)
        + b"x" * (i % 97)
        + ("é" * (i % 5)).encode()
        + (b"y" * 30_000 if i % 500 == 7 else b"")
        + b'"}'
        for i in range(3000)
    ]


async def packed(store: RedisStore, count: int) -> None:
    """Until ``store`` has packed ``count`` messages."""
    with anyio.fail_after(WAIT):
        while True:
            if store.stats["messages_compacted"] >= count:
                return
            await anyio.sleep(0.05)


async def test_a_packed_stream_reads_exactly_as_before_from_any_offset(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    written = messages()
    async with RedisStore(redis_server.url, prefix=redis_prefix, pack_delay=0) as store:
        await store.create_stream("s")
        for start in range(0, len(written), 500):
            await store.append("s", written[start : start + 500])
        await store.close_stream("s")
        await packed(store, len(written))
        client = store.client
        assert not await client.exists(redis_prefix + "m:s")
        assert await client.exists(redis_prefix + "mb:s")
    # A node that never held the stream: every read comes from the blocks.
    async with RedisStore(redis_server.url, prefix=redis_prefix) as other:
        assert await other.stream_length("s") == (len(written), True)
        for offset in (0, 1, 99, 500, 1499, 2998, 2999, 3000, 3001):
            for limit in (1, 7, 4096):
                for max_bytes in (None, 1, 10_000, 200_000):
                    got = await other.read("s", offset, limit=limit, max_bytes=max_bytes)
                    expected = written[offset : offset + limit]
                    if max_bytes is not None:
                        expected, _ = take_within(expected, max_bytes)
                    assert len(got.messages) <= len(expected)
                    assert got.messages == expected[: len(got.messages)], (offset, limit)
                    assert got.messages or offset >= len(written)
                    reached = offset + len(got.messages) >= len(written)
                    assert got.at_end == reached, (offset, limit, max_bytes)
        # Followed from the start, it gives every message once, then ends.
        followed: list[bytes] = []
        async for read in other.follow("s", 0, max_bytes=128 * 1024):
            followed += read.messages
        assert followed == written
        await other.delete_stream("s")
        assert not await other.client.exists(redis_prefix + "mb:s", redis_prefix + "mbi:s")
        with pytest.raises(StreamNotFound):
            await other.read("s", 0)


async def test_a_fork_of_a_packed_stream_cuts_a_message_and_reads_across(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with RedisStore(redis_server.url, prefix=redis_prefix, pack_delay=0) as store:
        source = CreateRequest(content_type="text/plain", payloads=[b"hello world"])
        _, info = await store.create_named(None, "src", source, now=0.0, touched={})
        for part in (b" and more", b" and the end"):
            await store.append_named(
                None,
                "src",
                content_type="text/plain",
                payload=part,
                close=part.endswith(b"end"),
                seq=None,
                producer=None,
                now=0.0,
                touched={},
            )
        await packed(store, 3)
        fork = CreateRequest(forked_from="src", fork_offset=1, fork_sub_offset=4)
        _, forked = await store.create_named(None, "fork", fork, now=0.0, touched={})
        assert forked.segments == ((info.stream_id, 0), (forked.stream_id, 1))
        assert (await store.read(info.stream_id, 0)).messages == [
            b"hello world",
            b" and more",
            b" and the end",
        ]
        assert (await store.read(forked.stream_id, 1)).messages == [b" and"]


async def test_a_node_packs_at_start_what_was_closed_and_left_unpacked(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """Closed streams left as lists (their node stopped before packing) are found by the
    next node's start-up scan and packed."""
    async with RedisStore(redis_server.url, prefix=redis_prefix, pack_delay=3600) as first:
        for i in range(30):
            await first.create_stream(f"s{i}")
            await first.append(f"s{i}", [b"a", b"b"], close=True)
        # Its own start-up scan may have caught a stream or two closing; not the rest.
        left = 60 - first.stats["messages_compacted"]
        assert left > 0
    async with RedisStore(redis_server.url, prefix=redis_prefix) as second:
        await packed(second, left)
        lists = [key async for key in second.client.scan_iter(match=redis_prefix + "m:*")]
        assert lists == []
        read = await second.read("s7", 0)
        assert (read.messages, read.at_end) == ([b"a", b"b"], True)
