"""The store contract: what every backend (SQLite and Redis, through the ``backend`` fixture)
must do behind the typed protocols of ``store._interface`` — streams, wake-ups, generations,
fencing, workers, sessions and durability across a restart. A test here that fails on one
backend only is a disagreement between the two, and is marked so for that backend alone."""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import streaming._log
from store import (
    ActiveGeneration,
    AppendBatch,
    AppendResult,
    Fenced,
    GenerationNotFound,
    GenerationRecord,
    KeptResponse,
    NewMessage,
    ReadResult,
    SessionBackend,
    SessionNotFound,
    SessionRecord,
    SessionWrite,
    StoreBackend,
    StoreError,
    StreamClosed,
    StreamExists,
    StreamNotFound,
    WorkerRecord,
    WriteRejected,
)
from store.types import GenerationStatus
from streaming import GenerationLog, decode_event

from .backends import Backend, sessions_of

WAIT = 10.0  # the bound on every wait for a commit or a wake-up
ACTIVE = ("queued", "running")


# -- helpers ---------------------------------------------------------------------------------------


async def new_stream(
    store: StoreBackend, stream_id: str, payloads: Sequence[bytes] = (), *, close: bool = False
) -> None:
    """Create ``stream_id`` holding ``payloads`` (closed if ``close``)."""
    await store.create_stream(stream_id)
    if payloads or close:
        await store.append(stream_id, list(payloads), close=close)


async def read_all(store: StoreBackend, stream_id: str) -> list[bytes]:
    """Every committed message of a stream."""
    return (await store.read(stream_id, 0, limit=100_000)).messages


def generation(gid: str, status: GenerationStatus = "running", **fields: Any) -> GenerationRecord:
    """A generation record whose stream is named after it."""
    return dataclasses.replace(GenerationRecord(gid, gid, status, "simulated"), **fields)


def session(sid: str, owner: str | None = None, *, at: float = 1.0, **fields: Any) -> SessionRecord:
    """An active session of ``owner`` created, updated and last active at ``at``."""
    record = SessionRecord.blank(sid)
    return dataclasses.replace(
        record, owner=owner, created_at=at, updated_at=at, last_activity_at=at, **fields
    )


def answer(gid: str) -> NewMessage:
    """The assistant message whose text is generation ``gid``'s."""
    return NewMessage(f"msg_{gid}", "assistant", generation_id=gid)


async def message_ids(sessions: SessionBackend, sid: str) -> list[str]:
    return [m.id for m in await sessions.messages(sid)]


async def summary_ids(sessions: SessionBackend, owner: str | None, **options: Any) -> list[str]:
    return [s.session.id for s in await sessions.list_for(owner, **options)]


class Batches:
    """An append source that hands over the given batches, one per take, and keeps what
    became of each (its ``AppendResult`` or its error)."""

    def __init__(self, stream_id: str, *batches: AppendBatch) -> None:
        self.stream_id = stream_id
        self._batches = list(batches)
        self._last: AppendBatch | None = None
        self.outcomes: list[AppendResult | StoreError] = []
        self._settled = anyio.Event()

    def take(self) -> AppendBatch | None:
        self._last = self._batches.pop(0) if self._batches else None
        return self._last

    def untake(self) -> None:
        if self._last is not None:
            self._batches.insert(0, self._last)

    def committed(self, result: AppendResult) -> None:
        self._settle(result)

    def failed(self, error: StoreError) -> None:
        self._settle(error)

    def _settle(self, outcome: AppendResult | StoreError) -> None:
        self.outcomes.append(outcome)
        self._settled.set()

    async def push(self, store: StoreBackend) -> AppendResult | StoreError:
        """Have ``store`` take the next batch; what became of it."""
        self._settled = anyio.Event()
        store.mark_dirty(self)
        with anyio.fail_after(WAIT):
            await self._settled.wait()
        return self.outcomes[-1]


def deltas_text(payloads: list[bytes]) -> str:
    """The text of a generation's delta events."""
    events = [decode_event(p) for p in payloads]
    return "".join(e["text"] for e in events if e["type"] == "delta")


# -- streams: offsets, reads, errors, payloads -----------------------------------------------------


async def test_offsets_are_dense_message_indexes_and_reads_resume_from_any_offset(
    backend: Backend,
) -> None:
    store = backend.store
    await store.create_stream("s")
    assert await store.stream_length("s") == (0, False)
    assert await store.append("s", [b"a", b"b"]) == AppendResult(0, 2)
    assert await store.append("s", [b"c"]) == AppendResult(2, 3)
    assert await store.append("s", []) == AppendResult(3, 3)
    assert await store.append("s", [b"d"], close=True) == AppendResult(3, 4)
    everything = [b"a", b"b", b"c", b"d"]
    for offset in range(len(everything) + 1):
        result = await store.read("s", offset)
        assert (result.offset, result.messages) == (offset, everything[offset:])
        assert result.next_offset == 4
        assert result.at_end
    assert await store.stream_length("s") == (4, True)


async def test_limit_and_max_bytes_bound_a_read_but_its_first_message_always_comes(
    backend: Backend,
) -> None:
    store = backend.store
    payloads = [b"x" * 10, b"y" * 10, b"z" * 100, b"w"]
    await new_stream(store, "s", payloads, close=True)
    assert (await store.read("s", 1, limit=2)).messages == payloads[1:3]
    assert (await store.read("s", 0, max_bytes=20)).messages == payloads[:2]
    assert (await store.read("s", 0, max_bytes=25)).messages == payloads[:2]
    assert (await store.read("s", 2, max_bytes=5)).messages == [payloads[2]]  # larger, alone
    assert (await store.read("s", 3, max_bytes=0)).messages == [payloads[3]]
    both = await store.read("s", 0, limit=3, max_bytes=15)
    assert both.messages == payloads[:1]
    assert (await store.read("s", 1, limit=0)).messages == []


async def test_at_end_only_when_the_stream_is_closed_and_the_read_reached_it_uncut(
    backend: Backend,
) -> None:
    store = backend.store
    await new_stream(store, "s", [b"a", b"bb", b"ccc"])
    assert not (await store.read("s", 0)).at_end  # read to the end, but open
    assert not (await store.read("s", 3)).at_end
    await store.close_stream("s")
    assert not (await store.read("s", 0, limit=1)).at_end  # cut by limit
    assert not (await store.read("s", 0, max_bytes=2)).at_end  # cut by max_bytes
    assert not (await store.read("s", 1, max_bytes=2)).at_end  # its first one alone
    assert (await store.read("s", 0)).at_end
    assert (await store.read("s", 2, max_bytes=1)).at_end  # the last one, larger than allowed
    assert (await store.read("s", 3)).at_end


async def test_a_read_whose_limit_takes_exactly_the_rest_of_a_closed_stream_is_at_its_end(
    backend: Backend,
) -> None:
    """``ReadResult.at_end``: the stream is closed and these are its last messages."""
    store = backend.store
    await new_stream(store, "s", [b"a", b"b", b"c"], close=True)
    assert (await store.read("s", 0, limit=3)).at_end
    assert (await store.read("s", 1, limit=2, from_disk=True)).at_end
    async with backend.reopen() as other:
        assert (await other.read("s", 0, limit=3)).at_end


async def test_an_offset_past_the_end_returns_no_messages(backend: Backend) -> None:
    store = backend.store
    await new_stream(store, "s", [b"a", b"b"])
    for offset in (2, 3, 1000):
        result = await store.read("s", offset)
        assert (result.offset, result.messages, result.next_offset) == (offset, [], offset)
    with pytest.raises(ValueError):
        await store.read("s", -1)


