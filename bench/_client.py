"""The benchmarks' HTTP/1.1 load client: raw asyncio, no HTTP library.

An HTTP library's per-request CPU (1 to 3 ms for httpx) is both a bottleneck on a small
machine and part of every latency measured through it, so every benchmark drives its servers
through this module instead:

* ``LoadClient.request``: one request on a pooled keep-alive connection; the status, the
  headers (case-insensitive) and the whole body (``Content-Length``, chunked, or none).
* ``LoadClient.stream``: a streamed ``GET`` (SSE, say) on a connection of its own, each
  de-chunked read handed to a callback with its receipt time (``time.perf_counter_ns()``).
* ``Recorder``: one connection that only *records* ``(time.time_ns(), bytes)`` per read of
  its response, parsed after the run (``bench/_parse.py``): the spine's live runs and resume
  reads, where a parser in the loop would cost the client most of a core at 50k events/s and
  a busy client inflates the very latencies it measures.

Also the event loop (uvloop when asked for) and CPU helpers every client process uses.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from bench._parse import ChunkedDecoder, Read

DEFAULT_TIMEOUT = 30.0  # seconds for one request, or for a stream's head and each of its reads
IDLE_REUSE_LIMIT = 4.0  # uvicorn closes keep-alive connections idle for 5 s: not reused after this
READ_BYTES = 65_536
HEAD_END = b"\r\n\r\n"
JSON_HEADERS = {"Content-Type": "application/json"}
SSE_HEADERS = {"Accept": "text/event-stream"}
# Sent with a Content-Length even when empty, as browsers and httpx do.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# What failing I/O raises; TimeoutError is an OSError.
IO_ERRORS = (OSError, EOFError, asyncio.LimitOverrunError)

T = TypeVar("T")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """An event loop: uvloop when asked for and installed, else plain asyncio."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_coroutine(loop_kind: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh loop of ``loop_kind``."""
    loop = new_loop(loop_kind)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def cpu_seconds() -> float:
    """User + system CPU of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- requests and streams -------------------------------------------------------------------------


class BenchHTTPError(Exception):
    """A request that failed: no connection, a timeout, an early close, a malformed answer."""


class Headers(Mapping[str, str]):
    """A response's headers; names are looked up case-insensitively."""

    __slots__ = ("_items",)

    def __init__(self, items: dict[str, str]) -> None:
        self._items = items  # lower-cased names

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass(frozen=True, slots=True)
class Response:
    """One answer: ``received_ns`` is ``time.perf_counter_ns()`` once it was complete (for a
    stream, once its head had arrived)."""

    status: int
    headers: Headers
    body: bytes
    received_ns: int


def encode_request(
    method: str,
    path: str,
    host: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    close: bool = False,
) -> bytes:
    """The bytes of one HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if headers:
        lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method in BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close" if close else "Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def parse_head(head: bytes) -> tuple[int, Headers]:
    """Status and headers of a response head (ending in a blank line)."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise BenchHTTPError(f"bad status line {lines[0][:80]!r}") from None
    items: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        key = name.strip().lower()
        items[key] = f"{items[key]}, {value.strip()}" if key in items else value.strip()
    return status, Headers(items)


def _has_body(method: str, status: int) -> bool:
    return method != "HEAD" and status >= 200 and status not in (204, 304)


def _is_chunked(headers: Headers) -> bool:
    return "chunked" in headers.get("transfer-encoding", "").lower()


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BenchHTTPError(f"bad Content-Length {value!r}") from None


async def _read_body(
    reader: asyncio.StreamReader, method: str, status: int, headers: Headers
) -> bytes:
    """The whole body: chunked, ``Content-Length``, none, or up to the server's close."""
    if not _has_body(method, status):
        return b""
    if _is_chunked(headers):
        parts: list[bytes] = []
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0], 16)
            except ValueError:
                raise BenchHTTPError(f"bad chunk size line {line[:80]!r}") from None
            if size == 0:
                break
            parts.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return b"".join(parts)
    length = _content_length(headers)
    if length is not None:
        return await reader.readexactly(length)
    return await reader.read()


