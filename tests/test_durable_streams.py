"""Durable Streams writers at ``/v1/stream/{name}``: the behaviours where a bug would be subtle.

Concurrent idempotent producers and ``Stream-Seq`` writers: every append is stored exactly
once, in order, at the offset its answer named; stale epochs, gaps and regressions are
refused with the headers the protocol names. And JSON values that do not survive a naive
parse-and-dump.

One server per module; every test works as a user of its own, so stream names never clash.
Forks, soft delete and expiry are in ``test_durable_streams_forks.py``; SSE framing,
generations and the official client in ``test_durable_streams_live.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import AsyncExitStack

import anyio
import httpx
import pytest

from .backends import BACKENDS
from .durable_support import (
    JSON,
    append,
    as_user,
    create,
    module_server,
    offset,
    path,
    position,
    read_all,
    read_json,
    store_args,
)
from .support import Server


@pytest.fixture(scope="module", params=BACKENDS)
def ds_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The module's server (simulated model; long-poll timeout 0.5 s), on each store."""
    yield from module_server(tmp_path_factory, "durable", *store_args(request))


def producer(producer_id: str, epoch: int, seq: int) -> dict[str, str]:
    """Idempotent producer headers."""
    return {"Producer-Id": producer_id, "Producer-Epoch": str(epoch), "Producer-Seq": str(seq)}


# -- idempotent producers ----------------------------------------------------------------------

PRODUCERS = 3
APPENDS_EACH = 50
CONNECTIONS = 4


async def test_concurrent_producers_with_retries_store_every_append_exactly_once(
    ds_server: Server, ds: httpx.AsyncClient, user: str
) -> None:
    """3 producers x 50 appends at once over several connections, with duplicates sent
    concurrently and acknowledged appends retried: each append is stored once, in its
    producer's seq order, at the offset its 200 named; the duplicates answer 204 with the
    highest accepted seq."""
    await create(ds, "log", JSON)
    ends: dict[str, list[int]] = {}

    async def send(
        http: httpx.AsyncClient, pid: str, seq: int, answers: list[httpx.Response]
    ) -> None:
        body = json.dumps({"producer": pid, "seq": seq})
        answers.append(await append(http, "log", body, JSON, headers=producer(pid, 0, seq)))

    async def produce(index: int, clients: list[httpx.AsyncClient]) -> None:
        pid = f"writer-{index}"
        ends[pid] = []
        for seq in range(APPENDS_EACH):
            copies = 3 if seq % 7 == 3 else 1  # a client that re-sent before the answer came
            answers: list[httpx.Response] = []
            async with anyio.create_task_group() as tg:
                for copy in range(copies):
                    tg.start_soon(
                        send, clients[(index + seq + copy) % len(clients)], pid, seq, answers
                    )
            assert sorted(a.status_code for a in answers) == [200] + [204] * (copies - 1)
            for answer in answers:
                assert answer.headers["producer-epoch"] == "0"
                assert answer.headers["producer-seq"] == str(seq)
            winner = next(a for a in answers if a.status_code == 200)
            ends[pid].append(position(winner.headers["stream-next-offset"]))
            if seq % 5 == 4:  # the answer to seq - 2 was "lost": the producer retries it
                retry: list[httpx.Response] = []
                await send(clients[seq % len(clients)], pid, seq - 2, retry)
                assert retry[0].status_code == 204, retry[0].text
                assert retry[0].headers["producer-seq"] == str(seq)  # the highest accepted

    with anyio.fail_after(60):
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(as_user(ds_server, user))
                for _ in range(CONNECTIONS)
            ]
            async with anyio.create_task_group() as tg:
                for index in range(PRODUCERS):
                    tg.start_soon(produce, index, clients)

    values = await read_json(ds, "log")
    total = PRODUCERS * APPENDS_EACH
    assert len(values) == total
    for pid, pid_ends in ends.items():
        assert [v["seq"] for v in values if v["producer"] == pid] == list(range(APPENDS_EACH))
        assert pid_ends == sorted(set(pid_ends))  # offsets strictly grow with the seq
        for seq, end in enumerate(pid_ends):  # each 200 named its own message's offset
            assert values[end - 1] == {"producer": pid, "seq": seq}
    assert sorted(e for pid_ends in ends.values() for e in pid_ends) == list(range(1, total + 1))
    head = await ds.head(path("log"))
    assert head.headers["stream-next-offset"] == offset(total)


