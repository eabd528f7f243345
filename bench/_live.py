"""Live fan-out runs: C generations, each followed by one SSE reader, against one server, or
against the nodes of one Redis (the client processes spread over them round-robin)."""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import sqlite3
import subprocess
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from bench._deployment import Deployment, deployed
from bench._live_client import (
    LiveClientResult,
    LiveSpec,
    StreamRecord,
    run_live_client,
)
from bench._servers import (
    CLOCK_TICKS,
    Profile,
    RedisMemory,
    Sample,
    Sampler,
    Server,
    get_json,
    kill,
    longest_commit_gap,
    scrape_metrics,
    start_py_spy,
    summarise_profile,
)
from store._blocks import pending as uncompacted

CLIENT_START_DELAY = 2.0  # seconds for the client processes to start before the first connect
RESULT_TIMEOUT = 180.0  # seconds the clients get to parse and hand back their results
KEEP_ALIVE_WARNING = 4.0  # uvicorn closes idle keep-alive connections after 5 s
PROMPT = "keepstream spine benchmark"
# The store counters the report shows, by the Prometheus samples that hold them.
STORE_COUNTERS = {
    "rows_written": "keepstream_messages_written_total",
    "commits": "keepstream_commits_total",
}
COMPACTION_WAIT = 60.0  # seconds the server gets to compact the finished answers after a run
TEXT_SAMPLE = 50  # generations whose text is read back to estimate the answers' text on Redis


