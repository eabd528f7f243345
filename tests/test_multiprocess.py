"""Two server processes on one database file."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from .conftest import DEFAULT_ARGS, ServerFactory
from .support import (
    Server,
    final_status,
    read_events,
    simulated_answer,
    start_generation,
    text_of,
    wait_for_status,
)


@pytest.fixture
def peers(server_factory: ServerFactory) -> tuple[Server, Server]:
    """Two servers on one database file."""
    first = server_factory(*DEFAULT_ARGS)
    return first, server_factory(*DEFAULT_ARGS, db=first.db)


@pytest.fixture
async def peer_clients(
    peers: tuple[Server, Server],
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """A client for each of ``peers``."""
    first, second = peers
    async with (
        httpx.AsyncClient(base_url=first.url, timeout=30) as one,
        httpx.AsyncClient(base_url=second.url, timeout=30) as two,
    ):
        yield one, two


async def test_a_second_process_follows_a_generation_the_first_is_running(
    peer_clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = peer_clients
    generation = await start_generation(
        one, prompt="shared", params={"tokens_per_second": 50, "max_tokens": 50}
    )
    gid = generation["id"]
    # The follower joins while the generation is live, resumes part-way through, and
    # sees every later event as it is committed by the other process.
    early = await read_events(two, gid, max_events=3)
    assert (await two.get(f"/v1/generations/{gid}")).json()["status"] == "running"
    rest = await read_events(two, gid, headers={"Last-Event-ID": early[-1].id})
    assert final_status(rest) == "completed"
    snapshot = await wait_for_status(one, gid, {"completed"})
    assert text_of(early + rest) == snapshot["text"]
    assert [int(e.id) for e in early + rest] == list(range(1, snapshot["next_offset"] + 1))
    # The second process did not take the live generation for a dead one.
    assert snapshot["error"] is None


async def test_cancel_through_the_other_process(
    peer_clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    one, two = peer_clients
    generation = await start_generation(
        one, prompt="remote", params={"tokens_per_second": 20, "max_tokens": 1000}
    )
    await read_events(two, generation["id"], max_events=2)
    response = await two.post(f"/v1/generations/{generation['id']}/cancel")
    assert response.status_code == 200
    snapshot = await wait_for_status(one, generation["id"], {"cancelled"}, timeout=15)
    assert snapshot["text"]
    assert final_status(await read_events(two, generation["id"])) == "cancelled"


async def test_the_survivor_recovers_a_dead_peers_generations(
    server_factory: ServerFactory,
) -> None:
    first = server_factory(*DEFAULT_ARGS)
    second = server_factory(*DEFAULT_ARGS, db=first.db)
    params = {"tokens_per_second": 20, "max_tokens": 80}
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as two:
        async with httpx.AsyncClient(base_url=first.url, timeout=30) as one:
            generation = await start_generation(one, prompt="orphan", params=params)
            await read_events(two, generation["id"], max_events=2)
        first.kill()
        # The survivor's heartbeat sweep notices the dead pid, takes the generation over
        # and continues it from its committed text.
        snapshot = await wait_for_status(two, generation["id"], {"completed"}, timeout=15)
        events = await read_events(two, generation["id"])
        assert final_status(events) == "completed"
        assert [e.event for e in events].count("resumed") == 1
        assert text_of(events) == snapshot["text"] == simulated_answer("orphan", **params)


async def test_a_durable_stream_appended_through_both_processes(
    peer_clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    """Appends alternate between the processes; each reads exactly what both wrote, and a
    long-poll waiting in one is woken by an append through the other."""
    one, two = peer_clients
    url = "/v1/stream/shared-by-two"
    assert (await one.put(url, headers={"Content-Type": "text/plain"})).status_code == 201
    expected = b""
    for i in range(20):
        writer, reader = (one, two) if i % 2 else (two, one)
        response = await writer.post(
            url, content=b"%d;" % i, headers={"Content-Type": "text/plain"}
        )
        assert response.status_code == 204, response.text
        expected += b"%d;" % i
        assert response.headers["Stream-Next-Offset"].endswith(f"{i + 1:016d}")
        # The other process appended last; this one must read it, not its own older tail.
        read = await reader.get(url, params={"offset": "-1"})
        assert read.content == expected
        assert read.headers["Stream-Next-Offset"] == response.headers["Stream-Next-Offset"]
    tail = read.headers["Stream-Next-Offset"]
    async with anyio.create_task_group() as tg:
        polled: list[httpx.Response] = []

        async def poll() -> None:
            polled.append(await one.get(url, params={"offset": tail, "live": "long-poll"}))

        tg.start_soon(poll)
        await anyio.sleep(0.3)  # the long-poll is waiting in process one
        await two.post(url, content=b"late", headers={"Content-Type": "text/plain"})
    assert polled[0].status_code == 200
    assert polled[0].content == b"late"
