"""What every part of the Redis store shares: the registered scripts, the connection, the
error mapping, and the abstract base the parts (streams, generations, named streams) build on."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from .._exceptions import StoreUnavailable
from . import _lua as lua
from . import _named_lua as named_lua
from ._codec import Arg


@contextmanager
def unavailable_on_error() -> Iterator[None]:
    """Redis errors (unreachable, timed out, refused) as ``StoreUnavailable``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis: {exc}") from exc


def call_token() -> str:
    """A token naming one call of a creating script (its retry is then recognised)."""
    return uuid.uuid4().hex


class Scripts:
    """The Lua scripts, registered on a client (sent by SHA, loaded again if Redis lost them)."""

    def __init__(self, client: Redis) -> None:
        def script(source: str) -> AsyncScript:
            return client.register_script(lua.PRELUDE + source)

        def named(source: str) -> AsyncScript:
            return script(named_lua.NAMED_PRELUDE + source)

        self.append = script(lua.APPEND)
        self.create_stream = script(lua.CREATE_STREAM)
        self.close_stream = script(lua.CLOSE_STREAM)
        self.delete_stream = script(lua.DELETE_STREAM)
        self.read = script(lua.READ)
        self.stream_length = script(lua.STREAM_LENGTH)
        self.create_generation = script(lua.CREATE_GENERATION)
        self.update_generation = script(lua.UPDATE_GENERATION)
        self.finish_generation = script(lua.FINISH_GENERATION)
        self.claim_generation = script(lua.CLAIM_GENERATION)
        self.request_cancel = script(lua.REQUEST_CANCEL)
        self.heartbeat = script(lua.HEARTBEAT)
        self.create_session = script(lua.CREATE_SESSION)
        self.update_session = script(lua.UPDATE_SESSION)
        self.session_write = script(lua.SESSION_WRITE)
        self.delete_session = script(lua.DELETE_SESSION)
        self.messages = script(lua.MESSAGES)
        self.stored_bytes = script(lua.STORED_BYTES)
        self.pack = script(lua.PACK)
        self.named_info = named(named_lua.NAMED_INFO)
        self.named_create = named(named_lua.NAMED_CREATE)
        self.named_append = named(named_lua.NAMED_APPEND)
        self.named_delete = named(named_lua.NAMED_DELETE)
        self.named_sweep = named(named_lua.NAMED_SWEEP)


class RedisPart(ABC):
    """A part of ``RedisStore``: its key prefix, node id, connection and scripts."""

    prefix: str
    node_id: str

    @property
    @abstractmethod
    def client(self) -> Redis:
        """The command connection pool (``StoreUnavailable`` when closed)."""

    @property
    @abstractmethod
    def scripts(self) -> Scripts:
        """The registered scripts (``StoreUnavailable`` when closed)."""

    async def run(self, script: AsyncScript, *args: Arg) -> Any:
        """Run ``script`` with the prefix and ``args``; a Redis that cannot be reached is
        ``StoreUnavailable``."""
        with unavailable_on_error():
            return await script(args=[self.prefix, *args])

    @abstractmethod
    def wake(self, stream_ids: list[str]) -> None:
        """Wake this node's readers of ``stream_ids`` (after a write that changed them)."""

    @abstractmethod
    def stream_closed(self, stream_id: str) -> None:
        """A write of this node closed ``stream_id`` (it is packed a little later)."""
