"""The Dify provider against a real server and a real upstream speaking Dify's streaming
format: what each request carries (the query, the conversation it continues, the end user, the
app's inputs and files), how the conversation id follows a session from answer to answer, and
what becomes of the events that carry no answer text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import ServerFactory, dify_args
from .fake_upstream import FakeUpstream, Reply, dify_answer, dify_error_reply, dify_event
from .support import (
    Server,
    get_snapshot,
    read_events,
    start_generation,
    text_of,
    wait_for_status,
)

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def dify_server(
    upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = Server(
        db=tmp_path_factory.mktemp("dify") / "keepstream.db",
        args=(*dify_args(upstream), "--coalesce-window", "0", "--shutdown-grace", "1"),
    )
    try:
        yield server.start()
    finally:
        server.kill()


async def answered(http: httpx.AsyncClient, path: str, **body: Any) -> dict[str, Any]:
    """POST a message (or a regenerate) to a session; its answer's snapshot once it ended."""
    response = await http.post(path, json=body)
    assert response.status_code == 202, response.text
    generation_id = response.json()["generation_id"]
    await read_events(http, generation_id, timeout=TIMEOUT)
    return await get_snapshot(http, generation_id)


async def test_a_session_continues_its_dify_conversation(
    dify_server: Server, upstream: FakeUpstream
) -> None:
    """The first message starts a conversation; each next one sends only its own query and
    the conversation id Dify gave. A message whose answer failed before Dify heard it is
    told to Dify with the next one."""
    first = upstream.expect(Reply(dify_answer(["Hi", " there"], conversation_id="conv-A")))
    second = upstream.expect(Reply(dify_answer(["Fine"], conversation_id="conv-A")))
    refused = upstream.expect(dify_error_reply(400, "invalid_param", "nope"))
    fourth = upstream.expect(Reply(dify_answer(["Both"], conversation_id="conv-A")))
    async with httpx.AsyncClient(base_url=dify_server.url, timeout=TIMEOUT) as http:
        session = (await http.post("/v1/sessions", json={})).json()
        messages = f"/v1/sessions/{session['id']}/messages"
        one = await answered(http, messages, content=first)
        assert (one["status"], one["text"], one["usage"]) == (
            "completed",
            "Hi there",
            {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        )
        assert (await answered(http, messages, content=second))["text"] == "Fine"
        assert (await answered(http, messages, content=refused))["status"] == "failed"
        assert (await answered(http, messages, content=fourth))["text"] == "Both"
    calls = [upstream.requests_for(p)[0] for p in (first, second, refused, fourth)]
    assert calls[0].path == "/v1/chat-messages"
    assert calls[0].headers["authorization"] == "Bearer app-test-key"
    assert calls[0].body == {
        "inputs": {},
        "query": first,
        "response_mode": "streaming",
        "user": "keepstream",
    }
    assert calls[1].body["conversation_id"] == "conv-A"
    assert calls[1].body["query"] == second
    assert calls[2].body["conversation_id"] == "conv-A"
    # Dify refused the third message: it hears it with the fourth.
    assert calls[3].body["conversation_id"] == "conv-A"
    assert (
        calls[3].body["query"] == f"The conversation so far:\n\nUser: {refused}\n\n---\n\n{fourth}"
    )


async def test_a_regenerated_answer_starts_a_new_conversation_with_the_history(
    dify_server: Server, upstream: FakeUpstream
) -> None:
    """Dify's conversation holds the answer being replaced, so the new answer is asked in a
    new conversation told the history; the one after it continues that new conversation."""
    first = upstream.expect(Reply(dify_answer(["One"], conversation_id="conv-B")))
    second = upstream.expect_sequence(
        [
            Reply(dify_answer(["Two"], conversation_id="conv-B")),
            Reply(dify_answer(["Two again"], conversation_id="conv-C")),
        ]
    )
    third = upstream.expect(Reply(dify_answer(["Three"], conversation_id="conv-C")))
    async with httpx.AsyncClient(base_url=dify_server.url, timeout=TIMEOUT) as http:
        session = (await http.post("/v1/sessions", json={})).json()
        messages = f"/v1/sessions/{session['id']}/messages"
        await answered(http, messages, content=first)
        await answered(http, messages, content=second)
        again = await answered(http, f"/v1/sessions/{session['id']}/regenerate")
        assert again["text"] == "Two again"
        await answered(http, messages, content=third)
    regenerated = upstream.requests_for(second)[1].body
    assert "conversation_id" not in regenerated
    assert regenerated["query"] == (
        f"The conversation so far:\n\nUser: {first}\n\nAssistant: One\n\n---\n\n{second}"
    )
    after = upstream.requests_for(third)[0].body
    assert (after["conversation_id"], after["query"]) == ("conv-C", third)


async def test_a_conversation_dify_lost_is_started_again(
    dify_server: Server, upstream: FakeUpstream
) -> None:
    """Dify answers 404 for a conversation it no longer has: the message is asked again, at
    once, in a new conversation told the history, and the session goes on in that one."""
    first = upstream.expect(Reply(dify_answer(["One"], conversation_id="conv-D")))
    second = upstream.expect_sequence(
        [
            dify_error_reply(404, "not_found", "Conversation Not Exists."),
            Reply(dify_answer(["Two"], conversation_id="conv-E")),
        ]
    )
    third = upstream.expect(Reply(dify_answer(["Three"], conversation_id="conv-E")))
    async with httpx.AsyncClient(base_url=dify_server.url, timeout=TIMEOUT) as http:
        session = (await http.post("/v1/sessions", json={})).json()
        messages = f"/v1/sessions/{session['id']}/messages"
        await answered(http, messages, content=first)
        assert (await answered(http, messages, content=second))["text"] == "Two"
        await answered(http, messages, content=third)
    lost, fresh = (call.body for call in upstream.requests_for(second))
    assert lost["conversation_id"] == "conv-D"
    assert "conversation_id" not in fresh
    assert fresh["query"].startswith(f"The conversation so far:\n\nUser: {first}\n\n")
    assert upstream.requests_for(third)[0].body["conversation_id"] == "conv-E"


async def test_params_are_passed_through_and_checked(
    dify_server: Server, upstream: FakeUpstream
) -> None:
    """The app's inputs, files, end user and the rest reach Dify as given; a generation's
    own history (no session) is told as a transcript; bad params are refused up front."""
    prompt = upstream.expect(Reply(dify_answer(["ok"])))
    files = [{"type": "image", "transfer_method": "remote_url", "url": "https://x/y.png"}]
    params = {
        "inputs": {"topic": "tea"},
        "files": files,
        "user": "alice",
        "auto_generate_name": False,
    }
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "earlier"},
        {"role": "assistant", "content": "noted"},
        {"role": "user", "content": prompt},
    ]
    async with httpx.AsyncClient(base_url=dify_server.url, timeout=TIMEOUT) as http:
        generation = await start_generation(http, messages=messages, params=params)
        assert text_of(await read_events(http, generation["id"])) == "ok"
        for bad, problem in [
            ({"temperature": 0.2}, "unsupported dify params: temperature"),
            ({"files": {"type": "image"}}, "params.files must be a list"),
            ({"files": ["https://x/y.png"]}, "params.files must be a list of objects"),
            ({"inputs": "tea"}, "params.inputs must be an object"),
        ]:
            response = await http.post("/v1/generations", json={"prompt": "x", "params": bad})
            assert response.status_code == 422, response.text
            assert problem in response.text
        last_not_user = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        response = await http.post("/v1/generations", json={"messages": last_not_user})
        assert response.status_code == 422 and "last message" in response.text
    sent = upstream.requests_for(prompt)[0].body
    assert sent["inputs"] == {"topic": "tea"}
    assert sent["files"] == files
    assert (sent["user"], sent["auto_generate_name"]) == ("alice", False)
    assert sent["query"] == (
        "The conversation so far:\n\nSystem: Be brief.\n\nUser: earlier\n\n"
        f"Assistant: noted\n\n---\n\n{prompt}"
    )


