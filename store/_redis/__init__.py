"""The Redis backend: the same streams, generations and sessions as the SQLite store, on one
Redis primary shared by any number of keepstream nodes."""

from __future__ import annotations

from ._sessions import RedisSessionStore as RedisSessionStore
from ._store import RedisStore as RedisStore
from ._store import check_persistence as check_persistence

__all__ = ["RedisSessionStore", "RedisStore", "check_persistence"]
