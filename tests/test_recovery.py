"""Which generations a starting (or sweeping) pool takes over, and which it leaves alone."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from store import GenerationRecord, StreamStore, WorkerRecord
from store.types import GenerationStatus
from streaming import (
    GenerationPool,
    GenerationRequest,
    SimulatedProvider,
    decode_event,
    encode_event,
    status_event,
)
from streaming._workers import PROCESS_STARTED, is_dead

from .conftest import ServerFactory
from .support import read_events, wait_for_status


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StreamStore]:
    async with StreamStore(str(tmp_path / "r.db")) as opened:
        yield opened


def pool_for(store: StreamStore) -> GenerationPool:
    return GenerationPool(store, {"simulated": SimulatedProvider()}, default_provider="simulated")


async def add_generation(
    store: StreamStore,
    gid: str,
    worker_id: str,
    *,
    status: GenerationStatus = "running",
    cancel_requested: bool = False,
    request: dict[str, Any] | None = None,
) -> None:
    await store.create_generation(
        GenerationRecord(
            gid,
            gid,
            status,
            "simulated",
            request={} if request is None else GenerationRequest.from_json(request).to_json(),
            worker_id=worker_id,
            cancel_requested=cancel_requested,
            created_at=time.time(),
        )
    )


async def add_running_orphan(store: StreamStore, gid: str, request: dict[str, Any]) -> None:
    """A generation that started (its status event is in its stream) on a worker that died."""
    now = time.time()
    await store.register_worker(WorkerRecord("wrk_dead", "elsewhere", 1, now - 100, now - 100))
    await add_generation(store, gid, "wrk_dead", request=request)
    await store.append(gid, [encode_event(status_event("running"))])


async def test_start_up_ends_orphans_and_leaves_live_peers_alone(store: StreamStore) -> None:
    now = time.time()
    # A live peer: another pid on this host that exists (our parent), fresh heartbeat.
    await store.register_worker(
        WorkerRecord("wrk_live", os.uname().nodename, os.getppid(), now, now)
    )
    # A dead one: a lease that ran out long ago, on another host.
    await store.register_worker(WorkerRecord("wrk_stale", "elsewhere", 1, now - 100, now - 100))
    await add_generation(store, "g_live", "wrk_live")
    await add_generation(store, "g_stale", "wrk_stale")
    await add_generation(store, "g_queued", "wrk_stale", status="queued")
    await add_generation(store, "g_unregistered", "wrk_gone")
    await add_generation(store, "g_cancel", "wrk_gone", cancel_requested=True)

    async with pool_for(store) as pool:
        with anyio.fail_after(10):
            await pool.recovered.wait()  # in the background: the pool took work at once
        statuses = {g.id: g.status for g in await store.list_generations()}
    assert statuses == {
        "g_live": "running",
        "g_stale": "interrupted",
        "g_queued": "interrupted",
        "g_unregistered": "interrupted",
        "g_cancel": "cancelled",
    }
    for gid in ("g_stale", "g_unregistered", "g_cancel"):
        result = await store.read(gid, 0)
        assert result.at_end
        assert decode_event(result.messages[-1])["status"] == statuses[gid]
    assert {w.id for w in await store.list_workers()} == {"wrk_live"}


def test_a_worker_with_our_pid_is_dead_if_last_heard_before_this_process_started() -> None:
    """A restarted container's earlier process had our pid; a second runtime in this very
    process has it too, and is alive."""
    now = time.time()
    me = WorkerRecord("wrk_me", "host", os.getpid(), now, now)
    before = PROCESS_STARTED - 1
    previous = WorkerRecord("wrk_before", "host", os.getpid(), before - 60, before)
    lease = 10**6  # the pid decides, not the lease
    assert is_dead(previous, me=me, now=now, lease_timeout=lease)
    neighbour = WorkerRecord("wrk_beside", "host", os.getpid(), now, now)
    assert not is_dead(neighbour, me=me, now=now, lease_timeout=lease)
    assert not is_dead(me, me=me, now=now, lease_timeout=15)
    elsewhere = WorkerRecord("wrk_far", "other-host", 999_999, now, now)
    assert not is_dead(elsewhere, me=me, now=now, lease_timeout=15)
    assert is_dead(elsewhere, me=me, now=now + 16, lease_timeout=15)


async def test_a_restarted_server_answers_at_once_and_ends_every_orphan(
    tmp_path: Path, server_factory: ServerFactory
) -> None:
    """Hundreds of generations a dead process left running: the server takes requests while
    it ends them in the background, and a reader of one gets its text and final event."""
    db = tmp_path / "keepstream.db"
    count = 300
    async with StreamStore(str(db)) as store:
        now = time.time()
        await store.register_worker(WorkerRecord("wrk_dead", "elsewhere", 1, now - 100, now - 100))
        for i in range(count):
            await add_generation(store, f"gen_orphan{i:04d}", "wrk_dead")
        await store.append("gen_orphan0000", [b'{"type":"delta","text":"half an answer "}'])
    server = server_factory(db=db)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        events = await read_events(http, "gen_orphan0000")
        assert [e.event for e in events] == ["delta", "status"]
        assert events[-1].json() | {"error": None} == {
            "type": "status",
            "status": "interrupted",
            "error": None,
        }
        last = await wait_for_status(http, f"gen_orphan{count - 1:04d}", {"interrupted"})
        assert last["status"] == "interrupted"
    async with StreamStore(str(db)) as store:
        assert await store.active_generations(("queued", "running")) == []


async def test_two_processes_recovering_at_once_continue_an_orphan_once(tmp_path: Path) -> None:
    """Both claim; one wins and continues it, and the other leaves it alone (it must not
    end, as interrupted, the answer its peer is continuing)."""
    path = str(tmp_path / "race.db")
    params = {"tokens_per_second": 40, "max_tokens": 40}
    request = {"prompt": "raced", "params": params}
    async with StreamStore(path) as one, StreamStore(path) as two:
        await add_running_orphan(one, "gen_raced", request)
        async with pool_for(one) as first, pool_for(two) as second:
            with anyio.fail_after(20):
                await first.recovered.wait()
                await second.recovered.wait()
                await first.wait_ended("gen_raced")
                await second.wait_ended("gen_raced")
        final = await one.get_generation("gen_raced")
        result = await one.read("gen_raced", 0)
    kinds = [decode_event(m).get("type") for m in result.messages]
    assert final.status == "completed", final
    assert kinds.count("resumed") == 1
    assert final.text == SimulatedProvider().answer(GenerationRequest.from_json(request))


async def test_a_second_runtime_in_the_process_leaves_the_first_ones_generations_alone(
    tmp_path: Path,
) -> None:
    """Two pools in one process share its pid. The second starts after the first has taken
    an orphan over: it sees the generation owned by a live worker (not by a dead one with
    our pid) and leaves it, so the answer is continued once."""
    path = str(tmp_path / "embedded.db")
    request = {"prompt": "twice?", "params": {"tokens_per_second": 40, "max_tokens": 40}}
    async with StreamStore(path) as one, StreamStore(path) as two:
        await add_running_orphan(one, "gen_once", request)
        async with pool_for(one) as first:
            with anyio.fail_after(20):
                await first.recovered.wait()  # it has claimed the orphan
            async with pool_for(two) as second:
                with anyio.fail_after(20):
                    await second.recovered.wait()
                    await first.wait_ended("gen_once")
        final = await one.get_generation("gen_once")
        result = await one.read("gen_once", 0)
    kinds = [decode_event(m).get("type") for m in result.messages]
    assert (final.status, kinds.count("resumed")) == ("completed", 1)
    assert final.text == SimulatedProvider().answer(GenerationRequest.from_json(request))
