"""Slow clients do not hold connections: a request head and a request body must arrive
within ``--request-head-timeout`` and ``--request-body-timeout``, idle keep-alive
connections are closed after the head deadline, and nothing else is affected (normal
requests, a keep-alive connection in use, an SSE stream longer than both deadlines).

One server per HTTP implementation (h11, httptools) for the whole module; every test opens
connections of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from anyio.abc import SocketStream
from uvicorn.server import ServerState

from web import Settings
from web._timeouts import build_http_protocol, timeout_counts

from .support import Server, read_events, start_generation, text_of

DEADLINE = 1.0  # both deadlines of the module's servers, in seconds
SLACK = 1.5  # how late a close may come on a loaded machine (uvicorn's keep-alive is 5 s)
EARLY = 0.2  # how early it may seem: the test and the server start their clocks apart
DRIP_INTERVAL = 0.3  # a slow client sends one byte this often
HTTP_IMPLEMENTATIONS = ["h11", "httptools"]

HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slow\r\n\r\n"
POST_HEAD = (
    b"POST /v1/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
)


@pytest.fixture(scope="module", params=HTTP_IMPLEMENTATIONS)
def deadline_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server with both deadlines at ``DEADLINE`` on ``--http`` h11 or httptools."""
    http: str = request.param
    server = Server(
        db=tmp_path_factory.mktemp(f"slow-{http}") / "keepstream.db",
        args=(
            *("--http", http),
            *("--request-head-timeout", str(DEADLINE)),
            *("--request-body-timeout", str(DEADLINE)),
            *("--sim-tokens-per-second", "200", "--sim-max-tokens", "40"),
        ),
    )
    try:
        yield server.start()
    finally:
        server.kill()


