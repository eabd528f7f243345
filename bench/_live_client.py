"""The spine's live-run client process: C recording connections, opened, warmed and started on
the parent's signal, their SSE streams parsed only once they ended.

One live stream is one connection (``bench._client.Recorder``): ``POST /v1/generations``
(keep-alive), then ``GET /v1/generations/{id}/events`` with ``Connection: close`` on the same
socket, so the server's close marks the end of the stream. With several nodes on one store, a
share of the streams (``LiveSpec.cross_fraction``) is read on another node instead: a second
warmed connection, to ``follow_port``, sends that ``GET`` as soon as the POST's 202 came back
on the first, which then closes.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from bench._client import Recorder, cpu_seconds, new_loop
from bench._parse import StreamStats, parse_reads


@dataclass(frozen=True, slots=True)
class LiveSpec:
    """One client process's share of a live run.

    Two phases. *Open*: from ``open_at``, connect (``open_rate`` per second, 0 = all at once,
    at most ``open_window`` unanswered) and warm each connection with ``GET /healthz``, so
    that accepting connections — slow on a busy uvloop server — is not mixed into the
    streaming phase. *Stream*: when the parent says go, send each connection's POST
    (``start_rate`` per second, 0 = all at once) and record its SSE stream.
    """

    host: str
    port: int
    streams: int
    post_body: bytes
    open_at: float  # wall clock
    open_rate: float
    open_window: int
    start_rate: float
    start_offset: float  # this process's first POST is this long after "go"
    deadline: float  # wall clock: abort whatever is still open
    warm: bool = True  # False: no open phase; connect right before each POST ("lazy")
    rate: float = 0.0  # the generations' token rate, for latency against the schedule
    loop: str = "uvloop"
    stamps: bool = True
    follow_port: int = 0  # another node on the same store, for the streams read there
    cross_fraction: float = 0.0  # the share of streams read on ``follow_port`` (warm only)

    def crosses(self, index: int) -> bool:
        """Whether stream ``index`` is read on ``follow_port`` (spread evenly over the
        streams, so that the start ramp mixes both kinds)."""
        f = self.cross_fraction
        return (
            self.warm
            and self.follow_port > 0
            and math.floor((index + 1) * f) > math.floor(index * f)
        )


@dataclass(slots=True)
class StreamRecord:
    """One live stream as the client saw it (times in ns since the epoch)."""

    connect_ns: int
    connected_ns: int | None
    warmed_ns: int | None
    post_sent_ns: int | None
    accepted_ns: int | None
    get_sent_ns: int | None
    stats: StreamStats
    error: str | None = None
    generation_id: str | None = None
    cross: bool = False  # read on another node than the one it was started on


@dataclass(slots=True)
class LiveClientResult:
    """Everything one client process measured."""

    streams: list[StreamRecord] = field(default_factory=list)
    latencies: array[int] = field(default_factory=lambda: array("q"))  # read where started
    cross_latencies: array[int] = field(default_factory=lambda: array("q"))  # on another node
    schedule_latencies: array[int] = field(default_factory=lambda: array("q"))
    open_started: float = 0.0  # wall clock: first connect
    open_finished: float = 0.0  # wall clock: last connection warmed
    started: float = 0.0  # wall clock: "go"
    finished: float = 0.0  # wall clock: the last stream ended (or the deadline hit)
    cpu_run: float = 0.0  # CPU seconds of this process from "go" to the end
    cpu_parse: float = 0.0  # CPU seconds spent parsing afterwards
    deadline_hit: bool = False
    loop: str = ""


@dataclass(slots=True)
class _Stream:
    """One stream's connections: ``reader`` reads it and, unless ``poster`` (on another node)
    does, starts it."""

    reader: Recorder | None = None
    poster: Recorder | None = None

    def start(self) -> None:
        """Send the stream's POST."""
        starter = self.poster or self.reader
        if starter is not None:
            starter.start()

    def record(self, spec: LiveSpec, result: LiveClientResult) -> StreamRecord:
        """Parse what the reader recorded (its token latencies go into ``result``)."""
        reader, poster = self.reader, self.poster
        if reader is None:
            return StreamRecord(
                0, None, None, None, None, None, StreamStats(), "not opened before the deadline"
            )
        stats = parse_reads(
            reader.reads,
            expect_offset=0,
            stamps=spec.stamps,
            latencies=result.latencies if poster is None else result.cross_latencies,
            end_ns=reader.end_ns,
            rate=spec.rate,
            schedule_latencies=result.schedule_latencies,
        )
        reader.reads = []
        starter = poster or reader
        warmed = [r.warmed_ns for r in (reader, poster) if r is not None]
        return StreamRecord(
            connect_ns=reader.connect_ns,
            connected_ns=reader.connected_ns,
            warmed_ns=None if None in warmed else max(w for w in warmed if w is not None),
            post_sent_ns=starter.post_sent_ns,
            accepted_ns=starter.accepted_ns,
            get_sent_ns=reader.get_sent_ns,
            stats=stats,
            error=reader.error or starter.error,
            generation_id=reader.generation_id or starter.generation_id,
            cross=poster is not None,
        )


