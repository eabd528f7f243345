"""Upstream faults against a real server and a real fault-injecting upstream, in the
OpenAI-compatible and the Dify formats: each ends in its defined state, after exactly the
expected number of upstream calls, within a bounded time, with exactly the text streamed
before the fault kept.

Before the answer starts, connection failures, 408/409/429 and 5xx are retried (backoff with
full jitter, ``Retry-After`` honoured, attempts and a deadline); once it has started nothing
is retried. No text for ``--upstream-idle-timeout`` fails the answer as stalled even while the
upstream sends keep-alives.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
import httpx
import pytest

from streaming._exceptions import ProviderError
from streaming._retry import BACKOFF_INITIAL, RetryableError, backoff, retry_after_seconds

from .conftest import ServerFactory, dify_args, openai_args
from .fake_upstream import (
    DIFY_PING,
    DONE,
    FakeUpstream,
    Reply,
    Step,
    answer,
    completion_chunk,
    dify_answer,
    dify_error_reply,
    dify_event,
    error_reply,
    sse_data,
    usage_chunk,
    usage_of,
)
from .support import Server, free_port, get_snapshot, read_events, start_generation, text_of

ATTEMPTS = 4
DEADLINE = 10.0  # room for 4 stalled calls and their longest waits: 4 + 3.5 s
READ_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.5
BOUND = DEADLINE + 5.0  # every case ends within this many seconds
TOKENS = ("The ", "quick", " brown ", "fox")
FULL = "".join(TOKENS)
BAD = sse_data('{"choices": [{"delta": {"content": "x"')  # truncated JSON

SERVER_ARGS = (
    *("--upstream-retry-attempts", str(ATTEMPTS)),
    *("--upstream-retry-deadline", str(DEADLINE)),
    *("--upstream-read-timeout", str(READ_TIMEOUT)),
    *("--upstream-idle-timeout", str(IDLE_TIMEOUT)),
    *("--coalesce-window", "0", "--shutdown-grace", "1"),
)


@pytest.fixture(scope="module")
def fault_servers(
    upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """One server per upstream format for the whole matrix, with short retry and idle
    settings."""
    servers = {
        "openai": Server(
            db=tmp_path_factory.mktemp("faults") / "keepstream.db",
            args=(*openai_args(upstream), *SERVER_ARGS),
        ),
        "dify": Server(
            db=tmp_path_factory.mktemp("dify-faults") / "keepstream.db",
            args=(*dify_args(upstream), *SERVER_ARGS),
        ),
    }
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.kill()


def opening(*texts: str) -> list[Step]:
    """A role chunk and one chunk per text."""
    return [completion_chunk(role="assistant", content=""), *map(completion_chunk, texts)]


def ending() -> list[Step]:
    """The stop chunk, a usage chunk (3 + 4 tokens) and ``[DONE]``."""
    return [completion_chunk(finish_reason="stop"), usage_chunk(3, 4), DONE]


def retry_after(status: int, seconds: str) -> Reply:
    reply = error_reply(status, f"slow down ({status})", kind="requests")
    reply.headers = [("Retry-After", seconds)]
    return reply


def keepalives(count: int) -> list[Step]:
    """Keep-alive comments and chunks without content, 0.1 s apart: bytes, but no text."""
    steps: list[Step] = []
    for _ in range(count):
        steps += [b": ping\n\n", 0.1, completion_chunk(content=""), 0.1]
    return steps


OK = Reply(answer(TOKENS, usage=(3, 4)))


def cut_mid_answer(
    opening_of: Callable[..., list[Step]],
    idle: list[Step],
    *,
    idle_stall: str,
    stops: bool,
) -> dict[str, Case]:
    """The faults after two tokens, in one format: a dropped connection, silence, and
    ``idle`` (events without text) until the idle timeout. ``stops``: the upstream is told
    to stop the abandoned answer (Dify)."""
    head = opening_of(*TOKENS[:2])
    kept = "".join(TOKENS[:2])
    return {
        "drop-after-2-tokens": Case(
            [Reply(head, end="drop")],
            "failed",
            "upstream_dropped",
            1,
            kept,
            "connection failed",
            stops=stops,
        ),
        "stall-silence": Case(
            [Reply(head, end="stall")],
            "failed",
            "upstream_timeout",
            1,
            kept,
            "timed out",
            at_least=READ_TIMEOUT * 0.9,
            hangs_up=True,
            stops=stops,
        ),
        idle_stall: Case(
            [Reply([*head, *idle])],
            "failed",
            "upstream_stalled",
            1,
            kept,
            "no text for 1.5 s",
            at_least=IDLE_TIMEOUT * 0.9,
            hangs_up=True,
            stops=stops,
        ),
    }


@dataclass
class Case:
    replies: list[Reply]
    status: str
    error: str | None
    calls: int
    text: str
    message: str = ""  # a part of the error message
    at_least: float = 0.0  # seconds the case must take (a backoff it must honour)
    usage: dict[str, int] | None = field(default=None)
    hangs_up: bool = False  # keepstream must close the connection of its last call
    stops: bool = False  # keepstream must tell Dify to stop the abandoned answer


CASES: dict[str, Case] = {
    "429-retry-after-then-success": Case(
        [retry_after(429, "1"), OK], "completed", None, 2, FULL, at_least=0.9
    ),
    "429-retry-after-past-deadline": Case(
        [retry_after(429, "60")], "failed", "upstream_error", 1, "", "slow down (429)"
    ),
    "500": Case(
        [error_reply(500, "boom")], "failed", "upstream_error", ATTEMPTS, "", "gave up after 4"
    ),
    "503-then-success": Case(
        [error_reply(503, "busy"), error_reply(503, "busy"), OK], "completed", None, 3, FULL
    ),
    "400-not-retried": Case(
        [error_reply(400, "bad request", kind="invalid_request_error")],
        "failed",
        "upstream_error",
        1,
        "",
        "bad request",
    ),
    "reset-before-head": Case(
        [Reply([], send_head=False, end="drop")],
        "failed",
        "upstream_dropped",
        ATTEMPTS,
        "",
        "RemoteProtocolError",
    ),
    "stall-before-head": Case(
        [Reply([], end="stall", send_head=False)],
        "failed",
        "upstream_timeout",
        ATTEMPTS,
        "",
        "gave up after 4",
        at_least=ATTEMPTS * READ_TIMEOUT * 0.9,
    ),
    **cut_mid_answer(opening, keepalives(100), idle_stall="keepalive-only-stall", stops=False),
    "malformed-below-threshold": Case(
        [
            Reply(
                [
                    *opening(TOKENS[0]),
                    BAD,
                    *opening(*TOKENS[1:2]),
                    BAD,
                    BAD,
                    *opening(*TOKENS[2:]),
                    *ending(),
                ]
            )
        ],
        "completed",
        None,
        1,
        FULL,
        usage={**usage_of(3, 4), "malformed_chunks": 3},
    ),
    "malformed-above-threshold": Case(
        [
            Reply(
                [
                    *opening(*TOKENS[:2]),
                    BAD,
                    sse_data("[1]"),
                    BAD,
                    sse_data("nope"),
                    *opening(*TOKENS[2:]),
                    *ending(),
                ]
            )
        ],
        "failed",
        "upstream_malformed",
        1,
        "".join(TOKENS[:2]),
        "4 malformed events",
    ),
    "complete-then-silence": Case(
        [Reply([*opening(*TOKENS), completion_chunk(finish_reason="stop"), *keepalives(100)])],
        "completed",
        None,
        1,
        FULL,
        at_least=IDLE_TIMEOUT * 0.9,
        hangs_up=True,
    ),
    "complete-then-drop": Case(
        [Reply([*opening(*TOKENS), completion_chunk(finish_reason="stop")], end="drop")],
        "completed",
        None,
        1,
        FULL,
    ),
    "wrong-content-type": Case(
        [Reply([b"<html>please log in</html>"], content_type="text/html", framing="length")],
        "failed",
        "upstream_error",
        1,
        "",
        "'text/html'",
    ),
    "empty-stream": Case([Reply([])], "failed", "upstream_dropped", 1, "", "empty event stream"),
    "huge-error-body": Case(
        [
            Reply(
                [b"x" * (5 * 1024 * 1024)], status=502, content_type="text/plain", framing="length"
            )
        ],
        "failed",
        "upstream_error",
        ATTEMPTS,
        "",
        "truncated",
    ),
}


def dify_opening(*texts: str) -> list[Step]:
    """A ping and one Dify ``message`` event per text."""
    ids = {"conversation_id": "conv-1", "message_id": "msg-1"}
    return [DIFY_PING, *(dify_event("message", answer=text, **ids) for text in texts)]


def dify_ending() -> list[Step]:
    """``message_end`` with 3 + 4 tokens of usage."""
    return [dify_event("message_end", conversation_id="conv-1", metadata={"usage": usage_of(3, 4)})]


def dify_pings(count: int) -> list[Step]:
    """Dify's pings, 0.1 s apart: events, but neither text nor work."""
    steps: list[Step] = []
    for _ in range(count):
        steps += [DIFY_PING, 0.1]
    return steps