async def read_until_closed(stream: SocketStream, on_data: Callable[[], None]) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as a
    close); ``on_data`` is called when something arrives."""
    received = bytearray()
    while True:
        try:
            received += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return bytes(received)
        on_data()


async def drip(stream: SocketStream, data: bytes, stop: anyio.Event) -> None:
    """Send ``data`` one byte every ``DRIP_INTERVAL`` until it is all sent, the server hangs
    up, or ``stop`` is set."""
    for i in range(len(data)):
        if stop.is_set():
            return
        try:
            await stream.send(data[i : i + 1])
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        with anyio.move_on_after(DRIP_INTERVAL):
            await stop.wait()


async def time_to_close(
    port: int, *, at_once: bytes = b"", dripped: bytes = b""
) -> tuple[float, bytes]:
    """Connect, send ``at_once``, then drip ``dripped`` until the server answers or hangs up:
    the seconds from the head (or the connection) to the close, and what the server sent."""
    with anyio.fail_after(DEADLINE + SLACK + 5):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            if at_once:
                await stream.send(at_once)
            started = time.monotonic()
            answered = anyio.Event()  # stop dripping once the server answers
            async with anyio.create_task_group() as tg:
                tg.start_soon(drip, stream, dripped, answered)
                received = await read_until_closed(stream, answered.set)
                elapsed = time.monotonic() - started
                answered.set()
    return elapsed, received


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.1 response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def read_response(stream: SocketStream) -> tuple[int, dict[str, str], bytes]:
    """One response with a ``Content-Length`` from ``stream`` (a keep-alive connection)."""
    raw = bytearray()
    while b"\r\n\r\n" not in raw:
        raw += await stream.receive()
    status, headers, body = parse_response(bytes(raw))
    length = int(headers["content-length"])
    while len(body) < length:
        body += await stream.receive()
    return status, headers, body


def assert_on_time(elapsed: float) -> None:
    assert DEADLINE - EARLY <= elapsed <= DEADLINE + SLACK, elapsed


async def test_a_head_sent_byte_by_byte_is_cut_off(deadline_server: Server) -> None:
    elapsed, received = await time_to_close(deadline_server.port, dripped=HEAD)
    assert_on_time(elapsed)
    assert received == b""  # no answer: the connection is just closed


async def test_a_connection_that_sends_nothing_is_closed(deadline_server: Server) -> None:
    elapsed, received = await time_to_close(deadline_server.port)
    assert_on_time(elapsed)
    assert received == b""


async def test_a_body_sent_byte_by_byte_is_answered_408_and_cut_off(
    deadline_server: Server,
) -> None:
    body = json.dumps({"prompt": "x" * 70}).encode().ljust(100)
    elapsed, received = await time_to_close(deadline_server.port, at_once=POST_HEAD, dripped=body)
    assert_on_time(elapsed)
    status, headers, answer = parse_response(received)
    assert status == 408
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(answer)
    error = json.loads(answer)["error"]
    assert error["type"] == "request_timeout"
    assert error["message"]
    async with httpx.AsyncClient(base_url=deadline_server.url, timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200


async def test_an_idle_keep_alive_connection_is_closed_after_the_head_deadline(
    deadline_server: Server,
) -> None:
    with anyio.fail_after(DEADLINE + SLACK + 5):
        async with await anyio.connect_tcp("127.0.0.1", deadline_server.port) as stream:
            await stream.send(HEAD)
            status, headers, _ = await read_response(stream)
            started = time.monotonic()
            assert status == 200
            assert headers.get("connection") != "close"
            assert await read_until_closed(stream, lambda: None) == b""
            assert_on_time(time.monotonic() - started)


async def test_requests_within_the_deadlines_are_not_affected(deadline_server: Server) -> None:
    with anyio.fail_after(30):
        # A keep-alive connection in use for longer than the head deadline: each response
        # starts the deadline over.
        async with httpx.AsyncClient(base_url=deadline_server.url, timeout=10) as http:
            for _ in range(4):
                assert (await http.get("/healthz")).status_code == 200
                await anyio.sleep(DEADLINE / 2)
            generation = await start_generation(http, prompt="hello")
            assert generation["status"] in ("queued", "running", "completed")
        # A head and a body that each arrive in two parts, within their deadlines.
        body = json.dumps({"prompt": "in two parts"}).encode()
        head = POST_HEAD.replace(b"Content-Length: 100", f"Content-Length: {len(body)}".encode())
        async with await anyio.connect_tcp("127.0.0.1", deadline_server.port) as stream:
            for part in (head[:20], head[20:], body[:5]):
                await stream.send(part)
                await anyio.sleep(DEADLINE / 4)
            await stream.send(body[5:])
            status, _, answer = await read_response(stream)
        assert status == 202, answer


async def test_an_sse_stream_longer_than_both_deadlines_is_not_affected(
    deadline_server: Server,
) -> None:
    async with httpx.AsyncClient(base_url=deadline_server.url, timeout=30) as http:
        generation = await start_generation(
            http, prompt="x", params={"tokens_per_second": 5, "max_tokens": 20}
        )
        started = time.monotonic()
        events = await read_events(http, generation["id"], timeout=20)
        assert time.monotonic() - started > 3 * DEADLINE  # about 4 s at 5 tokens/s
    assert events[-1].event == "status"
    assert events[-1].json()["status"] == "completed"
    assert text_of(events)


# -- in process: the counters and the settings -------------------------------------------------


async def ok_app(scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
    """Reads the whole body, answers 200 ``ok``."""
    while (await receive()).get("more_body"):
        pass
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("http", HTTP_IMPLEMENTATIONS)
async def test_closed_connections_are_counted(http: str) -> None:
    deadline = 0.2
    protocol = build_http_protocol(http, head_timeout=deadline, body_timeout=deadline)
    config = uvicorn.Config(ok_app, http=protocol, lifespan="off", log_config=None)
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    # What uvicorn's server does with the class: one protocol per connection.
    listener = await loop.create_server(
        lambda: protocol(config=config, server_state=state, app_state={}, _loop=loop),  # type: ignore[call-arg]
        "127.0.0.1",
        0,
    )
    try:
        port = listener.sockets[0].getsockname()[1]
        before = (timeout_counts.head_timeouts, timeout_counts.body_timeouts)
        with anyio.fail_after(10):
            async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(HEAD)
                status, _, body = await read_response(stream)
                assert (status, body) == (200, b"ok")
            assert (timeout_counts.head_timeouts, timeout_counts.body_timeouts) == before
            _, received = await time_to_close(port, dripped=b"GET / HTTP/1.1\r\n")
            assert received == b""
            assert timeout_counts.head_timeouts == before[0] + 1
            _, received = await time_to_close(port, at_once=POST_HEAD, dripped=b"{}")
            assert parse_response(received)[0] == 408
            assert timeout_counts.body_timeouts == before[1] + 1
    finally:
        listener.close()
        await listener.wait_closed()


@pytest.mark.parametrize(
    "http, expected",
    [("h11", "H11Protocol"), ("httptools", "HttpToolsProtocol"), ("auto", "HttpToolsProtocol")],
)
def test_each_http_choice_gets_its_uvicorn_protocol(http: str, expected: str) -> None:
    protocol = build_http_protocol(http, head_timeout=3, body_timeout=4)
    assert expected in [base.__name__ for base in protocol.__mro__]
    assert protocol.head_timeout == 3  # type: ignore[attr-defined]
    assert protocol.body_timeout == 4  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["request_head_timeout", "request_body_timeout"])
def test_negative_deadlines_are_refused(name: str) -> None:
    flag = "--" + name.replace("_", "-")
    settings = Settings.from_args([flag, "2.5"], env={})
    assert getattr(settings, name) == 2.5
    Settings.from_args([flag, "0"], env={}).validate()  # 0: no deadline
    with pytest.raises(ValueError, match=name):
        Settings.from_args([flag, "-1"], env={}).validate()
