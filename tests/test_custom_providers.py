"""Your own generation code as a provider, in-process through the public ``Keepstream`` API:
every way a generator can end leaves a defined final state, nothing lost, and the pool ready
for the next one. Embedding changes nothing process-wide."""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from keepstream import Delta, GeneratorInput, Keepstream, ProviderChunk, Settings, Status
from store import GenerationNotFound, GenerationRecord, StreamStore, WorkerRecord
from streaming import GenerationRequest, UnknownProvider, encode_event, status_event

TIMEOUT = 20.0


def settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(db=str(tmp_path / "embedded.db"), shutdown_grace=1.0, **overrides)  # type: ignore[arg-type]


async def follow_all(ks: Keepstream, generation_id: str, offset: int = 0) -> tuple[str, Status]:
    """The text of the events from ``offset``, and the final status event."""
    text = ""
    with anyio.fail_after(TIMEOUT):
        async for event in ks.follow(generation_id, offset=offset):
            if isinstance(event, Delta):
                text += event.text
            elif event.terminal:
                return text, event
    raise AssertionError("the follow ended without a final status")


async def check_pool_still_works(ks: Keepstream) -> None:
    """A plain generation after the odd one completes normally."""
    generation = await ks.start("still alive", params={"tokens_per_second": 0, "max_tokens": 5})
    text, final = await follow_all(ks, generation.id)
    assert final.status == "completed" and len(text.split()) == 5


async def test_a_generator_streams_what_it_yields_with_its_request_and_usage(
    tmp_path: Path,
) -> None:
    ks = Keepstream(settings(tmp_path))
    seen: list[GeneratorInput] = []

    @ks.provider("echo")
    async def echo(request: GeneratorInput) -> AsyncIterator[str | ProviderChunk]:
        seen.append(request)
        for word in request.prompt.split():
            yield word + " "
        yield ProviderChunk(usage={"output_tokens": len(request.prompt.split())})

    async with ks:
        generation = await ks.start(
            "one two three", provider="echo", model="m1", params={"k": 1}, owner="ann"
        )
        text, final = await follow_all(ks, generation.id)
        snapshot = await ks.get(generation.id, owner="ann")
        with pytest.raises(GenerationNotFound):
            await ks.get(generation.id, owner="bob")
    assert text == snapshot.text == "one two three "
    assert final.status == "completed" and final.usage == {"output_tokens": 3}
    (request,) = seen
    assert (request.generation_id, request.owner, request.session_id) == (
        generation.id,
        "ann",
        None,
    )
    assert (request.model, request.params) == ("m1", {"k": 1})


async def test_a_generator_that_raises_mid_answer_fails_with_its_message(tmp_path: Path) -> None:
    ks = Keepstream(settings(tmp_path))

    @ks.provider("flaky")
    async def flaky(request: GeneratorInput) -> AsyncIterator[str]:
        yield "half an "
        yield "answer"
        raise RuntimeError("the vector store is down")

    async with ks:
        generation = await ks.start("q", provider="flaky")
        text, final = await follow_all(ks, generation.id)
        snapshot = await ks.get(generation.id)
        await check_pool_still_works(ks)
    assert text == snapshot.text == "half an answer"  # kept, not lost
    assert final.status == snapshot.status == "failed"
    assert final.error == {
        "type": "provider_error",
        "message": "RuntimeError: the vector store is down",
    }


async def test_cancelling_reaches_the_generator_as_cancellation(tmp_path: Path) -> None:
    ks = Keepstream(settings(tmp_path))
    started = anyio.Event()
    outcome: list[str] = []

    @ks.provider("endless")
    async def endless(request: GeneratorInput) -> AsyncIterator[str]:
        try:
            while True:
                yield "more "
                started.set()
                await anyio.sleep(0.01)
        except anyio.get_cancelled_exc_class():
            outcome.append("cancelled")
            raise
        finally:
            outcome.append("closed")

    async with ks:
        generation = await ks.start("q", provider="endless")
        with anyio.fail_after(TIMEOUT):
            await started.wait()
        await ks.cancel(generation.id)
        again = await ks.cancel(generation.id)  # idempotent
        text, final = await follow_all(ks, generation.id)
        await check_pool_still_works(ks)
    assert final.status == again.status == "cancelled"
    assert text == again.text and text.startswith("more ")
    assert outcome == ["cancelled", "closed"]


