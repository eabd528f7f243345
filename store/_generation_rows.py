"""The generation half of ``StreamStore``: snapshot rows, their state transitions (each
check-and-write in one transaction), and the workers that own them."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from . import _queries as queries
from ._context import CLOSE_STREAM, INSERT_MESSAGE, Op, WriterContext, update_fields
from ._exceptions import GenerationNotFound, StoreError, WriteRejected
from ._session_writes import apply_session_write
from .types import ActiveGeneration, GenerationRecord, JSONDict, SessionWrite, WorkerRecord

T = TypeVar("T")

_GENERATION_COLUMNS = tuple(GenerationRecord.blank().to_row())
_INSERT_GENERATION = "INSERT INTO generations ({}) VALUES ({})".format(
    ", ".join(_GENERATION_COLUMNS), ", ".join("?" for _ in _GENERATION_COLUMNS)
)


# At most ``limit`` of an owner's active generations (through the partial index whose
# condition the WHERE repeats exactly).
_COUNT_ACTIVE = (
    "SELECT count(*) FROM (SELECT 1 FROM generations WHERE owner = ?"
    " AND status IN ('queued', 'running') LIMIT ?)"
)


class GenerationRows(ABC):
    """Generation rows and workers, on a store's writer (``execute``) and readers
    (``query``); ``StreamStore`` is one (these are its methods, kept apart by job)."""

    @abstractmethod
    async def execute(self, fn: Op) -> Any:
        """Run ``fn(ctx)`` on the writer in the next transaction."""

    @abstractmethod
    async def query(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on a reader."""

    async def finish_generation(
        self,
        generation_id: str,
        payload: bytes,
        fields: JSONDict,
        *,
        only_if: Iterable[str],
        only_worker: tuple[str | None] | None = None,
    ) -> bool:
        """Append a final event to a generation's stream, close it and set ``fields`` —
        atomically, and only while its status is one of ``only_if`` (and, with
        ``only_worker``, while it still belongs to that one worker).

        Returns whether it did. Used to end generations whose process is gone: when two
        processes race to do it, the check inside the transaction lets exactly one win, and
        one that a peer has meanwhile taken over to continue is left alone.
        """
        allowed = set(only_if)

        def op(ctx: WriterContext) -> bool:
            row = ctx.conn.execute(
                "SELECT stream_id, status, worker_id FROM generations WHERE id = ?",
                (generation_id,),
            ).fetchone()
            if row is None:
                raise GenerationNotFound(generation_id)
            stream_id, status, worker_id = row
            if status not in allowed:
                return False
            if only_worker is not None and worker_id != only_worker[0]:
                return False
            row_fields = dict(fields)
            try:
                first = ctx.next_offset(stream_id)
            except StoreError:
                pass  # the stream is closed or gone: only the row needs ending
            else:
                ctx.conn.execute(INSERT_MESSAGE, (stream_id, first, payload))
                ctx.conn.execute(CLOSE_STREAM, (stream_id,))
                row_fields["next_offset"] = first + 1
                ctx.record_append(stream_id, first, [payload], close=True)
            update_fields(ctx.conn, generation_id, row_fields)
            return True

        result: bool = await self.execute(op)
        return result

    async def create_generation(
        self,
        record: GenerationRecord,
        *,
        content_type: str = "application/json",
        session_write: SessionWrite | None = None,
        max_active_per_owner: int | None = None,
    ) -> None:
        """Insert a generation and create its (empty) stream in one transaction, together
        with ``session_write`` (its session's messages, say). Raises ``WriteRejected`` or
        ``SessionNotFound`` from the session write, and then writes nothing; with
        ``max_active_per_owner``, ``WriteRejected("max_generations_per_user")`` when its
        owner already has that many queued or running (in any process)."""

        def op(ctx: WriterContext) -> None:
            if max_active_per_owner is not None and record.owner is not None:
                params = (record.owner, max_active_per_owner)
                (active,) = ctx.conn.execute(_COUNT_ACTIVE, params).fetchone()
                if active >= max_active_per_owner:
                    raise WriteRejected("max_generations_per_user", str(active))
            queries.insert_stream(
                ctx, record.stream_id, content_type, mark=False, owner=record.owner
            )
            row = record.to_row()
            ctx.conn.execute(_INSERT_GENERATION, [row[c] for c in _GENERATION_COLUMNS])
            if session_write is not None:
                apply_session_write(ctx, session_write, generation_id=record.id)
            ctx.mark_created(record.stream_id)

        await self.execute(op)

    async def update_generation(self, generation_id: str, fields: JSONDict) -> None:
        """Set columns of a generation row. Raises ``GenerationNotFound``."""
        bad = (set(fields) - set(_GENERATION_COLUMNS)) | ({"id"} & set(fields))
        if bad or not fields:
            raise ValueError(f"cannot set generation fields {sorted(bad)}")

        def op(ctx: WriterContext) -> None:
            if update_fields(ctx.conn, generation_id, fields) == 0:
                raise GenerationNotFound(generation_id)

        await self.execute(op)

    async def get_generation(self, generation_id: str) -> GenerationRecord:
        """The committed snapshot of a generation. Raises ``GenerationNotFound``."""
        return await self.query(queries.get_generation, generation_id)

    async def locate_generation(self, generation_id: str) -> GenerationRecord:
        """A generation's row without its text and request (owner, stream, status, …): cheap
        whatever the answer's length. Raises ``GenerationNotFound``."""
        return await self.query(queries.get_generation, generation_id, False)

    async def snapshot_length(self, generation_id: str) -> tuple[int, int]:
        """``(characters, next_offset)`` of a generation's committed snapshot, without
        loading its text. Raises ``GenerationNotFound``."""
        return await self.query(queries.snapshot_length, generation_id)

    async def list_generations(
        self, *, statuses: Iterable[str] | None = None
    ) -> list[GenerationRecord]:
        """Generations, optionally only those in ``statuses``, oldest first."""
        params: list[Any] = []
        sql = "SELECT * FROM generations"
        if statuses is not None:
            params = list(statuses)
            sql += " WHERE status IN ({})".format(", ".join("?" for _ in params))
        sql += " ORDER BY created_at, id"
        return await self.query(queries.query_generations, sql, params)

    async def request_cancel(self, generation_id: str, *, only_if: Iterable[str]) -> bool:
        """Persist a cancel request, only while the status is one of ``only_if``.

        Returns whether the generation is (now) marked; a finished one is left untouched.
        Raises ``GenerationNotFound``.
        """
        allowed = list(only_if)
        marks = ", ".join("?" for _ in allowed)
        sql = f"UPDATE generations SET cancel_requested = 1 WHERE id = ? AND status IN ({marks})"

        def op(ctx: WriterContext) -> bool:
            if ctx.conn.execute(sql, (generation_id, *allowed)).rowcount:
                return True
            if (
                ctx.conn.execute(
                    "SELECT 1 FROM generations WHERE id = ?", (generation_id,)
                ).fetchone()
                is None
            ):
                raise GenerationNotFound(generation_id)
            return False

        result: bool = await self.execute(op)
        return result

    async def active_generations(self, statuses: Iterable[str]) -> list[ActiveGeneration]:
        """Id, worker, cancel flag, provider, creation time and continuations of every
        generation in ``statuses`` (no text: cheap)."""
        wanted = list(statuses)
        sql = (
            "SELECT id, worker_id, cancel_requested, provider, created_at, continuations"
            " FROM generations WHERE status IN ({})".format(", ".join("?" for _ in wanted))
        )
        return await self.query(queries.query_active, sql, wanted)

    async def claim_generation(
        self,
        generation_id: str,
        *,
        from_worker: str | None,
        to_worker: str,
        max_continuations: int,
        only_if: Iterable[str],
    ) -> bool:
        """Take an orphaned generation over to continue it: its worker becomes
        ``to_worker`` and its ``continuations`` count goes up by one — only while it still
        belongs to ``from_worker``, its status is one of ``only_if``, no cancel was
        requested and fewer than ``max_continuations`` were made. Returns whether it did
        (of processes racing to claim it, exactly one wins)."""
        allowed = list(only_if)
        marks = ", ".join("?" for _ in allowed)
        sql = (
            "UPDATE generations SET worker_id = ?, continuations = continuations + 1"
            f" WHERE id = ? AND worker_id IS ? AND status IN ({marks})"
            " AND cancel_requested = 0 AND continuations < ?"
        )
        params = (to_worker, generation_id, from_worker, *allowed, max_continuations)

        def op(ctx: WriterContext) -> bool:
            return bool(ctx.conn.execute(sql, params).rowcount)

        result: bool = await self.execute(op)
        return result

    # -- workers ------------------------------------------------------------------------------

    async def register_worker(self, worker: WorkerRecord) -> None:
        """Record (or refresh) a server process using this database."""

        def op(ctx: WriterContext) -> None:
            ctx.conn.execute(
                "INSERT OR REPLACE INTO workers (id, hostname, pid, started_at, heartbeat_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (worker.id, worker.hostname, worker.pid, worker.started_at, worker.heartbeat_at),
            )

        await self.execute(op)

    async def heartbeat(self, worker: WorkerRecord, now: float | None = None) -> bool:
        """Refresh a worker's heartbeat, registering it again if its row is gone.

        Returns ``False`` when the row was gone: a peer took this worker for dead (after a
        stall longer than the lease) and may have ended its generations.
        """
        at = time.time() if now is None else now

        def op(ctx: WriterContext) -> bool:
            cursor = ctx.conn.execute(
                "UPDATE workers SET heartbeat_at = ? WHERE id = ?", (at, worker.id)
            )
            if cursor.rowcount:
                return True
            ctx.conn.execute(
                "INSERT INTO workers (id, hostname, pid, started_at, heartbeat_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (worker.id, worker.hostname, worker.pid, worker.started_at, at),
            )
            return False

        alive: bool = await self.execute(op)
        return alive

    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker (it shut down, or it is known dead and its work was recovered)."""

        def op(ctx: WriterContext) -> None:
            ctx.conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

        await self.execute(op)

    async def list_workers(self) -> list[WorkerRecord]:
        """Every registered worker."""
        return await self.query(queries.list_workers)