@dataclass
class LiveOutcome:
    """One live run against one server, aggregated over its client processes."""

    kind: str
    concurrency: int
    rate: float
    tokens_each: int
    streams: list[StreamRecord] = field(default_factory=list)
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))  # sorted
    cross_latencies_ms: array[float] = field(default_factory=lambda: array("d"))  # other node
    local_latencies_ms: array[float] = field(default_factory=lambda: array("d"))  # same node
    schedule_latencies_ms: array[float] = field(default_factory=lambda: array("d"))  # sorted
    wall: float = 0.0
    node_cores: list[float | None] = field(default_factory=list)  # each node, while streaming
    redis_cores: float | None = None  # the redis-server the nodes share, while streaming
    client_cores: float = 0.0
    client_parse_s: float = 0.0
    store_before: dict[str, Any] | None = None
    store_after: dict[str, Any] | None = None
    deadline_hit: bool = False
    problems: list[str] = field(default_factory=list)
    profile: Profile | None = None
    profile_file: Path | None = None
    client_loop: str = ""
    open_phase: float = 0.0  # first connect → last connection warmed, s (longest client)
    db_bytes: int | None = None  # keepstream's SQLite file right after the run
    samples: list[list[Sample]] = field(default_factory=list)  # each node, polled while streaming
    wal_bytes: int | None = None  # and its WAL
    text_bytes: int | None = None  # the answers' text (UTF-8) in that file, or on Redis
    stored_tokens: int | None = None  # on Redis: the tokens generated (estimated, as the text)
    checkpointed_bytes: int | None = None  # the file once compacted and checkpointed
    used_bytes: int | None = None  # ... and its pages in use (not free)
    redis_before: RedisMemory | None = None  # Redis's memory right before the streaming phase
    redis_after: RedisMemory | None = None  # ... and once every stream ended
    aof_bytes: int | None = None  # Redis's append-only file once every stream ended

    # -- derived figures --------------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        """Tokens received over all streams."""
        return sum(s.stats.tokens for s in self.streams)

    @property
    def throughput(self) -> float:
        """Delivered tokens per second of wall time."""
        return self.tokens / self.wall if self.wall > 0 else 0.0

    def latency(self, q: float) -> float | None:
        """The ``q``-quantile of stamp-to-receipt latency, ms."""
        return percentile(self.latencies_ms, q)

    def schedule_latency(self, q: float) -> float | None:
        """The ``q``-quantile of schedule-to-receipt latency, ms."""
        return percentile(self.schedule_latencies_ms, q)

    def latency_where(self, q: float, *, cross: bool) -> float | None:
        """The ``q``-quantile of stamp-to-receipt latency of the streams read on another
        node than the one that ran them (``cross``), or on the same one, ms."""
        return percentile(self.cross_latencies_ms if cross else self.local_latencies_ms, q)

    @property
    def server_cores(self) -> float | None:
        """The servers' CPU while streaming, summed over the nodes, in cores."""
        if not self.node_cores or None in self.node_cores:
            return None
        return sum(c for c in self.node_cores if c is not None)

    @property
    def expected_duration(self) -> float:
        """Stamp of the first token to stamp of the last, when nothing is late."""
        return (self.tokens_each - 1) / self.rate if self.rate > 0 else 0.0

    def end_lags(self) -> list[float]:
        """Per stream: last token's receipt - (first token's stamp + expected duration), s."""
        lags = []
        for s in self.streams:
            st = s.stats
            if st.first_stamp_ns is not None and st.last_token_ns is not None:
                lags.append((st.last_token_ns - st.first_stamp_ns) / 1e9 - self.expected_duration)
        return lags

    def production_lags(self) -> list[float]:
        """Per stream: (last stamp - first stamp) - expected duration: the model itself late."""
        lags = []
        for s in self.streams:
            st = s.stats
            if st.first_stamp_ns is not None and st.last_stamp_ns is not None:
                lags.append((st.last_stamp_ns - st.first_stamp_ns) / 1e9 - self.expected_duration)
        return lags

    def behind(self, slack: float) -> int:
        """Streams that fell behind: late by more than ``slack``, short, not completed, or
        missing from the results altogether."""
        count = max(0, self.concurrency - len(self.streams))
        for s in self.streams:
            st = s.stats
            late = (
                st.first_stamp_ns is None
                or st.last_token_ns is None
                or (st.last_token_ns - st.first_stamp_ns) / 1e9 - self.expected_duration > slack
            )
            if late or st.tokens < self.tokens_each or st.final_status != "completed":
                count += 1
        return count

    @property
    def completed(self) -> int:
        """Streams whose final status was ``completed``."""
        return sum(1 for s in self.streams if s.stats.final_status == "completed")

    @property
    def gaps(self) -> int:
        """Event ids skipped, over all streams."""
        return sum(s.stats.gaps for s in self.streams)

    @property
    def duplicates(self) -> int:
        """Event ids repeated or going backwards, over all streams."""
        return sum(s.stats.duplicates for s in self.streams)

    @property
    def events(self) -> int:
        """SSE events with data received, over all streams."""
        return sum(s.stats.events for s in self.streams)

    def warm_times_ms(self) -> list[float]:
        """Per connection: connect start → its ``/healthz`` answered (accepted and served)."""
        return [(s.warmed_ns - s.connect_ns) / 1e6 for s in self.streams if s.warmed_ns is not None]

    def post_times_ms(self) -> list[float]:
        """Per stream: POST sent → 202 received, ms."""
        return [
            (s.accepted_ns - s.post_sent_ns) / 1e6
            for s in self.streams
            if s.accepted_ns is not None and s.post_sent_ns is not None
        ]

    def first_token_ms(self) -> list[float]:
        """Per stream: POST sent → first token received, ms."""
        return [
            (first - s.post_sent_ns) / 1e6
            for s in self.streams
            if s.post_sent_ns is not None and (first := s.stats.first_token_ns) is not None
        ]

    @property
    def ramp(self) -> float:
        """First POST sent → last GET sent, s."""
        posts = [s.post_sent_ns for s in self.streams if s.post_sent_ns is not None]
        sent = [s.get_sent_ns for s in self.streams if s.get_sent_ns is not None]
        return (max(sent) - min(posts)) / 1e9 if posts and sent else 0.0

    def slowest_health_ms(self) -> float | None:
        """The slowest ``/healthz`` answer of any node while streaming, ms (a blocked event
        loop)."""
        answers = [x.answer_s for node in self.samples for x in node if x.answer_s is not None]
        return max(answers) * 1e3 if answers else None

    def commit_gap_s(self) -> float | None:
        """The longest time a node made no commit while streaming, as sampled, s."""
        gaps = [g for node in self.samples if (g := longest_commit_gap(node)) is not None]
        return max(gaps, default=None)

    def _rounds(self) -> list[list[Sample]]:
        """The samples by polling round: every node's sample of that round."""
        return [list(round_) for round_ in zip(*self.samples, strict=False)]

    def peak_cores(self) -> float | None:
        """The busiest second of the servers (all nodes) while streaming, in cores."""
        ticks = [
            (round_[0].t, sum(x.cpu_ticks for x in round_ if x.cpu_ticks is not None))
            for round_ in self._rounds()
            if all(x.cpu_ticks is not None for x in round_)
        ]
        best = None
        j = 0
        for i in range(len(ticks)):
            while j < len(ticks) and ticks[j][0] - ticks[i][0] < 1.0:
                j += 1
            if j < len(ticks):
                cores = (ticks[j][1] - ticks[i][1]) / CLOCK_TICKS / (ticks[j][0] - ticks[i][0])
                best = cores if best is None else max(best, cores)
        return best

    def peak_rss_mb(self) -> float | None:
        """The servers' largest resident memory (all nodes) seen while streaming, MB."""
        sizes = [sum(x.rss_bytes or 0 for x in round_) for round_ in self._rounds()]
        return max(sizes) / 1e6 if any(sizes) else None

    def disk_per_text(self, *, in_use: bool = True) -> float | None:
        """The compacted database's bytes (its pages in use, or the whole file) per byte
        of the answers' text."""
        size = self.used_bytes if in_use else self.checkpointed_bytes
        if not self.text_bytes or size is None:
            return None
        return size / self.text_bytes

    def disk_per_kilotoken(self) -> float | None:
        """The compacted database's bytes in use per 1,000 tokens delivered."""
        if self.used_bytes is None or not self.tokens:
            return None
        return self.used_bytes / self.tokens * 1000

    def peak_wal_mb(self) -> float | None:
        """The largest WAL seen while streaming, MB."""
        sizes = [x.wal_bytes for node in self.samples for x in node if x.wal_bytes is not None]
        return max(sizes) / 1e6 if sizes else None

    def redis_growth(self, *, dataset: bool = False) -> int | None:
        """How much Redis's memory (``used_memory``, or the data alone) grew over the
        streaming phase, bytes."""
        before, after = self.redis_before, self.redis_after
        if before is None or after is None:
            return None
        return after.dataset - before.dataset if dataset else after.used - before.used

    def redis_per_kilotoken(self, *, dataset: bool = False) -> float | None:
        """Redis memory grown per 1,000 tokens generated (what Redis holds; the tokens
        delivered when every stream was read to its end), bytes."""
        growth = self.redis_growth(dataset=dataset)
        tokens = self.stored_tokens or self.tokens
        return growth / tokens * 1000 if growth is not None and tokens else None

    def redis_per_text(self, *, dataset: bool = False) -> float | None:
        """Redis memory grown per byte of the answers' text."""
        growth = self.redis_growth(dataset=dataset)
        return growth / self.text_bytes if growth is not None and self.text_bytes else None

    def store_delta(self, key: str) -> int | None:
        """How much a store counter (``STORE_COUNTERS``) grew during the run."""
        if not self.store_before or not self.store_after:
            return None
        return int(self.store_after[key]) - int(self.store_before[key])


