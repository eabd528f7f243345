"""The soak benchmark: one keepstream server under minutes of mixed load, watched for leaks.

Run on demand (not part of the test suite), with the project's virtualenv::

    python bench/soak.py                        # 30 minutes, 50 clients
    python bench/soak.py --quick                # 2 minutes
    python bench/soak.py --minutes 10 --clients 100 --out /tmp/soak.json

One ``keepstream serve`` on 127.0.0.1 (a free port, a fresh SQLite file in a temporary
directory, the simulated model at ``--rate`` tokens/s and up to ``--tokens`` tokens an answer,
``--long-poll-timeout 5``), and ``--clients`` client tasks in this process (httpx and
httpx-sse on anyio, one connection pool). Each client runs one scenario after another, picked
at random by weight, with a short pause between them:

* **generate**: start a generation (``202``, or the answer itself on the ``POST`` with
  ``Accept: text/event-stream``) and read its events to the end;
* **resume**: start one and read it with 1 to 3 drops: close the connection after a random
  number of events, wait, and resume from the last id by ``Last-Event-ID``, ``?offset=`` or
  ``?text_offset=``;
* **cancel**: start one, read a few events (or none), cancel it (sometimes twice), read the
  rest; the final status must be ``cancelled`` (or ``completed``, if it won the race);
* **session**: take one of at most 8 open sessions (the server allows 10 per user) or open a
  new one, post a message, follow ``/v1/sessions/{id}/events`` (sometimes with a drop and a
  ``Last-Event-ID`` resume) to the end of its answer, read or list sessions, patch the
  context, and delete the session one time in four;
* **stream**: ``PUT`` a Durable Stream (JSON or text, sometimes with a TTL), append 3 to 15
  messages while a ``live=long-poll`` reader follows it (one time in ten the writer pauses
  past the long-poll timeout), close it, read it back by catch-up reads (sometimes an
  ``If-None-Match`` read for the ``304`` and a ``HEAD``), and delete it unless it has a TTL.

Every text a reader assembles is checked: a generation's deltas must equal the snapshot's
``text``, its event ids must run without a gap or a repeat, its last id must be the
snapshot's ``next_offset`` and its terminal status the snapshot's; a stream's long-poll reads
and its catch-up read must each give exactly what was appended. A difference is a
*mismatch*. Every request is bounded (30 s), every scenario (60 s), every loop by a count.

Every minute one line: the server's RSS (``VmRSS``) and open file descriptors, its CPU and
database size, the generations running, the requests that completed in that minute by kind,
the errors, and the p50/p90/p99 of request latency (plain requests; long-polls and SSE
excluded) and of time to first event (SSE: from sending the request to its first event). At
the end, the RSS growth between the end of minute 5 (a third of the run if that is sooner)
and the end of the load, PASS or FAIL against < 5 %, the file descriptors before and after,
and the totals. The figures per minute are written as JSON to ``--out``.

The exit status is 1 when any response was a 5xx, any mismatch was found, or the server
died; other errors (unexpected 4xx, timeouts, connection errors) and a FAIL on memory are
reported but do not change it. The server is killed at exit, whatever happened; its log is in
the temporary directory, which is kept (and named) when anything went wrong. ``--time-limit``
is the hard limit of the whole invocation; its default, 0, means the load's length plus 130 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` (and the core) importable
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402
import anyio.to_thread  # noqa: E402
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench._options import add_run_options  # noqa: E402
from bench._report import fmt  # noqa: E402
from bench._servers import (  # noqa: E402
    CLOCK_TICKS,
    DeadlineExceeded,
    Server,
    cpu_ticks,
    guard_run,
    keepstream_server,
    kill_all,
)
from bench._soak import (  # noqa: E402
    BASELINE_MINUTES,
    CAPACITY,
    CHECK_INTERVAL,
    CONNECT_TIMEOUT,
    DEFAULT_CLIENTS,
    DEFAULT_MINUTES,
    DEFAULT_OUT,
    DEFAULT_RATE,
    DEFAULT_TOKENS,
    ERROR_KINDS,
    FATAL_ERRORS,
    HEALTH_TIMEOUT,
    KEEPALIVE_EXPIRY,
    KINDS,
    LOG_TAIL_LINES,
    LONG_POLL_TIMEOUT,
    MAX_MONITOR_STEPS,
    MEMORY_TARGET_PCT,
    QUICK_MINUTES,
    REQUEST_TIMEOUT,
    SETTLE_SECONDS,
    TIME_LIMIT_SLACK,
    Load,
    Stats,
    quantiles,
)


@dataclass(frozen=True)
class Probe:
    """One look at the server process through ``/proc``, and at its database's files."""

    t: float  # time.monotonic()
    rss_kib: int | None  # VmRSS
    hwm_kib: int | None  # VmHWM, the peak RSS so far
    fds: int | None
    ticks: int | None  # utime + stime
    db_bytes: int


