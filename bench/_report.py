"""Printing the benchmark's figures side by side, with the targets beside them."""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial

from bench._deployment import BASELINE, REDIS, SQLITE, kinds, label
from bench._live import TEXT_SAMPLE, LiveOutcome, percentile
from bench._resume import ResumeOutcome

TARGET_P99_MS = 100.0
TARGET_RATIO = 1.0
TARGET_FIRST_BYTE_MS = 20.0
TARGET_CATCH_UP = 500_000.0
ALL_KINDS = (SQLITE, REDIS, BASELINE)


def fmt(value: float | int | None, spec: str = ",.0f", unit: str = "") -> str:
    """``value`` formatted with ``spec`` and ``unit``; ``-`` when missing."""
    if value is None:
        return "-"
    return f"{value:{spec}}{unit}"


def ratio(a: float | None, b: float | None) -> str:
    """``a / b`` as ``1.23x``; ``-`` when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def table(rows: list[list[str]], out: Callable[[str], None]) -> None:
    """Print rows as aligned columns (first column left, the last one free)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)
        ]
        out("  " + "  ".join(cells) + "  " + row[-1])
        if n == 0:
            out("  " + "-" * (sum(widths) + 2 * len(widths)))


def med(values: list[float | None]) -> float | None:
    """The median of the values present, or ``None``."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class Columns:
    """The live table's columns: one per kind of server (medians over its runs), then the
    ratios between kinds (``ks/base``; ``redis/sqlite`` and ``redis/base`` with Redis)."""

    runs: dict[str, list[LiveOutcome]]
    kinds: list[str]
    labels: list[str]
    ratios: list[tuple[str, str, str]] = field(init=False)  # (numerator, denominator, header)

    def __post_init__(self) -> None:
        sqlite_name = "ks" if REDIS not in self.kinds else "sqlite"
        pairs = ((SQLITE, BASELINE, f"{sqlite_name}/base"), (REDIS, BASELINE, "redis/base"))
        self.ratios = [
            pair
            for pair in (*pairs, (REDIS, SQLITE, "redis/sqlite"))
            if {*pair[:2]} <= {*self.kinds}
        ]

    def header(self, title: str) -> list[str]:
        """The header row."""
        return [title, *self.labels, *(name for _, _, name in self.ratios), "target"]

    def median(self, kind: str, fn: Callable[[LiveOutcome], float | None]) -> float | None:
        """The median of ``fn`` over the runs of ``kind``."""
        return med([fn(o) for o in self.runs.get(kind, [])])

    def row(
        self,
        name: str,
        fn: Callable[[LiveOutcome], float | None],
        spec: str,
        unit: str,
        target: str,
        with_ratio: bool = False,
        only: Collection[str] = ALL_KINDS,
    ) -> list[str]:
        """A row of medians; ``n/a`` for the kinds not in ``only``."""
        values = {k: self.median(k, fn) if k in only else None for k in self.kinds}
        cells = [fmt(values[k], spec, unit) if k in only else "n/a" for k in self.kinds]
        ratios = [ratio(values[a], values[b]) if with_ratio else "" for a, b, _ in self.ratios]
        return [name, *cells, *ratios, target]

    def per_node(
        self,
        name: str,
        fn: Callable[[LiveOutcome], list[float | None]],
        spec: str,
        target: str,
    ) -> list[str]:
        """A row of each node's median, as ``a + b + …``."""
        cells = []
        for kind in self.kinds:
            values = [fn(o) for o in self.runs.get(kind, [])]
            nodes = max((len(v) for v in values), default=0)
            medians = [med([v[i] for v in values if i < len(v)]) for i in range(nodes)]
            cells.append(" + ".join(fmt(m, spec) for m in medians) or "-")
        return [name, *cells, *("" for _ in self.ratios), target]

    def text(
        self,
        name: str,
        fn: Callable[[LiveOutcome], str],
        target: str,
        only: Collection[str] = ALL_KINDS,
    ) -> list[str]:
        """A row of one value per kind when its runs agree, else all of them."""
        cells = [_each(self.runs.get(k, []), fn) if k in only else "n/a" for k in self.kinds]
        return [name, *cells, *("" for _ in self.ratios), target]


def _each(outcomes: list[LiveOutcome], fn: Callable[[LiveOutcome], str]) -> str:
    """One value when every run agrees, else the list of them."""
    values = [fn(o) for o in outcomes]
    if not values:
        return "-"
    if len(set(values)) == 1:
        return values[0]
    return " | ".join(values)