def _pair(poster: Recorder, reader: Recorder) -> None:
    """Have ``reader`` follow the generation ``poster`` starts, and give up on it when the
    poster's connection ends without one."""
    poster.on_accepted = reader.follow

    def gone(_: object) -> None:
        if reader.state == "idle":
            reader.drop(f"never followed: {poster.error or 'the POST connection closed'}")

    poster.closed.add_done_callback(gone)


async def _live(spec: LiveSpec, conn: Connection) -> LiveClientResult:
    loop = asyncio.get_running_loop()
    result = LiveClientResult(loop=type(loop).__module__.split(".")[0])
    window = asyncio.Semaphore(max(1, spec.open_window))
    recorders: list[Recorder] = []  # every connection
    streams = [_Stream() for _ in range(spec.streams)]

    async def connect(port: int, *, warm: bool, post: bool) -> Recorder:
        recorder = Recorder(
            f"{spec.host}:{port}",
            get_path="/v1/generations/{id}/events",
            post_body=spec.post_body if post else None,
            warm=warm,
        )
        recorders.append(recorder)
        try:
            await loop.create_connection(lambda: recorder, spec.host, port)
        except OSError as exc:
            recorder.abandon(f"connect failed: {exc!r}")
        return recorder

    async def open_one(index: int, *, warm: bool, at: float, rate: float) -> None:
        if rate > 0:
            delay = at + index / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        async with window:
            stream = streams[index]
            if spec.crosses(index):  # read on the other node, started here
                stream.reader = await connect(spec.follow_port, warm=True, post=False)
                stream.poster = await connect(spec.port, warm=True, post=True)
                _pair(stream.poster, stream.reader)
                await asyncio.wait([stream.reader.ready, stream.poster.ready])
                return
            stream.reader = await connect(spec.port, warm=warm, post=True)
            # Warm: until /healthz answered. Lazy: until the GET is sent (the 202 came back).
            await (stream.reader.ready if warm else stream.reader.opened)

    async def wait_all(futures: list[asyncio.Future[None]]) -> bool:
        """Whether all finished before the deadline."""
        if not futures:
            return True
        _, pending = await asyncio.wait(futures, timeout=max(0.0, spec.deadline - time.time()))
        return not pending

    delay = spec.open_at - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    result.open_started = time.time()
    opens: list[asyncio.Future[None]] = []
    if spec.warm:
        opens = [
            asyncio.ensure_future(open_one(i, warm=True, at=spec.open_at, rate=spec.open_rate))
            for i in range(spec.streams)
        ]
    ok = await wait_all(list(opens))
    result.open_finished = time.time()
    conn.send(("opened", result.open_finished, sum(1 for r in recorders if r.state == "idle")))
    go_at: float = (await loop.run_in_executor(None, conn.recv))[1] if ok else time.time()

    cpu0 = cpu_seconds()
    result.started = go_at
    if ok and spec.warm:
        delay = go_at + spec.start_offset - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if spec.start_rate > 0:
            for i, stream in enumerate(streams):
                due = go_at + spec.start_offset + i / spec.start_rate - time.time()
                if due > 0:
                    await asyncio.sleep(due)
                stream.start()
        else:
            for stream in streams:
                stream.start()
        ok = await wait_all([r.closed for r in recorders])
    elif ok:  # lazy: connect and POST in one go, at the start rate, while others stream
        at = go_at + spec.start_offset
        opens = [
            asyncio.ensure_future(open_one(i, warm=False, at=at, rate=spec.start_rate))
            for i in range(spec.streams)
        ]
        ok = await wait_all(list(opens)) and await wait_all([r.closed for r in recorders])
    if not ok:
        result.deadline_hit = True
        for recorder in recorders:
            if not recorder.closed.done() and recorder.transport is not None:
                recorder.transport.abort()
                recorder.error = recorder.error or f"aborted at the deadline ({recorder.state})"
        for task in opens:
            task.cancel()
        await asyncio.wait(opens, timeout=5.0)
    ends = [r.end_ns for r in recorders if r.end_ns is not None]
    result.finished = max(ends) / 1e9 if ends and ok else time.time()
    result.cpu_run = cpu_seconds() - cpu0
    conn.send(("done", result.finished, result.cpu_run))

    cpu1 = cpu_seconds()
    result.streams = [stream.record(spec, result) for stream in streams]
    result.cpu_parse = cpu_seconds() - cpu1
    return result


def run_live_client(spec: LiveSpec, conn: Connection) -> None:
    """Client process entry point; talks to the parent over ``conn`` (duplex).

    Sends ``("opened", t, n)`` after the open phase and waits for ``("go", t)``; sends
    ``("done", finished, cpu)`` as soon as the streams ended (so the parent reads the server's
    counters at that moment), then ``("result", LiveClientResult)`` after parsing.
    """
    loop = new_loop(spec.loop)
    try:
        result = loop.run_until_complete(_live(spec, conn))
        conn.send(("result", result))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        loop.close()
        conn.close()
