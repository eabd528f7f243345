"""Parsing of recorded HTTP/1.1 SSE responses, after a run: de-chunking, SSE framing, stamps and
id checks.

The spine's clients (``bench/_live_client.py``, and the resume reads) only record
``(receipt time, bytes)`` per socket read while the servers are measured; everything here runs
afterwards, fed read by read with each read's receipt time, so the latencies are exactly those
the client saw on the wire. ``ChunkedDecoder`` is also what ``bench/_client.py`` de-chunks
streamed responses with.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass

DELTA_PREFIX = b'{"type":"delta","text":"'
DELTA_SUFFIX = b'"}'
TERMINAL = frozenset({"completed", "failed", "cancelled", "interrupted"})

Read = tuple[int, bytes]


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