async def test_a_missing_stream_raises_stream_not_found_everywhere(backend: Backend) -> None:
    store = backend.store
    with pytest.raises(StreamNotFound):
        await store.read("missing", 0)
    with pytest.raises(StreamNotFound):
        await store.append("missing", [b"x"])
    with pytest.raises(StreamNotFound):
        await store.close_stream("missing")
    with pytest.raises(StreamNotFound):
        await store.delete_stream("missing")
    with pytest.raises(StreamNotFound):
        await store.stream_length("missing")
    # A failed append does not take its neighbours in the same group commit down.
    await store.create_stream("s")
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.append, "s", [b"ok"])
        with pytest.raises(StreamNotFound):
            await store.append("missing", [b"x"])
    assert await read_all(store, "s") == [b"ok"]


async def test_creating_an_existing_stream_raises_stream_exists_and_keeps_it(
    backend: Backend,
) -> None:
    store = backend.store
    await new_stream(store, "s", [b"kept"])
    with pytest.raises(StreamExists):
        await store.create_stream("s")
    assert await read_all(store, "s") == [b"kept"]
    assert await store.stream_length("s") == (1, False)


async def test_appending_to_a_closed_stream_raises_stream_closed_and_writes_nothing(
    backend: Backend,
) -> None:
    store = backend.store
    await new_stream(store, "s", [b"a"], close=True)
    with pytest.raises(StreamClosed):
        await store.append("s", [b"b"])
    with pytest.raises(StreamClosed):
        await store.append("s", [b"b"], close=True)
    assert await store.stream_length("s") == (1, True)
    assert await read_all(store, "s") == [b"a"]


async def test_close_is_idempotent_and_wakes_and_delete_removes_the_stream(
    backend: Backend,
) -> None:
    store = backend.store
    await new_stream(store, "s", [b"a"])
    await settle(backend)
    woken = store.change_event("s")
    await store.close_stream("s")
    with anyio.fail_after(WAIT):
        await woken.wait()  # followers learn of the close
    await store.close_stream("s")  # again: a no-op
    assert await store.stream_length("s") == (1, True)
    woken = store.change_event("s")
    await store.delete_stream("s")
    with anyio.fail_after(WAIT):
        await woken.wait()
    with pytest.raises(StreamNotFound):
        await store.read("s", 0)
    with pytest.raises(StreamNotFound):
        await store.close_stream("s")
    with pytest.raises(StreamNotFound):
        await store.delete_stream("s")
    await new_stream(store, "s", [b"anew"])  # the id is free again, from offset 0
    assert await read_all(store, "s") == [b"anew"]


async def test_payloads_are_stored_byte_for_byte_utf8_or_not(backend: Backend) -> None:
    payloads = [
        '{"text":"café \\"q\\" 🙂 \\u00e9 \\n"}'.encode(),
        b"\xff\xfe not utf-8 \x00\x80",
        "plain ünïcödé 日本語".encode(),
        b"",
        bytes(range(256)),
    ]
    await new_stream(backend.store, "s", payloads)
    assert await read_all(backend.store, "s") == payloads
    assert (await backend.store.read("s", 0, from_disk=True)).messages == payloads
    async with backend.reopen() as other:
        assert await read_all(other, "s") == payloads


async def test_fifty_concurrent_appends_get_strictly_increasing_non_overlapping_offsets(
    backend: Backend,
) -> None:
    store = backend.store
    await store.create_stream("s")
    results: dict[int, AppendResult] = {}

    async def append(i: int) -> None:  # 1 to 3 messages each, all naming their append
        results[i] = await store.append("s", [b"%d.%d" % (i, j) for j in range(i % 3 + 1)])

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(append, i)
    spans = sorted((r.first_offset, r.next_offset, i) for i, r in results.items())
    assert spans[0][0] == 0
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        assert start == end  # tiled: no gap, no overlap
    total = spans[-1][1]
    assert total == sum(i % 3 + 1 for i in range(50))
    messages = await read_all(store, "s")
    for first, end, i in spans:
        assert messages[first:end] == [b"%d.%d" % (i, j) for j in range(end - first)]


# -- wake-ups and following ------------------------------------------------------------------------


_probes = itertools.count()


async def hears(listener: StoreBackend, writer: StoreBackend) -> None:
    """Wait until ``listener`` hears a commit made through ``writer``, another store on the
    same data. From then on its change events are set by commits alone: a Redis store sets
    every event once when its change subscription comes up (it may have missed messages
    until then)."""
    probe = f"probe-{next(_probes)}"
    await writer.create_stream(probe)
    heard = listener.change_event(probe)
    await writer.append(probe, [b"x"])
    with anyio.fail_after(WAIT):
        await heard.wait()


async def settle(backend: Backend) -> None:
    """Wait until ``backend.store`` hears other stores' commits (see ``hears``)."""
    async with backend.reopen() as other:
        await hears(backend.store, other)


async def test_a_change_event_taken_before_a_read_is_set_by_the_next_commit_only(
    backend: Backend,
) -> None:
    store = backend.store
    await new_stream(store, "s", [b"first"])
    await settle(backend)
    woken = store.change_event("s")
    assert (await store.read("s", 1)).messages == []
    assert not woken.is_set()
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.append, "s", [b"second"])
        with anyio.fail_after(WAIT):
            await woken.wait()
        # Readers are woken after the commit: what woke them is there to read.
        assert (await store.read("s", 1)).messages == [b"second"]


async def follow_all(
    store: StoreBackend, stream_id: str, offset: int, *, max_bytes: int = 64
) -> list[bytes]:
    """Every message a follower from ``offset`` gets, until the stream's end."""
    got: list[bytes] = []
    with anyio.fail_after(WAIT):
        async for result in store.follow(stream_id, offset, max_bytes=max_bytes):
            assert result.offset == offset + len(got)  # each read resumes where the last ended
            got.extend(result.messages)
    return got


async def append_then_close(store: StoreBackend, stream_id: str, payloads: list[bytes]) -> None:
    """Append ``payloads`` one by one, letting readers run between them; then close."""
    for payload in payloads:
        await store.append(stream_id, [payload])
        await anyio.lowlevel.checkpoint()
    await store.close_stream(stream_id)


async def test_follow_from_an_offset_gets_exactly_the_rest_as_it_is_appended_and_closed(
    backend: Backend,
) -> None:
    store = backend.store
    before = [b"old %d" % i for i in range(5)]
    after = [b"new %02d" % i for i in range(30)]
    await new_stream(store, "s", before)
    got: list[bytes] = []

    async def follower() -> None:
        got.extend(await follow_all(store, "s", 3))

    async with anyio.create_task_group() as tg:
        tg.start_soon(follower)
        tg.start_soon(append_then_close, store, "s", after)
    assert got == before[3:] + after  # no gap, no duplicate


async def test_a_follower_of_a_stream_deleted_meanwhile_raises_stream_not_found(
    backend: Backend,
) -> None:
    store = backend.store
    await new_stream(store, "s", [b"a"])
    reads: list[ReadResult] = []

    async def follower() -> None:
        with pytest.raises(StreamNotFound):
            async for result in store.follow("s", 0, max_bytes=64):
                reads.append(result)
                if len(reads) == 1:
                    await store.delete_stream("s")

    with anyio.fail_after(WAIT):
        await follower()
    assert [r.messages for r in reads] == [[b"a"]]


