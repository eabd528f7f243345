"""The spine's durability on Redis: a node killed mid-answer, Redis itself killed mid-answer,
and a Redis that would not keep acknowledged writes refused at start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from store import AppendResult, RedisStore

from .conftest import DEFAULT_ARGS, ServerFactory
from .redis_support import RedisServer
from .support import (
    final_status,
    read_events,
    read_raw,
    simulated_answer,
    start_generation,
    text_of,
    wait_for_status,
)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own (it gets killed)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


async def test_a_node_killed_mid_answer_is_continued_by_the_next_one_exactly(
    server_factory: ServerFactory, own_redis: RedisServer
) -> None:
    store = ("--store", own_redis.url)
    node = server_factory(*store, *DEFAULT_ARGS)
    params = {"tokens_per_second": 100, "max_tokens": 300}
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        gid = (await start_generation(http, prompt="node crash", params=params))["id"]
        seen = await read_raw(http, gid, 15)
    node.kill()
    restarted = server_factory(*store, *DEFAULT_ARGS)
    async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as http:
        snapshot = await wait_for_status(http, gid, {"completed"}, timeout=20)
        events = await read_events(http, gid)
    assert [e.event for e in events].count("resumed") == 1
    assert text_of(events) == snapshot["text"] == simulated_answer("node crash", **params)
    assert [int(e.id) for e in events] == list(range(1, snapshot["next_offset"] + 1))
    after = {int(e.id): (e.event, e.data) for e in events}
    assert all(after[i] == (kind, data) for i, kind, data in seen)


async def test_redis_killed_mid_answer_loses_nothing_a_client_saw(
    server_factory: ServerFactory, own_redis: RedisServer
) -> None:
    """SIGKILL redis-server while an answer streams, and start it again on its files: every
    event a client had received is still there at its offset, the node's writes made while
    Redis was down land once it is back (each exactly once), and the answer completes."""
    node = server_factory("--store", own_redis.url, *DEFAULT_ARGS)
    params = {"tokens_per_second": 50, "max_tokens": 200}
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as http:
        gid = (await start_generation(http, prompt="redis crash", params=params))["id"]
        seen = await read_raw(http, gid, 10)
        own_redis.stop()  # SIGKILL: no shutdown, no final fsync
        await anyio.sleep(0.5)  # the model goes on; its deltas wait in the node
        own_redis.start()
        snapshot = await wait_for_status(http, gid, {"completed"}, timeout=30)
        events = await read_events(http, gid)
    statuses = [json.loads(e.data)["status"] for e in events if e.event == "status"]
    assert statuses == ["running", "completed"]
    assert text_of(events) == snapshot["text"] == simulated_answer("redis crash", **params)
    assert [int(e.id) for e in events] == list(range(1, snapshot["next_offset"] + 1))
    after = {int(e.id): (e.event, e.data) for e in events}
    assert all(after[i] == (kind, data) for i, kind, data in seen)
    assert final_status(events) == "completed"
    assert "append to Redis failed" in node.output()  # the outage did hit the node's writes


def test_a_redis_without_an_append_only_file_is_refused_unless_allowed(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    volatile = RedisServer(tmp_path / "volatile").start("--appendonly", "no")
    try:
        with pytest.raises(RuntimeError, match="appendonly is off"):
            server_factory("--store", volatile.url)
        server_factory("--store", volatile.url, "--redis-allow-volatile")
    finally:
        volatile.stop()


async def test_an_append_refused_for_memory_waits_and_lands_once_when_there_is_room(
    own_redis: RedisServer,
) -> None:
    """Redis out of memory (``maxmemory``, ``noeviction``) refuses writes for now: the
    append is held and sent again, and lands exactly once when memory is lifted."""
    async with RedisStore(own_redis.url) as store:
        await store.create_stream("s")
        await store.append("s", [b"before"])
        admin = store.client
        await admin.config_set("maxmemory", "1")
        try:
            landed: list[AppendResult] = []
            async with anyio.create_task_group() as tg:

                async def append() -> None:
                    landed.append(await store.append("s", [b"during"]))

                tg.start_soon(append)
                await anyio.sleep(0.5)
                assert landed == []  # refused for now, held
                assert store.stats["write_retries"] > 0
                await admin.config_set("maxmemory", "0")
        finally:
            await admin.config_set("maxmemory", "0")
        assert landed == [AppendResult(1, 2)]
        assert (await store.read("s", 0)).messages == [b"before", b"during"]
