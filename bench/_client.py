"""A lean HTTP/1.1 SSE client for the benchmarks: raw asyncio protocols, no HTTP library.

While a run is measured, a connection only *records* what arrives: ``(receipt time, bytes)``
per socket read. Parsing (de-chunking, SSE framing, stamps, id checks) happens afterwards,
fed read by read with each read's receipt time, so the latencies are exactly those the client
saw on the wire, and the client spends as little CPU as possible while the servers are being
measured. This deliberately differs from parsing in ``data_received``: at 50k events/s a
Python parser in the loop would cost the client most of a core on a 2-core machine, and a
busy client inflates the very latencies it measures.

One live stream is one connection: ``POST /v1/generations`` (keep-alive), then
``GET /v1/generations/{id}/events`` with ``Connection: close`` on the same socket, so the
server's close marks the end of the stream.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

DELTA_PREFIX = b'{"type":"delta","text":"'
DELTA_SUFFIX = b'"}'
TERMINAL = frozenset({"completed", "failed", "cancelled", "interrupted"})

Read = tuple[int, bytes]


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """An event loop: uvloop when asked for and installed, else plain asyncio."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- parsing (after the run) ---------------------------------------------------------------------


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder."""

    __slots__ = ("_buf", "_need_crlf", "_remaining", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0
        self._need_crlf = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The body bytes carried by ``data`` (and what was held back before it)."""
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos = 0
        end = len(buf)
        while not self.done:
            if self._remaining:
                take = min(self._remaining, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining:
                    break
                self._need_crlf = True
            if self._need_crlf:
                if end - pos < 2:
                    break
                pos += 2
                self._need_crlf = False
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(buf[pos:line_end].split(b";", 1)[0], 16)
            pos = line_end + 2
            if size == 0:
                self.done = True
                break
            self._remaining = size
        self._buf = buf[pos:]
        return b"".join(out)


@dataclass(slots=True)
class StreamStats:
    """What one SSE response carried, as parsed after the run."""

    status_code: int = 0
    events: int = 0
    delta_events: int = 0
    tokens: int = 0
    gaps: int = 0
    duplicates: int = 0
    first_id: int | None = None
    last_id: int | None = None
    final_status: str | None = None
    first_byte_ns: int | None = None
    first_event_ns: int | None = None
    first_token_ns: int | None = None
    last_token_ns: int | None = None
    end_ns: int | None = None
    first_stamp_ns: int | None = None
    last_stamp_ns: int | None = None
    body_bytes: int = 0
    error: str | None = None


class SSEParser:
    """Feeds (receipt time, bytes) reads of one HTTP response; fills a ``StreamStats``.

    ``expect_offset`` is the offset the stream was requested from: the first ``id:`` must be
    ``expect_offset + 1`` and each next one one more. With ``stamps``, every token of a delta
    is a ``time.time_ns()`` stamp and its latency (receipt - stamp) goes into ``latencies``.
    With ``rate`` as well, token *i* of the stream was due at (first stamp + i / rate), and
    receipt - due goes into ``schedule_latencies``: unlike the stamp, this also counts a model
    that fell behind its rate because the server's loop was too busy to run it.
    """

    def __init__(
        self,
        *,
        expect_offset: int,
        stamps: bool,
        latencies: array[int] | None,
        rate: float = 0.0,
        schedule_latencies: array[int] | None = None,
    ) -> None:
        self.stats = StreamStats()
        self._expect = expect_offset + 1
        self._stamps = stamps
        self._latencies = latencies
        self._interval_ns = 1e9 / rate if rate > 0 else 0.0
        self._schedule_latencies = schedule_latencies if rate > 0 else None
        self._head = b""
        self._in_body = False
        self._chunked = False
        self._decoder = ChunkedDecoder()
        self._pending = b""

    def feed(self, t_ns: int, data: bytes) -> None:
        """Take one read received at ``t_ns``."""
        stats = self.stats
        if stats.first_byte_ns is None:
            stats.first_byte_ns = t_ns
        if not self._in_body:
            self._head += data
            split = self._head.find(b"\r\n\r\n")
            if split < 0:
                return
            head, data = self._head[:split], self._head[split + 4 :]
            self._head = b""
            self._in_body = True
            lines = head.split(b"\r\n")
            try:
                stats.status_code = int(lines[0].split(b" ", 2)[1])
            except (IndexError, ValueError):
                stats.error = f"bad status line {lines[0][:80]!r}"
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                    self._chunked = True
        body = self._decoder.feed(data) if self._chunked else data
        if not body:
            return
        stats.body_bytes += len(body)
        buf = self._pending + body if self._pending else body
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._event(t_ns, buf[start:end])
            start = end + 2
        self._pending = buf[start:]

    def _event(self, t_ns: int, block: bytes) -> None:
        stats = self.stats
        event_id: int | None = None
        name = b"message"
        data: bytes | None = None
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                data = line[6:] if data is None else data + b"\n" + line[6:]
            elif line.startswith(b"id: "):
                event_id = int(line[4:])
            elif line.startswith(b"event: "):
                name = line[7:]
        if data is None:
            return  # retry: line, ping comment
        stats.events += 1
        if stats.first_event_ns is None:
            stats.first_event_ns = t_ns
        if event_id is not None:
            if stats.first_id is None:
                stats.first_id = event_id
            if event_id > self._expect:
                stats.gaps += 1
            elif event_id < self._expect:
                stats.duplicates += 1
            self._expect = event_id + 1
            stats.last_id = event_id
        if name == b"delta":
            stats.delta_events += 1
            if data.startswith(DELTA_PREFIX) and data.endswith(DELTA_SUFFIX):
                text = data[len(DELTA_PREFIX) : -len(DELTA_SUFFIX)]
            else:
                text = str(json.loads(data).get("text", "")).encode()
            count = text.count(b" ")
            if count:
                stats.tokens += count
                stats.last_token_ns = t_ns
                if stats.first_token_ns is None:
                    stats.first_token_ns = t_ns
                if self._stamps:
                    stamps = [int(s) for s in text.split()]
                    if stats.first_stamp_ns is None:
                        stats.first_stamp_ns = stamps[0]
                    stats.last_stamp_ns = stamps[-1]
                    if self._latencies is not None:
                        self._latencies.extend([t_ns - s for s in stamps])
                    if self._schedule_latencies is not None:
                        first, step = stats.first_stamp_ns, self._interval_ns
                        done = stats.tokens - count  # tokens of this stream before these
                        self._schedule_latencies.extend(
                            [t_ns - int(first + (done + i) * step) for i in range(count)]
                        )
        elif name == b"status":
            status = json.loads(data).get("status")
            if isinstance(status, str) and status in TERMINAL:
                stats.final_status = status


def parse_reads(
    reads: list[Read],
    *,
    expect_offset: int,
    stamps: bool,
    latencies: array[int] | None,
    end_ns: int | None,
    rate: float = 0.0,
    schedule_latencies: array[int] | None = None,
) -> StreamStats:
    """Parse one recorded response (see ``SSEParser``)."""
    parser = SSEParser(
        expect_offset=expect_offset,
        stamps=stamps,
        latencies=latencies,
        rate=rate,
        schedule_latencies=schedule_latencies,
    )
    try:
        for t_ns, data in reads:
            parser.feed(t_ns, data)
    except ValueError as exc:
        parser.stats.error = f"parse error: {exc}"
    parser.stats.end_ns = end_ns
    return parser.stats


# -- recording (during the run) ------------------------------------------------------------------


def _request(
    method: str,
    path: str,
    host: str,
    *,
    body: bytes = b"",
    close: bool = False,
    accept: str | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if accept:
        lines.append(f"Accept: {accept}")
    if body:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Recorder(asyncio.Protocol):
    """One connection, as a small state machine.

    ``warm`` (optional): ``GET /healthz`` on keep-alive, to have the server *accept* the
    connection before the measured phase. ``post`` (optional): ``POST /v1/generations``,
    whose 202 names the stream. ``stream``: one ``GET`` with ``Connection: close`` whose every
    read is recorded with its receipt time until the server closes.
    """

    def __init__(
        self, host: str, *, get_path: str, post_body: bytes | None = None, warm: bool = False
    ) -> None:
        loop = asyncio.get_running_loop()
        self.host = host
        self.get_path = get_path
        self.post_body = post_body
        self.transport: asyncio.Transport | None = None
        self.reads: list[Read] = []
        self.state = "connecting"
        self.ready: asyncio.Future[None] = loop.create_future()  # warmed (or failed)
        self.opened: asyncio.Future[None] = loop.create_future()  # GET sent (or failed)
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: str | None = None
        self.generation_id: str | None = None
        self._warm = warm
        self._buf = b""
        self.connect_ns = time.time_ns()
        self.connected_ns: int | None = None
        self.warmed_ns: int | None = None
        self.post_sent_ns: int | None = None
        self.accepted_ns: int | None = None  # the 202
        self.get_sent_ns: int | None = None
        self.end_ns: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        """Start the first request: the warm-up, the POST, or the GET."""
        self.transport = cast(asyncio.Transport, transport)
        self.connected_ns = time.time_ns()
        if self._warm:
            self.state = "warm"
            self.transport.write(_request("GET", "/healthz", self.host))
        elif self.post_body is not None:
            self.start()
        else:
            self._send_get()

    def start(self) -> None:
        """Send the POST (after warming); the GET follows its 202."""
        if self.state != "idle" and self.state != "connecting" and self.state != "warm":
            return
        if self.transport is None or self.transport.is_closing():
            self._fail(f"connection gone before the POST (state {self.state})")
            return
        assert self.post_body is not None
        self.state = "post"
        self.post_sent_ns = time.time_ns()
        self.transport.write(_request("POST", "/v1/generations", self.host, body=self.post_body))

    def _send_get(self) -> None:
        assert self.transport is not None
        self.state = "stream"
        self.get_sent_ns = time.time_ns()
        self.transport.write(
            _request("GET", self.get_path, self.host, close=True, accept="text/event-stream")
        )
        _resolve(self.opened)

    def _fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
        _resolve(self.ready)
        _resolve(self.opened)
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Record a read of the stream, or complete the pending response."""
        if self.state == "stream":
            self.reads.append((time.time_ns(), data))  # the whole hot path
            return
        self._buf += data
        response = _complete_response(self._buf)
        if response is None:
            return
        status, body = response
        self._buf = b""
        if self.state == "warm":
            self.warmed_ns = time.time_ns()
            if status != 200:
                self._fail(f"GET /healthz answered {status}")
                return
            self.state = "idle"
            _resolve(self.ready)
        elif self.state == "post":
            self.accepted_ns = time.time_ns()
            if status != 202:
                self._fail(f"POST answered {status}: {body[:200]!r}")
                return
            self.generation_id = json.loads(body)["id"]
            self.get_path = self.get_path.format(id=self.generation_id)
            self._send_get()
        else:
            self._fail(f"unexpected bytes in state {self.state}: {data[:80]!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        """Note the end (the server closes after the SSE response)."""
        self.end_ns = time.time_ns()
        if self.state != "stream" and self.error is None:
            self.error = f"closed by the server in state {self.state}" + (
                " (uvicorn's keep-alive timeout?)" if self.state == "idle" else ""
            )
        if exc is not None and self.error is None:
            self.error = f"connection lost: {exc!r}"
        self.state = "closed"
        _resolve(self.ready)
        _resolve(self.opened)
        _resolve(self.closed)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _complete_response(buf: bytes) -> tuple[int, bytes] | None:
    """(status, body) of a complete Content-Length response in ``buf``, else ``None``."""
    split = buf.find(b"\r\n\r\n")
    if split < 0:
        return None
    lines = buf[:split].split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = buf[split + 4 :]
    if len(body) < length:
        return None
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        status = 0
    return status, body[:length]


# -- live runs ------------------------------------------------------------------------------------


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


@dataclass(slots=True)
class LiveClientResult:
    """Everything one client process measured."""

    streams: list[StreamRecord] = field(default_factory=list)
    latencies: array[int] = field(default_factory=lambda: array("q"))
    schedule_latencies: array[int] = field(default_factory=lambda: array("q"))
    open_started: float = 0.0  # wall clock: first connect
    open_finished: float = 0.0  # wall clock: last connection warmed
    started: float = 0.0  # wall clock: "go"
    finished: float = 0.0  # wall clock: the last stream ended (or the deadline hit)
    cpu_run: float = 0.0  # CPU seconds of this process from "go" to the end
    cpu_parse: float = 0.0  # CPU seconds spent parsing afterwards
    deadline_hit: bool = False
    loop: str = ""


async def _live(spec: LiveSpec, conn: Connection) -> LiveClientResult:
    loop = asyncio.get_running_loop()
    result = LiveClientResult(loop=type(loop).__module__.split(".")[0])
    host = f"{spec.host}:{spec.port}"
    window = asyncio.Semaphore(max(1, spec.open_window))
    recorders: list[_Recorder] = []

    async def open_one(index: int, *, warm: bool, at: float, rate: float) -> None:
        if rate > 0:
            delay = at + index / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        async with window:
            recorder = _Recorder(
                host, get_path="/v1/generations/{id}/events", post_body=spec.post_body, warm=warm
            )
            recorders.append(recorder)
            try:
                await loop.create_connection(lambda: recorder, spec.host, spec.port)
            except OSError as exc:
                recorder.error = f"connect failed: {exc!r}"
                recorder.end_ns = time.time_ns()
                _resolve(recorder.ready)
                _resolve(recorder.opened)
                _resolve(recorder.closed)
                return
            # Warm: until /healthz answered. Lazy: until the GET is sent (the 202 came back).
            await (recorder.ready if warm else recorder.opened)

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
            for i, recorder in enumerate(recorders):
                due = go_at + spec.start_offset + i / spec.start_rate - time.time()
                if due > 0:
                    await asyncio.sleep(due)
                recorder.start()
        else:
            for recorder in recorders:
                recorder.start()
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
    for recorder in recorders:
        stats = parse_reads(
            recorder.reads,
            expect_offset=0,
            stamps=spec.stamps,
            latencies=result.latencies,
            end_ns=recorder.end_ns,
            rate=spec.rate,
            schedule_latencies=result.schedule_latencies,
        )
        recorder.reads = []
        result.streams.append(
            StreamRecord(
                connect_ns=recorder.connect_ns,
                connected_ns=recorder.connected_ns,
                warmed_ns=recorder.warmed_ns,
                post_sent_ns=recorder.post_sent_ns,
                accepted_ns=recorder.accepted_ns,
                get_sent_ns=recorder.get_sent_ns,
                stats=stats,
                error=recorder.error,
            )
        )
    for _ in range(spec.streams - len(recorders)):  # never opened before the deadline
        result.streams.append(
            StreamRecord(
                0,
                None,
                None,
                None,
                None,
                None,
                StreamStats(),
                error="not opened before the deadline",
            )
        )
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


# -- resume reads ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ResumeRead:
    """One full read of a finished stream from an offset."""

    sent_ns: int
    stats: StreamStats
    error: str | None = None

    @property
    def first_byte_s(self) -> float | None:
        """Time from sending the GET to the first response byte."""
        t = self.stats.first_byte_ns
        return None if t is None else (t - self.sent_ns) / 1e9

    @property
    def first_event_s(self) -> float | None:
        """Time from sending the GET to the read holding the first event."""
        t = self.stats.first_event_ns
        return None if t is None else (t - self.sent_ns) / 1e9

    @property
    def total_s(self) -> float | None:
        """Time from sending the GET to the end of the response."""
        t = self.stats.end_ns
        return None if t is None else (t - self.sent_ns) / 1e9


async def read_stream(host: str, port: int, path: str, *, offset: int, limit: float) -> ResumeRead:
    """GET ``path`` on a fresh connection and record it (``limit``: seconds per step)."""
    loop = asyncio.get_running_loop()
    recorder = _Recorder(f"{host}:{port}", get_path=path)
    # The GET is written in connection_made and the clock starts there, so the time to first
    # byte is the server's, not the TCP handshake's.
    try:
        await asyncio.wait_for(loop.create_connection(lambda: recorder, host, port), limit)
        await asyncio.wait_for(recorder.closed, limit)
    except (OSError, TimeoutError) as exc:
        if recorder.transport is not None:
            recorder.transport.abort()
        error: str | None = f"{type(exc).__name__}: {exc}"
    else:
        error = recorder.error
    sent = recorder.get_sent_ns or recorder.connect_ns
    stats = parse_reads(
        recorder.reads, expect_offset=offset, stamps=False, latencies=None, end_ns=recorder.end_ns
    )
    return ResumeRead(sent, stats, error or stats.error)


def run_coroutine(loop_kind: str, coro: Any) -> Any:
    """Run one coroutine on a fresh loop of ``loop_kind``."""
    loop = new_loop(loop_kind)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
