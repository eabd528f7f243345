"""Fixtures: the anyio backend, and real servers that are always stopped."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from .backends import BACKENDS, Backend, open_backend
from .durable_support import as_user, next_user
from .fake_upstream import FakeUpstream
from .redis_support import RedisServer
from .support import Server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


ServerFactory = Callable[..., Server]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers on ``tmp_path/keepstream.db`` (or ``db=``) and a free port (or ``port=``);
    all are killed afterwards."""
    started: list[Server] = []

    def start(
        *args: str,
        db: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> Server:
        server = Server(db=db or tmp_path / "keepstream.db", args=args, env=env or {})
        if port is not None:  # a restart on the port clients already use
            server.port = port
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


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstream]:
    """A fake OpenAI-compatible upstream on 127.0.0.1, shared by the whole session."""
    fake = FakeUpstream().start()
    yield fake
    fake.stop()


UPSTREAM_READ_TIMEOUT = 1.0


def openai_args(upstream: FakeUpstream) -> tuple[str, ...]:
    """Server flags that make ``upstream`` the default (openai) provider, model ``test-model``."""
    return ("--provider", "openai", "--model", "test-model", "--upstream-url", upstream.base_url)


def dify_args(upstream: FakeUpstream) -> tuple[str, ...]:
    """Server flags that make ``upstream`` the default provider, speaking Dify."""
    return (
        *("--provider", "dify", "--dify-url", upstream.base_url),
        *("--dify-api-key", "app-test-key"),
    )


# --coalesce-window 0: commit text as it arrives, so answers span many delta events and the
# text-offset sweeps cross event boundaries.
OPENAI_SERVER_ARGS: Sequence[str] = (
    "--provider openai --model test-model --sim-tokens-per-second 0 --sim-max-tokens 60"
    " --shutdown-grace 1 --coalesce-window 0"
).split()


@pytest.fixture(scope="session")
def openai_server(
    upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """A server whose default provider is ``openai``, pointed at ``upstream`` (model
    ``test-model``, a read timeout of ``UPSTREAM_READ_TIMEOUT``, no coalescing window);
    ``simulated`` is instant unless the request asks for a rate."""
    server = Server(
        db=tmp_path_factory.mktemp("openai") / "keepstream.db",
        args=(
            *OPENAI_SERVER_ARGS,
            *("--upstream-url", upstream.base_url),
            *("--upstream-read-timeout", str(UPSTREAM_READ_TIMEOUT)),
        ),
    )
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture
async def openai_client(openai_server: Server) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for ``openai_server``."""
    async with httpx.AsyncClient(base_url=openai_server.url, timeout=30.0) as http:
        yield http


@pytest.fixture
def user() -> str:
    """A user of this test's own (the Durable Streams tests' servers know them all)."""
    return next_user()


@pytest.fixture
async def ds(ds_server: Server, user: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the module's ``ds_server``, as this test's user."""
    async with as_user(ds_server, user) as http:
        yield http


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real ``redis-server`` of this test process (AOF ``everysec``, a temporary
    directory); tests keep apart by key prefix (``redis_prefix``)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """Key prefix of this test's own on the shared ``redis_server``."""
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path, redis_prefix: str
) -> AsyncIterator[Backend]:
    """An open store and session store, on SQLite and on Redis (the real server)."""
    kind: str = request.param
    url = request.getfixturevalue("redis_server").url if kind == "redis" else ""
    async with open_backend(kind, tmp_path / "store.db", url, redis_prefix) as opened:
        yield opened
