"""Server processes for the benchmarks: start, wait until healthy, measure, always kill.

Every process started here is registered in ``STARTED`` and killed (by its own pid) at exit,
whatever happened; ``kill_all`` is also what the hard deadline calls.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

STARTED: list[subprocess.Popen[bytes]] = []

# ``python -m web`` where the package has a __main__ (importing ``web`` already imports
# ``web._cli``, so ``-m web._cli`` makes runpy warn); ``web._cli`` otherwise.
_SERVER_MODULE = "web" if (ROOT / "web" / "__main__.py").exists() else "web._cli"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(command: list[str], *, log: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in the project root with its output in ``log``; remember it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    STARTED.append(proc)
    return proc


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL one process we started, and reap it."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


class DeadlineExceeded(BaseException):
    """The run's backstop alarm fired: something blocked past the hard limit."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise DeadlineExceeded()


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def guard_run(backstop_seconds: float) -> None:
    """Make a benchmark run safe to interrupt: every server is killed at exit, SIGTERM exits
    cleanly, and ``DeadlineExceeded`` is raised if the run outlives ``backstop_seconds``."""
    atexit.register(kill_all)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(int(backstop_seconds))


def kill_all() -> None:
    """Kill every process started through ``spawn`` that is still running."""
    while STARTED:
        kill(STARTED.pop())


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), in clock ticks; ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def rss_bytes(pid: int) -> int | None:
    """The resident memory of a process, bytes; ``None`` if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            resident = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident * os.sysconf("SC_PAGE_SIZE")


def get_json(url: str, *, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def scrape_metrics(url: str, *, timeout: float = 5.0) -> dict[str, float]:
    """``GET url/metrics`` parsed with prometheus-client's own parser: sample name (with
    labels, as ``name{label="value"}``) → value. Empty for a server without ``/metrics``."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as response:
            text = response.read().decode()
    except urllib.error.HTTPError:
        return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def post_json(url: str, body: Any, *, timeout: float = 10.0) -> tuple[int, Any]:
    """POST JSON; return (status, decoded body)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


@dataclass
class Server:
    """A server process on 127.0.0.1 (keepstream or the baseline)."""

    kind: str  # "keepstream" or "baseline"
    command: list[str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Server:
        """Start the process and wait until ``/healthz`` answers."""
        self.proc = spawn(self.command, log=self.log)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.kind} exited with {self.proc.returncode}:\n{self.output()[-2000:]}"
                )
            try:
                self.health()
                return self
            except (OSError, ValueError):
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(
            f"{self.kind} did not start within {STARTUP_TIMEOUT} s:\n{self.output()[-2000:]}"
        )

    def health(self) -> Any:
        """``GET /healthz``, decoded."""
        return get_json(f"{self.url}/healthz")

    def cpu_ticks(self) -> int | None:
        """utime + stime of the server process so far (clock ticks)."""
        return cpu_ticks(self.pid)

    def output(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL the server (if it was started) and forget it."""
        if self.proc is not None:
            kill(self.proc)
            if self.proc in STARTED:
                STARTED.remove(self.proc)

    def remove_database(self) -> None:
        """Delete keepstream's SQLite file and its WAL and shared-memory files (after kill)."""
        db = self.extra.get("db")
        if isinstance(db, Path):
            for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                path.unlink(missing_ok=True)


def keepstream_server(
    directory: Path,
    *,
    rate: float,
    tokens: int,
    capacity: int,
    flush_interval: float | None,
    db: Path | None = None,
    store: str | None = None,
    loop: str = "auto",
    http: str = "auto",
    extra_args: Sequence[str] = (),
) -> Server:
    """A ``keepstream serve`` on a fresh SQLite file (or ``db``), or on ``store`` (a
    ``redis://`` URL, say, shared with other nodes), not yet started.

    ``loop``/``http`` other than ``auto`` are passed as ``--loop``/``--http``; ``extra_args``
    are appended as given (e.g. ``--coalesce-window 0.05``).
    """
    port = free_port()
    extra: dict[str, Any] = {}
    if store is None:
        db = db or directory / f"keepstream-{port}.db"
        where = ["--db", str(db)]
        extra["db"] = db
    else:
        where = ["--store", store]
    command = [
        sys.executable,
        "-m",
        _SERVER_MODULE,
        "serve",
        *where,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--max-running",
        str(capacity),
        "--max-queued",
        str(capacity),
        "--sim-tokens-per-second",
        str(rate),
        "--sim-max-tokens",
        str(tokens),
        "--shutdown-grace",
        "1",
    ]
    if flush_interval is not None:
        command += ["--flush-interval", str(flush_interval)]
    if loop != "auto":
        command += ["--loop", loop]
    if http != "auto":
        command += ["--http", http]
    command += list(extra_args)
    return Server("keepstream", command, port, directory / f"keepstream-{port}.log", extra=extra)


