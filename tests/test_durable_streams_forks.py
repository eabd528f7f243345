"""Durable Streams forks, soft delete and expiry: the behaviours where a bug would be subtle.

Fork chains (what every offset of every stream in the chain reads; later source appends
never show), soft delete (what a deleted source answers while forks read it, and when the
cascade frees its name), sub-offset forks of bytes and of JSON values, and expiry (sliding
TTLs that reads and writes extend and HEAD does not, absolute Expires-At, a source that
expires under its fork).

One server per module; every test works as a user of its own, so stream names never clash.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta

import anyio
import httpx
import pytest

from .backends import BACKENDS
from .durable_support import (
    BINARY,
    JSON,
    append,
    check_pairs,
    create,
    module_server,
    offset,
    parse_sse,
    path,
    read_all,
    read_json,
    read_sse,
    status,
    store_args,
)
from .support import Server


@pytest.fixture(scope="module", params=BACKENDS)
def ds_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The module's server (simulated model; long-poll timeout 0.5 s), on each store."""
    yield from module_server(tmp_path_factory, "forks", *store_args(request))


# -- forks and soft delete ---------------------------------------------------------------------


async def fork(
    http: httpx.AsyncClient,
    name: str,
    source: str,
    at: int | None = None,
    *,
    sub_offset: int | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """PUT ``name`` as a fork of ``source`` (at its tail unless ``at``)."""
    sent = {"Stream-Forked-From": path(source), **(headers or {})}
    if at is not None:
        sent["Stream-Fork-Offset"] = offset(at)
    if sub_offset is not None:
        sent["Stream-Fork-Sub-Offset"] = str(sub_offset)
    return await http.put(path(name), headers=sent)


async def text_stream(
    http: httpx.AsyncClient, name: str, items: list[str], *, headers: dict[str, str] | None = None
) -> None:
    """Create a text stream holding one message per item (``item;``)."""
    await create(http, name, "text/plain", headers=headers)
    for item in items:
        assert (await append(http, name, f"{item};")).status_code == 204


async def long_poll_during(
    http: httpx.AsyncClient, name: str, at: int, action: Callable[[], Awaitable[None]]
) -> httpx.Response:
    """A long-poll of ``name`` at ``at``, with ``action`` run while it waits.

    The pause before ``action`` only makes it likely that the poll is already waiting (so the
    wake-up path is what runs); the answer must be the same in either order.
    """
    answers: list[httpx.Response] = []

    async def poll() -> None:
        params = {"offset": offset(at), "live": "long-poll"}
        answers.append(await http.get(path(name), params=params))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            await anyio.sleep(0.1)
            await action()
    return answers[0]


async def test_fork_chain_reads_inherited_then_own_data_and_never_later_source_appends(
    ds: httpx.AsyncClient,
) -> None:
    """a → b at 3 → c at b's tail: every offset of each stream reads the right messages,
    appends to a source after a fork are invisible in the fork (and do not wake its
    long-polls), and SSE sends the inherited messages, then the fork's own."""
    await text_stream(ds, "a", [f"a{i}" for i in range(5)])
    assert (await fork(ds, "b", "a", 3)).status_code == 201
    for item in ("b3", "b4"):
        assert (await append(ds, "b", f"{item};")).status_code == 204
    created = await fork(ds, "c", "b")  # at b's tail, 5
    assert (created.status_code, created.headers["stream-next-offset"]) == (201, offset(5))
    assert created.headers["content-type"] == "text/plain"  # inherited
    assert (await append(ds, "c", "c5;")).status_code == 204
    assert (await append(ds, "a", "a5;")).status_code == 204  # after both forks
    assert (await append(ds, "b", "b5;")).status_code == 204  # after c forked

    expected = {
        "a": ["a0", "a1", "a2", "a3", "a4", "a5"],
        "b": ["a0", "a1", "a2", "b3", "b4", "b5"],
        "c": ["a0", "a1", "a2", "b3", "b4", "c5"],
    }
    for name, items in expected.items():
        for start in range(len(items) + 1):
            got = (await read_all(ds, name, start)).decode()
            assert got == "".join(f"{i};" for i in items[start:]), (name, start)
        head = await ds.head(path(name))
        assert head.headers["stream-next-offset"] == offset(len(items))
        assert not any(h.startswith("stream-fork") for h in head.headers)  # transparent

    # At c's tail only c's own appends wake a long-poll; its sources' do not.
    async def source_appends() -> None:
        assert (await append(ds, "a", "a6;")).status_code == 204
        assert (await append(ds, "b", "b6;")).status_code == 204

    async def own_append() -> None:
        assert (await append(ds, "c", "c6;")).status_code == 204

    quiet = await long_poll_during(ds, "c", 6, source_appends)
    assert (quiet.status_code, quiet.headers["stream-next-offset"]) == (204, offset(6))
    woken = await long_poll_during(ds, "c", 6, own_append)
    assert (woken.status_code, woken.content) == (200, b"c6;")
    assert woken.headers["stream-next-offset"] == offset(7)

    # SSE from the start sends the inherited messages, then c's own, then the end.
    closed = await ds.post(path("c"), headers={"Stream-Closed": "true"})
    assert closed.status_code == 204
    _, raw = await read_sse(ds, "c", "-1")
    frames = parse_sse(raw.decode())
    controls = check_pairs(frames)
    assert "".join(f.data for f in frames if f.event == "data") == "a0;a1;a2;b3;b4;c5;c6;"
    assert controls[-1] == {"streamNextOffset": offset(7), "streamClosed": True, "upToDate": True}


async def test_fork_of_a_fork_inside_the_inherited_range_reads_its_own_messages(
    ds: httpx.AsyncClient,
) -> None:
    """a → b at 3 → c at 2 (below b's fork point): c is a0 a1 and then its own messages."""
    await text_stream(ds, "a", [f"a{i}" for i in range(5)])
    assert (await fork(ds, "b", "a", 3)).status_code == 201
    assert (await append(ds, "b", "b3;")).status_code == 204
    assert (await fork(ds, "c", "b", 2)).status_code == 201
    assert (await append(ds, "c", "c2;")).status_code == 204
    assert (await read_all(ds, "c", 2)).decode() == "c2;"
    assert (await read_all(ds, "c")).decode() == "a0;a1;c2;"


async def test_soft_deleted_source_answers_410_until_its_last_fork_goes(
    ds: httpx.AsyncClient,
) -> None:
    """Delete a while b (and b's fork c) read it: a answers 410 to GET/HEAD/POST/DELETE and
    PUT to its name is 409, b and c still read a's data; deleting c then b removes a by the
    cascade, and a's name then creates a new, empty stream."""
    await text_stream(ds, "a", ["a0", "a1", "a2"])
    assert (await fork(ds, "b", "a", 2)).status_code == 201
    assert (await append(ds, "b", "b2;")).status_code == 204
    assert (await fork(ds, "c", "b")).status_code == 201
    assert (await ds.delete(path("a"))).status_code == 204

    async def answers_for_a() -> list[int]:
        return [
            await status(ds.get(path("a"))),
            await status(ds.head(path("a"))),
            await status(append(ds, "a", "more;")),
            await status(ds.delete(path("a"))),
            await status(ds.put(path("a"), headers={"Content-Type": "text/plain"})),
            await status(fork(ds, "d", "a", 1)),  # a deleted source cannot be forked
        ]

    assert await answers_for_a() == [410, 410, 410, 410, 409, 409]
    assert (await read_all(ds, "b")).decode() == "a0;a1;b2;"
    assert (await read_all(ds, "c")).decode() == "a0;a1;b2;"
    assert (await ds.delete(path("c"))).status_code == 204
    assert await answers_for_a() == [410, 410, 410, 410, 409, 409]  # b still holds it
    assert (await read_all(ds, "b")).decode() == "a0;a1;b2;"
    assert (await ds.delete(path("b"))).status_code == 204
    assert (await ds.get(path("a"))).status_code == 404
    recreated = await create(ds, "a", "text/plain")
    assert recreated.headers["stream-next-offset"] == offset(0)
    assert await read_all(ds, "a") == b""


async def test_a_chain_of_soft_deleted_streams_goes_with_its_last_fork(
    ds: httpx.AsyncClient,
) -> None:
    """a → b → c; delete a, then b (both soft: c reads them), then c: all three names free."""
    await text_stream(ds, "a", ["a0", "a1"])
    assert (await fork(ds, "b", "a")).status_code == 201
    assert (await append(ds, "b", "b2;")).status_code == 204
    assert (await fork(ds, "c", "b")).status_code == 201
    assert (await ds.delete(path("a"))).status_code == 204
    assert (await ds.delete(path("b"))).status_code == 204
    assert (await ds.head(path("b"))).status_code == 410
    assert (await read_all(ds, "c")).decode() == "a0;a1;b2;"
    assert (await ds.delete(path("c"))).status_code == 204
    for name in ("a", "b", "c"):
        assert (await ds.head(path(name))).status_code == 404
        await create(ds, name, "text/plain")
        assert await read_all(ds, name) == b""


async def test_binary_sub_offset_forks_keep_a_byte_prefix_of_the_message(
    ds: httpx.AsyncClient,
) -> None:
    """A sub-offset counts bytes of the message at the fork offset, also through a chain."""
    first = b"\x00\x01\r\n\xff"
    second = bytes(range(256))
    await create(ds, "bin", BINARY)
    for message in (first, second):
        assert (await append(ds, "bin", message, BINARY)).status_code == 204
    made = await fork(ds, "bin-fork", "bin", 1, sub_offset=10)
    assert (made.status_code, made.headers["stream-next-offset"]) == (201, offset(2))
    assert await read_all(ds, "bin-fork") == first + second[:10]
    assert await read_all(ds, "bin-fork", 1) == second[:10]
    assert (await append(ds, "bin-fork", b"\x00tail", BINARY)).status_code == 204
    assert await read_all(ds, "bin-fork") == first + second[:10] + b"\x00tail"
    # A fork of the fork, cutting the prefix message it inherited.
    assert (await fork(ds, "bin-fork2", "bin-fork", 1, sub_offset=4)).status_code == 201
    assert await read_all(ds, "bin-fork2") == first + second[:4]
    # The whole message is a valid cut; one byte more, or no message at all, is not.
    assert (await fork(ds, "bin-whole", "bin", 1, sub_offset=256)).status_code == 201
    assert await read_all(ds, "bin-whole") == first + second
    assert (await fork(ds, "bin-over", "bin", 1, sub_offset=257)).status_code == 400
    assert (await fork(ds, "bin-tail", "bin", 2, sub_offset=1)).status_code == 400
    assert (await ds.head(path("bin-over"))).status_code == 404  # nothing was created


async def test_json_sub_offset_forks_keep_the_first_values_of_the_message(
    ds: httpx.AsyncClient,
) -> None:
    """A JSON POST of an array is one message of several values; a sub-offset keeps the first
    values of it, whatever commas and brackets the values hold."""
    values = [1, "two, ]three[", {"k": [3, {"x": "é"}]}]
    await create(ds, "js", JSON)
    assert (await append(ds, "js", json.dumps(values), JSON)).status_code == 204
    assert (await append(ds, "js", json.dumps({"after": True}), JSON)).status_code == 204
    assert await read_json(ds, "js") == [*values, {"after": True}]
    for cut in range(1, 4):
        name = f"js-{cut}"
        assert (await fork(ds, name, "js", 0, sub_offset=cut)).status_code == 201
        assert await read_json(ds, name) == values[:cut]
    assert (await append(ds, "js-2", json.dumps([True, None]), JSON)).status_code == 204
    assert await read_json(ds, "js-2") == [*values[:2], True, None]
    assert await read_json(ds, "js-2", 1) == [True, None]  # one message per POST
    assert (await fork(ds, "js-over", "js", 0, sub_offset=4)).status_code == 400
    assert (await fork(ds, "js-next", "js", 1, sub_offset=1)).status_code == 201
    assert await read_json(ds, "js-next") == [*values, {"after": True}]


# -- expiry ------------------------------------------------------------------------------------

EXPIRY_SLACK = 1.5  # how late after its due time an expired stream may still answer
CLOCK_SLACK = 0.05  # the server's clock and ours, read a moment apart


async def gone_at(http: httpx.AsyncClient, name: str, *, timeout: float = 6.0) -> float:
    """Poll HEAD (which never slides a TTL) until 404; the monotonic time it was seen."""
    with anyio.fail_after(timeout):
        while True:
            code = await status(http.head(path(name)))
            if code == 404:
                return time.monotonic()
            assert code == 200, code
            await anyio.sleep(0.05)


async def keep_busy(
    action: Callable[[], Awaitable[httpx.Response]], seconds: float, every: float
) -> float:
    """Repeat ``action`` (expecting success) for ``seconds``; the start time of its last run."""
    end = time.monotonic() + seconds
    last = time.monotonic()
    while time.monotonic() < end:
        last = time.monotonic()
        response = await action()
        assert response.status_code in (200, 204), response.status_code
        await anyio.sleep(every)
    return last


async def test_ttl_expires_when_idle_reads_and_writes_slide_it_head_does_not(
    ds: httpx.AsyncClient,
) -> None:
    """TTL 1 polled only by HEAD is gone after 1 s. TTL 2 streams kept busy for 3 s by
    catch-up reads, reads at ``offset=now``, back-to-back long-polls or appends are still
    there after 1.5 TTLs, and go 2 s after their last access."""
    started = time.monotonic()
    await create(ds, "idle", "text/plain", body=b"x", headers={"Stream-TTL": "1"})
    created = time.monotonic()
    # TTL 2, not 1: a TTL of at most the 1 s sweep interval meets a server bug (a read during
    # a sweep can answer 404 for a live stream), which this test is not about.
    busy: dict[str, Callable[[], Awaitable[httpx.Response]]] = {
        "read": lambda: ds.get(path("read")),
        "now": lambda: ds.get(path("now"), params={"offset": "now"}),
        "poll": lambda: ds.get(path("poll"), params={"offset": "now", "live": "long-poll"}),
        "written": lambda: append(ds, "written", "y"),
    }
    for name in busy:
        await create(ds, name, "text/plain", body=b"x", headers={"Stream-TTL": "2"})
    assert (await ds.head(path("read"))).headers["stream-ttl"] == "2"
    after_last: dict[str, float] = {}

    async def idle() -> None:
        at = await gone_at(ds, "idle")
        assert started + 1 - CLOCK_SLACK <= at <= created + 1 + EXPIRY_SLACK
        assert (await ds.get(path("idle"))).status_code == 404
        assert (await append(ds, "idle", "late")).status_code == 404

    async def slid(name: str) -> None:
        last = await keep_busy(busy[name], 3.0, 0.25)
        assert (await ds.head(path(name))).status_code == 200, name  # 1.5 TTLs on
        after_last[name] = await gone_at(ds, name) - last

    async with anyio.create_task_group() as tg:
        tg.start_soon(idle)
        for name in busy:
            tg.start_soon(slid, name)
    for name, seconds in after_last.items():
        assert 2 - CLOCK_SLACK <= seconds <= 2 + EXPIRY_SLACK, (name, seconds)


async def test_expires_at_is_absolute_and_an_expired_source_leaves_its_fork_intact(
    ds: httpx.AsyncClient,
) -> None:
    """Expires-At in the past: created, then gone at once (an append finds it expired and
    frees its name); in 1.5 s: gone then, however
    often it is read. A TTL source expiring under a fork with its own TTL: the fork still
    reads the inherited data and the source's name is free for a new, empty stream; a fork
    that asked for nothing inherited the source's TTL and expires with it."""

    def at(seconds: float) -> str:
        return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()

    in_the_past = at(-60).replace("+00:00", "Z")  # both forms of UTC are RFC 3339
    past = await create(ds, "past", "text/plain", headers={"Stream-Expires-At": in_the_past})
    assert past.status_code == 201
    # The first access is an append: the write that would append finds it expired instead,
    # retires it (its name is free at once) and answers 404.
    assert (await append(ds, "past", "late")).status_code == 404
    again = await create(ds, "past", "text/plain")
    assert again.status_code == 201, "the expired stream's name is free"
    assert again.headers["stream-next-offset"] == offset(0)
    assert (await ds.head(path("past"))).status_code == 200

    async def absolute() -> None:
        started = time.monotonic()
        await create(ds, "soon", "text/plain", body=b"x", headers={"Stream-Expires-At": at(1.5)})
        created = time.monotonic()

        async def read() -> httpx.Response:
            return await ds.get(path("soon"))

        with anyio.move_on_after(created + 1.5 + EXPIRY_SLACK - time.monotonic()):
            while True:
                if (await read()).status_code != 200:
                    break
                await anyio.sleep(0.05)
        gone = time.monotonic()
        assert (await read()).status_code == 404
        assert started + 1.5 - CLOCK_SLACK <= gone <= created + 1.5 + EXPIRY_SLACK

    async def source_expires() -> None:
        await text_stream(ds, "ttl-src", ["s0", "s1", "s2"], headers={"Stream-TTL": "1"})
        own = await fork(ds, "own-ttl", "ttl-src", 2, headers={"Stream-TTL": "30"})
        assert own.status_code == 201
        inherits = await fork(ds, "inherits", "ttl-src")
        assert inherits.status_code == 201
        assert (await ds.head(path("inherits"))).headers["stream-ttl"] == "1"
        await gone_at(ds, "ttl-src")
        assert (await read_all(ds, "own-ttl")).decode() == "s0;s1;"
        assert (await ds.head(path("own-ttl"))).headers["stream-ttl"] == "30"
        assert (await fork(ds, "too-late", "ttl-src")).status_code == 404
        fresh = await create(ds, "ttl-src", "text/plain")
        assert fresh.headers["stream-next-offset"] == offset(0)
        assert await read_all(ds, "ttl-src") == b""
        assert (await append(ds, "ttl-src", "new;")).status_code == 204
        assert (await read_all(ds, "own-ttl")).decode() == "s0;s1;"  # not the new stream's
        await gone_at(ds, "inherits")

    async with anyio.create_task_group() as tg:
        tg.start_soon(absolute)
        tg.start_soon(source_expires)
