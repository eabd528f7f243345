"""The OpenAI Responses view against real servers, read with the official ``openai`` SDK
(unmodified, strict response validation): background streams resumed after a dropped
connection, the SDK's stream helper, polling, plain and streamed requests, cancel,
conversations over ``previous_response_id`` (checked on what the upstream received), API
keys, and bad input."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import anyio
import httpx
import openai
import pytest
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFailedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseInputParam,
    ResponseOutputMessage,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)

from .conftest import DEFAULT_ARGS, ServerFactory
from .fake_upstream import FakeUpstream, Reply, answer, completion_chunk
from .support import ROOT, Server

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef00"
TIMEOUT = 10.0
MODEL = "any-model"
# At the fixture's 200 tokens per second: long enough to still be running when read or
# cancelled, short enough to finish at once.
LONG_ANSWER = 4000
SHORT_ANSWER = 60
MEDIUM_ANSWER = 300  # 1.5 s: a resumed reader catches up, then follows it live


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module, with a key each for alice and bob."""
    server = Server(
        db=tmp_path_factory.mktemp("responses") / "keepstream.db",
        args=(*DEFAULT_ARGS, "--api-keys", f"alice={ALICE},bob={BOB}"),
    )
    try:
        yield server.start()
    finally:
        server.kill()


def sdk(server: Server, key: str = ALICE) -> openai.OpenAI:
    """The official client, as a user of ``server``."""
    return openai.OpenAI(
        base_url=server.url + "/v1",
        api_key=key,
        max_retries=0,
        timeout=TIMEOUT,
        _strict_response_validation=True,
    )


@pytest.fixture
def alice(keyed_server: Server) -> Iterator[openai.OpenAI]:
    """The official client as alice, closed afterwards."""
    with sdk(keyed_server) as client:
        yield client


def deltas(events: Sequence[object]) -> str:
    """The text of the ``response.output_text.delta`` events."""
    return "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))


def carried(event: ResponseStreamEvent) -> Response:
    """The Response a lifecycle event carries."""
    assert isinstance(
        event,
        ResponseCreatedEvent
        | ResponseInProgressEvent
        | ResponseCompletedEvent
        | ResponseFailedEvent
        | ResponseIncompleteEvent,
    ), event.type
    return event.response


def numbering(events: list[ResponseStreamEvent]) -> list[tuple[int, str]]:
    """Each event's sequence number and type."""
    return [(e.sequence_number, e.type) for e in events]


def answer_item(response: Response) -> ResponseOutputMessage:
    """The response's one output item: the assistant message."""
    (item,) = response.output
    assert isinstance(item, ResponseOutputMessage), item
    return item