async def test_a_follower_on_a_second_store_sees_the_appends_made_through_the_first(
    backend: Backend,
) -> None:
    """Another process (SQLite: it polls ``data_version``) or node (Redis: pub/sub)."""
    store = backend.store
    await new_stream(store, "s", [b"before"])
    payloads = [b"m%d" % i for i in range(20)]
    async with backend.reopen() as other:
        await hears(other, store)
        woken = other.change_event("s")
        assert (await other.read("s", 1)).messages == []
        await store.append("s", [payloads[0]])
        with anyio.fail_after(WAIT):
            await woken.wait()
        assert (await other.read("s", 1)).messages == [payloads[0]]
        got: list[bytes] = []

        async def follower() -> None:
            got.extend(await follow_all(other, "s", 0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(follower)
            tg.start_soon(append_then_close, store, "s", payloads[1:])
    assert got == [b"before", *payloads]


# -- generations -----------------------------------------------------------------------------------

FULL_RECORD = GenerationRecord(
    id="gen_full",
    stream_id="str_full",
    status="running",
    provider="dify",
    model="model-ünï",
    request={"prompt": "héllo 😀", "params": {"t": 0.7, "n": [1, 2, None]}, "ok": True},
    owner="alice",
    text="héllo 😀 \x00 ∑",
    next_offset=0,
    error={"type": "upstream", "message": "ünavailable"},
    usage={"input_tokens": 12, "output_tokens": 345},
    cancel_requested=True,
    worker_id="wrk_1",
    created_at=1712345678.1234567,
    started_at=1712345679.0000001,
    finished_at=1712345680.9876543,
    session_id="ses_1",
    continuations=2,
    provider_state={"conversation_id": "c-1", "nested": {"a": [1.5, "b"]}},
)


async def test_a_generation_round_trips_every_field_of_its_record(backend: Backend) -> None:
    store = backend.store
    await store.create_generation(FULL_RECORD)
    assert await store.get_generation("gen_full") == FULL_RECORD
    assert await store.list_generations() == [FULL_RECORD]
    located = await store.locate_generation("gen_full")
    assert located == dataclasses.replace(FULL_RECORD, text="", request={})
    assert await store.stream_length("str_full") == (0, False)  # its stream, empty and open
    with pytest.raises(GenerationNotFound):
        await store.get_generation("missing")
    with pytest.raises(GenerationNotFound):
        await store.locate_generation("missing")
    async with backend.reopen() as other:
        assert await other.get_generation("gen_full") == FULL_RECORD


async def test_creating_a_generation_whose_id_exists_raises_stream_exists(
    backend: Backend,
) -> None:
    store = backend.store
    await store.create_generation(generation("g", "queued", provider="first"))
    with pytest.raises(StreamExists):
        await store.create_generation(generation("g", "running", provider="second"))
    assert (await store.get_generation("g")).provider == "first"


async def test_creating_a_generation_on_an_existing_stream_raises_and_writes_nothing(
    backend: Backend,
) -> None:
    store = backend.store
    await new_stream(store, "g", [b"not a generation's"])
    with pytest.raises(StreamExists):
        await store.create_generation(generation("g"))
    with pytest.raises(GenerationNotFound):
        await store.get_generation("g")
    assert await read_all(store, "g") == [b"not a generation's"]


async def test_update_generation_sets_fields_and_refuses_missing_ids_and_unknown_fields(
    backend: Backend,
) -> None:
    store = backend.store
    await store.create_generation(generation("g", "queued", created_at=1.0))
    fields: dict[str, Any] = {
        "status": "running",
        "worker_id": "wrk_9",
        "started_at": 2.000000001,
        "usage": {"tokens": 3},
        "provider_state": {"id": "x"},
        "text": "ünïcode 😀",
    }
    await store.update_generation("g", fields)
    record = await store.get_generation("g")
    assert dataclasses.replace(generation("g", "queued", created_at=1.0), **fields) == record
    assert await store.snapshot_length("g") == (len("ünïcode 😀"), 0)
    assert [a.id for a in await store.active_generations(["running"])] == ["g"]
    with pytest.raises(GenerationNotFound):
        await store.update_generation("missing", {"status": "failed"})
    for bad in ({"id": "other"}, {"no_such_field": 1}, {}):
        with pytest.raises(ValueError):
            await store.update_generation("g", bad)


async def test_finish_generation_is_guarded_by_status_and_worker_and_writes_all_or_nothing(
    backend: Backend,
) -> None:
    store = backend.store
    await store.create_generation(generation("g", worker_id="wrk_1"))
    await store.append("g", [b"delta"])
    final: dict[str, Any] = {
        "status": "completed",
        "text": "the whole answer ✓",
        "finished_at": 9.75,
        "usage": {"tokens": 4},
    }
    refusals: list[dict[str, Any]] = [
        {"only_if": ["queued"]},
        {"only_if": ACTIVE, "only_worker": ("wrk_2",)},
        {"only_if": ACTIVE, "only_worker": (None,)},
    ]
    for guard in refusals:
        assert not await store.finish_generation("g", b"end", final, **guard)
        assert await store.stream_length("g") == (1, False)
        assert await store.get_generation("g") == generation("g", worker_id="wrk_1")
    await settle(backend)
    woken = store.change_event("g")
    assert await store.finish_generation("g", b"end", final, only_if=ACTIVE, only_worker=("wrk_1",))
    with anyio.fail_after(WAIT):
        await woken.wait()
    result = await store.read("g", 0)
    assert (result.messages, result.at_end) == ([b"delta", b"end"], True)
    ended = dataclasses.replace(generation("g", worker_id="wrk_1"), next_offset=2, **final)
    assert await store.get_generation("g") == ended
    assert await store.snapshot_length("g") == (len(final["text"]), 2)
    assert await store.active_generations(ACTIVE) == []
    # Ended once: a second attempt (a racing peer) is refused.
    assert not await store.finish_generation("g", b"again", {"status": "failed"}, only_if=ACTIVE)
    assert await read_all(store, "g") == [b"delta", b"end"]
    with pytest.raises(GenerationNotFound):
        await store.finish_generation("missing", b"end", final, only_if=ACTIVE)


async def test_finishing_a_generation_whose_stream_is_closed_or_gone_only_ends_its_record(
    backend: Backend,
) -> None:
    store = backend.store
    await store.create_generation(generation("closed"))
    await store.append("closed", [b"delta"], close=True)
    ended = {"status": "interrupted"}
    assert await store.finish_generation("closed", b"end", ended, only_if=ACTIVE)
    assert await read_all(store, "closed") == [b"delta"]
    record = await store.get_generation("closed")
    assert (record.status, record.next_offset) == ("interrupted", 0)
    await store.create_generation(generation("gone"))
    await store.append("gone", [b"delta"])
    await store.delete_stream("gone")
    assert await store.finish_generation("gone", b"end", ended, only_if=ACTIVE)
    assert (await store.get_generation("gone")).status == "interrupted"
    with pytest.raises(StreamNotFound):
        await store.stream_length("gone")


async def test_exactly_one_of_racing_claims_wins_across_two_stores(backend: Backend) -> None:
    store = backend.store
    await store.create_generation(generation("g", worker_id="wrk_dead"))
    wins: dict[str, bool] = {}
    async with backend.reopen() as other:

        async def claim(on: StoreBackend, worker: str) -> None:
            wins[worker] = await on.claim_generation(
                "g", from_worker="wrk_dead", to_worker=worker, max_continuations=3, only_if=ACTIVE
            )

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for i in range(10):  # five on each store
                    tg.start_soon(claim, (store, other)[i % 2], f"wrk_{i}")
    assert sorted(wins.values()) == [False] * 9 + [True]
    (winner,) = [worker for worker, won in wins.items() if won]
    record = await store.get_generation("g")
    assert (record.worker_id, record.continuations) == (winner, 1)


async def test_a_claim_is_refused_unless_owner_status_cancel_and_continuations_allow_it(
    backend: Backend,
) -> None:
    store = backend.store

    async def claim(gid: str, *, from_worker: str | None = "wrk_dead", most: int = 3) -> bool:
        return await store.claim_generation(
            gid,
            from_worker=from_worker,
            to_worker="wrk_new",
            max_continuations=most,
            only_if=ACTIVE,
        )

    await store.create_generation(
        generation("cancelled", cancel_requested=True, worker_id="wrk_dead")
    )
    await store.create_generation(generation("worn", continuations=3, worker_id="wrk_dead"))
    await store.create_generation(generation("ended", "completed", worker_id="wrk_dead"))
    await store.create_generation(generation("theirs", worker_id="wrk_live"))
    await store.create_generation(generation("unowned"))
    for gid in ("cancelled", "worn", "ended", "theirs"):
        before = await store.get_generation(gid)
        assert not await claim(gid), gid
        assert await store.get_generation(gid) == before, gid
    assert not await claim("missing")
    assert not await claim("unowned")  # it belongs to no one, not to wrk_dead
    assert await claim("unowned", from_worker=None)
    assert await claim("worn", most=4)
    record = await store.get_generation("worn")
    assert (record.worker_id, record.continuations) == ("wrk_new", 4)
    assert not await claim("worn", most=5)  # wrk_dead no longer owns it


async def test_a_cancel_request_never_touches_a_finished_generation(backend: Backend) -> None:
    store = backend.store
    await store.create_generation(generation("live", created_at=1.0))
    await store.create_generation(generation("done", "completed", created_at=2.0))
    assert await store.request_cancel("live", only_if=ACTIVE)
    assert await store.request_cancel("live", only_if=ACTIVE)  # still marked
    assert not await store.request_cancel("done", only_if=ACTIVE)
    assert (await store.get_generation("live")).cancel_requested
    assert await store.get_generation("done") == generation("done", "completed", created_at=2.0)
    with pytest.raises(GenerationNotFound):
        await store.request_cancel("missing", only_if=["running"])
    active = await store.active_generations(ACTIVE)
    assert [(a.id, a.cancel_requested) for a in active] == [("live", True)]


async def test_active_and_listed_generations_are_filtered_by_status_and_listed_oldest_first(
    backend: Backend,
) -> None:
    store = backend.store
    records = [
        generation("q", "queued", created_at=3.5, provider="p1"),
        generation("r", "running", created_at=1.25, worker_id="wrk_1", continuations=2),
        generation("c", "completed", created_at=2.0),
        generation("f", "failed", created_at=0.5),
        generation("tie_b", "interrupted", created_at=2.0),
        generation("tie_a", "cancelled", created_at=2.0),
    ]
    for record in records:
        await store.create_generation(record)
    by_id = {r.id: r for r in records}

    def listed(*ids: str) -> list[GenerationRecord]:
        return [by_id[i] for i in ids]

    assert await store.list_generations() == listed("f", "r", "c", "tie_a", "tie_b", "q")
    assert await store.list_generations(statuses=ACTIVE) == listed("r", "q")
    assert await store.list_generations(statuses=["completed", "cancelled"]) == listed("c", "tie_a")
    assert await store.list_generations(statuses=[]) == []
    active = sorted(await store.active_generations(ACTIVE), key=lambda a: a.id)
    assert active == [
        ActiveGeneration("q", None, False, "p1", 3.5, 0),
        ActiveGeneration("r", "wrk_1", False, "simulated", 1.25, 2),
    ]
    assert [a.id for a in await store.active_generations(["running"])] == ["r"]
    await store.update_generation("q", {"status": "failed"})
    assert [a.id for a in await store.active_generations(ACTIVE)] == ["r"]


async def test_snapshot_length_counts_the_characters_of_appended_text(backend: Backend) -> None:
    store = backend.store
    await store.create_generation(generation("g"))
    log = GenerationLog(store, "g", "g")
    for piece in ("héllo ", "😀", " e\u0301 日本語"):
        log.add_text(piece)
    log.add_event({"type": "status", "status": "completed"}, fields={"status": "completed"})
    with anyio.fail_after(WAIT):
        await log.flush()
    text = "héllo 😀 e\u0301 日本語"
    length = await store.snapshot_length("g")
    assert length == (len(text), (await store.stream_length("g"))[0])
    assert len(text.encode()) > length[0]  # characters, not bytes
    with pytest.raises(GenerationNotFound):
        await store.snapshot_length("missing")


async def test_snapshot_length_counts_the_characters_a_generation_was_created_with(
    backend: Backend,
) -> None:
    texts = {"plain": "abc", "wide": "héllo 😀 e\u0301日本語", "nul": "a\x00b\x00🙂", "empty": ""}
    for name, text in texts.items():
        await backend.store.create_generation(
            generation(name, "completed", text=text, next_offset=7)
        )
    for name, text in texts.items():
        assert await backend.store.snapshot_length(name) == (len(text), 7), name


# -- append sources: snapshots move with their messages --------------------------------------------


async def test_a_generation_snapshot_moves_with_its_messages(backend: Backend) -> None:
    store = backend.store
    await store.create_generation(generation("g", created_at=1.0))
    source = Batches(
        "g",
        AppendBatch([b"d1", b"d2"], "g", "hello ", {"status": "running"}),
        AppendBatch([b"d3"], "g", None),  # no snapshot update: it lags behind
        AppendBatch([b"end"], "g", "world ☃", {"status": "completed"}, close=True),
    )
    assert await source.push(store) == AppendResult(0, 2)
    snapshot = await store.get_generation("g")
    assert (snapshot.text, snapshot.next_offset, snapshot.status) == ("hello ", 2, "running")
    assert await source.push(store) == AppendResult(2, 3)
    snapshot = await store.get_generation("g")
    assert (snapshot.text, snapshot.next_offset) == ("hello ", 2)
    assert await source.push(store) == AppendResult(3, 4)
    snapshot = await store.get_generation("g")
    assert (snapshot.text, snapshot.next_offset) == ("hello world ☃", 4)
    assert snapshot.status == "completed"
    assert await store.snapshot_length("g") == (len("hello world ☃"), 4)
    assert (await store.read("g", 0)).at_end
    assert await store.active_generations(ACTIVE) == []


async def test_a_lagging_snapshot_always_matches_its_next_offset_and_ends_up_to_date(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written through ``GenerationLog``: between updates a snapshot is behind its stream,
    never ahead; its text is exactly the deltas before its ``next_offset``; a change of its
    fields and the close bring it up to date."""
    monkeypatch.setattr(streaming._log, "SNAPSHOT_INTERVAL", 3600.0)
    store = backend.store
    await store.create_generation(generation("g"))
    log = GenerationLog(store, "g", "g")

    async def flush_and_check() -> GenerationRecord:
        with anyio.fail_after(WAIT):
            await log.flush()
        snapshot = await store.get_generation("g")
        messages = await read_all(store, "g")
        assert snapshot.next_offset <= len(messages)
        assert snapshot.text == deltas_text(messages[: snapshot.next_offset])
        assert await store.snapshot_length("g") == (len(snapshot.text), snapshot.next_offset)
        return snapshot

    log.add_event({"type": "status", "status": "running"}, fields={"status": "running"})
    await flush_and_check()
    for word in ("one ", "twö ", "thrée 😀 "):
        log.add_text(word)
        await flush_and_check()
    log.set_fields({"usage": {"tokens": 3}})  # a field change brings the text up to date
    log.add_text("four ")
    caught_up = await flush_and_check()
    assert (caught_up.next_offset, caught_up.usage) == (5, {"tokens": 3})
    assert caught_up.text == "one twö thrée 😀 four "
    log.add_text("five")
    log.add_event(
        {"type": "status", "status": "completed"}, fields={"status": "completed"}, close=True
    )
    ended = await flush_and_check()
    assert (ended.text, ended.next_offset, ended.status) == (
        "one twö thrée 😀 four five",
        7,
        "completed",
    )
    assert (await store.read("g", 0)).at_end


async def test_a_batch_from_a_worker_that_lost_its_generation_is_fenced_and_writes_nothing(
    backend: Backend,
) -> None:
    store = backend.store
    await store.create_generation(generation("g", worker_id="wrk_1"))
    assert await store.claim_generation(
        "g", from_worker="wrk_1", to_worker="wrk_2", max_continuations=5, only_if=ACTIVE
    )
    claimed = await store.get_generation("g")
    late = AppendBatch(
        [b"late delta", b"late end"],
        "g",
        "late text",
        {"status": "completed"},
        close=True,
        worker_id="wrk_1",
    )
    outcome = await Batches("g", late).push(store)
    assert isinstance(outcome, Fenced)
    assert (outcome.generation_id, outcome.worker_id) == ("g", "wrk_1")  # the refused one
    assert await store.stream_length("g") == (0, False)
    assert await store.get_generation("g") == claimed
    owned = AppendBatch([b"delta"], "g", "text", {}, worker_id="wrk_2")
    assert await Batches("g", owned).push(store) == AppendResult(0, 1)
    record = await store.get_generation("g")
    assert (record.text, record.next_offset) == ("text", 1)


# -- per-owner limits, health, workers -------------------------------------------------------------


async def test_max_active_per_owner_refuses_a_generation_past_the_owner_s_active_ones(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions

    async def create(gid: str, owner: str | None = "alice", **fields: Any) -> None:
        record = generation(gid, "queued", owner=owner, **fields)
        await store.create_generation(record, max_active_per_owner=2)

    async def refused(gid: str) -> None:
        with pytest.raises(WriteRejected) as refusal:
            await create(gid)
        assert (refusal.value.reason, refusal.value.detail) == ("max_generations_per_user", "2")
        with pytest.raises(GenerationNotFound):
            await store.get_generation(gid)
        with pytest.raises(StreamNotFound):
            await store.stream_length(gid)

    await sessions.create(session("s", "alice"))
    await create("g1")
    await create("g2", session_id="s")
    await refused("g3")
    await create("bob1", "bob")  # another owner's count
    for i in range(3):
        await create(f"anonymous{i}", None)  # no owner: not limited
    await store.create_generation(generation("unlimited", owner="alice"))  # no limit asked
    await store.update_generation("unlimited", {"status": "completed"})
    async with backend.reopen() as other:  # the count holds across processes and nodes
        with pytest.raises(WriteRejected):
            await other.create_generation(generation("g3", owner="alice"), max_active_per_owner=2)
    # Every way a generation ends frees its place.
    await store.update_generation("g1", {"status": "completed"})
    await create("g3")
    await refused("g4")
    assert await store.finish_generation("g3", b"end", {"status": "failed"}, only_if=ACTIVE)
    await create("g4")
    await refused("g5")
    batch = AppendBatch([b"end"], "g4", "", {"status": "cancelled"}, close=True)
    assert await Batches("g4", batch).push(store) == AppendResult(0, 1)
    await create("g5")
    await refused("g6")
    await store.append("g2", [b"started"])
    await sessions.delete("s")  # g2 goes with its session
    await create("g6")
    await refused("g7")


async def test_readiness_and_stats_report_the_same_things_on_every_backend(
    backend: Backend,
) -> None:
    assert await backend.store.readiness(write_within=WAIT) == {
        "schema_current": True,
        "store_writable": True,
    }
    stats = backend.store.stats
    assert set(stats) == {
        "commits",
        "rows_written",
        "live_streams",
        "tail_bytes",
        "tail_cache_bytes",
        "tracked_streams",
        "write_retries",
        "messages_compacted",
        "pending_writes",
        "wal_bytes",
    }
    await new_stream(backend.store, "s", [b"a", b"b"])
    after = backend.store.stats
    assert after["commits"] > stats["commits"]
    assert after["rows_written"] >= stats["rows_written"] + 2


async def test_workers_register_heartbeat_and_re_register_after_being_removed(
    backend: Backend,
) -> None:
    store = backend.store
    one = WorkerRecord("wrk_1", "höst-a", 4242, 1712345678.1234567, 1712345679.7654321)
    two = WorkerRecord("wrk_2", "host-b", 1, 5.5, 6.25)
    await store.register_worker(one)
    await store.register_worker(two)
    assert sorted(await store.list_workers(), key=lambda w: w.id) == [one, two]
    assert await store.heartbeat(one, now=1712345690.5)
    refreshed = dataclasses.replace(one, heartbeat_at=1712345690.5)
    assert sorted(await store.list_workers(), key=lambda w: w.id) == [refreshed, two]
    await store.remove_worker("wrk_1")
    await store.remove_worker("wrk_missing")  # nothing to forget: no error
    assert await store.list_workers() == [two]
    assert not await store.heartbeat(one, now=1712345700.25)  # taken for dead meanwhile
    back = dataclasses.replace(one, heartbeat_at=1712345700.25)
    assert sorted(await store.list_workers(), key=lambda w: w.id) == [back, two]
    assert await store.heartbeat(one, now=1712345710.0)


# -- sessions --------------------------------------------------------------------------------------


async def test_a_session_write_lands_with_its_generation_or_not_at_all(backend: Backend) -> None:
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("s"))

    def gen(gid: str) -> GenerationRecord:  # g<n> is created at time n
        return generation(gid, "queued", session_id="s", created_at=float(gid[1:]))

    first = SessionWrite(
        "s", (NewMessage("q1", "user", "hi"), answer("g1")), 1.0, 100, only_if_idle=True
    )
    await store.create_generation(gen("g1"), session_write=first)
    assert await message_ids(sessions, "s") == ["q1", "msg_g1"]

    # Another answer while g1 is queued: refused, and nothing of it is written.
    second = SessionWrite(
        "s", (NewMessage("q2", "user", "again"), answer("g2")), 2.0, 100, only_if_idle=True
    )
    with pytest.raises(WriteRejected) as refused:
        await store.create_generation(gen("g2"), session_write=second)
    assert (refused.value.reason, refused.value.detail) == ("busy", "g1")
    with pytest.raises(GenerationNotFound):
        await store.get_generation("g2")
    with pytest.raises(StreamNotFound):
        await store.stream_length("g2")
    assert await message_ids(sessions, "s") == ["q1", "msg_g1"]
    assert await sessions.generations("s") == [("g1", "queued")]

    # A regenerated answer takes the last one's place; its request's response is kept.
    await store.update_generation("g1", {"status": "completed", "text": "first answer"})
    kept = KeptResponse(None, "key-1", {"session_id": "s", "generation_id": "g3"})
    third = SessionWrite("s", (answer("g3"),), 3.0, 100, replace_answer=True, kept=kept)
    await store.create_generation(gen("g3"), session_write=third)
    assert await message_ids(sessions, "s") == ["q1", "msg_g3"]
    assert await sessions.recall(None, "key-1") == kept.response
    record = await sessions.get("s")
    assert (record.message_count, record.next_seq, record.last_activity_at) == (2, 3, 3.0)
    assert await sessions.generations("s") == [("g1", "completed"), ("g3", "queued")]

    # A write to a missing session is refused with its generation.
    lost = SessionWrite("nope", (answer("g4"),), 4.0, 100)
    with pytest.raises(SessionNotFound):
        await store.create_generation(gen("g4"), session_write=lost)
    with pytest.raises(GenerationNotFound):
        await store.get_generation("g4")


async def test_messages_alone_are_added_and_the_oldest_trimmed(backend: Backend) -> None:
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("s"))
    messages = tuple(NewMessage(f"m{i}", "user", f"message {i}") for i in range(12))
    await sessions.add_messages(SessionWrite("s", messages, 1.0, max_messages=10))
    assert await message_ids(sessions, "s") == [f"m{i}" for i in range(2, 12)]
    record = await sessions.get("s")
    assert (record.message_count, record.trimmed_messages, record.next_seq) == (10, 2, 12)
    write = SessionWrite("s", (answer("g1"),), 2.0, 10)
    await store.create_generation(generation("g1", "queued", session_id="s"), session_write=write)
    with pytest.raises(WriteRejected):  # not idle: g1 is queued
        await sessions.add_messages(SessionWrite("s", (), 3.0, 10, only_if_idle=True))
    assert await message_ids(sessions, "s") == [f"m{i}" for i in range(3, 12)] + ["msg_g1"]
    with pytest.raises(SessionNotFound):
        await sessions.add_messages(SessionWrite("missing", messages[:1], 4.0, 10))


async def test_messages_carry_their_content_or_their_generation_s_text_and_status(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("s"))
    write = SessionWrite("s", (NewMessage("q", "user", "quëstion 😀"), answer("g")), 2.5, 10)
    await store.create_generation(generation("g", session_id="s"), session_write=write)
    log = GenerationLog(store, "g", "g")
    log.add_text("ansWër ✓")
    log.add_event({"type": "status", "status": "completed"}, fields={"status": "completed"})
    with anyio.fail_after(WAIT):
        await log.flush()
    (question, reply) = await sessions.messages("s")
    assert (question.id, question.seq, question.role, question.content) == (
        "q",
        0,
        "user",
        "quëstion 😀",
    )
    assert (question.generation_id, question.generation_status, question.created_at) == (
        None,
        None,
        2.5,
    )
    assert (reply.id, reply.seq, reply.role, reply.content) == ("msg_g", 1, "assistant", "ansWër ✓")
    assert (reply.generation_id, reply.generation_status) == ("g", "completed")
    assert await sessions.messages("missing") == []


async def test_a_write_that_neither_replaces_nor_adds_leaves_the_session_untouched(
    backend: Backend,
) -> None:
    sessions = backend.sessions
    await sessions.create(session("s"))
    await sessions.add_messages(SessionWrite("s", (NewMessage("q", "user", "hi"),), 2.0, 10))
    before = await sessions.get("s")
    nothing = SessionWrite("s", (), 5.0, 10, replace_answer=True)  # the last is no answer
    await sessions.add_messages(nothing)
    assert await sessions.get("s") == before
    assert await sessions.idle(before=3.0) == ["s"]


async def test_a_session_record_round_trips_and_a_missing_one_raises(backend: Backend) -> None:
    sessions = backend.sessions
    full = SessionRecord(
        id="ses_full",
        owner="alice",
        title="Tïtle 😀",
        status="paused",
        on_closed="new",
        on_busy="queue",
        created_at=1712345678.1234567,
        updated_at=1712345679.7654321,
        last_activity_at=1712345680.0000001,
        context={"k": ["v", 1, {"n": None}], "é": "ü", "f": 1.5},
        keep_open=True,
        close_on_complete=True,
        closed_reason="because",
        closed_at=1712345681.5,
        previous_session_id="ses_before",
        message_count=0,
        trimmed_messages=3,
        next_seq=7,
    )
    await sessions.create(full)
    assert await sessions.get("ses_full") == full
    assert (await sessions.list_for("alice"))[0].session == full
    with pytest.raises(StoreError):  # the id is taken
        await sessions.create(dataclasses.replace(full, title="other"))
    assert await sessions.get("ses_full") == full
    with pytest.raises(SessionNotFound):
        await sessions.get("missing")
    with pytest.raises(SessionNotFound):
        await sessions.update("missing", {"title": "x"})
    with pytest.raises(SessionNotFound):
        await sessions.delete("missing")


async def test_create_refuses_an_owner_past_max_open_sessions(backend: Backend) -> None:
    sessions = backend.sessions
    await sessions.create(session("a1", "alice"), max_open=2)
    await sessions.create(session("a2", "alice", status="paused"), max_open=2)
    with pytest.raises(WriteRejected) as refused:
        await sessions.create(session("a3", "alice"), max_open=2)
    assert refused.value.reason == "open_sessions"
    with pytest.raises(SessionNotFound):
        await sessions.get("a3")
    await sessions.create(session("b1", "bob"), max_open=1)  # another owner's count
    await sessions.create(session("n1"), max_open=1)  # and no owner's
    with pytest.raises(WriteRejected):
        await sessions.create(session("n2"), max_open=1)
    await sessions.update("a1", {"status": "closed", "closed_at": 2.0})  # closed: not counted
    await sessions.create(session("a3", "alice"), max_open=2)
    await sessions.create(session("a4", "alice"))  # no limit asked for


async def test_create_if_absent_creates_once_and_checks_max_open_only_when_creating(
    backend: Backend,
) -> None:
    sessions = backend.sessions
    assert await sessions.create_if_absent(session("s", "alice", title="first"))
    assert not await sessions.create_if_absent(session("s", "alice", title="second"))
    assert (await sessions.get("s")).title == "first"
    assert not await sessions.create_if_absent(session("s", "alice"), max_open=1)  # exists
    with pytest.raises(WriteRejected) as refused:
        await sessions.create_if_absent(session("t", "alice"), max_open=1)
    assert refused.value.reason == "open_sessions"
    with pytest.raises(SessionNotFound):
        await sessions.get("t")
    results: list[bool] = []

    async def create() -> None:
        results.append(await sessions.create_if_absent(session("raced", "alice")))

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(create)
    assert sorted(results) == [False] * 9 + [True]


async def test_update_sets_fields_closes_and_reopens_within_max_open(backend: Backend) -> None:
    sessions = backend.sessions
    await sessions.create(session("a1", "alice"))
    await sessions.create(session("a2", "alice"))
    changes: dict[str, Any] = {
        "title": "Nëw",
        "context": {"x": [1, 2], "y": "ÿ"},
        "status": "closed",
        "closed_reason": "idle",
        "closed_at": 5.25,
        "updated_at": 5.25,
    }
    await sessions.update("a1", changes)
    assert await sessions.get("a1") == dataclasses.replace(session("a1", "alice"), **changes)
    assert await sessions.closed_before(10.0) == ["a1"]
    await sessions.create(session("a3", "alice"))
    reopen: dict[str, Any] = {"status": "active", "closed_at": None, "closed_reason": None}
    with pytest.raises(WriteRejected) as refused:
        await sessions.update("a1", reopen, max_open=2)  # a2 and a3 are open
    assert refused.value.reason == "open_sessions"
    assert (await sessions.get("a1")).status == "closed"
    await sessions.update("a2", {"status": "closed", "closed_at": 6.0})
    await sessions.update("a1", reopen, max_open=2)
    assert (await sessions.get("a1")).status == "active"
    assert await sessions.closed_before(10.0) == ["a2"]
    await sessions.update("a1", {"title": "again"}, max_open=2)  # itself is not counted
    await sessions.update("a3", {"owner": "bob"})  # it moves to bob's lists and counts
    assert await summary_ids(sessions, "bob") == ["a3"]
    assert sorted(await summary_ids(sessions, "alice")) == ["a1", "a2"]
    await sessions.create(session("a5", "alice"), max_open=2)
    for bad in ({"id": "x"}, {"no_such_field": 1}, {}):
        with pytest.raises(ValueError):
            await sessions.update("a1", bad)


async def test_list_for_is_newest_activity_first_with_each_session_s_latest_generation(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("a", "alice", at=1.0))
    await sessions.create(session("b", "alice", at=3.0))
    await sessions.create(session("c", "alice", at=2.0))
    await sessions.create(session("d", "alice", at=4.0, status="closed", closed_at=4.0))
    await sessions.create(session("e", "bob", at=9.0))
    await sessions.create(session("n", None, at=9.0))
    assert await summary_ids(sessions, "alice") == ["d", "b", "c", "a"]
    assert await summary_ids(sessions, "alice", status="active") == ["b", "c", "a"]
    assert await summary_ids(sessions, "alice", status="closed") == ["d"]
    assert await summary_ids(sessions, "alice", limit=2) == ["d", "b"]
    assert await summary_ids(sessions, "alice", status="active", limit=1) == ["b"]
    assert await summary_ids(sessions, None) == ["n"]
    assert await summary_ids(sessions, "nobody") == []

    await store.create_generation(generation("g_old", "completed", session_id="b", created_at=10.0))
    await store.create_generation(generation("g_new", "running", session_id="b", created_at=11.0))
    listed = {s.session.id: s for s in await sessions.list_for("alice")}
    assert (listed["b"].latest_generation_id, listed["b"].latest_generation_status) == (
        "g_new",
        "running",
    )
    assert (listed["a"].latest_generation_id, listed["a"].latest_generation_status) == (None, None)
    assert listed["b"].session == await sessions.get("b")

    await sessions.update("a", {"last_activity_at": 5.0})
    assert await summary_ids(sessions, "alice") == ["a", "d", "b", "c"]
    await sessions.add_messages(SessionWrite("c", (NewMessage("m", "user", "hi"),), 6.0, 10))
    assert await summary_ids(sessions, "alice") == ["c", "a", "d", "b"]


async def test_list_for_breaks_ties_of_activity_by_session_id(backend: Backend) -> None:
    sessions = backend.sessions
    for sid in ("b", "a", "d", "c"):
        await sessions.create(session(sid, "alice", at=5.0))
    await sessions.create(session("newer", "alice", at=6.0))
    assert await summary_ids(sessions, "alice") == ["newer", "a", "b", "c", "d"]
    assert await summary_ids(sessions, "alice", limit=3) == ["newer", "a", "b"]


async def test_a_session_s_generations_created_at_the_same_time_keep_their_creation_order(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("s", "alice"))
    state = {"conversation_id": "c"}
    for gid in ("g_second_name", "g_first_name"):  # created in this order, at the same time
        record = generation(
            gid, "completed", provider="dify", provider_state=state, session_id="s", created_at=7.0
        )
        await store.create_generation(record)
    assert await sessions.generations("s") == [
        ("g_second_name", "completed"),
        ("g_first_name", "completed"),
    ]
    (summary,) = await sessions.list_for("alice")
    assert summary.latest_generation_id == "g_first_name"  # the last created
    assert await sessions.provider_state("s", "dify") == ("g_first_name", state)


async def test_idle_lists_open_sessions_inactive_since_before_but_not_kept_or_closed_ones(
    backend: Backend,
) -> None:
    sessions = backend.sessions
    await sessions.create(session("x", at=1.0))
    await sessions.create(session("y", "alice", at=2.0, status="paused"))
    await sessions.create(session("kept", at=1.0, keep_open=True))
    await sessions.create(session("shut", at=1.0, status="closed", closed_at=1.0))
    await sessions.create(session("busy", at=10.0))
    assert await sessions.idle(before=5.0) == ["x", "y"]
    assert await sessions.idle(before=5.0, limit=1) == ["x"]
    assert await sessions.idle(before=1.0) == []  # strictly before
    assert await sessions.idle(before=100.0) == ["x", "y", "busy"]
    await sessions.update("x", {"last_activity_at": 7.0})
    await sessions.update("y", {"keep_open": True})
    assert await sessions.idle(before=8.0) == ["x"]


async def test_closed_before_lists_sessions_closed_before_a_time(backend: Backend) -> None:
    sessions = backend.sessions
    await sessions.create(session("c1", at=1.0, status="closed", closed_at=3.0))
    await sessions.create(session("c2", "alice", at=1.0, status="closed", closed_at=7.0))
    await sessions.create(session("open", at=1.0))
    assert await sessions.closed_before(5.0) == ["c1"]
    assert await sessions.closed_before(10.0) == ["c1", "c2"]
    assert await sessions.closed_before(10.0, limit=1) == ["c1"]
    assert await sessions.closed_before(3.0) == []  # strictly before
    await sessions.update("c1", {"status": "active", "closed_at": None})
    assert await sessions.closed_before(10.0) == ["c2"]
    await sessions.update("open", {"status": "closed", "closed_at": 8.0})
    assert await sessions.closed_before(10.0) == ["c2", "open"]


async def test_recall_returns_the_response_kept_for_an_owner_s_key(backend: Backend) -> None:
    sessions = backend.sessions
    await sessions.create(session("s", "alice"))
    kept = KeptResponse("alice", "key-1", {"session_id": "s", "nested": {"ü": [1, None]}})
    await sessions.add_messages(SessionWrite("s", (), 1.0, 10, kept=kept))
    anonymous = KeptResponse(None, "key-2", {"anonymous": True})
    await sessions.add_messages(SessionWrite("s", (), 2.0, 10, kept=anonymous))
    assert await sessions.recall("alice", "key-1") == kept.response
    assert await sessions.recall(None, "key-2") == anonymous.response
    assert await sessions.recall("bob", "key-1") is None
    assert await sessions.recall(None, "key-1") is None
    assert await sessions.recall("alice", "key-2") is None
    assert await sessions.recall("alice", "key-3") is None


async def test_deleting_an_owner_s_empty_generation_stream_or_its_session_works(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("s", "alice"))
    await store.create_generation(generation("alone", owner="alice"))
    await store.create_generation(generation("in_session", owner="alice", session_id="s"))
    await store.delete_stream("alone")
    with pytest.raises(StreamNotFound):
        await store.stream_length("alone")
    await sessions.delete("s")
    with pytest.raises(GenerationNotFound):
        await store.get_generation("in_session")
    with pytest.raises(StreamNotFound):
        await store.stream_length("in_session")
    assert await store.stored_bytes("alice") == 0


async def test_a_key_already_kept_refuses_the_write_that_would_keep_it_again(
    backend: Backend,
) -> None:
    """Two requests with one idempotency key, racing (in two processes or nodes): the one
    whose write lands second is refused whole, so the key's first response stands and
    nothing of the second request is written."""
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("s", "alice"))
    first = KeptResponse("alice", "key", {"generation_id": "g1"})
    write = SessionWrite("s", (NewMessage("q1", "user", "hi"), answer("g1")), 1.0, 10, kept=first)
    await store.create_generation(generation("g1", session_id="s"), session_write=write)
    again = KeptResponse("alice", "key", {"generation_id": "g2"})
    write = SessionWrite("s", (NewMessage("q2", "user", "hi"), answer("g2")), 2.0, 10, kept=again)
    with pytest.raises(StoreError):
        await store.create_generation(generation("g2", session_id="s"), session_write=write)
    with pytest.raises(GenerationNotFound):
        await store.get_generation("g2")
    with pytest.raises(StoreError):
        await sessions.add_messages(
            SessionWrite("s", (NewMessage("q3", "user", "hi"),), 3.0, 10, kept=again)
        )
    assert await sessions.recall("alice", "key") == first.response
    assert await message_ids(sessions, "s") == ["q1", "msg_g1"]
    assert (await sessions.get("s")).last_activity_at == 1.0


async def test_delete_removes_a_session_its_messages_generations_keys_and_their_streams(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions
    for sid in ("s", "other"):
        await sessions.create(session(sid, "alice"))
    kept = KeptResponse("alice", "key", {"ok": 1})
    for gid, sid in (("g1", "s"), ("g2", "s"), ("g_other", "other")):
        write = SessionWrite(sid, (NewMessage(f"q_{gid}", "user", "hi"), answer(gid)), 1.0, 10)
        if gid == "g1":
            write = dataclasses.replace(write, kept=kept)
        record = generation(gid, "completed", session_id=sid, owner="alice")
        await store.create_generation(record, session_write=write)
        await store.append(gid, [b"event of " + gid.encode()], close=True)
    other_bytes = len(b"{}") + len(b"hi") + len(b"event of g_other")  # context, question, stream
    await sessions.delete("s")
    with pytest.raises(SessionNotFound):
        await sessions.get("s")
    assert await sessions.messages("s") == []
    assert await sessions.generations("s") == []
    for gid in ("g1", "g2"):
        with pytest.raises(GenerationNotFound):
            await store.get_generation(gid)
        with pytest.raises(StreamNotFound):
            await store.read(gid, 0)
    assert await sessions.recall("alice", "key") is None
    assert await summary_ids(sessions, "alice") == ["other"]
    assert [g.id for g in await store.list_generations()] == ["g_other"]
    assert await store.stored_bytes("alice") == other_bytes
    assert await message_ids(sessions, "other") == ["q_g_other", "msg_g_other"]
    assert await read_all(store, "g_other") == [b"event of g_other"]
    with pytest.raises(SessionNotFound):
        await sessions.delete("s")


async def test_deleting_a_session_wakes_the_readers_of_its_generations_streams(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("s"))
    await store.create_generation(generation("g", session_id="s"))
    await store.append("g", [b"delta"])
    await settle(backend)
    woken = store.change_event("g")
    assert (await store.read("g", 1)).messages == []
    await sessions.delete("s")
    with anyio.fail_after(WAIT):
        await woken.wait()
    with pytest.raises(StreamNotFound):
        await store.read("g", 1)


async def test_provider_state_is_the_newest_ended_generation_s_on_that_provider(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions
    await sessions.create(session("s"))
    rows: list[tuple[str, GenerationStatus, str, dict[str, str] | None, float]] = [
        ("g1", "completed", "dify", {"conversation_id": "c1"}, 1.0),
        ("g2", "interrupted", "dify", {"conversation_id": "c2"}, 2.0),
        ("g3", "running", "dify", {"conversation_id": "c3"}, 3.0),  # not ended
        ("g4", "completed", "openai", {"response_id": "r4"}, 4.0),
        ("g5", "failed", "dify", None, 5.0),  # kept none
    ]
    for gid, status, provider, state, at in rows:
        record = generation(
            gid, status, provider=provider, provider_state=state, session_id="s", created_at=at
        )
        await store.create_generation(record)
    assert await sessions.provider_state("s", "dify") == ("g2", {"conversation_id": "c2"})
    assert await sessions.provider_state("s", "openai") == ("g4", {"response_id": "r4"})
    assert await sessions.provider_state("s", "simulated") is None
    assert await sessions.provider_state("missing", "dify") is None
    await store.update_generation("g3", {"status": "completed"})
    assert await sessions.provider_state("s", "dify") == ("g3", {"conversation_id": "c3"})


OWNER_TITLE = "Tïtle 😀"
OWNER_MESSAGES = ("héllo 😀", "plain", "日本語")
OWNER_EVENTS = (b'{"type":"delta","text":"\xc3\xa9"}', b"\xff\x00raw")
OWNER_FINAL = b'{"type":"status","status":"completed"}'
OWNER_STREAM_BYTES = sum(map(len, OWNER_EVENTS)) + len(OWNER_FINAL)


async def write_owner_data(backend: Backend, context: dict[str, Any]) -> int:
    """Alice's session (``context``, a title) with messages and an answer, and its
    generation's stream; and the same for bob, which must not count. Returns the bytes
    alice stores, computed from what was written."""
    store, sessions = backend.store, backend.sessions
    for owner in ("alice", "bob"):
        sid, gid = f"s_{owner}", f"g_{owner}"
        await sessions.create(session(sid, owner, title=OWNER_TITLE, context=context))
        messages = tuple(NewMessage(f"{sid}_{i}", "user", c) for i, c in enumerate(OWNER_MESSAGES))
        await sessions.add_messages(SessionWrite(sid, messages, 1.0, 100))
        write = SessionWrite(sid, (answer(gid),), 2.0, 100)
        record = generation(gid, session_id=sid, owner=owner)
        await store.create_generation(record, session_write=write)
        await store.append(gid, list(OWNER_EVENTS))
        final = {"status": "completed"}
        assert await store.finish_generation(gid, OWNER_FINAL, final, only_if=ACTIVE)
    return (
        OWNER_STREAM_BYTES
        + len(json.dumps(context).encode())
        + len(OWNER_TITLE.encode())
        + sum(len(c.encode()) for c in OWNER_MESSAGES)
    )


async def test_stored_bytes_grow_with_an_owner_s_streams_titles_and_messages(
    backend: Backend,
) -> None:
    store, sessions = backend.store, backend.sessions
    assert await store.stored_bytes("alice") == 0
    expected = await write_owner_data(backend, {})
    assert await store.stored_bytes("alice") == expected
    # Trimming drops the oldest message's bytes; an answer holds none of its own.
    more = (NewMessage("extra", "user", "ëxtra"),)
    await sessions.add_messages(SessionWrite("s_alice", more, 3.0, max_messages=4))
    expected += len("ëxtra".encode()) - len("héllo 😀".encode())
    assert await store.stored_bytes("alice") == expected
    await store.delete_stream("g_alice")
    assert await store.stored_bytes("alice") == expected - OWNER_STREAM_BYTES
    assert await store.stored_bytes("nobody") == 0


async def test_stored_bytes_count_a_session_s_context_as_the_same_bytes_on_every_backend(
    backend: Backend,
) -> None:
    context = {"a": 1, "é": ["x", "ÿ", None], "nested": {"k": 2.5}}
    expected = await write_owner_data(backend, context)
    assert await backend.store.stored_bytes("alice") == expected
    await backend.sessions.update("s_alice", {"context": {"b": [1, 2]}})
    expected += len(json.dumps({"b": [1, 2]})) - len(json.dumps(context))
    assert await backend.store.stored_bytes("alice") == expected


# -- durability ------------------------------------------------------------------------------------


async def capture(store: StoreBackend) -> dict[str, Any]:
    """Everything ``test_everything_reads_back…`` wrote, as read from ``store``."""
    sessions = sessions_of(store)
    reads: dict[str, ReadResult] = {}
    for sid in ("open", "closed", "gen_full"):
        reads[sid] = await store.read(sid, 0)
    return {
        "reads": reads,
        "lengths": {sid: await store.stream_length(sid) for sid in reads},
        "generation": await store.get_generation("gen_full"),
        "snapshot_length": await store.snapshot_length("gen_full"),
        "generations": await store.list_generations(),
        "active": await store.active_generations(ACTIVE),
        "workers": sorted(await store.list_workers(), key=lambda w: w.id),
        "session": await sessions.get("ses_1"),
        "messages": await sessions.messages("ses_1"),
        "summaries": await sessions.list_for("alice"),
        "recall": await sessions.recall("alice", "key"),
        "idle": await sessions.idle(before=1e12),
        "stored_bytes": await store.stored_bytes("alice"),
    }


async def test_everything_reads_back_identically_after_a_restart(backend: Backend) -> None:
    async with backend.reopen() as store:
        sessions = sessions_of(store)
        await new_stream(store, "open", [b"a", b"\xff\xfe"])
        await new_stream(store, "closed", [b"x", "ÿ".encode()], close=True)
        await sessions.create(session("ses_1", "alice", title="T", context={"k": "v"}))
        kept = KeptResponse("alice", "key", {"generation_id": "gen_full"})
        write = SessionWrite(
            "ses_1", (NewMessage("q", "user", "quëstion"), answer("gen_full")), 3.0, 10, kept=kept
        )
        record = dataclasses.replace(
            FULL_RECORD, stream_id="gen_full", text="", cancel_requested=False
        )
        await store.create_generation(record, session_write=write)
        log = GenerationLog(store, "gen_full", "gen_full")
        log.add_event({"type": "status", "status": "running"}, fields={"status": "running"})
        log.add_text("ansWër 😀")
        with anyio.fail_after(WAIT):
            await log.flush()
        await store.register_worker(WorkerRecord("wrk_1", "host", 7, 1.5, 2.5))
        before = await capture(store)
    assert before["generation"].text == "ansWër 😀"
    async with backend.reopen() as reopened:
        assert await capture(reopened) == before
        assert await reopened.append("open", [b"next"]) == AppendResult(2, 3)
        with pytest.raises(StreamClosed):
            await reopened.append("closed", [b"more"])