async def test_a_generator_that_yields_nothing_completes_empty(tmp_path: Path) -> None:
    ks = Keepstream(settings(tmp_path))

    @ks.provider("silent")
    async def silent(request: GeneratorInput) -> AsyncIterator[str]:
        return
        yield  # an async generator all the same

    async with ks:
        generation = await ks.start("q", provider="silent")
        text, final = await follow_all(ks, generation.id)
        await check_pool_still_works(ks)
    assert (text, final.status) == ("", "completed")


async def test_a_hundred_thousand_tiny_chunks_arrive_whole(tmp_path: Path) -> None:
    ks = Keepstream(settings(tmp_path))
    chunks = [chr(ord("a") + i % 26) for i in range(100_000)]

    @ks.provider("tiny")
    async def tiny(request: GeneratorInput) -> AsyncIterator[str]:
        for i, chunk in enumerate(chunks):
            if i % 1000 == 0:
                await anyio.lowlevel.checkpoint()
            yield chunk

    async with ks:
        generation = await ks.start("q", provider="tiny")
        text, final = await follow_all(ks, generation.id)
        # Resuming from the middle gets exactly the rest.
        middle = None
        async for event in ks.follow(generation.id):
            if isinstance(event, Delta) and len(event.text) < len(text):
                middle = event
                break
        assert middle is not None
        rest, _ = await follow_all(ks, generation.id, offset=middle.offset)
        snapshot = await ks.get(generation.id)
    assert final.status == "completed"
    assert text == snapshot.text == "".join(chunks)
    assert text.endswith(rest) and len(rest) < len(text)


async def test_a_generator_that_blocks_past_the_time_limit_fails(tmp_path: Path) -> None:
    ks = Keepstream(settings(tmp_path, generation_time_limit=0.5))

    @ks.provider("stuck")
    async def stuck(request: GeneratorInput) -> AsyncIterator[str]:
        yield "before the wait "
        await anyio.sleep_forever()
        yield "never"

    async with ks:
        generation = await ks.start("q", provider="stuck")
        text, final = await follow_all(ks, generation.id)
        await check_pool_still_works(ks)
    assert text == "before the wait "
    assert final.status == "failed" and final.error is not None
    assert final.error["type"] == "deadline_exceeded"


async def test_bad_yields_and_bad_params_are_refused_clearly(tmp_path: Path) -> None:
    ks = Keepstream(settings(tmp_path))

    @ks.provider("numbers")
    async def numbers(request: GeneratorInput) -> AsyncIterator[str]:
        yield 42  # type: ignore[misc]

    def only_temperature(params: dict[str, object]) -> None:
        if set(params) - {"temperature"}:
            raise ValueError("only temperature is accepted")

    @ks.provider("strict", check_params=only_temperature)
    async def strict(request: GeneratorInput) -> AsyncIterator[str]:
        yield "ok"

    def not_a_generator(request: GeneratorInput) -> str:
        return "plain text"

    ks.add_provider("plain", not_a_generator)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already exists"):
        ks.add_provider("strict", strict)
    async with ks:
        failed = await ks.start("q", provider="numbers")
        _, final = await follow_all(ks, failed.id)
        assert final.status == "failed" and final.error is not None
        assert "yielded a int" in final.error["message"]
        plain = await ks.start("q", provider="plain")
        _, final = await follow_all(ks, plain.id)
        assert final.error is not None and "not an async iterator" in final.error["message"]
        with pytest.raises(ValueError, match="only temperature"):
            await ks.start("q", provider="strict", params={"top_k": 3})
        with pytest.raises(UnknownProvider):
            await ks.start("q", provider="nobody")
        with pytest.raises(RuntimeError, match="before keepstream starts"):
            ks.add_provider("late", strict)
        await check_pool_still_works(ks)


