"""Sessions over real HTTP: switching between conversations never loses an answer, every
lifecycle rule and policy does what it says, limits hold at their bounds, one user never sees
another's sessions, and the model gets the history that fits the window.

The servers are shared per module; every test works as a user of its own (API keys), so tests
that share a server never see each other's sessions or count against each other's limits.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent, aconnect_sse

from .backends import BACKENDS
from .conftest import ServerFactory, openai_args
from .fake_upstream import FakeUpstream, Received, Reply, answer, paced
from .support import Server, final_status, read_events, text_of, wait_for_status

REQUEST_TIMEOUT = 10.0
MERGE_PATCH = "application/merge-patch+json"
TERMINAL = {"completed", "cancelled", "failed", "interrupted"}
MISSING_SESSION = "ses_doesnotexist0000000000"

# -- servers and users ------------------------------------------------------------------------

USERS = [f"user{i:03d}" for i in range(200)]
_next_user = itertools.count()


def key_of(user: str) -> str:
    return f"sk-{user}-0123456789abcdef"


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A keys file with a key for every user in ``USERS``."""
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text("".join(f"{user}={key_of(user)}\n" for user in USERS))
    return path


def module_server(
    tmp_path_factory: pytest.TempPathFactory, keys: Path, name: str, *args: str
) -> Iterator[Server]:
    """A server on a database of its own that accepts every key of ``keys``; killed after."""
    server = Server(
        db=tmp_path_factory.mktemp(name) / "keepstream.db",
        args=(*args, "--api-keys-file", str(keys), "--shutdown-grace", "1"),
    )
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def fast_server(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[Server]:
    """Simulated answers of 20 tokens at 200 tokens/s (0.1 s), default limits."""
    yield from module_server(
        tmp_path_factory,
        keys_file,
        "fast",
        *("--sim-tokens-per-second", "200", "--sim-max-tokens", "20"),
    )


@pytest.fixture(scope="module")
def medium_server(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[Server]:
    """Simulated answers of 30 tokens at 20 tokens/s (1.5 s)."""
    yield from module_server(
        tmp_path_factory,
        keys_file,
        "medium",
        *("--sim-tokens-per-second", "20", "--sim-max-tokens", "30"),
    )


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[Server]:
    """Simulated answers of 400 tokens at 20 tokens/s (20 s): they run for the whole test."""
    yield from module_server(
        tmp_path_factory,
        keys_file,
        "slow",
        *("--sim-tokens-per-second", "20", "--sim-max-tokens", "400"),
    )


MAX_SESSIONS = 3
MAX_MESSAGE_CHARS = 50
MAX_CONTEXT_BYTES = 200
MAX_SESSION_MESSAGES = 4


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory, keys_file: Path) -> Iterator[Server]:
    """Fast simulated answers and small limits."""
    yield from module_server(
        tmp_path_factory,
        keys_file,
        "limited",
        *("--sim-tokens-per-second", "200", "--sim-max-tokens", "5"),
        *("--max-sessions-per-user", str(MAX_SESSIONS)),
        *("--max-message-chars", str(MAX_MESSAGE_CHARS)),
        *("--max-context-bytes", str(MAX_CONTEXT_BYTES)),
        *("--max-session-messages", str(MAX_SESSION_MESSAGES)),
    )


HISTORY_CHARS = 300


@pytest.fixture(scope="module")
def chat_server(
    tmp_path_factory: pytest.TempPathFactory, keys_file: Path, upstream: FakeUpstream
) -> Iterator[Server]:
    """Answers from the fake OpenAI upstream; a history window of ``HISTORY_CHARS``."""
    yield from module_server(
        tmp_path_factory,
        keys_file,
        "chat",
        *openai_args(upstream),
        *("--history-chars", str(HISTORY_CHARS)),
    )


def new_user() -> str:
    """A user no other test has used."""
    return USERS[next(_next_user)]


@asynccontextmanager
async def as_user(
    server: Server, user: str | None = None, *, connections: int = 10
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for ``server`` with the API key of ``user`` (a fresh user by default)."""
    key = key_of(user or new_user())
    async with httpx.AsyncClient(
        base_url=server.url,
        timeout=30,
        headers={"Authorization": f"Bearer {key}"},
        limits=httpx.Limits(max_connections=connections),
    ) as http:
        yield http


# -- requests ---------------------------------------------------------------------------------


async def call(
    http: httpx.AsyncClient, method: str, url: str, *, expect: int | None = None, **kwargs: Any
) -> httpx.Response:
    """One request, bounded in time; with ``expect``, its status is checked."""
    with anyio.fail_after(REQUEST_TIMEOUT):
        response = await http.request(method, url, **kwargs)
    if expect is not None:
        assert response.status_code == expect, (method, url, response.text)
    return response


def body(response: httpx.Response) -> dict[str, Any]:
    data: dict[str, Any] = response.json()
    return data


async def create(http: httpx.AsyncClient, **settings: Any) -> dict[str, Any]:
    """``POST /v1/sessions``; 201."""
    return body(await call(http, "POST", "/v1/sessions", json=settings, expect=201))


async def post(http: httpx.AsyncClient, session_id: str, content: str) -> dict[str, Any]:
    """``POST /v1/sessions/{id}/messages``; 202."""
    url = f"/v1/sessions/{session_id}/messages"
    return body(await call(http, "POST", url, json={"content": content}, expect=202))


async def get_session(http: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    """``GET /v1/sessions/{id}``; 200."""
    return body(await call(http, "GET", f"/v1/sessions/{session_id}", expect=200))


async def patch(
    http: httpx.AsyncClient, session_id: str, changes: Any, *, merge: bool = False
) -> httpx.Response:
    """``PATCH /v1/sessions/{id}`` as a merge patch or as plain JSON."""
    content_type = MERGE_PATCH if merge else "application/json"
    return await call(
        http,
        "PATCH",
        f"/v1/sessions/{session_id}",
        content=json.dumps(changes),
        headers={"Content-Type": content_type},
    )


async def set_status(http: httpx.AsyncClient, session_id: str, status: str) -> dict[str, Any]:
    response = await patch(http, session_id, {"status": status})
    assert response.status_code == 200, response.text
    return body(response)


async def listing(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    """``GET /v1/sessions``: the data."""
    data: list[dict[str, Any]] = body(
        await call(http, "GET", "/v1/sessions", params=params, expect=200)
    )["data"]
    return data


async def get_generation(http: httpx.AsyncClient, generation_id: str) -> dict[str, Any]:
    return body(await call(http, "GET", f"/v1/generations/{generation_id}", expect=200))


async def wait_for_text(
    http: httpx.AsyncClient, generation_id: str, done: Callable[[str], bool]
) -> dict[str, Any]:
    """Poll a generation's snapshot until ``done(text)``; return that snapshot."""
    with anyio.fail_after(REQUEST_TIMEOUT):
        while True:
            snapshot = await get_generation(http, generation_id)
            if done(snapshot["text"]):
                return snapshot
            await anyio.sleep(0.02)


async def answered(http: httpx.AsyncClient, session_id: str, content: str) -> dict[str, Any]:
    """Post a message and wait for its answer to complete; return the final snapshot."""
    posted = await post(http, session_id, content)
    return await wait_for_status(http, posted["generation_id"], {"completed"}, REQUEST_TIMEOUT)


def error(response: httpx.Response, status: int, kind: str) -> str:
    """Check an error response; return its message."""
    assert response.status_code == status, response.text
    err: dict[str, str] = response.json()["error"]
    assert err["type"] == kind, err
    return err["message"]


def contents(session: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, content) of a session's messages."""
    return [(m["role"], m["content"]) for m in session["messages"]]


# -- 1. the session switch --------------------------------------------------------------------

A_WHILE_AWAY = [f"alpha{i} " for i in range(12)]  # streamed while nobody watches A
A_AFTER_RETURN = [f"omega{i} " for i in range(8)]  # streamed once the client is back
B_ANSWER = ["B ", "answers ", "in ", "full."]


async def test_switching_away_and_back_keeps_the_answer_generating_and_live(
    chat_server: Server, upstream: FakeUpstream
) -> None:
    """A long answer in A; the client switches to B and reads a whole answer there; back in A
    the answer went on without anyone watching, and following it from the snapshot's
    ``next_offset`` shows the rest live, to the end, matching the stored message.

    The model is the fake upstream, not the simulated one: every simulated answer has the
    same length, so B could never finish while A still runs. A's reply streams for ~0.6 s,
    then waits at a gate the test opens only once it is following A again.
    """
    events = answer([*A_WHILE_AWAY, *A_AFTER_RETURN])
    split = 1 + len(A_WHILE_AWAY)  # the role chunk, then the deltas sent while away
    gate = upstream.gate()
    prompt_a = upstream.expect(
        Reply([*paced(events[:split], 0.05), gate, *paced(events[split:], 0.01)]), label="a"
    )
    prompt_b = upstream.expect(Reply(answer(B_ANSWER)), label="b")
    async with as_user(chat_server) as http:
        a = await create(http, title="A")
        seen: list[ServerSentEvent] = []
        with anyio.fail_after(REQUEST_TIMEOUT):
            async with aconnect_sse(
                http, "POST", f"/v1/sessions/{a['id']}/messages", json={"content": prompt_a}
            ) as source:
                assert source.response.status_code == 200
                generation_a = source.response.headers["keepstream-generation-id"]
                async for sse in source.aiter_sse():
                    if sse.data:
                        seen.append(sse)
                    if sum(e.event == "delta" for e in seen) >= 2:
                        break  # the user switches to B
        seen_text = text_of(seen)
        assert seen_text and "".join(A_WHILE_AWAY).startswith(seen_text)

        b = await create(http, title="B")
        posted_b = await post(http, b["id"], prompt_b)
        b_events = await read_events(http, posted_b["generation_id"], timeout=REQUEST_TIMEOUT)
        assert final_status(b_events) == "completed"
        assert text_of(b_events) == "".join(B_ANSWER)
        assert contents(await get_session(http, b["id"])) == [
            ("user", prompt_b),
            ("assistant", "".join(B_ANSWER)),
        ]

        # The sidebar: B is the most recent, and only A shows a spinner.
        sidebar = {s["id"]: s for s in await listing(http)}
        assert list(sidebar) == [b["id"], a["id"]]
        assert sidebar[a["id"]]["active_generation_id"] == generation_a
        assert sidebar[a["id"]]["latest_generation"] == {"id": generation_a, "status": "running"}
        assert sidebar[b["id"]]["active_generation_id"] is None
        assert sidebar[b["id"]]["latest_generation"]["status"] == "completed"

        # Back in A: the answer went on while nobody watched (up to the gate).
        snapshot = await wait_for_text(http, generation_a, "".join(A_WHILE_AWAY).__eq__)
        assert snapshot["status"] == "running"
        assert len(snapshot["text"]) > len(seen_text)
        in_progress = await get_session(http, a["id"])
        assert contents(in_progress) == [("user", prompt_a), ("assistant", snapshot["text"])]
        assert in_progress["messages"][1]["generation_status"] == "running"

        live: list[ServerSentEvent] = []
        with anyio.fail_after(REQUEST_TIMEOUT):
            async with aconnect_sse(
                http,
                "GET",
                f"/v1/generations/{generation_a}/events",
                params={"offset": snapshot["next_offset"]},
            ) as source:
                assert source.response.status_code == 200
                gate.open()  # only now does A produce the rest: whatever arrives is live
                live.extend([sse async for sse in source.aiter_sse() if sse.data])
        assert int(live[0].id) == snapshot["next_offset"] + 1
        assert [int(e.id) for e in live] == list(
            range(snapshot["next_offset"] + 1, snapshot["next_offset"] + len(live) + 1)
        )
        assert text_of(live) == "".join(A_AFTER_RETURN)
        assert final_status(live) == "completed"
        final = await get_generation(http, generation_a)
        full = "".join(A_WHILE_AWAY + A_AFTER_RETURN)
        assert final["text"] == snapshot["text"] + text_of(live) == full
        assert contents(await get_session(http, a["id"])) == [
            ("user", prompt_a),
            ("assistant", full),
        ]


# -- 2. lifecycle -----------------------------------------------------------------------------


async def test_create_returns_the_session_with_defaults(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        response = await call(http, "POST", "/v1/sessions", json={}, expect=201)
        session = body(response)
        assert response.headers["location"] == f"/v1/sessions/{session['id']}"
        assert session["status"] == "active"
        assert session["on_closed"] == "reopen"
        assert session["on_busy"] == "reject"
        assert session["close_on_complete"] is False
        assert session["keep_open"] is False
        assert session["context"] == {}
        assert session["closed_reason"] is None
        assert session["message_count"] == session["trimmed_messages"] == 0
        assert {**(await get_session(http, session["id"])), "messages": None} == {
            **session,
            "messages": None,
        }


async def test_a_paused_session_stores_the_message_and_starts_nothing(
    fast_server: Server,
) -> None:
    async with as_user(fast_server) as http:
        session = await create(http)
        assert (await set_status(http, session["id"], "paused"))["status"] == "paused"
        posted = await post(http, session["id"], "a human took over")
        assert posted["generation"] is None
        assert posted["generation_id"] is None
        assert posted["session"]["status"] == "paused"
        stored = await get_session(http, session["id"])
        assert contents(stored) == [("user", "a human took over")]
        assert stored["messages"][0]["generation_id"] is None
        assert stored["message_count"] == 1
        [summary] = await listing(http)
        assert summary["latest_generation"] is None
        assert summary["active_generation_id"] is None

        # Back to active: the next message is answered.
        await set_status(http, session["id"], "active")
        snapshot = await answered(http, session["id"], "bot, take over")
        stored = await get_session(http, session["id"])
        assert contents(stored) == [
            ("user", "a human took over"),
            ("user", "bot, take over"),
            ("assistant", snapshot["text"]),
        ]


async def test_on_closed_reopen_reopens_with_the_history(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        session = await create(http)  # on_closed defaults to reopen
        first = await answered(http, session["id"], "first")
        closed = await set_status(http, session["id"], "closed")
        assert closed["closed_reason"] == "user"

        posted = await post(http, session["id"], "second")
        assert posted["reopened"] is True
        assert posted["session_id"] == session["id"]
        assert posted["session"]["status"] == "active"
        assert posted["session"]["closed_reason"] is None
        assert posted["session"]["closed_at"] is None
        second = await wait_for_status(http, posted["generation_id"], {"completed"})
        assert contents(await get_session(http, session["id"])) == [
            ("user", "first"),
            ("assistant", first["text"]),
            ("user", "second"),
            ("assistant", second["text"]),
        ]


async def test_on_closed_new_opens_a_linked_session_with_the_message(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        old = await create(http, on_closed="new", title="support", context={"ticket": 7})
        first = await answered(http, old["id"], "first")
        await set_status(http, old["id"], "closed")

        posted = await post(http, old["id"], "are you there?")
        new_id = posted["session_id"]
        assert new_id != old["id"]
        assert posted["reopened"] is False
        assert posted["session"]["id"] == new_id
        assert posted["session"]["previous_session_id"] == old["id"]
        assert posted["session"]["status"] == "active"
        answer_text = (await wait_for_status(http, posted["generation_id"], {"completed"}))["text"]
        new = await get_session(http, new_id)
        assert contents(new) == [("user", "are you there?"), ("assistant", answer_text)]
        assert new["messages"][1]["generation_id"] == posted["generation_id"]
        assert (new["title"], new["context"], new["on_closed"]) == ("support", {"ticket": 7}, "new")

        still = await get_session(http, old["id"])
        assert still["status"] == "closed"
        assert contents(still) == [("user", "first"), ("assistant", first["text"])]
        assert [s["id"] for s in await listing(http)] == [new_id, old["id"]]


async def test_on_closed_reject_is_409_and_stores_nothing(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        session = await create(http, on_closed="reject")
        first = await answered(http, session["id"], "first")
        await set_status(http, session["id"], "closed")

        response = await call(
            http, "POST", f"/v1/sessions/{session['id']}/messages", json={"content": "hello?"}
        )
        message = error(response, 409, "session_closed")
        assert "closed" in message and "reject" in message
        after = await get_session(http, session["id"])
        assert after["status"] == "closed"
        assert contents(after) == [("user", "first"), ("assistant", first["text"])]
        assert len(await listing(http)) == 1  # no other session appeared

        # As the error says: reopen it, and the message goes through.
        await set_status(http, session["id"], "active")
        await answered(http, session["id"], "hello?")


async def test_finishing_an_answer_does_not_close_the_session(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        session = await create(http)
        assert session["close_on_complete"] is False
        for turn in range(3):  # no restart loop: every answer leaves the session open
            snapshot = await answered(http, session["id"], f"turn {turn}")
            assert snapshot["status"] == "completed"
            after = await get_session(http, session["id"])
            assert (after["status"], after["closed_reason"], after["closed_at"]) == (
                "active",
                None,
                None,
            )
        assert [s["id"] for s in await listing(http, status="active")] == [session["id"]]
        assert await listing(http, status="closed") == []


async def test_status_transitions_and_closed_reason(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        session = await create(http)
        sid = session["id"]
        expected = {"active": None, "paused": None, "closed": "user"}
        for status in ("paused", "active", "closed", "active", "paused", "closed", "paused"):
            changed = await set_status(http, sid, status)
            assert (changed["status"], changed["closed_reason"]) == (status, expected[status])
            assert (changed["closed_at"] is not None) == (status == "closed")
            stored = await get_session(http, sid)
            assert (stored["status"], stored["closed_reason"]) == (status, expected[status])
        for bad in ("expired", "open", "", None, 1):
            error(await patch(http, sid, {"status": bad}), 422, "invalid_request")
        # Other fields change without touching the status.
        changed = body(await patch(http, sid, {"title": "renamed", "keep_open": True}))
        assert (changed["title"], changed["keep_open"], changed["status"]) == (
            "renamed",
            True,
            "paused",
        )


async def test_list_is_newest_activity_first_and_filters_by_status(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        one, two, three = [(await create(http, title=t))["id"] for t in ("1", "2", "3")]
        assert [s["id"] for s in await listing(http)] == [three, two, one]
        await answered(http, one, "activity")  # a message is activity
        await set_status(http, two, "paused")
        assert [s["id"] for s in await listing(http)] == [one, three, two]
        assert [s["id"] for s in await listing(http, limit=2)] == [one, three]
        assert [s["id"] for s in await listing(http, status="paused")] == [two]
        assert [s["id"] for s in await listing(http, status="active")] == [one, three]
        for params in ({"status": "expired"}, {"limit": 0}, {"limit": "x"}):
            response = await call(http, "GET", "/v1/sessions", params=params)
            error(response, 422, "invalid_request")


async def test_bad_requests_are_422(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        for settings in (
            {"on_closed": "ignore"},
            {"on_busy": "drop"},
            {"title": 3},
            {"keep_open": "yes"},
            {"close_on_complete": 1},
            {"status": "active"},  # not settable at creation
            {"owner": "someone-else"},
        ):
            response = await call(http, "POST", "/v1/sessions", json=settings)
            error(response, 422, "invalid_request")
        response = await call(http, "POST", "/v1/sessions", json=["not", "an", "object"])
        error(response, 422, "invalid_request")
        session = await create(http)
        url = f"/v1/sessions/{session['id']}/messages"
        for message in ({}, {"content": ""}, {"content": 5}, {"content": "x", "role": "system"}):
            error(await call(http, "POST", url, json=message), 422, "invalid_request")
        assert (await get_session(http, session["id"]))["messages"] == []


# -- 3. on_busy -------------------------------------------------------------------------------

CONCURRENT_POSTS = 100


async def post_concurrently(
    clients: Sequence[httpx.AsyncClient], session_id: str, count: int
) -> list[tuple[str, httpx.Response]]:
    """``count`` posts to one session at once, through ``clients`` in turn; (content,
    response) in the order they were sent."""
    responses: dict[int, httpx.Response] = {}

    async def one(i: int) -> None:
        responses[i] = await clients[i % len(clients)].post(
            f"/v1/sessions/{session_id}/messages", json={"content": f"message {i}"}
        )

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(one, i)
    return [(f"message {i}", responses[i]) for i in range(count)]


async def test_on_busy_queue_answers_a_hundred_concurrent_posts_in_order(
    fast_server: Server,
) -> None:
    async with as_user(fast_server, connections=CONCURRENT_POSTS) as http:
        session = await create(http, on_busy="queue")
        results = await post_concurrently([http], session["id"], CONCURRENT_POSTS)
        assert [r.status_code for _, r in results] == [202] * CONCURRENT_POSTS
        accepted = {body(r)["generation_id"] for _, r in results}
        assert len(accepted) == CONCURRENT_POSTS
        stored = await get_session(http, session["id"])
        order = [m["generation_id"] for m in stored["messages"] if m["role"] == "assistant"]
        assert set(order) == accepted  # every message stored, each with its own answer
        finished = [await wait_for_status(http, gid, {"completed"}) for gid in order]
        for earlier, later in pairwise(finished):  # one after another, in arrival order
            assert later["started_at"] >= earlier["finished_at"]
        stored = await get_session(http, session["id"])
        answers = [m["content"] for m in stored["messages"] if m["role"] == "assistant"]
        assert answers == [f["text"] for f in finished] and all(answers)
        await call(http, "DELETE", f"/v1/sessions/{session['id']}", expect=204)


async def test_on_busy_reject_accepts_exactly_one_of_a_hundred_concurrent_posts(
    slow_server: Server,
) -> None:
    async with as_user(slow_server, connections=CONCURRENT_POSTS) as http:
        session = await create(http)  # on_busy defaults to reject
        results = await post_concurrently([http], session["id"], CONCURRENT_POSTS)
        accepted = [(c, r) for c, r in results if r.status_code == 202]
        rejected = [r for _, r in results if r.status_code != 202]
        assert len(accepted) == 1, [r.status_code for _, r in results]
        [(content, response)] = accepted
        generation_id = body(response)["generation_id"]
        assert len(rejected) == CONCURRENT_POSTS - 1
        for response in rejected:
            assert generation_id in error(response, 409, "session_busy")
        # Only the accepted message is stored; the rejected ones left no trace.
        stored = await get_session(http, session["id"])
        assert [(m["role"], m["generation_id"]) for m in stored["messages"]] == [
            ("user", None),
            ("assistant", generation_id),
        ]
        assert stored["messages"][0]["content"] == content
        assert (await get_generation(http, generation_id))["status"] in ("queued", "running")
        await call(http, "DELETE", f"/v1/sessions/{session['id']}", expect=204)


async def test_a_refused_message_does_not_reopen_a_closed_session(slow_server: Server) -> None:
    async with as_user(slow_server) as http:
        session = await create(http)  # on_closed=reopen, on_busy=reject
        posted = await post(http, session["id"], "a long answer")
        await set_status(http, session["id"], "closed")  # while the answer still runs
        response = await call(
            http, "POST", f"/v1/sessions/{session['id']}/messages", json={"content": "more"}
        )
        error(response, 409, "session_busy")
        after = await get_session(http, session["id"])
        running = await get_generation(http, posted["generation_id"])
        await call(http, "DELETE", f"/v1/sessions/{session['id']}", expect=204)
        assert len(after["messages"]) == 2
        assert running["status"] in ("queued", "running")  # still active, untouched
        assert (after["status"], after["closed_reason"]) == ("closed", "user")


async def test_on_busy_interrupt_keeps_the_partial_answer(medium_server: Server) -> None:
    async with as_user(medium_server) as http:
        session = await create(http, on_busy="interrupt")
        first = await post(http, session["id"], "first question")
        await wait_for_text(http, first["generation_id"], lambda text: len(text.split()) >= 3)
        second = await post(http, session["id"], "never mind, second question")
        interrupted = await wait_for_status(http, first["generation_id"], TERMINAL, REQUEST_TIMEOUT)
        assert interrupted["status"] == "cancelled"
        started = await wait_for_status(
            http, second["generation_id"], {"running", "completed"}, REQUEST_TIMEOUT
        )
        assert interrupted["finished_at"] <= started["started_at"]  # it ended first
        assert len(interrupted["text"].split()) >= 3
        events = await read_events(http, first["generation_id"], timeout=REQUEST_TIMEOUT)
        assert final_status(events) == "cancelled"
        assert text_of(events) == interrupted["text"]
        stored = await get_session(http, session["id"])
        assert contents(stored)[:3] == [
            ("user", "first question"),
            ("assistant", interrupted["text"]),
            ("user", "never mind, second question"),
        ]
        assert stored["messages"][1]["generation_status"] == "cancelled"
        await call(http, "DELETE", f"/v1/sessions/{session['id']}", expect=204)


async def test_on_busy_interrupt_serialises_a_hundred_concurrent_posts(
    medium_server: Server,
) -> None:
    async with as_user(medium_server, connections=CONCURRENT_POSTS) as http:
        session = await create(http, on_busy="interrupt")
        results = await post_concurrently([http], session["id"], CONCURRENT_POSTS)
        assert [r.status_code for _, r in results] == [202] * CONCURRENT_POSTS
        posted = {body(r)["generation_id"]: content for content, r in results}
        assert len(posted) == CONCURRENT_POSTS  # one generation per post

        # The session holds every message, in the order the posts were serialised: each
        # user message followed by its own answer.
        stored = await get_session(http, session["id"])
        messages = stored["messages"]
        assert len(messages) == 2 * CONCURRENT_POSTS
        order = [m["generation_id"] for m in messages[1::2]]
        assert [m["role"] for m in messages] == ["user", "assistant"] * CONCURRENT_POSTS
        assert [m["content"] for m in messages[::2]] == [posted[g] for g in order]
        assert set(order) == set(posted)

        last = await wait_for_status(http, order[-1], {"completed"}, REQUEST_TIMEOUT)
        generations = [await get_generation(http, g) for g in order[:-1]] + [last]
        assert [g["status"] for g in generations] == ["cancelled"] * (CONCURRENT_POSTS - 1) + [
            "completed"
        ]
        # Serialised: every generation had ended before a later one started (most of them
        # were cancelled while still queued, and never started; those may end in any order).
        for i, later in enumerate(generations):
            if later["started_at"] is not None:
                assert all(e["finished_at"] <= later["started_at"] for e in generations[:i])
        # Every partial answer is kept, as the session shows it.
        final = await get_session(http, session["id"])
        assert [m["content"] for m in final["messages"][1::2]] == [g["text"] for g in generations]
        assert last["text"]


# -- 4. delete --------------------------------------------------------------------------------


async def test_delete_during_a_running_answer_ends_it_and_everything_is_gone(
    slow_server: Server,
) -> None:
    async with as_user(slow_server) as http:
        session = await create(http)
        sid = session["id"]
        other = await create(http)
        follower: list[ServerSentEvent] = []
        deleted = False
        with anyio.fail_after(REQUEST_TIMEOUT):
            async with aconnect_sse(
                http, "POST", f"/v1/sessions/{sid}/messages", json={"content": "long one"}
            ) as source:
                generation_id = source.response.headers["keepstream-generation-id"]
                async for sse in source.aiter_sse():
                    if sse.data:
                        follower.append(sse)
                    if not deleted and sum(e.event == "delta" for e in follower) == 2:
                        # Delete while the answer runs and this client still follows it:
                        # the delete returns, and the follow ends instead of hanging.
                        await call(http, "DELETE", f"/v1/sessions/{sid}", expect=204)
                        deleted = True
        assert deleted and text_of(follower)

        for method, url in (
            ("GET", f"/v1/sessions/{sid}"),
            ("PATCH", f"/v1/sessions/{sid}"),
            ("DELETE", f"/v1/sessions/{sid}"),
            ("POST", f"/v1/sessions/{sid}/messages"),
            ("GET", f"/v1/generations/{generation_id}"),
            ("GET", f"/v1/generations/{generation_id}/events"),
            ("POST", f"/v1/generations/{generation_id}/cancel"),
        ):
            response = await call(http, method, url, json={"content": "x"})
            error(response, 404, "not_found")
        assert [s["id"] for s in await listing(http)] == [other["id"]]
        # The server is fine: the other session answers.
        posted = await post(http, other["id"], "still here")
        assert (await get_generation(http, posted["generation_id"]))["status"] in {
            "queued",
            "running",
        }
        await call(http, "DELETE", f"/v1/sessions/{other['id']}", expect=204)


async def test_delete_an_idle_session(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        session = await create(http)
        finished = await answered(http, session["id"], "hi")
        response = await call(http, "DELETE", f"/v1/sessions/{session['id']}", expect=204)
        assert response.content == b""
        error(await call(http, "GET", f"/v1/sessions/{session['id']}"), 404, "not_found")
        url = f"/v1/generations/{finished['id']}"
        error(await call(http, "GET", url), 404, "not_found")
        assert await listing(http) == []


# -- 5. limits --------------------------------------------------------------------------------


async def test_open_sessions_per_user_limit(limited_server: Server) -> None:
    async with as_user(limited_server) as http:
        sessions = [await create(http) for _ in range(MAX_SESSIONS - 1)]  # just under
        sessions.append(await create(http, on_closed="reopen"))  # at the bound
        over = await call(http, "POST", "/v1/sessions", json={})
        message = error(over, 409, "limit_exceeded")
        assert "max_sessions_per_user" in message and str(MAX_SESSIONS) in message
        assert len(await listing(http)) == MAX_SESSIONS

        # Paused sessions count; closed ones do not.
        await set_status(http, sessions[0]["id"], "paused")
        error(await call(http, "POST", "/v1/sessions", json={}), 409, "limit_exceeded")
        await set_status(http, sessions[1]["id"], "closed")
        newest = await create(http, on_closed="new")
        # At the bound again: reopening the closed one, by PATCH or by a message, is refused,
        # and the refused message is not stored.
        error(await patch(http, sessions[1]["id"], {"status": "active"}), 409, "limit_exceeded")
        refused = await call(
            http, "POST", f"/v1/sessions/{sessions[1]['id']}/messages", json={"content": "hi"}
        )
        error(refused, 409, "limit_exceeded")
        reopen = await get_session(http, sessions[1]["id"])
        assert (reopen["status"], reopen["messages"]) == ("closed", [])
        # A linked new session would be one too many as well.
        await set_status(http, newest["id"], "closed")
        await create(http)
        refused = await call(
            http, "POST", f"/v1/sessions/{newest['id']}/messages", json={"content": "hi"}
        )
        error(refused, 409, "limit_exceeded")
        assert len(await listing(http)) == MAX_SESSIONS + 2  # two closed; nothing was created

    async with as_user(limited_server) as someone_else:  # the limit is per user
        await create(someone_else)


async def test_reopening_a_closed_session_as_paused_respects_the_limit(
    limited_server: Server,
) -> None:
    async with as_user(limited_server) as http:
        sessions = [await create(http) for _ in range(MAX_SESSIONS)]
        await set_status(http, sessions[0]["id"], "closed")
        await create(http)  # at the bound again
        response = await patch(http, sessions[0]["id"], {"status": "paused"})
        assert (
            len(await listing(http, status="active")) + len(await listing(http, status="paused"))
            <= MAX_SESSIONS
        )
        error(response, 409, "limit_exceeded")


async def test_concurrent_creates_respect_the_sessions_limit(limited_server: Server) -> None:
    async with as_user(limited_server, connections=20) as http:
        responses: list[httpx.Response] = []

        async def one() -> None:
            responses.append(await http.post("/v1/sessions", json={}))

        with anyio.fail_after(REQUEST_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(one)
        assert len(await listing(http)) == MAX_SESSIONS
        assert sorted(r.status_code for r in responses) == [201] * MAX_SESSIONS + [409] * (
            20 - MAX_SESSIONS
        )


@pytest.mark.parametrize(
    ("content", "status"),
    [
        ("x" * (MAX_MESSAGE_CHARS - 1), 202),
        ("x" * MAX_MESSAGE_CHARS, 202),
        ("x" * (MAX_MESSAGE_CHARS + 1), 413),
        ("é" * MAX_MESSAGE_CHARS, 202),  # characters, not bytes
        ("🙂" * MAX_MESSAGE_CHARS, 202),
        ("é" * (MAX_MESSAGE_CHARS + 1), 413),
    ],
    ids=["under", "at", "over", "at-2-byte", "at-4-byte", "over-2-byte"],
)
async def test_message_size_limit(limited_server: Server, content: str, status: int) -> None:
    async with as_user(limited_server) as http:
        session = await create(http)
        await set_status(http, session["id"], "paused")  # store only: no answers needed
        url = f"/v1/sessions/{session['id']}/messages"
        response = await call(http, "POST", url, json={"content": content})
        if status == 202:
            assert response.status_code == 202, response.text
            assert contents(await get_session(http, session["id"])) == [("user", content)]
        else:
            message = error(response, 413, "limit_exceeded")
            assert "max_message_chars" in message and str(MAX_MESSAGE_CHARS) in message
            assert (await get_session(http, session["id"]))["messages"] == []


def context_of_size(size: int, char: str = "x") -> dict[str, str]:
    """A context whose JSON is exactly ``size`` bytes as the limit counts them (UTF-8,
    ``json.dumps`` separators): as many ``char`` as fit, topped up with ASCII."""
    room = size - len(json.dumps({"k": ""}).encode())
    count = room // len(char.encode())
    context = {"k": char * count + "x" * (room - count * len(char.encode()))}
    assert len(json.dumps(context, ensure_ascii=False).encode()) == size
    return context


@pytest.mark.parametrize(
    ("size", "char", "status"),
    [
        (MAX_CONTEXT_BYTES - 1, "x", 200),
        (MAX_CONTEXT_BYTES, "x", 200),
        (MAX_CONTEXT_BYTES + 1, "x", 413),
        (MAX_CONTEXT_BYTES, "é", 200),  # bytes, not characters
        (MAX_CONTEXT_BYTES + 1, "é", 413),
    ],
    ids=["under", "at", "over", "at-2-byte", "over-2-byte"],
)
async def test_context_size_limit(
    limited_server: Server, size: int, char: str, status: int
) -> None:
    context = context_of_size(size, char)
    async with as_user(limited_server) as http:
        # On create.
        response = await call(http, "POST", "/v1/sessions", json={"context": context})
        if status == 200:
            assert response.status_code == 201, response.text
            assert body(response)["context"] == context
        else:
            message = error(response, 413, "limit_exceeded")
            assert "max_context_bytes" in message and str(MAX_CONTEXT_BYTES) in message
            assert await listing(http) == []
        # By replacement, and by a merge patch that grows a small context to the same size.
        session = await create(http, context={"k": ""})
        for merge in (False, True):
            response = await patch(http, session["id"], {"context": context}, merge=merge)
            if status == 200:
                assert response.status_code == 200, response.text
                assert body(response)["context"] == context
                await patch(http, session["id"], {"context": {"k": ""}})
            else:
                error(response, 413, "limit_exceeded")
            assert (await get_session(http, session["id"]))["context"] == {"k": ""}


async def test_stored_messages_limit_trims_the_oldest(limited_server: Server) -> None:
    async with as_user(limited_server) as http:
        session = await create(http)
        sid = session["id"]
        await set_status(http, sid, "paused")
        for i in range(1, MAX_SESSION_MESSAGES):  # just under
            await post(http, sid, f"m{i}")
        stored = await get_session(http, sid)
        assert (stored["message_count"], stored["trimmed_messages"]) == (3, 0)
        await post(http, sid, "m4")  # at the bound
        stored = await get_session(http, sid)
        assert (stored["message_count"], stored["trimmed_messages"]) == (4, 0)
        assert [c for _, c in contents(stored)] == ["m1", "m2", "m3", "m4"]
        posted = await post(http, sid, "m5")  # one over: the oldest goes
        assert (posted["session"]["message_count"], posted["session"]["trimmed_messages"]) == (
            4,
            1,
        )
        stored = await get_session(http, sid)
        assert (stored["message_count"], stored["trimmed_messages"]) == (4, 1)
        assert [c for _, c in contents(stored)] == ["m2", "m3", "m4", "m5"]

        # An answered message adds two: both oldest go.
        await set_status(http, sid, "active")
        snapshot = await answered(http, sid, "m6")
        stored = await get_session(http, sid)
        assert (stored["message_count"], stored["trimmed_messages"]) == (4, 3)
        assert contents(stored) == [
            ("user", "m4"),
            ("user", "m5"),
            ("user", "m6"),
            ("assistant", snapshot["text"]),
        ]
        [summary] = await listing(http)
        assert summary["trimmed_messages"] == 3


# -- 6. context -------------------------------------------------------------------------------


async def test_context_merge_patch_and_replacement(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        original = {"user": {"name": "Ada", "lang": "en"}, "step": 1, "tags": ["a", "b"]}
        session = await create(http, context=original)
        sid = session["id"]
        assert (await get_session(http, sid))["context"] == original

        # RFC 7396: objects merge recursively, null removes, anything else replaces.
        merge = {"user": {"lang": None, "tz": "UTC"}, "step": None, "tags": ["c"], "new": {"x": 1}}
        merged = {"user": {"name": "Ada", "tz": "UTC"}, "tags": ["c"], "new": {"x": 1}}
        response = await patch(http, sid, {"context": merge}, merge=True)
        assert response.status_code == 200, response.text
        assert body(response)["context"] == merged
        assert (await get_session(http, sid))["context"] == merged

        # A patch without a context leaves it alone, whatever the content type.
        for as_merge in (True, False):
            response = await patch(http, sid, {"title": "t"}, merge=as_merge)
            assert body(response)["context"] == merged

        # Plain JSON replaces the whole context.
        response = await patch(http, sid, {"context": {"only": True}})
        assert body(response)["context"] == {"only": True}
        assert (await get_session(http, sid))["context"] == {"only": True}

        # A merge patch of nested nulls into a non-object member.
        response = await patch(http, sid, {"context": {"only": {"a": None, "b": 2}}}, merge=True)
        assert body(response)["context"] == {"only": {"b": 2}}


@pytest.mark.parametrize(
    "context", [[1, 2], "text", 3, True, None], ids=["array", "string", "number", "bool", "null"]
)
async def test_a_context_that_is_not_an_object_is_422(fast_server: Server, context: Any) -> None:
    async with as_user(fast_server) as http:
        response = await call(http, "POST", "/v1/sessions", json={"context": context})
        assert "context" in error(response, 422, "invalid_request")
        session = await create(http, context={"keep": 1})
        for merge in (False, True):
            response = await patch(http, session["id"], {"context": context}, merge=merge)
            assert "context" in error(response, 422, "invalid_request")
        assert (await get_session(http, session["id"]))["context"] == {"keep": 1}


# -- 7. two users -----------------------------------------------------------------------------


async def test_users_cannot_reach_each_others_sessions(fast_server: Server) -> None:
    async with as_user(fast_server) as alice, as_user(fast_server) as bob:
        mine = await create(alice, title="alice's", context={"secret": 1})
        first = await answered(alice, mine["id"], "private")
        bobs = await create(bob, title="bob's")
        before = await get_session(alice, mine["id"])

        assert [s["id"] for s in await listing(bob)] == [bobs["id"]]
        assert [s["id"] for s in await listing(alice)] == [mine["id"]]
        for target in (mine["id"], MISSING_SESSION):  # a foreign id looks like a missing one
            for method, url, kwargs in (
                ("GET", f"/v1/sessions/{target}", {}),
                ("GET", f"/v1/sessions/{target}/events", {}),
                ("POST", f"/v1/sessions/{target}/messages", {"json": {"content": "hi"}}),
                ("PATCH", f"/v1/sessions/{target}", {"json": {"title": "mine now"}}),
                (
                    "PATCH",
                    f"/v1/sessions/{target}",
                    {
                        "content": json.dumps({"context": {"secret": None}}),
                        "headers": {"Content-Type": MERGE_PATCH},
                    },
                ),
                ("PATCH", f"/v1/sessions/{target}", {"json": {"status": "closed"}}),
                ("DELETE", f"/v1/sessions/{target}", {}),
            ):
                response = await call(bob, method, url, **kwargs)
                assert response.status_code == 404, (target, method, url, response.text)
                assert response.json()["error"]["type"] == "not_found"
        for method, url in (
            ("GET", f"/v1/generations/{first['id']}"),
            ("GET", f"/v1/generations/{first['id']}/events"),
            ("POST", f"/v1/generations/{first['id']}/cancel"),
        ):
            error(await call(bob, method, url), 404, "not_found")
        # Nothing of Alice's changed; and Alice cannot reach Bob's either.
        assert await get_session(alice, mine["id"]) == before
        error(await call(alice, "GET", f"/v1/sessions/{bobs['id']}"), 404, "not_found")
        error(await call(alice, "DELETE", f"/v1/sessions/{bobs['id']}"), 404, "not_found")
        assert (await get_session(bob, bobs["id"]))["title"] == "bob's"


# -- 8. the prompt ----------------------------------------------------------------------------

FIRST_ANSWER = "first answer " + "." * 87  # 100 characters
SECOND_ANSWER = "second answer " + "." * 86


def upstream_request(upstream: FakeUpstream, prompt: str) -> Received:
    """The one request the upstream received whose last user message is ``prompt``."""
    received = upstream.requests_for(prompt)
    assert len(received) == 1, received
    return received[0]


def sent_messages(upstream: FakeUpstream, prompt: str) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in upstream_request(upstream, prompt).body["messages"]]


async def test_the_second_message_carries_the_history(
    chat_server: Server, upstream: FakeUpstream
) -> None:
    first = upstream.expect(Reply(answer([FIRST_ANSWER[:50], FIRST_ANSWER[50:]])), label="one")
    second = upstream.expect(Reply(answer([SECOND_ANSWER])), label="two")
    async with as_user(chat_server) as http:
        session = await create(http)
        assert (await answered(http, session["id"], first))["text"] == FIRST_ANSWER
        assert sent_messages(upstream, first) == [("user", first)]
        assert (await answered(http, session["id"], second))["text"] == SECOND_ANSWER
        assert sent_messages(upstream, second) == [
            ("user", first),
            ("assistant", FIRST_ANSWER),
            ("user", second),
        ]


# Which history a third message of the given length carries (after two exchanges: u1, a1,
# u2, a2), with the budget landing exactly on, or one past, an older message.
WINDOW_CASES = (
    "all-fit-exactly",
    "first-message-one-over",
    "first-answer-fits-exactly",
    "first-answer-one-over",
)


@pytest.mark.parametrize("case", WINDOW_CASES)
async def test_the_history_window_cuts_the_oldest_first(
    chat_server: Server, upstream: FakeUpstream, case: str
) -> None:
    first = upstream.expect(Reply(answer([FIRST_ANSWER])), label="window")
    second = upstream.expect(Reply(answer([SECOND_ANSWER])), label="window")
    async with as_user(chat_server) as http:
        session = await create(http)
        await answered(http, session["id"], first)
        await answered(http, session["id"], second)
        history = [
            ("user", first),
            ("assistant", FIRST_ANSWER),
            ("user", second),
            ("assistant", SECOND_ANSWER),
        ]
        newer = len(SECOND_ANSWER) + len(second) + len(FIRST_ANSWER)
        length, kept = {
            "all-fit-exactly": (HISTORY_CHARS - newer - len(first), history),
            "first-message-one-over": (HISTORY_CHARS - newer - len(first) + 1, history[1:]),
            "first-answer-fits-exactly": (HISTORY_CHARS - newer, history[1:]),
            # The first message would fit in what is left, but never without its answer.
            "first-answer-one-over": (HISTORY_CHARS - newer + 1, history[2:]),
        }[case]
        # No reply is registered for this one: the upstream answers 404 and the generation
        # fails, but the request it received is what this test is about.
        prompt = f"third-{case}-"
        prompt += "q" * (length - len(prompt))
        posted = await post(http, session["id"], prompt)
        await wait_for_status(http, posted["generation_id"], TERMINAL, REQUEST_TIMEOUT)
        assert sent_messages(upstream, prompt) == [*kept, ("user", prompt)]


# -- across processes -------------------------------------------------------------------------


# The race is lost about half the time per round: rounds until it shows (the first failing
# round ends the test), or until twenty have passed.
ROUNDS = 20
POSTS_PER_PROCESS = 10


async def warm_up(clients: Sequence[httpx.AsyncClient], connections: int) -> None:
    """Open ``connections`` connections in each client, so a burst starts on all at once."""
    with anyio.fail_after(REQUEST_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for http in clients:
                for _ in range(connections):
                    tg.start_soon(http.get, "/healthz")


@pytest.mark.parametrize("kind", BACKENDS)
async def test_on_busy_reject_holds_across_two_processes(
    server_factory: ServerFactory, keys_file: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """Several processes on one database (see ``test_multiprocess``), or nodes on one Redis:
    concurrent posts to one session through two of them must still start one generation."""
    args: tuple[str, ...] = (
        *("--sim-tokens-per-second", "20", "--sim-max-tokens", "400"),
        *("--api-keys-file", str(keys_file), "--shutdown-grace", "1"),
    )
    if kind == "redis":
        url = request.getfixturevalue("redis_server").url
        args += ("--store", url, "--redis-prefix", request.getfixturevalue("redis_prefix"))
    first = server_factory(*args)
    second = server_factory(*args, db=first.db)
    user = new_user()
    async with (
        as_user(first, user, connections=POSTS_PER_PROCESS) as one,
        as_user(second, user, connections=POSTS_PER_PROCESS) as two,
    ):
        for _ in range(ROUNDS):
            session = await create(one)
            await warm_up([one, two], POSTS_PER_PROCESS)
            results = await post_concurrently([one, two], session["id"], 2 * POSTS_PER_PROCESS)
            codes = [response.status_code for _, response in results]
            stored = await get_session(one, session["id"])
            assert len(stored["messages"]) == 2, [m["role"] for m in stored["messages"]]
            assert sorted(codes) == [202] + [409] * (2 * POSTS_PER_PROCESS - 1)
            await call(one, "DELETE", f"/v1/sessions/{session['id']}", expect=204)


async def test_regenerate_replaces_the_last_answer(fast_server: Server) -> None:
    async with as_user(fast_server) as http:
        session = await create(http)
        posted = await post(http, session["id"], "tell me again")
        first = posted["generation_id"]
        await wait_for_status(http, first, TERMINAL)
        url = f"/v1/sessions/{session['id']}/regenerate"
        again = body(await call(http, "POST", url, expect=202, headers={"Idempotency-Key": "r1"}))
        second = again["generation_id"]
        assert second != first and again["message_id"] == posted["message_id"]
        replayed = body(
            await call(http, "POST", url, expect=202, headers={"Idempotency-Key": "r1"})
        )
        assert replayed["generation_id"] == second and replayed["replayed"]
        await wait_for_status(http, second, TERMINAL)
        messages = (await get_session(http, session["id"]))["messages"]
        assert [(m["role"], m["generation_id"]) for m in messages] == [
            ("user", None),
            ("assistant", second),
        ]
        # The replaced answer stays readable.
        assert (await call(http, "GET", f"/v1/generations/{first}", expect=200)).json()["text"]
        empty = await create(http)
        refused = await call(http, "POST", f"/v1/sessions/{empty['id']}/regenerate", expect=422)
        assert "no user message" in refused.json()["error"]["message"]