async def test_agent_and_file_events(dify_server: Server, upstream: FakeUpstream) -> None:
    """An agent app's ``agent_message`` deltas are the answer (its closing ``message``
    repeats them and is not added again); thoughts and workflow events are skipped; a file
    the app produced becomes a Markdown link."""
    ids = {"conversation_id": "conv-F", "message_id": "m"}
    prompt = upstream.expect(
        Reply(
            [
                dify_event("workflow_started", data={}),
                dify_event("agent_thought", thought="search", tool="web", **ids),
                dify_event("agent_message", answer="Here ", **ids),
                dify_event("agent_message", answer="it is.", **ids),
                dify_event(
                    "message_file",
                    type="image",
                    belongs_to="assistant",
                    url="https://files/cat.png",
                    **ids,
                ),
                dify_event("message", answer="Here it is.", **ids),
                dify_event("message_end", metadata={}, **ids),
            ]
        )
    )
    async with httpx.AsyncClient(base_url=dify_server.url, timeout=TIMEOUT) as http:
        generation = await start_generation(http, prompt=prompt)
        events = await read_events(http, generation["id"])
        snapshot = await get_snapshot(http, generation["id"])
    assert snapshot["status"] == "completed"
    assert (
        text_of(events) == snapshot["text"] == "Here it is.\n\n![image](https://files/cat.png)\n\n"
    )


