"""Faults: full disks, peers that take a stream over, bad upstream text, hostile bodies.

Each test states a guarantee and failed while the bug it was written for was present. Real
objects only (stores on real files, pools, real servers); a full disk is SQLite's own
``max_page_count`` limit on the writer's connection.

Some tests poll committed state (``noqa: ASYNC110``): what they wait for has no event, which
is the point of the bug they show.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from pathlib import Path

import anyio
import anyio.lowlevel
import httpx
import pytest

from store import (
    TERMINAL_STATUSES,
    GenerationRecord,
    StoreError,
    StreamStore,
)
from store._context import WriterContext
from store.types import GenerationStatus
from streaming import (
    GenerationLog,
    GenerationPool,
    GenerationRequest,
    GenerationRun,
    ProviderChunk,
    SimulatedProvider,
    decode_event,
    encode_event,
    status_event,
)

from .conftest import ServerFactory, openai_args
from .fake_upstream import FakeUpstream, error_reply
from .support import start_generation, wait_for_status

TIMEOUT = 10.0


def new_record(
    gid: str, *, status: GenerationStatus = "running", worker_id: str | None = None
) -> GenerationRecord:
    return GenerationRecord(
        gid, gid, status, "simulated", worker_id=worker_id, created_at=time.time()
    )


async def stream_text(store: StreamStore, stream_id: str) -> str:
    result = await store.read(stream_id, 0)
    return "".join(
        event["text"]
        for event in map(decode_event, result.messages)
        if event.get("type") == "delta"
    )


# -- 1. an upstream error message with a lone surrogate ------------------------------------------


async def test_upstream_error_with_a_lone_surrogate_fails_only_that_generation(
    server_factory: ServerFactory, upstream: FakeUpstream
) -> None:
    """An upstream error message may hold half a surrogate pair (JSON ``\\ud800``): that one
    generation fails with the text scrubbed, and the server goes on serving."""
    prompt = upstream.expect(error_reply(500, "bad \ud800 news"), label="surrogate")
    server = server_factory(
        *openai_args(upstream),
        "--shutdown-grace",
        "1",
    )
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
        broken = await start_generation(client, prompt=prompt)
        try:
            snapshot = await wait_for_status(
                client, broken["id"], set(TERMINAL_STATUSES), timeout=5
            )
            status = snapshot["status"]
        except TimeoutError:
            status = (await client.get(f"/v1/generations/{broken['id']}")).json()["status"]
        # A later, unrelated generation on the simulated provider.
        later = await client.post(
            "/v1/generations",
            json={"prompt": "after", "provider": "simulated", "params": {"max_tokens": 3}},
        )
        later_status: object = later.status_code
        if later_status == 202:
            snapshot = await wait_for_status(client, later.json()["id"], set(TERMINAL_STATUSES))
            later_status = snapshot["status"]
    exit_code = server.stop(timeout=8)
    assert (status, later_status, exit_code) == ("failed", "completed", 0)


# -- 2. a write failure on the final batch -----------------------------------------------------


class GatedProvider:
    """A provider that waits for ``gate`` and then answers ``text`` in one chunk."""

    name = "gated"

    def __init__(self, text: str) -> None:
        self.text = text
        self.gate = anyio.Event()

    def validate(self, request: GenerationRequest) -> None:
        return None

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        await self.gate.wait()
        yield ProviderChunk(self.text)

    async def aclose(self) -> None:
        return None


async def set_disk_full(store: StreamStore, full: bool) -> None:
    """Simulate a full disk (SQLITE_FULL) on the writer's connection, or free it again."""

    def op(ctx: WriterContext) -> None:
        conn = ctx.conn
        if full:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {pages}")
        else:
            conn.execute("PRAGMA max_page_count = 1073741823")

    await store.execute(op)


async def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_a_failed_final_write_does_not_leave_the_generation_running_forever(
    tmp_path: Path,
) -> None:
    """Guarantee (4). The final batch (last delta + status + close) hits a full disk. The
    writer rolls it back, puts it back into the log and retries with backoff; once the disk
    has room the generation ends ``completed`` with all of its text and a closed stream."""
    provider = GatedProvider("x" * 200_000)
    # A long coalesce window makes the last delta and the final event one batch.
    async with StreamStore(
        str(tmp_path / "full.db"), flush_interval=0.005, coalesce_window=1.0
    ) as store:
        async with GenerationPool(
            store, {"gated": provider}, default_provider="gated", shutdown_grace=1
        ) as pool:
            record = await pool.submit(GenerationRequest.from_json({"prompt": "hi"}))

            async def status() -> str:
                return (await store.get_generation(record.id)).status

            with anyio.fail_after(TIMEOUT):
                while await status() != "running":  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            await set_disk_full(store, True)
            provider.gate.set()
            await wait_until(lambda: store.stats["write_retries"] >= 2)
            assert await status() == "running"  # nothing half-written became visible
            await set_disk_full(store, False)  # the disk has room again
            with anyio.fail_after(TIMEOUT):
                while await status() not in TERMINAL_STATUSES:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            final = await store.get_generation(record.id)
            length, closed = await store.stream_length(record.stream_id)
            text = await stream_text(store, record.stream_id)
    assert (final.status, closed) == ("completed", True)
    assert final.text == text == provider.text
    assert final.next_offset == length


