"""The store on its own: offsets, publish-after-commit, reads, other connections."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import streaming._log
from store import (
    AppendBatch,
    AppendResult,
    GenerationNotFound,
    GenerationRecord,
    StoreError,
    StreamClosed,
    StreamExists,
    StreamNotFound,
    StreamStore,
)
from streaming import GenerationLog, decode_event


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StreamStore]:
    async with StreamStore(str(tmp_path / "s.db"), flush_interval=0.005) as opened:
        yield opened


async def test_offsets_are_message_indexes_and_reads_resume_anywhere(store: StreamStore) -> None:
    await store.create_stream("s")
    assert await store.append("s", [b"a", b"b"]) == AppendResult(0, 2)
    assert await store.append("s", [b"c"], close=True) == AppendResult(2, 3)
    for offset in range(4):
        result = await store.read("s", offset)
        assert result.messages == [b"a", b"b", b"c"][offset:]
        assert result.at_end
    assert await store.stream_length("s") == (3, True)
    with pytest.raises(StreamClosed):
        await store.append("s", [b"d"])


async def test_errors_are_typed(store: StreamStore) -> None:
    await store.create_stream("s")
    with pytest.raises(StreamExists):
        await store.create_stream("s")
    with pytest.raises(StreamNotFound):
        await store.append("missing", [b"x"])
    with pytest.raises(StreamNotFound):
        await store.read("missing", 0)
    with pytest.raises(ValueError):
        await store.read("s", -1)
    # A failed op does not take its neighbours in the same transaction down.
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.append, "s", [b"ok"])
        with pytest.raises(StoreError):
            await store.append("missing", [b"x"])
    assert (await store.read("s", 0)).messages == [b"ok"]


async def test_readers_are_woken_only_after_the_commit(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    async with StreamStore(path, flush_interval=0.05) as store:
        await store.create_stream("s")
        woken = store.change_event("s")
        append = anyio.Event()

        async def writer() -> None:
            await store.append("s", [b"x"])
            append.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            with anyio.fail_after(5):
                await woken.wait()
            # At the moment readers are woken, the row is in the file for anyone to see.
            conn = sqlite3.connect(path)
            rows = conn.execute("SELECT data FROM messages WHERE stream_id = 's'").fetchall()
            conn.close()
            assert rows == [(b"x",)]


async def test_concurrent_appends_get_strictly_increasing_offsets_in_few_commits(
    store: StreamStore,
) -> None:
    await store.create_stream("s")
    results: list[AppendResult] = []

    async def one(i: int) -> None:
        results.append(await store.append("s", [str(i).encode()]))

    commits = store.stats["commits"]
    async with anyio.create_task_group() as tg:
        for i in range(500):
            tg.start_soon(one, i)
    assert sorted(r.first_offset for r in results) == list(range(500))
    assert store.stats["commits"] - commits < 100  # group commit
    messages = (await store.read("s", 0)).messages
    by_offset = {r.first_offset: r for r in results}
    assert len(messages) == 500 and len(by_offset) == 500


async def test_old_offsets_are_read_from_sqlite_once_the_tail_is_trimmed(tmp_path: Path) -> None:
    async with StreamStore(str(tmp_path / "s.db"), tail_messages=16) as store:
        await store.create_stream("s")
        for i in range(10):
            await store.append("s", [b"%d-%d" % (i, j) for j in range(10)])
        everything = [b"%d-%d" % (i, j) for i in range(10) for j in range(10)]
        for offset in (0, 1, 50, 83, 99, 100):
            assert (await store.read("s", offset)).messages == everything[offset:]
        assert (await store.read("s", 5, limit=3)).messages == everything[5:8]


async def test_another_connection_commits_wake_readers(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    async with StreamStore(path) as reader_side, StreamStore(path) as writer_side:
        await writer_side.create_stream("s")
        woken = reader_side.change_event("s")  # not a stream this store writes
        await writer_side.append("s", [b"from the other process"])
        with anyio.fail_after(5):
            await woken.wait()
        assert (await reader_side.read("s", 0)).messages == [b"from the other process"]


async def test_generation_snapshot_moves_with_its_messages(store: StreamStore) -> None:
    record = GenerationRecord("g", "g", "running", "simulated", created_at=1.0)
    await store.create_generation(record)

    class Source:
        stream_id = "g"

        def __init__(self) -> None:
            self.batches = [
                AppendBatch([b"d1", b"d2"], "g", "hello ", {"status": "running"}),
                AppendBatch([b"end"], "g", "world", {"status": "completed"}, close=True),
            ]
            self.results: list[AppendResult] = []
            self.done = anyio.Event()

        def take(self) -> AppendBatch | None:
            self.last = self.batches.pop(0) if self.batches else None
            return self.last

        def untake(self) -> None:
            if self.last is not None:
                self.batches.insert(0, self.last)

        def committed(self, result: AppendResult) -> None:
            self.results.append(result)
            self.done.set()

        def failed(self, error: StoreError) -> None:
            raise AssertionError(error)

    source = Source()
    store.mark_dirty(source)
    with anyio.fail_after(5):
        await source.done.wait()
    snapshot = await store.get_generation("g")
    assert (snapshot.text, snapshot.next_offset, snapshot.status) == ("hello ", 2, "running")
    source.done = anyio.Event()
    store.mark_dirty(source)
    with anyio.fail_after(5):
        await source.done.wait()
    snapshot = await store.get_generation("g")
    assert (snapshot.text, snapshot.next_offset, snapshot.status) == ("hello world", 3, "completed")
    assert (await store.read("g", 0)).at_end


async def test_finish_generation_is_guarded_by_status(store: StreamStore) -> None:
    await store.create_generation(GenerationRecord("g", "g", "running", "simulated"))
    assert await store.finish_generation(
        "g", b"end", {"status": "interrupted"}, only_if=["queued", "running"]
    )
    assert not await store.finish_generation(
        "g", b"end", {"status": "interrupted"}, only_if=["queued", "running"]
    )
    assert (await store.read("g", 0)).messages == [b"end"]
    assert (await store.get_generation("g")).next_offset == 1


async def test_data_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    async with StreamStore(path) as store:
        await store.create_stream("s")
        await store.append("s", [b"kept"])
    async with StreamStore(path) as store:
        assert (await store.read("s", 0)).messages == [b"kept"]
        assert await store.append("s", [b"next"]) == AppendResult(1, 2)


async def test_a_busy_source_is_taken_at_most_once_per_coalesce_window(tmp_path: Path) -> None:
    async with StreamStore(
        str(tmp_path / "c.db"), flush_interval=0.002, coalesce_window=0.05
    ) as store:
        await store.create_stream("s")

        class Source:
            stream_id = "s"
            takes = 0

            def take(self) -> AppendBatch | None:
                self.takes += 1
                return AppendBatch([b"x"])

            def untake(self) -> None:
                self.takes -= 1

            def committed(self, result: AppendResult) -> None:
                pass

            def failed(self, error: StoreError) -> None:
                raise AssertionError(error)

        source = Source()
        start = anyio.current_time()
        while anyio.current_time() - start < 0.5:
            store.mark_dirty(source)  # as a generation does on every token
            await anyio.sleep(0.001)
        elapsed = anyio.current_time() - start
        # One take per 50 ms window (plus the first), not one per 2 ms commit.
        assert 3 <= source.takes <= elapsed / 0.05 + 2


async def test_a_busy_writer_still_notices_another_process_commits(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    async with StreamStore(path) as busy, StreamStore(path) as other:
        await busy.create_stream("mine")
        await other.create_stream("theirs")
        stop = anyio.Event()

        async def keep_busy() -> None:
            while not stop.is_set():
                await busy.append("mine", [b"tick"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_busy)
            woken = busy.change_event("theirs")
            await other.append("theirs", [b"hello"])
            with anyio.fail_after(5):
                await woken.wait()
            stop.set()
        assert (await busy.read("theirs", 0)).messages == [b"hello"]


async def test_a_cancel_request_never_touches_a_finished_generation(store: StreamStore) -> None:
    await store.create_generation(GenerationRecord("live", "live", "running", "simulated"))
    await store.create_generation(GenerationRecord("done", "done", "completed", "simulated"))
    assert await store.request_cancel("live", only_if=["queued", "running"])
    assert not await store.request_cancel("done", only_if=["queued", "running"])
    assert (await store.get_generation("live")).cancel_requested
    assert not (await store.get_generation("done")).cancel_requested
    with pytest.raises(GenerationNotFound):
        await store.request_cancel("missing", only_if=["running"])
    active = await store.active_generations(["queued", "running"])
    assert [(a.id, a.cancel_requested) for a in active] == [("live", True)]


async def test_payloads_are_stored_byte_for_byte_utf8_or_not(store: StreamStore) -> None:
    await store.create_stream("s")
    payloads = [
        '{"text":"café \\"q\\" 🙂 \\u00e9 \\n"}'.encode(),
        b"\xff\xfe not utf-8 \x00",
        "plain ünïcödé".encode(),
    ]
    async with anyio.create_task_group() as tg:  # one commit for all three
        for payload in payloads:
            tg.start_soon(store.append, "s", [payload])
    stored = (await store.read("s", 0)).messages
    assert sorted(stored) == sorted(payloads)
    conn = sqlite3.connect(store.path)
    rows = conn.execute("SELECT data FROM messages WHERE stream_id = 's'").fetchall()
    conn.close()
    assert sorted(data for (data,) in rows) == sorted(payloads)


async def test_many_generations_commit_together_on_the_fast_path(
    store: StreamStore, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming._log, "SNAPSHOT_INTERVAL", 0.0)  # a snapshot every commit
    for gid in ("a", "b", "c"):
        await store.create_generation(GenerationRecord(gid, gid, "running", "simulated"))
    logs = {gid: GenerationLog(store, gid, gid) for gid in ("a", "b", "c")}
    for round_ in range(3):  # each round appends to text that is already there
        for gid, log in logs.items():
            log.add_text(f"{gid}{round_} ")
        for log in logs.values():
            await log.flush()
    for gid in logs:
        assert (await store.get_generation(gid)).text == f"{gid}0 {gid}1 {gid}2 "
    assert "batch refused" not in caplog.text  # nothing fell back to the slow path


async def test_close_is_idempotent_and_delete_removes_the_stream(store: StreamStore) -> None:
    await store.create_stream("s")
    await store.append("s", [b"a"])
    woken = store.change_event("s")
    await store.close_stream("s")
    assert woken.is_set()  # followers learn of the close
    await store.close_stream("s")  # again: no-op
    assert await store.stream_length("s") == (1, True)
    assert (await store.read("s", 0)).at_end
    with pytest.raises(StreamClosed):
        await store.append("s", [b"b"])
    await store.delete_stream("s")
    for call in (store.read("s", 0), store.close_stream("s"), store.delete_stream("s")):
        with pytest.raises(StreamNotFound):
            await call


async def test_a_snapshot_lags_its_stream_but_always_matches_its_offset(
    store: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between updates (at most every SNAPSHOT_INTERVAL) a snapshot is behind its stream,
    never ahead; its text is exactly the deltas before its ``next_offset``; and the end
    brings it up to date."""
    monkeypatch.setattr(streaming._log, "SNAPSHOT_INTERVAL", 3600.0)
    await store.create_generation(GenerationRecord("g", "g", "running", "simulated"))
    log = GenerationLog(store, "g", "g")
    log.add_event({"type": "status", "status": "running"}, fields={"status": "running"})
    await log.flush()
    for word in ("one ", "two ", "three "):
        log.add_text(word)
        await log.flush()
    lagging = await store.get_generation("g")
    assert (lagging.text, lagging.next_offset) == ("", 1)  # the start's snapshot
    log.set_fields({"usage": {"tokens": 3}})  # any field change updates the text too
    log.add_text("four ")
    await log.flush()
    caught_up = await store.get_generation("g")
    events = [decode_event(m) for m in (await store.read("g", 0)).messages]
    assert caught_up.next_offset == len(events) == 5
    assert caught_up.text == "".join(e["text"] for e in events if e["type"] == "delta")
    log.add_text("five")
    log.add_event(
        {"type": "status", "status": "completed"}, fields={"status": "completed"}, close=True
    )
    await log.flush()
    ended = await store.get_generation("g")
    assert (ended.text, ended.next_offset) == ("one two three four five", 7)


