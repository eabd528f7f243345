"""Live fan-out runs: C generations, each followed by one SSE reader, against one server."""

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

from bench._live_client import (
    LiveClientResult,
    LiveSpec,
    StreamRecord,
    run_live_client,
)
from bench._servers import (
    CLOCK_TICKS,
    Profile,
    Sample,
    Sampler,
    Server,
    baseline_server,
    keepstream_server,
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


@dataclass
class LiveOutcome:
    """One live run against one server, aggregated over its client processes."""

    kind: str
    concurrency: int
    rate: float
    tokens_each: int
    streams: list[StreamRecord] = field(default_factory=list)
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))  # sorted
    schedule_latencies_ms: array[float] = field(default_factory=lambda: array("d"))  # sorted
    wall: float = 0.0
    server_cores: float | None = None
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
    samples: list[Sample] = field(default_factory=list)  # the server, polled during the run
    wal_bytes: int | None = None  # and its WAL
    text_bytes: int | None = None  # the answers' text (UTF-8) in that file
    checkpointed_bytes: int | None = None  # the file once compacted and checkpointed
    used_bytes: int | None = None  # ... and its pages in use (not free)

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
        """The slowest ``/healthz`` answer while streaming, ms (a blocked event loop)."""
        answers = [x.answer_s for x in self.samples if x.answer_s is not None]
        return max(answers) * 1e3 if answers else None

    def commit_gap_s(self) -> float | None:
        """The longest time without a commit while streaming, as sampled, s."""
        return longest_commit_gap(self.samples)

    def peak_cores(self) -> float | None:
        """The busiest second of the server while streaming, in cores."""
        ticks = [(x.t, x.cpu_ticks) for x in self.samples if x.cpu_ticks is not None]
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
        """The server's largest resident memory seen while streaming, MB."""
        sizes = [x.rss_bytes for x in self.samples if x.rss_bytes is not None]
        return max(sizes) / 1e6 if sizes else None

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
        sizes = [x.wal_bytes for x in self.samples if x.wal_bytes is not None]
        return max(sizes) / 1e6 if sizes else None

    def store_delta(self, key: str) -> int | None:
        """How much a store counter (``STORE_COUNTERS``) grew during the run."""
        if not self.store_before or not self.store_after:
            return None
        return int(self.store_after[key]) - int(self.store_before[key])


def store_counters(server: Server) -> dict[str, Any]:
    """The store's counters from ``/metrics`` (none for a server without them)."""
    metrics = scrape_metrics(server.url)
    return {key: metrics[name] for key, name in STORE_COUNTERS.items() if name in metrics}


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


