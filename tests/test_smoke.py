from __future__ import annotations

import httpx

from .support import final_status, read_events, start_generation, text_of


async def test_generation_streams_to_completion(client: httpx.AsyncClient) -> None:
    generation = await start_generation(client, prompt="hello")
    events = await read_events(client, generation["id"])
    assert final_status(events) == "completed"
    snapshot = (await client.get(f"/v1/generations/{generation['id']}")).json()
    assert snapshot["text"] == text_of(events)
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