# -- 3. a failed batch mid-generation ---------------------------------------------------------


async def test_a_failed_batch_is_not_silently_dropped_while_later_ones_commit(
    tmp_path: Path,
) -> None:
    """Guarantee (3)/(4): no hole in the log. A batch that hits a full disk is retried, and
    nothing added after it can overtake it; ``flush`` waits instead of raising."""
    async with StreamStore(
        str(tmp_path / "gap.db"), flush_interval=0.005, coalesce_window=0
    ) as store:
        await store.create_generation(new_record("g"))
        log = GenerationLog(store, "g", "g")
        log.add_text("one ")
        await log.flush()
        await set_disk_full(store, True)
        log.add_text("two " * 50_000)  # needs new pages: SQLITE_FULL
        with anyio.move_on_after(0.5) as waiting:
            await log.flush()
        assert waiting.cancelled_caught  # still pending, not failed
        log.add_text("three")
        await set_disk_full(store, False)
        log.add_event(status_event("completed"), fields={"status": "completed"}, close=True)
        with anyio.fail_after(TIMEOUT):
            await log.flush()
        snapshot = await store.get_generation("g")
        text = await stream_text(store, "g")
        length, closed = await store.stream_length("g")
    expected = "one " + "two " * 50_000 + "three"
    assert text == snapshot.text == expected
    assert (snapshot.status, closed, snapshot.next_offset) == ("completed", True, length)


# -- 4. a peer ends a generation this process still has state for ------------------------------


async def test_a_peer_closing_our_stream_wakes_and_ends_our_followers(tmp_path: Path) -> None:
    """Guarantee (4) as seen by a reader. When a peer ends a generation this process wrote
    (it took us for dead), our followers notice the close and end too."""
    path = str(tmp_path / "two.db")
    async with StreamStore(path) as mine, StreamStore(path) as peer:
        await mine.create_generation(new_record("g", worker_id="wrk_mine"))
        log = GenerationLog(mine, "g", "g")
        log.add_text("partial")
        await log.flush()
        assert await peer.finish_generation(
            "g",
            encode_event(status_event("interrupted")),
            {"status": "interrupted"},
            only_if=["queued", "running"],
        )
        offset = 1
        ended = False
        with anyio.move_on_after(3):
            while True:
                changed = mine.change_event("g")
                result = await mine.read("g", offset)
                offset = result.next_offset
                if result.at_end:
                    ended = True
                    break
                if not result.messages:
                    await changed.wait()
        assert ended, f"the follower in the writing process never saw the end (offset {offset})"


async def test_one_streams_conflict_does_not_drop_other_generations_text(tmp_path: Path) -> None:
    """A stream whose offsets a peer took fails alone: the other generations' text in the
    same commit is written."""
    path = str(tmp_path / "two.db")
    async with (
        StreamStore(path, flush_interval=0.3, coalesce_window=0) as mine,
        StreamStore(path) as peer,
    ):
        await mine.create_generation(new_record("g", worker_id="wrk_mine"))
        await mine.create_generation(new_record("h", worker_id="wrk_mine"))
        g, h = GenerationLog(mine, "g", "g"), GenerationLog(mine, "h", "h")
        g.add_text("g1")
        await g.flush()  # "mine" now caches g's next offset (1)
        await peer.finish_generation(
            "g", encode_event(status_event("interrupted")), {}, only_if=["running"]
        )
        await mine.execute(lambda ctx: None)  # a commit: the next batch waits out the window
        h.add_text("innocent ")
        g.add_text("g2")  # same transaction as h's text
        with anyio.move_on_after(TIMEOUT):
            try:
                await h.flush()
            except StoreError:
                pass
        h.add_text("bystander")
        with anyio.move_on_after(TIMEOUT):
            try:
                await h.flush()
            except StoreError:
                pass
        with anyio.move_on_after(2):
            while await stream_text(mine, "h") != "innocent bystander":  # noqa: ASYNC110
                await anyio.sleep(0.02)
        assert await stream_text(mine, "h") == "innocent bystander"


# -- 5. a worker a peer removed never comes back -------------------------------------------------