async def test_a_cancelled_answer_is_stopped_on_difys_side(
    dify_server: Server, upstream: FakeUpstream
) -> None:
    """Cancelling closes the connection and tells Dify to stop the task, as the owner."""
    gate = upstream.gate()
    ids = {"conversation_id": "conv-G", "message_id": "m"}
    prompt = upstream.expect(
        Reply([dify_event("message", answer="partial", **ids), gate], end="stall")
    )
    stops_before = len(upstream.stops())
    async with httpx.AsyncClient(base_url=dify_server.url, timeout=TIMEOUT) as http:
        generation = await start_generation(http, prompt=prompt)
        events = await read_events(http, generation["id"], max_events=2)
        assert text_of(events) == "partial"
        response = await http.post(f"/v1/generations/{generation['id']}/cancel")
        assert response.status_code in (200, 202), response.text
        await read_events(http, generation["id"])
        snapshot = await get_snapshot(http, generation["id"])
    assert (snapshot["status"], snapshot["text"]) == ("cancelled", "partial")
    stops = upstream.stops()[stops_before:]
    assert [(s.path, s.body) for s in stops] == [
        ("/v1/chat-messages/task-1/stop", {"user": "keepstream"})
    ]
    assert upstream.requests_for(prompt)[0].hung_up.is_set()


async def test_an_answer_cut_by_a_crash_leaves_the_session_in_its_conversation(
    server_factory: ServerFactory, upstream: FakeUpstream
) -> None:
    """The conversation id is stored with the answer's first text: SIGKILL mid-answer, and
    after the restart (the answer ends interrupted: Dify cannot continue) the next message
    still goes to that conversation."""
    args = (*dify_args(upstream), "--coalesce-window", "0", "--shutdown-grace", "1")
    server = server_factory(*args)
    ids = {"conversation_id": "conv-H", "message_id": "m"}
    first = upstream.expect(Reply([dify_event("message", answer="half", **ids)], end="stall"))
    second = upstream.expect(Reply(dify_answer(["whole"], conversation_id="conv-H")))
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as http:
        session = (await http.post("/v1/sessions", json={})).json()
        messages = f"/v1/sessions/{session['id']}/messages"
        posted = (await http.post(messages, json={"content": first})).json()
        events = await read_events(http, posted["generation_id"], max_events=2)
        assert text_of(events) == "half"
    server.kill()
    restarted = server_factory(*args, db=server.db)
    async with httpx.AsyncClient(base_url=restarted.url, timeout=TIMEOUT) as http:
        cut = await wait_for_status(http, posted["generation_id"], {"interrupted"})
        assert cut["text"] == "half"
        assert (await answered(http, messages, content=second))["text"] == "whole"
    sent = upstream.requests_for(second)[0].body
    assert (sent["conversation_id"], sent["query"]) == ("conv-H", second)
