"""The Durable Streams client side of ``bench_durable.py``: followers and appenders on the
benchmarks' load client (``bench._client.LoadClient``), run in client processes
(``reader_process``, ``appender_process``). It sends no ``Accept-Encoding``, so neither server
compresses: gzip (the Node server's default above 1 KiB) would measure zlib, not the protocol.

Every message is ``MESSAGE_BYTES`` bytes of ``text/plain``: its sequence number and the
``time.perf_counter_ns()`` taken just before its POST was sent, padded with dots. There are no
line breaks, so an SSE ``data:`` line carries whole messages, and the bytes of a stream split
back into messages by length alone (a read may return several appends at once).
``perf_counter_ns`` is ``CLOCK_MONOTONIC`` on Linux, one clock for every process of the
machine, so a send time taken in one process and a receipt time in another can be subtracted.

A client process talks to the parent over a duplex pipe: ``("ready", n)`` once its readers
are in place (SSE: each had its first control event; long-poll: the first GETs were sent and a
moment has passed) or its appenders are warmed up; appenders then wait for ``("go", t)`` and
send ``("done", cpu_s, wall_s)`` when their time is up; last ``("result", tally)``, or
``("error", text)``. Nothing here is unbounded: every loop ends when its messages have
arrived, when the stream is closed, after ``MAX_ERRORS`` failures, or at the deadline it was
given (wall clock, ``time.time()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from bench._client import BenchHTTPError, LoadClient, cpu_seconds, new_loop

MESSAGE_BYTES = 100
STREAM_ROOT = "/v1/stream/"
CONTENT_TYPE = "text/plain"
TEXT_HEADERS = {"Content-Type": CONTENT_TYPE}
MAX_ERRORS = 20  # a phase stops after this many failed requests (per process)
READ_SLACK = 10.0  # a long-poll read may take this long beyond the server's long-poll timeout
SETTLE_SECONDS = 0.5  # long-poll readers are started this long before they report ready...
SETTLE_PER_READER = 0.01  # ...plus this much per reader
SSE_READY_TIMEOUT = 10.0  # SSE readers must have their first control event within this
SSE_RECONNECTS = 20  # an SSE reader reconnects at most this often in one phase
ERROR_PAUSE = 0.05  # a reader waits this long after a failed request
GO_TIMEOUT = 60.0  # an appender process waits this long for "go"
VERIFY_READS = 1_000  # catch-up GETs per stream when checking what was stored
VERIFY_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0  # the writer's and the appenders' requests
CREATE_TIMEOUT = 10.0
EVENT_END = re.compile(rb"\r?\n\r?\n")

T = TypeVar("T")


class BenchProtocolError(Exception):
    """A server answered something the benchmark cannot go on from."""


def encode(seq: int, sent_ns: int) -> bytes:
    """One message: ``seq`` and the send time, padded to ``MESSAGE_BYTES``."""
    head = f"{seq:010d} {sent_ns:020d} ".encode()
    return head + b"." * (MESSAGE_BYTES - len(head))


def unique_name(label: str) -> str:
    """A fresh stream name (``[A-Za-z0-9-]`` only, as the protocol's suite uses)."""
    return f"bench-{label}-{time.time_ns()}"


async def create_stream(client: LoadClient, path: str) -> str:
    """``PUT`` a new ``text/plain`` stream; its ``Stream-Next-Offset`` (``-1`` if absent)."""
    response = await client.request("PUT", path, headers=TEXT_HEADERS)
    if response.status not in (200, 201):
        raise BenchProtocolError(f"PUT {path} answered {response.status}: {response.body[:200]!r}")
    return response.headers.get("Stream-Next-Offset", "-1")


async def gather_all(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Await ``calls`` concurrently in a task group; their results in order."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(call) for call in calls]
    return [task.result() for task in tasks]


@dataclass
class Tally:
    """Failures of one process's share of a phase, and its CPU."""

    errors: int = 0
    first_error: str | None = None
    cpu_s: float = 0.0  # this process's CPU over the measured part
    wall_s: float = 0.0  # ... and that part's length
    cut_short: bool = False

    def fail(self, error: str) -> None:
        """Count a failure (the first one's message is kept)."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = error

    @property
    def given_up(self) -> bool:
        """Too many errors: this share stops."""
        return self.errors >= MAX_ERRORS


# -- followers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReaderSpec:
    """One client process's readers in a latency phase."""

    base_url: str
    path: str
    offset: str  # where the readers start (the new stream's tail)
    mode: str  # "long-poll" or "sse"
    readers: int
    planned: int  # messages the writer will send (warm-up included)
    warmup: int  # the first ``warmup`` messages are not timed
    long_poll_timeout: float
    deadline: float  # time.time()
    loop: str


@dataclass
class ReaderTally(Tally):
    """What one process's readers received."""

    delivered: int = 0  # messages, over all readers, warm-up included
    gaps: int = 0
    duplicates: int = 0
    malformed: int = 0
    requests: int = 0  # long-poll GETs, or SSE GETs
    reconnects: int = 0
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))