def live_run(
    server: Server,
    opts: argparse.Namespace,
    *,
    global_deadline: float,
    workdir: Path,
    profile: bool,
    processes: list[BaseProcess],
) -> LiveOutcome:
    """One live fan-out run against a started server.

    The clients first open and warm every connection (the open phase, not measured as
    streaming); on "go", the POSTs start at ``--start-rate`` and everything from then on —
    wall time, server CPU, the store's counters, the profile — is the streaming phase.
    """
    C, R, L = opts.concurrency, opts.rate, opts.tokens
    outcome = LiveOutcome(server.kind, C, R, L)
    body = b'{"prompt":"%s","params":{"tokens_per_second":%s,"max_tokens":%d,"stamp":true}}' % (
        PROMPT.encode(),
        repr(R).encode(),
        L,
    )
    procs = max(1, min(opts.client_procs, C))
    open_at = time.time() + CLIENT_START_DELAY
    open_guess = C / opts.connect_rate if opts.connect_rate > 0 else 1.0
    start_guess = C / opts.start_rate if opts.start_rate > 0 else 0.0
    run_deadline = min(global_deadline, open_at + open_guess + start_guess + L / R + opts.run_slack)
    ctx = multiprocessing.get_context("spawn")
    pipes: list[multiprocessing.connection.Connection] = []
    for j in range(procs):
        share = C // procs + (1 if j < C % procs else 0)
        spec = LiveSpec(
            host="127.0.0.1",
            port=server.port,
            streams=share,
            post_body=body,
            open_at=open_at + (j / opts.connect_rate if opts.connect_rate > 0 else 0.0),
            open_rate=opts.connect_rate / procs if opts.connect_rate > 0 else 0.0,
            open_window=max(1, opts.connect_window // procs),
            start_rate=opts.start_rate / procs if opts.start_rate > 0 else 0.0,
            start_offset=j / opts.start_rate if opts.start_rate > 0 else 0.0,
            deadline=run_deadline,
            loop=opts.loop,
            warm=opts.open_mode == "warm",
            rate=R,
        )
        parent_end, child_end = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=run_live_client, args=(spec, child_end), name=f"bench-client-{j}", daemon=True
        )
        process.start()
        child_end.close()
        processes.append(process)
        pipes.append(parent_end)

    messages: dict[str, dict[int, tuple[Any, ...]]] = {"opened": {}, "done": {}, "result": {}}

    def receive(until: float, want: str) -> None:
        """Collect ``want`` messages from every client (or give up at ``until``)."""
        got = messages[want]
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
                    outcome.problems.append(f"client {i} failed: {message[1]}")
                    for phase in messages.values():
                        phase.setdefault(i, message)
                else:
                    messages[message[0]][i] = message

    receive(run_deadline, "opened")
    outcome.store_before = store_counters(server)
    go_at = time.time() + 0.05
    for i, pipe in enumerate(pipes):
        if messages["opened"].get(i, ("",))[0] == "opened":
            pipe.send(("go", go_at))
    time.sleep(max(0.0, go_at - time.time()))
    ticks0 = server.cpu_ticks()
    t0 = time.time()
    sampler = (
        Sampler(server, interval=opts.sample_interval).start() if opts.sample_interval > 0 else None
    )
    spy = None
    stream_guess = start_guess + L / R
    if profile:
        outcome.profile_file = workdir / f"py-spy-{server.kind}-{server.port}.txt"
        spy = start_py_spy(
            server.pid,
            duration=stream_guess,
            output=outcome.profile_file,
            log=workdir / "py-spy.log",
        )
        if spy is None:
            outcome.problems.append("py-spy not installed: no profile")

    receive(run_deadline + 10.0, "done")
    ticks1 = server.cpu_ticks()
    t1 = time.time()
    if sampler is not None:
        outcome.samples = sampler.stop()
    if ticks0 is not None and ticks1 is not None and t1 > t0:
        outcome.server_cores = (ticks1 - ticks0) / CLOCK_TICKS / (t1 - t0)
    db = server.extra.get("db")
    if isinstance(db, Path):
        with contextlib.suppress(OSError):
            outcome.db_bytes = db.stat().st_size
            outcome.wal_bytes = Path(f"{db}-wal").stat().st_size
        outcome.checkpointed_bytes, outcome.used_bytes, outcome.text_bytes = checkpointed_sizes(db)
    try:
        outcome.store_after = store_counters(server)
    except (OSError, ValueError) as exc:
        outcome.problems.append(f"/metrics after the run failed: {exc}")
    receive(time.time() + RESULT_TIMEOUT, "result")
    for child in processes:
        child.join(timeout=5.0)
        if child.is_alive():
            child.kill()
            child.join(timeout=5.0)
    processes.clear()
    for pipe in pipes:
        pipe.close()
    if spy is not None:
        try:
            spy.wait(timeout=stream_guess + 30.0)
        except subprocess.TimeoutExpired:  # a stuck profiler must not lose the run
            pass
        kill(spy)
        if outcome.profile_file is not None and outcome.profile_file.exists():
            outcome.profile = summarise_profile(outcome.profile_file)
        else:
            outcome.problems.append("py-spy wrote no profile (see py-spy.log)")

    latencies: list[int] = []
    schedule_latencies: list[int] = []
    finished: list[float] = []
    for i in range(len(pipes)):
        message = messages["result"].get(i)
        if message is None or message[0] != "result":
            outcome.problems.append(f"client {i} sent no result")
            continue
        result: LiveClientResult = message[1]
        outcome.streams.extend(result.streams)
        latencies.extend(result.latencies)
        schedule_latencies.extend(result.schedule_latencies)
        finished.append(result.finished)
        outcome.client_cores += result.cpu_run
        outcome.client_parse_s += result.cpu_parse
        outcome.deadline_hit = outcome.deadline_hit or result.deadline_hit
        outcome.client_loop = result.loop
        outcome.open_phase = max(outcome.open_phase, result.open_finished - result.open_started)
    latencies.sort()
    outcome.latencies_ms = array("d", [x / 1e6 for x in latencies])
    schedule_latencies.sort()
    outcome.schedule_latencies_ms = array("d", [x / 1e6 for x in schedule_latencies])
    if finished:
        outcome.wall = max(finished) - go_at
        if outcome.wall > 0:
            outcome.client_cores /= outcome.wall
    errors = [s.error for s in outcome.streams if s.error]
    if errors:
        outcome.problems.append(f"{len(errors)} stream errors, e.g. {errors[0]}")
    bad_status = [
        s.stats.status_code for s in outcome.streams if s.stats.status_code not in (0, 200)
    ]
    if bad_status:
        outcome.problems.append(f"{len(bad_status)} GETs answered {sorted(set(bad_status))}")
    if outcome.open_phase > KEEP_ALIVE_WARNING:
        outcome.problems.append(
            f"opening the connections took {outcome.open_phase:.1f} s: idle ones may have hit "
            f"uvicorn's 5 s keep-alive timeout"
        )
    if outcome.deadline_hit:
        outcome.problems.append("DEADLINE HIT: clients aborted; figures are partial")
    return outcome


def run_one_live(
    kind: str,
    opts: argparse.Namespace,
    global_deadline: float,
    workdir: Path,
    profile: bool,
    processes: list[BaseProcess],
) -> LiveOutcome | None:
    """Start a fresh server of ``kind``, run one live round against it, always kill it.

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
    if kind == "keepstream":
        server = keepstream_server(
            workdir,
            rate=R,
            tokens=L,
            capacity=C,
            flush_interval=opts.flush_interval,
            loop=opts.server_loop,
            http=opts.server_http,
            extra_args=opts.ks_arg,
        )
    else:
        server = baseline_server(
            workdir, rate=R, tokens=L, loop=opts.server_loop, http=opts.server_http
        )
    server.start()
    try:
        return live_run(
            server,
            opts,
            global_deadline=global_deadline,
            workdir=workdir,
            profile=profile,
            processes=processes,
        )
    finally:
        server.kill()
        if not opts.keep_dir:
            server.remove_database()  # WAL files reach GBs at C=1000
