"""The Vercel AI SDK view (``/api/chat``) against a real server, driven by the real, pinned
``ai`` package (``tests/node``) and by plain HTTP for the wire details."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx
import pytest

from web._chat import chat_session_id

from .conftest import ServerFactory, openai_args
from .fake_upstream import FakeUpstream, Reply, completion_chunk, sse_data
from .node_support import require_node, run_node
from .support import Server, get_snapshot, readme_block, wait_for_status

ALICE_KEY = "sk-alice-0123456789abcdef"
BOB_KEY = "sk-bob-0123456789abcdef0"
# 60 tokens at 40 a second: an answer runs for 1.5 s, long enough to drop and resume it.
SLOW_MODEL = ("--sim-tokens-per-second", "40", "--sim-max-tokens", "60")
_chat_ids = itertools.count()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with two users and an answer that takes a while."""
    server = Server(
        db=tmp_path_factory.mktemp("chat") / "keepstream.db",
        args=(
            *("--api-keys", f"alice={ALICE_KEY},bob={BOB_KEY}"),
            *SLOW_MODEL,
            *("--shutdown-grace", "1"),
        ),
    )
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture
async def alice(chat_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """Alice's HTTP client."""
    headers = {"Authorization": f"Bearer {ALICE_KEY}"}
    async with httpx.AsyncClient(base_url=chat_server.url, headers=headers, timeout=30) as http:
        yield http


@pytest.fixture
async def bob(chat_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """Bob's HTTP client."""
    headers = {"Authorization": f"Bearer {BOB_KEY}"}
    async with httpx.AsyncClient(base_url=chat_server.url, headers=headers, timeout=30) as http:
        yield http


def new_chat_id() -> str:
    """A chat id no other test uses."""
    return f"chat-{next(_chat_ids)}"


def user_message(text: str, message_id: str = "u1") -> dict[str, Any]:
    """A user UIMessage as ``useChat`` builds it."""
    return {"id": message_id, "role": "user", "parts": [{"type": "text", "text": text}]}


def chat_body(chat_id: str, text: str, **extra: Any) -> dict[str, Any]:
    """What ``DefaultChatTransport`` posts for a new user message."""
    return {
        "id": chat_id,
        "messages": [user_message(text)],
        "trigger": "submit-message",
        **extra,
    }


async def read_chunks(response: httpx.Response) -> list[Any]:
    """The ``data:`` payloads of a UI message stream, ``[DONE]`` as the string."""
    chunks: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            chunks.append(data if data == "[DONE]" else json.loads(data))
    return chunks


def text_of(chunks: list[Any]) -> str:
    """The text of a chunk list's ``text-delta`` chunks."""
    return "".join(c["delta"] for c in chunks if isinstance(c, dict) and c["type"] == "text-delta")


def message_text(message: dict[str, Any]) -> str:
    """The text of an assembled UIMessage."""
    return "".join(p["text"] for p in message["parts"] if p["type"] == "text")


def generation_of(message_id: str) -> str:
    """The generation an answer's ``messageId`` names."""
    assert message_id.startswith("msg_gen_"), message_id
    return message_id.removeprefix("msg_")


def node_env(server: Server, chat_id: str, **extra: str) -> dict[str, str]:
    """The environment of a ``tests/node/chat-*.mjs`` script."""
    return {"KEEPSTREAM_URL": server.url, "CHAT_ID": chat_id, **extra}


async def session_messages(http: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    """The stored messages of a session."""
    response = await http.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


def test_chat_sessions_are_per_owner() -> None:
    ids = {chat_session_id(owner, chat) for owner in ("alice", "bob", None) for chat in "ab"}
    assert len(ids) == 6
    assert chat_session_id("alice", "a") == chat_session_id("alice", "a")
    assert all(i.startswith("ses_") and len(i) == 26 for i in ids)


async def test_a_message_is_answered_with_the_ui_message_stream_v1(
    alice: httpx.AsyncClient,
) -> None:
    chat_id = new_chat_id()
    with anyio.fail_after(20):
        async with alice.stream("POST", "/api/chat", json=chat_body(chat_id, "hello")) as response:
            assert response.status_code == 200
            chunks = await read_chunks(response)
    headers = response.headers
    assert headers["content-type"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert headers["x-accel-buffering"] == "no"
    assert chunks[0] == {"type": "start", "messageId": chunks[0]["messageId"]}
    types = [c if c == "[DONE]" else c["type"] for c in chunks]
    deltas = types.count("text-delta")
    assert deltas >= 1
    assert types == [
        "start",
        "start-step",
        "text-start",
        *["text-delta"] * deltas,
        "text-end",
        "finish-step",
        "finish",
        "[DONE]",
    ]
    assert chunks[2] == {"type": "text-start", "id": "text-0"}
    assert set(chunks[3]) == {"type", "id", "delta"}  # no field the SDK does not define
    generation_id = generation_of(chunks[0]["messageId"])
    assert headers["keepstream-generation-id"] == generation_id
    snapshot = await get_snapshot(alice, generation_id)
    assert snapshot["status"] == "completed" and snapshot["text"] == text_of(chunks)

    # The chat is a session of Alice's: the user's message, then the answer with the same id.
    session_id = headers["keepstream-session-id"]
    assert session_id == chat_session_id("alice", chat_id)
    messages = await session_messages(alice, session_id)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "hello"),
        ("assistant", snapshot["text"]),
    ]
    assert messages[1]["id"] == chunks[0]["messageId"]

    # A retried request streams the same answer and posts nothing.
    async with alice.stream("POST", "/api/chat", json=chat_body(chat_id, "hello")) as again:
        replayed = await read_chunks(again)
    assert replayed == chunks
    assert len(await session_messages(alice, session_id)) == 2
    # Nothing runs: 204 for the chat, and for one that never was.
    assert (await alice.get(f"/api/chat/{chat_id}/stream")).status_code == 204
    assert (await alice.get("/api/chat/never-was/stream")).status_code == 204


def test_the_real_client_resumes_an_answer_after_its_connection_drops(
    chat_server: Server,
) -> None:
    chat_id = new_chat_id()
    result = run_node(
        "chat-resume.mjs", env=node_env(chat_server, chat_id, TEXT="hi", API_KEY=ALICE_KEY)
    )
    before = result["beforeAbort"]
    assert before[0]["type"] == "start" and before[-1]["type"] == "text-delta"
    message_id = before[0]["messageId"]
    resumed = result["resumeChunks"]
    # The resume replays the whole message from its start, under the same id, then goes live.
    assert resumed[0] == {"type": "start", "messageId": message_id}
    assert resumed[-1]["type"] == "finish"
    message = result["message"]
    assert message["id"] == message_id and message["role"] == "assistant"
    assert [p["type"] for p in message["parts"]] == ["step-start", "text"]
    snapshot = httpx.get(
        f"{chat_server.url}/v1/generations/{generation_of(message_id)}",
        headers={"Authorization": f"Bearer {ALICE_KEY}"},
    ).json()
    assert snapshot["status"] == "completed"
    assert message_text(message) == snapshot["text"]  # all of it, nothing twice
    assert len(text_of(before)) < len(snapshot["text"])
    assert result["afterCompletionIsNull"] is True


async def test_regenerate_replaces_the_last_answer(
    chat_server: Server, alice: httpx.AsyncClient
) -> None:
    chat_id = new_chat_id()
    env = node_env(chat_server, chat_id, API_KEY=ALICE_KEY)
    question = user_message("tell me more", f"user-{chat_id}")
    first = await anyio.to_thread.run_sync(
        lambda: run_node("chat-send.mjs", env={**env, "TEXT": "tell me more"})
    )
    old_id = first["message"]["id"]
    second = await anyio.to_thread.run_sync(
        lambda: run_node(
            "chat-send.mjs",
            env={
                **env,
                # As useChat's regenerate() sends it: the answer removed, its id named.
                "MESSAGES": json.dumps([question]),
                "TRIGGER": "regenerate-message",
                "MESSAGE_ID": old_id,
            },
        )
    )
    new_id = second["message"]["id"]
    assert new_id != old_id
    assert second["chunks"][-1]["type"] == "finish"
    new = await get_snapshot(alice, generation_of(new_id))
    assert new["status"] == "completed" and message_text(second["message"]) == new["text"]
    messages = await session_messages(alice, chat_session_id("alice", chat_id))
    assert [(m["role"], m["id"]) for m in messages] == [
        ("user", messages[0]["id"]),
        ("assistant", new_id),
    ]
    assert messages[0]["content"] == "tell me more"
    # The replaced answer stays in the log.
    old = await get_snapshot(alice, generation_of(old_id))
    assert old["status"] == "completed" and old["text"] == message_text(first["message"])


async def test_regenerate_while_the_answer_runs_cancels_it_and_answers_again(
    alice: httpx.AsyncClient,
) -> None:
    chat_id = new_chat_id()
    with anyio.fail_after(20):
        async with alice.stream("POST", "/api/chat", json=chat_body(chat_id, "q")) as running:
            lines = running.aiter_lines()
            first = json.loads((await anext(lines)).removeprefix("data: "))
            regenerate = chat_body(chat_id, "q", trigger="regenerate-message")
            async with alice.stream("POST", "/api/chat", json=regenerate) as response:
                chunks = await read_chunks(response)
            old_chunks = [first, *[json.loads(x) for x in await _rest(lines)]]
    assert old_chunks[-1]["type"] == "abort"  # the replaced answer's stream ends there
    assert chunks[0]["messageId"] != first["messageId"] and chunks[-2:] == [
        {"type": "finish"},
        "[DONE]",
    ]
    old = await get_snapshot(alice, generation_of(first["messageId"]))
    assert old["status"] == "cancelled"
    messages = await session_messages(alice, chat_session_id("alice", chat_id))
    assert [(m["role"], m["id"]) for m in messages][1:] == [("assistant", chunks[0]["messageId"])]
    assert len(messages) == 2


async def _rest(lines: AsyncIterator[str]) -> list[str]:
    """The remaining ``data:`` payloads of a UI message stream, without ``[DONE]``."""
    return [
        line.removeprefix("data: ")
        async for line in lines
        if line.startswith("data: ") and line != "data: [DONE]"
    ]


async def test_stop_keeps_the_partial_answer_and_the_stream_ends_with_abort(
    chat_server: Server, alice: httpx.AsyncClient
) -> None:
    chat_id = new_chat_id()
    result = await anyio.to_thread.run_sync(
        lambda: run_node(
            "chat-send.mjs",
            env=node_env(
                chat_server, chat_id, TEXT="go on", API_KEY=ALICE_KEY, STOP_AFTER_DELTA="1"
            ),
        )
    )
    assert result["stopStatus"] == 204
    types = [c["type"] for c in result["chunks"]]
    assert types[-3:] == ["text-end", "finish-step", "abort"]
    assert "finish" not in types and "error" not in types
    assert set(result["chunks"][-1]) == {"type"}
    snapshot = await get_snapshot(alice, generation_of(result["message"]["id"]))
    assert snapshot["status"] == "cancelled"
    assert snapshot["text"] and message_text(result["message"]) == snapshot["text"]
    # Stopping again changes nothing; nothing is left to resume.
    assert (await alice.post(f"/api/chat/{chat_id}/stop")).status_code == 204
    assert (await alice.get(f"/api/chat/{chat_id}/stream")).status_code == 204
    messages = await session_messages(alice, chat_session_id("alice", chat_id))
    assert messages[-1]["content"] == snapshot["text"]


async def test_another_user_can_neither_resume_nor_stop_a_chat(
    alice: httpx.AsyncClient, bob: httpx.AsyncClient
) -> None:
    chat_id = new_chat_id()
    with anyio.fail_after(20):
        async with alice.stream("POST", "/api/chat", json=chat_body(chat_id, "mine")) as response:
            lines = response.aiter_lines()
            first = json.loads((await anext(lines)).removeprefix("data: "))
            generation_id = generation_of(first["messageId"])
            assert (await alice.get(f"/v1/generations/{generation_id}")).status_code == 200
            assert (await bob.get(f"/api/chat/{chat_id}/stream")).status_code == 204
            assert (await bob.post(f"/api/chat/{chat_id}/stop")).status_code == 204
            assert (await bob.get(f"/v1/generations/{generation_id}")).status_code == 404
            # The same chat id is another chat of Bob's own.
            async with bob.stream("POST", "/api/chat", json=chat_body(chat_id, "his")) as theirs:
                assert theirs.headers["keepstream-session-id"] == chat_session_id("bob", chat_id)
            # Alice can still follow her answer; it runs to its end.
            async with alice.stream("GET", f"/api/chat/{chat_id}/stream") as resumed:
                assert resumed.status_code == 200
                resumed_chunks = await read_chunks(resumed)
    assert resumed_chunks[0] == first and resumed_chunks[-2:] == [{"type": "finish"}, "[DONE]"]
    snapshot = await wait_for_status(alice, generation_id, {"completed", "cancelled"})
    assert snapshot["status"] == "completed"
    alices = await session_messages(alice, chat_session_id("alice", chat_id))
    assert [m["role"] for m in alices] == ["user", "assistant"] and alices[0]["content"] == "mine"


BAD_BODIES = [
    (b"not json", 400, "malformed JSON"),
    (b"[]", 422, "Expected `object`"),
    (json.dumps({**chat_body("c", "x"), "id": None}).encode(), 422, "`id`"),
    (json.dumps(chat_body("", "x")).encode(), 422, "`id`"),
    (json.dumps({**chat_body("c", "x"), "trigger": "resume"}).encode(), 422, "`trigger`"),
    (json.dumps({**chat_body("c", "x"), "messages": []}).encode(), 422, "`messages`"),
    (
        json.dumps(
            {**chat_body("c", "x"), "messages": [{"id": "a", "role": "assistant", "parts": []}]}
        ).encode(),
        422,
        "the user's message",
    ),
    (
        json.dumps(
            {**chat_body("c", "x"), "messages": [{"id": "u", "role": "user", "parts": []}]}
        ).encode(),
        422,
        "no text",
    ),
    (
        json.dumps({**chat_body("c", "x"), "messages": [{"id": "u", "role": "user"}]}).encode(),
        422,
        "`parts`",
    ),
    (json.dumps({**chat_body("c", "x"), "messageId": 7}).encode(), 422, "`messageId`"),
    (
        json.dumps({**chat_body("empty", "x"), "trigger": "regenerate-message"}).encode(),
        422,
        "no user message",
    ),
    (json.dumps({**chat_body("c", "x"), "messageId": "m1"}).encode(), 422, "editing"),
]


@pytest.mark.parametrize(
    ("body", "status", "named"),
    BAD_BODIES,
    ids=[
        "not-json",
        "not-an-object",
        "no-id",
        "empty-id",
        "unknown-trigger",
        "no-messages",
        "last-not-user",
        "no-text",
        "no-parts",
        "message-id-not-a-string",
        "regenerate-nothing",
        "edit-a-message",
    ],
)
async def test_bad_requests_are_refused_naming_the_problem(
    alice: httpx.AsyncClient, body: bytes, status: int, named: str
) -> None:
    response = await alice.post(
        "/api/chat", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert named in response.json()["error"]["message"]


async def test_no_api_key_is_401(chat_server: Server) -> None:
    async with httpx.AsyncClient(base_url=chat_server.url) as http:
        assert (await http.post("/api/chat", json=chat_body("c", "x"))).status_code == 401
        assert (await http.get("/api/chat/c/stream")).status_code == 401
        assert (await http.post("/api/chat/c/stop")).status_code == 401


def test_a_failing_answer_ends_with_an_error_chunk(
    server_factory: ServerFactory, upstream: FakeUpstream
) -> None:
    server = server_factory(*openai_args(upstream))
    prompt = upstream.expect(
        Reply(
            [
                completion_chunk(role="assistant", content=""),
                completion_chunk("partial "),
                sse_data(json.dumps({"error": {"message": "the model is overloaded"}})),
            ]
        ),
        label="chat-failure",
    )
    result = run_node("chat-send.mjs", env=node_env(server, new_chat_id(), TEXT=prompt))
    chunks = result["chunks"]
    assert [c["type"] for c in chunks] == [
        "start",
        "start-step",
        "text-start",
        "text-delta",
        "text-end",
        "finish-step",
        "error",
    ]
    assert set(chunks[-1]) == {"type", "errorText"}
    assert "the model is overloaded" in chunks[-1]["errorText"]
    assert result["errors"] and "the model is overloaded" in result["errors"][0]
    assert message_text(result["message"]) == "partial "


def test_the_readme_node_example_runs_as_written(server_factory: ServerFactory) -> None:
    server = server_factory(*SLOW_MODEL)
    code = readme_block("## Vercel AI SDK (useChat)", "js")
    done = subprocess.run(
        ["node", "--input-type=module"],
        input=code,
        cwd=require_node(),
        env={"PATH": os.environ.get("PATH", ""), "KEEPSTREAM_URL": server.url},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer, last = done.stdout.strip().splitlines()
    assert last == "null"
    latest = httpx.get(f"{server.url}/v1/sessions").json()["data"][0]["latest_generation"]
    snapshot = httpx.get(f"{server.url}/v1/generations/{latest['id']}").json()
    assert snapshot["status"] == "completed" and answer.strip() == snapshot["text"].strip()


async def test_a_user_may_have_more_chats_than_open_sessions(
    server_factory: ServerFactory,
) -> None:
    """A chat's session is open only while an answer is under way, so the open-session
    limit bounds concurrent answers, not how many chats a user keeps."""
    server = server_factory("--max-sessions-per-user", "2", "--sim-max-tokens", "5")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for n in range(5):
            chat_id = new_chat_id()
            async with http.stream("POST", "/api/chat", json=chat_body(chat_id, f"q{n}")) as sent:
                assert sent.status_code == 200, await sent.aread()
                chunks = await read_chunks(sent)
            assert chunks[-2:] == [{"type": "finish"}, "[DONE]"]
            # Talking again in an earlier chat reopens it.
            async with http.stream(
                "POST",
                "/api/chat",
                json=chat_body(chat_id, "again", messages=[user_message("again", "u2")]),
            ) as again:
                assert again.status_code == 200, await again.aread()
                assert (await read_chunks(again))[-1] == "[DONE]"
