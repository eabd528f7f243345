"""The generation half of ``RedisStore``: records, their guarded transitions (each one
script) and the workers that own them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from .._exceptions import GenerationNotFound
from ..types import (
    ActiveGeneration,
    GenerationRecord,
    JSONDict,
    SessionWrite,
    WorkerRecord,
)
from ._base import RedisPart, call_token, unavailable_on_error
from ._codec import Arg, check, dumps, field_pairs, names, record_from_hash, session_write_args

_GENERATION_FIELDS = tuple(f for f in GenerationRecord.blank().to_row() if f != "id")


class RedisGenerations(RedisPart):
    """Generation records and workers on Redis (these are ``RedisStore``'s methods, kept
    apart by job)."""

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
        stream_id = check(reply, generation_id, GenerationNotFound)
        if stream_id == 0:
            return False
        self.wake([stream_id.decode()])
        self.stream_closed(stream_id.decode())
        return True

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
