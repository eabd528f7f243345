"""Session rules in-process, on a real store and pool: queueing, closing, expiry,
retention and idempotency, with a clock the test controls instead of sleeps."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path

import anyio
import pytest

from store import (
    TERMINAL_STATUSES,
    GenerationNotFound,
    SessionNotFound,
    SessionStore,
    StreamStore,
)
from streaming import (
    GenerationPool,
    GenerationRequest,
    GenerationRun,
    ProviderChunk,
    SessionLimits,
    SessionManager,
    SimulatedProvider,
)

TIMEOUT = 30.0


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    store: StreamStore
    pool: GenerationPool
    sessions: SessionManager
    clock: Clock = field(default_factory=Clock)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    clock = Clock()
    limits = SessionLimits(idle_timeout=100.0, retention=1000.0, auto_clean=True)
    async with StreamStore(str(tmp_path / "s.db"), flush_interval=0.002) as store:
        simulated = SimulatedProvider(tokens_per_second=400, max_tokens=8)
        pool = GenerationPool(
            store, {"simulated": simulated}, default_provider="simulated", max_running=64
        )
        sessions = SessionManager(SessionStore(store), pool, limits=limits, clock=clock)
        async with pool:
            yield World(store, pool, sessions, clock)


async def wait_ended(world: World, generation_id: str) -> str:
    with anyio.fail_after(TIMEOUT):
        # Polls the committed row: what a client sees, and there is no event for it.
        while (status := (await world.pool.get(generation_id)).status) not in TERMINAL_STATUSES:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    return status


async def test_queue_answers_a_hundred_concurrent_messages_in_order(world: World) -> None:
    session = await world.sessions.create(None, {"on_busy": "queue"})
    posted: dict[int, str] = {}

    async def post(i: int) -> None:
        result = await world.sessions.post(session.id, f"question {i}", owner=None)
        assert result.generation is not None
        posted[i] = result.generation.id

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(post, i)
    assert len(posted) == 100
    generations = [gid for gid, _ in await world.sessions.store.generations(session.id)]
    for gid in generations:
        assert await wait_ended(world, gid) == "completed"
    records = [await world.pool.get(gid) for gid in generations]
    # One after another: each started only after the one before it had finished.
    for earlier, later in pairwise(records):
        assert earlier.finished_at is not None and later.started_at is not None
        assert later.started_at >= earlier.finished_at
    messages = await world.sessions.messages(session.id, owner=None)
    assert [m.role for m in messages] == ["user", "assistant"] * 100
    # Each answer's prompt held the whole conversation before its question.
    last = records[-1].request["messages"]
    assert len(last) == 200 - 1
    assert last[-1]["content"] == messages[-2].content
    assert all(m.content for m in messages)


async def test_close_on_complete_closes_only_when_asked(world: World) -> None:
    keep = await world.sessions.create(None, {})
    close = await world.sessions.create(None, {"close_on_complete": True})
    for session in (keep, close):
        result = await world.sessions.post(session.id, "hello", owner=None)
        assert result.generation is not None
        assert await wait_ended(world, result.generation.id) == "completed"
    with anyio.fail_after(TIMEOUT):
        while (await world.sessions.get(close.id, owner=None)).status != "closed":  # noqa: ASYNC110
            await anyio.sleep(0.01)
    closed = await world.sessions.get(close.id, owner=None)
    assert closed.closed_reason == "completed"
    assert (await world.sessions.get(keep.id, owner=None)).status == "active"
    # The next message follows on_closed (reopen by default): never dropped.
    again = await world.sessions.post(close.id, "and again", owner=None)
    assert again.reopened and again.generation is not None


async def test_idle_sessions_expire_and_closed_ones_are_cleaned_after_retention(
    world: World,
) -> None:
    idle = await world.sessions.create(None, {})
    kept = await world.sessions.create(None, {"keep_open": True})
    world.clock.now += 50
    busy = await world.sessions.create(None, {})
    world.clock.now += 60  # idle: 110 s; busy: 60 s; timeout 100 s
    assert await world.sessions.sweep() == (1, 0)
    expired = await world.sessions.get(idle.id, owner=None)
    assert (expired.status, expired.closed_reason) == ("closed", "expired")
    assert (await world.sessions.get(kept.id, owner=None)).status == "active"
    assert (await world.sessions.get(busy.id, owner=None)).status == "active"
    world.clock.now += 999  # 999 s after closing: retention is 1000 s, nothing deleted
    assert await world.sessions.sweep() == (1, 0)  # busy has now been idle too long too
    world.clock.now += 2
    assert await world.sessions.sweep() == (0, 1)  # idle, closed 1001 s ago, is deleted
    with pytest.raises(SessionNotFound):
        await world.sessions.get(idle.id, owner=None)
    assert (await world.sessions.get(busy.id, owner=None)).status == "closed"
    assert (await world.sessions.get(kept.id, owner=None)).status == "active"


async def test_a_retried_request_gets_the_same_message_and_generation(world: World) -> None:
    session = await world.sessions.create(None, {"on_busy": "reject"})
    first = await world.sessions.post(session.id, "once", owner=None, idempotency_key="k-1")
    again = await world.sessions.post(session.id, "once", owner=None, idempotency_key="k-1")
    assert again.replayed and not first.replayed
    assert again.message_id == first.message_id
    assert first.generation is not None and again.generation is not None
    assert again.generation.id == first.generation.id
    assert len(await world.sessions.messages(session.id, owner=None)) == 2  # stored once
    other = await world.sessions.create(None, {})
    with pytest.raises(ValueError, match="another session"):
        await world.sessions.post(other.id, "once", owner=None, idempotency_key="k-1")


class StubbornProvider:
    """Streams slowly and, once cancelled, takes ``letting_go`` seconds to let go (an
    upstream whose connection is slow to close)."""

    name = "stubborn"

    def __init__(self, letting_go: float) -> None:
        self.letting_go = letting_go

    def validate(self, request: GenerationRequest) -> None:
        return None

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        try:
            while True:
                yield ProviderChunk("word ")
                await anyio.sleep(0.02)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(self.letting_go)

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("action", ["interrupt", "delete"])
async def test_stopping_an_answer_never_holds_the_session_lock_while_it_lets_go(
    tmp_path: Path, action: str
) -> None:
    """Interrupting or deleting waits for the running answer to stop, but not under the
    session's lock: other requests on the session (and the pool's finish hook, which takes
    the same lock) go on at once instead of waiting out the provider."""
    letting_go = 5.0
    async with StreamStore(str(tmp_path / "s.db"), flush_interval=0.002) as store:
        provider = StubbornProvider(letting_go)
        pool = GenerationPool(store, {"stubborn": provider}, default_provider="stubborn")
        sessions = SessionManager(SessionStore(store), pool)
        async with pool:
            session = await sessions.create(None, {"on_busy": "interrupt"})
            first = await sessions.post(session.id, "first", owner=None)
            assert first.generation is not None
            with anyio.fail_after(TIMEOUT):
                while (await pool.get(first.generation.id)).status != "running":  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            started = anyio.current_time()
            async with anyio.create_task_group() as tg:
                if action == "interrupt":
                    second = await sessions.post(session.id, "second", owner=None)
                    assert second.generation is not None
                    # The session is free at once: a title change does not wait.
                    with anyio.fail_after(letting_go / 2):
                        await sessions.update(
                            session.id, {"title": "renamed"}, owner=None, merge=False
                        )
                else:
                    tg.start_soon(partial(sessions.delete, session.id, owner=None))
                    await anyio.sleep(0.1)
                    with anyio.fail_after(letting_go / 2), pytest.raises(SessionNotFound):
                        await sessions.get(session.id, owner=None)
                assert anyio.current_time() - started < letting_go / 2
            # The stop itself still completes: the answer ended ``cancelled``, or (after it
            # ended) went with its deleted session.
            if action == "delete":
                with pytest.raises(SessionNotFound):
                    await sessions.store.get(session.id)
                with pytest.raises(GenerationNotFound):
                    await pool.get(first.generation.id)
            else:
                assert await wait_ended_in(pool, first.generation.id) == "cancelled"
                assert second.generation is not None
                await pool.cancel(second.generation.id)


async def wait_ended_in(pool: GenerationPool, generation_id: str) -> str:
    with anyio.fail_after(TIMEOUT):
        while (status := (await pool.get(generation_id)).status) not in TERMINAL_STATUSES:  # noqa: ASYNC110
            await anyio.sleep(0.01)
    return status
