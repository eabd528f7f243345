"""The Python client (``client``) against real keepstream servers: start, follow, resume
across a SIGKILL and restart, sessions, cancel, typed errors, the retry budget, and the
README's examples as written."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import pytest

from client import (
    AsyncKeepstreamClient,
    Delta,
    Event,
    InvalidRequest,
    KeepstreamClient,
    NotFound,
    RetriesExhausted,
    RetryPolicy,
    ServerError,
    Status,
    TransportError,
    Unauthorized,
)

from .conftest import DEFAULT_ARGS, ServerFactory
from .scripted_http import cut_stream, http_response, scripted_server
from .support import ROOT, Server, free_port, simulated_answer

ALICE = "sk-alice-0123456789abcdef"
# Slow enough to be mid-answer when the server is killed: about 6 s of tokens.
SLOW = {"tokens_per_second": 50, "max_tokens": 300}
# Quick reconnects while a test's server restarts (the default backs off up to 5 s).
FAST_RETRY = RetryPolicy(wait_max=0.3)
# A short budget, so giving up is quick.
SHORT_RETRY = RetryPolicy(attempts=3, timeout=3.0, wait_initial=0.05, wait_max=0.2, wait_jitter=0)


def text_of(events: Sequence[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def assert_exactly_once(events: Sequence[Event], next_offset: int) -> None:
    """Every event of the stream, in order, none twice, none missing."""
    assert [e.offset for e in events] == list(range(1, next_offset + 1))


def assert_exactly_once_across_a_seam(events: Sequence[Event], next_offset: int) -> None:
    """As ``assert_exactly_once``, for an answer continued after a crash: the one event
    the client does not yield is the ``resumed`` event at the seam."""
    offsets = [e.offset for e in events]
    assert offsets == sorted(set(offsets))
    assert len(set(range(1, next_offset + 1)) - set(offsets)) == 1


class CountingTransport(httpx.HTTPTransport):
    """Counts the requests it sends and the connections that were refused."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.refused = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        try:
            return super().handle_request(request)
        except httpx.ConnectError:
            self.refused += 1
            raise


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that leave it running (each server costs seconds to start)."""
    server = Server(db=tmp_path_factory.mktemp("client") / "keepstream.db", args=DEFAULT_ARGS)
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


# -- start and follow --------------------------------------------------------------------------


def test_sync_start_and_follow_to_completion(shared: Server) -> None:
    with KeepstreamClient(shared.url) as ks:
        generation = ks.start_generation("hello", params={"max_tokens": 30})
        assert generation.status in ("queued", "running")
        with ks.follow_generation(generation.id) as events:
            received = list(events)
            assert events.last_event_id == str(received[-1].offset)
        snapshot = ks.get_generation(generation.id)
    assert snapshot.status == "completed"
    assert text_of(received) == snapshot.text
    assert_exactly_once(received, snapshot.next_offset)
    first, last = received[0], received[-1]
    assert isinstance(first, Status) and first.status == "running"
    assert isinstance(last, Status) and last.terminal and last.status == "completed"
    assert last.usage is not None and last.error is None
    assert {e.generation_id for e in received} == {generation.id}


async def test_async_start_and_follow_to_completion(shared: Server) -> None:
    async with AsyncKeepstreamClient(shared.url) as ks:
        generation = await ks.start_generation(
            messages=[{"role": "user", "content": "hello"}], params={"max_tokens": 30}
        )
        with anyio.fail_after(20):
            received = [event async for event in ks.follow_generation(generation.id)]
        snapshot = await ks.get_generation(generation.id)
    assert snapshot.status == "completed"
    assert text_of(received) == snapshot.text
    assert_exactly_once(received, snapshot.next_offset)


def test_follow_from_an_offset_gets_the_rest_and_a_finished_end_gets_nothing(
    shared: Server,
) -> None:
    with KeepstreamClient(shared.url) as ks:
        generation = ks.start_generation("hello", params={"max_tokens": 30})
        everything = list(ks.follow_generation(generation.id))
        rest = list(ks.follow_generation(generation.id, offset=3))
        end = ks.get_generation(generation.id).next_offset
        assert list(ks.follow_generation(generation.id, offset=end)) == []  # the 204
    assert rest == everything[3:]


def test_breaking_out_of_a_follow_closes_it(shared: Server) -> None:
    with KeepstreamClient(shared.url) as ks:
        generation = ks.start_generation("hello", params=SLOW)
        with ks.follow_generation(generation.id) as events:
            for event in events:
                if isinstance(event, Delta):
                    break
        assert events.last_event_id is not None
        ks.cancel_generation(generation.id)


async def test_async_breaking_out_of_a_follow_closes_it(shared: Server) -> None:
    async with AsyncKeepstreamClient(shared.url) as ks:
        generation = await ks.start_generation("hello", params=SLOW)
        with anyio.fail_after(10):
            async with ks.follow_generation(generation.id) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        break
        await ks.cancel_generation(generation.id)


# -- surviving a crash -------------------------------------------------------------------------


def test_sync_follow_survives_sigkill_and_restart(
    server_factory: ServerFactory, executor: ThreadPoolExecutor
) -> None:
    server = server_factory(*DEFAULT_ARGS)
    restarted: Future[Server] | None = None
    received: list[Event] = []
    transport = CountingTransport()
    with (
        httpx.Client(transport=transport, timeout=30) as http,
        KeepstreamClient(server.url, http_client=http, retry=FAST_RETRY) as ks,
    ):
        generation = ks.start_generation("crash", params=SLOW)
        for event in ks.follow_generation(generation.id):
            received.append(event)
            if restarted is None and sum(isinstance(e, Delta) for e in received) == 5:
                server.kill()  # mid-answer, while the follow is connected
                # Restart in the background: meanwhile the follow's reconnects are refused.
                restarted = executor.submit(
                    server_factory, *DEFAULT_ARGS, db=server.db, port=server.port
                )
        assert restarted is not None
        restarted.result()
        snapshot = ks.get_generation(generation.id)
    # The restarted server continued the answer: it ends as if nothing had happened.
    assert snapshot.status == "completed"
    last = received[-1]
    assert isinstance(last, Status) and last.status == "completed"
    assert text_of(received) == snapshot.text == simulated_answer("crash", **SLOW)
    assert_exactly_once_across_a_seam(received, snapshot.next_offset)
    assert transport.refused >= 1  # it backed off while the server was down


async def test_async_follow_survives_sigkill_and_restart(server_factory: ServerFactory) -> None:
    server = server_factory(*DEFAULT_ARGS)
    received: list[Event] = []
    killed = False

    def restart() -> None:
        server_factory(*DEFAULT_ARGS, db=server.db, port=server.port)

    async with AsyncKeepstreamClient(server.url, retry=FAST_RETRY) as ks:
        generation = await ks.start_generation("crash", params=SLOW)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                async for event in ks.follow_generation(generation.id):
                    received.append(event)
                    if not killed and sum(isinstance(e, Delta) for e in received) == 5:
                        killed = True
                        server.kill()
                        tg.start_soon(anyio.to_thread.run_sync, restart)
        snapshot = await ks.get_generation(generation.id)
    assert snapshot.status == "completed"
    assert received[-1] == Status(
        "completed", snapshot.usage, None, snapshot.next_offset, generation.id
    )
    assert text_of(received) == snapshot.text == simulated_answer("crash", **SLOW)
    assert_exactly_once_across_a_seam(received, snapshot.next_offset)


async def test_follow_goes_on_when_the_server_ends_streams_early(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(*DEFAULT_ARGS, "--sse-lifetime", "0.3")
    async with AsyncKeepstreamClient(server.url) as ks:
        generation = await ks.start_generation(
            "long", params={"tokens_per_second": 40, "max_tokens": 60}
        )
        with anyio.fail_after(20):
            received = [event async for event in ks.follow_generation(generation.id)]
        snapshot = await ks.get_generation(generation.id)
    assert snapshot.status == "completed"
    assert text_of(received) == snapshot.text
    assert_exactly_once(received, snapshot.next_offset)


def test_retry_budget_ends_in_a_clear_error_when_the_server_stays_down(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(*DEFAULT_ARGS)
    received: list[Event] = []
    with KeepstreamClient(server.url, retry=SHORT_RETRY) as ks:
        generation = ks.start_generation("gone", params=SLOW)
        started = time.monotonic()
        with pytest.raises(RetriesExhausted) as caught:
            for event in ks.follow_generation(generation.id):
                received.append(event)
                if len(received) == 3:
                    server.kill()
                    started = time.monotonic()
    assert time.monotonic() - started < 5
    error = caught.value
    assert error.attempts == SHORT_RETRY.attempts
    assert isinstance(error.last_error, httpx.ConnectError)
    assert error.last_event_id == str(received[-1].offset)  # where a new follow resumes
    assert generation.id in str(error)


async def test_async_retry_budget_and_transport_errors_when_nothing_listens() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncKeepstreamClient(url, retry=SHORT_RETRY) as ks:
        with anyio.fail_after(10), pytest.raises(RetriesExhausted) as caught:
            async for _ in ks.follow_session("ses_x"):
                pass
        assert caught.value.attempts == 3 and caught.value.last_event_id is None
        with pytest.raises(TransportError) as unreachable:
            await ks.get_generation("gen_x")  # one-shot calls are not retried
        assert isinstance(unreachable.value.__cause__, httpx.ConnectError)


def test_a_503_with_retry_after_is_retried_and_resume_sends_the_last_delivered_id() -> None:
    """The resume bookkeeping against a real peer: a 503, a stream cut mid-event, the rest."""
    sse = {"Content-Type": "text/event-stream"}
    answers = [
        http_response(
            "503 Service Unavailable",
            {"Content-Type": "application/json", "Retry-After": "0"},
            b'{"error": {"type": "shutting_down", "message": "bye"}}',
        ),
        cut_stream(
            b"retry: 1000\n\n"
            b'id: 1\nevent: status\ndata: {"type":"status","status":"running"}\n\n'
            b'id: 2\nevent: delta\ndata: {"type":"delta","text":"a "}\n\nid: 3\nevent: de'
        ),
        http_response(
            "200 OK",
            sse,
            b'id: 3\nevent: delta\ndata: {"type":"delta","text":"b"}\n\n'
            b'id: 4\nevent: status\ndata: {"type":"status","status":"completed","usage":{}}\n\n',
        ),
    ]
    with scripted_server(answers) as (url, requests):
        with KeepstreamClient(url + "/base", retry=SHORT_RETRY) as ks:
            events = list(ks.follow_generation("gen_1"))
    assert [r.get("last-event-id") for r in requests] == [None, None, "2"]
    assert events == [
        Status("running", None, None, 1, "gen_1"),
        Delta("a ", 2, "gen_1"),
        Delta("b", 3, "gen_1"),
        Status("completed", {}, None, 4, "gen_1"),
    ]


# -- sessions and cancel -----------------------------------------------------------------------


async def test_session_send_and_follow(shared: Server) -> None:
    async with AsyncKeepstreamClient(shared.url) as ks:
        session = await ks.create_session(title="trip", on_busy="queue")
        posted = await ks.send_message(session.id, "plan a trip", idempotency_key="k-1")
        again = await ks.send_message(session.id, "plan a trip", idempotency_key="k-1")
        assert again.replayed and again.generation_id == posted.generation_id
        first: list[Event] = []
        with anyio.fail_after(20):
            async with ks.follow_session(session.id) as events:
                async for event in events:
                    first.append(event)
                    if isinstance(event, Status) and event.terminal:
                        break
            resume_from = events.last_event_id
            second_post = await ks.send_message(session.id, "and back")
            second: list[Event] = []
            async with ks.follow_session(session.id, last_event_id=resume_from) as events:
                async for event in events:
                    second.append(event)
                    if isinstance(event, Status) and event.terminal:
                        break
        detail = await ks.get_session(session.id)
    assert {e.generation_id for e in first} == {posted.generation_id}
    assert {e.generation_id for e in second} == {second_post.generation_id}
    answers = [m.content for m in detail.messages if m.role == "assistant"]
    assert answers == [text_of(first), text_of(second)]
    assert resume_from == f"{posted.generation_id}:{first[-1].offset}"


def test_a_session_follow_ends_once_the_session_is_closed_and_read(shared: Server) -> None:
    with KeepstreamClient(shared.url) as ks:
        session = ks.create_session(close_on_complete=True)
        posted = ks.send_message(session.id, "one answer, then close")
        received = list(ks.follow_session(session.id))  # ends by itself
        assert ks.get_session(session.id).status == "closed"
        assert (
            list(
                ks.follow_session(
                    session.id, last_event_id=f"{posted.generation_id}:{received[-1].offset}"
                )
            )
            == []
        )
    last = received[-1]
    assert isinstance(last, Status) and last.status == "completed"
    assert {e.generation_id for e in received} == {posted.generation_id}


def test_cancel_ends_the_follow_with_the_partial_text(shared: Server) -> None:
    with KeepstreamClient(shared.url) as ks:
        generation = ks.start_generation("stop me", params=SLOW)
        received: list[Event] = []
        for event in ks.follow_generation(generation.id):
            received.append(event)
            if isinstance(event, Delta) and len(received) == 3:
                ks.cancel_generation(generation.id)
        again = ks.cancel_generation(generation.id)  # idempotent
    assert again.status == "cancelled"
    assert received[-1] == Status("cancelled", None, again.error, again.next_offset, generation.id)
    assert text_of(received) == again.text


# -- errors ------------------------------------------------------------------------------------


def test_error_answers_are_typed(server_factory: ServerFactory) -> None:
    server = server_factory(*DEFAULT_ARGS, env={"KEEPSTREAM_API_KEYS": f"alice={ALICE}"})
    with KeepstreamClient(server.url, api_key=ALICE) as ks:
        with pytest.raises(NotFound) as missing:
            ks.get_generation("gen_missing")
        assert (missing.value.status_code, missing.value.code) == (404, "not_found")
        with pytest.raises(NotFound):
            list(ks.follow_generation("gen_missing"))  # not retried
        with pytest.raises(InvalidRequest) as invalid:
            ks.start_generation("hi", provider="no-such-provider")
        assert (invalid.value.status_code, invalid.value.code) == (422, "invalid_request")
        assert "no-such-provider" in invalid.value.message
        assert ks.start_generation("hi").status in ("queued", "running")
    for key in (None, "sk-wrong-0123456789abcdef"):
        with KeepstreamClient(server.url, api_key=key) as anonymous:
            with pytest.raises(Unauthorized) as refused:
                anonymous.create_session()
            assert (refused.value.status_code, refused.value.code) == (401, "unauthorized")
    with pytest.raises(ValueError, match="exactly one"):
        KeepstreamClient(server.url).start_generation()


def test_server_errors_are_server_errors() -> None:
    """A proxy's HTML error page is a ``ServerError`` with the page as its message."""
    page = http_response(
        "502 Bad Gateway", {"Content-Type": "text/html"}, b"<html>bad gateway</html>"
    )
    with scripted_server([page]) as (url, _):
        with KeepstreamClient(url) as ks, pytest.raises(ServerError) as caught:
            ks.get_generation("gen_1")
    assert caught.value.status_code == 502 and caught.value.code == "http_error"
    assert "bad gateway" in caught.value.message


# -- the README --------------------------------------------------------------------------------


def readme_examples() -> list[str]:
    """The Python blocks of the README's "Python client" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Python client\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_readme_examples_run_as_written(
    shared: Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = readme_examples()
    assert len(examples) == 2
    monkeypatch.setenv("KEEPSTREAM_URL", shared.url)
    monkeypatch.delenv("KEEPSTREAM_API_KEY", raising=False)
    for example in examples:
        exec(compile(example, str(Path(ROOT, "README.md")), "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert out.count("[completed]") == 2