async def test_embedding_changes_nothing_process_wide(tmp_path: Path) -> None:
    root = logging.getLogger()
    before = (
        gc.get_threshold(),
        gc.get_freeze_count(),
        sys.getswitchinterval(),
        list(root.handlers),
        root.level,
    )
    ks = Keepstream(settings(tmp_path))
    async with ks:
        await check_pool_still_works(ks)
        during = (
            gc.get_threshold(),
            gc.get_freeze_count(),
            sys.getswitchinterval(),
            list(root.handlers),
            root.level,
        )
    after = (
        gc.get_threshold(),
        gc.get_freeze_count(),
        sys.getswitchinterval(),
        list(root.handlers),
        root.level,
    )
    assert before == during == after


async def test_the_api_before_start_says_so(tmp_path: Path) -> None:
    ks = Keepstream(settings(tmp_path))
    with pytest.raises(Exception, match="not running"):
        await ks.start("q")


async def test_an_instance_runs_again_after_it_stopped(tmp_path: Path) -> None:
    """Stopped and started again (a host's lifespan in tests, say), it picks up its store."""
    ks = Keepstream(settings(tmp_path))
    async with ks:
        first = await ks.start("one", params={"tokens_per_second": 0, "max_tokens": 3})
        await follow_all(ks, first.id)
    async with ks:
        assert (await ks.get(first.id)).status == "completed"
        await check_pool_still_works(ks)


# -- continuation after a crash ------------------------------------------------------------------


async def orphan(
    db: str,
    gid: str,
    *,
    provider: str,
    continuations: int = 0,
    cancel: bool = False,
    age: float = 0.0,
) -> None:
    """A running generation of a process that died mid-answer, with "half " committed; its
    snapshot row, as a live one may be, is behind its stream (it has "ha" of it)."""
    now = time.time()
    async with StreamStore(db) as store:
        await store.register_worker(WorkerRecord("wrk_dead", "elsewhere", 1, now - 100, now - 100))
        request = GenerationRequest.from_json({"prompt": "one two three", "provider": provider})
        await store.create_generation(
            GenerationRecord(
                gid,
                gid,
                "running",
                provider,
                request=request.to_json(),
                text="ha",
                next_offset=2,
                worker_id="wrk_dead",
                created_at=now - age,
                cancel_requested=cancel,
                continuations=continuations,
            )
        )
        await store.append(gid, [encode_event(status_event("running"))])
        await store.append(gid, [encode_event({"type": "delta", "text": "ha"})])
        await store.append(gid, [encode_event({"type": "delta", "text": "lf "})])


async def test_a_generator_that_can_continue_goes_on_from_the_committed_text(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "embedded.db")
    for gid, provider in (("gen_goes_on", "resumable"), ("gen_cannot", "one_shot")):
        await orphan(path, gid, provider=provider)
    await orphan(path, "gen_cancelled", provider="resumable", cancel=True)
    await orphan(path, "gen_spent", provider="resumable", continuations=3)
    await orphan(path, "gen_late", provider="resumable", age=120)
    partials: list[str] = []
    ks = Keepstream(settings(tmp_path, generation_time_limit=60))

    @ks.provider("resumable", continues=True)
    async def resumable(request: GeneratorInput) -> AsyncIterator[str]:
        partials.append(request.partial)
        answer = "half an answer"
        yield answer[len(request.partial) :]  # only what follows the committed text

    @ks.provider("one_shot")
    async def one_shot(request: GeneratorInput) -> AsyncIterator[str]:
        yield "never asked again"

    async with ks:
        with anyio.fail_after(TIMEOUT):
            await ks.state.pool.recovered.wait()
        text, final = await follow_all(ks, "gen_goes_on")
        kinds = [type(e).__name__ for e in [e async for e in ks.follow("gen_goes_on")]]
        outcomes = {
            gid: await follow_all(ks, gid)
            for gid in ("gen_cannot", "gen_cancelled", "gen_spent", "gen_late")
        }
    assert (text, final.status) == ("half an answer", "completed")
    assert (await ks_snapshot_text(tmp_path, "gen_goes_on")) == "half an answer"
    assert partials == ["half "]
    # Clients see one answer: the seam is an event they may skip (the Python API does).
    assert kinds.count("Delta") == 3
    assert {gid: (t, f.status) for gid, (t, f) in outcomes.items()} == {
        "gen_cannot": ("half ", "interrupted"),  # its provider cannot continue
        "gen_cancelled": ("half ", "cancelled"),  # a persisted cancel wins
        "gen_spent": ("half ", "interrupted"),  # its continuations are used up
        "gen_late": ("half ", "interrupted"),  # past its time limit since it was created
    }
    for gid in outcomes:  # each ends with all its committed text in its snapshot
        assert await ks_snapshot_text(tmp_path, gid) == "half "