def baseline_server(
    directory: Path, *, rate: float, tokens: int, loop: str = "auto", http: str = "auto"
) -> Server:
    """The baseline app (``bench.baseline_app``) under uvicorn, not yet started."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.baseline_app",
        "--port",
        str(port),
        "--sim-tokens-per-second",
        str(rate),
        "--sim-max-tokens",
        str(tokens),
        "--log-level",
        "warning",
        "--loop",
        loop,
        "--http",
        http,
    ]
    return Server("baseline", command, port, directory / f"baseline-{port}.log")


@dataclass(frozen=True, slots=True)
class RedisMemory:
    """Redis's memory at one moment (``INFO memory``), bytes: all of it (``used_memory``:
    the data, and the overhead of clients' buffers, scripts, the AOF buffer …) and the
    data alone (``used_memory_dataset``)."""

    used: int
    dataset: int


@dataclass
class RedisServer:
    """A ``redis-server`` of the benchmark's own on 127.0.0.1, with its data in ``directory``.

    Configured so that keepstream's persistence check passes (an append-only file, fsynced
    every second; no RDB snapshots, which would fork mid-run); killed like every server.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``--store`` URL of its database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        """What the server printed."""
        return self.directory.parent / f"redis-{self.port}.log"

    def start(self) -> RedisServer:
        """Start the process and wait until it answers ``PING``."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (needed for --store redis)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            log=self.log,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}:\n"
                    f"{self.log.read_text(errors='replace')[-2000:]}"
                )
            try:
                self.info("server")
                return self
            except (OSError, redis.RedisError):
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not start within {STARTUP_TIMEOUT} s")

    def info(self, section: str) -> dict[str, Any]:
        """``INFO section``, parsed."""
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10) as client:
            answer: dict[str, Any] = client.info(section)
        return answer

    def memory(self) -> RedisMemory | None:
        """``used_memory`` and ``used_memory_dataset`` from ``INFO memory``; ``None`` if it
        did not answer."""
        try:
            info = self.info("memory")
            return RedisMemory(int(info["used_memory"]), int(info["used_memory_dataset"]))
        except (OSError, redis.RedisError, KeyError, ValueError):
            return None

    def wait_packed(self, within: float) -> bool:
        """Wait until no stream is a list any more (every closed stream packed into blocks
        by its node), up to ``within`` seconds; whether it came to that."""
        deadline = time.monotonic() + within
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10) as client:
            while time.monotonic() < deadline:
                if next(client.scan_iter(match="*m:*", _type="list", count=1000), None) is None:
                    return True
                time.sleep(0.2)
        return False

    def aof_bytes(self) -> int | None:
        """The size of the append-only file(s) so far, bytes."""
        try:
            return sum(path.stat().st_size for path in self.directory.rglob("*.aof"))
        except OSError:
            return None

    def cpu_ticks(self) -> int | None:
        """utime + stime of the server process so far (clock ticks)."""
        return cpu_ticks(self.proc.pid) if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL the server (if it was started) and forget it."""
        if self.proc is not None:
            kill(self.proc)
            if self.proc in STARTED:
                STARTED.remove(self.proc)

    def remove_data(self) -> None:
        """Delete its data directory (after kill)."""
        shutil.rmtree(self.directory, ignore_errors=True)


# -- profiling ------------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    """The py-spy next to this interpreter, if installed."""
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else None


def start_py_spy(
    pid: int, *, duration: float, output: Path, log: Path, rate: int = 100
) -> subprocess.Popen[bytes] | None:
    """Sample ``pid`` for ``duration`` seconds into a collapsed-stack file (``--format raw``).

    ``--nonblocking`` so that sampling never pauses the server it measures.
    """
    binary = py_spy_binary()
    if binary is None:
        return None
    return spawn(
        [
            binary,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(duration))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--nonblocking",
            "--threads",
            "-o",
            str(output),
        ],
        log=log,
    )


# Frames every sample of a thread passes through: left out of the inclusive ranking.
_WRAPPER_FRAMES = (
    "Thread._bootstrap",
    "Thread.run (",
    "_run_module_as_main",
    "_run_code",
    "<module> (web/_cli.py",
    "<module> (web/__main__.py",
    "main (web/_cli.py",
    "run (uvicorn/main.py",
    "Server.run (uvicorn",
    "asyncio_run (uvicorn",
    "Runner.run (asyncio",
    "Writer._run (",
    "WorkerThread.run (",
)