def store_counters(nodes: Sequence[Server]) -> dict[str, Any]:
    """The store's counters from ``/metrics``, summed over the nodes (none for a server
    without them)."""
    scraped = [scrape_metrics(node.url) for node in nodes]
    return {
        key: sum(metrics[name] for metrics in scraped)
        for key, name in STORE_COUNTERS.items()
        if all(name in metrics for metrics in scraped)
    }


def sample_generations(
    node: Server, streams: Sequence[StreamRecord], sample: int = TEXT_SAMPLE
) -> tuple[int | None, int | None]:
    """The answers' text (UTF-8 bytes) and tokens (``usage.output_tokens``) of every
    generation started, estimated from up to ``sample`` of them, spread over the run and
    read back from ``node``: their mean times the generations started."""
    ids = [s.generation_id for s in streams if s.generation_id is not None]
    sizes: list[int] = []
    tokens: list[int] = []
    for generation_id in ids[:: max(1, len(ids) // sample)][:sample]:
        try:
            record = get_json(f"{node.url}/v1/generations/{generation_id}")
        except (OSError, ValueError):
            continue
        sizes.append(len(str(record.get("text") or "").encode()))
        tokens.append(int((record.get("usage") or {}).get("output_tokens") or 0))
    if not sizes:
        return None, None
    return round(sum(sizes) / len(sizes) * len(ids)), round(sum(tokens) / len(tokens) * len(ids))


def cores(before: int | None, after: int | None, seconds: float) -> float | None:
    """CPU used between two readings of clock ticks, in cores."""
    if before is None or after is None or seconds <= 0:
        return None
    return (after - before) / CLOCK_TICKS / seconds


def checkpointed_sizes(db: Path) -> tuple[int | None, int | None, int | None]:
    """A keepstream database's sizes once the server has compacted every closed stream
    (waited for, up to ``COMPACTION_WAIT`` s) and its WAL is copied in: the file, the pages
    in use (the file less its free pages, which later writes reuse), and the UTF-8 size of
    every answer's text in it."""
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
            deadline = time.monotonic() + COMPACTION_WAIT
            while time.monotonic() < deadline and uncompacted(conn, 1):
                time.sleep(0.1)
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            row = conn.execute("SELECT sum(length(CAST(text AS BLOB))) FROM generations").fetchone()
            (pages,), (free,), (page_size,) = (
                conn.execute(f"PRAGMA {name}").fetchone()
                for name in ("page_count", "freelist_count", "page_size")
            )
        size = db.stat().st_size
    except (sqlite3.Error, OSError):
        return None, None, None
    text = int(row[0]) if row and row[0] is not None else None
    return size, (pages - free) * page_size, text


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of already sorted ``values`` (nearest rank)."""
    if not values:
        return None
    index = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return values[index]


def client_specs(
    nodes: Sequence[Server], opts: argparse.Namespace, *, open_at: float, deadline: float
) -> list[LiveSpec]:
    """Each client process's share of the run. The processes go to the nodes round-robin;
    with several nodes, ``--cross-follow`` of each one's streams are read on the next node."""
    C, R, L = opts.concurrency, opts.rate, opts.tokens
    body = b'{"prompt":"%s","params":{"tokens_per_second":%s,"max_tokens":%d,"stamp":true}}' % (
        PROMPT.encode(),
        repr(R).encode(),
        L,
    )
    procs = max(1, min(opts.client_procs, C))
    cross = opts.cross_follow if len(nodes) > 1 else 0.0
    specs = []
    for j in range(procs):
        node, other = nodes[j % len(nodes)], nodes[(j + 1) % len(nodes)]
        specs.append(
            LiveSpec(
                host="127.0.0.1",
                port=node.port,
                streams=C // procs + (1 if j < C % procs else 0),
                post_body=body,
                open_at=open_at + (j / opts.connect_rate if opts.connect_rate > 0 else 0.0),
                open_rate=opts.connect_rate / procs if opts.connect_rate > 0 else 0.0,
                open_window=max(1, opts.connect_window // procs),
                start_rate=opts.start_rate / procs if opts.start_rate > 0 else 0.0,
                start_offset=j / opts.start_rate if opts.start_rate > 0 else 0.0,
                deadline=deadline,
                loop=opts.loop,
                warm=opts.open_mode == "warm",
                rate=R,
                follow_port=other.port if cross > 0 else 0,
                cross_fraction=cross,
            )
        )
    return specs


class Clients:
    """The client processes of one run (started at once, registered in ``processes`` so that
    they are killed whatever happens) and what each sent back, phase by phase: ``opened``,
    ``done``, ``result``."""

    def __init__(
        self, specs: Sequence[LiveSpec], processes: list[BaseProcess], problems: list[str]
    ) -> None:
        self.messages: dict[str, dict[int, tuple[Any, ...]]] = {
            "opened": {},
            "done": {},
            "result": {},
        }
        self.pipes: list[multiprocessing.connection.Connection] = []
        self._processes = processes
        self._problems = problems
        ctx = multiprocessing.get_context("spawn")
        for j, spec in enumerate(specs):
            parent_end, child_end = ctx.Pipe(duplex=True)
            process = ctx.Process(
                target=run_live_client,
                args=(spec, child_end),
                name=f"bench-client-{j}",
                daemon=True,
            )
            process.start()
            child_end.close()
            processes.append(process)
            self.pipes.append(parent_end)

    def receive(self, until: float, want: str) -> None:
        """Collect ``want`` messages from every client (or give up at ``until``)."""
        got = self.messages[want]
        pipes = self.pipes
        while time.time() < until:
            waiting = [p for i, p in enumerate(pipes) if i not in got]
            if not waiting:
                return
            for pipe in multiprocessing.connection.wait(waiting, timeout=0.5):
                assert isinstance(pipe, multiprocessing.connection.Connection)
                i = pipes.index(pipe)
                try:
                    message = pipe.recv()
                except EOFError:
                    message = ("error", "exited without a result")
                if message[0] == "error":
                    self._problems.append(f"client {i} failed: {message[1]}")
                    for phase in self.messages.values():
                        phase.setdefault(i, message)
                else:
                    self.messages[message[0]][i] = message

    def go(self, at: float) -> None:
        """Tell every client that opened its connections to start streaming at ``at``."""
        for i, pipe in enumerate(self.pipes):
            if self.messages["opened"].get(i, ("",))[0] == "opened":
                pipe.send(("go", at))

    def close(self) -> list[LiveClientResult]:
        """Reap the processes (killing the stuck) and return the results received."""
        for child in self._processes:
            child.join(timeout=5.0)
            if child.is_alive():
                child.kill()
                child.join(timeout=5.0)
        self._processes.clear()
        for pipe in self.pipes:
            pipe.close()
        results = []
        for i in range(len(self.pipes)):
            message = self.messages["result"].get(i)
            if message is None or message[0] != "result":
                self._problems.append(f"client {i} sent no result")
                continue
            results.append(message[1])
        return results


def measure_store(outcome: LiveOutcome, deployment: Deployment) -> None:
    """What the store holds once every stream ended: the SQLite file's sizes (compacted and
    checkpointed), or Redis's memory and append-only file; and the store's counters."""
    db = deployment.nodes[0].extra.get("db")
    if isinstance(db, Path):
        with contextlib.suppress(OSError):
            outcome.db_bytes = db.stat().st_size
            outcome.wal_bytes = Path(f"{db}-wal").stat().st_size
        outcome.checkpointed_bytes, outcome.used_bytes, outcome.text_bytes = checkpointed_sizes(db)
    if deployment.redis is not None:
        # The nodes pack closed streams into blocks a moment after they end: measure after.
        if not deployment.redis.wait_packed(COMPACTION_WAIT):
            outcome.problems.append(f"Redis streams still unpacked after {COMPACTION_WAIT:g} s")
        outcome.redis_after = deployment.redis.memory()
        outcome.aof_bytes = deployment.redis.aof_bytes()
    try:
        outcome.store_after = store_counters(deployment.nodes)
    except (OSError, ValueError) as exc:
        outcome.problems.append(f"/metrics after the run failed: {exc}")


def gather(outcome: LiveOutcome, results: Sequence[LiveClientResult], go_at: float) -> None:
    """Fold the client processes' results into ``outcome``."""
    local: list[int] = []
    cross: list[int] = []
    schedule_latencies: list[int] = []
    finished: list[float] = []
    for result in results:
        outcome.streams.extend(result.streams)
        local.extend(result.latencies)
        cross.extend(result.cross_latencies)
        schedule_latencies.extend(result.schedule_latencies)
        finished.append(result.finished)
        outcome.client_cores += result.cpu_run
        outcome.client_parse_s += result.cpu_parse
        outcome.deadline_hit = outcome.deadline_hit or result.deadline_hit
        outcome.client_loop = result.loop
        outcome.open_phase = max(outcome.open_phase, result.open_finished - result.open_started)
    outcome.local_latencies_ms = sorted_ms(local)
    outcome.cross_latencies_ms = sorted_ms(cross)
    outcome.latencies_ms = sorted_ms(local + cross)
    outcome.schedule_latencies_ms = sorted_ms(schedule_latencies)
    if finished:
        outcome.wall = max(finished) - go_at
        if outcome.wall > 0:
            outcome.client_cores /= outcome.wall


def sorted_ms(nanoseconds: list[int]) -> array[float]:
    """Durations in ns as sorted milliseconds."""
    nanoseconds.sort()
    return array("d", [x / 1e6 for x in nanoseconds])


def note_problems(outcome: LiveOutcome) -> None:
    """Add what went wrong with the streams, as the clients saw it, to the problems."""
    errors = [s.error for s in outcome.streams if s.error]
    if errors:
        outcome.problems.append(f"{len(errors)} stream errors, e.g. {errors[0]}")
    bad_status = [
        s.stats.status_code for s in outcome.streams if s.stats.status_code not in (0, 200)
    ]
    if bad_status:
        outcome.problems.append(f"{len(bad_status)} GETs answered {sorted(set(bad_status))}")
    cut = [
        s
        for s in outcome.streams
        if s.stats.status_code == 200 and s.stats.final_status is None and not s.error
    ]
    if cut:
        outcome.problems.append(
            f"{len(cut)} streams answered 200 and then ended without a final status event "
            f"(closed by the server; {sum(s.cross for s in cut)} of them read on another node "
            f"than their POST's; their tokens: {sum(s.stats.tokens for s in cut):,})"
        )
    if outcome.open_phase > KEEP_ALIVE_WARNING:
        outcome.problems.append(
            f"opening the connections took {outcome.open_phase:.1f} s: idle ones may have hit "
            f"uvicorn's 5 s keep-alive timeout"
        )
    if outcome.deadline_hit:
        outcome.problems.append("DEADLINE HIT: clients aborted; figures are partial")


def start_profile(
    outcome: LiveOutcome, server: Server, workdir: Path, duration: float
) -> subprocess.Popen[bytes] | None:
    """py-spy on ``server`` for the streaming phase (a problem noted if it is missing)."""
    outcome.profile_file = workdir / f"py-spy-{outcome.kind}-{server.port}.txt"
    spy = start_py_spy(
        server.pid, duration=duration, output=outcome.profile_file, log=workdir / "py-spy.log"
    )
    if spy is None:
        outcome.problems.append("py-spy not installed: no profile")
    return spy


def finish_profile(outcome: LiveOutcome, spy: subprocess.Popen[bytes], duration: float) -> None:
    """Wait for py-spy (killed if stuck) and summarise what it wrote."""
    try:
        spy.wait(timeout=duration + 30.0)
    except subprocess.TimeoutExpired:  # a stuck profiler must not lose the run
        pass
    kill(spy)
    if outcome.profile_file is not None and outcome.profile_file.exists():
        outcome.profile = summarise_profile(outcome.profile_file)
    else:
        outcome.problems.append("py-spy wrote no profile (see py-spy.log)")


def live_run(
    deployment: Deployment,
    opts: argparse.Namespace,
    *,
    global_deadline: float,
    workdir: Path,
    profile: bool,
    processes: list[BaseProcess],
) -> LiveOutcome:
    """One live fan-out run against started servers (one, or several nodes on one Redis).

    The clients first open and warm every connection (the open phase, not measured as
    streaming); on "go", the POSTs start at ``--start-rate`` and everything from then on —
    wall time, server CPU, the store's counters, Redis's memory, the profile (of the first
    node) — is the streaming phase.
    """
    C, R, L = opts.concurrency, opts.rate, opts.tokens
    outcome = LiveOutcome(deployment.kind, C, R, L)
    nodes, redis = deployment.nodes, deployment.redis
    open_at = time.time() + CLIENT_START_DELAY
    open_guess = C / opts.connect_rate if opts.connect_rate > 0 else 1.0
    start_guess = C / opts.start_rate if opts.start_rate > 0 else 0.0
    run_deadline = min(global_deadline, open_at + open_guess + start_guess + L / R + opts.run_slack)
    specs = client_specs(nodes, opts, open_at=open_at, deadline=run_deadline)
    clients = Clients(specs, processes, outcome.problems)

    clients.receive(run_deadline, "opened")
    outcome.store_before = store_counters(nodes)
    outcome.redis_before = redis.memory() if redis is not None else None
    go_at = time.time() + 0.05
    clients.go(go_at)
    time.sleep(max(0.0, go_at - time.time()))
    ticks0, redis0, t0 = deployment.node_ticks(), deployment.redis_ticks(), time.time()
    sampler = Sampler(nodes, interval=opts.sample_interval) if opts.sample_interval > 0 else None
    if sampler is not None:
        sampler.start()
    stream_guess = start_guess + L / R
    spy = start_profile(outcome, nodes[0], workdir, stream_guess) if profile else None

    clients.receive(run_deadline + 10.0, "done")
    ticks1, redis1, t1 = deployment.node_ticks(), deployment.redis_ticks(), time.time()
    if sampler is not None:
        outcome.samples = sampler.stop()
    outcome.node_cores = [cores(a, b, t1 - t0) for a, b in zip(ticks0, ticks1, strict=True)]
    outcome.redis_cores = cores(redis0, redis1, t1 - t0)
    measure_store(outcome, deployment)
    clients.receive(time.time() + RESULT_TIMEOUT, "result")
    results = clients.close()
    if spy is not None:
        finish_profile(outcome, spy, stream_guess)
    gather(outcome, results, go_at)
    if redis is not None:
        outcome.text_bytes, outcome.stored_tokens = sample_generations(nodes[0], outcome.streams)
    note_problems(outcome)
    return outcome


def run_one_live(
    kind: str,
    opts: argparse.Namespace,
    global_deadline: float,
    workdir: Path,
    profile: bool,
    processes: list[BaseProcess],
) -> LiveOutcome | None:
    """Start fresh servers of ``kind``, run one live round against them, always kill them.

    ``None`` when the round could not finish before the hard limit, so it was not started.
    """
    C, R, L = opts.concurrency, opts.rate, opts.tokens
    need = (
        CLIENT_START_DELAY
        + L / R
        + 5
        + (C / opts.connect_rate if opts.connect_rate > 0 else 1.0)
        + (C / opts.start_rate if opts.start_rate > 0 else 0.0)
    )
    if time.time() + need > global_deadline:
        return None
    with deployed(kind, opts, workdir) as deployment:
        return live_run(
            deployment,
            opts,
            global_deadline=global_deadline,
            workdir=workdir,
            profile=profile,
            processes=processes,
        )
