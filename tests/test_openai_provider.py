"""The openai provider against a real OpenAI-compatible upstream (``fake_upstream``): the text,
the usage and the request it sends; and every way an upstream can fail — an error status, a
dropped connection, a stall, a malformed chunk — ends the generation ``failed`` with a reason
and the text received so far kept."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from .conftest import UPSTREAM_READ_TIMEOUT, ServerFactory, openai_args
from .fake_upstream import (
    DONE,
    FakeUpstream,
    Framing,
    Gate,
    Received,
    Reply,
    Step,
    answer,
    completion_chunk,
    error_reply,
    paced,
    sse_data,
    usage_of,
)
from .support import (
    final_status,
    free_port,
    get_snapshot,
    read_events,
    start_generation,
    text_of,
)

REQUEST_TIMEOUT = 10.0

DELTAS = ("The ", "quick", " brown ", "fox", " jumps.")


async def run_to_end(
    client: httpx.AsyncClient, prompt: str, **body: Any
) -> tuple[dict[str, Any], list[ServerSentEvent]]:
    """Start a generation, follow its events to the end; return the final snapshot and them."""
    with anyio.fail_after(REQUEST_TIMEOUT):
        generation = await start_generation(client, prompt=prompt, **body)
    events = await read_events(client, generation["id"], timeout=REQUEST_TIMEOUT)
    return await get_snapshot(client, generation["id"]), events


async def follow_opening_gate(
    client: httpx.AsyncClient, generation_id: str, text: str, gate: Gate
) -> list[ServerSentEvent]:
    """Follow the events live; open ``gate`` once the deltas received spell ``text``."""
    events: list[ServerSentEvent] = []
    with anyio.fail_after(REQUEST_TIMEOUT):
        async with aconnect_sse(client, "GET", f"/v1/generations/{generation_id}/events") as source:
            assert source.response.status_code == 200
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue
                events.append(sse)
                if sse.event == "delta" and text_of(events) == text:
                    gate.open()
    return events


def upstream_request(upstream: FakeUpstream, prompt: str) -> Received:
    """The one request the upstream received for ``prompt``."""
    received = upstream.requests_for(prompt)
    assert len(received) == 1, received
    return received[0]


async def wait_for_hang_up(received: Received) -> bool:
    """Whether keepstream closed its upstream connection (within a few seconds)."""
    with anyio.fail_after(REQUEST_TIMEOUT):
        hung_up: bool = await anyio.to_thread.run_sync(received.hung_up.wait, 5.0)
    return hung_up


def assert_status_event(events: list[ServerSentEvent], snapshot: dict[str, Any]) -> None:
    """The last event is the terminal status, agreeing with the snapshot."""
    assert events, "no events"
    last = events[-1]
    assert last.event == "status"
    data = last.json()
    assert data["status"] == snapshot["status"]
    assert data.get("error") == snapshot["error"]
    assert data.get("usage") == snapshot["usage"]
    ids = [int(sse.id) for sse in events]
    assert ids == list(range(1, len(events) + 1))
    assert ids[-1] == snapshot["next_offset"]


# -- answers ----------------------------------------------------------------------------------

ANSWERS: list[tuple[Reply, dict[str, int] | None]] = [
    (Reply(answer(DELTAS, usage=(11, 5))), usage_of(11, 5)),
    (Reply(answer(DELTAS)), None),
    (Reply(answer(DELTAS, usage=(11, 5)), framing="close"), usage_of(11, 5)),
    # Some servers end after the finish_reason without [DONE]: the answer is still complete.
    (Reply(answer(DELTAS, done=False), framing="close"), None),
]


@pytest.mark.parametrize(
    ("reply", "usage"),
    ANSWERS,
    ids=["chunked-with-usage", "no-usage-chunk", "close-framed", "finish-reason-without-done"],
)
async def test_answer_completes_with_the_upstream_text_and_usage(
    openai_client: httpx.AsyncClient,
    upstream: FakeUpstream,
    reply: Reply,
    usage: dict[str, int] | None,
) -> None:
    prompt = upstream.expect(reply, label="answer")
    snapshot, events = await run_to_end(openai_client, prompt)
    assert snapshot["status"] == "completed", snapshot
    assert snapshot["text"] == "".join(DELTAS)
    assert text_of(events) == "".join(DELTAS)
    assert snapshot["usage"] == usage
    assert snapshot["error"] is None
    assert snapshot["provider"] == "openai"
    assert final_status(events) == "completed"
    assert_status_event(events, snapshot)


@pytest.mark.parametrize(
    ("extra", "model", "params"),
    [
        ({}, "test-model", {}),
        (
            {"model": "other-model", "params": {"temperature": 0.25, "max_tokens": 7}},
            "other-model",
            {"temperature": 0.25, "max_tokens": 7},
        ),
    ],
    ids=["server-default-model", "request-model-and-params"],
)
async def test_upstream_receives_messages_model_and_stream(
    openai_client: httpx.AsyncClient,
    upstream: FakeUpstream,
    extra: dict[str, Any],
    model: str,
    params: dict[str, Any],
) -> None:
    prompt = upstream.expect(Reply(answer(DELTAS)), label="request")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something 日本語 🙂"},
        {"role": "assistant", "content": "Something."},
        {"role": "user", "content": prompt},
    ]
    with anyio.fail_after(REQUEST_TIMEOUT):
        generation = await start_generation(openai_client, messages=messages, **extra)
    await read_events(openai_client, generation["id"], timeout=REQUEST_TIMEOUT)
    received = upstream_request(upstream, prompt)
    assert received.method == "POST"
    assert received.path == "/v1/chat/completions"
    assert received.headers["content-type"] == "application/json"
    body = received.body
    assert isinstance(body, dict)
    assert body["messages"] == messages
    assert body["model"] == model
    assert body["stream"] is True
    for name, value in params.items():
        assert body[name] == value
    assert "authorization" not in received.headers  # no key configured


async def test_api_key_is_sent_as_a_bearer_token(
    server_factory: ServerFactory, upstream: FakeUpstream
) -> None:
    server = server_factory(
        *openai_args(upstream),
        env={"KEEPSTREAM_UPSTREAM_API_KEY": "sk-test-123"},
    )
    prompt = upstream.expect(Reply(answer(DELTAS)), label="key")
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
        snapshot, _ = await run_to_end(client, prompt)
    assert snapshot["status"] == "completed", snapshot
    assert upstream_request(upstream, prompt).headers["authorization"] == "Bearer sk-test-123"


async def test_zero_read_timeout_means_no_limit(
    server_factory: ServerFactory, upstream: FakeUpstream
) -> None:
    server = server_factory(
        *openai_args(upstream),
        "--upstream-read-timeout",
        "0",
    )
    prompt = upstream.expect(Reply(paced(answer(DELTAS), 0.02)), label="no-timeout")
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
        snapshot, _ = await run_to_end(client, prompt)
    assert snapshot["status"] == "completed", snapshot
    assert snapshot["text"] == "".join(DELTAS)


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            error_reply(500, "The server had an error while processing your request."),
            "The server had an error while processing your request.",
        ),
        (
            error_reply(429, "Rate limit reached for test-model.", kind="requests"),
            "Rate limit reached for test-model.",
        ),
        (
            error_reply(
                404, "The model `test-model` does not exist.", kind="invalid_request_error"
            ),
            "The model `test-model` does not exist.",
        ),
        (
            Reply([b"Bad Gateway"], status=502, content_type="text/plain", framing="length"),
            "Bad Gateway",
        ),
    ],
    ids=["500-json", "429-json", "404-json", "502-plain-text"],
)
async def test_upstream_error_status_fails_with_its_message(
    openai_client: httpx.AsyncClient, upstream: FakeUpstream, reply: Reply, message: str
) -> None:
    prompt = upstream.expect(reply, label="status")
    snapshot, events = await run_to_end(openai_client, prompt)
    assert snapshot["status"] == "failed", snapshot
    assert snapshot["error"]["type"] == "upstream_error"
    assert message in snapshot["error"]["message"]
    assert str(reply.status) in snapshot["error"]["message"]
    assert snapshot["text"] == ""
    assert text_of(events) == ""
    assert_status_event(events, snapshot)


@pytest.mark.parametrize(
    ("framing", "message"),
    [
        ("chunked", "upstream connection failed"),
        ("close", "upstream stream ended before the answer was complete"),
    ],
    ids=["chunked-body-cut-short", "eof-without-done"],
)
async def test_dropped_stream_fails_and_keeps_the_partial_text(
    openai_client: httpx.AsyncClient, upstream: FakeUpstream, framing: Framing, message: str
) -> None:
    gate = upstream.gate()
    partial = "".join(DELTAS[:3])
    steps: list[Step] = [completion_chunk(role="assistant", content="")]
    steps.extend(completion_chunk(text) for text in DELTAS[:3])
    steps.append(gate)  # drop only once the client has seen the partial text live
    prompt = upstream.expect(Reply(steps, framing=framing, end="drop"), label="drop")
    with anyio.fail_after(REQUEST_TIMEOUT):
        generation = await start_generation(openai_client, prompt=prompt)
    events = await follow_opening_gate(openai_client, generation["id"], partial, gate)
    snapshot = await get_snapshot(openai_client, generation["id"])
    assert snapshot["status"] == "failed", snapshot
    assert snapshot["error"]["type"] == "upstream_dropped"
    assert message in snapshot["error"]["message"]
    assert snapshot["text"] == partial
    assert text_of(events) == partial
    assert_status_event(events, snapshot)
    # A client resuming from the text it already has gets only the final status.
    resumed = await read_events(
        openai_client,
        generation["id"],
        params={"text_offset": len(partial)},
        timeout=REQUEST_TIMEOUT,
    )
    assert text_of(resumed) == ""
    assert final_status(resumed) == "failed"


@pytest.mark.parametrize(
    ("send_head", "sent"),
    # A stall before the response head is retried: tests/test_upstream_faults.py covers it.
    [(True, ()), (True, DELTAS[:2])],
    ids=["stall-before-any-text", "stall-after-some-text"],
)
async def test_stalled_upstream_fails_after_the_read_timeout(
    openai_client: httpx.AsyncClient,
    upstream: FakeUpstream,
    send_head: bool,
    sent: tuple[str, ...],
) -> None:
    steps: list[Step] = []
    if send_head:
        steps.append(completion_chunk(role="assistant", content=""))
        steps.extend(completion_chunk(text) for text in sent)
    reply = Reply(steps, end="stall", send_head=send_head)
    prompt = upstream.expect(reply, label="stall")
    started = anyio.current_time()
    snapshot, events = await run_to_end(openai_client, prompt)
    elapsed = anyio.current_time() - started
    assert snapshot["status"] == "failed", snapshot
    assert snapshot["error"]["type"] == "upstream_timeout"
    assert "timed out" in snapshot["error"]["message"]
    assert elapsed >= UPSTREAM_READ_TIMEOUT * 0.9
    assert snapshot["text"] == "".join(sent)
    assert text_of(events) == "".join(sent)
    assert_status_event(events, snapshot)
    assert await wait_for_hang_up(upstream_request(upstream, prompt))


BAD_STREAMS: list[tuple[list[Step], str, str]] = [
    (
        [
            *[sse_data('{"id": "chatcmpl-fake", "choices": [{"index": 0, "delta": {"content": "x"')]
            * 4,
            DONE,
        ],
        "upstream_malformed",
        "malformed events",
    ),
    # Up to 3 malformed chunks are skipped and counted; the 4th fails the answer.
    ([*[sse_data("[1, 2, 3]")] * 4, DONE], "upstream_malformed", "malformed events"),
    ([*[sse_data("this is not json")] * 4, DONE], "upstream_malformed", "malformed events"),
    (
        [sse_data('{"error": {"message": "The model is overloaded.", "type": "server_error"}}')],
        "upstream_error",
        "The model is overloaded.",
    ),
    # The body ends cleanly, but with neither a finish_reason nor [DONE]: the answer is cut.
    ([], "upstream_dropped", "ended before the answer was complete"),
]


@pytest.mark.parametrize(
    ("bad", "kind", "message"),
    BAD_STREAMS,
    ids=[
        "truncated-json",
        "json-array",
        "not-json",
        "error-object-mid-stream",
        "clean-end-without-done",
    ],
)
async def test_bad_chunk_fails_and_keeps_the_text_before_it(
    openai_client: httpx.AsyncClient,
    upstream: FakeUpstream,
    bad: list[Step],
    kind: str,
    message: str,
) -> None:
    steps: list[Step] = [completion_chunk(role="assistant", content="")]
    steps.extend(completion_chunk(text) for text in DELTAS[:2])
    steps.append(0.05)  # let the good text be committed on its own first
    steps.extend(bad)
    prompt = upstream.expect(Reply(steps), label="bad")
    snapshot, events = await run_to_end(openai_client, prompt)
    assert snapshot["status"] == "failed", snapshot
    assert snapshot["error"]["type"] == kind
    assert message in snapshot["error"]["message"]
    assert snapshot["text"] == "".join(DELTAS[:2])
    assert text_of(events) == "".join(DELTAS[:2])
    assert_status_event(events, snapshot)


async def test_upstream_that_does_not_stream_events_fails(
    openai_client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    body = b'{"id": "chatcmpl-fake", "object": "chat.completion", "choices": []}'
    prompt = upstream.expect(
        Reply([body], content_type="application/json", framing="length"), label="not-sse"
    )
    snapshot, events = await run_to_end(openai_client, prompt)
    assert snapshot["status"] == "failed", snapshot
    assert snapshot["error"]["type"] == "upstream_error"
    assert "text/event-stream" in snapshot["error"]["message"]
    assert_status_event(events, snapshot)


async def test_unreachable_upstream_fails(server_factory: ServerFactory) -> None:
    server = server_factory(
        "--provider",
        "openai",
        "--model",
        "test-model",
        "--upstream-url",
        f"http://127.0.0.1:{free_port()}/v1",
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT) as client:
        snapshot, events = await run_to_end(client, "anyone there?")
    assert snapshot["status"] == "failed", snapshot
    assert snapshot["error"]["type"] == "upstream_dropped"
    assert "ConnectError" in snapshot["error"]["message"]
    assert_status_event(events, snapshot)


async def test_cancel_closes_the_upstream_connection(
    openai_client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    steps: list[Step] = [
        completion_chunk(role="assistant", content=""),
        completion_chunk("partial "),
        upstream.gate(),
    ]  # never opened
    prompt = upstream.expect(Reply(steps), label="cancel")
    with anyio.fail_after(REQUEST_TIMEOUT):
        generation = await start_generation(openai_client, prompt=prompt)
    first = await read_events(
        openai_client, generation["id"], max_events=2, timeout=REQUEST_TIMEOUT
    )
    assert text_of(first) == "partial "
    with anyio.fail_after(REQUEST_TIMEOUT):
        response = await openai_client.post(f"/v1/generations/{generation['id']}/cancel")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    snapshot = await get_snapshot(openai_client, generation["id"])
    assert snapshot["status"] == "cancelled"
    assert snapshot["text"] == "partial "
    assert await wait_for_hang_up(upstream_request(upstream, prompt))
