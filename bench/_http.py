"""Request/response clients for the sessions benchmark: httpx, or raw asyncio streams.

Both keep at most ``connections`` HTTP/1.1 connections and reuse them (keep-alive), and both
offer the same three calls, so the benchmark can say whether the client or the server limits a
figure by running it with each:

* ``request(method, path, body)`` → ``(status, body)``;
* ``first_delta(path)`` → the ``time.perf_counter()`` at which the first complete
  ``event: delta`` of an SSE response had arrived; the stream is then dropped (the generation
  keeps running on the server, which is what a client switching away does);
* ``aclose()``.

The raw client is deliberately small: ``Content-Length`` responses for requests, and for SSE a
search for ``event: delta`` followed by a blank line in the de-chunked body. keepstream writes
whole events per chunk, so a frame is never split in a way that search would miss.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import httpx

from bench._client import ChunkedDecoder, _request

REQUEST_TIMEOUT = 30.0  # seconds for one request or one wait for a first delta
IDLE_REUSE_LIMIT = 4.0  # uvicorn closes keep-alive connections idle for 5 s: not reused after this
SSE_READ_BYTES = 65_536
DELTA_MARK = b"event: delta\n"
JSON_HEADERS = {"Content-Type": "application/json"}


class BenchHTTPError(Exception):
    """A response the benchmark did not expect (status, framing, an early end)."""


class BenchClient(Protocol):
    """What the sessions benchmark needs from an HTTP client."""

    name: str

    async def request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes]: ...

    async def first_delta(self, path: str) -> float: ...

    async def aclose(self) -> None: ...


def delta_complete(body: bytes) -> bool:
    """Whether an SSE body holds a complete ``delta`` event (its terminating blank line)."""
    at = body.find(DELTA_MARK)
    return at >= 0 and body.find(b"\n\n", at) >= 0


class HttpxClient:
    """``httpx.AsyncClient`` with a connection limit (the default client)."""

    name = "httpx"

    def __init__(self, base_url: str, *, connections: int) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._client = httpx.AsyncClient(
            base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT, headers=JSON_HEADERS
        )

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request; the status and the whole body."""
        response = await self._client.request(method, path, content=body)
        return response.status_code, response.content

    async def first_delta(self, path: str) -> float:
        """Open the SSE response at ``path``; when its first delta event had arrived."""
        headers = {"Accept": "text/event-stream"}
        async with self._client.stream("GET", path, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                raise BenchHTTPError(f"GET {path} answered {response.status_code}")
            body = b""
            async for chunk in response.aiter_raw():
                body += chunk
                if delta_complete(body):
                    return time.perf_counter()
        raise BenchHTTPError(f"GET {path} ended without a delta event")

    async def aclose(self) -> None:
        """Close every connection."""
        await self._client.aclose()


class _Connection:
    __slots__ = ("last_used", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_used = time.monotonic()


def parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    """Status and lower-cased headers of a response head (ending in a blank line)."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise BenchHTTPError(f"bad status line {lines[0][:80]!r}") from None
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


class RawClient:
    """Keep-alive HTTP/1.1 on asyncio streams; no HTTP library (see the module docstring)."""

    name = "raw"

    def __init__(self, host: str, port: int, *, connections: int) -> None:
        self._host = host
        self._port = port
        self._authority = f"{host}:{port}"
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[_Connection] = []

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if time.monotonic() - conn.last_used < IDLE_REUSE_LIMIT:
                return conn
            conn.writer.close()
        reader, writer = await asyncio.open_connection(self._host, self._port)
        return _Connection(reader, writer)

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on a pooled connection; the status and the whole body."""
        async with self._slots:
            conn = await self._connection()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    conn.writer.write(_request(method, path, self._authority, body=body or b""))
                    status, headers = parse_head(await conn.reader.readuntil(b"\r\n\r\n"))
                    if b"content-length" not in headers:
                        raise BenchHTTPError(f"{method} {path}: no Content-Length")
                    content = await conn.reader.readexactly(int(headers[b"content-length"]))
            except BaseException:
                conn.writer.close()
                raise
            if headers.get(b"connection", b"").lower() == b"close":
                conn.writer.close()
            else:
                conn.last_used = time.monotonic()
                self._idle.append(conn)
            return status, content

    async def first_delta(self, path: str) -> float:
        """GET ``path`` (``Connection: close``) on a new connection; when its first delta
        event had arrived."""
        async with self._slots:
            reader, writer = await asyncio.open_connection(self._host, self._port)
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    writer.write(
                        _request(
                            "GET", path, self._authority, close=True, accept="text/event-stream"
                        )
                    )
                    status, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
                    if status != 200:
                        raise BenchHTTPError(f"GET {path} answered {status}")
                    chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
                    decoder = ChunkedDecoder() if chunked else None
                    body = b""
                    while data := await reader.read(SSE_READ_BYTES):
                        body += decoder.feed(data) if decoder is not None else data
                        if delta_complete(body):
                            return time.perf_counter()
            finally:
                writer.close()
        raise BenchHTTPError(f"GET {path} ended without a delta event")

    async def aclose(self) -> None:
        """Close every idle connection (the others close as their calls end)."""
        while self._idle:
            self._idle.pop().writer.close()
