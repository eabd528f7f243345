"""The writer's batching, coalescing and back-pressure, on real stores and real files."""

from __future__ import annotations

import gc
import threading
from collections.abc import AsyncGenerator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from store import AppendBatch, StoreBusy, StreamStore
from streaming import (
    GenerationLog,
    GenerationPool,
    GenerationRequest,
    GenerationRun,
    ProviderChunk,
)
from streaming._pool import MAX_UNCOMMITTED_CHARS

from .test_faults import set_disk_full, wait_until

TIMEOUT = 10.0


async def test_a_new_append_never_inherits_a_gone_sources_coalesce_mark(tmp_path: Path) -> None:
    """Sources are remembered by identity, not by ``id()``: CPython hands a new append the
    address of the one that just finished, which used to make it wait a whole coalesce
    window. With a 30 s window, twenty back-to-back appends would take ten minutes."""
    async with StreamStore(
        str(tmp_path / "s.db"), flush_interval=0.001, coalesce_window=30.0
    ) as store:
        await store.create_stream("s")
        with anyio.fail_after(TIMEOUT):
            for i in range(20):
                gc.collect()  # free the previous append's source: its address is reused
                result = await store.append("s", [b"%d" % i])
                assert result.first_offset == i


async def test_one_generations_deltas_are_coalesced_per_window(tmp_path: Path) -> None:
    """Within one window a generation's deltas become one event; each commit takes them all."""
    async with StreamStore(
        str(tmp_path / "s.db"), flush_interval=0.001, coalesce_window=0.2
    ) as store:
        await store.create_stream("g")
        log = GenerationLog(store, "g", "g")
        with anyio.fail_after(TIMEOUT):
            log.add_text("first")
            await log.flush()  # an idle stream's first text goes out with the next commit
            for i in range(50):
                log.add_text(f" {i}")
            await log.flush()
        messages = (await store.read("g", 0)).messages
        assert len(messages) == 2, messages
        assert messages[1].startswith(b'{"type":"delta","text":" 0 1 2')


async def test_batches_commit_many_sources_in_one_transaction(tmp_path: Path) -> None:
    async with StreamStore(str(tmp_path / "s.db"), flush_interval=0.05) as store:
        for i in range(100):
            await store.create_stream(f"s{i}")
        before = store.stats["commits"]
        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(store.append, f"s{i}", [b"x"])
        # 100 concurrent appends within one flush window: a handful of commits, not 100.
        assert store.stats["commits"] - before <= 5


async def test_a_full_writer_queue_pushes_back_instead_of_growing(tmp_path: Path) -> None:
    """While the writer is stuck (a stalled disk: here an op that blocks its thread), at most
    ``max_pending_writes`` writes wait in it; the next ones wait for room and then fail with
    ``StoreBusy``. Once the writer moves again, every write that was accepted lands."""
    async with StreamStore(
        str(tmp_path / "s.db"), flush_interval=0.001, max_pending_writes=10, write_wait=0.5
    ) as store:
        await store.create_stream("s")
        stalled = threading.Event()
        landed: list[int] = []
        refused: list[StoreBusy] = []

        async def append(i: int) -> None:
            try:
                await store.append("s", [b"%d" % i])
            except StoreBusy as exc:
                refused.append(exc)
            else:
                landed.append(i)

        with anyio.fail_after(TIMEOUT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.execute, lambda ctx: stalled.wait(TIMEOUT))
                await anyio.sleep(0.1)
                for i in range(30):
                    tg.start_soon(append, i)
                await anyio.sleep(1.0)  # past the 0.5 s wait
                assert store.pending_writes == 10  # the stalled op and 9 appends
                assert len(refused) == 21
                assert "busy" in str(refused[0])
                stalled.set()
        assert len(landed) == 9
        assert (await store.read("s", 0)).next_offset == 9
        assert store.pending_writes == 0


async def wait_for_status(pool: GenerationPool, generation_id: str, status: str) -> None:
    with anyio.fail_after(TIMEOUT):
        while (await pool.get(generation_id)).status != status:  # noqa: ASYNC110
            await anyio.sleep(0.01)


class FloodProvider:
    """Answers ``chunks`` chunks of ``size`` characters as fast as it is read."""

    name = "flood"

    def __init__(self, chunks: int, size: int) -> None:
        self.chunks, self.size = chunks, size
        self.sent = 0
        self.gate = anyio.Event()

    def validate(self, request: GenerationRequest) -> None:
        return None

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        await self.gate.wait()
        for _ in range(self.chunks):
            self.sent += 1
            yield ProviderChunk("x" * self.size)
            await anyio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        return None


async def test_a_generation_stops_reading_its_provider_while_nothing_commits(
    tmp_path: Path,
) -> None:
    """Back-pressure reaches the provider: while the disk is full a fast provider is read
    only until ``MAX_UNCOMMITTED_CHARS`` are buffered; nothing is lost once it has room."""
    size = 4096
    provider = FloodProvider(chunks=1000, size=size)  # 4 MB in all
    async with StreamStore(str(tmp_path / "s.db"), flush_interval=0.001) as store:
        async with GenerationPool(store, {"flood": provider}, default_provider="flood") as pool:
            record = await pool.submit(GenerationRequest.from_json({"prompt": "go"}))
            await wait_for_status(pool, record.id, "running")
            await set_disk_full(store, True)
            provider.gate.set()
            await wait_until(lambda: provider.sent * size > MAX_UNCOMMITTED_CHARS)
            await anyio.sleep(0.5)  # ample time to read on, were nothing holding it back
            assert provider.sent * size <= MAX_UNCOMMITTED_CHARS + 2 * size
            await set_disk_full(store, False)
            await wait_for_status(pool, record.id, "completed")
        snapshot = await store.get_generation(record.id)
        assert len(snapshot.text) == 1000 * size


@pytest.mark.parametrize("payloads", [[b"a"], [b"a", b"b", b"c"]], ids=["one", "three"])
async def test_a_one_shot_batch_is_written_whole(tmp_path: Path, payloads: list[bytes]) -> None:
    async with StreamStore(str(tmp_path / "s.db")) as store:
        await store.create_stream("s")
        result = await store.append("s", payloads, close=True)
        assert (result.first_offset, result.next_offset) == (0, len(payloads))
        assert (await store.read("s", 0)).messages == payloads
        assert AppendBatch(payloads).close is False
