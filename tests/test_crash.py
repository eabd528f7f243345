"""Crashes and restarts: SIGKILL loses nothing any client saw; SIGTERM is graceful."""

from __future__ import annotations

import sqlite3
import time

import anyio
import httpx
from httpx_sse import aconnect_sse

from .conftest import ServerFactory
from .support import (
    final_status,
    read_events,
    simulated_answer,
    start_generation,
    text_of,
    wait_for_status,
)

TERMINAL = {"completed", "failed", "cancelled", "interrupted"}


async def test_sigkill_mid_generation_loses_nothing_and_the_answer_is_continued(
    server_factory: ServerFactory,
) -> None:
    """Killed mid-answer, then restarted: every event a client received is on disk, and the
    restarted server continues the answer from its committed text, so it ends exactly as the
    uninterrupted one would have, with a ``resumed`` event at the seam."""
    server = server_factory()
    params = {"tokens_per_second": 100, "max_tokens": 400}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        generation = await start_generation(http, prompt="crash", params=params)
        gid = generation["id"]
        received = []
        with anyio.fail_after(20):
            async with http.stream("GET", f"/v1/generations/{gid}/events") as response:
                buffer = ""
                async for chunk in response.aiter_text():
                    buffer += chunk
                    while "\n\n" in buffer:
                        block, buffer = buffer.split("\n\n", 1)
                        fields = dict(
                            line.split(": ", 1) for line in block.splitlines() if ": " in line
                        )
                        if "data" in fields:
                            received.append((int(fields["id"]), fields["event"], fields["data"]))
                    if len(received) >= 20:
                        server.kill()  # while the client is mid-read
                        break
    assert len(received) >= 20

    # Every event the client received is in the database, byte for byte.
    db = sqlite3.connect(server.db)
    stored = {
        offset + 1: data.decode()
        for offset, data in db.execute(
            "SELECT offset, data FROM messages WHERE stream_id = ?", (gid,)
        )
    }
    db.close()
    for event_id, _, data in received:
        assert stored[event_id] == data

    restarted = server_factory(db=server.db)
    async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as http:
        snapshot = await wait_for_status(http, gid, {"completed"}, timeout=20)
        rest = await read_events(http, gid, headers={"Last-Event-ID": str(received[-1][0])})
        assert final_status(rest) == "completed"
        assert [e.event for e in rest].count("resumed") == 1
        ids = [event_id for event_id, _, _ in received] + [int(e.id) for e in rest]
        assert ids == list(range(1, snapshot["next_offset"] + 1))
        seen_text = "".join(
            __import__("json").loads(d)["text"] for _, k, d in received if k == "delta"
        )
        assert seen_text + text_of(rest) == snapshot["text"] == simulated_answer("crash", **params)


async def test_sigterm_lets_running_generations_finish_within_the_grace_period(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--shutdown-grace", "5")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        short = await start_generation(
            http, prompt="short", params={"tokens_per_second": 50, "max_tokens": 25}
        )
        await read_events(http, short["id"], max_events=2)
        assert server.stop() == 0
    restarted = server_factory(db=server.db)
    async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as http:
        snapshot = (await http.get(f"/v1/generations/{short['id']}")).json()
        assert snapshot["status"] == "completed"
        assert len(snapshot["text"].split()) == 25


async def test_sigterm_interrupts_what_outlives_the_grace_period(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--shutdown-grace", "0.3", "--max-running", "1")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        long = await start_generation(
            http, prompt="long", params={"tokens_per_second": 20, "max_tokens": 1000}
        )
        queued = await start_generation(http, prompt="queued")
        await read_events(http, long["id"], max_events=2)
        assert server.stop() == 0
    restarted = server_factory(db=server.db)
    async with httpx.AsyncClient(base_url=restarted.url, timeout=30) as http:
        for gid in (long["id"], queued["id"]):
            snapshot = (await http.get(f"/v1/generations/{gid}")).json()
            assert snapshot["status"] == "interrupted"
            events = await read_events(http, gid)
            assert final_status(events) == "interrupted"
            assert text_of(events) == snapshot["text"]
        assert (await http.get(f"/v1/generations/{long['id']}")).json()["text"]


async def test_sigkill_under_load_every_answer_is_continued_exactly(
    server_factory: ServerFactory,
) -> None:
    """200 answers running, a reader on each: SIGKILL, restart. What each reader had is
    unchanged on disk, and every answer is continued to the very text it would have had."""
    count = 200
    params = {"tokens_per_second": 40, "max_tokens": 120, "seed": 7}
    server = server_factory("--max-running", "256")
    limits = httpx.Limits(max_connections=count + 10)
    received: dict[str, list[tuple[int, str]]] = {}

    async def read_until_killed(http: httpx.AsyncClient, gid: str) -> None:
        events = received.setdefault(gid, [])
        try:
            async with aconnect_sse(http, "GET", f"/v1/generations/{gid}/events") as source:
                async for sse in source.aiter_sse():
                    if sse.data:
                        events.append((int(sse.id), sse.data))
        except httpx.HTTPError:
            pass  # the server died under the reader

    async with httpx.AsyncClient(base_url=server.url, timeout=30, limits=limits) as http:
        ids = [
            (await start_generation(http, prompt=f"load {i}", params=params))["id"]
            for i in range(count)
        ]
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for gid in ids:
                    tg.start_soon(read_until_killed, http, gid)
                while sum(len(e) for e in received.values()) < count * 3:  # noqa: ASYNC110 - polled: nothing to wait on
                    await anyio.sleep(0.05)
                server.kill()
    seen = {gid: list(events) for gid, events in received.items()}
    assert all(seen[gid] for gid in ids[:10])

    started = time.monotonic()
    restarted = server_factory("--max-running", "256", db=server.db)
    async with httpx.AsyncClient(base_url=restarted.url, timeout=30, limits=limits) as http:
        with anyio.fail_after(60):
            finals = [await wait_for_status(http, gid, TERMINAL, timeout=60) for gid in ids]
        recovered_in = time.monotonic() - started
        for i, (gid, final) in enumerate(zip(ids, finals, strict=True)):
            assert final["status"] == "completed", final
            assert final["text"] == simulated_answer(f"load {i}", **params)
            # Every event a reader had is where it was: same offset, same bytes.
            events = await read_events(http, gid)
            by_offset = {int(e.id): e.data for e in events}
            assert all(by_offset[offset] == data for offset, data in seen[gid])
            assert [e.event for e in events].count("resumed") <= 1
    # Generous: the answers take about 3 s of model time each, all at once.
    assert recovered_in < 30, recovered_in
