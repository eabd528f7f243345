"""Printing the benchmark's figures side by side, with the targets beside them."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

from bench._live import LiveOutcome, percentile
from bench._resume import ResumeOutcome

TARGET_P99_MS = 100.0
TARGET_RATIO = 1.0
TARGET_FIRST_BYTE_MS = 20.0
TARGET_CATCH_UP = 500_000.0


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


def live_report(
    runs: dict[str, list[LiveOutcome]], opts: argparse.Namespace, out: Callable[[str], None]
) -> None:
    """Side-by-side table of the live runs (medians over repeats)."""
    ks, base = runs.get("keepstream", []), runs.get("baseline", [])
    C, L = opts.concurrency, opts.tokens
    n = max(len(ks), len(base))
    slack = opts.behind_slack

    def m(outcomes: list[LiveOutcome], fn: Callable[[LiveOutcome], float | None]) -> float | None:
        return med([fn(o) for o in outcomes])

    def row(
        name: str,
        fn: Callable[[LiveOutcome], float | None],
        spec: str,
        unit: str,
        target: str,
        with_ratio: bool = False,
    ) -> list[str]:
        a, b = m(ks, fn), m(base, fn)
        return [
            name,
            fmt(a, spec, unit),
            fmt(b, spec, unit),
            ratio(a, b) if with_ratio else "",
            target,
        ]

    def each(outcomes: list[LiveOutcome], fn: Callable[[LiveOutcome], str]) -> str:
        """One value when every run agrees, else the worst-first list of them."""
        values = [fn(o) for o in outcomes]
        if not values:
            return "-"
        if len(set(values)) == 1:
            return values[0]
        return " | ".join(values)

    def both(name: str, fn: Callable[[LiveOutcome], str], target: str) -> list[str]:
        return [name, each(ks, fn), each(base, fn), "", target]

    expected = C * L
    head = f"median of {n}" if n > 1 else "1 run"
    rows = [
        [f"live fan-out ({head})", "keepstream", "baseline", "ks/base", "target"],
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
        both("tokens delivered / C*L", lambda o: f"{o.tokens:,}/{expected:,}", "all"),
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
        both("completed streams", lambda o: f"{o.completed}/{C}", f"{C}"),
        both("id gaps / duplicates", lambda o: f"{o.gaps}/{o.duplicates}", "0/0"),
        row("SSE events received", lambda o: o.events, ",.0f", "", ""),
        row(
            "wall time of the run",
            lambda o: o.wall,
            ",.2f",
            " s",
            f"~ ramp + {L / opts.rate:g} s",
            True,
        ),
        row("server CPU", lambda o: o.server_cores, ",.2f", " cores", "of 2", True),
        row("server CPU, busiest second", lambda o: o.peak_cores(), ",.2f", " cores", ""),
        row(
            "slowest /healthz answer while streaming",
            lambda o: o.slowest_health_ms(),
            ",.1f",
            " ms",
            f"polled every {opts.sample_interval:g} s",
            True,
        ),
        row("longest time without a commit", lambda o: o.commit_gap_s(), ",.3f", " s", ""),
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
        row("rows written", lambda o: o.store_delta("rows_written"), ",.0f", "", ""),
        row("commits", lambda o: o.store_delta("commits"), ",.0f", "", ""),
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
        ),
        row(
            "database file after the run",
            lambda o: o.db_bytes and o.db_bytes / 1e6,
            ",.1f",
            " MB",
            "",
        ),
        row(
            "WAL file after the run", lambda o: o.wal_bytes and o.wal_bytes / 1e6, ",.1f", " MB", ""
        ),
        row(
            "database in use, compacted, per 1,000 tokens",
            lambda o: o.disk_per_kilotoken(),
            ",.0f",
            " B",
            "",
        ),
        row(
            "database in use, compacted / the answers' text",
            lambda o: o.disk_per_text(),
            ".2f",
            "x",
            "<= 2x",
        ),
        row(
            "database file, compacted / the answers' text",
            lambda o: o.disk_per_text(in_use=False),
            ".2f",
            "x",
            "free pages are reused",
        ),
        row("WAL file, largest seen while streaming", lambda o: o.peak_wal_mb(), ",.1f", " MB", ""),
    ]
    table(rows, out)
    if n > 1:
        out("")
        per_run = [
            [
                "per run",
                "tokens/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                "sched p99 ms",
                "cores",
                "behind",
                "no-commit s",
                "healthz ms",
                "",
            ]
        ]
        for kind, outcomes in (("keepstream", ks), ("baseline", base)):
            for i, o in enumerate(outcomes, 1):
                per_run.append(
                    [
                        f"{kind} #{i}",
                        fmt(o.throughput),
                        fmt(o.latency(0.5), ",.2f"),
                        fmt(o.latency(0.99), ",.2f"),
                        fmt(o.latency(1.0), ",.2f"),
                        fmt(o.schedule_latency(0.99), ",.2f"),
                        fmt(o.server_cores, ".2f"),
                        str(o.behind(slack)),
                        fmt(o.commit_gap_s(), ".3f"),
                        fmt(o.slowest_health_ms(), ",.1f"),
                        "",
                    ]
                )
        table(per_run, out)
    verdicts = []
    ks_p99, ks_tp, base_tp = (
        m(ks, lambda o: o.latency(0.99)),
        m(ks, lambda o: o.throughput),
        m(base, lambda o: o.throughput),
    )
    if ks_p99 is not None:
        verdicts.append(f"p99 {'MET' if ks_p99 <= TARGET_P99_MS else 'MISSED'}")
    if ks:
        behind = max(o.behind(slack) for o in ks)
        verdicts.append(f"no falling behind {'MET' if behind == 0 else 'MISSED'}")
    if ks_tp is not None and base_tp:
        verdicts.append(
            f"throughput >= baseline {'MET' if ks_tp / base_tp >= TARGET_RATIO else 'MISSED'}"
        )
    if verdicts:
        scale = (
            ""
            if (C, L, opts.rate) == (1000, 500, 50.0)
            else " (targets are set for C=1000 R=50 L=500)"
        )
        out(f"  keepstream vs targets: {', '.join(verdicts)}{scale}")
    for kind, outcomes in (("keepstream", ks), ("baseline", base)):
        for i, o in enumerate(outcomes, 1):
            for problem in o.problems:
                out(f"  ! {kind} run {i}: {problem}")


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
