"""The Durable Streams benchmark: keepstream against the Node reference server, side by side.

Run on demand (not part of the test suite), with the project's virtualenv::

    (the locked @durable-streams/server is installed into bench/node on first use)
    python bench/bench_durable.py                   # both servers, every figure
    python bench/bench_durable.py --quick --json /tmp/durable.json
    python bench/bench_durable.py --only node --node-store both

The same workload runs against (a) ``keepstream serve`` on a fresh SQLite file
(``--long-poll-timeout 20``) and (b) ``@durable-streams/server`` 0.3.7 through
``bench/node/serve.mjs`` (long-poll timeout 20 s; file-backed by default, i.e. LMDB plus
append-only logs with an fdatasync per append, or in memory with ``--node-store memory``,
or both). One server runs at a time, each a real process on 127.0.0.1, and both serve streams
at ``/v1/stream/<name>``. The clients are the benchmarks' raw-asyncio HTTP/1.1 client
(``bench/_client.py``; an HTTP library's CPU per request would be part of every latency): the
readers, or the appenders, split over ``--client-procs`` spawned processes
(``bench/_durable.py``), the paced writer in this one (``bench/_durable_phases.py``). Send and
receipt times are ``perf_counter_ns``, i.e. ``CLOCK_MONOTONIC``, one clock across processes.

1. **Append -> receive latency, long-poll.** One writer POSTs a 100-byte ``text/plain``
   message (its sequence number and ``perf_counter_ns`` at send) every ``--interval`` s to a
   stream; N readers (``--readers``, default 1 and 50) follow it with
   ``GET ?offset=<next>&live=long-poll`` loops, each re-issued with the ``Stream-Next-Offset``
   and ``Stream-Cursor`` it got. Latency = receipt (response complete) - send time, per
   message per reader; the first ``--warmup`` appends are not counted. At the end the writer
   closes the stream, which ends the readers.
2. **The same with ``live=sse`` readers** (``event: data`` payloads; ``control`` events carry
   ``streamNextOffset``; a reader reconnects from there if the server ends its response).
3. **Small-append throughput.** K writers (``--writers``, default 16), each POSTing 100-byte
   appends to its own stream back to back for ``--throughput-seconds``: acknowledged appends/s
   and POST latency; then again with ``Producer-Id``/``Producer-Epoch``/``Producer-Seq``
   (idempotent producer). Every stream is read back and its length checked.

Quantiles are nearest-rank over all samples; ratios are keepstream / node. Every phase also
reports the server's CPU and the clients' (all client processes and the writer): on a small
machine they share the CPUs, and a phase where one client process neared a full core, or where
client and server together filled the machine, is flagged under the table, as its figures are
then partly the client's or the machine's limit. Every phase has a time budget, the whole
invocation a hard limit (``--time-limit``), and every server and client process is killed at
exit. ``--no-git`` leaves out the core's git revision (``git status`` touches the index).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` (and the core) importable
    sys.path.insert(0, str(ROOT))

from bench._client import BenchHTTPError  # noqa: E402
from bench._durable import (  # noqa: E402
    MESSAGE_BYTES,
    STREAM_ROOT,
    BenchProtocolError,
    unique_name,
)
from bench._durable_phases import (  # noqa: E402
    LatencyRun,
    PhaseRun,
    ThroughputRun,
    latency_phase,
    throughput_phase,
)
from bench._live import percentile  # noqa: E402
from bench._options import add_run_options, revision  # noqa: E402
from bench._report import fmt, ratio, table  # noqa: E402
from bench._servers import (  # noqa: E402
    DeadlineExceeded,
    Server,
    free_port,
    guard_run,
    keepstream_server,
    kill_all,
)

NODE_DIR = ROOT / "bench" / "node"
NODE_LAUNCHER = NODE_DIR / "serve.mjs"
NODE_PACKAGE = NODE_DIR / "node_modules" / "@durable-streams" / "server" / "package.json"
DEFAULT_READERS = (1, 50)
DEFAULT_WRITERS = 16
DEFAULT_INTERVAL = 0.01  # seconds between the paced writer's appends
DEFAULT_APPENDS = 1_000  # measured appends per latency phase (10 s at 10 ms)
QUICK_APPENDS = 200
DEFAULT_WARMUP = 20  # appends before the measured ones, per latency phase
QUICK_WARMUP = 10
DEFAULT_THROUGHPUT_SECONDS = 5.0
QUICK_THROUGHPUT_SECONDS = 2.0
DEFAULT_LONG_POLL_TIMEOUT = 20.0  # seconds, both servers
DEFAULT_TIME_LIMIT = 600.0
PROBE_TIMEOUT = 5.0
PHASE_SLACK = 30.0  # seconds a phase may run beyond its planned length, then it is cut
MIN_SLACK = 5.0  # a phase is not started with less time than its planned length plus this
CLIENT_BOUND_CORES = 0.9  # a client process this busy limits the figure
MACHINE_BOUND_SHARE = 0.9  # client + server using this share of all CPUs: the machine is full
DEFAULT_CLIENT_PROCS = 2
MODES = ("long-poll", "sse")
# The keepstream serve flags the simulated model needs; irrelevant to streams.
SIM_RATE = 50.0
SIM_TOKENS = 20


# -- servers --------------------------------------------------------------------------------------


class ProtocolServer(Server):
    """A server without ``/healthz``: up once a request to a stream URL gets any HTTP answer."""

    def health(self) -> Any:
        """``HEAD`` a stream that does not exist; the status (404 expected)."""
        request = urllib.request.Request(f"{self.url}{STREAM_ROOT}bench-ready-probe", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code


@dataclass
class Target:
    """One server under test: its column name and how to make it."""

    name: str
    make: Callable[[Path], Server]
    description: str


def keepstream_target(opts: argparse.Namespace) -> Target:
    """keepstream on a fresh SQLite file in the run's directory."""
    timeout = f"{opts.long_poll_timeout:g}"
    extra = ["--host", "127.0.0.1", "--long-poll-timeout", timeout, *opts.ks_arg]

    def make(workdir: Path) -> Server:
        return keepstream_server(
            workdir,
            rate=SIM_RATE,
            tokens=SIM_TOKENS,
            capacity=256,
            flush_interval=None,
            db=workdir / "bench.db",
            extra_args=extra,
        )

    return Target(
        "keepstream",
        make,
        " ".join(
            ["keepstream serve --db <tmp>/bench.db --long-poll-timeout", timeout, *opts.ks_arg]
        ),
    )


