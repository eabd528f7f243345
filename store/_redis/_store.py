"""RedisStore: durable streams, generation records and workers on one Redis primary, with
the same guarantees as the SQLite store (see ``_lua`` for the layout, ``_flusher`` for group
commit and ``_changes`` for wake-ups). Any number of nodes share one Redis."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup
from redis.asyncio import BlockingConnectionPool, Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from .._context import AppendSource
from .._exceptions import GenerationNotFound, StoreUnavailable, StreamNotFound
from .._follow import follow_stream
from .._handoff import OneShotAppend, WriteRoom
from ..types import (
    ActiveGeneration,
    AppendBatch,
    AppendResult,
    GenerationRecord,
    JSONDict,
    ReadResult,
    SessionWrite,
    WorkerRecord,
)
from . import _lua as lua
from ._changes import MAX_WAIT, ChangeEvents, listen
from ._codec import Arg, check, dumps, field_pairs, names, record_from_hash, session_write_args
from ._flusher import Flusher
from ._named import NamedScripts, RedisNamedStreams

DEFAULT_PREFIX = "ks:"
DEFAULT_READ_LIMIT = 4096
DEFAULT_FLUSH_INTERVAL = 0.01
DEFAULT_COALESCE_WINDOW = 0.05
DEFAULT_MAX_PENDING_WRITES = 10_000
DEFAULT_WRITE_WAIT = 10.0
DEFAULT_CONNECTIONS = 64  # commands in flight to Redis at once (the pool's connections)
# A command without a reply for this long counts as lost (and is retried where safe).
SOCKET_TIMEOUT = 10.0
DRAIN_TIMEOUT = 10.0
_GENERATION_FIELDS = tuple(f for f in GenerationRecord.blank().to_row() if f != "id")


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
        self.named = NamedScripts(script)


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


class RedisStore(RedisNamedStreams):
    """Streams, generations and workers on Redis (``StoreBackend``).

    * Every check-and-write is one Lua script. Appends from live sources are group-committed
      (``Flusher``): one script call per flush carries every dirty source's batch.
    * Readers are woken after the write: this node's at once, other nodes' through the
      ``changes`` channel each write script publishes to; reads come from Redis.
    * ``require_persistence``: refuse to open on a Redis without an append-only file, or
      one that may evict keys (``StoreUnavailable``), since a restart of it would lose
      answers clients have seen.
    * At most ``connections`` commands are in flight at once; more wait for a connection.

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
        self._client: Redis | None = None
        self._scripts: Scripts | None = None
        self._flusher: Flusher | None = None
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
        # Its own connection, without a read timeout: it waits for messages indefinitely.
        subscriber = Redis.from_url(self.url)
        tg.start_soon(self._listen, subscriber, name="keepstream redis changes")

    async def _listen(self, subscriber: Redis) -> None:
        try:
            await listen(subscriber, self.prefix + "changes", self.node_id, self._events)
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
    def named_scripts(self) -> NamedScripts:
        """The registered named-stream scripts."""
        return self.scripts.named

    @property
    def client(self) -> Redis:
        """The command connection pool (``StoreUnavailable`` when closed)."""
        if self._client is None:
            raise StoreUnavailable("the store is not open")
        return self._client

    async def run(self, script: AsyncScript, *args: Arg) -> Any:
        """Run ``script`` with the prefix and ``args``; a Redis that cannot be reached is
        ``StoreUnavailable``."""
        with unavailable_on_error():
            return await script(args=[self.prefix, *args])

    @property
    def stats(self) -> dict[str, int]:
        """The counters and gauges ``/metrics`` shows (those only SQLite has are 0)."""
        flusher = self._flusher
        return {
            "commits": flusher.commits if flusher else 0,
            "rows_written": flusher.rows_written if flusher else 0,
            "live_streams": 0,
            "tail_bytes": 0,
            "tail_cache_bytes": 0,
            "tracked_streams": 0,
            "write_retries": flusher.retries if flusher else 0,
            "messages_compacted": 0,
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

    def _committed(self, stream_ids: list[str], seconds: float, rows: int) -> None:
        self._events.wake(stream_ids)
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
        self._events.wake([stream_id])

    async def delete_stream(self, stream_id: str) -> None:
        """Delete a stream and its messages. Raises ``StreamNotFound``."""
        check(await self.run(self.scripts.delete_stream, self.node_id, stream_id), stream_id)
        self._events.wake([stream_id])

    def wake(self, stream_ids: list[str]) -> None:
        """Wake this node's readers of ``stream_ids`` (after a write that changed them)."""
        self._events.wake(stream_ids)

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
        the first alone is larger. Raises ``StreamNotFound``."""
        if offset < 0:
            raise ValueError("offset must be >= 0")
        if limit <= 0:
            return ReadResult(offset, [], False)
        reply = await self.run(
            self.scripts.read, stream_id, offset, limit, -1 if max_bytes is None else max_bytes
        )
        if reply[0] == 0:
            raise StreamNotFound(stream_id)
        _, closed, next_offset, cut, messages = reply
        at_end = bool(closed) and not cut and offset + len(messages) >= next_offset
        return ReadResult(offset, list(messages), at_end)

    async def stream_length(self, stream_id: str) -> tuple[int, bool]:
        """``(next_offset, closed)`` as committed. Raises ``StreamNotFound``."""
        next_offset, closed = check(
            await self.run(self.scripts.stream_length, stream_id), stream_id
        )
        return int(next_offset), bool(closed)

    async def stored_bytes(self, owner: str) -> int:
        """Bytes ``owner`` stores: streams, session contexts, titles and messages."""
        return int(await self.run(self.scripts.stored_bytes, dumps(owner)))

    # -- generations --------------------------------------------------------------------------

    async def create_generation(
        self,
        record: GenerationRecord,
        *,
        content_type: str = "application/json",
        session_write: SessionWrite | None = None,
        max_active_per_owner: int | None = None,
    ) -> None:
        """The record, its empty stream and ``session_write``, in one script (refused while
        the owner has ``max_active_per_owner`` queued or running, on any node)."""
        row = {name: getattr(record, name) for name in _GENERATION_FIELDS}
        pairs = field_pairs({"id": record.id, **row})
        args: list[Arg] = [
            record.id,
            record.stream_id,
            content_type,
            dumps(record.owner),
            dumps(record.created_at),
            -1 if max_active_per_owner is None else max_active_per_owner,
            call_token(),
            len(pairs) // 2,
            *pairs,
        ]
        args += [1, *session_write_args(session_write)] if session_write else [0]
        check(await self.run(self.scripts.create_generation, *args), record.stream_id)

    async def update_generation(self, generation_id: str, fields: JSONDict) -> None:
        """Set fields of a generation. Raises ``GenerationNotFound``."""
        bad = (set(fields) - set(_GENERATION_FIELDS)) | ({"id"} & set(fields))
        if bad or not fields:
            raise ValueError(f"cannot set generation fields {sorted(bad)}")
        pairs = field_pairs(fields)
        reply = await self.run(
            self.scripts.update_generation, generation_id, len(pairs) // 2, *pairs
        )
        check(reply, generation_id, GenerationNotFound)

    async def finish_generation(
        self,
        generation_id: str,
        payload: bytes,
        fields: JSONDict,
        *,
        only_if: Iterable[str],
        only_worker: tuple[str | None] | None = None,
    ) -> bool:
        """Append the final event, close the stream and set ``fields``, atomically, only
        while the status is one of ``only_if`` (and the owner ``only_worker``)."""
        allowed = [dumps(status) for status in only_if]
        pairs = field_pairs(fields)
        worker: list[Arg] = [1, dumps(only_worker[0])] if only_worker is not None else [0, ""]
        reply = await self.run(
            self.scripts.finish_generation,
            self.node_id,
            generation_id,
            payload,
            len(allowed),
            *allowed,
            *worker,
            len(pairs) // 2,
            *pairs,
        )
        done = bool(check(reply, generation_id, GenerationNotFound))
        if done:
            record = await self.locate_generation(generation_id)
            self._events.wake([record.stream_id])
        return done

    async def claim_generation(
        self,
        generation_id: str,
        *,
        from_worker: str | None,
        to_worker: str,
        max_continuations: int,
        only_if: Iterable[str],
    ) -> bool:
        """Take a dead worker's generation over: only while it still belongs to
        ``from_worker`` (the fence: whoever wins the claim owns every later write)."""
        allowed = [dumps(status) for status in only_if]
        reply = await self.run(
            self.scripts.claim_generation,
            generation_id,
            dumps(from_worker),
            dumps(to_worker),
            max_continuations,
            call_token(),
            len(allowed),
            *allowed,
        )
        return bool(reply)

    async def request_cancel(self, generation_id: str, *, only_if: Iterable[str]) -> bool:
        """Persist a cancel request while the status is one of ``only_if``."""
        allowed = [dumps(status) for status in only_if]
        reply = await self.run(self.scripts.request_cancel, generation_id, len(allowed), *allowed)
        return bool(check(reply, generation_id, GenerationNotFound))

    async def _generation_hash(
        self, generation_id: str, with_text: bool
    ) -> tuple[dict[bytes, bytes], str]:
        key = self.prefix + "g:" + generation_id
        with unavailable_on_error():
            if with_text:
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.hgetall(key)
                    pipe.get(self.prefix + "t:" + generation_id)
                    values, text = await pipe.execute()
            else:
                values, text = await self.client.hgetall(key), None
        if not values:
            raise GenerationNotFound(generation_id)
        return values, (text or b"").decode()

    async def get_generation(self, generation_id: str) -> GenerationRecord:
        """The committed snapshot. Raises ``GenerationNotFound``."""
        values, text = await self._generation_hash(generation_id, True)
        return record_from_hash(GenerationRecord, values, text=text)

    async def locate_generation(self, generation_id: str) -> GenerationRecord:
        """The record without its text and request."""
        values, _ = await self._generation_hash(generation_id, False)
        return record_from_hash(GenerationRecord, values, text="", request={})

    async def snapshot_length(self, generation_id: str) -> tuple[int, int]:
        """``(characters, next_offset)`` of the snapshot, without its text."""
        with unavailable_on_error():
            chars, next_offset = await self.client.hmget(
                self.prefix + "g:" + generation_id, ["text_chars", "next_offset"]
            )
        if next_offset is None:
            raise GenerationNotFound(generation_id)
        return int(chars or 0), int(next_offset)

    async def _records(self, generation_ids: list[str]) -> list[GenerationRecord]:
        if not generation_ids:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for gid in generation_ids:
                pipe.hgetall(self.prefix + "g:" + gid)
                pipe.get(self.prefix + "t:" + gid)
            replies = await pipe.execute()
        return [
            record_from_hash(GenerationRecord, values, text=(text or b"").decode())
            for values, text in zip(replies[::2], replies[1::2], strict=True)
            if values
        ]

    async def list_generations(
        self, *, statuses: Iterable[str] | None = None
    ) -> list[GenerationRecord]:
        """Generations, optionally only those in ``statuses``, oldest first."""
        with unavailable_on_error():
            ids = names(await self.client.zrange(self.prefix + "gens", 0, -1))
            records = await self._records(ids)
        if statuses is not None:
            wanted = set(statuses)
            records = [r for r in records if r.status in wanted]
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def active_generations(self, statuses: Iterable[str]) -> list[ActiveGeneration]:
        """Summaries of the generations in ``statuses`` (from the active set)."""
        wanted = set(statuses)
        fields = [
            "status",
            "worker_id",
            "cancel_requested",
            "provider",
            "created_at",
            "continuations",
        ]
        with unavailable_on_error():
            ids = names(await self.client.smembers(self.prefix + "active"))
            async with self.client.pipeline(transaction=False) as pipe:
                for gid in ids:
                    pipe.hmget(self.prefix + "g:" + gid, fields)
                rows = await pipe.execute()
        active = []
        for gid, row in zip(ids, rows, strict=True):
            if row[0] is None:
                continue
            status, worker, cancel, provider, created, continuations = map(json.loads, row)
            if status in wanted:
                active.append(
                    ActiveGeneration(gid, worker, cancel, provider, created, continuations)
                )
        return active

    # -- workers ------------------------------------------------------------------------------

    def _worker_json(self, worker: WorkerRecord, heartbeat_at: float) -> str:
        return dumps(
            {
                "id": worker.id,
                "hostname": worker.hostname,
                "pid": worker.pid,
                "started_at": worker.started_at,
                "heartbeat_at": heartbeat_at,
            }
        )

    async def register_worker(self, worker: WorkerRecord) -> None:
        """Record (or refresh) a worker."""
        await self.run(
            self.scripts.heartbeat, worker.id, self._worker_json(worker, worker.heartbeat_at)
        )

    async def heartbeat(self, worker: WorkerRecord, now: float | None = None) -> bool:
        """Refresh a worker's lease; ``False`` when it had been taken for dead (removed)."""
        at = time.time() if now is None else now
        return bool(
            await self.run(self.scripts.heartbeat, worker.id, self._worker_json(worker, at))
        )

    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker."""
        with unavailable_on_error():
            await self.client.hdel(self.prefix + "workers", worker_id)

    async def list_workers(self) -> list[WorkerRecord]:
        """Every registered worker."""
        with unavailable_on_error():
            values = await self.client.hvals(self.prefix + "workers")
        return [WorkerRecord(**json.loads(v)) for v in values]