async def ks_snapshot_text(tmp_path: Path, gid: str) -> str:
    """A generation's snapshot text, straight from the database file."""
    async with StreamStore(str(tmp_path / "embedded.db")) as store:
        return (await store.get_generation(gid)).text


async def test_a_generator_keeps_state_from_one_answer_of_a_session_to_the_next(
    tmp_path: Path,
) -> None:
    """What a generator yields as ``state`` comes back with the session's next answer (with
    how many messages it has not heard); a regenerated answer starts without it."""
    ks = Keepstream(settings(tmp_path, provider="counter"))
    given: list[dict[str, object]] = []

    @ks.provider("counter")
    async def counter(request: GeneratorInput) -> AsyncIterator[str | ProviderChunk]:
        given.append(dict(request.state))
        turn = int(request.state.get("turn", 0)) + 1
        yield ProviderChunk(f"turn {turn}", state={"turn": turn})

    async with ks:
        transport = httpx.ASGITransport(app=ks.asgi_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://ks") as http:
            session = (await http.post("/v1/sessions", json={})).json()
            url = f"/v1/sessions/{session['id']}"
            for path, body in [
                ("/messages", {"content": "one"}),
                ("/messages", {"content": "two"}),
                ("/messages", {"content": "three"}),
                ("/regenerate", None),
            ]:
                posted = await http.post(url + path, json=body)
                assert posted.status_code == 202, posted.text
                _, final = await follow_all(ks, posted.json()["generation_id"])
                assert final.status == "completed"
    assert given == [{}, {"turn": 1, "unheard": 0}, {"turn": 2, "unheard": 0}, {}]


@pytest.mark.parametrize(
    "chunk",
    [
        ProviderChunk("x", state={"seen": {1, 2}}),
        ProviderChunk("x", state=["not", "an", "object"]),  # type: ignore[arg-type]
        ProviderChunk("x", usage={"tokens": float("nan")}),
    ],
    ids=["state-with-a-set", "state-not-an-object", "usage-with-nan"],
)
async def test_a_state_or_usage_that_cannot_be_stored_fails_the_answer(
    tmp_path: Path, chunk: ProviderChunk
) -> None:
    """Never stored as it is (its commit would fail, and the answer never end): the answer
    fails clearly, with the text before it kept."""
    ks = Keepstream(settings(tmp_path))

    @ks.provider("odd")
    async def odd(request: GeneratorInput) -> AsyncIterator[str | ProviderChunk]:
        yield "before "
        yield chunk

    async with ks:
        generation = await ks.start("q", provider="odd")
        text, final = await follow_all(ks, generation.id)
        assert final.status == "failed" and final.error is not None
        assert final.error["type"] == "provider_error"
        assert "not a JSON object" in final.error["message"]
        assert text == (await ks.get(generation.id)).text
        await check_pool_still_works(ks)
