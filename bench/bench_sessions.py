"""The sessions benchmark: fill 10,000 sessions, then create, message and list latency.

Run on demand (not part of the test suite), with the project's virtualenv::

    python bench/bench_sessions.py                    # 10,000 sessions, 300 samples each
    python bench/bench_sessions.py --profile fill     # py-spy on the server while it fills

Against a fresh ``keepstream serve`` (new SQLite file in a temporary directory; simulated model
at 50 tokens/s, 20 tokens an answer; ``--max-sessions-per-user 1000000`` so that the limit on
open sessions does not stop the fill):

1. **Fill.** ``--sessions`` times ``POST /v1/sessions {}``, ``--fill-concurrency`` requests in
   flight: sessions created per second, overall and over the first and the last tenth (does
   the rate fall as the table grows?), and the latency of those creates under load. Then the
   database's size on disk, and its row count as a check.
2. **Latency**, ``--samples`` requests each after ``--warmup`` unmeasured ones,
   ``--sample-concurrency`` at a time (default 1: sequential, so a figure is one request's own
   time and no queueing): (c) ``GET /v1/sessions?limit=100`` with the sessions stored;
   (a) ``POST /v1/sessions``; (b) ``POST /v1/sessions/{id}/messages`` to distinct filled
   sessions, timed to the 202 and to the first complete ``event: delta`` of
   ``GET /v1/generations/{id}/events`` opened right after the 202 (the stream is then dropped;
   the answer goes on, so a few generations run during this phase); then the list once more,
   now that its first page is sessions with answers, some still running.
3. A table against the reference numbers of the sessions issue (a published session
   component: create < 100 ms, sync < 500 ms, 1,000 sessions/s) and keepstream's target of ten
   times better (create < 10 ms, list < 50 ms, >= 10,000 sessions/s), each marked met or
   missed on its p99 (and said when only the p50 meets it); and per phase the server's and the
   client's CPU, which tells whether the client is what limits a figure.

The client is the benchmarks' keep-alive client on asyncio streams (``bench/_client.py``,
uvloop), with one connection per request in flight. ``httpx.AsyncClient`` was measured first
and was the bottleneck here (2 CPUs): it spends 1 to 3 ms of client CPU per request, so during
the fill it ran at 0.9 to 1 core and filled 350 to 380 sessions/s while the server used 0.2 to
0.3 cores; the raw client fills 1,300 to 2,800/s (the server's limit, see below) at 0.05 to
0.1 client cores. On a 2-CPU machine the client's CPU is also taken from the server. The CPU
table of every run shows the client's share, so a client-bound figure is visible.

Latency is sampled back to back by default. The store commits in groups (``--flush-interval``,
10 ms): a write arriving just after a commit waits for the rest of the window, so back-to-back
writes (create, post) each pay nearly the whole window, the worst case. ``--sample-gap 0.02``
pauses before each request so that an idle writer commits at once (the best case; not in the
post phase, where the previous samples' answers keep the writer committing every window).
``--ks-arg=--flush-interval --ks-arg=0`` removes the window. The whole
invocation has a hard limit (``--time-limit``): when it passes, the phase in progress stops,
the server is killed and the partial results are printed. The server is killed at exit,
whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` (and the core) importable
    sys.path.insert(0, str(ROOT))

from bench._client import (  # noqa: E402
    JSON_HEADERS,
    SSE_HEADERS,
    BenchHTTPError,
    LoadClient,
    cpu_seconds,
    new_loop,
)
from bench._live import percentile  # noqa: E402
from bench._options import add_run_options, revision  # noqa: E402
from bench._report import fmt, table  # noqa: E402
from bench._servers import (  # noqa: E402
    CLOCK_TICKS,
    DeadlineExceeded,
    Profile,
    Server,
    guard_run,
    keepstream_server,
    kill,
    kill_all,
    start_py_spy,
    summarise_profile,
)

DEFAULT_SESSIONS = 10_000
DEFAULT_FILL_CONCURRENCY = 32
DEFAULT_SAMPLES = 300
DEFAULT_WARMUP = 10
DEFAULT_TIME_LIMIT = 300.0
DEFAULT_PROFILE_SECONDS = 30.0
SIM_RATE = 50.0  # tokens/s of the simulated model
SIM_TOKENS = 20  # tokens per answer
MAX_SESSIONS_PER_USER = 1_000_000
LIST_LIMIT = 100
MAX_ERRORS = 20  # a phase stops after this many failed requests
REQUEST_TIMEOUT = 30.0  # seconds for one request, or for a stream's head and each read
PY_SPY_STOP_TIMEOUT = 15.0
MESSAGE_BODY = json.dumps({"content": "Hello, keepstream: how are sessions stored?"}).encode()
DELTA_MARK = b"event: delta\n"

# The issue's reference (a published session component) and keepstream's target, 10x better.
REFERENCE_CREATE_MS = 100.0
REFERENCE_LIST_MS = 500.0
REFERENCE_RATE = 1_000.0
TARGET_FACTOR = 10.0

PHASES = ("fill", "list", "create", "post", "list-after-posts")


# -- results --------------------------------------------------------------------------------------


@dataclass
class PhaseStats:
    """One phase: its requests, errors, wall time and the CPU both sides spent in it."""

    name: str
    requests: int = 0
    errors: int = 0
    first_error: str | None = None
    wall: float = 0.0
    server_cpu: float | None = None
    client_cpu: float = 0.0
    finished: bool = False
    profiled: bool = False

    def fail(self, error: str) -> None:
        """Count a failed request (the first one's message is kept)."""
        self.errors += 1
        if self.first_error is None:
            self.first_error = error

    @property
    def given_up(self) -> bool:
        """Too many errors: the phase stops."""
        return self.errors >= MAX_ERRORS


@dataclass
class Results:
    """Everything measured so far; printed in full or in part."""

    phases: dict[str, PhaseStats] = field(default_factory=dict)
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    fill_started: float = 0.0
    fill_done: list[float] = field(default_factory=list)  # perf_counter of each 201
    session_ids: list[str] = field(default_factory=list)
    db_files: dict[str, int] = field(default_factory=dict)
    session_rows: int | None = None
    db_bytes: int | None = None  # page_count * page_size: the database, wherever its pages are
    sessions_bytes: int | None = None  # the sessions table and its indexes (dbstat)
    profiles: dict[str, Profile] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def samples(self, name: str) -> list[float]:
        """The latency list called ``name`` (created empty)."""
        return self.latencies_ms.setdefault(name, [])


def summary(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """p50, p99 and max of ``values``."""
    ordered = sorted(values)
    return percentile(ordered, 0.5), percentile(ordered, 0.99), ordered[-1] if ordered else None


def fill_rates(results: Results) -> tuple[float | None, float | None, float | None]:
    """Sessions per second: overall, over the first tenth and over the last tenth."""
    done = sorted(results.fill_done)
    if not done:
        return None, None, None
    start = results.fill_started
    overall = len(done) / (done[-1] - start) if done[-1] > start else None
    tenth = len(done) // 10
    if tenth < 2:
        return overall, None, None
    first = tenth / (done[tenth - 1] - start)
    last = tenth / (done[-1] - done[-tenth - 1])
    return overall, first, last


# -- phases ---------------------------------------------------------------------------------------


async def first_delta(client: LoadClient, path: str) -> float:
    """Open the SSE response at ``path``; the ``time.perf_counter()`` at which its first
    complete ``event: delta`` had arrived. The stream is then dropped (the generation keeps
    running on the server, which is what a client switching away does).

    keepstream writes whole events per chunk, so looking for ``event: delta`` followed by a
    blank line in the body so far never misses a frame."""
    body = b""
    seen_ns: int | None = None

    def on_read(received_ns: int, data: bytes) -> bool:
        nonlocal body, seen_ns
        body += data
        at = body.find(DELTA_MARK)
        if at >= 0 and body.find(b"\n\n", at) >= 0:
            seen_ns = received_ns
        return seen_ns is not None

    response = await client.stream(path, on_read, headers=SSE_HEADERS)
    if response.status != 200:
        raise BenchHTTPError(f"GET {path} answered {response.status}")
    if seen_ns is None:
        raise BenchHTTPError(f"GET {path} ended without a delta event")
    return seen_ns / 1e9


class Bench:
    """The phases against one started server, with one client."""

    def __init__(
        self,
        server: Server,
        client: LoadClient,
        opts: argparse.Namespace,
        *,
        results: Results,
        workdir: Path,
        out: Callable[[str], None],
    ) -> None:
        self.server = server
        self.client = client
        self.opts = opts
        self.results = results
        self.workdir = workdir
        self.out = out

    @contextlib.contextmanager
    def measured(self, name: str) -> Iterator[PhaseStats]:
        """Wall time and both sides' CPU of a phase (also when cut short), with py-spy when
        ``--profile`` names it."""
        stats = self.results.phases[name] = PhaseStats(name)
        spy: subprocess.Popen[bytes] | None = None
        raw = self.workdir / f"profile-{name}.txt"
        if name in self.opts.profile:
            spy = start_py_spy(
                self.server.pid,
                duration=self.opts.profile_seconds,
                output=raw,
                log=self.workdir / f"py-spy-{name}.log",
            )
            if spy is None:
                self.results.notes.append("py-spy is not installed: no profile")
            else:
                stats.profiled = True
                # Blocking on purpose, here and in _stop_py_spy: nothing else runs between
                # phases, and py-spy must attach before the phase starts.
                time.sleep(1.0)
        ticks0 = self.server.cpu_ticks()
        cpu0 = cpu_seconds()
        t0 = time.perf_counter()
        try:
            yield stats
        finally:
            stats.wall = time.perf_counter() - t0
            stats.client_cpu = cpu_seconds() - cpu0
            ticks1 = self.server.cpu_ticks()
            if ticks0 is not None and ticks1 is not None:
                stats.server_cpu = (ticks1 - ticks0) / CLOCK_TICKS
            if spy is not None:
                self._stop_py_spy(spy, name, raw)

    def _stop_py_spy(self, spy: subprocess.Popen[bytes], name: str, raw: Path) -> None:
        # SIGINT makes ``py-spy record`` write what it has and exit: the profile covers the
        # phase and no more (up to --profile-seconds).
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
        try:
            spy.wait(PY_SPY_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill(spy)
        if raw.exists():
            self.results.profiles[name] = summarise_profile(raw, limit=15)
        else:
            self.results.notes.append(f"py-spy wrote no profile for {name} (see {raw.parent})")

    async def _request(
        self, stats: PhaseStats, method: str, path: str, body: bytes | None, expect: int
    ) -> bytes | None:
        """One request; its body, or ``None`` (counted as an error) when it failed."""
        stats.requests += 1
        headers = JSON_HEADERS if body is not None else None
        try:
            response = await self.client.request(method, path, body or b"", headers=headers)
        except BenchHTTPError as exc:
            stats.fail(str(exc))
            return None
        if response.status != expect:
            stats.fail(f"{method} {path} answered {response.status}: {response.body[:200]!r}")
            return None
        return response.body

    async def fill(self) -> None:
        """Create ``--sessions`` sessions, ``--fill-concurrency`` requests in flight."""
        results, total = self.results, self.opts.sessions
        latencies = results.samples("fill create")
        issued = 0

        async def worker(stats: PhaseStats) -> None:
            nonlocal issued
            while issued < total and not stats.given_up:
                issued += 1
                t0 = time.perf_counter()
                body = await self._request(stats, "POST", "/v1/sessions", b"{}", 201)
                t1 = time.perf_counter()
                if body is not None:
                    results.fill_done.append(t1)
                    latencies.append((t1 - t0) * 1000)
                    results.session_ids.append(json.loads(body)["id"])

        with self.measured("fill") as stats:
            results.fill_started = time.perf_counter()
            async with asyncio.TaskGroup() as tg:
                for _ in range(self.opts.fill_concurrency):
                    tg.create_task(worker(stats))
            stats.finished = not stats.given_up

    async def sampled(
        self,
        name: str,
        one: Callable[[PhaseStats, int], Awaitable[dict[str, float] | None]],
    ) -> None:
        """``--warmup`` + ``--samples`` calls of ``one(stats, i)``, ``--sample-concurrency``
        at a time; the latencies (ms by figure) of the non-warm-up ones are kept."""
        opts = self.opts
        count = opts.warmup + opts.samples
        issued = 0

        async def worker(stats: PhaseStats) -> None:
            nonlocal issued
            while issued < count and not stats.given_up:
                i = issued
                issued += 1
                if opts.sample_gap > 0:
                    await asyncio.sleep(opts.sample_gap)
                measured = await one(stats, i)
                if measured is not None and i >= opts.warmup:
                    for figure, ms in measured.items():
                        self.results.samples(figure).append(ms)

        with self.measured(name) as stats:
            async with asyncio.TaskGroup() as tg:
                for _ in range(opts.sample_concurrency):
                    tg.create_task(worker(stats))
            stats.finished = not stats.given_up

    async def list_once(self, stats: PhaseStats, figure: str) -> dict[str, float] | None:
        """``GET /v1/sessions?limit=100``; checks that a full page came back."""
        t0 = time.perf_counter()
        body = await self._request(stats, "GET", f"/v1/sessions?limit={LIST_LIMIT}", None, 200)
        elapsed = (time.perf_counter() - t0) * 1000
        if body is None:
            return None
        page = len(json.loads(body)["data"])
        if page != min(LIST_LIMIT, len(self.results.session_ids)):
            stats.fail(f"the list held {page} sessions")
            return None
        return {figure: elapsed}

    async def create_once(self, stats: PhaseStats, i: int) -> dict[str, float] | None:
        """``POST /v1/sessions {}``."""
        t0 = time.perf_counter()
        body = await self._request(stats, "POST", "/v1/sessions", b"{}", 201)
        return None if body is None else {"create": (time.perf_counter() - t0) * 1000}

    async def post_once(self, stats: PhaseStats, i: int) -> dict[str, float] | None:
        """A message to the i-th chosen filled session; to its 202 and its first delta."""
        ids = self.results.session_ids
        count = self.opts.warmup + self.opts.samples
        session_id = ids[i * len(ids) // count]  # spread over the filled sessions, all distinct
        t0 = time.perf_counter()
        path = f"/v1/sessions/{session_id}/messages"
        body = await self._request(stats, "POST", path, MESSAGE_BODY, 202)
        t1 = time.perf_counter()
        if body is None:
            return None
        generation_id = json.loads(body)["generation_id"]
        stats.requests += 1
        try:
            t2 = await first_delta(self.client, f"/v1/generations/{generation_id}/events")
        except BenchHTTPError as exc:
            stats.fail(f"events of {generation_id}: {exc}")
            return None
        return {"post to 202": (t1 - t0) * 1000, "post to first delta": (t2 - t0) * 1000}

    def database_size(self) -> None:
        """The SQLite files' sizes; the database's own size (its pages, wherever they are:
        the main file or the WAL) and the sessions table's share; the rows, as a check."""
        db = self.server.extra["db"]
        results = self.results
        for suffix in ("", "-wal"):
            path = Path(f"{db}{suffix}")
            if path.exists():
                results.db_files[path.name] = path.stat().st_size
        try:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
            try:
                (rows,) = conn.execute("SELECT count(*) FROM sessions").fetchone()
                results.session_rows = int(rows)
                (pages,) = conn.execute("PRAGMA page_count").fetchone()
                (page_size,) = conn.execute("PRAGMA page_size").fetchone()
                results.db_bytes = int(pages) * int(page_size)
                with contextlib.suppress(sqlite3.Error):  # dbstat is an optional module
                    (table,) = conn.execute(
                        "SELECT sum(pgsize) FROM dbstat WHERE name IN (SELECT name FROM "
                        "sqlite_master WHERE tbl_name = 'sessions')"
                    ).fetchone()
                    results.sessions_bytes = int(table)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            results.notes.append(f"could not read the database: {exc}")

    async def run(self) -> None:
        """Every phase, in order, printing a line after each."""
        results, out = self.results, self.out
        await self.fill()
        self.database_size()
        out(fill_line(results))
        out(database_line(results))
        if not results.session_ids:
            results.notes.append("no session was created: nothing more to measure")
            return

        async def listed(stats: PhaseStats, i: int) -> dict[str, float] | None:
            return await self.list_once(stats, "list")

        async def listed_after(stats: PhaseStats, i: int) -> dict[str, float] | None:
            return await self.list_once(stats, "list after posts")

        for name, one, figures in (
            ("list", listed, ("list",)),
            ("create", self.create_once, ("create",)),
            ("post", self.post_once, ("post to 202", "post to first delta")),
            ("list-after-posts", listed_after, ("list after posts",)),
        ):
            await self.sampled(name, one)
            for figure in figures:
                out(latency_line(figure, results.samples(figure), results.phases[name]))


# -- report ---------------------------------------------------------------------------------------


def fill_line(results: Results) -> str:
    """What the fill did, in one line."""
    stats = results.phases.get("fill")
    if stats is None:
        return "  fill: not started"
    overall, first, last = fill_rates(results)
    p50, p99, worst = summary(results.samples("fill create"))
    line = (
        f"  fill: {len(results.fill_done):,} sessions in {stats.wall:.2f} s = "
        f"{fmt(overall)}/s (first tenth {fmt(first)}/s, last tenth {fmt(last)}/s); "
        f"create under load p50 {fmt(p50, '.1f')} ms, p99 {fmt(p99, '.1f')} ms, "
        f"max {fmt(worst, '.1f')} ms; {stats.errors} errors"
    )
    if stats.first_error:
        line += f" (first: {stats.first_error})"
    return line


def database_line(results: Results) -> str:
    """The database's size after the fill."""
    if not results.db_files:
        return "  database: no file"
    files = ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in results.db_files.items())
    rows = results.session_rows
    if not rows or results.db_bytes is None:
        return f"  database after the fill: files {files}; {rows} session rows"
    line = (
        f"  database after the fill: {results.db_bytes / 1e6:.2f} MB of pages = "
        f"{results.db_bytes / rows:,.0f} bytes/session"
    )
    if results.sessions_bytes is not None:
        line += (
            f" (sessions table and its indexes {results.sessions_bytes / 1e6:.2f} MB = "
            f"{results.sessions_bytes / rows:,.0f} bytes/session)"
        )
    return line + f"; {rows:,} session rows; on disk: {files} (the WAL is checkpointed later)"


def latency_line(figure: str, values: list[float], stats: PhaseStats) -> str:
    """One latency figure, in one line."""
    p50, p99, worst = summary(values)
    line = (
        f"  {figure}: {len(values)} samples, p50 {fmt(p50, '.2f')} ms, p99 {fmt(p99, '.2f')} ms, "
        f"max {fmt(worst, '.2f')} ms; {stats.errors} errors"
    )
    if stats.first_error:
        line += f" (first: {stats.first_error})"
    return line + (" [profiled]" if stats.profiled else "")


def sampling(opts: argparse.Namespace) -> str:
    """How latency is sampled, in words."""
    how = "sequential" if opts.sample_concurrency == 1 else f"{opts.sample_concurrency} at once"
    gap = f", {opts.sample_gap * 1000:g} ms pause before each" if opts.sample_gap > 0 else ""
    return how + (gap or ", back to back")


def verdict(p50: float | None, p99: float | None, target: float) -> str:
    """Met on the p99, met on the p50 only, or missed (lower is better)."""
    if p50 is None or p99 is None:
        return "no data"
    if p99 < target:
        return "met"
    if p50 < target:
        return "met at p50 only (p99 missed)"
    return "MISSED"


def final_report(results: Results, opts: argparse.Namespace, out: Callable[[str], None]) -> None:
    """The figures against the reference and the target, then CPU per phase."""
    how = sampling(opts)
    out("")
    out(
        f"results: latency over {opts.samples} samples each ({how}, after {opts.warmup} "
        f"warm-up requests); reference = the issue's published session component; target = 10x"
    )
    rows = [["figure", "p50", "p99", "max", "reference", "target", "ref/p50", "verdict"]]
    stored = len(results.session_ids)
    latency_rows = (
        ("create", "session create", REFERENCE_CREATE_MS),
        ("list", f"session list (limit={LIST_LIMIT}, {stored:,} stored)", REFERENCE_LIST_MS),
        ("post to 202", "message post -> 202", None),
        ("post to first delta", "message post -> first delta", None),
        ("list after posts", "session list after the posts", REFERENCE_LIST_MS),
    )
    for figure, label, reference in latency_rows:
        p50, p99, worst = summary(results.samples(figure))
        target = None if reference is None else reference / TARGET_FACTOR
        rows.append(
            [
                label,
                fmt(p50, ".2f", " ms"),
                fmt(p99, ".2f", " ms"),
                fmt(worst, ".2f", " ms"),
                "-" if reference is None else f"< {reference:g} ms",
                "-" if target is None else f"< {target:g} ms",
                "-" if reference is None or not p50 else f"{reference / p50:,.0f}x",
                "(no reference)" if target is None else verdict(p50, p99, target),
            ]
        )
    overall, _, _ = fill_rates(results)
    target_rate = REFERENCE_RATE * TARGET_FACTOR
    rate_verdict = "no data" if overall is None else "met" if overall >= target_rate else "MISSED"
    if overall is not None and len(results.fill_done) < opts.sessions:
        rate_verdict += " (partial fill)"
    rows.append(
        [
            f"sessions created/s (C={opts.fill_concurrency})",
            fmt(overall, ",.0f", "/s"),
            "",
            "",
            f">= {REFERENCE_RATE:,.0f}/s",
            f">= {target_rate:,.0f}/s",
            "-" if overall is None else f"{overall / REFERENCE_RATE:,.1f}x",
            rate_verdict,
        ]
    )
    table(rows, out)

    out("")
    out(f"CPU per phase (client: raw on {opts.loop}; {os.cpu_count()} cpus shared)")
    cpu_rows = [
        ["phase", "requests", "errors", "wall", "req/s", "server", "server/req", "client", ""]
    ]
    for name in PHASES:
        stats = results.phases.get(name)
        if stats is None:
            continue
        wall = stats.wall or None
        server = stats.server_cpu
        state = "" if stats.finished else "cut short"
        cpu_rows.append(
            [
                name,
                f"{stats.requests:,}",
                f"{stats.errors:,}",
                fmt(wall, ".2f", " s"),
                fmt(stats.requests / wall if wall else None, ",.0f"),
                fmt(server / wall if server is not None and wall else None, ".2f", " cores"),
                fmt(
                    server * 1000 / stats.requests
                    if server is not None and stats.requests
                    else None,
                    ".2f",
                    " ms",
                ),
                fmt(stats.client_cpu / wall if wall else None, ".2f", " cores"),
                state + (" profiled" if stats.profiled else ""),
            ]
        )
    table(cpu_rows, out)
    for name, profile in results.profiles.items():
        print_profile(name, profile, out)
    for note in results.notes:
        out(f"note: {note}")


def print_profile(name: str, profile: Profile, out: Callable[[str], None]) -> None:
    """The top functions of a py-spy profile of the server."""
    total = profile.total or 1
    out("")
    out(f"server profile during {name}: {profile.total:,} samples (py-spy, non-idle)")
    out("  threads: " + ", ".join(f"{t} {n / total:.0%}" for t, n in profile.threads))
    out("  own time:")
    for function, count in profile.own:
        out(f"    {count / total:6.1%}  {function}")
    out("  inclusive:")
    for function, count in profile.inclusive:
        out(f"    {count / total:6.1%}  {function}")


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="bench_sessions.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS, help="sessions to fill")
    parser.add_argument(
        "--fill-concurrency",
        type=int,
        default=DEFAULT_FILL_CONCURRENCY,
        help="create requests in flight while filling (also the client's connection limit)",
    )
    parser.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help="measured requests per figure"
    )
    parser.add_argument(
        "--warmup", type=int, default=DEFAULT_WARMUP, help="unmeasured requests before each"
    )
    parser.add_argument(
        "--sample-concurrency",
        type=int,
        default=1,
        help="requests in flight while sampling latency (1 = sequential)",
    )
    parser.add_argument(
        "--sample-gap",
        type=float,
        default=0.0,
        help="seconds each latency worker pauses before a request (0 = back to back; "
        "see the module docstring on group commit)",
    )
    parser.add_argument(
        "--profile",
        action="append",
        choices=PHASES,
        default=[],
        help="run py-spy on the server during this phase (repeatable); its figures then carry "
        "py-spy's cost",
    )
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=DEFAULT_PROFILE_SECONDS,
        help="longest a profile records",
    )
    add_run_options(
        parser,
        time_limit=DEFAULT_TIME_LIMIT,
        keep_dir_help="keep the temporary directory (database, log)",
    )
    opts = parser.parse_args(argv)
    if min(opts.sessions, opts.fill_concurrency, opts.samples, opts.sample_concurrency) < 1:
        parser.error("--sessions, --fill-concurrency, --samples, --sample-concurrency must be >= 1")
    if opts.warmup < 0 or opts.time_limit <= 0:
        parser.error("--warmup must be >= 0 and --time-limit > 0")
    if opts.sessions < opts.warmup + opts.samples:
        parser.error("--sessions must be at least --warmup + --samples (one message each)")
    return opts


async def measure(
    server: Server,
    opts: argparse.Namespace,
    *,
    results: Results,
    workdir: Path,
    deadline: float,
    out: Callable[[str], None],
) -> None:
    """Every phase, cut at ``deadline`` (``time.monotonic()``)."""
    connections = max(opts.fill_concurrency, opts.sample_concurrency * 2)
    client = LoadClient(server.url, connections=connections, timeout=REQUEST_TIMEOUT)
    try:
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await Bench(server, client, opts, results=results, workdir=workdir, out=out).run()
    except TimeoutError:
        results.notes.append(
            f"HARD LIMIT of {opts.time_limit:g} s reached: the phase in progress was cut short "
            "and the server killed; the results above and below are partial"
        )
        out("  HARD LIMIT reached: partial results follow")
        fill = results.phases.get("fill")
        if fill is not None and not fill.finished:
            out(fill_line(results) + " [cut short]")
    finally:
        with contextlib.suppress(Exception):
            await client.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status (0 even when targets are missed)."""
    opts = parse_args(argv)
    started = time.monotonic()
    deadline = started + opts.time_limit
    guard_run(opts.time_limit + 30)  # a backstop if something blocks past the deadline
    workdir = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    results = Results()

    def out(line: str = "") -> None:
        print(line, flush=True)

    extra = ["--max-sessions-per-user", str(MAX_SESSIONS_PER_USER), *opts.ks_arg]
    server = keepstream_server(
        workdir,
        rate=SIM_RATE,
        tokens=SIM_TOKENS,
        capacity=256,
        flush_interval=None,
        extra_args=extra,
    )
    how = sampling(opts)
    out(
        f"keepstream sessions benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
        f"core {revision(opts)}  python {platform.python_version()}  {os.cpu_count()} cpus  "
        f"load {os.getloadavg()[0]:.2f}"
    )
    out(
        f"  {opts.sessions:,} sessions filled {opts.fill_concurrency} at once; "
        f"{opts.samples} samples per figure ({how}) after {opts.warmup} warm-up; client "
        f"raw on {opts.loop}; hard limit {opts.time_limit:g} s"
    )
    out(f"  server: {' '.join(server.command[2:])}")
    out(f"  work dir {workdir}")
    try:
        server.start()
        out(f"  server pid {server.pid} healthy after {time.monotonic() - started:.1f} s")
        loop = new_loop(opts.loop)
        try:
            loop.run_until_complete(
                measure(server, opts, results=results, workdir=workdir, deadline=deadline, out=out)
            )
        finally:
            loop.close()
    except DeadlineExceeded:
        results.notes.append(f"HARD LIMIT of {opts.time_limit:g} s (backstop) exceeded")
    except RuntimeError as exc:  # the server did not start
        results.notes.append(f"FAILED: {str(exc).strip()[-2000:]}")
    finally:
        signal.alarm(0)
        server.kill()
        kill_all()
    final_report(results, opts, out)
    if opts.keep_dir or opts.profile:
        out(f"\nkept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    out(
        f"\ntotal time {time.monotonic() - started:.1f} s, load {os.getloadavg()[0]:.2f} at the end"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
