"""The Redis store's in-memory tails: what a node's flusher wrote is read from memory, and a
write by anyone else (another node, or this node outside its flusher) is never hidden."""

from __future__ import annotations

import anyio
import pytest

from store import RedisStore, StreamNotFound

from .redis_support import RedisServer

WAIT = 10.0


async def test_a_tail_serves_this_node_s_writes_and_gives_way_to_another_node_s(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with (
        RedisStore(redis_server.url, prefix=redis_prefix) as one,
        RedisStore(redis_server.url, prefix=redis_prefix) as two,
    ):
        await one.create_stream("s")
        await one.append("s", [b"a", b"b"])
        assert one.stats["live_streams"] == 1  # held in one's tail
        assert (await one.read("s", 1)).messages == [b"b"]
        changed = one.change_event("s")
        await two.append("s", [b"c"], close=True)  # not through one's flusher
        with anyio.fail_after(WAIT):
            await changed.wait()
        read = await one.read("s", 0)
        assert read.messages == [b"a", b"b", b"c"]
        assert read.at_end
        assert one.stats["live_streams"] == 0  # the tail was dropped, not patched


async def test_a_tail_says_at_end_only_after_this_node_closed_the_stream(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with RedisStore(redis_server.url, prefix=redis_prefix) as store:
        await store.create_stream("s")
        await store.append("s", [b"a"])
        assert not (await store.read("s", 0)).at_end
        await store.append("s", [b"b"], close=True)
        read = await store.read("s", 0)
        assert (read.messages, read.at_end) == ([b"a", b"b"], True)
        assert not (await store.read("s", 0, limit=1)).at_end
        assert (await store.read("s", 0, from_disk=True)).messages == [b"a", b"b"]


async def test_closing_or_deleting_outside_the_flusher_drops_the_tail(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with RedisStore(redis_server.url, prefix=redis_prefix) as store:
        await store.create_stream("s")
        await store.append("s", [b"a"])
        await store.close_stream("s")
        assert (await store.read("s", 0)).at_end
        await store.delete_stream("s")
        assert store.stats["live_streams"] == 0


async def test_reading_a_deleted_stream_is_not_found_even_just_after_writing_it(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with RedisStore(redis_server.url, prefix=redis_prefix) as store:
        await store.create_stream("s")
        await store.append("s", [b"a"])
        await store.delete_stream("s")
        with pytest.raises(StreamNotFound):
            await store.read("s", 0)
