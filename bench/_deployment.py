"""The servers one live run is measured against, started alike and always killed.

Three kinds: ``keepstream`` (one ``keepstream serve`` on a fresh SQLite file), ``redis``
(``--nodes`` of them on one fresh ``redis-server`` of the bench's own, with an append-only
file fsynced every second, so that keepstream's persistence check passes) and ``baseline``
(``bench/baseline_app.py``). Every keepstream node gets the same arguments: the simulated
model's rate and length, the capacity, the flush interval, the uvicorn loop and parser, and
``--ks-arg``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from bench._servers import (
    RedisServer,
    Server,
    baseline_server,
    free_port,
    keepstream_server,
)

SQLITE = "keepstream"
REDIS = "redis"
BASELINE = "baseline"
STORE_KINDS = {"sqlite": (SQLITE,), "redis": (REDIS,), "both": (SQLITE, REDIS)}


def label(kind: str, opts: argparse.Namespace) -> str:
    """How a kind is named in the report: ``keepstream`` alone, ``sqlite x1`` beside
    ``redis xN``."""
    if kind == REDIS:
        return f"redis x{opts.nodes}"
    if kind == SQLITE and opts.store != "sqlite":
        return "sqlite x1"
    return kind


def kinds(opts: argparse.Namespace) -> list[str]:
    """The kinds of server ``--store`` and ``--no-baseline`` ask for, keepstream's first."""
    chosen = list(STORE_KINDS[opts.store])
    return chosen if opts.no_baseline else [*chosen, BASELINE]


@dataclass
class Deployment:
    """The servers of one run: its ``nodes`` (the client connects to these), and the
    ``redis`` they share, if any."""

    kind: str
    nodes: list[Server] = field(default_factory=list)
    redis: RedisServer | None = None

    def node_ticks(self) -> list[int | None]:
        """Each node's CPU so far (clock ticks)."""
        return [node.cpu_ticks() for node in self.nodes]

    def redis_ticks(self) -> int | None:
        """The shared redis-server's CPU so far (clock ticks); ``None`` without one."""
        return self.redis.cpu_ticks() if self.redis is not None else None

    def kill(self) -> None:
        """SIGKILL every process of the deployment."""
        for node in self.nodes:
            node.kill()
        if self.redis is not None:
            self.redis.kill()

    def remove_data(self) -> None:
        """Delete what the store wrote (SQLite files at C=1000 reach GBs; after kill)."""
        for node in self.nodes:
            node.remove_database()
        if self.redis is not None:
            self.redis.remove_data()


def keepstream_node(opts: argparse.Namespace, workdir: Path, store: str | None = None) -> Server:
    """A ``keepstream serve`` with the run's arguments, on a fresh SQLite file or ``store``."""
    return keepstream_server(
        workdir,
        rate=opts.rate,
        tokens=opts.tokens,
        capacity=opts.concurrency,
        flush_interval=opts.flush_interval,
        store=store,
        loop=opts.server_loop,
        http=opts.server_http,
        extra_args=opts.ks_arg,
    )


def _start(deployment: Deployment, kind: str, opts: argparse.Namespace, workdir: Path) -> None:
    """Start the servers of ``kind`` into ``deployment``, one after the other (each is
    registered before it starts, so that a failed start is still killed)."""
    make: Callable[[], Server]
    count = 1
    if kind == BASELINE:
        make = partial(
            baseline_server,
            workdir,
            rate=opts.rate,
            tokens=opts.tokens,
            loop=opts.server_loop,
            http=opts.server_http,
        )
    elif kind == REDIS:
        port = free_port()
        deployment.redis = RedisServer(workdir / f"redis-{port}", port)
        deployment.redis.start()
        make = partial(keepstream_node, opts, workdir, deployment.redis.url)
        count = opts.nodes
    else:
        make = partial(keepstream_node, opts, workdir)
    for _ in range(count):
        server = make()
        deployment.nodes.append(server)
        server.start()


@contextmanager
def deployed(kind: str, opts: argparse.Namespace, workdir: Path) -> Iterator[Deployment]:
    """Fresh servers of ``kind``, killed (and their data deleted, unless ``--keep-dir``) when
    the block ends, however it ends."""
    deployment = Deployment(kind)
    try:
        _start(deployment, kind, opts, workdir)
        yield deployment
    finally:
        deployment.kill()
        if not opts.keep_dir:
            deployment.remove_data()
