"""Resume: time to first byte and catch-up speed of a finished 100k-token generation."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench._client import Recorder, run_coroutine
from bench._live import PROMPT
from bench._parse import StreamStats, parse_reads
from bench._servers import (
    Server,
    keepstream_server,
    post_json,
)
from client import TERMINAL_STATUSES, Delta, Generation, KeepstreamClient

RESUME_BATCH = 10_000  # events per append when preparing the one-token-per-event stream
RESUME_READ_TIMEOUT = 60.0


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
    recorder = Recorder(f"{host}:{port}", get_path=path)
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


@dataclass
class ResumeOutcome:
    """Repeated full reads of one finished stream."""

    shape: str
    tokens_expected: int
    reads: list[ResumeRead] = field(default_factory=list)
    note: str = ""

    def median(self, fn: Callable[[ResumeRead], float | None]) -> float | None:
        """The median of ``fn`` over the reads that have it."""
        values = [v for v in map(fn, self.reads) if v is not None]
        return statistics.median(values) if values else None

    @staticmethod
    def catch_up(read: ResumeRead) -> float | None:
        """Tokens per second of one full read."""
        total = read.total_s
        return read.stats.tokens / total if total else None


async def prepare_one_token_per_event(db: Path, tokens: int) -> tuple[str, int]:
    """Write a finished generation with one token per delta event straight into ``db``.

    Uses the store API (as the brief asks) with the simulated model's own text; returns the
    generation id and the number of events.
    """
    from store import GenerationRecord, StreamStore
    from streaming import (
        ChatMessage,
        GenerationRequest,
        GenerationRun,
        SimulatedProvider,
        encode_event,
        new_generation_id,
        status_event,
    )

    params = {"tokens_per_second": 0, "max_tokens": tokens}
    request = GenerationRequest((ChatMessage("user", PROMPT),), params=params)
    provider = SimulatedProvider(tokens_per_second=0, max_tokens=tokens)
    generation_id = new_generation_id()
    run = GenerationRun(generation_id)
    texts = [chunk.text async for chunk in provider.stream(request, run=run) if chunk.text]
    now = time.time()
    async with StreamStore(str(db), flush_interval=0) as store:
        await store.create_generation(
            GenerationRecord(
                id=generation_id,
                stream_id=generation_id,
                status="running",
                provider="simulated",
                request=request.to_json(),
                created_at=now,
                started_at=now,
            )
        )
        await store.append(generation_id, [encode_event(status_event("running"))])
        for i in range(0, len(texts), RESUME_BATCH):
            await store.append(
                generation_id,
                [encode_event({"type": "delta", "text": t}) for t in texts[i : i + RESUME_BATCH]],
            )
        usage = {"input_tokens": len(PROMPT.split()), "output_tokens": tokens}
        final = encode_event(status_event("completed", usage=usage))
        result = await store.append(generation_id, [final], close=True)
        await store.update_generation(
            generation_id,
            {
                "status": "completed",
                "text": "".join(texts),
                "next_offset": result.next_offset,
                "finished_at": time.time(),
            },
        )
    return generation_id, result.next_offset


def wait_completed(server: Server, generation_id: str, *, timeout: float) -> Generation:
    """Poll a generation's snapshot (with keepstream's Python client) until it is terminal."""
    deadline = time.monotonic() + timeout
    with KeepstreamClient(server.url) as ks:
        while True:
            snapshot = ks.get_generation(generation_id)
            if snapshot.status in TERMINAL_STATUSES:
                return snapshot
            if time.monotonic() > deadline:
                raise TimeoutError(f"generation {generation_id} still {snapshot.status}")
            time.sleep(0.1)


def client_catch_up(server: Server, generation_id: str) -> tuple[float, float, int]:
    """A full resume through keepstream's Python client, as a desktop app would read it:
    (seconds to the first delta, seconds in all, characters)."""
    first: float | None = None
    chars = 0
    with KeepstreamClient(server.url, timeout=RESUME_READ_TIMEOUT) as ks:
        start = time.perf_counter()
        for event in ks.follow_generation(generation_id):
            if isinstance(event, Delta):
                if first is None:
                    first = time.perf_counter() - start
                chars += len(event.text)
        total = time.perf_counter() - start
    return first if first is not None else total, total, chars


def resume_bench(
    opts: argparse.Namespace, workdir: Path, *, global_deadline: float, out: Callable[[str], None]
) -> list[ResumeOutcome]:
    """Both resume shapes against one server on one database."""
    tokens = opts.resume_tokens
    db = workdir / "resume.db"
    t = time.perf_counter()
    one_each_id, one_each_events = run_coroutine("asyncio", prepare_one_token_per_event(db, tokens))
    out(
        f"  prepared (b) {one_each_id}: {tokens:,} tokens in {one_each_events:,} events, "
        f"written with the store API in {time.perf_counter() - t:.1f} s"
    )
    server = keepstream_server(
        workdir,
        rate=0,
        tokens=tokens,
        capacity=16,
        flush_interval=opts.flush_interval,
        db=db,
        loop=opts.server_loop,
        http=opts.server_http,
        extra_args=opts.ks_arg,
    ).start()
    try:
        t = time.perf_counter()
        status, body = post_json(
            f"{server.url}/v1/generations",
            {"prompt": PROMPT, "params": {"tokens_per_second": 0, "max_tokens": tokens}},
        )
        if status != 202:
            raise RuntimeError(f"POST answered {status}: {body}")
        coalesced_id = body["id"]
        snapshot = wait_completed(
            server, coalesced_id, timeout=min(120.0, max(1.0, global_deadline - time.time()))
        )
        out(
            f"  created (a) {coalesced_id} through the server at tokens_per_second=0: "
            f"{snapshot.status}, {snapshot.next_offset:,} events, "
            f"{time.perf_counter() - t:.1f} s to generate"
        )
        outcomes = [
            ResumeOutcome(
                "(a) server-made, coalesced", tokens, note=f"{snapshot.next_offset:,} events"
            ),
            ResumeOutcome("(b) one token per event", tokens, note=f"{one_each_events:,} events"),
        ]
        for outcome, generation_id in zip(outcomes, (coalesced_id, one_each_id), strict=True):
            path = f"/v1/generations/{generation_id}/events?offset=0"
            for _ in range(opts.resume_runs):
                if time.time() > global_deadline:
                    out("  DEADLINE HIT: resume reads cut short")
                    break
                read: ResumeRead = run_coroutine(
                    opts.loop,
                    read_stream(
                        "127.0.0.1", server.port, path, offset=0, limit=RESUME_READ_TIMEOUT
                    ),
                )
                outcome.reads.append(read)
            # The same read through the Python client (SSE parsing and typed events in
            # Python): what an app using it gets, beside the raw reader's figure above.
            first, total, chars = client_catch_up(server, generation_id)
            out(
                f"  {outcome.shape} via keepstream's Python client: first delta "
                f"{first * 1000:.1f} ms, all {chars:,} characters in {total:.2f} s "
                f"({tokens / total:,.0f} tokens/s)"
            )
    finally:
        server.kill()
        if not opts.keep_dir:
            server.remove_database()
    return outcomes