def live_report(
    runs: dict[str, list[LiveOutcome]], opts: argparse.Namespace, out: Callable[[str], None]
) -> None:
    """Side-by-side table of the live runs (medians over repeats), the runs one by one, the
    comparison of the stores, the verdicts and the problems."""
    chosen = kinds(opts)
    columns = Columns(runs, chosen, [label(k, opts) for k in chosen])
    n = max((len(runs.get(k, [])) for k in chosen), default=0)
    head = f"median of {n}" if n > 1 else "1 run"
    table([columns.header(f"live fan-out ({head})"), *live_rows(columns, opts)], out)
    if n > 1:
        out("")
        table(per_run_rows(columns, opts), out)
    if SQLITE in chosen and REDIS in chosen:
        out(compare_stores(columns, opts))
    for kind in chosen:
        if kind != BASELINE and runs.get(kind):
            out(f"  {label(kind, opts)} vs targets: {verdicts(columns, kind, opts)}")
    for kind in chosen:
        for i, o in enumerate(runs.get(kind, []), 1):
            for problem in o.problems:
                out(f"  ! {kind} run {i}: {problem}")


def live_rows(columns: Columns, opts: argparse.Namespace) -> list[list[str]]:
    """The rows of the live table."""
    C, L = opts.concurrency, opts.tokens
    slack = opts.behind_slack
    row, text = columns.row, columns.text
    keepstream = (SQLITE, REDIS)
    with_redis = REDIS in columns.kinds
    expected = C * L
    rows = [
        row("delivered tokens/s", lambda o: o.throughput, ",.0f", "", ">= 1.0x baseline", True),
        row("latency p50", lambda o: o.latency(0.50), ",.2f", " ms", "", True),
        row(
            "latency p99",
            lambda o: o.latency(0.99),
            ",.2f",
            " ms",
            f"<= {TARGET_P99_MS:.0f} ms",
            True,
        ),
        row("latency max", lambda o: o.latency(1.0), ",.2f", " ms", "", True),
    ]
    if with_redis and opts.cross_follow > 0 and opts.nodes > 1:
        for where, cross in (("the node that runs it", False), ("another node", True)):
            rows.append(
                row(
                    f"  p99, read on {where}",
                    partial(LiveOutcome.latency_where, q=0.99, cross=cross),
                    ",.2f",
                    " ms",
                    f"{opts.cross_follow:.0%} read on another node" if cross else "",
                    only=(REDIS,),
                )
            )
    rows += [
        row(
            "latency vs schedule p50 (receipt - first stamp - i/R)",
            lambda o: o.schedule_latency(0.5),
            ",.2f",
            " ms",
            "",
            True,
        ),
        row("latency vs schedule p99", lambda o: o.schedule_latency(0.99), ",.2f", " ms", "", True),
        row("latency vs schedule max", lambda o: o.schedule_latency(1.0), ",.2f", " ms", "", True),
        text("tokens delivered / C*L", lambda o: f"{o.tokens:,}/{expected:,}", "all"),
        row(
            f"streams behind (>{slack:g} s late, short, or not completed)",
            lambda o: o.behind(slack),
            ",.0f",
            "",
            "0",
        ),
        row(
            "end lag p99 (last token vs schedule)",
            lambda o: percentile(sorted(o.end_lags()), 0.99),
            ",.3f",
            " s",
            "",
        ),
        row("end lag max", lambda o: max(o.end_lags(), default=None), ",.3f", " s", ""),
        row(
            "model lag max (stamps vs L/R)",
            lambda o: max(o.production_lags(), default=None),
            ",.3f",
            " s",
            "",
        ),
        text("completed streams", lambda o: f"{o.completed}/{C}", f"{C}"),
        text("id gaps / duplicates", lambda o: f"{o.gaps}/{o.duplicates}", "0/0"),
        row("SSE events received", lambda o: o.events, ",.0f", "", ""),
        row(
            "wall time of the run",
            lambda o: o.wall,
            ",.2f",
            " s",
            f"~ ramp + {L / opts.rate:g} s",
            True,
        ),
        row(
            "server CPU" + (" (all nodes)" if with_redis else ""),
            lambda o: o.server_cores,
            ",.2f",
            " cores",
            f"of {os.cpu_count()}",
            True,
        ),
    ]
    if with_redis:
        rows += [
            columns.per_node("  per node", lambda o: o.node_cores, ".2f", "cores"),
            row("redis-server CPU", lambda o: o.redis_cores, ",.2f", " cores", "", only=(REDIS,)),
        ]
    rows += [
        row(
            "server CPU, busiest second" + (" (all nodes)" if with_redis else ""),
            lambda o: o.peak_cores(),
            ",.2f",
            " cores",
            "",
        ),
        row(
            "slowest /healthz answer while streaming",
            lambda o: o.slowest_health_ms(),
            ",.1f",
            " ms",
            f"polled every {opts.sample_interval:g} s",
            True,
        ),
        row(
            "longest time without a commit" + (" (any node)" if with_redis else ""),
            lambda o: o.commit_gap_s(),
            ",.3f",
            " s",
            "",
            only=keepstream,
        ),
        row(
            "client CPU (during run)",
            lambda o: o.client_cores,
            ",.2f",
            " cores",
            f"{opts.client_procs} proc(s)",
        ),
        row(
            "open phase: connect + warm all C",
            lambda o: o.open_phase,
            ",.2f",
            " s",
            f"{opts.connect_rate:g}/s" if opts.connect_rate > 0 else "all at once",
            True,
        ),
        row(
            "  per connection p99 (connect -> /healthz)",
            lambda o: percentile(sorted(o.warm_times_ms()), 0.99),
            ",.1f",
            " ms",
            "",
        ),
        row(
            "start ramp (first POST -> last GET sent)",
            lambda o: o.ramp,
            ",.2f",
            " s",
            f"{opts.start_rate:g}/s" if opts.start_rate > 0 else "all at once",
        ),
        row(
            "POST -> 202 p50",
            lambda o: percentile(sorted(o.post_times_ms()), 0.5),
            ",.1f",
            " ms",
            "",
        ),
        row("POST -> 202 max", lambda o: max(o.post_times_ms(), default=None), ",.1f", " ms", ""),
        row(
            "POST -> first token p99",
            lambda o: percentile(sorted(o.first_token_ms()), 0.99),
            ",.1f",
            " ms",
            "",
        ),
        *store_rows(columns, opts),
    ]
    return rows