class Follower:
    """One reader's view of the stream: splits bytes into messages, checks their order and
    records each message's latency (after the warm-up)."""

    __slots__ = ("_buffer", "_planned", "_tally", "_warmup", "next_seq")

    def __init__(self, tally: ReaderTally, *, planned: int, warmup: int) -> None:
        self._tally = tally
        self._planned = planned
        self._warmup = warmup
        self._buffer = b""
        self.next_seq = 0

    @property
    def done(self) -> bool:
        """Every planned message has arrived."""
        return self.next_seq >= self._planned

    def feed(self, data: bytes, received_ns: int) -> None:
        """Bytes read from the stream at ``received_ns`` (``perf_counter_ns``)."""
        tally = self._tally
        buffer = self._buffer + data if self._buffer else data
        whole = len(buffer) - len(buffer) % MESSAGE_BYTES
        for at in range(0, whole, MESSAGE_BYTES):
            try:
                seq = int(buffer[at : at + 10])
                sent_ns = int(buffer[at + 11 : at + 31])
            except ValueError:
                tally.malformed += 1
                continue
            if seq < self.next_seq:
                tally.duplicates += 1
                continue
            tally.gaps += seq - self.next_seq
            self.next_seq = seq + 1
            tally.delivered += 1
            if seq >= self._warmup:
                tally.latencies_ms.append((received_ns - sent_ns) / 1e6)
        self._buffer = buffer[whole:]


async def long_poll_reader(
    client: LoadClient, path: str, offset: str, follower: Follower, tally: ReaderTally
) -> None:
    """``GET ?offset=X&live=long-poll`` in a loop, each time from the ``Stream-Next-Offset``
    (and with the ``Stream-Cursor``) of the previous answer, until every message has arrived
    or the stream is closed."""
    cursor = ""
    while not follower.done and not tally.given_up:
        url = f"{path}?offset={offset}&live=long-poll" + (f"&cursor={cursor}" if cursor else "")
        try:
            response = await client.request("GET", url)
        except BenchHTTPError as exc:
            tally.fail(f"GET long-poll: {exc}")
            await asyncio.sleep(ERROR_PAUSE)
            continue
        tally.requests += 1
        status = response.status
        if status == 200:
            follower.feed(response.body, response.received_ns)
        elif status != 204:
            tally.fail(f"GET long-poll answered {status}: {response.body[:200]!r}")
            return
        offset = response.headers.get("Stream-Next-Offset", offset)
        cursor = response.headers.get("Stream-Cursor", cursor)
        if response.headers.get("Stream-Closed", "").lower() == "true":
            return


def parse_event(event: bytes) -> tuple[str, bytes]:
    """An SSE event's type and its data lines joined by ``\\n`` (comments ignored)."""
    kind = "message"
    data: list[bytes] = []
    for raw in event.split(b"\n"):
        line = raw.rstrip(b"\r")
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):  # as EventSource does: one leading space is not data
            value = value[1:]
        if name == b"event":
            kind = value.decode(errors="replace")
        elif name == b"data":
            data.append(value)
    return kind, b"\n".join(data)


async def sse_reader(
    client: LoadClient,
    path: str,
    offset: str,
    follower: Follower,
    tally: ReaderTally,
    on_ready: Callable[[], None],
) -> None:
    """``GET ?offset=X&live=sse``; feeds ``data`` events, follows ``control`` events'
    ``streamNextOffset``, and reconnects from there if the server ends the response early;
    calls ``on_ready`` at the first control event. Ends when every message has arrived or a
    control event says ``streamClosed``."""
    ready = closed = False
    buffer = b""

    def on_read(received_ns: int, chunk: bytes) -> bool:
        nonlocal buffer, offset, ready, closed
        buffer += chunk
        while (match := EVENT_END.search(buffer)) is not None:
            event, buffer = buffer[: match.start()], buffer[match.end() :]
            kind, data = parse_event(event)
            if kind == "data":
                follower.feed(data, received_ns)
            elif kind == "control":
                control = json.loads(data)
                offset = control.get("streamNextOffset", offset)
                if not ready:
                    ready = True
                    on_ready()
                if control.get("streamClosed"):
                    closed = True
                    return True
        return follower.done

    for _ in range(SSE_RECONNECTS + 1):
        buffer = b""
        tally.requests += 1
        try:
            response = await client.stream(f"{path}?offset={offset}&live=sse", on_read)
        except (BenchHTTPError, ValueError) as exc:
            tally.fail(f"GET sse: {type(exc).__name__}: {exc}")
            if tally.given_up:
                return
            await asyncio.sleep(ERROR_PAUSE)
        else:
            if response.status != 200:
                tally.fail(f"GET sse answered {response.status}: {response.body[:200]!r}")
                return
            if closed or follower.done:
                return
        tally.reconnects += 1
    tally.fail(f"SSE reader gave up after {SSE_RECONNECTS} reconnects")