def dify_steps(count: int) -> list[Step]:
    """Workflow steps 0.5 s apart, pings between: work without text."""
    steps: list[Step] = []
    for _ in range(count):
        steps += [dify_event("node_started", data={}), 0.25, DIFY_PING, 0.25]
    return steps


DIFY_OK = Reply(dify_answer(TOKENS))
DIFY_CASES: dict[str, Case] = {
    "429-retry-after-then-success": Case(
        [retry_after(429, "1"), DIFY_OK], "completed", None, 2, FULL, at_least=0.9
    ),
    "500": Case(
        [dify_error_reply(500, "internal_server_error", "boom")],
        "failed",
        "upstream_error",
        ATTEMPTS,
        "",
        "internal_server_error: boom (gave up after 4",
    ),
    "503-then-success": Case(
        [dify_error_reply(503, "busy", "busy"), DIFY_OK], "completed", None, 2, FULL
    ),
    "400-not-retried": Case(
        [dify_error_reply(400, "invalid_param", "inputs.topic is required")],
        "failed",
        "upstream_error",
        1,
        "",
        "invalid_param: inputs.topic is required",
    ),
    "reset-before-head": CASES["reset-before-head"],
    "stall-before-head": CASES["stall-before-head"],
    **cut_mid_answer(dify_opening, dify_pings(100), idle_stall="ping-only-stall", stops=True),
    "long-workflow-steps": Case(
        [Reply([*dify_steps(5), *dify_opening(*TOKENS), *dify_ending()])],
        "completed",
        None,
        1,
        FULL,
        at_least=2.0,  # longer than the idle timeout: the steps kept it alive
    ),
    "complete-then-drop": Case(
        [Reply([*dify_opening(*TOKENS), *dify_ending()], end="drop")], "completed", None, 1, FULL
    ),
    "error-event-mid-answer": Case(
        [
            Reply(
                [
                    *dify_opening(*TOKENS[:2]),
                    dify_event("error", status=400, code="completion_request_error", message="x"),
                ]
            )
        ],
        "failed",
        "upstream_error",
        1,
        "".join(TOKENS[:2]),
        "completion_request_error: x",
    ),
    "moderation-replaces-answer": Case(
        [Reply([*dify_opening(*TOKENS[:2]), dify_event("message_replace", answer="Sorry.")])],
        "failed",
        "upstream_error",
        1,
        "".join(TOKENS[:2]),
        "withdrew the answer",
        stops=True,
    ),
    "malformed-below-threshold": Case(
        [
            Reply(
                [
                    *dify_opening(TOKENS[0]),
                    BAD,
                    *dify_opening(TOKENS[1]),
                    sse_data('{"answer": "no event name"}'),
                    sse_data('{"event": "message", "answer": 7}'),
                    *dify_opening(*TOKENS[2:]),
                    *dify_ending(),
                ]
            )
        ],
        "completed",
        None,
        1,
        FULL,
        usage={**usage_of(3, 4), "malformed_chunks": 3},
    ),
    "malformed-above-threshold": Case(
        [Reply([*dify_opening(*TOKENS[:2]), BAD, BAD, BAD, BAD, *dify_ending()])],
        "failed",
        "upstream_malformed",
        1,
        "".join(TOKENS[:2]),
        "4 malformed events",
        stops=True,
    ),
    "no-message-end": Case(
        [Reply(dify_opening(*TOKENS))],
        "failed",
        "upstream_dropped",
        1,
        FULL,
        "ended before the answer was complete",
        stops=True,
    ),
    "wrong-content-type": CASES["wrong-content-type"],
    "empty-stream": CASES["empty-stream"],
    "huge-error-body": CASES["huge-error-body"],
}
MATRIX = [("openai", name, case) for name, case in CASES.items()] + [
    ("dify", name, case) for name, case in DIFY_CASES.items()
]


