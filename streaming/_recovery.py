"""The pool's dealings with other processes: heartbeats, taking over the generations of dead
workers (continuing them from their committed text, or ending them), cancels requested
elsewhere, and stopping when a peer took this worker for dead."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup

from store import (
    ACTIVE_STATUSES,
    ActiveGeneration,
    GenerationNotFound,
    GenerationRecord,
    StoreBackend,
    StoreError,
    StreamNotFound,
    WorkerRecord,
)
from store.types import FinalStatus, JSONDict

from ._handle import Handle, log_context
from ._log import GenerationLog, decode_event, encode_event, status_event
from ._provider import Provider, supports_continuation
from ._workers import is_dead
from .types import GenerationRequest

logger = logging.getLogger("keepstream.pool")

# Orphaned generations ended at once by a recovery (each is one small writer op).
RECOVERY_PARALLELISM = 64
INTERRUPTED_ERROR: JSONDict = {
    "type": "interrupted",
    "message": "the server process running this generation stopped",
}


class Recovery(ABC):
    """Other processes' generations and this worker's lease; ``GenerationPool`` is one
    (these are its methods, kept apart by job)."""

    store: StoreBackend
    providers: dict[str, Provider]
    worker: WorkerRecord
    heartbeat_interval: float
    lease_timeout: float
    max_continuations: int
    time_limit: float | None
    recovered: anyio.Event
    _clock: Callable[[], float]
    _closing: bool
    _tg: TaskGroup | None
    _handles: dict[str, Handle]

    @abstractmethod
    def _hold(self, owner: str | None) -> None:
        """Count a generation against its owner's limit."""

    @abstractmethod
    async def _supervise(self, handle: Handle) -> None:
        """Run a generation to its end."""

    async def _end_elsewhere(
        self, generation_id: str, status: FinalStatus, *, worker: str | None, orphan: bool
    ) -> bool:
        """End a generation no task of ours runs (never started, or orphaned): final event,
        close and row in one commit, and only while it is still active and belongs to
        ``worker`` (ours; for an orphan, its dead worker's: a peer may have taken it over
        meanwhile). Returns whether it did."""
        error = INTERRUPTED_ERROR if status == "interrupted" else None
        fields: JSONDict = {"status": status, "error": error, "finished_at": self._clock()}
        if orphan:
            # Its snapshot row may be behind its stream (see ``GenerationLog``): it ends
            # with all the text its process committed.
            try:
                record = await self.store.get_generation(generation_id)
            except GenerationNotFound:
                return False
            fields["text"] = record.text + await self._text_beyond_snapshot(record)
        return await self.store.finish_generation(
            generation_id,
            encode_event(status_event(status, error=error)),
            fields,
            only_if=ACTIVE_STATUSES,
            only_worker=(worker,),
        )

    async def _text_beyond_snapshot(self, record: GenerationRecord) -> str:
        """The text of the deltas a generation's stream holds past its snapshot row's
        ``next_offset`` (what its process committed after its last snapshot update)."""
        pieces: list[str] = []
        offset = record.next_offset
        while True:
            try:
                result = await self.store.read(record.stream_id, offset, from_disk=True)
            except StreamNotFound:
                break
            for payload in result.messages:
                event = decode_event(payload)
                if event.get("type") == "delta":
                    pieces.append(event["text"])
            if not result.messages or result.at_end:
                break
            offset = result.next_offset
        return "".join(pieces)

    async def _recover_at_start(self) -> None:
        started = anyio.current_time()
        try:
            ended = await self.recover()
        except StoreError:
            logger.exception("recovery at start failed; the heartbeat sweep tries again")
            return
        finally:
            self.recovered.set()
        if ended:
            logger.info(
                "took over %d orphaned generations in %.2f s",
                ended,
                anyio.current_time() - started,
            )

    async def recover(self) -> int:
        """Take over the active generations no live worker owns: continue those whose
        provider can go on from their committed text (within ``max_continuations`` and the
        ``time_limit``), end the others ``interrupted`` (``cancelled`` when a cancel was
        requested: a persisted cancel wins). Returns how many were taken over.

        A generation is orphaned when its worker is dead (see ``is_dead``) or no longer
        registered. Active generations are read *before* the workers: a generation that a
        peer starts in between was created after its worker registered, so it is never
        mistaken for an orphan. Up to ``RECOVERY_PARALLELISM`` are ended at once, so the
        writer commits them in a few group commits rather than one transaction each.
        """
        active = await self.store.active_generations(ACTIVE_STATUSES)
        now = self._clock()
        workers = {w.id: w for w in await self.store.list_workers()}
        dead = {
            w.id
            for w in workers.values()
            if is_dead(w, me=self.worker, now=now, lease_timeout=self.lease_timeout)
        }
        orphans = [
            record
            for record in active
            if record.worker_id != self.worker.id
            and (record.worker_id not in workers or record.worker_id in dead)
        ]
        ended = 0
        limiter = anyio.CapacityLimiter(RECOVERY_PARALLELISM)

        async def end(record: ActiveGeneration) -> None:
            nonlocal ended
            async with limiter:
                if not record.cancel_requested and await self._continue_orphan(record):
                    ended += 1
                    return
                status: FinalStatus = "cancelled" if record.cancel_requested else "interrupted"
                ended += await self._end_elsewhere(
                    record.id, status, worker=record.worker_id, orphan=True
                )

        async with anyio.create_task_group() as tg:
            for record in orphans:
                tg.start_soon(end, record)
        for worker_id in dead:
            await self.store.remove_worker(worker_id)
            logger.info("recovered the generations of dead worker %s", worker_id)
        return ended

    async def _continue_orphan(self, orphan: ActiveGeneration) -> bool:
        """Claim an orphan and run it on from its committed text; whether it did. When it
        did not, the orphan is still its dead worker's (to end), or a peer's (to leave)."""
        provider = self.providers.get(orphan.provider)
        if provider is None or not callable(getattr(provider, "can_continue", None)):
            return False
        if self._closing or self._tg is None:
            return False
        if self.time_limit and self._clock() - orphan.created_at > self.time_limit:
            return False  # past its overall deadline
        try:
            stored = await self.store.get_generation(orphan.id)
            request = GenerationRequest.from_stored(stored.request)
        except (GenerationNotFound, ValueError):
            return False
        if not supports_continuation(provider, request):
            return False
        claimed = await self.store.claim_generation(
            orphan.id,
            from_worker=orphan.worker_id,
            to_worker=self.worker.id,
            max_continuations=self.max_continuations,
            only_if=ACTIVE_STATUSES,
        )
        if not claimed:
            return False
        record = await self.store.get_generation(orphan.id)  # its text, as claimed
        tail = await self._text_beyond_snapshot(record)
        handle = Handle(
            record,
            request,
            GenerationLog(
                self.store,
                record.id,
                record.stream_id,
                unsnapshotted=tail,
                worker_id=self.worker.id,
            ),
            partial=record.text + tail if record.status == "running" else None,
        )
        self._handles[record.id] = handle
        self._hold(record.owner)
        self._tg.start_soon(self._supervise, handle, name=f"generation {record.id} (continued)")
        logger.info("continuing generation %s", record.id, extra=log_context(record))
        return True

    async def _sweep_forever(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat_interval)
            try:
                if not await self.store.heartbeat(self.worker, self._clock()):
                    self._taken_over()
                await self._apply_remote_cancels()
                await self.recover()
            except StoreError:
                logger.exception("heartbeat sweep failed")

    def _taken_over(self) -> None:
        """A peer took us for dead (we stalled past the lease) and may have ended our
        generations. Theirs is the record now: stop ours, whose writes would conflict."""
        logger.warning(
            "worker %s was taken for dead by a peer; stopping its %d generations",
            self.worker.id,
            len(self._handles),
        )
        for handle in list(self._handles.values()):
            handle.stop("interrupted")

    async def _apply_remote_cancels(self) -> None:
        """Cancel requests made through another process reach us through the database."""
        if not self._handles:
            return
        for record in await self.store.active_generations(ACTIVE_STATUSES):
            handle = self._handles.get(record.id)
            if record.cancel_requested and handle is not None:
                handle.stop("cancelled")