def store_rows(columns: Columns, opts: argparse.Namespace) -> list[list[str]]:
    """The live table's rows about the store: its counters, the SQLite file, Redis's memory."""
    row = columns.row
    keepstream = (SQLITE, REDIS)
    sqlite_only = (SQLITE,)
    nodes = " (all nodes)" if REDIS in columns.kinds else ""
    rows = [
        row(
            "rows written" + nodes,
            lambda o: o.store_delta("rows_written"),
            ",.0f",
            "",
            "",
            only=keepstream,
        ),
        row("commits" + nodes, lambda o: o.store_delta("commits"), ",.0f", "", "", only=keepstream),
        row(
            "rows / commit",
            lambda o: (
                (o.store_delta("rows_written") or 0) / c
                if (c := o.store_delta("commits"))
                else None
            ),
            ",.1f",
            "",
            "",
            only=keepstream,
        ),
        row(
            "commits / s",
            lambda o: (
                (o.store_delta("commits") or 0) / o.wall
                if o.wall and o.store_delta("commits") is not None
                else None
            ),
            ",.1f",
            "",
            "",
            only=keepstream,
        ),
        row(
            "database file after the run",
            lambda o: o.db_bytes and o.db_bytes / 1e6,
            ",.1f",
            " MB",
            "",
            only=sqlite_only,
        ),
        row(
            "WAL file after the run",
            lambda o: o.wal_bytes and o.wal_bytes / 1e6,
            ",.1f",
            " MB",
            "",
            only=sqlite_only,
        ),
        row(
            "database in use, compacted, per 1,000 tokens",
            lambda o: o.disk_per_kilotoken(),
            ",.0f",
            " B",
            "",
            only=sqlite_only,
        ),
        row(
            "database in use, compacted / the answers' text",
            lambda o: o.disk_per_text(),
            ".2f",
            "x",
            "<= 2x",
            only=sqlite_only,
        ),
        row(
            "database file, compacted / the answers' text",
            lambda o: o.disk_per_text(in_use=False),
            ".2f",
            "x",
            "free pages are reused",
            only=sqlite_only,
        ),
        row(
            "WAL file, largest seen while streaming",
            lambda o: o.peak_wal_mb(),
            ",.1f",
            " MB",
            "",
            only=sqlite_only,
        ),
    ]
    if REDIS not in columns.kinds:
        return rows
    sample = min(opts.concurrency, TEXT_SAMPLE)
    rows.append(
        row(
            "the answers' text",
            lambda o: o.text_bytes and o.text_bytes / 1e6,
            ",.1f",
            " MB",
            f"redis: the mean of {sample} generations x those started",
            only=keepstream,
        )
    )
    rows.append(
        row(
            "  tokens generated (their usage.output_tokens)",
            lambda o: o.stored_tokens,
            ",.0f",
            "",
            "redis: estimated like the text",
            only=(REDIS,),
        )
    )
    return rows + redis_rows(columns)


