"""The live part at several concurrencies: one table, and one plot of how latency scales.

``python bench/bench_spine.py --sweep 100,300,1000,2000`` runs keepstream and the baseline
side by side at each concurrency (``--repeat`` runs each, interleaved; medians quoted),
prints one row per server and concurrency, and writes ``spine-sweep.png`` (latency
percentiles against C, both servers) into ``--plot-dir``, outside the repository.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench._live import LiveOutcome
from bench._report import fmt, med, table

Results = dict[tuple[int, str], list[LiveOutcome]]  # (C, server kind) -> its runs
PERCENTILES = ((0.5, "p50"), (0.99, "p99"), (1.0, "max"))
COLOURS = {"p50": "tab:blue", "p99": "tab:orange", "max": "tab:red"}


def sweep_report(results: Results, behind_slack: float, out: Callable[[str], None]) -> None:
    """One row per concurrency and server: throughput, latency, who fell behind, CPU,
    memory and WAL (medians over the runs)."""
    rows = [
        [
            "C",
            "server",
            "tokens/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "behind",
            "cores",
            "RSS MB",
            "WAL MB",
        ]
    ]
    for (concurrency, kind), runs in sorted(results.items()):
        rows.append(
            [
                f"{concurrency:,}",
                kind,
                fmt(med([r.throughput for r in runs])),
                *(fmt(med([r.latency(q) for r in runs]), ",.1f") for q, _ in PERCENTILES),
                fmt(med([float(r.behind(behind_slack)) for r in runs])),
                fmt(med([r.server_cores for r in runs]), ".2f"),
                fmt(med([r.peak_rss_mb() for r in runs]), ",.0f"),
                fmt(med([r.peak_wal_mb() for r in runs]), ",.1f"),
            ]
        )
    out("scaling (medians over the runs of each server at each C)")
    table(rows, out)


def plot_sweep(results: Results, directory: Path) -> Path | None:
    """Latency percentiles against C for each server, as a PNG in ``directory``; ``None``
    (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    from matplotlib.ticker import ScalarFormatter

    figure, axes = plt.subplots(figsize=(8, 5))
    for kind, style in (("keepstream", "-"), ("baseline", ":")):
        points = sorted(c for c, k in results if k == kind)
        if not points:
            continue
        for q, label in PERCENTILES:
            values = [med([r.latency(q) for r in results[(c, kind)]]) for c in points]
            axes.plot(
                points,
                [float("nan") if v is None else v for v in values],
                style,
                color=COLOURS[label],
                marker="o",
                label=f"{kind} {label}",
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(sorted({c for c, _ in results}))
    axes.xaxis.set_major_formatter(ScalarFormatter())
    axes.xaxis.set_minor_formatter(ScalarFormatter())
    axes.tick_params(axis="x", which="minor", labelbottom=False)
    axes.set_xlabel("concurrent generations (C)")
    axes.set_ylabel("token to reader latency, ms")
    axes.axhline(100, color="grey", linewidth=0.8)
    axes.set_title("keepstream spine: latency against concurrency")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    path = directory / "spine-sweep.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path
