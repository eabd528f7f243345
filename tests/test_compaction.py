"""Closed streams compacted into compressed blocks: every read gives the same messages as
before, from any offset and in any state of the compaction, and the bytes shrink."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from store import CreateRequest, StreamStore
from store import _blocks as blocks
from store._queries import read_messages, stream_length
from store._schema import connect
from web._durable_streams import DurableStreams

TIMEOUT = 10.0


def deltas(count: int) -> list[bytes]:
    """Generation-like messages of varied sizes (some far above a block's share)."""
    return [
        f'{{"type":"delta","text":"token {i} {"x" * (i % 97)}{"é" * (i % 5)}"}}'.encode()
        for i in range(count)
    ]


def rows_and_blocks(path: str, stream_id: str) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM messages WHERE stream_id = ?", (stream_id,)
        ).fetchone()
        (count,) = conn.execute(
            "SELECT count(*) FROM message_blocks WHERE stream_id = ?", (stream_id,)
        ).fetchone()
    return rows, count


async def compacted(path: str, stream_id: str) -> int:
    """Wait until a stream has no message rows left; its number of blocks."""
    with anyio.fail_after(TIMEOUT):
        while True:
            rows, count = rows_and_blocks(path, stream_id)
            if rows == 0 and count > 0:
                return count
            await anyio.sleep(0.02)


def offsets_to_try(total: int, block_starts: list[int]) -> list[int]:
    """Every block boundary and its neighbours, the ends, and past the end."""
    chosen = {0, 1, total - 1, total, total + 3}
    for start in block_starts:
        chosen.update((start - 1, start, start + 1))
    return sorted(o for o in chosen if o >= 0)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StreamStore]:
    # No in-memory tails: every read below comes from the database.
    async with StreamStore(str(tmp_path / "s.db"), tail_cache_bytes=0) as opened:
        yield opened


def test_blocks_pack_and_unpack_any_bytes_and_split_by_size() -> None:
    messages = [b"", b"\x00\xff binary", "ünï 🙂".encode(), b"x" * 100_000, b"y"]
    assert blocks.unpack(blocks.pack(messages), len(messages)) == messages
    rows = [(i, b"z" * 1000) for i in range(200)]
    runs = list(blocks.runs(iter(rows)))
    assert [first for first, _ in runs] == [0, 65, 130, 195]  # 65 x 1000 B fit in 64 KiB
    assert [m for _, run in runs for m in run] == [data for _, data in rows]
    many = [(i, b"") for i in range(blocks.BLOCK_MESSAGES + 1)]
    assert [len(run) for _, run in blocks.runs(iter(many))] == [blocks.BLOCK_MESSAGES, 1]


async def test_a_closed_stream_is_compacted_and_reads_the_same_from_any_offset(
    store: StreamStore,
) -> None:
    messages = deltas(6000)
    await store.create_stream("s")
    for at in range(0, len(messages), 500):
        await store.append("s", messages[at : at + 500])
    await store.close_stream("s")

    count = await compacted(store.path, "s")
    assert count > 3
    with contextlib.closing(sqlite3.connect(store.path)) as conn:
        starts = [s for (s,) in conn.execute("SELECT first_offset FROM message_blocks")]
        (packed,) = conn.execute("SELECT sum(length(data)) FROM message_blocks").fetchone()
    assert packed < sum(map(len, messages)) / 4, "JSON deltas compress well"
    assert store.stats["messages_compacted"] == len(messages)

    assert await store.stream_length("s") == (len(messages), True)
    for offset in offsets_to_try(len(messages), starts):
        for limit in (1, 7, 10_000):
            got = await store.read("s", offset, limit=limit, from_disk=True)
            expected = messages[offset : offset + limit]
            assert got.messages == expected, (offset, limit)
            assert got.at_end == (offset + limit >= len(messages)), (offset, limit)
        capped = await store.read("s", offset, limit=10_000, max_bytes=3000, from_disk=True)
        assert capped.messages == messages[offset : offset + len(capped.messages)]
        assert offset >= len(messages) or 0 < sum(map(len, capped.messages)) <= 3000

    await store.delete_stream("s")
    assert rows_and_blocks(store.path, "s") == (0, 0)


async def test_a_half_compacted_stream_reads_whole_and_a_restart_finishes_it(
    tmp_path: Path,
) -> None:
    """A stream closed by a process that died before compacting it (or part way, one
    transaction at a time) reads the same, and the next start compacts the rest."""
    path = str(tmp_path / "s.db")
    messages = deltas(5000)
    async with StreamStore(path) as store:
        await store.create_stream("s")
        await store.append("s", messages)  # left open: not compacted
    with contextlib.closing(connect(path)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE streams SET closed = 1 WHERE id = 's'")
        moved, done = blocks.compact(conn, "s", max_blocks=2)
        conn.execute("COMMIT")
        assert 0 < moved < len(messages) and not done
        (split,) = conn.execute("SELECT min(offset) FROM messages WHERE stream_id = 's'").fetchone()
        assert split == moved
        assert stream_length(conn, "s") == (len(messages), True)
        for offset in (0, 1, moved - 1, moved, moved + 1, len(messages) - 1, len(messages)):
            for limit in (1, 2, 10_000):
                got = read_messages(conn, "s", offset, limit)
                assert got.messages == messages[offset : offset + limit], (offset, limit)
                assert got.at_end == (offset + limit >= len(messages))

    async with StreamStore(path, tail_cache_bytes=0) as store:
        await compacted(path, "s")
        assert (await store.read("s", 0, limit=10_000)).messages == messages


async def test_a_fork_cuts_a_message_of_a_compacted_source(store: StreamStore) -> None:
    streams = DurableStreams(store)
    source = [b"first", bytes(range(256))]
    created, info = await streams.create(
        None, "src", CreateRequest(content_type="application/octet-stream", payloads=source)
    )
    assert created
    await streams.append(None, "src", content_type=None, payload=None, close=True)
    await compacted(store.path, info.stream_id)
    request = CreateRequest(
        content_type="application/octet-stream",
        forked_from="src",
        fork_offset=1,
        fork_sub_offset=10,
    )
    _, fork = await streams.create(None, "fork", request)
    chunk = await streams.read(fork, 0, limit=100, max_bytes=1 << 20)
    assert chunk.messages == [source[0], source[1][:10]]


async def test_reads_and_appends_stay_exact_while_streams_are_being_compacted(
    store: StreamStore,
) -> None:
    """Twenty closed streams are compacted while another one is appended to and all are
    read from the database over and over: every read, whatever the compaction has reached,
    gives exactly the messages at its offsets."""
    messages = deltas(3000)
    for i in range(20):
        await store.create_stream(f"done-{i}")
        await store.append(f"done-{i}", messages)
    await store.create_stream("live")
    for i in range(20):
        await store.close_stream(f"done-{i}")
    reads = 0

    async def read_while_compacting() -> None:
        nonlocal reads
        while any(rows_and_blocks(store.path, f"done-{i}")[0] for i in range(20)):
            for i in range(20):
                offset = (reads * 997) % len(messages)
                got = await store.read(f"done-{i}", offset, limit=700, from_disk=True)
                assert got.messages == messages[offset : offset + 700]
                reads += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_while_compacting)
        for i in range(200):
            await store.append("live", [b"%d" % i])
    with anyio.fail_after(TIMEOUT):
        for i in range(20):
            await compacted(store.path, f"done-{i}")
    assert reads > 0
    live = await store.read("live", 0, limit=1000, from_disk=True)
    assert live.messages == [b"%d" % i for i in range(200)]