@pytest.mark.parametrize(
    ("upstream_format", "case"),
    [(fmt, case) for fmt, _, case in MATRIX],
    ids=[f"{fmt}-{name}" for fmt, name, _ in MATRIX],
)
async def test_upstream_fault_ends_in_its_defined_state(
    fault_servers: dict[str, Server], upstream: FakeUpstream, upstream_format: str, case: Case
) -> None:
    fault_server = fault_servers[upstream_format]
    stops_before = len(upstream.stops())
    prompt = upstream.expect_sequence(case.replies, label="fault")
    started = anyio.current_time()
    async with httpx.AsyncClient(base_url=fault_server.url, timeout=BOUND) as client:
        generation = await start_generation(client, prompt=prompt)
        events = await read_events(client, generation["id"], timeout=BOUND)
        elapsed = anyio.current_time() - started
        snapshot = await get_snapshot(client, generation["id"])
    calls = upstream.requests_for(prompt)
    error = snapshot["error"] or {}
    assert (snapshot["status"], error.get("type"), len(calls)) == (
        case.status,
        case.error,
        case.calls,
    ), snapshot
    assert case.message in error.get("message", ""), error
    assert len(error.get("message", "")) < 1000  # a huge error body is not copied
    assert case.at_least <= elapsed < BOUND, elapsed
    assert snapshot["text"] == case.text
    assert text_of(events) == case.text
    last = events[-1].json()
    assert last["status"] == case.status
    if case.usage is not None:
        assert snapshot["usage"] == case.usage
        assert last["usage"] == case.usage
    if case.hangs_up:
        hung_up = await anyio.to_thread.run_sync(calls[-1].hung_up.wait, 5.0)
        assert hung_up, "the upstream connection was left open"
    stops = upstream.stops()[stops_before:]
    assert [s.path for s in stops] == (["/v1/chat-messages/task-1/stop"] if case.stops else [])
    if case.stops:
        assert stops[0].body == {"user": "keepstream"}