async def _follow(spec: ReaderSpec, conn: Connection) -> ReaderTally:
    tally = ReaderTally()
    waiting = spec.readers
    all_ready = asyncio.Event()
    cpu0, t0 = cpu_seconds(), time.perf_counter()

    def one_ready() -> None:
        nonlocal waiting
        waiting -= 1
        if waiting == 0:
            all_ready.set()

    async def announce() -> None:
        nonlocal cpu0, t0
        if spec.mode == "sse":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SSE_READY_TIMEOUT):
                    await all_ready.wait()
        else:
            # A long-poll reader cannot tell when its GET is parked on the server.
            await asyncio.sleep(SETTLE_SECONDS + SETTLE_PER_READER * spec.readers)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        conn.send(("ready", spec.readers - waiting if spec.mode == "sse" else spec.readers))

    read_timeout = spec.long_poll_timeout + READ_SLACK
    async with LoadClient(
        spec.base_url, connections=spec.readers + 1, timeout=read_timeout
    ) as client:
        try:
            async with asyncio.timeout(spec.deadline - time.time()), asyncio.TaskGroup() as tg:
                tg.create_task(announce())
                for _ in range(spec.readers):
                    follower = Follower(tally, planned=spec.planned, warmup=spec.warmup)
                    if spec.mode == "sse":
                        tg.create_task(
                            sse_reader(client, spec.path, spec.offset, follower, tally, one_ready)
                        )
                    else:
                        tg.create_task(
                            long_poll_reader(client, spec.path, spec.offset, follower, tally)
                        )
        except TimeoutError:
            tally.cut_short = True
    tally.cpu_s, tally.wall_s = cpu_seconds() - cpu0, time.perf_counter() - t0
    return tally


def reader_process(spec: ReaderSpec, conn: Connection) -> None:
    """Client process entry point: ``spec.readers`` followers of one stream."""
    run_in_process(_follow(spec, conn), spec.loop, conn)


def run_in_process(coro: Coroutine[Any, Any, Tally], loop_kind: str, conn: Connection) -> None:
    """Run a client process's coroutine; send its tally, or the error, to the parent."""
    loop = new_loop(loop_kind)
    try:
        result = loop.run_until_complete(coro)
        loop.run_until_complete(loop.shutdown_asyncgens())
        conn.send(("result", result))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        loop.close()
        conn.close()


# -- the paced writer (in the parent) -------------------------------------------------------------


@dataclass
class WriterTally(Tally):
    """What the paced writer sent."""

    sent: int = 0
    first_sent: float = 0.0  # perf_counter of the first append
    append_span: float = 0.0  # first append sent -> last append answered, s
    post_ms: array[float] = field(default_factory=lambda: array("d"))


async def paced_writer(
    base_url: str, path: str, *, count: int, interval: float, deadline: float
) -> WriterTally:
    """``count`` appends, one every ``interval`` seconds on a fixed schedule (a late append is
    sent at once, never in a burst), each awaited; then the stream is closed, which is what
    ends the readers. Stops at ``deadline`` (``time.time()``)."""
    tally = WriterTally()
    async with LoadClient(base_url, connections=1, timeout=REQUEST_TIMEOUT) as client:
        start = tally.first_sent = time.perf_counter()
        try:
            async with asyncio.timeout(deadline - time.time()):
                for seq in range(count):
                    if tally.given_up:
                        break
                    delay = start + seq * interval - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sent_ns = time.perf_counter_ns()
                    try:
                        response = await client.request(
                            "POST", path, encode(seq, sent_ns), headers=TEXT_HEADERS
                        )
                    except BenchHTTPError as exc:
                        tally.fail(str(exc))
                        break
                    done_ns = response.received_ns
                    if response.status not in (200, 204):
                        tally.fail(f"POST answered {response.status}: {response.body!r}")
                        break
                    tally.post_ms.append((done_ns - sent_ns) / 1e6)
                    tally.sent += 1
                    tally.append_span = done_ns / 1e9 - start
        except TimeoutError:
            tally.cut_short = True
        # Close-only POST: the readers see Stream-Closed once they have everything.
        try:
            await client.request("POST", path, headers={"Stream-Closed": "true"})
        except BenchHTTPError as exc:
            tally.fail(f"POST close: {exc}")
    return tally