def node_target(store: str, opts: argparse.Namespace) -> Target:
    """The Node reference server, file-backed (``store="file"``) or in memory."""
    timeout_ms = str(round(opts.long_poll_timeout * 1000))
    name = "node" if store == "file" else "node-mem"

    def make(workdir: Path) -> Server:
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not on PATH")
        if not NODE_PACKAGE.exists():
            # The locked version, from the npm registry (``npm ci`` refuses this lock here:
            # the registry has no builds of an optional dependency for other platforms).
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError("npm is not on PATH")
            subprocess.run([npm, "install", "--prefix", str(NODE_DIR)], check=True)
        port = free_port()
        command = [node, str(NODE_LAUNCHER), str(port), "--long-poll-timeout-ms", timeout_ms]
        if store == "file":
            data = workdir / f"node-data-{port}"
            data.mkdir()
            command += ["--data-dir", str(data)]
        return ProtocolServer(name, command, port, workdir / f"{name}-{port}.log")

    version = "?"
    if NODE_PACKAGE.exists():
        version = json.loads(NODE_PACKAGE.read_text()).get("version", "?")
    return Target(
        name,
        make,
        f"@durable-streams/server {version} ({store} store), long-poll timeout {timeout_ms} ms",
    )


def probe_protocol(server: Server) -> str | None:
    """``None`` if ``PUT /v1/stream/<new>`` creates a stream (201), else what went wrong."""
    url = f"{server.url}{STREAM_ROOT}{unique_name('probe')}"
    request = urllib.request.Request(
        url, data=b"", method="PUT", headers={"Content-Type": "text/plain"}
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        return f"PUT {STREAM_ROOT}<name>: {type(exc).__name__}: {exc}"
    return None if status == 201 else f"PUT {STREAM_ROOT}<name> answered {status}, not 201"


# -- running --------------------------------------------------------------------------------------


@dataclass
class TargetResults:
    """Every phase run against one server."""

    latency: dict[tuple[str, int], LatencyRun] = field(default_factory=dict)
    throughput: dict[bool, ThroughputRun] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """For ``--json``."""
        return {
            "latency": {f"{mode} x{n}": run.as_json() for (mode, n), run in self.latency.items()},
            "throughput": {
                ("producer" if producer else "plain"): run.as_json()
                for producer, run in self.throughput.items()
            },
            "problems": self.problems,
        }


def cpu_text(run: PhaseRun) -> str:
    """The client's CPU: all its processes, and the busiest one."""
    return (
        f"client {fmt(run.client_cores, '.2f')} cores ({run.procs} procs, busiest "
        f"{fmt(run.client_max_proc_cores, '.2f')})"
    )


def limits(run: PhaseRun) -> str | None:
    """Why a phase's figures may not be the server's own limit, or ``None``."""
    if (run.client_max_proc_cores or 0) >= CLIENT_BOUND_CORES:
        return f"a client process used {fmt(run.client_max_proc_cores, '.2f')} cores"
    cpus = os.cpu_count() or 1
    used = (run.client_cores or 0) + (run.server_cores or 0)
    if used >= MACHINE_BOUND_SHARE * cpus:
        return f"client + server used {used:.2f} of {cpus} cpus"
    return None


def latency_line(name: str, run: LatencyRun) -> str:
    """One latency phase, in one line."""
    line = (
        f"  {name:<10} {run.mode:>9} x{run.readers:<3}: {run.delivered:,}/{run.expected:,} "
        f"delivered, {fmt(run.append_rate, ',.0f')} appends/s, latency p50 "
        f"{fmt(run.latency(0.5), '.2f')} p99 {fmt(run.latency(0.99), '.2f')} max "
        f"{fmt(run.latency(1.0), '.2f')} ms; server {fmt(run.server_cores, '.2f')} cores, "
        f"{cpu_text(run)}; {run.errors} errors"
    )
    if run.first_error:
        line += f" (first: {run.first_error})"
    return line + (" [cut short]" if run.cut_short else "")


def throughput_line(name: str, run: ThroughputRun) -> str:
    """One throughput phase, in one line."""
    kind = "producer" if run.producer else "plain"
    stored = "" if run.stored_bytes == run.expected_bytes else " STORED BYTES DIFFER"
    line = (
        f"  {name:<10} {kind:>9} x{run.writers:<3}: {run.appends:,} appends in "
        f"{run.wall:.2f} s = {fmt(run.rate, ',.0f')}/s, POST p50 "
        f"{fmt(percentile(run.post_ms, 0.5), '.2f')} p99 "
        f"{fmt(percentile(run.post_ms, 0.99), '.2f')} ms; server "
        f"{fmt(run.server_cores, '.2f')} cores, {cpu_text(run)}; {run.errors} errors{stored}"
    )
    if run.first_error:
        line += f" (first: {run.first_error})"
    return line + (" [cut short]" if run.cut_short else "")


def measure(
    name: str,
    server: Server,
    opts: argparse.Namespace,
    results: TargetResults,
    *,
    deadline: float,
    out: Callable[[str], None],
) -> None:
    """Every phase against one started server, each cut at its budget or ``deadline``."""
    planned = (opts.appends + opts.warmup) * opts.interval
    for mode in MODES:
        for readers in opts.readers:
            # Start-up of the client processes, twice the planned time, one long-poll timeout.
            budget = min(
                PHASE_SLACK + planned * 2 + opts.long_poll_timeout, deadline - time.monotonic()
            )
            if budget < planned + MIN_SLACK:
                results.problems.append(f"{mode} x{readers}: skipped, too close to the limit")
                continue
            try:
                run = latency_phase(
                    server,
                    mode,
                    readers,
                    procs=opts.client_procs,
                    loop=opts.loop,
                    interval=opts.interval,
                    count=opts.appends,
                    warmup=opts.warmup,
                    long_poll_timeout=opts.long_poll_timeout,
                    budget=budget,
                )
            except (BenchHTTPError, BenchProtocolError, TimeoutError) as exc:
                results.problems.append(f"{mode} x{readers}: {type(exc).__name__}: {exc}")
                out(f"  {name:<10} {mode:>9} x{readers:<3}: FAILED: {type(exc).__name__}: {exc}")
                continue
            results.latency[(mode, readers)] = run
            out(latency_line(name, run))
    for producer in (False, True):
        budget = min(opts.throughput_seconds + PHASE_SLACK * 2, deadline - time.monotonic())
        if budget < opts.throughput_seconds + MIN_SLACK:
            results.problems.append("throughput: skipped, too close to the limit")
            continue
        tput = throughput_phase(
            server,
            opts.writers,
            procs=opts.client_procs,
            loop=opts.loop,
            seconds=opts.throughput_seconds,
            producer=producer,
            budget=budget,
        )
        results.throughput[producer] = tput
        out(throughput_line(name, tput))


def run_target(
    target: Target,
    opts: argparse.Namespace,
    workdir: Path,
    *,
    deadline: float,
    out: Callable[[str], None],
) -> TargetResults:
    """Start ``target``'s server, check it speaks the protocol, measure, kill it."""
    results = TargetResults()
    try:
        server = target.make(workdir)
    except RuntimeError as exc:
        results.problems.append(str(exc))
        out(f"  {target.name}: not run: {exc}")
        return results
    try:
        server.start()
        problem = probe_protocol(server)
        if problem is not None:
            results.problems.append(f"does not serve the Durable Streams protocol: {problem}")
            out(f"  {target.name}: not measured: {problem}")
            return results
        measure(target.name, server, opts, results, deadline=deadline, out=out)
    except RuntimeError as exc:  # the server did not start
        message = str(exc).strip().splitlines()
        results.problems.append(f"did not start: {' / '.join(message[-5:])}")
        out(f"  {target.name}: FAILED to start: {message[-1] if message else exc}")
    finally:
        server.kill()
    return results


# -- report ---------------------------------------------------------------------------------------


def report(
    results: dict[str, TargetResults], opts: argparse.Namespace, out: Callable[[str], None]
) -> None:
    """One table: a row per figure, a column per server, and keepstream / node ratios."""
    names = list(results)
    others = [n for n in names if n != "keepstream"] if "keepstream" in names else []
    header = ["figure", *names, *(f"ks/{n}" for n in others), ""]
    rows = [header]

    def add(label: str, values: dict[str, float | None], spec: str, unit: str = "") -> None:
        if all(v is None for v in values.values()):
            return
        ratios = [ratio(values.get("keepstream"), values.get(n)) for n in others]
        rows.append([label, *(fmt(values.get(n), spec, unit) for n in names), *ratios, ""])

    def add_text(label: str, values: dict[str, str]) -> None:
        if not values:
            return
        rows.append([label, *(values.get(n, "-") for n in names), *([""] * len(others)), ""])

    for mode in MODES:
        for readers in opts.readers:
            runs = {n: r.latency.get((mode, readers)) for n, r in results.items()}
            got = {n: run for n, run in runs.items() if run is not None}
            title = f"{mode} x{readers}"
            add(f"{title}: latency p50", {n: r.latency(0.5) for n, r in got.items()}, ".2f", " ms")
            add(f"{title}: latency p90", {n: r.latency(0.9) for n, r in got.items()}, ".2f", " ms")
            add(f"{title}: latency p99", {n: r.latency(0.99) for n, r in got.items()}, ".2f", " ms")
            add(f"{title}: latency max", {n: r.latency(1.0) for n, r in got.items()}, ".2f", " ms")
            add(
                f"{title}: writer POST p50",
                {n: percentile(r.post_ms, 0.5) for n, r in got.items()},
                ".2f",
                " ms",
            )
            add(f"{title}: appends/s achieved", {n: r.append_rate for n, r in got.items()}, ",.1f")
            add_text(
                f"{title}: delivered / expected",
                {n: f"{r.delivered:,}/{r.expected:,}" for n, r in got.items()},
            )
            add_text(
                f"{title}: gaps/dups/errors",
                {n: f"{r.gaps}/{r.duplicates}/{r.errors}" for n, r in got.items()},
            )
            add(
                f"{title}: server CPU", {n: r.server_cores for n, r in got.items()}, ".2f", " cores"
            )
            add(
                f"{title}: client CPU", {n: r.client_cores for n, r in got.items()}, ".2f", " cores"
            )
    for producer in (False, True):
        tputs = {n: r.throughput.get(producer) for n, r in results.items()}
        got_t = {n: run for n, run in tputs.items() if run is not None}
        title = f"{'producer' if producer else 'plain'} appends x{opts.writers}"
        add(f"{title}: appends/s", {n: r.rate for n, r in got_t.items()}, ",.0f")
        add(
            f"{title}: POST p50",
            {n: percentile(r.post_ms, 0.5) for n, r in got_t.items()},
            ".2f",
            " ms",
        )
        add(
            f"{title}: POST p99",
            {n: percentile(r.post_ms, 0.99) for n, r in got_t.items()},
            ".2f",
            " ms",
        )
        add_text(
            f"{title}: stored = acknowledged",
            {
                n: "yes" if r.stored_bytes == r.expected_bytes else f"NO ({r.stored_bytes})"
                for n, r in got_t.items()
            },
        )
        add(f"{title}: server CPU", {n: r.server_cores for n, r in got_t.items()}, ".2f", " cores")
        add(f"{title}: client CPU", {n: r.client_cores for n, r in got_t.items()}, ".2f", " cores")
    if len(rows) > 1:
        table(rows, out)
    else:
        out("  no figures")
    out(
        "  ratios are keepstream / the other server: below 1 is better for keepstream on "
        "latency and CPU, above 1 on appends/s"
    )
    for name, r in results.items():
        phases: list[tuple[str, PhaseRun]] = [
            (f"{mode} x{n}", run) for (mode, n), run in r.latency.items()
        ]
        phases += [
            (("producer" if p else "plain") + " appends", run) for p, run in r.throughput.items()
        ]
        for label, run in phases:
            why = limits(run)
            if why is not None:
                out(
                    f"  {name} {label}: {why}: the figures are (partly) the client's or the "
                    "machine's limit"
                )
        for problem in r.problems:
            out(f"  ! {name}: {problem}")


# -- main -----------------------------------------------------------------------------------------


def readers_list(text: str) -> tuple[int, ...]:
    """``"1,50"`` -> ``(1, 50)``."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("reader counts must be >= 1")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options, with ``--quick`` resolved."""
    parser = argparse.ArgumentParser(
        prog="bench_durable.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", choices=("keepstream", "node"), default=None)
    parser.add_argument(
        "--node-store",
        choices=("file", "memory", "both"),
        default="file",
        help="the Node server's store: file-backed (fdatasync per append), in memory, or both",
    )
    parser.add_argument(
        "--readers",
        type=readers_list,
        default=DEFAULT_READERS,
        help="reader counts of the latency phases, comma-separated",
    )
    parser.add_argument(
        "--writers", type=int, default=DEFAULT_WRITERS, help="concurrent appenders (throughput)"
    )
    parser.add_argument(
        "--interval", type=float, default=DEFAULT_INTERVAL, help="seconds between paced appends"
    )
    parser.add_argument(
        "--appends",
        type=int,
        default=None,
        help=f"measured appends per latency phase (default {DEFAULT_APPENDS}, quick "
        f"{QUICK_APPENDS})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help=f"unmeasured appends first (default {DEFAULT_WARMUP}, quick {QUICK_WARMUP})",
    )
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=None,
        help=f"length of each throughput phase (default {DEFAULT_THROUGHPUT_SECONDS:g}, quick "
        f"{QUICK_THROUGHPUT_SECONDS:g})",
    )
    parser.add_argument(
        "--long-poll-timeout",
        type=float,
        default=DEFAULT_LONG_POLL_TIMEOUT,
        help="both servers' long-poll timeout, seconds",
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=DEFAULT_CLIENT_PROCS,
        help="client processes the readers (latency) or appenders (throughput) are split over; "
        "the paced writer runs in the main process",
    )
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results")
    add_run_options(
        parser,
        time_limit=DEFAULT_TIME_LIMIT,
        keep_dir_help="keep the temporary directory (databases, logs)",
    )
    opts = parser.parse_args(argv)
    if opts.appends is None:
        opts.appends = QUICK_APPENDS if opts.quick else DEFAULT_APPENDS
    if opts.warmup is None:
        opts.warmup = QUICK_WARMUP if opts.quick else DEFAULT_WARMUP
    if opts.throughput_seconds is None:
        opts.throughput_seconds = (
            QUICK_THROUGHPUT_SECONDS if opts.quick else DEFAULT_THROUGHPUT_SECONDS
        )
    if min(opts.writers, opts.appends, opts.client_procs) < 1 or opts.warmup < 0:
        parser.error("--writers, --appends and --client-procs must be >= 1, --warmup >= 0")
    if min(opts.interval, opts.throughput_seconds, opts.long_poll_timeout, opts.time_limit) <= 0:
        parser.error("--interval, --throughput-seconds, --long-poll-timeout, --time-limit > 0")
    return opts


