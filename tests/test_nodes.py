"""Two ``keepstream serve`` nodes on one real Redis: any node serves any reader, a dead node's
generations move to the survivor, and a stalled node that comes back is fenced off."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from .conftest import DEFAULT_ARGS, ServerFactory
from .redis_support import RedisServer
from .support import (
    Server,
    final_status,
    read_events,
    read_raw,
    simulated_answer,
    start_generation,
    text_of,
    wait_for_status,
)

# A short lease, so a stalled node is taken for dead within seconds.
LEASE = 1.5
NODE_ARGS = (*DEFAULT_ARGS, "--heartbeat-interval", "0.2", "--lease-timeout", str(LEASE))


@pytest.fixture
def nodes(
    server_factory: ServerFactory, redis_server: RedisServer, redis_prefix: str
) -> tuple[Server, Server]:
    """Two nodes on the shared Redis, under this test's key prefix."""
    store = ("--store", redis_server.url, "--redis-prefix", redis_prefix)
    return server_factory(*store, *NODE_ARGS), server_factory(*store, *NODE_ARGS)


@pytest.fixture
async def clients(nodes: tuple[Server, Server]) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    """A client for each node."""
    a, b = nodes
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as one,
        httpx.AsyncClient(base_url=b.url, timeout=30) as two,
    ):
        yield one, two


async def test_a_generation_started_on_one_node_is_followed_and_resumed_on_the_other(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = clients
    params = {"tokens_per_second": 50, "max_tokens": 60}
    gid = (await start_generation(one, prompt="across nodes", params=params))["id"]
    early = await read_events(two, gid, max_events=3)
    assert (await two.get(f"/v1/generations/{gid}")).json()["status"] == "running"
    rest = await read_events(two, gid, headers={"Last-Event-ID": early[-1].id})
    assert final_status(rest) == "completed"
    on_a = await read_events(one, gid)
    snapshot = await wait_for_status(two, gid, {"completed"})
    # The same offsets and the same bytes from either node, and no gap at the resume.
    assert [(e.id, e.data) for e in early + rest] == [(e.id, e.data) for e in on_a]
    assert [int(e.id) for e in on_a] == list(range(1, snapshot["next_offset"] + 1))
    assert text_of(on_a) == snapshot["text"] == simulated_answer("across nodes", **params)
    # Sessions too: a conversation made on one node is the same on the other.
    session = (await one.post("/v1/sessions", json={"title": "shared"})).json()
    assert (await two.get(f"/v1/sessions/{session['id']}")).json()["title"] == "shared"


async def test_a_killed_node_s_generations_are_finished_by_the_other_exactly(
    nodes: tuple[Server, Server], clients: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    """SIGKILL node A mid-answer: node B takes every generation of A over and continues it
    from its committed text; every event a client had seen keeps its offset and bytes."""
    a, _ = nodes
    one, two = clients
    params = {"tokens_per_second": 40, "max_tokens": 200}
    prompts = [f"killed {i}" for i in range(4)]
    gids = [(await start_generation(one, prompt=p, params=params))["id"] for p in prompts]
    seen = await read_raw(one, gids[0], 8)
    a.kill()
    with anyio.fail_after(LEASE + 20):
        for gid, prompt in zip(gids, prompts, strict=True):
            snapshot = await wait_for_status(two, gid, {"completed"}, timeout=LEASE + 20)
            events = await read_events(two, gid)
            assert final_status(events) == "completed"
            assert [e.event for e in events].count("resumed") == 1
            assert text_of(events) == snapshot["text"] == simulated_answer(prompt, **params)
            assert [int(e.id) for e in events] == list(range(1, snapshot["next_offset"] + 1))
            if gid == gids[0]:
                after = {int(e.id): (e.event, e.data) for e in events}
                assert all(after[i] == (kind, data) for i, kind, data in seen)


async def test_a_stalled_node_that_comes_back_cannot_write_to_what_was_taken_over(
    nodes: tuple[Server, Server], clients: tuple[httpx.AsyncClient, httpx.AsyncClient]
) -> None:
    """SIGSTOP node A mid-answer: once its lease runs out, B takes the generation over and
    continues it. SIGCONT A while B is still writing: A's next writes (its buffered text, the
    end it tries to record) are refused, so the answer is B's alone, exactly once."""
    a, _ = nodes
    one, two = clients
    params = {"tokens_per_second": 20, "max_tokens": 200}
    gid = (await start_generation(one, prompt="stalled", params=params))["id"]
    await read_raw(two, gid, 4)
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        with anyio.fail_after(LEASE + 15):
            while True:  # B marks the seam when it takes the generation over
                events_so_far = await read_raw(two, gid, 1000, within=0.5)
                if any(kind == "resumed" for _, kind, _ in events_so_far):
                    break
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    snapshot = await wait_for_status(two, gid, {"completed", "interrupted", "failed"}, timeout=30)
    events = await read_events(two, gid)
    statuses = [json.loads(e.data)["status"] for e in events if e.event == "status"]
    assert statuses == ["running", "completed"], statuses
    assert [e.event for e in events].count("resumed") == 1
    assert text_of(events) == snapshot["text"] == simulated_answer("stalled", **params)
    assert [int(e.id) for e in events] == list(range(1, snapshot["next_offset"] + 1))
    # A noticed, and wrote nothing more: its refusal is in its log.
    with anyio.fail_after(10):
        while True:
            if "belongs to another worker" in a.output():
                break
            await anyio.sleep(0.1)


async def test_the_per_user_limit_holds_across_nodes(
    server_factory: ServerFactory, redis_server: RedisServer, redis_prefix: str
) -> None:
    """Two generations of one user on A use up ``max_generations_per_user``: B refuses a
    third (429, naming the limit), and takes one once one has ended."""
    args = (
        *("--store", redis_server.url, "--redis-prefix", redis_prefix, *NODE_ARGS),
        *("--api-keys", "alice=alice-key-0123456789", "--max-generations-per-user", "2"),
    )
    a, b = server_factory(*args), server_factory(*args)
    auth = {"Authorization": "Bearer alice-key-0123456789"}
    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30, headers=auth) as one,
        httpx.AsyncClient(base_url=b.url, timeout=30, headers=auth) as two,
    ):
        long = {"tokens_per_second": 20, "max_tokens": 1000}
        first = await start_generation(one, prompt="one", params=long)
        await start_generation(one, prompt="two", params=long)
        refused = await two.post("/v1/generations", json={"prompt": "three"})
        assert refused.status_code == 429, refused.text
        assert "max_generations_per_user" in refused.text
        assert (await one.post(f"/v1/generations/{first['id']}/cancel")).status_code == 200
        await wait_for_status(two, first["id"], {"cancelled"})
        assert (await two.post("/v1/generations", json={"prompt": "three"})).status_code == 202


async def test_a_cancel_through_the_other_node_stops_the_generation(
    clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = clients
    params = {"tokens_per_second": 20, "max_tokens": 1000}
    gid = (await start_generation(one, prompt="cancel across", params=params))["id"]
    await read_events(two, gid, max_events=2)
    assert (await two.post(f"/v1/generations/{gid}/cancel")).status_code == 200
    snapshot = await wait_for_status(one, gid, {"cancelled"}, timeout=15)
    assert snapshot["text"]
    events = await read_events(two, gid)
    assert final_status(events) == "cancelled"
    assert text_of(events) == snapshot["text"]
