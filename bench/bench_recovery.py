"""Recovery after a crash: how soon a restarted server answers, and how soon it has ended
the generations a dead process left running.

    python bench/bench_recovery.py                 # 1,000 orphans, 3 runs
    python bench/bench_recovery.py --orphans 5000 --runs 1

Each run writes ``--orphans`` generations (``running``, each with a stream holding a status
event and a delta) owned by a worker whose lease ran out, with the store API; then starts
``keepstream serve`` on that file and measures, from the process start, the first
``/healthz`` answer and the moment every orphan is terminal (read from the database).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._servers import keepstream_server
from store import GenerationRecord, StreamStore, WorkerRecord
from streaming import encode_event, status_event

ACTIVE = ("queued", "running")
POLL_INTERVAL = 0.01


async def write_orphans(db: Path, count: int) -> None:
    """``count`` running generations of a worker that died 100 s ago, on another host."""
    now = time.time()
    async with StreamStore(str(db)) as store:
        await store.register_worker(WorkerRecord("wrk_dead", "elsewhere", 1, now - 100, now - 100))

        async def one(i: int) -> None:
            gid = f"gen_orphan{i:06d}"
            await store.create_generation(
                GenerationRecord(
                    gid, gid, "running", "simulated", worker_id="wrk_dead", created_at=now
                )
            )
            await store.append(gid, [encode_event(status_event("running"))])
            await store.append(gid, [b'{"type":"delta","text":"half an answer "}'])

        for start in range(0, count, 500):
            await asyncio.gather(*(one(i) for i in range(start, min(count, start + 500))))


def active_count(db: Path) -> int:
    """Generations still queued or running: read straight from the file, read-only, since
    opening a second store every 10 ms would cost more than what is measured."""
    with sqlite3.connect(db, timeout=30) as conn:
        row = conn.execute(
            "SELECT count(*) FROM generations WHERE status IN (?, ?)", ACTIVE
        ).fetchone()
    return int(row[0])


def one_run(workdir: Path, orphans: int, run: int) -> tuple[float, float]:
    """(seconds to the first /healthz answer, seconds until no orphan is active)."""
    db = workdir / f"recovery-{run}.db"
    asyncio.run(write_orphans(db, orphans))
    assert active_count(db) == orphans
    server = keepstream_server(workdir, rate=0, tokens=1, capacity=16, flush_interval=None, db=db)
    started = time.perf_counter()
    server.start()  # returns once /healthz answers
    healthy = time.perf_counter() - started
    try:
        deadline = time.monotonic() + 120
        while active_count(db) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        ended = time.perf_counter() - started
        left = active_count(db)
        if left:
            raise RuntimeError(f"{left} orphans still active after 120 s")
    finally:
        server.kill()
    return healthy, ended


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orphans", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        results = [one_run(Path(tmp), opts.orphans, run) for run in range(opts.runs)]
    print(f"recovery of {opts.orphans:,} orphaned generations, {opts.runs} runs")
    print("  run  first /healthz   all ended")
    for i, (healthy, ended) in enumerate(results, 1):
        print(f"  {i:>3}  {healthy * 1000:10.0f} ms  {ended * 1000:8.0f} ms")
    print(
        f"  median: first /healthz {statistics.median(r[0] for r in results) * 1000:.0f} ms, "
        f"all ended {statistics.median(r[1] for r in results) * 1000:.0f} ms after the start"
    )


if __name__ == "__main__":
    main()