def probe(server: Server) -> Probe:
    """Read the server's RSS, peak RSS, open file descriptors, CPU and database size."""
    pid = server.pid
    memory: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    memory[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    try:
        fds: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    db = server.extra.get("db")
    db_bytes = 0
    if isinstance(db, Path):
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            with contextlib.suppress(OSError):
                db_bytes += path.stat().st_size
    return Probe(
        time.monotonic(), memory.get("VmRSS"), memory.get("VmHWM"), fds, cpu_ticks(pid), db_bytes
    )


def mib(kib: int | None) -> float | None:
    """KiB as MiB."""
    return None if kib is None else kib / 1024


class Soak:
    """One soak run against a started server: the load, a line a minute, the figures."""

    def __init__(
        self, server: Server, opts: argparse.Namespace, out: Callable[[str], None]
    ) -> None:
        self.server = server
        self.opts = opts
        self.out = out
        self.duration = opts.minutes * 60
        self.baseline_at = min(BASELINE_MINUTES * 60, self.duration / 3)
        self.stats = Stats()
        self.records: list[dict[str, Any]] = []
        self.before: Probe | None = None  # before the load
        self.baseline: Probe | None = None  # at baseline_at
        self.end: Probe | None = None  # when the load stopped
        self.idle: Probe | None = None  # SETTLE_SECONDS after that
        self.idle_health: dict[str, Any] | None = None
        self.server_died = False
        self.cut_short = False
        self._previous: Probe | None = None

    async def look(self) -> Probe:
        """``probe`` off the event loop (it reads files)."""
        return await anyio.to_thread.run_sync(probe, self.server)

    async def health(self, client: httpx.AsyncClient) -> dict[str, Any] | None:
        """Generations running and queued, from ``GET /metrics`` (parsed with
        prometheus-client's parser), or ``None`` if it did not answer in time."""
        try:
            response = await client.get("/metrics", timeout=HEALTH_TIMEOUT)
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        health: dict[str, Any] = {}
        for family in text_string_to_metric_families(response.text):
            if family.name == "keepstream_generations":
                for sample in family.samples:
                    health[sample.labels["state"]] = int(sample.value)
        return health

    async def sample(self, client: httpx.AsyncClient, elapsed: float) -> Probe:
        """Close the current minute: look at the server, print its line, keep its record."""
        window = self.stats.rotate()
        now = await self.look()
        health = await self.health(client)
        previous, self._previous = self._previous, now
        cores = None
        if previous is not None and previous.ticks is not None and now.ticks is not None:
            cores = (now.ticks - previous.ticks) / CLOCK_TICKS / max(1e-9, now.t - previous.t)
        record = {
            "minute": round(elapsed / 60, 2),
            "rss_mib": mib(now.rss_kib),
            "peak_rss_mib": mib(now.hwm_kib),
            "fds": now.fds,
            "db_mb": now.db_bytes / 1e6,
            "server_cores": cores,
            "running": None if health is None else health.get("running"),
            "queued": None if health is None else health.get("queued"),
            "requests": {kind: window.counts[kind] for kind in KINDS},
            "errors": {kind: window.errors[kind] for kind in ERROR_KINDS},
            "request_ms": quantiles(window.request_ms),
            "ttfe_ms": quantiles(window.ttfe_ms),
        }
        self.records.append(record)
        self.out(minute_line(record))
        return now

    async def monitor(
        self, client: httpx.AsyncClient, start: float, load: anyio.CancelScope
    ) -> None:
        """A line at the end of every whole minute of the load; the baseline look; the load
        stopped if the server dies."""
        minute = 1
        for _ in range(MAX_MONITOR_STEPS):
            elapsed = anyio.current_time() - start
            if elapsed >= self.duration:
                return
            if self.server.proc is not None and self.server.proc.poll() is not None:
                self.server_died = True
                load.cancel()
                return
            if self.baseline is None and elapsed >= self.baseline_at:
                self.baseline = await self.look()
            if minute * 60 <= elapsed and minute * 60 < self.duration - 1:
                await self.sample(client, elapsed)
                minute += 1
            due = [minute * 60, elapsed + CHECK_INTERVAL, self.duration]
            if self.baseline is None:
                due.append(self.baseline_at)
            await anyio.sleep(max(0.0, min(due) - elapsed))

    async def run(self) -> None:
        """Start the clients, watch, stop them at the end, then look at the idle server."""
        opts = self.opts
        connections = 2 * opts.clients + 8  # a stream scenario holds two
        limits = httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=connections,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        )
        timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT)
        async with httpx.AsyncClient(
            base_url=self.server.url,
            limits=limits,
            timeout=timeout,
            headers={"Accept-Encoding": "identity"},
        ) as client:
            load = Load(client, self.stats, opts)
            self.before = self._previous = await self.look()
            start = anyio.current_time()
            self.stats.started = time.monotonic()
            scope = anyio.CancelScope(deadline=start + self.duration)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.monitor, client, start, scope)
                with scope:
                    async with anyio.create_task_group() as clients:
                        for index in range(opts.clients):
                            clients.start_soon(
                                load.run_client, index, start + self.duration, opts.seed
                            )
            self.end = await self.sample(client, anyio.current_time() - start)
            if self.baseline is None:  # the load ended before the baseline (a dead server)
                self.baseline = self.end
            if not self.server_died:
                await anyio.sleep(SETTLE_SECONDS)
                self.idle = await self.look()
                self.idle_health = await self.health(client)