def _describe(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"


class _Connection:
    __slots__ = ("last_used", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()


class LoadClient:
    """HTTP/1.1 to one server (``base_url``, ``http://host:port``) on asyncio streams, with
    at most ``connections`` connections at once; requests reuse idle ones (keep-alive).

    Every failure of a call is a ``BenchHTTPError``; ``timeout`` bounds each call (see
    ``request`` and ``stream``). It sends no ``Accept-Encoding``, so no server compresses
    what it answers. One client belongs to one event loop.
    """

    def __init__(
        self, base_url: str, *, connections: int, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        url = urlsplit(base_url)
        if url.hostname is None or url.port is None:
            raise ValueError(f"not an http://host:port URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port
        self._authority = url.netloc
        self._timeout = timeout
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[_Connection] = []

    async def __aenter__(self) -> LoadClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        return _Connection(reader, writer)

    async def _checkout(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if time.monotonic() - conn.last_used < IDLE_REUSE_LIMIT and not conn.reader.at_eof():
                return conn
            conn.writer.close()
        return await self._open()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """One request on a pooled connection; the whole response. The client's ``timeout``
        bounds all of it, waiting for a free connection included."""
        try:
            async with asyncio.timeout(self._timeout):
                async with self._slots:
                    conn = await self._checkout()
                    try:
                        conn.writer.write(
                            encode_request(
                                method, path, self._authority, body=body, headers=headers
                            )
                        )
                        status, head = parse_head(await conn.reader.readuntil(HEAD_END))
                        content = await _read_body(conn.reader, method, status, head)
                    except BaseException:
                        conn.writer.close()
                        raise
                    received_ns = time.perf_counter_ns()
                    if head.get("connection", "").lower() == "close" or conn.reader.at_eof():
                        conn.writer.close()
                    else:
                        conn.last_used = time.monotonic()
                        self._idle.append(conn)
        except IO_ERRORS as exc:
            raise BenchHTTPError(f"{method} {path}: {_describe(exc)}") from exc
        except BenchHTTPError as exc:  # a malformed answer: say to what
            raise BenchHTTPError(f"{method} {path}: {exc}") from None
        return Response(status, head, content, received_ns)

    async def stream(
        self,
        path: str,
        on_read: Callable[[int, bytes], bool],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """``GET path`` on a new connection (``Connection: close``) taken from the same limit.

        Each read of a 200's body goes, de-chunked, to ``on_read(received_ns, data)``
        (``received_ns``: ``time.perf_counter_ns()`` right after the read) until it returns
        true, the body ends or the server closes; then the connection is closed. Any other
        status is read whole into the returned ``Response``'s body; for a 200 the body is
        empty. The client's ``timeout`` bounds the connect and the head, then each wait for a
        read.
        What ``on_read`` raises propagates as it is.

        A stream never borrows a pooled connection, since one dropped early cannot be reused:
        requests keep their warm connections, and their timings stay free of connects.
        """
        limit = self._timeout
        try:
            async with self._slots:
                async with asyncio.timeout(limit):
                    conn = await self._open()
                try:
                    conn.writer.write(
                        encode_request("GET", path, self._authority, headers=headers, close=True)
                    )
                    async with asyncio.timeout(limit):
                        status, head = parse_head(await conn.reader.readuntil(HEAD_END))
                        received_ns = time.perf_counter_ns()
                        if status != 200:
                            content = await _read_body(conn.reader, "GET", status, head)
                            return Response(status, head, content, received_ns)
                    await self._follow(conn.reader, head, on_read, limit)
                finally:
                    conn.writer.close()
        except IO_ERRORS as exc:
            raise BenchHTTPError(f"GET {path}: {_describe(exc)}") from exc
        except BenchHTTPError as exc:
            raise BenchHTTPError(f"GET {path}: {exc}") from None
        return Response(status, head, b"", received_ns)

    @staticmethod
    async def _follow(
        reader: asyncio.StreamReader,
        head: Headers,
        on_read: Callable[[int, bytes], bool],
        limit: float,
    ) -> None:
        decoder = ChunkedDecoder() if _is_chunked(head) else None
        remaining = None if decoder is not None else _content_length(head)
        while remaining is None or remaining > 0:
            async with asyncio.timeout(limit):
                data = await reader.read(READ_BYTES)
            received_ns = time.perf_counter_ns()
            if not data:
                return
            if decoder is not None:
                try:
                    data = decoder.feed(data)
                except ValueError as exc:
                    raise BenchHTTPError(f"bad chunked body: {exc}") from None
            elif remaining is not None:
                data = data[:remaining]
                remaining -= len(data)
            if data and on_read(received_ns, data):
                return
            if decoder is not None and decoder.done:
                return

    async def aclose(self) -> None:
        """Close every idle connection (the others close as their calls end)."""
        while self._idle:
            self._idle.pop().writer.close()


# -- recording (the spine) ------------------------------------------------------------------------


class Recorder(asyncio.Protocol):
    """One connection, as a small state machine.

    ``warm`` (optional): ``GET /healthz`` on keep-alive, to have the server *accept* the
    connection before the measured phase. ``post`` (optional): ``POST /v1/generations``,
    whose 202 names the stream. ``stream``: one ``GET`` with ``Connection: close`` whose every
    read is recorded with its receipt time until the server closes.

    A stream may also be read on another connection (another node, say): a posting
    recorder with ``on_accepted`` set hands the 202's id to it, e.g. to a warmed recorder's
    ``follow``, and closes instead of sending its own ``GET``.
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
        self.on_accepted: Callable[[str], None] | None = None
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
            self.transport.write(encode_request("GET", "/healthz", self.host))
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
        self.transport.write(
            encode_request(
                "POST", "/v1/generations", self.host, body=self.post_body, headers=JSON_HEADERS
            )
        )

    def follow(self, generation_id: str) -> None:
        """Stream ``generation_id``, started on another connection, on this warmed one."""
        if self.state != "idle" or self.transport is None or self.transport.is_closing():
            self._fail(f"connection not ready to follow (state {self.state})")
            return
        self.generation_id = generation_id
        self.get_path = self.get_path.format(id=generation_id)
        self._send_get()

    def drop(self, error: str) -> None:
        """Give up on this connection: note ``error`` and close it."""
        self._fail(error)

    def _send_get(self) -> None:
        assert self.transport is not None
        self.state = "stream"
        self.get_sent_ns = time.time_ns()
        self.transport.write(
            encode_request("GET", self.get_path, self.host, headers=SSE_HEADERS, close=True)
        )
        _resolve(self.opened)

    def abandon(self, error: str) -> None:
        """Give up on a connection that was never made: ``error``, and every wait ends."""
        self.error = self.error or error
        self.end_ns = time.time_ns()
        _resolve(self.ready)
        _resolve(self.opened)
        _resolve(self.closed)

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
            generation_id: str = json.loads(body)["id"]
            self.generation_id = generation_id
            if self.on_accepted is not None:  # read elsewhere: hand it over, close
                self.state = "handed over"
                self.on_accepted(generation_id)
                if self.transport is not None:
                    self.transport.close()
                return
            self.get_path = self.get_path.format(id=generation_id)
            self._send_get()
        else:
            self._fail(f"unexpected bytes in state {self.state}: {data[:80]!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        """Note the end (the server closes after the SSE response)."""
        self.end_ns = time.time_ns()
        if self.state not in ("stream", "handed over") and self.error is None:
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
