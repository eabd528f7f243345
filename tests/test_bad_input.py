"""Bad input gets a clear 4xx: the JSON error shape, a message naming the problem, and never a
500 or a hang.

Offsets (``?offset=``, ``Last-Event-ID``, ``?text_offset=``), unknown ids, request bodies that
do not parse or do not describe a generation, oversized bodies (with and without
Content-Length), wrong methods and unknown routes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from .support import Server, final_status, read_events, start_generation, text_of

REQUEST_TIMEOUT = 10.0
MAX_BODY_BYTES = 1000

ERROR_TYPES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_request",
}


@dataclass(frozen=True)
class Finished:
    """A completed generation to aim bad offsets at."""

    id: str
    next_offset: int
    text: str


@pytest.fixture(scope="module")
def bad_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: an instant simulated model, bodies limited to 1000 bytes."""
    server = Server(
        db=tmp_path_factory.mktemp("bad-input") / "keepstream.db",
        args=(
            "--max-body-bytes",
            str(MAX_BODY_BYTES),
            "--sim-tokens-per-second",
            "0",
            "--sim-max-tokens",
            "8",
            "--shutdown-grace",
            "1",
        ),
    )
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def finished(bad_server: Server) -> Finished:
    """A completed generation on ``bad_server``."""
    with httpx.Client(base_url=bad_server.url, timeout=REQUEST_TIMEOUT) as http:
        response = http.post("/v1/generations", json={"prompt": "offsets"})
        assert response.status_code == 202, response.text
        generation_id = response.json()["id"]
        with http.stream("GET", f"/v1/generations/{generation_id}/events") as events:
            events.read()  # the stream ends when the generation does
        snapshot = http.get(f"/v1/generations/{generation_id}").json()
    assert snapshot["status"] == "completed", snapshot
    assert snapshot["text"]
    return Finished(generation_id, snapshot["next_offset"], snapshot["text"])


@pytest.fixture
async def bad_client(bad_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=bad_server.url, timeout=REQUEST_TIMEOUT) as http:
        yield http