def _redis_mb(outcome: LiveOutcome, *, dataset: bool) -> float | None:
    """Redis's memory growth over the streaming phase, MB."""
    growth = outcome.redis_growth(dataset=dataset)
    return growth / 1e6 if growth is not None else None


def redis_rows(columns: Columns) -> list[list[str]]:
    """The live table's rows about Redis's memory (all of it, then the data alone) and its
    append-only file."""
    rows = []
    for name, dataset in (("used_memory", False), ("used_memory_dataset", True)):
        rows += [
            columns.row(
                f"Redis {name} grown while streaming",
                partial(_redis_mb, dataset=dataset),
                ",.1f",
                " MB",
                "INFO memory: before go -> all streams ended and packed",
                only=(REDIS,),
            ),
            columns.row(
                "  per 1,000 tokens generated",
                partial(LiveOutcome.redis_per_kilotoken, dataset=dataset),
                ",.0f",
                " B",
                "",
                only=(REDIS,),
            ),
            columns.row(
                "  / the answers' text",
                partial(LiveOutcome.redis_per_text, dataset=dataset),
                ".2f",
                "x",
                "",
                only=(REDIS,),
            ),
        ]
    rows.append(
        columns.row(
            "Redis append-only file after the run",
            lambda o: o.aof_bytes and o.aof_bytes / 1e6,
            ",.1f",
            " MB",
            "appendfsync everysec",
            only=(REDIS,),
        )
    )
    return rows


def per_run_rows(columns: Columns, opts: argparse.Namespace) -> list[list[str]]:
    """One row per run (with Redis: also redis-server's CPU and its memory per 1,000
    tokens)."""
    with_redis = REDIS in columns.kinds
    redis_head = ["redis cores", "Redis B/ktok"] if with_redis else []
    rows = [
        [
            "per run",
            "tokens/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "sched p99 ms",
            "cores",
            *redis_head,
            "behind",
            "no-commit s",
            "healthz ms",
            "",
        ]
    ]
    for kind, name in zip(columns.kinds, columns.labels, strict=True):
        for i, o in enumerate(columns.runs.get(kind, []), 1):
            redis_cells = (
                [fmt(o.redis_cores, ".2f"), fmt(o.redis_per_kilotoken())] if with_redis else []
            )
            rows.append(
                [
                    f"{name} #{i}",
                    fmt(o.throughput),
                    fmt(o.latency(0.5), ",.2f"),
                    fmt(o.latency(0.99), ",.2f"),
                    fmt(o.latency(1.0), ",.2f"),
                    fmt(o.schedule_latency(0.99), ",.2f"),
                    fmt(o.server_cores, ".2f"),
                    *redis_cells,
                    str(o.behind(opts.behind_slack)),
                    fmt(o.commit_gap_s(), ".3f"),
                    fmt(o.slowest_health_ms(), ",.1f"),
                    "",
                ]
            )
    return rows


def compare_stores(columns: Columns, opts: argparse.Namespace) -> str:
    """One line: the Redis nodes against the SQLite node, as ratios of medians."""

    def of(fn: Callable[[LiveOutcome], float | None]) -> str:
        return ratio(columns.median(REDIS, fn), columns.median(SQLITE, fn))

    counts = f"{len(columns.runs.get(REDIS, []))}/{len(columns.runs.get(SQLITE, []))} runs"
    return (
        f"  {label(REDIS, opts)} / {label(SQLITE, opts)} (medians, {counts}): throughput "
        f"{of(lambda o: o.throughput)}, p50 {of(lambda o: o.latency(0.5))}, p99 "
        f"{of(lambda o: o.latency(0.99))}, server CPU {of(lambda o: o.server_cores)} (redis-server "
        f"{fmt(columns.median(REDIS, lambda o: o.redis_cores), '.2f', ' cores')} more)"
    )


def verdicts(columns: Columns, kind: str, opts: argparse.Namespace) -> str:
    """The targets a kind of keepstream met or missed (medians over its runs)."""
    outcomes = columns.runs.get(kind, [])
    found = []
    p99 = columns.median(kind, lambda o: o.latency(0.99))
    throughput = columns.median(kind, lambda o: o.throughput)
    base = columns.median(BASELINE, lambda o: o.throughput)
    if p99 is not None:
        found.append(f"p99 {'MET' if p99 <= TARGET_P99_MS else 'MISSED'}")
    behind = max(o.behind(opts.behind_slack) for o in outcomes)
    found.append(f"no falling behind {'MET' if behind == 0 else 'MISSED'}")
    if throughput is not None and base:
        met = throughput / base >= TARGET_RATIO
        found.append(f"throughput >= baseline {'MET' if met else 'MISSED'}")
    scale = (
        ""
        if (opts.concurrency, opts.tokens, opts.rate) == (1000, 500, 50.0)
        else " (targets are set for C=1000 R=50 L=500)"
    )
    return ", ".join(found) + scale


