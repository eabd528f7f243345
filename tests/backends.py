"""Both store backends behind one fixture: a test that takes ``backend`` runs on SQLite and
on a real Redis (see ``conftest.redis_server``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store import (
    RedisSessionStore,
    RedisStore,
    SessionBackend,
    SessionStore,
    StoreBackend,
    StreamStore,
)

BACKENDS = ("sqlite", "redis")


@dataclass
class Backend:
    """An open store and its session store, and how to open another on the same data (a
    second process, or a restart)."""

    kind: str
    store: StoreBackend
    sessions: SessionBackend
    path: Path
    redis_url: str
    prefix: str

    def reopen(self, **options: Any) -> Any:
        """Another store on the same data (use as ``async with``)."""
        return open_store(self.kind, self.path, self.redis_url, self.prefix, **options)


def open_store(kind: str, path: Path, redis_url: str, prefix: str, **options: Any) -> Any:
    """An unopened store of ``kind`` (use as ``async with``)."""
    if kind == "sqlite":
        return StreamStore(str(path), **options)
    return RedisStore(redis_url, prefix=prefix, **options)


def sessions_of(store: StoreBackend) -> SessionBackend:
    """The session store over ``store``."""
    if isinstance(store, RedisStore):
        return RedisSessionStore(store)
    assert isinstance(store, StreamStore)
    return SessionStore(store)


@asynccontextmanager
async def open_backend(
    kind: str, path: Path, redis_url: str, prefix: str, **options: Any
) -> AsyncIterator[Backend]:
    """An open ``Backend`` of ``kind``, closed afterwards."""
    async with open_store(kind, path, redis_url, prefix, **options) as store:
        yield Backend(kind, store, sessions_of(store), path, redis_url, prefix)
