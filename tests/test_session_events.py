"""A session's event stream: what a client opens when it switches back to a conversation."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from .conftest import ServerFactory
from .support import wait_for_status

TIMEOUT = 30.0


async def session_events(
    http: httpx.AsyncClient,
    session_id: str,
    *,
    last_event_id: str | None = None,
    until: int | None = None,
    stop_after_status: int | None = None,
) -> list[ServerSentEvent]:
    """Session events until ``until`` events or ``stop_after_status`` final statuses."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[ServerSentEvent] = []
    statuses = 0
    with anyio.fail_after(TIMEOUT):
        async with aconnect_sse(
            http, "GET", f"/v1/sessions/{session_id}/events", headers=headers
        ) as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue
                events.append(sse)
                if sse.event == "status" and sse.json()["status"] != "running":
                    statuses += 1
                if until is not None and len(events) >= until:
                    break
                if stop_after_status is not None and statuses >= stop_after_status:
                    break
    return events


def by_generation(events: list[ServerSentEvent]) -> dict[str, list[int]]:
    offsets: dict[str, list[int]] = {}
    for sse in events:
        gid, _, offset = sse.id.rpartition(":")
        offsets.setdefault(gid, []).append(int(offset))
    return offsets


def text_for(events: list[ServerSentEvent], generation_id: str) -> str:
    return "".join(
        e.json()["text"]
        for e in events
        if e.event == "delta" and e.id.rpartition(":")[0] == generation_id
    )


async def post(http: httpx.AsyncClient, session_id: str, content: str) -> dict[str, Any]:
    response = await http.post(f"/v1/sessions/{session_id}/messages", json={"content": content})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_switching_back_finishes_the_old_answer_then_the_newer_one(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--sim-tokens-per-second", "100", "--sim-max-tokens", "40")
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        session = (await http.post("/v1/sessions", json={"on_busy": "queue"})).json()
        first = await post(http, session["id"], "first question")
        seen = await session_events(http, session["id"], until=4)  # then switch away
        second = await post(http, session["id"], "second question")  # queued behind it
        rest = await session_events(
            http, session["id"], last_event_id=seen[-1].id, stop_after_status=2
        )
        a, b = first["generation_id"], second["generation_id"]
        offsets = by_generation(seen + rest)
        snapshot_a = await wait_for_status(http, a, {"completed"})
        snapshot_b = await wait_for_status(http, b, {"completed"})
        assert list(offsets) == [a, b]  # the old answer first, then the newer one
        assert offsets[a] == list(range(1, snapshot_a["next_offset"] + 1))  # no gap, no dup
        assert offsets[b] == list(range(1, snapshot_b["next_offset"] + 1))
        assert text_for(seen + rest, a) == snapshot_a["text"]
        assert text_for(rest, b) == snapshot_b["text"]


async def test_an_open_session_stream_follows_each_new_answer_live(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--sim-tokens-per-second", "200", "--sim-max-tokens", "10")
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        session = (await http.post("/v1/sessions", json={})).json()
        generations: list[str] = []
        events: list[ServerSentEvent] = []

        async def listen() -> None:
            events.extend(await session_events(http, session["id"], stop_after_status=2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen)
            for content in ("one", "two"):
                generations.append((await post(http, session["id"], content))["generation_id"])
                await wait_for_status(http, generations[-1], {"completed"})
        assert list(by_generation(events)) == generations


async def test_a_closed_session_with_nothing_left_answers_204_and_bad_ids_400(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--sim-tokens-per-second", "0", "--sim-max-tokens", "5")
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        session = (await http.post("/v1/sessions", json={})).json()
        url = f"/v1/sessions/{session['id']}/events"
        generation = (await post(http, session["id"], "hi"))["generation_id"]
        done = await wait_for_status(http, generation, {"completed"})
        await http.patch(f"/v1/sessions/{session['id']}", json={"status": "closed"})
        end = f"{generation}:{done['next_offset']}"
        assert (await http.get(url, headers={"Last-Event-ID": end})).status_code == 204
        replay = await session_events(http, session["id"])  # from the start: it is all there
        assert text_for(replay, generation) == done["text"]
        for bad in ("nocolon", f"{generation}:x", f"{generation}:999", "gen_other:1"):
            response = await http.get(url, headers={"Last-Event-ID": bad})
            assert response.status_code == 400, bad
            assert response.json()["error"]["type"] == "bad_request"