# -- report ---------------------------------------------------------------------------------------


def percentiles_text(values: dict[str, float | None]) -> str:
    """``p50/p90/p99`` in ms."""
    return "/".join(fmt(values[q], ".1f") for q in ("p50", "p90", "p99"))


def errors_text(errors: dict[str, int]) -> str:
    """The error count, and by kind when there are any."""
    total = sum(errors.values())
    if not total:
        return "0"
    return f"{total} (" + ", ".join(f"{k} {n}" for k, n in errors.items() if n) + ")"


def minute_line(record: dict[str, Any]) -> str:
    """One minute, in one line."""
    requests: dict[str, int] = record["requests"]
    by_kind = " ".join(f"{kind} {n}" for kind, n in requests.items())
    return (
        f"  min {record['minute']:5.2f}  rss {fmt(record['rss_mib'], '6.1f')} MiB  "
        f"fds {fmt(record['fds'], '4d')}  db {record['db_mb']:6.1f} MB  "
        f"cpu {fmt(record['server_cores'], '.2f')}  run {fmt(record['running'], '3d')}  "
        f"| req {sum(requests.values()):,}: {by_kind}  | err {errors_text(record['errors'])}  "
        f"| req ms {percentiles_text(record['request_ms'])}  "
        f"| ttfe ms {percentiles_text(record['ttfe_ms'])}"
    )


def growth(soak: Soak) -> float | None:
    """RSS growth from the baseline look to the end of the load, in percent."""
    base = soak.baseline.rss_kib if soak.baseline else None
    end = soak.end.rss_kib if soak.end else None
    if not base or end is None:
        return None
    return (end - base) / base * 100


def log_problems(server: Server) -> list[str]:
    """The lines of the server's log that look like trouble."""
    marks = ("ERROR", "Traceback", "Exception", "WARNING", "CRITICAL")
    return [line for line in server.output().splitlines() if any(m in line for m in marks)]