# -- appenders ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AppenderSpec:
    """One client process's appenders in a throughput phase: one stream each."""

    base_url: str
    label: str
    first: int  # index of this process's first appender (names its producer id)
    writers: int
    producer: bool  # send Producer-Id / Producer-Epoch / Producer-Seq
    seconds: float
    deadline: float  # time.time()
    loop: str


@dataclass
class AppenderTally(Tally):
    """What one process's appenders did."""

    appends: int = 0  # acknowledged (200/204), warm-up excluded
    duplicates: int = 0  # producer mode: 204 where 200 was due (nothing appended)
    stored_bytes: int | None = None
    expected_bytes: int = 0
    post_ms: array[float] = field(default_factory=lambda: array("d"))


async def stored_bytes(client: LoadClient, path: str) -> int:
    """The stream's length in bytes, read by catch-up GETs from the start."""
    offset, total = "-1", 0
    for _ in range(VERIFY_READS):
        response = await client.request("GET", f"{path}?offset={offset}")
        if response.status != 200:
            raise BenchProtocolError(f"GET {path} answered {response.status}")
        total += len(response.body)
        next_offset = response.headers.get("Stream-Next-Offset", offset)
        up_to_date = response.headers.get("Stream-Up-To-Date", "").lower() == "true"
        if up_to_date or next_offset == offset:
            return total
        offset = next_offset
    raise BenchProtocolError(f"{path} not read to its end in {VERIFY_READS} GETs")


async def _append(spec: AppenderSpec, conn: Connection) -> AppenderTally:
    tally = AppenderTally()
    paths = [
        STREAM_ROOT + unique_name(f"{spec.label}-{spec.first + k}") for k in range(spec.writers)
    ]
    acked = [0] * spec.writers
    async with LoadClient(
        spec.base_url, connections=spec.writers + 1, timeout=REQUEST_TIMEOUT
    ) as client:

        async def append(k: int, seq: int) -> bool:
            """One POST; whether the appender moves on to the next ``Producer-Seq`` (after a
            failure it sends the same one again, as an idempotent producer does)."""
            headers = TEXT_HEADERS
            if spec.producer:
                headers = TEXT_HEADERS | {
                    "Producer-Id": f"bench-writer-{spec.first + k}",
                    "Producer-Epoch": "0",
                    "Producer-Seq": str(seq),
                }
            t0 = time.perf_counter_ns()
            try:
                response = await client.request("POST", paths[k], encode(seq, t0), headers=headers)
            except BenchHTTPError as exc:
                tally.fail(str(exc))
                return False
            status = response.status
            if status == 204 and spec.producer:  # a duplicate: the server appended nothing
                tally.duplicates += 1
                return True
            if status not in (200, 204):
                tally.fail(f"POST answered {status}: {response.body[:200]!r}")
                return False
            acked[k] += 1
            tally.post_ms.append((response.received_ns - t0) / 1e6)
            return True

        async def appender(k: int, end: float) -> None:
            seq = 1
            while time.time() < end and not tally.given_up:
                if await append(k, seq):
                    seq += 1

        async with asyncio.timeout(spec.deadline - time.time()):
            await gather_all([create_stream(client, path) for path in paths])
            # One unmeasured append each: connections open, producers registered (seq 0).
            await gather_all([append(k, 0) for k in range(spec.writers)])
            tally.post_ms = array("d")
            warm = sum(acked)
            conn.send(("ready", spec.writers))
            if not await asyncio.to_thread(conn.poll, GO_TIMEOUT):
                raise TimeoutError("no go from the parent")
            _, go_at = conn.recv()
            await asyncio.sleep(max(0.0, go_at - time.time()))
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        try:
            async with asyncio.timeout(spec.deadline - time.time()), asyncio.TaskGroup() as tg:
                for k in range(spec.writers):
                    tg.create_task(appender(k, go_at + spec.seconds))
        except TimeoutError:
            tally.cut_short = True
        tally.cpu_s, tally.wall_s = cpu_seconds() - cpu0, time.perf_counter() - t0
        conn.send(("done", tally.cpu_s, tally.wall_s))
        tally.appends = sum(acked) - warm
        tally.expected_bytes = sum(acked) * MESSAGE_BYTES
        try:
            async with asyncio.timeout(VERIFY_TIMEOUT):
                lengths = await gather_all([stored_bytes(client, path) for path in paths])
            tally.stored_bytes = sum(lengths)
        except (TimeoutError, BenchHTTPError, BenchProtocolError) as exc:
            tally.fail(f"reading the streams back: {type(exc).__name__}: {exc}")
    return tally


def appender_process(spec: AppenderSpec, conn: Connection) -> None:
    """Client process entry point: ``spec.writers`` appenders, each to a stream of its own."""
    run_in_process(_append(spec, conn), spec.loop, conn)
