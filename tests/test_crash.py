"""Crashes and restarts: SIGKILL loses nothing any client saw; SIGTERM is graceful."""

from __future__ import annotations

import sqlite3

import anyio
import httpx

from .conftest import ServerFactory
from .support import final_status, read_events, start_generation, text_of, wait_for_status


async def test_sigkill_mid_generation_loses_nothing_a_client_received(
    server_factory: ServerFactory,
) -> None:
    server = server_factory()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        generation = await start_generation(
            http, prompt="crash", params={"tokens_per_second": 100, "max_tokens": 2000}
        )
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
        snapshot = await wait_for_status(http, gid, {"interrupted"}, timeout=10)
        assert snapshot["error"]["type"] == "interrupted"
        rest = await read_events(http, gid, headers={"Last-Event-ID": str(received[-1][0])})
        assert final_status(rest) == "interrupted"
        ids = [event_id for event_id, _, _ in received] + [int(e.id) for e in rest]
        assert ids == list(range(1, snapshot["next_offset"] + 1))
        seen_text = "".join(
            __import__("json").loads(d)["text"] for _, k, d in received if k == "delta"
        )
        assert seen_text + text_of(rest) == snapshot["text"]


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