def assert_error(response: httpx.Response, status: int, *fragments: str) -> None:
    """``response`` is ``status`` with exactly ``{"error": {"type", "message"}}``, the type
    that status maps to, and a message containing every fragment."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == ERROR_TYPES[status], body
    message = body["error"]["message"]
    assert isinstance(message, str)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def assert_client_error(response: httpx.Response) -> None:
    """Some 4xx with the JSON error shape (for bugs whose exact fix is not ours to choose)."""
    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body


async def request(
    client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> httpx.Response:
    with anyio.fail_after(REQUEST_TIMEOUT):
        return await client.request(method, url, **kwargs)


async def get_events(
    client: httpx.AsyncClient, generation_id: str, where: str, value: str | bytes
) -> httpx.Response:
    """``GET .../events`` with ``value`` as ``?offset=``, ``?text_offset=`` or
    ``Last-Event-ID``; the body is read only if it is not an event stream."""
    url = f"/v1/generations/{generation_id}/events"
    if where == "last-event-id":
        kwargs: dict[str, Any] = {"headers": {"Last-Event-ID": value}}
    else:
        kwargs = {"params": {where: value}}
    with anyio.fail_after(REQUEST_TIMEOUT):
        async with client.stream("GET", url, **kwargs) as response:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                await response.aread()
            return response


# -- offsets ----------------------------------------------------------------------------------

PARAMETER_NAMES = {
    "offset": "offset",
    "last-event-id": "Last-Event-ID",
    "text_offset": "text_offset",
}

NOT_INTEGERS = [
    ("-1", "negative"),
    ("abc", "letters"),
    ("1.5", "fraction"),
    ("\u0661\u0662", "arabic-indic-digits"),
    ("\uff11\uff12", "fullwidth-digits"),
    ("\u00b2", "superscript-two"),
    ("+1", "plus-sign"),
    ("0x10", "hex"),
    ("1e3", "exponent"),
    ("", "empty"),
]
NOT_INTEGER_CASES = [
    (where, value)
    for where in PARAMETER_NAMES
    for value, _ in NOT_INTEGERS
    if not (where == "last-event-id" and value == "")  # an empty header means "no header"
]
NOT_INTEGER_IDS = [
    f"{where}-{name}"
    for where in PARAMETER_NAMES
    for value, name in NOT_INTEGERS
    if not (where == "last-event-id" and value == "")
]


@pytest.mark.parametrize(("where", "value"), NOT_INTEGER_CASES, ids=NOT_INTEGER_IDS)
async def test_offset_that_is_not_a_non_negative_integer_is_400(
    bad_client: httpx.AsyncClient, finished: Finished, where: str, value: str
) -> None:
    # Header values go as UTF-8 bytes: httpx only encodes str headers as ASCII.
    sent: str | bytes = value.encode() if where == "last-event-id" else value
    response = await get_events(bad_client, finished.id, where, sent)
    assert_error(response, 400, PARAMETER_NAMES[where], "non-negative integer")


BEYOND_END: list[tuple[str, Callable[[Finished], int], str]] = [
    ("offset", lambda g: g.next_offset + 1, "beyond the end"),
    ("offset", lambda g: 10**30, "beyond the end"),
    ("last-event-id", lambda g: g.next_offset + 1, "beyond the end"),
    ("last-event-id", lambda g: 2**63, "beyond the end"),
    ("text_offset", lambda g: len(g.text) + 1, "beyond the text"),
    ("text_offset", lambda g: 10**30, "beyond the text"),
]


@pytest.mark.parametrize(
    ("where", "value", "message"),
    BEYOND_END,
    ids=[
        "offset-end+1",
        "offset-huge",
        "last-event-id-end+1",
        "last-event-id-2**63",
        "text_offset-end+1",
        "text_offset-huge",
    ],
)
async def test_offset_beyond_the_end_is_400(
    bad_client: httpx.AsyncClient,
    finished: Finished,
    where: str,
    value: Callable[[Finished], int],
    message: str,
) -> None:
    response = await get_events(bad_client, finished.id, where, str(value(finished)))
    assert_error(response, 400, message)


@pytest.mark.parametrize("where", list(PARAMETER_NAMES), ids=list(PARAMETER_NAMES))
async def test_offset_with_thousands_of_digits_is_400(
    bad_client: httpx.AsyncClient, finished: Finished, where: str
) -> None:
    response = await get_events(bad_client, finished.id, where, "9" * 5000)
    assert_error(response, 400)


async def test_offsets_at_the_end_are_not_errors(
    bad_client: httpx.AsyncClient, finished: Finished
) -> None:
    end = str(finished.next_offset)
    for where in ("offset", "last-event-id"):
        response = await get_events(bad_client, finished.id, where, end)
        assert response.status_code == 204, (where, response.text)
    events = await read_events(bad_client, finished.id, params={"text_offset": len(finished.text)})
    assert text_of(events) == ""
    assert final_status(events) == "completed"


async def test_offset_beyond_the_end_of_a_running_generation_is_400(
    bad_client: httpx.AsyncClient,
) -> None:
    with anyio.fail_after(REQUEST_TIMEOUT):
        generation = await start_generation(
            bad_client, prompt="slow", params={"tokens_per_second": 5, "max_tokens": 1000}
        )
    try:
        for where, message in (
            ("offset", "beyond the end"),
            ("last-event-id", "beyond the end"),
            ("text_offset", "beyond the text"),
        ):
            response = await get_events(bad_client, generation["id"], where, "1000000")
            assert_error(response, 400, message)
    finally:
        response = await request(bad_client, "POST", f"/v1/generations/{generation['id']}/cancel")
        assert response.status_code == 200, response.text


# -- unknown ids ------------------------------------------------------------------------------

UNKNOWN_IDS = [
    ("gen_doesnotexist", "gen_doesnotexist"),
    ("gen_AAAAAAAAAAAAAAAAAAAAAA", "gen_AAAAAAAAAAAAAAAAAAAAAA"),
    ("%F0%9F%99%82", "🙂"),
    ("1%27%20OR%20%271%27%3D%271", "1' OR '1'='1"),
    ("x" * 2000, "x" * 2000),
]
ENDPOINTS = [("GET", ""), ("GET", "/events"), ("POST", "/cancel")]


@pytest.mark.parametrize(("method", "suffix"), ENDPOINTS, ids=["get", "events", "cancel"])
@pytest.mark.parametrize(
    ("raw", "decoded"),
    UNKNOWN_IDS,
    ids=["plain", "well-formed", "emoji", "sql-quote", "2000-chars"],
)
async def test_unknown_generation_is_404(
    bad_client: httpx.AsyncClient, method: str, suffix: str, raw: str, decoded: str
) -> None:
    response = await request(bad_client, method, f"/v1/generations/{raw}{suffix}")
    assert_error(response, 404, "not found", decoded)


# -- request bodies ---------------------------------------------------------------------------


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


MESSAGE = {"role": "user", "content": "hi"}

BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("truncated-json", b'{"prompt": "hi"', 400, "malformed JSON"),
    ("single-quotes", b"{'prompt': 'hi'}", 400, "malformed JSON"),
    ("trailing-garbage", b'{"prompt": "hi"} {}', 400, "malformed JSON"),
    ("invalid-utf8", b'{"prompt": "\xff\xfe"}', 400, "malformed JSON"),
    ("whitespace-only", b"  \n ", 400, "malformed JSON"),
    ("empty", b"", 400, "empty"),
    ("array", body([MESSAGE]), 422, "must be a JSON object"),
    ("string", body("hi"), 422, "must be a JSON object"),
    ("number", body(42), 422, "must be a JSON object"),
    ("null", body(None), 422, "must be a JSON object"),
    ("no-prompt-or-messages", body({}), 422, "exactly one of 'messages' or 'prompt'"),
    ("only-params", body({"params": {}}), 422, "exactly one of 'messages' or 'prompt'"),
    (
        "both-prompt-and-messages",
        body({"prompt": "hi", "messages": [MESSAGE]}),
        422,
        "exactly one of 'messages' or 'prompt'",
    ),
    ("empty-prompt", body({"prompt": ""}), 422, "'prompt' must be a non-empty string"),
    ("prompt-number", body({"prompt": 5}), 422, "'prompt' must be a non-empty string"),
    ("prompt-null", body({"prompt": None}), 422, "'prompt' must be a non-empty string"),
    ("messages-string", body({"messages": "hi"}), 422, "'messages' must be a non-empty list"),
    ("messages-empty", body({"messages": []}), 422, "'messages' must be a non-empty list"),
    ("message-not-object", body({"messages": ["hi"]}), 422, "messages[0] must be an object"),
    (
        "bad-role",
        body({"messages": [{"role": "wizard", "content": "hi"}]}),
        422,
        "messages[0].role must be one of",
    ),
    (
        "missing-role",
        body({"messages": [{"content": "hi"}]}),
        422,
        "messages[0].role must be one of",
    ),
    (
        "bad-role-second",
        body({"messages": [MESSAGE, {"role": "USER", "content": "hi"}]}),
        422,
        "messages[1].role must be one of",
    ),
    (
        "role-object",  # found by schemathesis: an unhashable role answered 500
        body({"messages": [{"role": {"a": 1}, "content": "x"}]}),
        422,
        "messages[0].role must be one of",
    ),
    (
        "role-list",
        body({"messages": [{"role": ["user"], "content": "x"}]}),
        422,
        "messages[0].role must be one of",
    ),
    (
        "content-number",
        body({"messages": [{"role": "user", "content": 5}]}),
        422,
        "messages[0].content must be a string",
    ),
    (
        "content-missing",
        body({"messages": [{"role": "user"}]}),
        422,
        "messages[0].content must be a string",
    ),
    (
        "content-parts-list",
        body({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        422,
        "messages[0].content must be a string",
    ),
    (
        "unknown-field",
        body({"prompt": "hi", "temperature": 1}),
        422,
        "unknown field(s): temperature",
    ),
    (
        "unknown-fields",
        body({"prompt": "hi", "stream": True, "n": 2}),
        422,
        "unknown field(s): n, stream",
    ),
    (
        "unknown-provider",
        body({"prompt": "hi", "provider": "nope"}),
        422,
        "unknown provider 'nope'",
    ),
    (
        "unconfigured-openai",
        body({"prompt": "hi", "provider": "openai"}),
        422,
        "unknown provider 'openai'",
    ),
    (
        "empty-provider",
        body({"prompt": "hi", "provider": ""}),
        422,
        "'provider' must be a non-empty string",
    ),
    ("model-number", body({"prompt": "hi", "model": 5}), 422, "'model' must be a non-empty string"),
    ("params-list", body({"prompt": "hi", "params": []}), 422, "'params' must be an object"),
    (
        "max-tokens-negative",
        body({"prompt": "hi", "params": {"max_tokens": -1}}),
        422,
        "params.max_tokens",
    ),
    (
        "max-tokens-fraction",
        body({"prompt": "hi", "params": {"max_tokens": 1.5}}),
        422,
        "params.max_tokens",
    ),
    (
        "max-tokens-string",
        body({"prompt": "hi", "params": {"max_tokens": "10"}}),
        422,
        "params.max_tokens",
    ),
    (
        "max-tokens-bool",
        body({"prompt": "hi", "params": {"max_tokens": True}}),
        422,
        "params.max_tokens",
    ),
    (
        "max-tokens-too-many",
        body({"prompt": "hi", "params": {"max_tokens": 10**7}}),
        422,
        "params.max_tokens",
    ),
    (
        "tokens-per-second-word",
        body({"prompt": "hi", "params": {"tokens_per_second": "fast"}}),
        422,
        "params.tokens_per_second",
    ),
    (
        "tokens-per-second-negative",
        body({"prompt": "hi", "params": {"tokens_per_second": -1}}),
        422,
        "params.tokens_per_second",
    ),
    (
        "tokens-per-second-nan",
        b'{"prompt": "hi", "params": {"tokens_per_second": NaN}}',
        400,
        "malformed JSON",
    ),
    (
        "tokens-per-second-infinity",
        b'{"prompt": "hi", "params": {"tokens_per_second": Infinity}}',
        400,
        "malformed JSON",
    ),
    ("echo-string", body({"prompt": "hi", "params": {"echo": "yes"}}), 422, "params.echo"),
    (
        "fail-after-negative",
        body({"prompt": "hi", "params": {"fail_after": -1}}),
        422,
        "params.fail_after",
    ),
    (
        "unknown-simulated-param",
        body({"prompt": "hi", "params": {"temperature": 0.5}}),
        422,
        "unknown simulated params: temperature",
    ),
]


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
async def test_bad_request_body_is_rejected(
    bad_client: httpx.AsyncClient, content: bytes, status: int, message: str
) -> None:
    response = await request(
        bad_client,
        "POST",
        "/v1/generations",
        content=content,
        headers={"Content-Type": "application/json"},
    )
    assert_error(response, status, message)


@pytest.mark.parametrize(
    ("content", "status"),
    [(b"{", 400), (body({}), 422), (body({"prompt": "hi", "params": {"max_tokens": -1}}), 422)],
    ids=["malformed", "missing-prompt", "bad-param"],
)
async def test_bad_body_asking_for_an_event_stream_still_gets_a_json_error(
    bad_client: httpx.AsyncClient, content: bytes, status: int
) -> None:
    response = await request(
        bad_client,
        "POST",
        "/v1/generations",
        content=content,
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    assert_error(response, status)


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": "\\ud83d"}', b'{"messages": [{"role": "user", "content": "a \\ude00 b"}]}'],
    ids=["prompt-lone-high-surrogate", "content-lone-low-surrogate"],
)
async def test_lone_surrogate_in_request_text_is_rejected(
    bad_client: httpx.AsyncClient, content: bytes
) -> None:
    response = await request(bad_client, "POST", "/v1/generations", content=content)
    if response.status_code == 202:  # let it end before the module's server is killed
        generation_id = response.json()["id"]
        await read_events(bad_client, generation_id, timeout=REQUEST_TIMEOUT)
    assert_client_error(response)


async def test_deeply_nested_json_is_rejected(client: httpx.AsyncClient) -> None:
    depth = 5000  # 10 kB: far below the default body limit
    response = await request(client, "POST", "/v1/generations", content=b"[" * depth + b"]" * depth)
    assert_client_error(response)


# -- oversized bodies -------------------------------------------------------------------------


def padded_body(size: int) -> bytes:
    """A valid request body of exactly ``size`` bytes."""
    template = '{"prompt": "%s", "params": {"max_tokens": 1}}'
    padding = size - len(template % "")
    assert padding > 0
    return (template % ("x" * padding)).encode()


async def chunked(content: bytes, piece: int = 100) -> AsyncIterator[bytes]:
    """``content`` as a streamed body: httpx sends it chunked, without Content-Length."""
    for start in range(0, len(content), piece):
        yield content[start : start + piece]


@pytest.mark.parametrize(
    "transfer", ["content-length", "chunked"], ids=["content-length", "chunked"]
)
@pytest.mark.parametrize(
    ("size", "status"),
    [(MAX_BODY_BYTES, 202), (MAX_BODY_BYTES + 1, 413), (5_000_000, 413)],
    ids=["at-limit", "limit+1", "5MB"],
)
async def test_body_over_the_limit_is_413(
    bad_server: Server, transfer: str, size: int, status: int
) -> None:
    content = padded_body(size) if size < 10_000 else b"x" * size
    # A fresh client per case: a 413 may leave the connection closed behind it.
    async with httpx.AsyncClient(base_url=bad_server.url, timeout=REQUEST_TIMEOUT) as client:
        sent: bytes | AsyncIterator[bytes] = content
        if transfer == "chunked":
            sent = chunked(content, piece=100 if size < 10_000 else 65536)
        response = await request(client, "POST", "/v1/generations", content=sent)
        assert ("content-length" in response.request.headers) == (transfer != "chunked")
        if status == 202:
            assert response.status_code == 202, response.text
            await read_events(client, response.json()["id"], timeout=REQUEST_TIMEOUT)
        else:
            assert_error(response, 413, str(MAX_BODY_BYTES))


# -- methods and routes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/generations", "POST"),
        ("PUT", "/v1/generations", "POST"),
        ("DELETE", "/v1/generations/gen_x", "GET"),
        ("POST", "/v1/generations/gen_x", "GET"),
        ("POST", "/v1/generations/gen_x/events", "GET"),
        ("GET", "/v1/generations/gen_x/cancel", "POST"),
        ("POST", "/healthz", "GET"),
    ],
    ids=[
        "get-collection",
        "put-collection",
        "delete-generation",
        "post-generation",
        "post-events",
        "get-cancel",
        "post-healthz",
    ],
)
async def test_wrong_method_is_405(
    bad_client: httpx.AsyncClient, method: str, path: str, allowed: str
) -> None:
    response = await request(bad_client, method, path)
    assert_error(response, 405, "Method Not Allowed")
    assert allowed in response.headers["allow"]


@pytest.mark.parametrize(
    "path",
    ["/nope", "/v1", "/v1/chat/completions", "/v1/generations/gen_x/events/more"],
    ids=["nope", "v1", "chat-completions", "below-events"],
)
async def test_unknown_route_is_404(bad_client: httpx.AsyncClient, path: str) -> None:
    for method in ("GET", "POST"):
        response = await request(bad_client, method, path)
        assert_error(response, 404, "Not Found")