def targets(opts: argparse.Namespace) -> list[Target]:
    """The servers ``--only`` and ``--node-store`` select, keepstream first."""
    chosen = []
    if opts.only in (None, "keepstream"):
        chosen.append(keepstream_target(opts))
    if opts.only in (None, "node"):
        stores = ("file", "memory") if opts.node_store == "both" else (opts.node_store,)
        chosen += [node_target(store, opts) for store in stores]
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status (0 unless a server could not be measured)."""
    opts = parse_args(argv)
    started = time.monotonic()
    deadline = started + opts.time_limit
    guard_run(opts.time_limit + 30)  # a backstop if something blocks past the deadline
    workdir = Path(tempfile.mkdtemp(prefix="bench-durable-"))
    results: dict[str, TargetResults] = {}

    def out(line: str = "") -> None:
        print(line, flush=True)

    core = revision(opts)
    out(
        f"keepstream Durable Streams benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
        f"core {core}  python {platform.python_version()}  {os.cpu_count()} cpus  "
        f"load {os.getloadavg()[0]:.2f}"
    )
    out(
        f"  latency: one writer, a {MESSAGE_BYTES}-byte append every {opts.interval * 1000:g} ms, "
        f"{opts.warmup} + {opts.appends} appends; readers {', '.join(map(str, opts.readers))} "
        f"(long-poll, then SSE); throughput: {opts.writers} writers x "
        f"{opts.throughput_seconds:g} s, plain then with producer headers"
    )
    out(f"  client: bench/_client.py on {opts.loop}; hard limit {opts.time_limit:g} s")
    chosen = targets(opts)
    for target in chosen:
        out(f"  {target.name}: {target.description}")
    out(f"  work dir {workdir}")
    try:
        for target in chosen:
            results[target.name] = run_target(target, opts, workdir, deadline=deadline, out=out)
    except DeadlineExceeded:
        out(f"HARD LIMIT of {opts.time_limit:g} s exceeded: servers killed; partial results:")
    finally:
        signal.alarm(0)
        kill_all()
    out("")
    report(results, opts, out)
    if opts.json is not None:
        document = {
            "benchmark": "durable",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "core": core,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "options": {
                key: (list(value) if isinstance(value, tuple) else value)
                for key, value in vars(opts).items()
                if key != "json"
            },
            "servers": {t.name: t.description for t in chosen},
            "results": {name: r.as_json() for name, r in results.items()},
        }
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(json.dumps(document, indent=2, default=str) + "\n")
        out(f"\nresults written to {opts.json}")
    if opts.keep_dir:
        out(f"\nkept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    out(
        f"\ntotal time {time.monotonic() - started:.1f} s, load {os.getloadavg()[0]:.2f} at the end"
    )
    measured = all(r.latency or r.throughput for r in results.values())
    return 0 if measured and results else 1


if __name__ == "__main__":
    raise SystemExit(main())
