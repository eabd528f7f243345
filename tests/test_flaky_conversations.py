"""A long conversation against a flaky upstream, for each provider that has one: 100
consecutive session messages, each meeting a fault drawn from a seeded mix (retried statuses,
a status that never clears, a connection dropped or stalled mid-answer, a malformed event, an
error in the stream). Every message is answered or fails clearly, within a bound; none is
left running; the upstream is called exactly as often as the policy says (no retry storm);
and the conversation the upstream hears is exactly the session's history.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import anyio
import httpx
import pytest

from .conftest import ServerFactory, dify_args, openai_args
from .fake_upstream import (
    DIFY_PING,
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
)
from .support import get_snapshot, read_events

MESSAGES = 100
ATTEMPTS = 3
IDLE = 0.5
MESSAGE_BOUND = 15.0  # seconds any one message may take, faults and backoffs included
CONTINUATION = '{"continue_final_message": true, "add_generation_prompt": false}'
# Each message's fault, and how often it is drawn.
FAULTS = {
    "ok": 8,
    "503-then-ok": 2,
    "429-then-ok": 2,
    "500-always": 2,
    "drop-mid-answer": 2,
    "stall-mid-answer": 2,
    "malformed-event": 1,
    "error-in-stream": 1,
}
BAD = sse_data('{"choices": [{"delta": ')


@dataclass
class Expected:
    """What one message must end as."""

    status: str
    text: str
    calls: int
    error: str | None = None
    reaches_upstream: bool = True  # the upstream heard the question (Dify keeps it)


SERVER_ARGS = (
    *("--upstream-retry-attempts", str(ATTEMPTS), "--upstream-retry-deadline", "5"),
    *("--upstream-read-timeout", "2", "--upstream-idle-timeout", str(IDLE)),
    *("--coalesce-window", "0", "--shutdown-grace", "1"),
)


def openai_script(fault: str, tokens: list[str], conversation: str) -> tuple[list[Reply], Expected]:
    """The OpenAI-compatible upstream's replies for one message (which can continue a cut
    answer), and what the message must end as (``conversation`` is for Dify's)."""
    full = "".join(tokens)
    ok = Reply(answer(tokens))
    opening: list[Step] = [completion_chunk(role="assistant", content="")]
    head = [*opening, *map(completion_chunk, tokens[:2])]
    rest = Reply(answer(tokens[2:]))
    match fault:
        case "ok":
            return [ok], Expected("completed", full, 1)
        case "503-then-ok":
            return [error_reply(503, "busy"), ok], Expected("completed", full, 2)
        case "429-then-ok":
            limited = error_reply(429, "slow down")
            limited.headers = [("Retry-After", "0")]
            return [limited, ok], Expected("completed", full, 2)
        case "500-always":
            return [error_reply(500, "boom")], Expected("failed", "", ATTEMPTS, "upstream_error")
        case "drop-mid-answer":
            return [Reply(head, end="drop"), rest], Expected("completed", full, 2)
        case "stall-mid-answer":
            pings: list[Step] = [b": keep-alive\n\n", 0.1] * 20
            return [Reply([*head, *pings], end="stall"), rest], Expected("completed", full, 2)
        case "malformed-event":
            return [Reply([*head, BAD, *answer(tokens[2:])[1:]])], Expected("completed", full, 1)
        case "error-in-stream":
            error = sse_data('{"error": {"message": "overloaded"}}')
            return [Reply([*head, error])], Expected(
                "failed", "".join(tokens[:2]), 1, "upstream_error"
            )
    raise AssertionError(fault)


def dify_script(fault: str, tokens: list[str], conversation: str) -> tuple[list[Reply], Expected]:
    """Dify's replies for one message (Dify cannot continue a cut answer), and what the
    message must end as. Each message's answer names its own ``conversation`` id, so using
    any but the newest answer's would show."""
    full = "".join(tokens)
    ok = Reply(dify_answer(tokens, conversation_id=conversation))
    ids = {"conversation_id": conversation, "message_id": "m"}
    head: list[Step] = [DIFY_PING, *(dify_event("message", answer=t, **ids) for t in tokens[:2])]
    cut = "".join(tokens[:2])
    match fault:
        case "ok":
            return [ok], Expected("completed", full, 1)
        case "503-then-ok":
            return [dify_error_reply(503, "busy", "busy"), ok], Expected("completed", full, 2)
        case "429-then-ok":
            limited = dify_error_reply(429, "too_many_requests", "slow down")
            limited.headers = [("Retry-After", "0")]
            return [limited, ok], Expected("completed", full, 2)
        case "500-always":
            refused = dify_error_reply(500, "internal_server_error", "boom")
            return [refused], Expected(
                "failed", "", ATTEMPTS, "upstream_error", reaches_upstream=False
            )
        case "drop-mid-answer":
            return [Reply(head, end="drop")], Expected("failed", cut, 1, "upstream_dropped")
        case "stall-mid-answer":
            pings: list[Step] = [DIFY_PING, 0.1] * 20
            return [Reply([*head, *pings], end="stall")], Expected(
                "failed", cut, 1, "upstream_stalled"
            )
        case "malformed-event":
            end = dify_answer(tokens[2:], conversation_id=conversation)[1:]
            return [Reply([*head, BAD, *end])], Expected("completed", full, 1)
        case "error-in-stream":
            error = dify_event("error", status=500, code="completion_request_error", message="x")
            return [Reply([*head, error])], Expected("failed", cut, 1, "upstream_error")
    raise AssertionError(fault)


def transcript(history: list[tuple[str, str]], query: str) -> str:
    """Dify's query for ``query`` after the ``history`` it has not heard."""
    if not history:
        return query
    labels = {"user": "User", "assistant": "Assistant"}
    told = "\n\n".join(f"{labels[role]}: {text}" for role, text in history)
    return f"The conversation so far:\n\n{told}\n\n---\n\n{query}"


@pytest.mark.parametrize("provider", ["openai", "dify"])
async def test_a_hundred_messages_against_a_flaky_upstream(
    server_factory: ServerFactory, upstream: FakeUpstream, provider: str
) -> None:
    if provider == "openai":
        args = (*openai_args(upstream), "--upstream-continuation", CONTINUATION)
        script = openai_script
    else:
        args, script = dify_args(upstream), dify_script
    server = server_factory(*args, *SERVER_ARGS)
    rng = random.Random(f"flaky-{provider}")
    faults = rng.choices(list(FAULTS), weights=list(FAULTS.values()), k=MESSAGES)
    assert set(faults) == set(FAULTS)  # the seed draws every fault
    history: list[tuple[str, str]] = []  # the session's messages with text
    heard = 0  # how much of it Dify's conversation holds
    conversation = ""  # the id the newest answer that reached Dify gave
    async with httpx.AsyncClient(base_url=server.url, timeout=MESSAGE_BOUND) as http:
        session = (await http.post("/v1/sessions", json={})).json()
        for i, fault in enumerate(faults):
            tokens = [f"m{i}a ", f"m{i}b ", f"m{i}c."]
            replies, expected = script(fault, tokens, f"conv-{i}")
            prompt = upstream.expect_sequence(replies, label=f"flaky-{provider}-{i}")
            with anyio.fail_after(MESSAGE_BOUND):
                posted = await http.post(
                    f"/v1/sessions/{session['id']}/messages", json={"content": prompt}
                )
                assert posted.status_code == 202, posted.text
                generation_id = posted.json()["generation_id"]
                await read_events(http, generation_id, timeout=MESSAGE_BOUND)
                snapshot = await get_snapshot(http, generation_id)
            calls = upstream.requests_for(prompt)
            error = (snapshot["error"] or {}).get("type")
            assert (snapshot["status"], snapshot["text"], error, len(calls)) == (
                expected.status,
                expected.text,
                expected.error,
                expected.calls,
            ), (i, fault, snapshot)
            # The upstream hears exactly the session's conversation.
            first = calls[0].body
            if provider == "openai":
                sent = [(m["role"], m["content"]) for m in first["messages"]]
                assert sent == [*history, ("user", prompt)], (i, fault)
            elif heard:
                assert first["conversation_id"] == conversation, (i, fault)
                assert first["query"] == transcript(history[heard:], prompt), (i, fault)
            else:
                assert "conversation_id" not in first, (i, fault)
                assert first["query"] == transcript(history, prompt), (i, fault)
            history.append(("user", prompt))
            if expected.text:
                history.append(("assistant", expected.text))
            if expected.reaches_upstream:
                heard, conversation = len(history), f"conv-{i}"
        stored = (await http.get(f"/v1/sessions/{session['id']}")).json()["messages"]
    # None is left running, and every answer is in the session with its end.
    answers = [m for m in stored if m["role"] == "assistant"]
    assert len(answers) == MESSAGES
    assert all(m["generation_status"] in ("completed", "failed") for m in answers)
