"""RedisStore: durable streams on one Redis primary, with the same guarantees as the SQLite
store, and its lifecycle (see ``_lua`` for the layout, ``_flusher`` for group commit and
``_changes`` for wake-ups). Its generations and workers are in ``_generations``, its named
streams in ``_named``. Any number of nodes share one Redis."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from .._context import AppendSource
from .._events import ChangeEvents
from .._exceptions import StoreUnavailable, StreamNotFound
from .._follow import follow_stream
from .._handoff import OneShotAppend, WriteRoom
from .._queries import take_within
from ..types import (
    AppendBatch,
    AppendResult,
    ReadResult,
)
from ._base import Scripts, call_token
from ._changes import MAX_WAIT, listen
from ._codec import Arg, check, dumps
from ._flusher import Committed, Flusher
from ._generations import RedisGenerations
from ._named import RedisNamedStreams
from ._packer import PACK_DELAY, READ_BATCH, Packer, unpack_reply
from ._tails import Tails

DEFAULT_PREFIX = "ks:"
DEFAULT_READ_LIMIT = 4096
DEFAULT_FLUSH_INTERVAL = 0.01
DEFAULT_COALESCE_WINDOW = 0.05
DEFAULT_MAX_PENDING_WRITES = 10_000
DEFAULT_WRITE_WAIT = 10.0
DEFAULT_CONNECTIONS = 64  # commands in flight to Redis at once (the pool's connections)
DEFAULT_TAIL_CACHE_BYTES = 64 * 1024 * 1024  # recent messages of this node's streams, in all
# A command without a reply for this long counts as lost (and is retried where safe).
SOCKET_TIMEOUT = 10.0
DRAIN_TIMEOUT = 10.0


async def check_persistence(client: Redis) -> list[str]:
    """What keeps Redis from holding every acknowledged write through a restart: no
    append-only file, or an eviction policy that may drop keys. Empty when nothing does."""
    config = await client.config_get("appendonly")
    config.update(await client.config_get("maxmemory-policy"))
    problems = []
    if config.get("appendonly") != "yes":
        problems.append("appendonly is off (a restart loses everything since the last RDB save)")
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        problems.append(f"maxmemory-policy is {policy} (Redis may evict keepstream's keys)")
    return problems


class RedisStore(RedisGenerations, RedisNamedStreams):
    """Streams, generations, workers and named streams on Redis (``StoreBackend`` and
    ``NamedStreamBackend``).

    * Every check-and-write is one Lua script. Appends from live sources are group-committed
      (``Flusher``): one script call per flush carries every dirty source's batch.
    * Readers are woken after the write: this node's at once, other nodes' through the
      ``changes`` channel each write script publishes to. Reads of what this node's flusher
      just wrote come from memory (``_tails``, within ``tail_cache_bytes``), others from
      Redis.
    * ``require_persistence``: refuse to open on a Redis without an append-only file, or
      one that may evict keys (``StoreUnavailable``), since a restart of it would lose
      answers clients have seen.
    * At most ``connections`` commands are in flight at once; more wait for a connection.
    * A stream this node saw close is packed into compressed blocks ``pack_delay`` seconds
      later (``_packer``).

    Use as ``async with RedisStore(url) as store:``.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        coalesce_window: float = DEFAULT_COALESCE_WINDOW,
        max_pending_writes: int = DEFAULT_MAX_PENDING_WRITES,
        write_wait: float = DEFAULT_WRITE_WAIT,
        require_persistence: bool = True,
        connections: int = DEFAULT_CONNECTIONS,
        tail_cache_bytes: int = DEFAULT_TAIL_CACHE_BYTES,
        pack_delay: float = PACK_DELAY,
        on_commit: Callable[[float, int], None] | None = None,
    ) -> None:
        if flush_interval < 0 or coalesce_window < 0:
            raise ValueError("flush_interval and coalesce_window must be >= 0")
        self.url = url
        self.prefix = prefix
        self.node_id = uuid.uuid4().hex[:16]
        self._flush_interval = flush_interval
        self._coalesce_window = coalesce_window
        self._require_persistence = require_persistence
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self._connections = connections
        self._on_commit = on_commit
        self._room = WriteRoom(max_pending_writes, write_wait)
        self._events = ChangeEvents()
        if tail_cache_bytes < 0:
            raise ValueError("tail_cache_bytes must be >= 0")
        self._tails = Tails(tail_cache_bytes)
        self._client: Redis | None = None
        self._scripts: Scripts | None = None
        self._flusher: Flusher | None = None
        self._packer: Packer | None = None
        self._pack_delay = pack_delay
        self._tg: TaskGroup | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check persistence, and start the flusher and the change subscription."""
        # A blocking pool: a command waits for a free connection (up to the socket timeout)
        # rather than failing, however many readers are woken at once.
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self._connections,
            timeout=SOCKET_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
        )
        client = Redis.from_pool(pool)  # closing the client closes its pool
        try:
            await client.ping()
            problems = await check_persistence(client) if self._require_persistence else []
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise StoreUnavailable(f"cannot reach Redis at {self.url}: {exc}") from exc
        if problems:
            await client.aclose()
            raise StoreUnavailable(
                f"Redis at {self.url} would not keep acknowledged writes: "
                + "; ".join(problems)
                + " (configure it, or allow this explicitly)"
            )
        self._client = client
        self._scripts = Scripts(client)
        self._flusher = Flusher(
            self._append_script,
            node_id=self.node_id,
            flush_interval=self._flush_interval,
            coalesce_window=self._coalesce_window,
            on_committed=self._committed,
        )
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        tg.start_soon(self._flusher.run, name="keepstream redis flusher")
        self._packer = Packer(
            lambda: self.client,
            self.prefix,
            self._read_batch,
            lambda *args: self.run(self.scripts.pack, *args),
            delay=self._pack_delay,
        )
        tg.start_soon(self._packer.run, name="keepstream redis packer")
        # Its own connection, without a read timeout: it waits for messages indefinitely.
        subscriber = Redis.from_url(self.url)
        tg.start_soon(self._listen, subscriber, name="keepstream redis changes")

    async def _listen(self, subscriber: Redis) -> None:
        try:
            await listen(subscriber, self.prefix + "changes", self.node_id, self.wake, self._missed)
        finally:
            with anyio.CancelScope(shield=True):
                await subscriber.aclose()

    async def aclose(self) -> None:
        """Write what is pending, then stop and disconnect."""
        flusher, tg, client = self._flusher, self._tg, self._client
        self._tg = None
        if flusher is not None:
            with anyio.CancelScope(shield=True):
                await flusher.drain(DRAIN_TIMEOUT)
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
        self._flusher = None
        self._scripts = None
        self._client = None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    async def __aenter__(self) -> RedisStore:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def scripts(self) -> Scripts:
        """The registered scripts (``StoreUnavailable`` when closed)."""
        if self._scripts is None:
            raise StoreUnavailable("the store is not open")
        return self._scripts

    @property
    def client(self) -> Redis:
        """The command connection pool (``StoreUnavailable`` when closed)."""
        if self._client is None:
            raise StoreUnavailable("the store is not open")
        return self._client

    @property
    def stats(self) -> dict[str, int]:
        """The counters and gauges ``/metrics`` shows (those only SQLite has are 0)."""
        flusher = self._flusher
        return {
            "commits": flusher.commits if flusher else 0,
            "rows_written": flusher.rows_written if flusher else 0,
            "live_streams": len(self._tails),
            "tail_bytes": self._tails.bytes,
            "tail_cache_bytes": self._tails.max_bytes,
            "tracked_streams": 0,
            "write_retries": flusher.retries if flusher else 0,
            "messages_compacted": self._packer.packed if self._packer else 0,
            "pending_writes": self._room.pending + (flusher.pending if flusher else 0),
            "wal_bytes": 0,
        }

    async def readiness(self, *, write_within: float) -> dict[str, bool]:
        """The schema is always current; writable when a write answers within the time."""
        writable = False
        with anyio.move_on_after(write_within):
            try:
                await self.client.set(self.prefix + "ready", str(time.time()))
                writable = True
            except (RedisError, OSError, StoreUnavailable):
                pass
        return {"schema_current": True, "store_writable": writable}

    # -- streams ------------------------------------------------------------------------------

    def mark_dirty(self, source: AppendSource) -> None:
        """Have ``source``'s buffered messages taken at the next flush."""
        if self._flusher is None:
            raise StoreUnavailable("the store is closed")
        self._flusher.mark_dirty(source)

    async def _append_script(self, args: list[Arg]) -> list[Any]:
        result: list[Any] = await self.scripts.append(args=[self.prefix, *args])
        return result

    def _committed(self, writes: list[Committed], seconds: float, rows: int) -> None:
        """This node's flusher committed ``writes``: into the tails, and wake their readers."""
        for write in writes:
            self._tails.committed(write.stream_id, write.first, write.payloads, write.closed)
            if write.closed:
                self.stream_closed(write.stream_id)
        self._events.wake([write.stream_id for write in writes])
        if self._on_commit is not None:
            self._on_commit(seconds, rows)

    async def create_stream(
        self, stream_id: str, *, content_type: str = "application/json"
    ) -> None:
        """Create an empty, open stream. Raises ``StreamExists``."""
        reply = await self.run(
            self.scripts.create_stream,
            stream_id,
            content_type,
            dumps(time.time()),
            dumps(None),
            call_token(),
        )
        check(reply, stream_id)

    async def append(
        self, stream_id: str, payloads: list[bytes], *, close: bool = False
    ) -> AppendResult:
        """Append messages (and optionally close) atomically, with the next group commit."""
        release = await self._room.reserve()
        source = OneShotAppend(stream_id, AppendBatch(list(payloads), close=close), release)
        try:
            self.mark_dirty(source)
        except BaseException:
            release()
            raise
        result: AppendResult = await source.done.wait()
        return result

    async def close_stream(self, stream_id: str) -> None:
        """Close a stream (idempotent). Raises ``StreamNotFound``."""
        check(await self.run(self.scripts.close_stream, self.node_id, stream_id), stream_id)
        self.wake([stream_id])
        self.stream_closed(stream_id)

    async def delete_stream(self, stream_id: str) -> None:
        """Delete a stream and its messages. Raises ``StreamNotFound``."""
        check(await self.run(self.scripts.delete_stream, self.node_id, stream_id), stream_id)
        self.wake([stream_id])

    def wake(self, stream_ids: list[str]) -> None:
        """Wake this node's readers of ``stream_ids`` after a write that changed them other
        than through this node's flusher (their tails no longer hold all of them)."""
        for stream_id in stream_ids:
            self._tails.drop(stream_id)
        self._events.wake(stream_ids)

    def stream_closed(self, stream_id: str) -> None:
        """Pack ``stream_id`` a little later (its followers read its end from the tail)."""
        if self._packer is not None:
            self._packer.closed(stream_id)

    async def _read_batch(self, stream_id: str, offset: int) -> list[bytes]:
        """A batch of a stream's messages from Redis (for packing)."""
        return (await self.read(stream_id, offset, limit=READ_BATCH, from_disk=True)).messages

    def _missed(self) -> None:
        """Change messages may have been missed: no tail can be trusted, and every reader
        reads again."""
        self._tails.clear()
        self._events.wake_all()

    def change_event(self, stream_id: str) -> anyio.Event:
        """The event the next committed change to ``stream_id`` sets (take it before reading)."""
        return self._events.event(stream_id)

    def follow(
        self, stream_id: str, offset: int, *, max_bytes: int, deadline: float = math.inf
    ) -> AsyncGenerator[ReadResult, None]:
        """Reads from ``offset`` as the stream grows, until it is closed and read."""
        return follow_stream(
            self.read,
            self.change_event,
            stream_id,
            offset,
            max_bytes=max_bytes,
            deadline=deadline,
            max_wait=MAX_WAIT,
        )

    async def read(
        self,
        stream_id: str,
        offset: int,
        *,
        limit: int = DEFAULT_READ_LIMIT,
        max_bytes: int | None = None,
        from_disk: bool = False,
    ) -> ReadResult:
        """Committed messages from ``offset``: at most ``limit``, within ``max_bytes`` unless
        the first alone is larger. Raises ``StreamNotFound``. What this node just wrote
        comes from its tails; ``from_disk`` asks Redis regardless."""
        if offset < 0:
            raise ValueError("offset must be >= 0")
        if limit <= 0:
            return ReadResult(offset, [], False)
        if not from_disk:
            held = self._tails.read(stream_id, offset, limit, max_bytes)
            if held is not None:
                return held
        reply = await self.run(
            self.scripts.read, stream_id, offset, limit, -1 if max_bytes is None else max_bytes
        )
        if reply[0] == 0:
            raise StreamNotFound(stream_id)
        kind, closed, next_offset, cut, found = reply
        if kind == 2:  # packed: the blocks from the one holding offset
            messages = []
            for first, run in unpack_reply(found):
                messages += run[max(0, offset - first) :] if first <= offset else run
            messages = messages[:limit]
            if max_bytes is not None:
                messages, cut = take_within(messages, max_bytes)
        else:
            messages = list(found)
        at_end = bool(closed) and not cut and offset + len(messages) >= next_offset
        return ReadResult(offset, messages, at_end)

    async def stream_length(self, stream_id: str) -> tuple[int, bool]:
        """``(next_offset, closed)`` as committed. Raises ``StreamNotFound``."""
        next_offset, closed = check(
            await self.run(self.scripts.stream_length, stream_id), stream_id
        )
        return int(next_offset), bool(closed)

    async def stored_bytes(self, owner: str) -> int:
        """Bytes ``owner`` stores: streams, session contexts, titles and messages."""
        return int(await self.run(self.scripts.stored_bytes, dumps(owner)))