async def test_refused_connection_is_retried_then_fails(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A closed port: every attempt is refused (the attempts cannot be counted there, but the
    message says how many were made), and the generation fails within the deadline."""
    closed = f"http://127.0.0.1:{free_port()}/v1"
    server = server_factory(
        "--provider", "openai", "--model", "test-model", "--upstream-url", closed, *SERVER_ARGS
    )
    started = anyio.current_time()
    async with httpx.AsyncClient(base_url=server.url, timeout=BOUND) as client:
        generation = await start_generation(client, prompt="anyone there?")
        events = await read_events(client, generation["id"], timeout=BOUND)
        elapsed = anyio.current_time() - started
        snapshot = await get_snapshot(client, generation["id"])
    assert snapshot["status"] == "failed", snapshot
    assert snapshot["error"]["type"] == "upstream_dropped"
    assert "ConnectError" in snapshot["error"]["message"]
    assert f"gave up after {ATTEMPTS} attempts" in snapshot["error"]["message"]
    assert elapsed < BOUND
    assert snapshot["text"] == text_of(events) == ""


# -- the policy on its own ------------------------------------------------------------------------


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds("7", now=now) == 7.0
    assert retry_after_seconds(email.utils.formatdate(now + 12, usegmt=True), now=now) == 12.0
    assert retry_after_seconds(email.utils.formatdate(now - 12, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon", now=now) is None
    assert retry_after_seconds(None) is None


def test_backoff_is_full_jitter_capped_by_the_deadline() -> None:
    def failure(attempt: int, remaining: float, after: float | None = None) -> RetryableError:
        return RetryableError(
            "x", kind="upstream_error", attempt=attempt, remaining=remaining, retry_after=after
        )

    waits = [backoff(failure(3, 100.0)) for _ in range(200)]
    assert all(isinstance(w, float) and 0 <= w <= BACKOFF_INITIAL * 4 for w in waits)
    assert max(waits) > BACKOFF_INITIAL * 2  # spread over the whole range, not a fixed step
    assert backoff(failure(1, 100.0, after=3.0)) == 3.0
    assert backoff(failure(1, 2.0, after=3.0)) is False  # past the deadline: give up now
    assert backoff(ProviderError("bad request", kind="upstream_error")) is False


# -- continuation in the middle of an answer ---------------------------------------------------

CONTINUATION = '{"continue_final_message": true, "add_generation_prompt": false}'


@pytest.mark.parametrize(
    ("fault", "continuation"),
    [
        ("drop", ("--upstream-continuation", CONTINUATION)),
        ("stall", ("--upstream-continuation", CONTINUATION)),
        ("drop", ("--upstream-continuation-message", '{"prefix": true}')),
    ],
    ids=["drop-vllm", "stall-vllm", "drop-prefix"],
)
async def test_a_cut_answer_is_continued_when_the_upstream_can(
    server_factory: ServerFactory,
    upstream: FakeUpstream,
    fault: str,
    continuation: tuple[str, str],
) -> None:
    """Dropped (or stalled) mid-answer, the request is sent again with the text so far as a
    final assistant message and the continuation fields (in the body, vLLM's way, or in the
    message, DeepSeek's and Mistral's); readers see one answer, with a ``resumed`` event at
    the seam and nothing missing or doubled."""
    server = server_factory(
        *openai_args(upstream),
        *continuation,
        *("--upstream-idle-timeout", "1", "--upstream-read-timeout", "1"),
        *("--shutdown-grace", "1"),
    )
    first = Reply(opening("Hello ", "wor"), end="drop" if fault == "drop" else "stall")
    prompt = upstream.expect_sequence([first, Reply(answer(["ld, ", "bye"]))], label="cut")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        generation = await start_generation(http, prompt=prompt)
        events = await read_events(http, generation["id"])
        snapshot = await get_snapshot(http, generation["id"])
    assert snapshot["status"] == "completed"
    assert text_of(events) == snapshot["text"] == "Hello world, bye"
    assert [e.event for e in events].count("resumed") == 1
    calls = upstream.requests_for(prompt)
    assert len(calls) == 2
    assert calls[0].body["messages"][-1] == {"role": "user", "content": prompt}
    final = {"role": "assistant", "content": "Hello wor"}
    if continuation[0] == "--upstream-continuation":
        assert calls[1].body["messages"][-1] == final
        assert calls[1].body["continue_final_message"] is True
        assert calls[1].body["add_generation_prompt"] is False
    else:
        assert calls[1].body["messages"][-1] == {**final, "prefix": True}
        assert "continue_final_message" not in calls[1].body


async def test_continuations_stop_at_the_budget(
    server_factory: ServerFactory, upstream: FakeUpstream
) -> None:
    """An upstream that keeps dropping is continued ``--max-continuations`` times, then the
    answer fails with its text kept: never a retry storm."""
    server = server_factory(
        *openai_args(upstream),
        *("--upstream-continuation", CONTINUATION, "--max-continuations", "2"),
    )
    prompt = upstream.expect_sequence([Reply(opening("more "), end="drop")], label="flaky")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        generation = await start_generation(http, prompt=prompt)
        events = await read_events(http, generation["id"])
        snapshot = await get_snapshot(http, generation["id"])
    assert snapshot["status"] == "failed" and snapshot["error"]["type"] == "upstream_dropped"
    assert snapshot["text"] == text_of(events) == "more more more "
    assert len(upstream.requests_for(prompt)) == 3