async def test_producer_epochs_fence_zombies_and_gaps_are_refused(ds: httpx.AsyncClient) -> None:
    """Stale epoch → 403 with the current epoch; a gap → 409 with expected and received seq; a
    new epoch not starting at 0 → 400; only accepted appends are stored."""
    await create(ds, "fenced", "text/plain")

    async def send(body: str, epoch: int, seq: int, pid: str = "p") -> httpx.Response:
        return await append(ds, "fenced", body, headers=producer(pid, epoch, seq))

    for seq in range(3):
        assert (await send(f"e0s{seq};", 0, seq)).status_code == 200
    gap = await send("gap;", 0, 5)
    assert gap.status_code == 409
    assert (gap.headers["producer-expected-seq"], gap.headers["producer-received-seq"]) == (
        "3",
        "5",
    )
    unknown = await send("new;", 0, 3, pid="stranger")  # an unknown producer starts at 0
    assert unknown.status_code == 409
    assert unknown.headers["producer-expected-seq"] == "0"
    assert (await send("bad;", 1, 1)).status_code == 400  # a new epoch starts at seq 0
    assert (await send("e1s0;", 1, 0)).status_code == 200
    for epoch, seq in ((0, 3), (0, 0), (0, 2)):  # the old epoch is fenced, even its dups
        stale = await send("zombie;", epoch, seq)
        assert stale.status_code == 403
        assert stale.headers["producer-epoch"] == "1"
    dup = await send("e1s0-again;", 1, 0)
    assert (dup.status_code, dup.headers["producer-seq"]) == (204, "0")

    # A zombie at epoch 1 races the producer's restart at epoch 2: whichever order the
    # writer sees, epoch 2 is accepted, and the zombie's appends after it are refused.
    zombie: dict[int, int] = {}

    async def zombie_send(seq: int) -> None:
        zombie[seq] = (await send(f"z{seq};", 1, seq)).status_code

    async def restart() -> None:
        assert (await send("e2s0;", 2, 0)).status_code == 200

    async with anyio.create_task_group() as tg:
        tg.start_soon(restart)
        for seq in range(1, 6):
            tg.start_soon(zombie_send, seq)
    assert set(zombie.values()) <= {200, 403, 409}
    assert (await send("late;", 1, 6)).status_code == 403
    stored = (await read_all(ds, "fenced")).decode().split(";")[:-1]
    expected = ["e0s0", "e0s1", "e0s2", "e1s0"]
    assert stored[:4] == expected
    assert "e2s0" in stored
    # Zombie appends that got 200 are stored (before e2s0, in seq order); no others are.
    zombies = [s for s in stored if s.startswith("z")]
    assert zombies == [f"z{seq}" for seq in sorted(zombie) if zombie[seq] == 200]
    assert all(stored.index(z) < stored.index("e2s0") for z in zombies)
    assert len(stored) == 4 + len(zombies) + 1

    # Producer state is per stream: the same id elsewhere starts afresh.
    await create(ds, "fenced-other", "text/plain")
    fresh = await append(ds, "fenced-other", "x", headers=producer("p", 0, 0))
    assert fresh.status_code == 200


# -- Stream-Seq --------------------------------------------------------------------------------


