"""The pool's limits: running and queued bounds, 429 beyond them, queued work starts later."""

from __future__ import annotations

import anyio
import httpx

from .conftest import ServerFactory
from .support import read_events, start_generation, wait_for_status


async def test_pool_full_answers_429_and_queued_generations_start_as_slots_free(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--max-running", "2", "--max-queued", "2")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        slow = {"tokens_per_second": 50, "max_tokens": 15}
        accepted = [await start_generation(http, prompt=f"p{i}", params=slow) for i in range(4)]
        statuses = [
            (await http.get(f"/v1/generations/{g['id']}")).json()["status"] for g in accepted
        ]
        assert statuses.count("queued") >= 2

        refused = await http.post("/v1/generations", json={"prompt": "one too many"})
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "pool_full"
        assert int(refused.headers["retry-after"]) >= 1

        finished = [await wait_for_status(http, g["id"], {"completed"}) for g in accepted]
        # The queued ones started only after a running one ended.
        ends = sorted(f["finished_at"] for f in finished[:2])
        for late in finished[2:]:
            assert late["started_at"] >= ends[0]
        for generation in accepted:
            assert [e.event for e in await read_events(http, generation["id"])][-1] == "status"

        again = await http.post("/v1/generations", json={"prompt": "room again"})
        assert again.status_code == 202


async def test_many_generations_at_once_all_complete(server_factory: ServerFactory) -> None:
    server = server_factory("--max-running", "50", "--max-queued", "200")
    async with httpx.AsyncClient(
        base_url=server.url, timeout=30, limits=httpx.Limits(max_connections=200)
    ) as http:
        ids: list[str] = []

        async def one(i: int) -> None:
            generation = await start_generation(
                http, prompt=f"n{i}", params={"tokens_per_second": 200, "max_tokens": 30}
            )
            ids.append(generation["id"])

        async with anyio.create_task_group() as tg:
            for i in range(150):
                tg.start_soon(one, i)
        for gid in ids:
            snapshot = await wait_for_status(http, gid, {"completed"})
            assert len(snapshot["text"].split()) == 30
