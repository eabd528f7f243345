"""Raw HTTP fuzzing: requests no schema would generate (any method on any route, broken
query strings, hostile header values, bodies that are not JSON, not UTF-8 or not what the
route takes), sent over plain sockets, one connection each. The server must answer every one
with a status below 500 (or refuse the bytes at the HTTP layer)."""

from __future__ import annotations

import random
import socket
from collections import Counter
from dataclasses import dataclass, field

PATHS = (
    "/v1/generations",
    "/v1/generations/{gen}",
    "/v1/generations/{gen}/events",
    "/v1/generations/{gen}/cancel",
    "/v1/sessions",
    "/v1/sessions/{ses}",
    "/v1/sessions/{ses}/messages",
    "/v1/sessions/{ses}/events",
    "/v1/stream/fuzzed",
    "/v1/stream/{gen}",
    "/v1/stream/%ff%fe",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/nowhere",
)
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "FOO")
QUERIES = (
    "",
    "?offset=1",
    "?offset=-1",
    "?offset=now&live=sse",
    "?offset=-1&live=long-poll",
    "?text_offset=5",
    "?limit=0",
    "?status=nope",
    "?offset=%ff",
    "?limit=%00",
    "?offset=0000000000000000_0000000000000000",
    "?a=%zz&a=1",
)
BODIES = (
    b"",
    b"{}",
    b"[]",
    b"null",
    b'{"prompt": "hi", "params": {"max_tokens": 2}}',
    b"\xff\xfe",
    b'{"content": "x"}',
    b'{"context": {"a": 1}}',
    b'"\\ud800"',
    b"1e999",
    b"{" * 100,
    b'{"title": "t", "on_busy": "queue"}',
    b'{"context": {"x": NaN}}',
    b"[" * 70 + b"]" * 70,
)
HEADER_NAMES = (
    b"Content-Type",
    b"Last-Event-ID",
    b"Accept",
    b"Stream-TTL",
    b"Stream-Expires-At",
    b"Stream-Seq",
    b"Producer-Id",
    b"Producer-Epoch",
    b"Producer-Seq",
    b"Stream-Forked-From",
    b"Stream-Fork-Offset",
    b"Stream-Fork-Sub-Offset",
    b"If-None-Match",
    b"Idempotency-Key",
    b"Stream-Closed",
    b"Authorization",
)
HEADER_VALUES = (
    b"",
    b"\xff\xfe",
    b"application/json",
    b"text/event-stream",
    b"application/merge-patch+json",
    b"-1",
    b"99999999999999999999",
    b"0000000000000000_0000000000000001",
    b"true",
    b"\xc3\xa9",
    b"gen_x:5",
    b"*",
    b"Bearer \xff",
    b"/v1/stream/fuzzed",
    b"2026-13-45T99:00:00Z",
)


@dataclass
class RawFuzzResult:
    """Statuses seen (``none`` for an answer that was not HTTP, ``timeout``) and the first
    requests that got a 5xx."""

    statuses: Counter[str] = field(default_factory=Counter)
    server_errors: list[bytes] = field(default_factory=list)

    @property
    def requests(self) -> int:
        """How many requests were sent."""
        return sum(self.statuses.values())


def build_request(rnd: random.Random, api_key: str | None, ids: dict[str, str]) -> bytes:
    """One random request, as bytes on the wire."""
    path = rnd.choice(PATHS).format(**ids) + rnd.choice(QUERIES)
    body = rnd.choice(BODIES)
    headers = [(b"Host", b"fuzz")]
    if api_key is not None and rnd.random() < 0.95:
        headers.append((b"Authorization", b"Bearer " + api_key.encode()))
    headers += [
        (rnd.choice(HEADER_NAMES), rnd.choice(HEADER_VALUES)) for _ in range(rnd.randrange(4))
    ]
    headers += [(b"Content-Length", b"%d" % len(body)), (b"Connection", b"close")]
    head = b"%s %s HTTP/1.1\r\n" % (rnd.choice(METHODS).encode(), path.encode())
    return head + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body


def send(host: str, port: int, request: bytes, *, timeout: float) -> str:
    """Send one request; the answer's status (``none`` or ``timeout`` otherwise)."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
            sock.sendall(request)
            answer = b""
            while len(answer) < 64 and (chunk := sock.recv(4096)):
                answer += chunk
        except TimeoutError:
            return "timeout"
        except OSError:
            return "none"
    parts = answer.split(b" ", 2)
    return parts[1].decode() if answer.startswith(b"HTTP/1.1 ") and len(parts) > 1 else "none"


def raw_fuzz(
    host: str,
    port: int,
    *,
    requests: int,
    api_key: str | None,
    ids: dict[str, str],
    seed: int = 0,
    timeout: float = 5.0,
) -> RawFuzzResult:
    """Send ``requests`` random requests (``ids``: ``gen`` and ``ses`` to aim at)."""
    rnd = random.Random(seed)
    result = RawFuzzResult()
    for _ in range(requests):
        request = build_request(rnd, api_key, ids)
        status = send(host, port, request, timeout=timeout)
        result.statuses[status] += 1
        if status.startswith("5") and len(result.server_errors) < 10:
            result.server_errors.append(request[:400])
    return result
