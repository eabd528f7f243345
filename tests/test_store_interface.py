"""Both backends implement the backend-neutral store interface (``store._interface``) that
``streaming`` and ``web`` are typed against: checked by mypy through the annotations below,
and here at run time, member by member, down to the parameters."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from store import (
    GenerationBackend,
    NamedStreamBackend,
    RedisSessionStore,
    RedisStore,
    SessionBackend,
    SessionStore,
    StoreBackend,
    StreamBackend,
    StreamStore,
)

from .redis_support import RedisServer


def members(protocol: type) -> dict[str, object]:
    """A protocol's own and inherited members (methods and properties)."""
    found: dict[str, object] = {}
    for klass in reversed(protocol.__mro__):
        if klass is object or not getattr(klass, "_is_protocol", False):
            continue
        found.update({k: v for k, v in vars(klass).items() if not k.startswith("_")})
    return found


def parameters(function: object) -> list[tuple[str, object]]:
    signature = inspect.signature(function)  # type: ignore[arg-type]
    return [(p.name, p.kind) for p in signature.parameters.values()]


@pytest.mark.parametrize(
    ("protocol", "implementation"),
    [
        (StreamBackend, StreamStore),
        (GenerationBackend, StreamStore),
        (StoreBackend, StreamStore),
        (SessionBackend, SessionStore),
        (NamedStreamBackend, StreamStore),
        (StreamBackend, RedisStore),
        (GenerationBackend, RedisStore),
        (StoreBackend, RedisStore),
        (SessionBackend, RedisSessionStore),
        (NamedStreamBackend, RedisStore),
    ],
    ids=[
        *(f"sqlite-{part}" for part in ("streams", "generations", "store", "sessions", "named")),
        *(f"redis-{part}" for part in ("streams", "generations", "store", "sessions", "named")),
    ],
)
def test_each_backend_has_every_member_of_the_interface(
    protocol: type, implementation: type
) -> None:
    wanted = members(protocol)
    assert len(wanted) >= 5
    for name, member in wanted.items():
        found = getattr(implementation, name, None)
        assert found is not None, f"{implementation.__name__} lacks {name}"
        if isinstance(member, property):
            assert isinstance(found, property), name
            continue
        assert parameters(found) == parameters(member), name
        assert inspect.iscoroutinefunction(found) == inspect.iscoroutinefunction(member), name


async def test_the_sqlite_backend_is_typed_as_the_interface(tmp_path: Path) -> None:
    async with StreamStore(str(tmp_path / "s.db")) as opened:
        store: StoreBackend = opened  # mypy checks these assignments structurally
        sessions: SessionBackend = SessionStore(opened)
        await store.create_stream("s")
        assert (await store.append("s", [b"x"], close=True)).next_offset == 1
        assert await sessions.idle(before=0.0) == []


async def test_the_redis_backend_is_typed_as_the_interface(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with RedisStore(redis_server.url, prefix=redis_prefix) as opened:
        store: StoreBackend = opened
        sessions: SessionBackend = RedisSessionStore(opened)
        await store.create_stream("s")
        assert (await store.append("s", [b"x"], close=True)).next_offset == 1
        assert await sessions.idle(before=0.0) == []