def resume_report(outcomes: list[ResumeOutcome], out: Callable[[str], None]) -> None:
    """The resume table: medians per shape, the coldest read, and the verdict."""
    rows = [
        [
            "resume from offset 0 (median)",
            "first byte",
            "first event",
            "read all",
            "tokens/s",
            "runs",
            "check",
        ]
    ]
    for o in outcomes:
        checks = []
        for r in o.reads:
            st = r.stats
            ok = (
                st.tokens == o.tokens_expected
                and st.final_status == "completed"
                and st.gaps == 0
                and st.duplicates == 0
                and r.error is None
            )
            if not ok:
                checks.append(
                    f"tokens={st.tokens} status={st.final_status} gaps={st.gaps} "
                    f"dups={st.duplicates} error={r.error}"
                )
        rows.append(
            [
                f"{o.shape} [{o.note}]",
                fmt(o.median(lambda r: r.first_byte_s and r.first_byte_s * 1e3), ".2f", " ms"),
                fmt(o.median(lambda r: r.first_event_s and r.first_event_s * 1e3), ".2f", " ms"),
                fmt(o.median(lambda r: r.total_s and r.total_s * 1e3), ".1f", " ms"),
                fmt(o.median(ResumeOutcome.catch_up), ",.0f"),
                str(len(o.reads)),
                "ok" if not checks else f"BAD: {checks[0]}",
            ]
        )
    rows.append(
        [
            "target",
            f"<= {TARGET_FIRST_BYTE_MS:.0f} ms",
            "",
            "",
            f">= {TARGET_CATCH_UP:,.0f}",
            "",
            "",
        ]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        out(
            "  "
            + row[0].ljust(widths[0])
            + "  "
            + "  ".join(c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True))
            + "  "
            + row[-1]
        )
        if n == 0:
            out("  " + "-" * (sum(widths) + 2 * len(widths)))
    for o in outcomes:
        if o.reads:
            first = o.reads[0]
            out(
                f"  {o.shape}: first (coldest) read: first byte "
                f"{fmt(first.first_byte_s and first.first_byte_s * 1e3, '.2f', ' ms')}, "
                f"{fmt(ResumeOutcome.catch_up(first), ',.0f')} tokens/s; all reads tokens/s: "
                + ", ".join(fmt(ResumeOutcome.catch_up(r), ",.0f") for r in o.reads)
            )
    fb = [o.median(lambda r: r.first_byte_s) for o in outcomes]
    cu = [o.median(ResumeOutcome.catch_up) for o in outcomes]
    if all(v is not None for v in fb + cu):
        fb_ok = all(v is not None and v * 1e3 <= TARGET_FIRST_BYTE_MS for v in fb)
        cu_ok = all(v is not None and v >= TARGET_CATCH_UP for v in cu)
        out(
            f"  keepstream vs targets: first byte {'MET' if fb_ok else 'MISSED'}, "
            f"catch-up {'MET' if cu_ok else 'MISSED'}"
        )


def print_profile(outcome: LiveOutcome, out: Callable[[str], None]) -> None:
    """The py-spy summary of one server during its streaming phase."""
    profile = outcome.profile
    if profile is None:
        return
    total = profile.total or 1

    def pct(count: int) -> str:
        return f"{100 * count / total:5.1f}%"

    out(
        f"  py-spy, {outcome.kind} server, extra profiled run (not in the medians; p99 "
        f"{fmt(outcome.latency(0.99), ',.1f', ' ms')}), streaming phase: {profile.total:,} samples "
        f"at 100 Hz over all non-idle threads (100 samples/s = one busy core)"
    )
    out(f"  raw stacks: {outcome.profile_file}")
    out("  by thread: " + ", ".join(f"{name} {pct(n).strip()}" for name, n in profile.threads))
    out("  top 15 by own time:")
    for name, count in profile.own:
        out(f"    {pct(count)} {count:7,}  {name}")
    out("  top 15 by inclusive time:")
    for name, count in profile.inclusive:
        out(f"    {pct(count)} {count:7,}  {name}")
    if profile.writer_own:
        out("  writer thread, own time:")
        for name, count in profile.writer_own:
            out(f"    {pct(count)} {count:7,}  {name}")