async def test_a_worker_removed_by_a_peer_is_registered_again_by_its_heartbeat(
    tmp_path: Path,
) -> None:
    """After a stall longer than ``lease_timeout`` a peer removes this worker's row; the
    next heartbeat registers it again, so its later generations are not taken for orphans."""
    path = str(tmp_path / "lease.db")
    skew = [100.0]  # the peer sees our heartbeat as 100 s old: we were stalled

    def peer_clock() -> float:
        return time.time() + skew[0]

    sim = {"simulated": SimulatedProvider(tokens_per_second=20, max_tokens=10_000)}
    async with StreamStore(path) as mine_store, StreamStore(path) as peer_store:
        mine = GenerationPool(
            mine_store,
            sim,
            default_provider="simulated",
            heartbeat_interval=3600,
            shutdown_grace=0.5,
        )
        # Another host, so that only the lease decides (not this test's shared pid).
        mine.worker = replace(mine.worker, hostname="host-mine")
        peer = GenerationPool(
            peer_store,
            sim,
            default_provider="simulated",
            heartbeat_interval=3600,
            clock=peer_clock,
        )
        async with mine:
            async with peer:  # its start-up recover() removes our (stale) worker row
                with anyio.fail_after(TIMEOUT):
                    await peer.recovered.wait()
                skew[0] = 0.0  # we are back
                assert not await mine_store.heartbeat(mine.worker)  # our sweep: the row was gone
                registered = {w.id for w in await mine_store.list_workers()}
                record = await mine.submit(GenerationRequest.from_json({"prompt": "hi"}))
                await peer.recover()  # the peer's next sweep
                status = (await mine_store.get_generation(record.id)).status
    assert (mine.worker.id in registered, status in TERMINAL_STATUSES) == (True, False), status


# -- 6. the writer thread dies on any error that is not sqlite3.Error ----------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_an_op_that_raises_a_non_sqlite_error_does_not_kill_the_writer(
    tmp_path: Path,
) -> None:
    """An op that raises anything (here OverflowError binding a huge int) fails alone; the
    writer thread lives on and later writes go through."""
    async with StreamStore(str(tmp_path / "dead.db")) as store:
        await store.create_generation(new_record("g"))
        with anyio.move_on_after(3) as first:
            try:
                await store.update_generation("g", {"next_offset": 2**63})
            except (StoreError, ValueError, OverflowError):
                pass
        with anyio.move_on_after(3) as second:
            await store.create_stream("after")
    assert (first.cancelled_caught, second.cancelled_caught) == (False, False)


# -- 7. a JSON body with a huge integer -------------------------------------------------------


async def test_a_body_with_a_huge_integer_is_a_4xx_not_a_500(client: httpx.AsyncClient) -> None:
    """An integer past Python's 4,300-digit limit in a body is a 400, not a 500."""
    content = b'{"prompt": "hi", "params": {"max_tokens": ' + b"1" * 5000 + b"}}"
    response = await client.post(
        "/v1/generations", content=content, headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500, (response.status_code, response.text)


# -- 8. delete and re-create of one stream id in one commit --------------------------------------


async def test_a_stream_deleted_and_created_again_in_one_commit_reads_as_new(
    tmp_path: Path,
) -> None:
    """A stream deleted and created again in one commit reads as the new, empty stream."""
    async with StreamStore(str(tmp_path / "re.db"), flush_interval=0.3) as store:
        await store.create_stream("s")
        await store.append("s", [b"old-0", b"old-1"], close=True)
        await store.execute(lambda ctx: None)  # a commit: the next batch waits out the window
        async with anyio.create_task_group() as tg:
            tg.start_soon(store.delete_stream, "s")
            tg.start_soon(store.create_stream, "s")
        new = await store.read("s", 0)
        length = await store.stream_length("s")
    assert (new.messages, new.at_end, length) == ([], False, (0, False))


# -- 9. a reader that found a new stream before its creation was published --------------------


def hold_loop_until_committed(path: str, stream_id: str) -> None:
    """Block the event loop (deliberately) until the stream's row is in the file."""
    deadline = time.monotonic() + TIMEOUT
    conn = sqlite3.connect(path)
    try:
        while conn.execute("SELECT 1 FROM streams WHERE id = ?", (stream_id,)).fetchone() is None:
            assert time.monotonic() < deadline, "the writer never committed"
            time.sleep(0.005)
    finally:
        conn.close()


async def test_a_reader_that_read_a_new_stream_before_publish_is_woken_by_its_first_append(
    tmp_path: Path,
) -> None:
    """A reader that found a new stream in SQLite before its creation was published is still
    woken by the stream's first append."""
    path = str(tmp_path / "new.db")
    async with StreamStore(path, flush_interval=0.005) as store:
        creating = anyio.Event()

        async def create() -> None:
            await store.create_stream("s")
            creating.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(create)
            await anyio.lowlevel.checkpoint()  # the op is queued
            # Hold the loop until the writer has committed: its publish then waits for us.
            hold_loop_until_committed(path, "s")
            changed = store.change_event("s")  # no state yet: the shared event
            result = await store.read("s", 0)  # from SQLite: committed, empty
            assert result.messages == [] and not result.at_end
        await store.append("s", [b"first"])
        woken = False
        with anyio.move_on_after(2):
            await changed.wait()
            woken = True
    assert woken
