"""Disconnect and resume: a client that goes away loses nothing and gets nothing twice."""

from __future__ import annotations

import json

import anyio
import httpx

from .support import final_status, read_events, start_generation, text_of, wait_for_status


async def test_disconnect_mid_stream_then_resume_with_last_event_id(
    client: httpx.AsyncClient,
) -> None:
    generation = await start_generation(
        client, prompt="resume me", params={"tokens_per_second": 100, "max_tokens": 60}
    )
    first = await read_events(client, generation["id"], max_events=5)  # then hang up
    assert len(first) == 5
    snapshot = await wait_for_status(client, generation["id"], {"completed"})
    assert snapshot["next_offset"] > 5  # the generation went on without any reader

    rest = await read_events(client, generation["id"], headers={"Last-Event-ID": first[-1].id})
    ids = [int(e.id) for e in first + rest]
    assert ids == list(range(1, snapshot["next_offset"] + 1))  # no gap, no duplicate
    assert text_of(first + rest) == snapshot["text"]
    assert final_status(rest) == "completed"


async def test_resume_from_every_offset_of_a_finished_generation(
    client: httpx.AsyncClient,
) -> None:
    generation = await start_generation(
        client, prompt="every offset", params={"tokens_per_second": 400, "max_tokens": 60}
    )
    full = await read_events(client, generation["id"])
    snapshot = await wait_for_status(client, generation["id"], {"completed"})
    length = snapshot["next_offset"]
    assert len(full) == length

    async def check(offset: int) -> None:
        by_header = await read_events(
            client, generation["id"], headers={"Last-Event-ID": str(offset)}
        )
        by_query = await read_events(client, generation["id"], params={"offset": offset})
        for events in (by_header, by_query):
            assert [(e.id, e.event, e.data) for e in events] == [
                (e.id, e.event, e.data) for e in full[offset:]
            ]

    async with anyio.create_task_group() as tg:
        for offset in range(length + 1):
            tg.start_soon(check, offset)


async def test_finished_generation_with_nothing_left_answers_204(
    client: httpx.AsyncClient,
) -> None:
    generation = await start_generation(client, prompt="x", params={"max_tokens": 3})
    snapshot = await wait_for_status(client, generation["id"], {"completed"})
    response = await client.get(
        f"/v1/generations/{generation['id']}/events",
        headers={"Last-Event-ID": str(snapshot["next_offset"])},
    )
    assert response.status_code == 204


async def test_fifty_concurrent_readers_of_one_live_generation_get_identical_text(
    client: httpx.AsyncClient,
) -> None:
    generation = await start_generation(
        client, prompt="fan out", params={"tokens_per_second": 100, "max_tokens": 100}
    )
    results: list[list[tuple[str, str, str]]] = []

    async def reader(http: httpx.AsyncClient) -> None:
        events = await read_events(http, generation["id"])
        results.append([(e.id, e.event, e.data) for e in events])

    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=str(client.base_url), limits=limits, timeout=30) as many:
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(reader, many)
    snapshot = await wait_for_status(client, generation["id"], {"completed"})
    assert len(results) == 50
    assert all(result == results[0] for result in results)
    assert len(results[0]) == snapshot["next_offset"]
    text = "".join(json.loads(data)["text"] for _, kind, data in results[0] if kind == "delta")
    assert text == snapshot["text"]
    assert results[0][-1][1] == "status" and json.loads(results[0][-1][2])["status"] == "completed"


async def test_post_with_accept_event_stream_streams_and_stays_detached(
    client: httpx.AsyncClient,
) -> None:
    body = {"prompt": "direct", "params": {"tokens_per_second": 100, "max_tokens": 50}}
    with anyio.fail_after(10):
        async with client.stream(
            "POST", "/v1/generations", json=body, headers={"Accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            generation_id = response.headers["keepstream-generation-id"]
            assert response.headers["location"] == f"/v1/generations/{generation_id}"
            async for line in response.aiter_lines():
                if line.startswith("data:") and '"delta"' in line:
                    break  # hang up after the first delta
    snapshot = await wait_for_status(client, generation_id, {"completed"})
    events = await read_events(client, generation_id)
    assert text_of(events) == snapshot["text"]
    assert len(snapshot["text"].split()) == 50


async def test_a_text_offset_resume_of_a_live_answer_past_its_lagging_snapshot(
    client: httpx.AsyncClient,
) -> None:
    """A running answer's snapshot is up to a second behind its events; a ``text_offset``
    resume past it (the search starts at the snapshot) gives exactly the rest, to the end."""
    params = {"tokens_per_second": 20, "max_tokens": 40}
    generation = await start_generation(client, prompt="lagging snapshot", params=params)
    seen = await read_events(client, generation["id"], max_events=6)
    shown = text_of(seen)
    # Usually the snapshot still holds only the start here (it may have caught up on a
    # loaded machine: then the search starts from the beginning, and the rest is the same).
    resumed = await read_events(client, generation["id"], params={"text_offset": len(shown) - 2})
    final = await wait_for_status(client, generation["id"], {"completed"})
    assert shown[: len(shown) - 2] + text_of(resumed) == final["text"]
    assert final_status(resumed) == "completed"
