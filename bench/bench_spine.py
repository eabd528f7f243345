"""The spine benchmark: live fan-out against a no-persistence baseline, and resume.

Run on demand (not part of the test suite), with the project's virtualenv::

    python bench/bench_spine.py                 # C=1000 R=50 L=500, live + resume
    python bench/bench_spine.py --quick         # C=50 L=100
    python bench/bench_spine.py --only live --repeat 3 --profile
    python bench/bench_spine.py --sweep 100,300,1000,2000   # the scaling table and plot
    python bench/bench_spine.py --only live --store both --nodes 2 --no-baseline -C 300 --repeat 2

1. **Live fan-out.** A fresh ``keepstream serve`` (new SQLite file) and, separately, the
   baseline (``bench/baseline_app.py``: the same simulated model streamed through plain
   sse-starlette, one event per token, nothing stored) each get C connections, each a
   ``POST /v1/generations`` (R tokens/s, L tokens, stamped) followed by one SSE reader on the
   same connection. By default all C connections are first opened and warmed (``GET
   /healthz``) while the server is idle, and only then are the generations started at
   ``--start-rate``: a busy uvloop server accepts new connections very slowly, which would
   otherwise be measured as streaming (``--open-mode lazy`` shows exactly that). Reported:
   delivered tokens/s, token latency (stamp → client receipt, and receipt against the
   token's schedule, first stamp + i/R, which also counts a model the server was too busy to
   run on time), server and client CPU, the store's rows and commits, and whether anything
   fell behind. With ``--repeat N`` the two alternate (ks, base, base, ks, …) and medians are
   quoted.

   **On Redis** (``--store redis``, or ``both`` for SQLite and Redis side by side in one
   invocation, alternating like the baseline): the bench starts a ``redis-server`` of its own
   (free loopback port, temporary ``--dir``, ``--appendonly yes --appendfsync everysec --save
   ""``) and ``--nodes`` ``keepstream serve --store redis://…`` on it, each with the arguments
   the SQLite server gets. The client processes (``--client-procs``, rounded up to a multiple
   of the nodes, and then the same for every kind of server) go to the nodes round-robin, so
   each node gets C/N connections; ``--cross-follow`` (half by default) of each process's
   streams are POSTed on its node and read, from the 202 on, on the next one (a second warmed
   connection). Reported besides: latency of the streams read on the node that runs them and
   on another one, CPU per node and their sum, redis-server's CPU, the store counters summed
   over the nodes (WAL and compaction figures are SQLite's: ``n/a``), and Redis's memory
   (``INFO memory``: ``used_memory`` and ``used_memory_dataset``, right before "go" and once
   every stream ended) per 1,000 tokens and per byte of the answers' text. On Redis the text
   and the tokens (``usage.output_tokens``) are estimated from ``GET /v1/generations/{id}`` of
   50 generations spread over the run, times the generations started (SQLite's text is
   summed in the file). A line compares the two stores (ratios of medians).
2. **Resume.** A finished 100,000-token generation read from offset 0: time to first byte and
   catch-up tokens/s, for (a) a generation made by the server as fast as possible (deltas
   coalesced) and (b) one written straight into the database with one token per event.

Modules: ``_client`` (the HTTP client), ``_parse`` (parsing recorded responses),
``_live_client`` (the live runs' client processes), ``_servers`` (server processes, Redis,
sampling, py-spy), ``_deployment`` (the servers of one live run: SQLite, Redis nodes or the
baseline), ``_live``, ``_resume`` and ``_report`` (the two parts and the printing),
``baseline_app``. The resume part always runs on SQLite.

The client is a raw-asyncio (uvloop) HTTP/1.1 client in separate processes (``--client-procs``)
that records reads and parses them after the run (see ``bench/_client.py``). Every run has a
hard deadline after which the clients abort and partial results are printed; every server is
killed at exit.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` (and the core) importable
    sys.path.insert(0, str(ROOT))

from bench._deployment import BASELINE, REDIS, STORE_KINDS, kinds, label  # noqa: E402
from bench._live import LiveOutcome, run_one_live  # noqa: E402
from bench._options import add_run_options, revision  # noqa: E402
from bench._report import fmt, live_report, print_profile, resume_report  # noqa: E402
from bench._resume import ResumeOutcome, resume_bench  # noqa: E402
from bench._servers import DeadlineExceeded, guard_run, kill_all  # noqa: E402
from bench._sweep import Results, plot_sweep, sweep_report  # noqa: E402

DEFAULT_CONCURRENCY = 1000
DEFAULT_RATE = 50.0
DEFAULT_TOKENS = 500
QUICK_CONCURRENCY = 50
QUICK_TOKENS = 100
DEFAULT_CONNECT_RATE = 0.0  # connections per second in the open phase; 0 = all at once
DEFAULT_CONNECT_WINDOW = 100  # connections between connect and "GET sent" at once
DEFAULT_TIME_LIMIT = 900.0  # the whole invocation
DEFAULT_RUN_SLACK = 30.0  # a live run may take ramp + L/R + this, then it is cut
DEFAULT_BEHIND_SLACK = 0.5  # a stream whose last token is this late (s) fell behind
DEFAULT_RESUME_TOKENS = 100_000
DEFAULT_RESUME_RUNS = 7
DEFAULT_START_RATE = 500.0  # generations started (POSTs) per second
DEFAULT_SAMPLE_INTERVAL = 0.1  # seconds between looks at the server while streaming
DEFAULT_NODES = 2  # keepstream nodes on one Redis
DEFAULT_CROSS_FOLLOW = 0.5  # with several nodes: the share of streams read on another node


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options, with ``--quick`` and defaults resolved."""
    parser = argparse.ArgumentParser(
        prog="bench_spine.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--concurrency",
        "-C",
        type=int,
        default=None,
        help=f"concurrent generations (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument("--rate", "-R", type=float, default=DEFAULT_RATE, help="tokens/s each")
    parser.add_argument(
        "--tokens",
        "-L",
        type=int,
        default=None,
        help=f"tokens per generation (default {DEFAULT_TOKENS})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="live runs per server, interleaved; medians are quoted",
    )
    parser.add_argument("--only", choices=("live", "resume"), default=None)
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=None,
        help="keepstream --flush-interval (default: the server's)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"C={QUICK_CONCURRENCY} L={QUICK_TOKENS}, 3 resume reads",
    )
    parser.add_argument(
        "--client-procs", type=int, default=1, help="client processes the readers are split over"
    )
    parser.add_argument(
        "--connect-rate",
        type=float,
        default=DEFAULT_CONNECT_RATE,
        help="open phase: new connections per second (0 = all at once)",
    )
    parser.add_argument(
        "--connect-window",
        type=int,
        default=DEFAULT_CONNECT_WINDOW,
        help="open phase: connections being opened (connect..warmed) at once",
    )
    parser.add_argument(
        "--start-rate",
        type=float,
        default=DEFAULT_START_RATE,
        help="streaming phase: generations started (POSTs) per second (0 = all at once)",
    )
    parser.add_argument(
        "--open-mode",
        choices=("warm", "lazy"),
        default="warm",
        help="warm: open and warm all C connections before any generation starts; lazy: "
        "connect right before each POST, while the server is already streaming to the others",
    )
    parser.add_argument(
        "--server-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="uvicorn event loop of both servers",
    )
    parser.add_argument(
        "--server-http",
        choices=("auto", "h11", "httptools"),
        default="auto",
        help="uvicorn HTTP parser of both servers",
    )
    parser.add_argument(
        "--coalesce-window",
        type=float,
        default=None,
        help="keepstream --coalesce-window (default: the server's)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="keepstream only")
    parser.add_argument(
        "--store",
        choices=tuple(STORE_KINDS),
        default="sqlite",
        help="the live part's keepstream: one node on SQLite, --nodes nodes on one Redis (a "
        "redis-server of the bench's own), or both, alternating like the baseline",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=DEFAULT_NODES,
        help="keepstream nodes on the one Redis; the client processes are spread over them "
        "round-robin (--client-procs is rounded up to a multiple of it)",
    )
    parser.add_argument(
        "--cross-follow",
        type=float,
        default=DEFAULT_CROSS_FOLLOW,
        help="Redis, several nodes, --open-mode warm: the share of streams read on another "
        "node than the one their POST started them on (0 = every stream on its own node)",
    )
    parser.add_argument(
        "--sweep",
        type=lambda text: [int(c) for c in text.split(",")],
        default=None,
        metavar="C,C,...",
        help="run the live part at each of these concurrencies (no resume part): one table, "
        "and a plot of latency against C",
    )
    parser.add_argument(
        "--plot-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "keepstream-bench",
        help="where --sweep writes spine-sweep.png (keep it out of the repository)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one extra keepstream run under py-spy (not in the medians); print its profile",
    )
    parser.add_argument(
        "--profile-baseline",
        action="store_true",
        help="the same for the baseline",
    )
    parser.add_argument(
        "--behind-slack",
        type=float,
        default=DEFAULT_BEHIND_SLACK,
        help="seconds a stream's last token may be late before it counts as fallen behind",
    )
    parser.add_argument("--resume-tokens", type=int, default=DEFAULT_RESUME_TOKENS)
    parser.add_argument(
        "--resume-runs",
        type=int,
        default=None,
        help=f"reads per resume shape (default {DEFAULT_RESUME_RUNS})",
    )
    parser.add_argument(
        "--run-slack",
        type=float,
        default=DEFAULT_RUN_SLACK,
        help="a live run is cut after ramp + L/R + this many seconds",
    )
    parser.add_argument(
        "--sample-interval",
        type=float,
        default=DEFAULT_SAMPLE_INTERVAL,
        help="poll /healthz, the WAL size and the server's CPU this often while streaming "
        "(0 = not at all)",
    )
    add_run_options(
        parser,
        time_limit=DEFAULT_TIME_LIMIT,
        keep_dir_help="keep the temporary directory with the databases (by default only logs "
        "and profiles are kept, and only when profiling)",
    )
    opts = parser.parse_args(argv)
    quick = opts.quick
    if opts.concurrency is None:
        opts.concurrency = QUICK_CONCURRENCY if quick else DEFAULT_CONCURRENCY
    if opts.tokens is None:
        opts.tokens = QUICK_TOKENS if quick else DEFAULT_TOKENS
    if opts.resume_runs is None:
        opts.resume_runs = 3 if quick else DEFAULT_RESUME_RUNS
    if opts.coalesce_window is not None:
        opts.ks_arg = ["--coalesce-window", str(opts.coalesce_window), *opts.ks_arg]
    if opts.concurrency < 1 or opts.tokens < 1 or opts.rate <= 0 or opts.repeat < 1:
        parser.error("--concurrency, --tokens, --rate and --repeat must be positive")
    if opts.sweep is not None and (not opts.sweep or min(opts.sweep) < 1):
        parser.error("--sweep takes positive concurrencies, e.g. 100,300,1000")
    if opts.nodes < 1 or not 0 <= opts.cross_follow <= 1:
        parser.error("--nodes must be positive and --cross-follow between 0 and 1")
    if opts.store != "sqlite":  # the same client processes for every kind of server
        opts.client_procs = math.ceil(opts.client_procs / opts.nodes) * opts.nodes
    if opts.store == "sqlite" or opts.nodes == 1 or opts.open_mode != "warm":
        opts.cross_follow = 0.0
    return opts


def live_rounds(
    opts: argparse.Namespace,
    global_deadline: float,
    workdir: Path,
    processes: list[BaseProcess],
    out: Callable[[str], None],
) -> tuple[dict[str, list[LiveOutcome]], list[LiveOutcome]]:
    """The live runs of each kind of server (``--repeat`` each, interleaved), then the
    profiled ones; each run is announced as it ends."""
    chosen = kinds(opts)
    plan = [
        (rep, kind, False)
        for rep in range(opts.repeat)
        for kind in (chosen if rep % 2 == 0 else chosen[::-1])
    ]
    # Profiled runs come last and stay out of the medians: py-spy takes CPU too.
    if opts.profile:
        plan.append((opts.repeat, chosen[0], True))  # keepstream (its first node)
    if opts.profile_baseline and not opts.no_baseline:
        plan.append((opts.repeat, BASELINE, True))
    live_runs: dict[str, list[LiveOutcome]] = {}
    profiled: list[LiveOutcome] = []
    for rep, kind, profile in plan:
        name = f"{label(kind, opts):<10} " + ("profiled run" if profile else f"run {rep + 1}")
        try:
            outcome = run_one_live(kind, opts, global_deadline, workdir, profile, processes)
        except RuntimeError as exc:  # the server did not start: say why, carry on
            out(f"  {name}: FAILED: {str(exc).strip().splitlines()[-1]}")
            continue
        if outcome is None:
            out(f"  skipped {name}: not enough time before the hard limit")
            continue
        (profiled if profile else live_runs.setdefault(kind, [])).append(outcome)
        redis = "" if kind != REDIS else f", redis {fmt(outcome.redis_cores, '.2f')} cores"
        out(
            f"  {name}: {outcome.tokens:,} tokens, "
            f"{fmt(outcome.throughput)} tokens/s, p99 "
            f"{fmt(outcome.latency(0.99), '.1f', ' ms')}, server "
            f"{fmt(outcome.server_cores, '.2f')} cores{redis}, client "
            f"{outcome.client_cores:.2f} cores ({outcome.client_loop})"
        )
    return live_runs, profiled


def store_line(opts: argparse.Namespace) -> str:
    """The header's line about the stores of the live part."""
    redis = (
        f"{opts.nodes} node(s) on one redis-server of the bench's own (appendonly, "
        f"appendfsync everysec, no RDB), client processes round-robin over them, "
        f"{opts.cross_follow:.0%} of the streams read on another node than their POST's"
    )
    return redis if opts.store == "redis" else f"one node on SQLite, and {redis}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status (0 even when targets are missed)."""
    opts = parse_args(argv)
    started = time.time()
    global_deadline = started + opts.time_limit
    guard_run(opts.time_limit + 60)  # a backstop if something blocks past the deadline
    workdir = Path(tempfile.mkdtemp(prefix="bench-spine-"))
    processes: list[BaseProcess] = []  # client processes of the run in progress

    def out(line: str = "") -> None:
        print(line, flush=True)

    C, R, L = opts.concurrency, opts.rate, opts.tokens
    out(
        f"keepstream spine benchmark  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
        f"core {revision(opts)}  python {platform.python_version()}  {os.cpu_count()} cpus  "
        f"load {os.getloadavg()[0]:.2f}"
    )
    flush = "server default" if opts.flush_interval is None else f"{opts.flush_interval:g} s"
    out(
        f"  live: C={C} R={R:g} tokens/s L={L} (stream {L / R:g} s, offered {C * R:,.0f} "
        f"tokens/s), flush-interval {flush}, "
        f"connections {opts.open_mode}: open "
        f"{'all at once' if opts.connect_rate <= 0 else f'{opts.connect_rate:g}/s'} "
        f"(window {opts.connect_window}), start {opts.start_rate:g}/s, "
        f"client procs {opts.client_procs} ({opts.loop}), repeat {opts.repeat}"
    )
    out(
        f"  servers: uvicorn loop={opts.server_loop} http={opts.server_http}; keepstream extra "
        f"args: {' '.join(opts.ks_arg) or 'none'}"
    )
    if opts.store != "sqlite":
        out(f"  stores: {store_line(opts)}")
    out(f"  work dir {workdir}; hard limit {opts.time_limit:g} s")
    live_runs: dict[str, list[LiveOutcome]] = {}
    resume: list[ResumeOutcome] = []
    try:
        if opts.sweep:
            sweep: Results = {}
            for concurrency in opts.sweep:
                at = argparse.Namespace(
                    **{**vars(opts), "concurrency": concurrency, "profile": False}
                )
                out(f"  C={concurrency}:")
                runs, _ = live_rounds(at, global_deadline, workdir, processes, out)
                for kind, outcomes in runs.items():
                    sweep[(concurrency, kind)] = outcomes
            out("")
            sweep_report(sweep, opts.behind_slack, out)
            plot = plot_sweep(sweep, opts.plot_dir)
            out(f"  plot: {plot}" if plot else "  no plot: matplotlib is not installed")
        elif opts.only in (None, "live"):
            live_runs, profiled = live_rounds(opts, global_deadline, workdir, processes, out)
            out("")
            live_report(live_runs, opts, out)
            for o in profiled:
                out("")
                print_profile(o, out)
        if opts.only in (None, "resume") and not opts.sweep:
            out("")
            out(
                f"resume: a finished {opts.resume_tokens:,}-token generation, "
                f"{opts.resume_runs} reads per shape"
            )
            try:
                resume = resume_bench(opts, workdir, global_deadline=global_deadline, out=out)
            except (RuntimeError, OSError, TimeoutError) as exc:
                out(f"  resume FAILED: {str(exc).strip().splitlines()[-1]}")
            resume_report(resume, out)
    except DeadlineExceeded:
        out(f"HARD LIMIT of {opts.time_limit:g} s exceeded: servers killed; partial results:")
        if live_runs:
            live_report(live_runs, opts, out)
        if resume:
            resume_report(resume, out)
    finally:
        signal.alarm(0)
        for process in processes:
            if process.is_alive():
                process.kill()
        kill_all()
        if not (opts.keep_dir or opts.profile or opts.profile_baseline):
            shutil.rmtree(workdir, ignore_errors=True)
    out(f"\ntotal time {time.time() - started:.1f} s, load {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
