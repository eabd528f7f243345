"""One user cannot take everything: per-user bounds on generations and open event streams
(clear 429s naming the limit), and queued work scheduled round-robin across users."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import httpx
import pytest
from sqlite_utils import Database

from store import StreamStore
from store._schema import connect, migrations
from streaming import GenerationPool, GenerationRequest, SimulatedProvider
from streaming._fair import FairSlots

from .conftest import ServerFactory
from .support import Server

TIMEOUT = 30.0
KEYS = {user: f"sk-{user}-0123456789abcdef" for user in ("hog", "other")}
KEY_ARGS = ("--api-keys", ",".join(f"{user}={key}" for user, key in KEYS.items()))


async def test_freed_slots_go_round_robin_over_owners() -> None:
    slots = FairSlots(1)
    granted: list[str] = []

    async def take(owner: str, hold: anyio.Event) -> None:
        await slots.acquire(owner)
        granted.append(owner)
        await hold.wait()
        slots.release()

    holds = [anyio.Event() for _ in range(8)]
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            for i in range(6):  # the hog queues six (the first takes the slot at once)
                tg.start_soon(take, "hog", holds[i])
                await anyio.lowlevel.checkpoint()
            tg.start_soon(take, "other", holds[6])
            tg.start_soon(take, "third", holds[7])
            await anyio.sleep(0.05)
            for hold in holds:  # let each holder go in turn
                while not hold.is_set():
                    hold.set()
                    await anyio.sleep(0.01)
    assert granted[:4] == ["hog", "hog", "other", "third"]
    assert granted.count("hog") == 6 and slots.waiting == 0


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    slots = FairSlots(1)
    await slots.acquire("a")
    with anyio.move_on_after(0.05):
        await slots.acquire("b")
    assert slots.waiting == 0
    slots.release()
    with anyio.fail_after(1):
        await slots.acquire("c")  # the slot was not lost to the cancelled waiter


async def test_another_users_generation_does_not_wait_behind_a_hogs_queue(
    tmp_path: Path,
) -> None:
    """One slot; a user queues 20 generations, then another user queues one: it runs
    second, not twenty-first."""
    provider = SimulatedProvider(tokens_per_second=100, max_tokens=20)  # 0.2 s each
    async with StreamStore(str(tmp_path / "s.db"), flush_interval=0.002) as store:
        pool = GenerationPool(
            store, {"simulated": provider}, default_provider="simulated", max_running=1
        )
        async with pool:
            request = GenerationRequest.from_json({"prompt": "x"})
            hogs = [await pool.submit(request, owner="hog") for _ in range(20)]
            other = await pool.submit(request, owner="other")
            with anyio.fail_after(TIMEOUT):
                while (await pool.get(other.id)).status != "completed":  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            started = {r.id: (await pool.get(r.id)).started_at for r in [*hogs, other]}
            for hog in hogs:
                await pool.cancel(hog.id)
    other_start = started[other.id]
    assert other_start is not None
    before_other = [h for h in hogs if (started[h.id] or float("inf")) < other_start]
    # Those that had started when it was queued (one, unless submitting took longer than an
    # answer, on a busy machine), and the hog's next in turn at most.
    already = [h for h in hogs if (started[h.id] or float("inf")) < other.created_at]
    assert len(already) <= len(before_other) <= len(already) + 1, (already, before_other)


async def open_clients(stack: AsyncExitStack, server: Server) -> dict[str, httpx.AsyncClient]:
    """A client of ``server`` for each user, closed with ``stack``."""
    return {
        user: await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=server.url, timeout=TIMEOUT, headers={"Authorization": f"Bearer {key}"}
            )
        )
        for user, key in KEYS.items()
    }


@pytest.fixture
async def clients(server_factory: ServerFactory) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    server = server_factory(
        *KEY_ARGS,
        *("--max-generations-per-user", "3", "--max-streams-per-user", "2"),
        *("--sim-tokens-per-second", "10", "--sim-max-tokens", "200", "--shutdown-grace", "1"),
    )
    async with AsyncExitStack() as stack:
        yield await open_clients(stack, server)


def assert_refused(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["type"] == "limit_exceeded" and limit in error["message"], error


async def test_generations_per_user_are_bounded_and_others_go_on(
    clients: dict[str, httpx.AsyncClient],
) -> None:
    hog, other = clients["hog"], clients["other"]
    started = [(await hog.post("/v1/generations", json={"prompt": "x"})) for _ in range(3)]
    assert [r.status_code for r in started] == [202] * 3
    assert_refused(
        await hog.post("/v1/generations", json={"prompt": "x"}), "max_generations_per_user"
    )
    assert (await other.post("/v1/generations", json={"prompt": "x"})).status_code == 202
    await hog.post(f"/v1/generations/{started[0].json()['id']}/cancel")
    assert (await hog.post("/v1/generations", json={"prompt": "x"})).status_code == 202
    metrics = (await other.get("/metrics")).text
    assert 'keepstream_limit_refusals_total{limit="max_generations_per_user"} 1.0' in metrics


async def test_open_event_streams_per_user_are_bounded(
    clients: dict[str, httpx.AsyncClient],
) -> None:
    hog, other = clients["hog"], clients["other"]
    generation = (await hog.post("/v1/generations", json={"prompt": "x"})).json()
    url = f"/v1/generations/{generation['id']}/events"
    async with AsyncExitStack() as stack:
        for _ in range(2):
            opened = await stack.enter_async_context(hog.stream("GET", url))
            assert opened.status_code == 200
        assert_refused(await hog.get(url), "max_streams_per_user")
        refused_post = await hog.post(
            "/v1/generations", json={"prompt": "x"}, headers={"Accept": "text/event-stream"}
        )
        assert_refused(refused_post, "max_streams_per_user")
        # Another user is not affected.
        mine = (await other.post("/v1/generations", json={"prompt": "y"})).json()
        async with other.stream("GET", f"/v1/generations/{mine['id']}/events") as response:
            assert response.status_code == 200
    # Closed: the count comes back down.
    with anyio.fail_after(TIMEOUT):
        while True:
            async with hog.stream("GET", url) as response:
                if response.status_code == 200:
                    break
            await anyio.sleep(0.05)
    await hog.post(f"/v1/generations/{generation['id']}/cancel")


async def test_stored_bytes_per_user_are_bounded(server_factory: ServerFactory) -> None:
    server = server_factory(*KEY_ARGS, "--max-stored-bytes-per-user", "20000")
    text = {"Content-Type": "text/plain"}
    async with AsyncExitStack() as stack:
        users = await open_clients(stack, server)
        hog, other = users["hog"], users["other"]
        put = await hog.put("/v1/stream/big", content=b"x" * 8000, headers=text)
        assert put.status_code == 201
        for _ in range(2):
            posted = await hog.post("/v1/stream/big", content=b"y" * 8000, headers=text)
            assert posted.status_code == 204
        await anyio.sleep(1.2)  # past the usage cache
        refused = [
            await hog.post("/v1/stream/big", content=b"z", headers=text),
            await hog.put("/v1/stream/another", headers=text),
            await hog.post("/v1/generations", json={"prompt": "x"}),
            await hog.post("/v1/sessions", json={}),
        ]
        for response in refused:
            assert response.status_code == 413, response.text
            error = response.json()["error"]
            assert error["type"] == "limit_exceeded"
            assert "max_stored_bytes_per_user" in error["message"]
        # Reading and closing still work; another user is not affected.
        assert (await hog.get("/v1/stream/big", params={"offset": "-1"})).status_code == 200
        assert (await other.put("/v1/stream/big", content=b"x", headers=text)).status_code == 201
        # Deleting frees the space.
        assert (await hog.delete("/v1/stream/big")).status_code == 204
        await anyio.sleep(1.2)
        assert (await hog.put("/v1/stream/again", content=b"x", headers=text)).status_code == 201
        metrics = (await other.get("/metrics")).text
        assert 'keepstream_limit_refusals_total{limit="max_stored_bytes_per_user"} 4.0' in metrics


def test_existing_streams_get_their_owner_and_size_on_upgrade(tmp_path: Path) -> None:
    """The migration that adds per-stream owners and sizes fills them in for what an
    older version stored: generations' streams from their rows, Durable Streams from their
    names."""
    path = str(tmp_path / "old.db")
    conn = connect(path)
    migrations.apply(Database(conn), stop_before="m005_stream_owners_and_bytes")
    conn.executescript(
        """
        INSERT INTO streams (id, content_type, created_at) VALUES ('gen_a', 'application/json', 0);
        INSERT INTO generations (id, stream_id, status, provider, owner, created_at)
            VALUES ('gen_a', 'gen_a', 'completed', 'simulated', 'alice', 0);
        INSERT INTO streams (id, content_type, created_at) VALUES ('ds_b', 'text/plain', 0);
        INSERT INTO stream_names (name, stream_id) VALUES ('bob/notes', 'ds_b');
        INSERT INTO streams (id, content_type, created_at) VALUES ('ds_c', 'text/plain', 0);
        INSERT INTO stream_names (name, stream_id) VALUES ('/solo', 'ds_c');
        INSERT INTO messages VALUES ('gen_a', 0, CAST('12345' AS BLOB));
        INSERT INTO messages VALUES ('ds_b', 0, CAST('1234567' AS BLOB));
        """
    )
    migrations.apply(Database(conn))
    rows = conn.execute("SELECT id, owner, bytes FROM streams ORDER BY id").fetchall()
    assert rows == [("ds_b", "bob", 7), ("ds_c", None, 0), ("gen_a", "alice", 5)]
    conn.execute("INSERT INTO messages VALUES ('ds_b', 1, CAST('abc' AS BLOB))")
    assert conn.execute("SELECT bytes FROM streams WHERE id = 'ds_b'").fetchone() == (10,)
    conn.close()


async def test_generations_created_in_the_same_instant_still_get_increasing_times(
    tmp_path: Path,
) -> None:
    """A session's generations are ordered by creation time (a compacted answer's row moves
    to the end of its table, so insertion order is not kept): even a clock that stands
    still gives every new generation a later time than the one before."""
    provider = SimulatedProvider(tokens_per_second=0, max_tokens=1)
    async with StreamStore(str(tmp_path / "s.db")) as store:
        pool = GenerationPool(
            store, {"simulated": provider}, default_provider="simulated", clock=lambda: 1000.0
        )
        async with pool:
            request = GenerationRequest.from_json({"prompt": "x"})
            times = [(await pool.submit(request)).created_at for _ in range(5)]
    assert times == sorted(set(times)) and times[0] == 1000.0