async def test_a_paused_answer_s_snapshot_catches_up_by_itself(
    store: StreamStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that pauses (a tool call, a slow upstream) still has its snapshot brought up
    to date once SNAPSHOT_INTERVAL has passed, with no new text to carry it."""
    monkeypatch.setattr(streaming._log, "SNAPSHOT_INTERVAL", 0.2)
    await store.create_generation(GenerationRecord("g", "g", "running", "simulated"))
    log = GenerationLog(store, "g", "g")
    log.add_event({"type": "status", "status": "running"}, fields={"status": "running"})
    await log.flush()
    log.add_text("thinking")
    await log.flush()
    assert (await store.get_generation("g")).text == ""  # left behind, for now
    with anyio.fail_after(5):
        while (await store.get_generation("g")).text != "thinking":  # noqa: ASYNC110 - polled: the row is the thing observed
            await anyio.sleep(0.02)
    assert (await store.get_generation("g")).next_offset == 2


async def test_a_snapshot_s_length_is_counted_in_characters_without_loading_its_text(
    store: StreamStore,
) -> None:
    """Astral, combining and multi-byte characters count one each, as in Python, and a NUL
    (where SQLite's own count would stop) is counted too."""
    texts = {"plain": "abc", "wide": "é🙂e\u0301日本語", "nul": "a\x00b\x00🙂", "empty": ""}
    for name, text in texts.items():
        record = GenerationRecord(name, name, "completed", "simulated", text=text, next_offset=7)
        await store.create_generation(record)
    for name, text in texts.items():
        assert await store.snapshot_length(name) == (len(text), 7), name
    with pytest.raises(GenerationNotFound):
        await store.snapshot_length("missing")


async def test_a_write_someone_awaits_does_not_wait_out_the_group_commit_window(
    tmp_path: Path,
) -> None:
    """Deltas that pile up while a commit runs wait out ``flush_interval`` to be batched;
    an op submitted during that wait ends it (with a 5 s window, it would otherwise wait
    seconds)."""
    path = str(tmp_path / "s.db")
    async with StreamStore(path, flush_interval=5.0, coalesce_window=0.0) as store:
        logs = []
        for i in range(50):
            await store.create_generation(GenerationRecord(f"g{i}", f"g{i}", "running", "sim"))
            logs.append(GenerationLog(store, f"g{i}", f"g{i}"))

        async def feed() -> None:  # deltas all the time: some arrive during every commit
            for i in range(200):
                for log in logs:
                    log.add_text(f"{i} ")
                await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            await anyio.sleep(0.1)  # the writer is now waiting out its window
            started = anyio.current_time()
            await store.execute(lambda ctx: None)
            waited = anyio.current_time() - started
            tg.cancel_scope.cancel()
        assert waited < 2.5, waited
