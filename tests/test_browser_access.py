"""Browsers: CORS on every API, and signed event URLs for ``EventSource`` (which cannot send
an ``Authorization`` header), checked with the real ``eventsource`` npm package."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .conftest import DEFAULT_ARGS, ServerFactory
from .node_support import run_node
from .support import (
    Server,
    get_snapshot,
    read_events,
    readme_block,
    start_generation,
    wait_for_status,
)

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef"
FRONTEND = "http://localhost:3000"


def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "keys.txt"
    path.write_text(f"alice={ALICE}\nbob={BOB}\n")
    return str(path)


def as_user(server: Server, key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=server.url, timeout=30, headers=headers)


async def follow_with_eventsource(url: str, *, deadline_ms: int = 20_000) -> dict[str, Any]:
    """What the real ``eventsource`` client saw following ``url`` until it gave up."""
    env = {"EVENTS_URL": url, "DEADLINE_MS": str(deadline_ms)}
    result: dict[str, Any] = await anyio.to_thread.run_sync(
        partial(run_node, "eventsource-follow.mjs", env=env, timeout=deadline_ms / 1000 + 30)
    )
    return result


# -- CORS ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/v1/generations", "authorization, content-type"),
        ("GET", "/v1/generations/gen_x/events", "authorization, last-event-id"),
        ("POST", "/v1/sessions", "authorization, content-type, idempotency-key"),
        ("PATCH", "/v1/sessions/ses_x", "authorization, content-type"),
        ("DELETE", "/v1/sessions/ses_x", "authorization"),
    ],
    ids=["generations", "events", "sessions", "patch", "delete"],
)
async def test_an_allowed_origin_gets_its_preflight_answered(
    server_factory: ServerFactory, method: str, path: str, headers: str
) -> None:
    server = server_factory(*DEFAULT_ARGS, "--cors-origins", f"{FRONTEND}, https://app.example")
    async with as_user(server, None) as client:
        response = await client.options(
            path,
            headers={
                "Origin": FRONTEND,
                "Access-Control-Request-Method": method,
                "Access-Control-Request-Headers": headers,
            },
        )
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == FRONTEND
    assert method in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == headers


async def test_cross_origin_answers_expose_the_resume_headers(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(*DEFAULT_ARGS, "--cors-origins", FRONTEND)
    async with as_user(server, None) as client:
        started = await client.post(
            "/v1/generations", json={"prompt": "cors"}, headers={"Origin": FRONTEND}
        )
        assert started.status_code == 202
        assert started.headers["access-control-allow-origin"] == FRONTEND
        exposed = {
            h.strip().lower() for h in started.headers["access-control-expose-headers"].split(",")
        }
        assert {"location", "keepstream-generation-id", "stream-next-offset"} <= exposed
        # An error answer carries the headers too, so the page can read what went wrong.
        missing = await client.get("/v1/sessions/ses_missing", headers={"Origin": FRONTEND})
        assert missing.status_code == 404
        assert missing.headers["access-control-allow-origin"] == FRONTEND
        events = await read_events(
            client, started.json()["id"], headers={"Origin": FRONTEND, "Last-Event-ID": "0"}
        )
        assert events


async def test_origins_not_configured_are_refused_in_json(server_factory: ServerFactory) -> None:
    default = server_factory(*DEFAULT_ARGS)
    configured = server_factory(*DEFAULT_ARGS, "--cors-origins", FRONTEND)
    for server in (default, configured):
        async with as_user(server, None) as client:
            preflight = await client.options(
                "/v1/generations",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            )
            assert preflight.status_code == 400
            assert preflight.json()["error"]["type"] == "cors_refused"
            assert "access-control-allow-origin" not in preflight.headers
            plain = await client.post(
                "/v1/generations", json={"prompt": "x"}, headers={"Origin": "https://evil.example"}
            )
            assert plain.status_code == 202  # a server answers; the browser hides it
            assert "access-control-allow-origin" not in plain.headers
            # The Durable Streams view keeps allowing any origin.
            stream = await client.options(
                "/v1/stream/cors-check",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "PUT"},
            )
            assert stream.headers["access-control-allow-origin"] == "*"


def test_a_bad_origin_setting_is_refused_at_start(server_factory: ServerFactory) -> None:
    with pytest.raises(RuntimeError, match="not an http"):
        server_factory(*DEFAULT_ARGS, "--cors-origins", "localhost:3000")


# -- signed event URLs ----------------------------------------------------------------------------


async def test_a_signed_url_opens_only_its_own_events(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(*DEFAULT_ARGS, "--api-keys-file", keys_file(tmp_path))
    async with as_user(server, ALICE) as alice, as_user(server, BOB) as bob:
        mine = (await start_generation(alice, prompt="signed"))["id"]
        other = (await start_generation(alice, prompt="other"))["id"]
        issued = await alice.post(f"/v1/generations/{mine}/events-url")
        assert issued.status_code == 200, issued.text
        signed = issued.json()
        assert signed["url"].startswith(f"/v1/generations/{mine}/events?token=")
        token = signed["url"].partition("token=")[2]
        async with as_user(server, None) as anonymous:
            events = await read_events(anonymous, mine, params={"token": token})
            await wait_for_status(alice, mine, {"completed"})
            assert (
                "".join(e.json()["text"] for e in events if e.event == "delta")
                == (await get_snapshot(alice, mine))["text"]
            )
            # Another resource, another kind of request, a tampered token: all refused.
            refused = [
                await anonymous.get(f"/v1/generations/{other}/events", params={"token": token}),
                await anonymous.get(f"/v1/generations/{mine}", params={"token": token}),
                await anonymous.post(f"/v1/generations/{mine}/cancel", params={"token": token}),
                await anonymous.get(
                    f"/v1/generations/{mine}/events", params={"token": token[:-2] + "AA"}
                ),
                await anonymous.get(f"/v1/generations/{mine}/events", params={"token": "1.x"}),
                await anonymous.get("/v1/generations/gen_missing/events", params={"token": token}),
            ]
        assert [r.status_code for r in refused] == [401] * 6
        assert all(r.json()["error"]["type"] == "unauthorized" for r in refused)
        # Bob cannot get a URL for Alice's generation.
        assert (await bob.post(f"/v1/generations/{mine}/events-url")).status_code == 404


async def test_a_signed_url_expires(server_factory: ServerFactory, tmp_path: Path) -> None:
    server = server_factory(
        *DEFAULT_ARGS, "--api-keys-file", keys_file(tmp_path), "--signed-url-ttl", "1"
    )
    async with as_user(server, ALICE) as alice:
        generation = (await start_generation(alice, prompt="soon gone"))["id"]
        url = (await alice.post(f"/v1/generations/{generation}/events-url")).json()["url"]
        await anyio.sleep(2.1)
        async with as_user(server, None) as anonymous:
            expired = await anonymous.get(url)
    assert expired.status_code == 401
    assert "expired" in expired.json()["error"]["message"]


async def test_a_signed_session_url_follows_the_session(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(*DEFAULT_ARGS, "--api-keys-file", keys_file(tmp_path))
    async with as_user(server, ALICE) as alice, as_user(server, BOB) as bob:
        session = (await alice.post("/v1/sessions", json={})).json()["id"]
        posted = await alice.post(f"/v1/sessions/{session}/messages", json={"content": "hi"})
        generation = posted.json()["generation_id"]
        await wait_for_status(alice, generation, {"completed"})
        await alice.patch(f"/v1/sessions/{session}", json={"status": "closed"})
        url = (await alice.post(f"/v1/sessions/{session}/events-url")).json()["url"]
        generation_url = (await alice.post(f"/v1/generations/{generation}/events-url")).json()
        async with as_user(server, None) as anonymous:
            with anyio.fail_after(10):
                response = await anonymous.get(url)
            assert response.status_code == 200
            assert f"id: {generation}:" in response.text
            # A generation's token does not open its session, nor the other way round.
            token = generation_url["url"].partition("token=")[2]
            foreign = await anonymous.get(f"/v1/sessions/{session}/events", params={"token": token})
            assert foreign.status_code == 401
        assert (await bob.post(f"/v1/sessions/{session}/events-url")).status_code == 404


async def test_without_keys_the_events_url_needs_no_token(server: Server) -> None:
    async with as_user(server, None) as client:
        generation = (await start_generation(client, prompt="open"))["id"]
        issued = (await client.post(f"/v1/generations/{generation}/events-url")).json()
    assert issued == {"url": f"/v1/generations/{generation}/events", "expires_at": None}


# -- the real eventsource client ------------------------------------------------------------------


async def test_eventsource_resumes_across_server_ended_streams(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The server ends each response after 0.4 s; the client reconnects by itself with
    Last-Event-ID, ends with the whole answer, and stops once it has everything (204)."""
    server = server_factory(
        "--sim-tokens-per-second",
        "40",
        "--sim-max-tokens",
        "60",
        "--sse-lifetime",
        "0.4",
        "--sse-retry-ms",
        "50",
        "--api-keys-file",
        keys_file(tmp_path),
    )
    async with as_user(server, ALICE) as alice:
        generation = (await start_generation(alice, prompt="reconnect by yourself"))["id"]
        url = (await alice.post(f"/v1/generations/{generation}/events-url")).json()["url"]
        seen = await follow_with_eventsource(server.url + url)
        snapshot = await get_snapshot(alice, generation)
    assert not seen["timedOut"], seen
    assert seen["opens"] >= 3, seen  # the answer takes about 1.5 s
    assert seen["status"] == "completed"
    assert seen["text"] == snapshot["text"]
    offsets = [int(i) for i in seen["ids"]]
    assert offsets == list(range(1, snapshot["next_offset"] + 1))  # no gap, no duplicate
    # It stopped for good on the final 204, not on an error it could retry.
    assert seen["errors"][-1]["code"] == 204


