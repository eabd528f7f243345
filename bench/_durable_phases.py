"""The phases of ``bench_durable.py`` against one started server: client processes, the paced
writer, and the figures each phase yields.

The parent starts ``procs`` client processes (spawned, ``bench._durable``), waits until they
report ready, then either runs the paced writer itself (latency) or sends them "go"
(throughput), and collects their tallies. Every wait has a deadline; client processes that are
still alive at the end of a phase are killed (by their own ``Process`` handle).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from bench._client import LoadClient, cpu_seconds, run_coroutine
from bench._durable import (
    CREATE_TIMEOUT,
    SETTLE_PER_READER,
    SETTLE_SECONDS,
    SSE_READY_TIMEOUT,
    STREAM_ROOT,
    AppenderSpec,
    AppenderTally,
    ReaderSpec,
    ReaderTally,
    Tally,
    appender_process,
    create_stream,
    paced_writer,
    reader_process,
    unique_name,
)
from bench._live import percentile
from bench._servers import CLOCK_TICKS, Server

CHILD_START_TIMEOUT = 30.0  # a client process must report ready within this (plus SSE's wait)
RESULT_GRACE = 10.0  # client processes get this long past the phase's deadline to report
JOIN_TIMEOUT = 5.0


def summary(values: array[float]) -> dict[str, float | None]:
    """p50, p90, p99, p99.9, max and count of already sorted ``values``."""
    return {
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "p999": percentile(values, 0.999),
        "max": values[-1] if values else None,
        "count": len(values),
    }


def share(total: int, parts: int, index: int) -> int:
    """The ``index``-th of ``parts`` near-equal shares of ``total``."""
    return total // parts + (1 if index < total % parts else 0)


@dataclass
class PhaseRun:
    """What every phase reports besides its own figures."""

    procs: int = 0
    errors: int = 0
    first_error: str | None = None
    wall: float = 0.0
    client_cores: float | None = None  # all client processes (and the writer), summed
    client_max_proc_cores: float | None = None  # the busiest client process
    server_cores: float | None = None
    cut_short: bool = False

    def fail(self, error: str) -> None:
        """Count a failure (the first one's message is kept)."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = error

    def absorb(self, tally: Tally) -> None:
        """Add one process's errors and cut-short flag."""
        self.errors += tally.errors
        if self.first_error is None:
            self.first_error = tally.first_error
        self.cut_short |= tally.cut_short

    def common_json(self) -> dict[str, Any]:
        """The fields above, for ``--json``."""
        return {
            "client_procs": self.procs,
            "errors": self.errors,
            "first_error": self.first_error,
            "wall_s": self.wall,
            "client_cores": self.client_cores,
            "client_max_proc_cores": self.client_max_proc_cores,
            "server_cores": self.server_cores,
            "cut_short": self.cut_short,
        }


@dataclass
class LatencyRun(PhaseRun):
    """One latency phase: a paced writer, ``readers`` followers in ``mode``, on one stream."""

    mode: str = "long-poll"
    readers: int = 0
    interval: float = 0.0
    planned: int = 0
    warmup: int = 0
    sent: int = 0
    append_span: float = 0.0
    delivered: int = 0
    gaps: int = 0
    duplicates: int = 0
    malformed: int = 0
    requests: int = 0
    reconnects: int = 0
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    post_ms: array[float] = field(default_factory=lambda: array("d"))

    @property
    def expected(self) -> int:
        """Messages the readers should have had: each append, once per reader."""
        return self.sent * self.readers

    @property
    def append_rate(self) -> float | None:
        """Appends per second the writer achieved (the target is 1 / interval)."""
        return (self.sent - 1) / self.append_span if self.sent > 1 and self.append_span else None

    def latency(self, q: float) -> float | None:
        """The ``q``-quantile of append -> receive latency, ms."""
        return percentile(self.latencies_ms, q)

    def as_json(self) -> dict[str, Any]:
        """Everything but the raw samples, which are summarised."""
        return {
            "mode": self.mode,
            "readers": self.readers,
            "interval_s": self.interval,
            "appends_planned": self.planned,
            "appends_sent": self.sent,
            "warmup_appends": self.warmup,
            "append_rate": self.append_rate,
            "delivered": self.delivered,
            "expected": self.expected,
            "gaps": self.gaps,
            "duplicates": self.duplicates,
            "malformed": self.malformed,
            "requests": self.requests,
            "reconnects": self.reconnects,
            **self.common_json(),
            "latency_ms": summary(self.latencies_ms),
            "post_ms": summary(self.post_ms),
        }


@dataclass
class ThroughputRun(PhaseRun):
    """One throughput phase: ``writers`` concurrent appenders, each to its own stream."""

    writers: int = 0
    producer: bool = False
    seconds: float = 0.0
    appends: int = 0
    duplicates: int = 0
    stored_bytes: int | None = None
    expected_bytes: int = 0
    post_ms: array[float] = field(default_factory=lambda: array("d"))

    @property
    def rate(self) -> float | None:
        """Acknowledged appends per second over the measured interval."""
        return self.appends / self.wall if self.wall > 0 else None

    def as_json(self) -> dict[str, Any]:
        """Everything but the raw samples, which are summarised."""
        return {
            "writers": self.writers,
            "producer_headers": self.producer,
            "seconds_planned": self.seconds,
            "appends": self.appends,
            "appends_per_s": self.rate,
            "duplicates": self.duplicates,
            "stored_bytes": self.stored_bytes,
            "expected_bytes": self.expected_bytes,
            **self.common_json(),
            "post_ms": summary(self.post_ms),
        }


class Clients:
    """Client processes of one phase and their pipes."""

    def __init__(self, target: Callable[[Any, Any], None], specs: list[Any], run: PhaseRun) -> None:
        self._run = run
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.processes: list[BaseProcess] = []
        self.messages: dict[str, dict[int, tuple[Any, ...]]] = {
            "ready": {},
            "done": {},
            "result": {},
        }
        ctx = multiprocessing.get_context("spawn")
        for j, spec in enumerate(specs):
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=target, args=(spec, child_end), name=f"bench-durable-{j}", daemon=True
            )
            process.start()
            child_end.close()
            self.processes.append(process)
            self.pipes.append(parent_end)

    def receive(self, want: str, *, until: float) -> dict[int, tuple[Any, ...]]:
        """``want`` messages from every process, or as many as came by ``until``
        (``time.time()``); a process that failed counts as answered, with its error."""
        got = self.messages[want]
        while time.time() < until:
            waiting = [p for i, p in enumerate(self.pipes) if i not in got]
            if not waiting:
                break
            for pipe in multiprocessing.connection.wait(waiting, timeout=0.2):
                assert isinstance(pipe, multiprocessing.connection.Connection)
                i = self.pipes.index(pipe)
                try:
                    message: tuple[Any, ...] = pipe.recv()
                except EOFError:
                    message = ("error", "exited without a result")
                if message[0] == "error":
                    self._run.fail(f"client process {i}: {message[1]}")
                    for phase in self.messages.values():
                        phase.setdefault(i, message)
                else:
                    self.messages[message[0]][i] = message
        missing = len(self.pipes) - len(got)
        if missing:
            self._run.fail(f"{missing} client process(es) sent no {want!r} in time")
        return got

    def send_all(self, message: tuple[Any, ...]) -> None:
        """Send ``message`` to every process that is ready."""
        for i, pipe in enumerate(self.pipes):
            if self.messages["ready"].get(i, ("",))[0] == "ready":
                pipe.send(message)

    def close(self) -> None:
        """Join the processes; kill those still running."""
        for process in self.processes:
            process.join(JOIN_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join(JOIN_TIMEOUT)
        for pipe in self.pipes:
            pipe.close()


def server_cores(server: Server, ticks0: int | None, wall: float) -> float | None:
    """The server's CPU since ``ticks0``, in cores over ``wall`` seconds."""
    ticks1 = server.cpu_ticks()
    if ticks0 is None or ticks1 is None or wall <= 0:
        return None
    return (ticks1 - ticks0) / CLOCK_TICKS / wall


async def _create(base_url: str, path: str) -> str:
    async with LoadClient(base_url, connections=1, timeout=CREATE_TIMEOUT) as client:
        return await create_stream(client, path)


def latency_phase(
    server: Server,
    mode: str,
    readers: int,
    *,
    procs: int,
    loop: str,
    interval: float,
    count: int,
    warmup: int,
    long_poll_timeout: float,
    budget: float,
) -> LatencyRun:
    """One writer appending every ``interval`` s (here, in the parent), ``readers`` followers
    in ``mode`` spread over ``procs`` client processes; cut after ``budget`` seconds."""
    procs = max(1, min(procs, readers))
    planned = count + warmup
    run = LatencyRun(
        procs=procs, mode=mode, readers=readers, interval=interval, planned=planned, warmup=warmup
    )
    deadline = time.time() + budget
    path = STREAM_ROOT + unique_name(f"{mode}-{readers}")
    offset = run_coroutine(loop, _create(server.url, path))
    specs = [
        ReaderSpec(
            server.url,
            path,
            offset,
            mode,
            share(readers, procs, j),
            planned,
            warmup,
            long_poll_timeout,
            deadline,
            loop,
        )
        for j in range(procs)
    ]
    clients = Clients(reader_process, specs, run)
    try:
        settle = (
            SSE_READY_TIMEOUT if mode == "sse" else SETTLE_SECONDS + SETTLE_PER_READER * readers
        )
        clients.receive("ready", until=min(deadline, time.time() + CHILD_START_TIMEOUT + settle))
        ticks0, cpu0, t0 = server.cpu_ticks(), cpu_seconds(), time.perf_counter()
        writer = run_coroutine(
            loop,
            paced_writer(server.url, path, count=planned, interval=interval, deadline=deadline),
        )
        results = clients.receive("result", until=deadline + RESULT_GRACE)
        run.wall = time.perf_counter() - writer.first_sent
        wall = time.perf_counter() - t0
        run.server_cores = server_cores(server, ticks0, wall)
        run.absorb(writer)
        run.sent, run.append_span, run.post_ms = writer.sent, writer.append_span, writer.post_ms
        tallies = [m[1] for m in results.values() if m[0] == "result"]
        per_proc = [t.cpu_s / t.wall_s for t in tallies if t.wall_s > 0]
        run.client_max_proc_cores = max(per_proc, default=None)
        client_cpu = cpu_seconds() - cpu0 + sum(t.cpu_s for t in tallies)
        run.client_cores = client_cpu / wall if wall > 0 else None
        latencies: list[float] = []
        for tally in tallies:
            assert isinstance(tally, ReaderTally)
            run.absorb(tally)
            run.delivered += tally.delivered
            run.gaps += tally.gaps
            run.duplicates += tally.duplicates
            run.malformed += tally.malformed
            run.requests += tally.requests
            run.reconnects += tally.reconnects
            latencies.extend(tally.latencies_ms)
        run.latencies_ms = array("d", sorted(latencies))
        run.post_ms = array("d", sorted(run.post_ms))
    finally:
        clients.close()
    return run


def throughput_phase(
    server: Server,
    writers: int,
    *,
    procs: int,
    loop: str,
    seconds: float,
    producer: bool,
    budget: float,
) -> ThroughputRun:
    """``writers`` appenders spread over ``procs`` client processes, POSTing back to back for
    ``seconds``, each to its own stream; each stream is then read back and its length checked
    against the acknowledged appends."""
    procs = max(1, min(procs, writers))
    run = ThroughputRun(procs=procs, writers=writers, producer=producer, seconds=seconds)
    deadline = time.time() + budget
    label = "producer" if producer else "plain"
    specs = []
    first = 0
    for j in range(procs):
        n = share(writers, procs, j)
        specs.append(AppenderSpec(server.url, label, first, n, producer, seconds, deadline, loop))
        first += n
    clients = Clients(appender_process, specs, run)
    try:
        ready = clients.receive("ready", until=min(deadline, time.time() + CHILD_START_TIMEOUT))
        if not any(m[0] == "ready" for m in ready.values()):
            return run
        go_at = time.time() + 0.1
        clients.send_all(("go", go_at))
        time.sleep(max(0.0, go_at - time.time()))
        ticks0 = server.cpu_ticks()
        done = clients.receive("done", until=deadline)
        timings = [m for m in done.values() if m[0] == "done"]
        run.wall = max((m[2] for m in timings), default=0.0)
        run.server_cores = server_cores(server, ticks0, time.time() - go_at)
        run.client_cores = sum(m[1] for m in timings) / run.wall if run.wall else None
        run.client_max_proc_cores = max((m[1] / m[2] for m in timings if m[2]), default=None)
        results = clients.receive("result", until=deadline + RESULT_GRACE)
        stored: list[int] = []
        latencies: list[float] = []
        for message in results.values():
            if message[0] != "result":
                continue
            tally = message[1]
            assert isinstance(tally, AppenderTally)
            run.absorb(tally)
            run.appends += tally.appends
            run.duplicates += tally.duplicates
            run.expected_bytes += tally.expected_bytes
            if tally.stored_bytes is not None:
                stored.append(tally.stored_bytes)
            latencies.extend(tally.post_ms)
        if len(stored) == len(results) == procs:
            run.stored_bytes = sum(stored)
        run.post_ms = array("d", sorted(latencies))
    finally:
        clients.close()
    return run