def wait_for(client: openai.OpenAI, response_id: str, statuses: set[str]) -> Response:
    """Poll ``retrieve`` until the status is one of ``statuses``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        response = client.responses.retrieve(response_id)
        if response.status in statuses:
            return response
        assert time.monotonic() < deadline, response.status
        time.sleep(0.02)


def test_background_stream_resumes_after_a_dropped_connection(
    alice: openai.OpenAI, keyed_server: Server
) -> None:
    stream = alice.responses.create(
        model=MODEL,
        input="resume me",
        background=True,
        stream=True,
        max_output_tokens=MEDIUM_ANSWER,
        metadata={"topic": "resume"},
    )
    first: list[ResponseStreamEvent] = []
    for event in stream:
        first.append(event)
        if sum(e.type == "response.output_text.delta" for e in first) == 2:
            break
    stream.close()  # the connection drops mid-answer
    created = first[0]
    assert created.type == "response.created"
    assert created.response.background is True
    assert created.response.status == "queued"
    response_id = created.response.id
    cursor = first[-1].sequence_number
    assert alice.responses.retrieve(response_id).status == "in_progress"

    rest = list(alice.responses.retrieve(response_id, stream=True, starting_after=cursor))
    final = alice.responses.retrieve(response_id)
    assert final.status == "completed"
    assert final.output_text and deltas(first) + deltas(rest) == final.output_text
    received = first + rest
    assert [e.sequence_number for e in received] == list(range(len(received)))
    assert rest[-1].type == "response.completed"
    assert rest[-1].response.output_text == final.output_text
    # A replay from the start numbers every event as the first reading did.
    replay = list(alice.responses.retrieve(response_id, stream=True))
    assert numbering(replay) == numbering(received)
    assert deltas(replay) == final.output_text
    assert final.metadata == {"topic": "resume"}
    assert final.max_output_tokens == MEDIUM_ANSWER
    assert final.usage is not None and final.usage.output_tokens == MEDIUM_ANSWER
    # The same thing under its native name.
    native = httpx.get(
        f"{keyed_server.url}/v1/generations/{response_id}",
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=TIMEOUT,
    ).json()
    assert native["text"] == final.output_text and native["status"] == "completed"


def test_sdk_stream_helper_replays_from_the_start(alice: openai.OpenAI) -> None:
    created = alice.responses.create(
        model=MODEL, input="helper", background=True, max_output_tokens=SHORT_ANSWER
    )
    with alice.responses.stream(response_id=created.id) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert final.output_text == alice.responses.retrieve(created.id).output_text
    assert deltas(events) == final.output_text
    with alice.responses.stream(response_id=created.id, starting_after=5) as stream:
        later = list(stream)
    assert [e.sequence_number for e in later] == list(range(6, len(events)))


async def test_background_response_polled_to_completed(keyed_server: Server) -> None:
    async with openai.AsyncOpenAI(
        base_url=keyed_server.url + "/v1",
        api_key=ALICE,
        max_retries=0,
        timeout=TIMEOUT,
        _strict_response_validation=True,
    ) as client:
        with anyio.fail_after(TIMEOUT):
            created = await client.responses.create(
                model=MODEL,
                input=cast(
                    "ResponseInputParam",
                    [
                        {"role": "user", "content": "an earlier question"},
                        {
                            "type": "message",
                            "role": "assistant",
                            "content": [{"type": "output_text", "text": "an earlier answer"}],
                        },
                        {"role": "user", "content": [{"type": "input_text", "text": "poll me"}]},
                    ],
                ),
                instructions="Be brief.",
                background=True,
                max_output_tokens=SHORT_ANSWER,
            )
            assert created.status == "queued" and created.background is True
            assert created.output == [] and created.instructions == "Be brief."
            response = created
            while response.status in ("queued", "in_progress"):
                await anyio.sleep(0.02)
                response = await client.responses.retrieve(created.id)
    assert response.status == "completed"
    assert response.output_text
    assert response.completed_at is not None and response.error is None
    message = answer_item(response)
    assert message.type == "message" and message.status == "completed"
    assert message.role == "assistant"
    assert response.usage is not None
    assert response.usage.total_tokens == response.usage.input_tokens + SHORT_ANSWER


def test_requests_without_background_answer_as_the_real_api(alice: openai.OpenAI) -> None:
    plain = alice.responses.create(model=MODEL, input="plain", max_output_tokens=SHORT_ANSWER)
    assert plain.status == "completed" and plain.background is False
    assert plain.output_text
    events = list(
        alice.responses.create(
            model=MODEL, input="streamed", stream=True, max_output_tokens=SHORT_ANSWER
        )
    )
    assert events[0].type == "response.created"
    assert events[0].response.status == "in_progress"
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert deltas(events) == events[-1].response.output_text


def test_cancel_keeps_the_partial_text_and_is_idempotent(alice: openai.OpenAI) -> None:
    stream = alice.responses.create(
        model=MODEL, input="stop me", background=True, stream=True, max_output_tokens=LONG_ANSWER
    )
    for event in stream:
        if event.type == "response.created":
            response_id = event.response.id
        if event.type == "response.output_text.delta":
            break
    stream.close()
    running = alice.responses.retrieve(response_id)
    assert running.status == "in_progress"
    assert answer_item(running).status == "in_progress"

    cancelled = alice.responses.cancel(response_id)
    assert cancelled.status == "cancelled"
    assert cancelled.output_text and answer_item(cancelled).status == "incomplete"
    again = alice.responses.cancel(response_id)
    assert again.status == "cancelled" and again.output_text == cancelled.output_text
    events = list(alice.responses.retrieve(response_id, stream=True))
    assert deltas(events) == cancelled.output_text
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.status == "cancelled"
    assert events[-1].response.output_text == cancelled.output_text


def test_cancel_before_it_runs(server_factory: ServerFactory) -> None:
    server = server_factory(*DEFAULT_ARGS, "--max-running", "1")
    with sdk(server) as client:
        busy = client.responses.create(
            model=MODEL, input="busy", background=True, max_output_tokens=LONG_ANSWER
        )
        waiting = client.responses.create(model=MODEL, input="waiting", background=True)
        assert client.responses.retrieve(waiting.id).status == "queued"
        cancelled = client.responses.cancel(waiting.id)
        client.responses.cancel(busy.id)
        assert cancelled.status == "cancelled" and cancelled.output == []
        events = list(client.responses.retrieve(waiting.id, stream=True))
    assert numbering(events) == [(0, "response.created"), (1, "response.incomplete")]
    assert carried(events[-1]).status == "cancelled"


def test_a_failed_answer_ends_with_response_failed(
    server_factory: ServerFactory, upstream: FakeUpstream
) -> None:
    server = server_factory(
        "--provider", "openai", "--model", "test-model", "--upstream-url", upstream.base_url
    )
    cut = [completion_chunk(role="assistant", content=""), completion_chunk("Par")]
    prompt = upstream.expect(Reply(cut, end="drop"), label="fail")
    with sdk(server) as client:
        failed = client.responses.create(model="test-model", input=prompt)
        events = list(client.responses.retrieve(failed.id, stream=True))
    assert failed.status == "failed" and failed.output_text == "Par"
    assert failed.error is not None and failed.error.code == "server_error"
    assert failed.error.type == "upstream_dropped"
    assert events[-1].type == "response.failed"
    assert events[-1].response.error == failed.error


def test_previous_response_id_continues_the_conversation(
    openai_server: Server, upstream: FakeUpstream
) -> None:
    first_prompt = upstream.expect(Reply(answer(["Paris", "."], usage=(11, 2))), label="ctx")
    with sdk(openai_server, key="unused") as client:
        first = client.responses.create(
            model="test-model", input=first_prompt, instructions="Be terse."
        )
        assert first.output_text == "Paris."
        assert first.usage is not None and first.usage.input_tokens == 11
        # Two responses may continue the same one: a fork, as OpenAI allows.
        for instructions in ("Answer in French.", None):
            prompt = upstream.expect(Reply(answer(["Oui."])), label="ctx")
            follow_up = client.responses.create(
                model="test-model",
                input=[{"role": "user", "content": [{"type": "input_text", "text": prompt}]}],
                previous_response_id=first.id,
                max_output_tokens=64,
                temperature=0.5,
                instructions=instructions,
            )
            assert follow_up.output_text == "Oui."
            assert follow_up.previous_response_id == first.id
            (received,) = upstream.requests_for(prompt)
            system = [{"role": "system", "content": instructions}] if instructions else []
            assert received.body["messages"] == [
                *system,
                {"role": "user", "content": first_prompt},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": prompt},
            ]
            assert received.body["max_tokens"] == 64
            assert received.body["temperature"] == 0.5
        # A third turn carries the whole chain.
        last_prompt = upstream.expect(Reply(answer(["Fin."])), label="ctx")
        client.responses.create(
            model="test-model", input=last_prompt, previous_response_id=follow_up.id
        )
        (received,) = upstream.requests_for(last_prompt)
        assert [m["content"] for m in received.body["messages"]] == [
            first_prompt,
            "Paris.",
            prompt,
            "Oui.",
            last_prompt,
        ]


def test_api_keys_scope_responses_to_their_owner(
    alice: openai.OpenAI, keyed_server: Server
) -> None:
    mine = alice.responses.create(model=MODEL, input="mine", max_output_tokens=SHORT_ANSWER)
    with sdk(keyed_server, key=BOB) as bob:
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            list(bob.responses.retrieve(mine.id, stream=True))
        with pytest.raises(openai.NotFoundError):
            bob.responses.cancel(mine.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(model=MODEL, input="hijack", previous_response_id=mine.id)
    with sdk(keyed_server, key="sk-nobody-0123456789abcdef") as nobody:
        with pytest.raises(openai.AuthenticationError):
            nobody.responses.retrieve(mine.id)
    answer_401 = httpx.post(f"{keyed_server.url}/v1/responses", json={}, timeout=TIMEOUT)
    assert answer_401.status_code == 401
    assert answer_401.json()["error"]["message"]
    assert alice.responses.retrieve(mine.id).output_text == mine.output_text


BAD_BODIES: list[tuple[Any, int, str]] = [
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search"}]}, 422, "tools"),
    (
        {"model": MODEL, "input": "x", "text": {"format": {"type": "json_object"}}},
        422,
        "text.format",
    ),
    ({"model": MODEL, "input": 42}, 422, "input"),
    ({"model": MODEL, "input": [{"role": "robot", "content": "x"}]}, 422, "role"),
    (
        {"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        422,
        "type",
    ),
    ({"model": MODEL, "input": "x", "conversation": "conv_1"}, 422, "conversation"),
    ({"input": "x"}, 422, "model"),
    ({"model": MODEL}, 422, "input"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 3}, 422, "max_output_tokens"),
    ({"model": MODEL, "input": "x", "metadata": {"k": 1}}, 422, "metadata"),
    ({"model": MODEL, "input": "x", "previous_response_id": "gen_missing"}, 404, "gen_missing"),
    ([1, 2], 422, "object"),
]


@pytest.mark.parametrize(
    ("body", "status", "named"),
    BAD_BODIES,
    ids=[
        "tools",
        "json-format",
        "input-type",
        "role",
        "image-part",
        "unknown-field",
        "no-model",
        "no-input",
        "max-output-tokens",
        "metadata-value",
        "unknown-previous",
        "not-an-object",
    ],
)
def test_bad_requests_answer_4xx_json_naming_the_problem(
    keyed_server: Server, body: Any, status: int, named: str
) -> None:
    response = httpx.post(
        f"{keyed_server.url}/v1/responses",
        json=body,
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=TIMEOUT,
    )
    assert response.status_code == status, response.text
    assert named in response.json()["error"]["message"]


def test_bad_query_and_body_raise_the_sdk_errors(
    alice: openai.OpenAI, keyed_server: Server
) -> None:
    with pytest.raises(openai.UnprocessableEntityError):
        alice.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    done = alice.responses.create(model=MODEL, input="x", max_output_tokens=SHORT_ANSWER)
    headers = {"Authorization": f"Bearer {ALICE}"}
    for query in ("stream=maybe", "stream=true&starting_after=-1", "stream=true&starting_after=x"):
        response = httpx.get(
            f"{keyed_server.url}/v1/responses/{done.id}?{query}", headers=headers, timeout=TIMEOUT
        )
        assert response.status_code == 400, query
        assert response.json()["error"]["message"]
    malformed = httpx.post(
        f"{keyed_server.url}/v1/responses", content=b"{", headers=headers, timeout=TIMEOUT
    )
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]["message"]
    # Past the end there is nothing more: an empty stream that closes.
    assert list(alice.responses.retrieve(done.id, stream=True, starting_after=10_000)) == []


def readme_python_block() -> str:
    """The Python example of the README's Responses section."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## OpenAI Responses API (background mode)") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_readme_example_runs_as_written(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEPSTREAM_URL", server.url)
    output = io.StringIO()
    namespace: dict[str, Any] = {"__name__": "readme"}
    try:
        with contextlib.redirect_stdout(output):
            exec(compile(readme_python_block(), "README.md", "exec"), namespace)
    finally:
        if "client" in namespace:
            namespace["client"].close()  # the example leaves it open, as a script may
    assert output.getvalue().splitlines() == ["completed True", "completed"]


def test_a_long_chain_sends_only_the_history_that_fits(
    server_factory: ServerFactory, upstream: FakeUpstream
) -> None:
    """Like a session, a chain of responses sends the model the most recent history that
    fits --history-chars, so a long chain neither grows every request nor the context."""
    server = server_factory(
        *("--provider", "openai", "--model", "test-model", "--upstream-url", upstream.base_url),
        *("--history-chars", "60"),
    )
    with sdk(server) as client:
        previous = None
        for turn in range(4):
            prompt = upstream.expect(Reply(answer([f"answer {turn} " * 2])), label="long")
            response = client.responses.create(
                model="test-model", input=prompt, previous_response_id=previous
            )
            previous = response.id
        (received,) = upstream.requests_for(prompt)
    contents = [m["content"] for m in received.body["messages"]]
    assert contents[-1] == prompt
    assert sum(map(len, contents)) <= 60
    assert contents[-2] == "answer 2 answer 2 "  # the newest history is kept