async def test_stream_seq_rounds_of_concurrent_duplicates_have_one_winner_each(
    ds: httpx.AsyncClient,
) -> None:
    """Five writers send each seq at once: one 204, four 409; regressions are 409; seqs
    compare bytewise, not as numbers."""
    await create(ds, "seq", "text/plain")

    async def send(seq: str, body: str) -> int:
        return (await append(ds, "seq", body, headers={"Stream-Seq": seq})).status_code

    async def writer(seq: str, index: int, results: dict[int, int]) -> None:
        results[index] = await send(seq, f"{seq}/{index};")

    winners: list[str] = []
    for round_ in range(8):
        seq = f"{round_:03d}"
        results: dict[int, int] = {}
        async with anyio.create_task_group() as tg:
            for index in range(5):
                tg.start_soon(writer, seq, index, results)
        assert sorted(results.values()) == [204, 409, 409, 409, 409]
        winners += [f"{seq}/{i}" for i, code in results.items() if code == 204]
    assert await send("007", "dup;") == 409
    assert await send("003", "old;") == 409
    assert await send("01", "01;") == 204  # "01" > "007" bytewise
    assert await send("09", "09;") == 204
    assert await send("1", "1;") == 204
    assert await send("010", "010;") == 409  # "010" < "1" bytewise, though 10 > 1
    assert await send("1", "1-again;") == 409
    stored = (await read_all(ds, "seq")).decode().split(";")[:-1]
    assert stored == [*winners, "01", "09", "1"]


async def test_stream_seq_under_full_concurrency_stores_a_strictly_increasing_subset(
    ds_server: Server, ds: httpx.AsyncClient, user: str
) -> None:
    """60 appends with 30 seq values (some sent 2-3 times) at once over several connections:
    the stored seqs strictly increase, each at most once, one message per 204, each 204
    naming its own message's offset, and the greatest seq is always stored."""
    await create(ds, "seq-race", "text/plain")
    sends = [(f"{value:02d}", copy) for value in range(30) for copy in range(1 + value % 3)]
    results: dict[tuple[str, int], httpx.Response] = {}
    with anyio.fail_after(30):
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(as_user(ds_server, user))
                for _ in range(CONNECTIONS)
            ]

            async def send(index: int, seq: str, copy: int) -> None:
                http = clients[index % len(clients)]
                results[seq, copy] = await append(
                    http, "seq-race", f"{seq}/{copy};", headers={"Stream-Seq": seq}
                )

            async with anyio.create_task_group() as tg:
                for index, (seq, copy) in enumerate(sends):
                    tg.start_soon(send, index, seq, copy)
    assert {r.status_code for r in results.values()} <= {204, 409}
    stored = (await read_all(ds, "seq-race")).decode().split(";")[:-1]
    seqs = [item.split("/")[0] for item in stored]
    assert seqs == sorted(set(seqs))  # strictly increasing, no value twice
    won = {f"{seq}/{copy}": r for (seq, copy), r in results.items() if r.status_code == 204}
    assert sorted(won) == sorted(stored)
    for index, item in enumerate(stored):
        assert position(won[item].headers["stream-next-offset"]) == index + 1
    assert seqs[-1] == "29"


# -- JSON values -------------------------------------------------------------------------------


def strict_json(body: bytes) -> object:
    """Parse as RFC 8259 JSON: no NaN, Infinity or -Infinity."""

    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=refuse)


@pytest.mark.parametrize(
    "body",
    [
        b"[1e400, 2]",
        b'["\\ud800", 2]',
        b'[1.5e300, -0.0, 12345678901234567890123, "\\u2028\\u0000"]',
    ],
    ids=["overflowing-number", "lone-surrogate", "edge-values"],
)
async def test_appended_json_is_refused_or_read_back_as_valid_json(
    ds: httpx.AsyncClient, body: bytes
) -> None:
    """Valid JSON text is stored (204) or refused (400), never 500; what a read returns is
    always valid JSON with the same values."""
    await create(ds, "values", JSON)
    answer = await append(ds, "values", body, JSON)
    assert answer.status_code in (204, 400), answer.text
    read = await ds.get(path("values"))
    stored = strict_json(read.content)
    assert stored == ([] if answer.status_code == 400 else strict_json(body))
