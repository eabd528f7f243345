"""One strict JSON boundary: what cannot be stored and read back is refused at the door with
a 400 naming the problem, on every endpoint that takes JSON, and nothing accepted can make a
later read fail."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from .conftest import DEFAULT_ARGS
from .support import Server

DEPTH_LIMIT = 64  # the default --max-json-depth

POISON = {
    "overflowing-number": (b"1e400", "out of range"),
    "nan": (b"NaN", "invalid character"),
    "infinity": (b"Infinity", "invalid character"),
    "minus-infinity": (b"-Infinity", "invalid character"),
    "lone-high-surrogate": (b'"\\ud83d"', "surrogate"),
    "lone-low-surrogate": (b'"\\ude00"', "surrogate"),
    "invalid-utf8": (b'"\xff\xfe"', "UTF-8"),
    "too-deep": (b"[" * 1000 + b"]" * 1000, "nested deeper than 64"),
    "just-too-deep": (b"[" * (DEPTH_LIMIT - 1) + b"]" * (DEPTH_LIMIT - 1), "nested deeper"),
}


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One single-user server for the module, with the default JSON limits."""
    server = Server(db=tmp_path_factory.mktemp("strict") / "keepstream.db", args=DEFAULT_ARGS)
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture
async def client(strict_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the module's server."""
    async with httpx.AsyncClient(base_url=strict_server.url, timeout=10.0) as http:
        yield http


def nested(depth: int) -> bytes:
    """An object ``depth`` levels deep, as JSON text."""
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


def assert_names(response: httpx.Response, words: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "bad_request"
    assert words.lower() in error["message"].lower(), error["message"]


@pytest.mark.parametrize(("value", "words"), list(POISON.values()), ids=list(POISON))
async def test_a_session_context_that_cannot_round_trip_is_refused(
    client: httpx.AsyncClient, value: bytes, words: str
) -> None:
    created = await client.post("/v1/sessions", content=b'{"context": {"x": %s}}' % value)
    assert_names(created, words)
    session = (await client.post("/v1/sessions", json={"title": "kept"})).json()
    for content_type in ("application/json", "application/merge-patch+json"):
        patched = await client.patch(
            f"/v1/sessions/{session['id']}",
            content=b'{"context": {"x": %s}}' % value,
            headers={"Content-Type": content_type},
        )
        assert_names(patched, words)
    listed = await client.get("/v1/sessions")
    assert listed.status_code == 200, listed.text
    assert all(s["context"] == {} for s in listed.json()["data"])
    await client.delete(f"/v1/sessions/{session['id']}")


async def test_the_deepest_context_allowed_reads_back(client: httpx.AsyncClient) -> None:
    # The body is an object holding "context", so the context may nest one level less.
    deepest = nested(DEPTH_LIMIT - 1)
    created = await client.post("/v1/sessions", content=b'{"context": %s}' % deepest)
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]
    too_deep = await client.patch(
        f"/v1/sessions/{session_id}", content=b'{"context": %s}' % nested(DEPTH_LIMIT)
    )
    assert_names(too_deep, "nested deeper")
    for path in ("/v1/sessions", f"/v1/sessions/{session_id}"):
        response = await client.get(path)
        assert response.status_code == 200, response.text
    context: Any = (await client.get(f"/v1/sessions/{session_id}")).json()["context"]
    depth = 0
    while context:
        context, depth = context["a"], depth + 1
    assert depth == DEPTH_LIMIT - 2
    await client.delete(f"/v1/sessions/{session_id}")


@pytest.mark.parametrize(("value", "words"), list(POISON.values()), ids=list(POISON))
async def test_generation_bodies_refuse_the_same(
    client: httpx.AsyncClient, value: bytes, words: str
) -> None:
    response = await client.post(
        "/v1/generations", content=b'{"prompt": "hi", "params": {"x": %s}}' % value
    )
    assert_names(response, words)


@pytest.mark.parametrize(("value", "words"), list(POISON.values()), ids=list(POISON))
async def test_durable_stream_json_appends_refuse_the_same(
    client: httpx.AsyncClient, value: bytes, words: str
) -> None:
    json_type = {"Content-Type": "application/json"}
    assert (await client.put("/v1/stream/strict", headers=json_type)).status_code in (200, 201)
    value = b"[[%s]]" % value  # as deep as in the other bodies
    assert_names(await client.post("/v1/stream/strict", content=value, headers=json_type), words)
    assert_names(await client.put("/v1/stream/strict-put", content=value, headers=json_type), words)
    read = await client.get("/v1/stream/strict", params={"offset": "-1"})
    assert read.status_code == 200 and read.json() == []


async def test_big_integers_round_trip(client: httpx.AsyncClient) -> None:
    big = b"123456789012345678901234567890"
    created = await client.post("/v1/sessions", content=b'{"context": {"n": %s}}' % big)
    assert created.status_code == 201, created.text
    assert created.json()["context"] == {"n": int(big)}
    await client.delete(f"/v1/sessions/{created.json()['id']}")


@pytest.mark.parametrize(
    "content_type",
    ["*/*", "text/*", "application/json, text/plain", "application/json;;", "json", "a b/c"],
)
async def test_a_stream_content_type_must_be_one_media_type(
    client: httpx.AsyncClient, content_type: str
) -> None:
    """A stream answers reads with the type it was created with: a list, a wildcard or
    garbage must not get in (schemathesis found ``*/*`` served as a stream's type)."""
    response = await client.put(
        "/v1/stream/typed", content=b"x", headers={"Content-Type": content_type}
    )
    assert_names(response, "Content-Type must be one media type")
    ok = await client.put(
        "/v1/stream/typed", content=b"x", headers={"Content-Type": 'text/plain; charset="utf-8"'}
    )
    assert ok.status_code in (200, 201)