@pytest.mark.parametrize("case", ["expired", "foreign"])
async def test_eventsource_is_refused_a_bad_signed_url(
    server_factory: ServerFactory, tmp_path: Path, case: str
) -> None:
    server = server_factory(
        *DEFAULT_ARGS, "--api-keys-file", keys_file(tmp_path), "--signed-url-ttl", "1"
    )
    async with as_user(server, ALICE) as alice:
        generation = (await start_generation(alice, prompt="refused"))["id"]
        other = (await start_generation(alice, prompt="other"))["id"]
        url = (await alice.post(f"/v1/generations/{generation}/events-url")).json()["url"]
        if case == "expired":
            await anyio.sleep(2.1)
        else:
            url = url.replace(generation, other)
        seen = await follow_with_eventsource(server.url + url, deadline_ms=5000)
    assert not seen["timedOut"], seen
    assert seen["opens"] == 0
    assert seen["text"] == ""
    assert [e["code"] for e in seen["errors"]] == [401]


async def test_the_readme_eventsource_example_runs_as_written(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(*DEFAULT_ARGS, "--api-keys-file", keys_file(tmp_path))
    snippet = readme_block("## Browsers: EventSource and CORS", "js")
    async with as_user(server, ALICE) as alice:
        generation = (await start_generation(alice, prompt="from the README"))["id"]
        env = {"SNIPPET": snippet, "API": server.url, "API_KEY": ALICE, "GENERATION_ID": generation}
        rendered = await anyio.to_thread.run_sync(
            partial(run_node, "readme-eventsource.mjs", env=env)
        )
        snapshot = await get_snapshot(alice, generation)
    assert rendered == {"text": snapshot["text"], "status": "completed"}