def report(soak: Soak, out: Callable[[str], None]) -> dict[str, Any]:
    """The summary; also returned for the JSON document."""
    stats, opts = soak.stats, soak.opts
    total = stats.total
    pct = growth(soak)
    base_min = (soak.baseline.t - stats.started) / 60 if soak.baseline else None
    verdict = "no data" if pct is None else "PASS" if pct < MEMORY_TARGET_PCT else "FAIL"
    out("")
    out(f"summary: {opts.minutes:g} minutes, {opts.clients} clients, seed {opts.seed}")
    base_rss = mib(soak.baseline.rss_kib) if soak.baseline else None
    end_rss = mib(soak.end.rss_kib) if soak.end else None
    peak_rss = mib(soak.end.hwm_kib) if soak.end else None
    before_rss = mib(soak.before.rss_kib) if soak.before else None
    out(
        f"  memory: RSS {fmt(base_rss, '.1f')} MiB at minute {fmt(base_min, '.2f')} -> "
        f"{fmt(end_rss, '.1f')} MiB at the end = {fmt(pct, '+.2f')} %; peak "
        f"{fmt(peak_rss, '.1f')} MiB; before the load {fmt(before_rss, '.1f')} MiB"
    )
    out(f"  {verdict}  memory growth {fmt(pct, '+.2f')} % (target < {MEMORY_TARGET_PCT:g} %)")
    idle_running = soak.idle_health.get("running") if soak.idle_health else None
    out(
        f"  file descriptors: {fmt(soak.before.fds if soak.before else None)} before the load, "
        f"{fmt(soak.end.fds if soak.end else None)} at its end, "
        f"{fmt(soak.idle.fds if soak.idle else None)} after {SETTLE_SECONDS:g} s idle "
        f"(RSS then {fmt(mib(soak.idle.rss_kib if soak.idle else None), '.1f')} MiB, "
        f"generations running {fmt(idle_running)})"
    )
    requests = {kind: total.counts[kind] for kind in KINDS}
    out(
        f"  requests: {sum(requests.values()):,}: "
        + ", ".join(f"{kind} {n:,}" for kind, n in requests.items())
    )
    request_q, ttfe_q = quantiles(total.request_ms), quantiles(total.ttfe_ms)
    out(
        f"  request latency p50/p90/p99 {percentiles_text(request_q)} ms over "
        f"{len(total.request_ms):,}; time to first event {percentiles_text(ttfe_q)} ms over "
        f"{len(total.ttfe_ms):,}"
    )
    errors = {kind: total.errors[kind] for kind in ERROR_KINDS}
    out(f"  errors: {errors_text(errors)}")
    for sample in stats.samples:
        out(f"    {sample}")
    problems = log_problems(soak.server)
    out(f"  server log: {len(problems)} warning/error lines ({soak.server.log})")
    if problems or any(errors.values()):
        for line in soak.server.output().splitlines()[-LOG_TAIL_LINES:]:
            out(f"    | {line}")
    if soak.server_died:
        out("  THE SERVER DIED during the run")
    if soak.cut_short:
        out("  HARD LIMIT reached: the run was cut short")
    return {
        "memory_growth_pct": pct,
        "memory_verdict": verdict,
        "baseline_minute": base_min,
        "before": asdict(soak.before) if soak.before else None,
        "baseline": asdict(soak.baseline) if soak.baseline else None,
        "end": asdict(soak.end) if soak.end else None,
        "idle": asdict(soak.idle) if soak.idle else None,
        "idle_health": soak.idle_health,
        "requests": requests,
        "errors": errors,
        "error_samples": stats.samples,
        "request_ms": request_q,
        "ttfe_ms": ttfe_q,
        "server_died": soak.server_died,
        "cut_short": soak.cut_short,
        "server_log_problem_lines": problems[-LOG_TAIL_LINES:],
    }


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options, with ``--quick`` and the default time limit resolved."""
    parser = argparse.ArgumentParser(
        prog="soak.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"minutes of load: {DEFAULT_MINUTES:g}, or {QUICK_MINUTES:g} with --quick",
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_MINUTES:g} minutes")
    parser.add_argument(
        "--clients", type=int, default=DEFAULT_CLIENTS, help="concurrent client tasks"
    )
    parser.add_argument(
        "--rate", type=float, default=DEFAULT_RATE, help="simulated model: tokens per second"
    )
    parser.add_argument(
        "--tokens", type=int, default=DEFAULT_TOKENS, help="simulated model: most tokens an answer"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed; None: a random one")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="where the JSON figures are written"
    )
    parser.add_argument("--no-out", action="store_true", help="write no JSON file")
    add_run_options(
        parser,
        time_limit=0.0,
        keep_dir_help="keep the temporary directory (database, server log); it is kept anyway "
        "when something went wrong",
        git=False,
    )
    opts = parser.parse_args(argv)
    if opts.minutes is None:
        opts.minutes = QUICK_MINUTES if opts.quick else DEFAULT_MINUTES
    if opts.minutes <= 0 or opts.clients < 1 or opts.rate <= 0 or opts.tokens < 3:
        parser.error("--minutes and --rate must be > 0, --clients >= 1, --tokens >= 3")
    if opts.time_limit <= 0:  # 0: the run's length, start-up, settling and slack
        opts.time_limit = opts.minutes * 60 + SETTLE_SECONDS + TIME_LIMIT_SLACK
    if opts.seed is None:
        opts.seed = random.randrange(1_000_000)
    return opts


async def soak_main(soak: Soak) -> None:
    """Run the soak within the hard time limit."""
    with anyio.move_on_after(soak.opts.time_limit) as scope:
        await soak.run()
    soak.cut_short = scope.cancelled_caught


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak; the exit status is 1 on any 5xx, mismatch or a dead server."""
    opts = parse_args(argv)
    started = time.monotonic()
    guard_run(opts.time_limit + 30)  # a backstop if something blocks past the limit
    workdir = Path(tempfile.mkdtemp(prefix="keepstream-soak-"))

    def out(line: str = "") -> None:
        print(line, flush=True)

    extra = ["--long-poll-timeout", f"{LONG_POLL_TIMEOUT:g}", *opts.ks_arg]
    server = keepstream_server(
        workdir,
        rate=opts.rate,
        tokens=opts.tokens,
        capacity=CAPACITY,
        flush_interval=None,
        extra_args=extra,
    )
    soak = Soak(server, opts, out)
    out(
        f"keepstream soak  {time.strftime('%Y-%m-%d %H:%M:%S')}  python "
        f"{platform.python_version()}  {os.cpu_count()} cpus  load {os.getloadavg()[0]:.2f}"
    )
    out(
        f"  {opts.minutes:g} minutes, {opts.clients} clients (httpx {httpx.__version__} on "
        f"{opts.loop}), simulated model {opts.rate:g} tokens/s, up to {opts.tokens} tokens; "
        f"seed {opts.seed}; hard limit {opts.time_limit:g} s"
    )
    out(f"  server: {' '.join(server.command[2:])}")
    out(f"  work dir {workdir}")
    failed_to_start = None
    try:
        server.start()
        out(f"  server pid {server.pid} healthy after {time.monotonic() - started:.1f} s")
        out(
            "  each minute: server RSS, open fds, database size, CPU (cores), generations "
            "running | requests completed by kind | errors | request latency p50/p90/p99 "
            "(plain requests) | time to first SSE event p50/p90/p99"
        )
        anyio.run(
            soak_main,
            soak,
            backend="asyncio",
            backend_options={"use_uvloop": opts.loop == "uvloop"},
        )
    except DeadlineExceeded:
        soak.cut_short = True
    except RuntimeError as exc:  # the server did not start
        failed_to_start = str(exc).strip()[-2000:]
    finally:
        signal.alarm(0)
        server.kill()
        kill_all()
    if failed_to_start is not None:
        out(f"FAILED: {failed_to_start}")
        out(f"kept {workdir}")
        return 1
    summary = report(soak, out)
    fatal = any(summary["errors"][kind] for kind in FATAL_ERRORS) or soak.server_died
    if not opts.no_out:
        document = {
            "benchmark": "soak",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
            "server": server.command[2:],
            "minutes": soak.records,
            "summary": summary,
        }
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(document, indent=2, default=str) + "\n")
        out(f"  figures written to {opts.out}")
    if opts.keep_dir or fatal or any(summary["errors"].values()):
        out(f"  kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    out(f"  exit status {int(fatal)}; total time {time.monotonic() - started:.1f} s")
    return int(fatal)


if __name__ == "__main__":
    raise SystemExit(main())
