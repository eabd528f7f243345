"""Cancel: explicit, idempotent, persisted; partial text kept; finished generations untouched."""

from __future__ import annotations

import httpx

from .support import final_status, read_events, start_generation, text_of, wait_for_status


async def test_cancel_mid_stream_keeps_partial_text_and_closes_the_stream(
    client: httpx.AsyncClient,
) -> None:
    generation = await start_generation(
        client, prompt="stop me", params={"tokens_per_second": 50, "max_tokens": 1000}
    )
    gid = generation["id"]
    seen = await read_events(client, gid, max_events=4)
    response = await client.post(f"/v1/generations/{gid}/cancel")
    assert response.status_code == 200
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancel_requested"] is True
    assert cancelled["finished_at"] is not None
    assert text_of(seen) in cancelled["text"]  # nothing shown is lost
    assert 0 < len(cancelled["text"].split()) < 1000

    events = await read_events(client, gid)  # the stream is closed: this ends by itself
    assert final_status(events) == "cancelled"
    assert text_of(events) == cancelled["text"]
    assert int(events[-1].id) == cancelled["next_offset"]

    again = await client.post(f"/v1/generations/{gid}/cancel")
    assert again.status_code == 200
    assert again.json() == cancelled  # idempotent: nothing changed


async def test_cancel_of_a_finished_generation_changes_nothing(client: httpx.AsyncClient) -> None:
    generation = await start_generation(client, prompt="done", params={"max_tokens": 5})
    done = await wait_for_status(client, generation["id"], {"completed"})
    response = await client.post(f"/v1/generations/{generation['id']}/cancel")
    assert response.status_code == 200
    assert response.json() == done


async def test_cancel_of_a_queued_generation(server_factory: object) -> None:
    from .conftest import ServerFactory

    factory: ServerFactory = server_factory  # type: ignore[assignment]
    server = factory("--max-running", "1", "--max-queued", "5")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        busy = await start_generation(
            http, prompt="a", params={"tokens_per_second": 20, "max_tokens": 1000}
        )
        queued = await start_generation(http, prompt="b")
        assert (await http.get(f"/v1/generations/{queued['id']}")).json()["status"] == "queued"
        cancelled = (await http.post(f"/v1/generations/{queued['id']}/cancel")).json()
        assert cancelled["status"] == "cancelled"
        assert cancelled["text"] == ""
        events = await read_events(http, queued["id"])
        assert [e.json()["status"] for e in events] == ["cancelled"]
        await http.post(f"/v1/generations/{busy['id']}/cancel")