@dataclass
class Profile:
    """A py-spy collapsed-stack profile, summarised.

    ``own`` counts samples by innermost frame (own time), ``inclusive`` by every distinct
    function on the stack, ``threads`` by thread name; ``writer_own`` is own time within the
    store's writer thread only.
    """

    total: int
    own: list[tuple[str, int]]
    inclusive: list[tuple[str, int]]
    threads: list[tuple[str, int]]
    writer_own: list[tuple[str, int]]


def summarise_profile(collapsed: Path, limit: int = 15) -> Profile:
    """Summarise a ``py-spy record --format raw --threads`` file.

    Functions are keyed by name and file, without line numbers.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    writer_own: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        thread = "?"
        if frames[0].startswith("thread ("):
            thread = frames[0].partition(": ")[2] or frames[0]
            frames = frames[1:]
        threads[thread] += count
        if not frames:
            continue
        names = [_strip_line(f) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            if not name.startswith(_WRAPPER_FRAMES):
                inclusive[name] += count
        if thread == "keepstream-writer":
            writer_own[names[-1]] += count
    return Profile(
        total,
        own.most_common(limit),
        inclusive.most_common(limit),
        threads.most_common(),
        writer_own.most_common(8),
    )


def _strip_line(frame: str) -> str:
    # py-spy frames look like "function (path/to/file.py:123)".
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


# -- sampling during a run -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One look at a server: when, how long ``/metrics`` took, its store counters, WAL, CPU."""

    t: float  # when the sample was taken (and the CPU ticks read)
    answer_s: float | None  # None: /healthz did not answer within the timeout
    commits: int | None
    rows: int | None
    wal_bytes: int | None
    cpu_ticks: int | None
    rss_bytes: int | None = None


class Sampler:
    """Polls servers (one, or the nodes of one deployment) every ``interval`` seconds on a
    thread of its own until stopped; ``samples[i]`` holds the ``i``-th server's.

    Cheap on purpose (one tiny request per server and interval): it shows *when* things
    stalled — the longest time without a commit, the slowest ``/healthz`` answer (a blocked
    event loop), the WAL's growth — which the per-token figures alone cannot.
    """

    def __init__(
        self, servers: Sequence[Server], *, interval: float = 0.1, timeout: float = 5.0
    ) -> None:
        self.samples: list[list[Sample]] = [[] for _ in servers]
        self._servers = list(servers)
        self._interval = interval
        self._timeout = timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> Sampler:
        """Start polling."""
        self._thread.start()
        return self

    def stop(self) -> list[list[Sample]]:
        """Stop polling; return the samples, per server."""
        self._stop.set()
        self._thread.join(self._timeout * len(self._servers) + 1.0)
        return self.samples

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.time()
            for server, samples in zip(self._servers, self.samples, strict=True):
                samples.append(self._sample(server))
            self._stop.wait(max(0.0, t + self._interval - time.time()))

    def _sample(self, server: Server) -> Sample:
        """One look at one server."""
        t = time.time()
        ticks = server.cpu_ticks()  # read with t: /healthz may take seconds
        answer: float | None = None
        commits = rows = None
        try:
            metrics = scrape_metrics(server.url, timeout=self._timeout)
            if not metrics:  # a server without /metrics (the baseline)
                get_json(f"{server.url}/healthz", timeout=self._timeout)
            answer = time.time() - t
            if "keepstream_commits_total" in metrics:
                commits = int(metrics["keepstream_commits_total"])
                rows = int(metrics["keepstream_messages_written_total"])
        except (OSError, ValueError):
            pass
        wal = None
        db = server.extra.get("db")
        if isinstance(db, Path):
            try:
                wal = Path(f"{db}-wal").stat().st_size
            except OSError:
                pass
        return Sample(t, answer, commits, rows, wal, ticks, rss_bytes(server.pid))


def longest_commit_gap(samples: list[Sample]) -> float | None:
    """The longest time (s) over which the commit counter did not move, as sampled."""
    last_change: float | None = None
    last_value: int | None = None
    gap = 0.0
    for sample in samples:
        if sample.commits is None:
            continue
        seen = sample.t + (sample.answer_s or 0.0)  # when the counter was read
        if last_value is None or sample.commits != last_value:
            if last_change is not None:
                gap = max(gap, seen - last_change)
            last_change, last_value = seen, sample.commits
    return gap if last_change is not None else None
