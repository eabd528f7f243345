"""Fuzz a real keepstream server: 20,000+ schemathesis requests (valid and invalid) across
every operation of its own /openapi.json, with an API key, then 20,000 raw requests no schema
would make (any method on any route, hostile headers, bodies that are not JSON or UTF-8).

Passes when no request got a 5xx, no answer broke the published schema, and the server
logged no unhandled error. Run on demand::

    python bench/fuzz.py                 # about 20,000 requests
    python bench/fuzz.py --examples 300  # a shorter run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._fuzz import run_schemathesis
from bench._rawfuzz import raw_fuzz
from bench._servers import guard_run, keepstream_server

KEY = "sk-fuzz-0123456789abcdef"
TARGET_REQUESTS = 20_000


def main(argv: Sequence[str] | None = None) -> int:
    """Start a server, fuzz it, print the figures; exit 1 on any failure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="examples per operation")
    parser.add_argument("--workers", type=int, default=2, help="concurrent schemathesis workers")
    parser.add_argument("--seed", type=int, default=None, help="reproduce an earlier run")
    parser.add_argument("--raw", type=int, default=20_000, help="raw requests to send")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="hard limit, seconds")
    opts = parser.parse_args(argv)
    guard_run(opts.time_limit + 30)
    with tempfile.TemporaryDirectory(prefix="keepstream-fuzz-") as folder:
        server = keepstream_server(
            Path(folder),
            rate=0,
            tokens=5,
            capacity=256,
            flush_interval=None,
            extra_args=(
                *("--api-keys", f"fuzz={KEY}"),
                *("--stream-sse-lifetime", "1", "--long-poll-timeout", "0.2"),
            ),
        ).start()
        started = time.monotonic()
        try:
            run = run_schemathesis(
                server.url,
                api_key=KEY,
                max_examples=opts.examples,
                workers=opts.workers,
                seed=opts.seed,
                request_timeout=1.0,
                timeout=opts.time_limit,
                cwd=Path(folder),
            )
            raw = raw_fuzz(
                "127.0.0.1",
                server.port,
                requests=opts.raw,
                api_key=KEY,
                ids={"gen": "gen_missing", "ses": "ses_missing"},
                seed=opts.seed or 0,
            )
        finally:
            log = server.output()
            server.kill()
        seconds = time.monotonic() - started
    print(run.output[-4000:])
    unhandled = log.count("unhandled error") + log.count("Traceback")
    print(f"requests generated: {run.generated:,} in {seconds:.0f} s")
    print(f"schemathesis checks: {'passed' if run.passed else 'FAILED'}")
    print(f"raw requests: {raw.requests:,}, statuses {dict(sorted(raw.statuses.items()))}")
    for request in raw.server_errors:
        print(f"  5xx for: {request!r}")
    print(f"unhandled errors in the server log: {unhandled}")
    if run.generated < TARGET_REQUESTS:
        print(f"note: fewer than the {TARGET_REQUESTS:,} requests a full run makes")
    failed = not run.passed or unhandled or raw.server_errors or raw.statuses["timeout"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
