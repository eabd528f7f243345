"""Fixtures: the anyio backend, and real servers that are always stopped."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from .support import Server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


ServerFactory = Callable[..., Server]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers on ``tmp_path/keepstream.db`` (or ``db=``); all are killed afterwards."""
    started: list[Server] = []

    def start(*args: str, db: Path | None = None, env: dict[str, str] | None = None) -> Server:
        server = Server(db=db or tmp_path / "keepstream.db", args=args, env=env or {})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()


DEFAULT_ARGS: Sequence[str] = (
    "--sim-tokens-per-second",
    "200",
    "--sim-max-tokens",
    "40",
    "--shutdown-grace",
    "1",
)


@pytest.fixture
def server(server_factory: ServerFactory) -> Server:
    """A server with a fast simulated model (200 tokens/s, 40 tokens)."""
    return server_factory(*DEFAULT_ARGS)


@pytest.fixture
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for ``server``."""
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        yield http
