"""Helpers for the Durable Streams protocol tests: offsets, requests, and an SSE parser that
follows the HTML living standard to the letter (so it sees exactly what a browser would)."""

from __future__ import annotations

import itertools
import json
import re
import uuid
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from .support import Server

STREAM = "/v1/stream/"
JSON = "application/json"
BINARY = "application/octet-stream"
# A long-poll that finds nothing answers 204 after this many seconds on the test servers.
LONG_POLL_TIMEOUT = 0.5
DS_ARGS: Sequence[str] = ("--long-poll-timeout", str(LONG_POLL_TIMEOUT), "--shutdown-grace", "1")
REQUEST_TIMEOUT = 10.0
_LINE = re.compile(r"\r\n|\r|\n")


def offset(position: int) -> str:
    """The protocol form of a stream position: ``0000000000000000_<16 digits>``."""
    return f"{0:016d}_{position:016d}"


def position(value: str) -> int:
    """The stream position of an offset this server minted."""
    zeros, _, tail = value.partition("_")
    assert zeros == "0" * 16 and len(tail) == 16 and tail.isdigit(), value
    return int(tail)


def path(name: str) -> str:
    """The URL path of stream ``name``."""
    return STREAM + name


async def create(
    client: httpx.AsyncClient,
    name: str,
    content_type: str | None = "text/plain",
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """PUT a new stream and insist on 201."""
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    response = await client.put(path(name), content=body, headers=sent)
    assert response.status_code == 201, (name, response.status_code, response.text)
    return response


async def append(
    client: httpx.AsyncClient,
    name: str,
    body: bytes | str,
    content_type: str = "text/plain",
    *,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """POST one message (no status check: callers assert what they expect)."""
    content = body.encode() if isinstance(body, str) else body
    return await client.post(
        path(name), content=content, headers={"Content-Type": content_type, **(headers or {})}
    )


async def status(response: Awaitable[httpx.Response]) -> int:
    """The status code of a response still to come."""
    return (await response).status_code


async def read_all(client: httpx.AsyncClient, name: str, start: int = 0) -> bytes:
    """The stream's bytes from ``start`` to its tail (catch-up reads until up to date)."""
    data = b""
    with anyio.fail_after(10):
        while True:
            response = await client.get(path(name), params={"offset": offset(start)})
            assert response.status_code == 200, (name, response.status_code, response.text)
            data += response.content
            start = position(response.headers["stream-next-offset"])
            if response.headers.get("stream-up-to-date") == "true":
                return data


async def read_json(client: httpx.AsyncClient, name: str, start: int = 0) -> list[Any]:
    """The JSON stream's values from ``start`` to its tail."""
    response = await client.get(path(name), params={"offset": offset(start)})
    assert response.status_code == 200, (name, response.status_code, response.text)
    assert response.headers.get("stream-up-to-date") == "true"
    values: list[Any] = response.json()
    return values


@dataclass
class Frame:
    """One dispatched SSE event: its type and its ``data`` lines, as the SSE spec parses them."""

    event: str
    lines: list[str] = field(default_factory=list)

    @property
    def data(self) -> str:
        """The event's data: its lines joined with LF, as ``EventSource`` delivers it."""
        return "\n".join(self.lines)

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(text: str) -> list[Frame]:
    """SSE events in ``text`` per the HTML standard's "event stream interpretation".

    Lines end at CRLF, CR or LF; a blank line dispatches; ``field:value`` loses one leading
    space from the value; comments and unknown fields are ignored; an event with no ``data``
    line is not dispatched; an incomplete trailing event is dropped.
    """
    frames: list[Frame] = []
    event = ""
    lines: list[str] | None = None
    pieces = _LINE.split(text)
    for line in pieces[:-1]:  # the last piece has no terminator yet
        if line == "":
            if lines is not None:
                frames.append(Frame(event or "message", lines))
            event, lines = "", None
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            event = value
        elif name == "data":
            lines = [*(lines or []), value]
    return frames


async def read_sse(
    client: httpx.AsyncClient,
    name: str,
    start: str,
    *,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> tuple[httpx.Headers, bytes]:
    """The raw body of ``GET ?offset=start&live=sse`` until the server ends it."""
    raw = bytearray()
    with anyio.fail_after(timeout):
        async with client.stream(
            "GET", path(name), params={"offset": start, "live": "sse"}, headers=headers
        ) as response:
            assert response.status_code == 200, response.status_code
            async for piece in response.aiter_raw():
                raw += piece
    return response.headers, bytes(raw)


def check_pairs(frames: Sequence[Frame]) -> list[dict[str, Any]]:
    """Assert that every ``data`` event is followed at once by a ``control`` event and that
    only those two types appear; return the control events' JSON."""
    controls: list[dict[str, Any]] = []
    for index, frame in enumerate(frames):
        assert frame.event in ("data", "control"), frame
        if frame.event == "data":
            assert index + 1 < len(frames) and frames[index + 1].event == "control", index
        else:
            controls.append(frame.json())
    return controls


# -- servers and users ------------------------------------------------------------------------

USERS = [f"ds{i:03d}" for i in range(100)]
_user_numbers = itertools.count()


def next_user() -> str:
    """A user no earlier test of this run has used (until ``USERS`` runs out and repeats)."""
    return USERS[next(_user_numbers) % len(USERS)]


def key_of(user: str) -> str:
    """The API key of ``user`` on the test servers."""
    return f"sk-{user}-0123456789abcdef"


def write_keys(directory: Path) -> Path:
    """A keys file with a key for every user in ``USERS``."""
    keys = directory / "keys.txt"
    keys.write_text("".join(f"{user}={key_of(user)}\n" for user in USERS))
    return keys


def store_args(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """Server flags for the store a fixture is parametrised with (``tests.backends``): none
    for SQLite, the session's ``redis_server`` under a prefix of its own for Redis."""
    if request.param != "redis":
        return ()
    redis_url = request.getfixturevalue("redis_server").url
    return ("--store", redis_url, "--redis-prefix", f"ds{uuid.uuid4().hex[:12]}:")


def module_server(
    tmp_path_factory: pytest.TempPathFactory, name: str, *args: str
) -> Iterator[Server]:
    """A server on a database of its own, with a short long-poll timeout, that accepts every
    key of ``USERS``; killed after."""
    directory = tmp_path_factory.mktemp(name)
    server = Server(
        db=directory / "keepstream.db",
        args=(*args, *DS_ARGS, "--api-keys-file", str(write_keys(directory))),
    )
    try:
        yield server.start()
    finally:
        server.kill()


def as_user(server: Server, user: str, **kwargs: Any) -> httpx.AsyncClient:
    """A client of ``server`` authenticated as ``user``."""
    return httpx.AsyncClient(
        base_url=server.url,
        timeout=REQUEST_TIMEOUT,
        headers={"Authorization": f"Bearer {key_of(user)}"},
        **kwargs,
    )
