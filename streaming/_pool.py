"""GenerationPool: owns every generation, independently of any HTTP connection (its
dealings with other processes are its ``Recovery`` half, in ``_recovery.py``)."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from types import TracebackType

import anyio
from anyio.abc import TaskGroup

from store import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Fenced,
    GenerationNotFound,
    GenerationRecord,
    SessionWrite,
    StoreBackend,
    StoreError,
    WorkerRecord,
    WriteRejected,
)
from store.types import FinalStatus, JSONDict

from ._exceptions import PoolClosed, PoolFull, ProviderError, UnknownProvider
from ._fair import FairSlots
from ._handle import Handle, log_context
from ._log import GenerationLog, TextSanitizer, scrub, status_event
from ._provider import GenerationRun, Provider, supports_continuation
from ._recovery import Recovery
from ._workers import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_LEASE_TIMEOUT, this_host
from .types import GenerationRequest

logger = logging.getLogger("keepstream.pool")

DEFAULT_MAX_RUNNING = 256
DEFAULT_MAX_QUEUED = 1024
DEFAULT_SHUTDOWN_GRACE = 10.0
DEFAULT_RETRY_AFTER = 1.0
FINALIZE_TIMEOUT = 10.0
REMOTE_POLL_INTERVAL = 0.1
# Times one generation may be taken over and continued after its process died (and,
# separately, continued after transport faults in the middle of its answer).
DEFAULT_MAX_CONTINUATIONS = 3


# Provider faults in the middle of an answer that a continuation may mend: the connection
# dropped, or the upstream stopped making progress. A model's own error is not among them.
def json_object(value: object, what: str) -> JSONDict:
    """A provider's ``usage`` or ``state`` as it will be stored: a JSON object of valid text;
    ``ProviderError`` for anything else (it could never be written, and the generation's
    commits with it)."""
    if isinstance(value, dict):
        cleaned = scrub(value)
        try:
            json.dumps(cleaned, allow_nan=False)
        except (TypeError, ValueError):
            pass
        else:
            return cleaned  # type: ignore[no-any-return]
    raise ProviderError(
        f"the provider gave a {what} that is not a JSON object: {value!r:.200}",
        kind="provider_error",
    )


RECENTLY_ENDED = 4096  # ids of generations ended here that ``wait_ended`` remembers
CONTINUABLE_FAULTS = frozenset({"upstream_dropped", "upstream_stalled", "upstream_timeout"})
# A generation whose text is not being committed (a slow or failing disk) stops reading
# from its provider once this much is buffered, until the writer catches up.
MAX_UNCOMMITTED_CHARS = 256 * 1024


@dataclass
class PoolStats:
    """What a pool has done since it started (counters only ever grow)."""

    finished: Counter[str] = field(default_factory=Counter)  # generations, by final status
    upstream_errors: Counter[str] = field(default_factory=Counter)  # by ProviderError kind
    chunks: int = 0  # text chunks received from providers


def new_generation_id() -> str:
    """A random, unguessable generation id."""
    return "gen_" + secrets.token_urlsafe(16)


class GenerationPool(Recovery):
    """Runs generations in a task group of its own, ``max_running`` at a time.

    * ``submit`` persists a generation (``queued``) and returns at once; it runs when a slot
      frees, up to ``max_queued`` wait, and beyond that ``submit`` raises ``PoolFull``.
    * Each generation runs under its own cancel scope in a supervisor: a failure ends that
      generation as ``failed`` and touches no other.
    * ``cancel`` is explicit, idempotent and persisted; nothing else stops a generation —
      in particular not a client disconnecting — but its ``time_limit`` (seconds from its
      start, if set): past it, it ends ``failed`` (``deadline_exceeded``), its text kept.
    * Shutdown (leaving the ``async with``) stops intake, interrupts queued generations, lets
      running ones finish for ``shutdown_grace`` seconds, then ends them ``interrupted``.
    * On entry (in the background) and every heartbeat after, generations owned by dead
      workers are taken over: continued from their committed text where their provider
      can (``max_continuations`` times at most, within ``time_limit`` of their creation),
      else ended ``interrupted`` (``cancelled`` if a cancel was requested).

    Every terminal state appends a final status event and closes the stream, atomically with
    the snapshot row.
    """

    def __init__(
        self,
        store: StoreBackend,
        providers: Mapping[str, Provider],
        *,
        default_provider: str,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_per_owner: int | None = None,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
        time_limit: float | None = None,
        max_continuations: int = DEFAULT_MAX_CONTINUATIONS,
        retry_after: float = DEFAULT_RETRY_AFTER,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_running < 1 or max_queued < 0:
            raise ValueError("max_running must be >= 1 and max_queued >= 0")
        if default_provider not in providers:
            raise UnknownProvider(default_provider, sorted(providers))
        self.store = store
        self.providers = dict(providers)
        self.default_provider = default_provider
        self.max_running = max_running
        self.max_queued = max_queued
        self.max_per_owner = max_per_owner
        self.shutdown_grace = shutdown_grace
        self.time_limit = time_limit
        self.max_continuations = max_continuations
        self.retry_after = retry_after
        self.heartbeat_interval = heartbeat_interval
        self.lease_timeout = lease_timeout
        self._clock = clock
        self._last_created = 0.0  # creation times this pool gives out only ever increase
        self._slots = FairSlots(max_running)
        self._handles: dict[str, Handle] = {}
        # Generations this process saw end lately: a successor waiting for several need not
        # ask the database about each.
        self._recently_ended: OrderedDict[str, None] = OrderedDict()
        self._reserved = 0
        self._per_owner: Counter[str] = Counter()  # generations held (or being created)
        self._closing = False
        self._stack = AsyncExitStack()
        self._tg: TaskGroup | None = None
        self._listeners: list[Callable[[GenerationRecord, FinalStatus], Awaitable[None]]] = []
        self._periodic: list[tuple[float, Callable[[], Awaitable[object]]]] = []
        self.stats = PoolStats()
        self.recovered = anyio.Event()  # set once the start-up recovery has run
        self.worker = WorkerRecord(
            id="wrk_" + secrets.token_urlsafe(9),
            hostname=this_host(),
            pid=os.getpid(),
            started_at=clock(),
            heartbeat_at=clock(),
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> GenerationPool:
        await self.store.register_worker(self.worker)
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        # In the background: the server takes requests at once, however many orphans a
        # crash left (a reader of one simply waits for its final event).
        self._tg.start_soon(self._recover_at_start)
        self._tg.start_soon(self._sweep_forever)
        for interval, job in self._periodic:
            self._tg.start_soon(self._repeat, interval, job)
        return self

    def on_finished(
        self, listener: Callable[[GenerationRecord, FinalStatus], Awaitable[None]]
    ) -> None:
        """Call ``listener(record, status)`` after each generation this pool ran has ended
        (its final event committed). Failures are logged, never propagated."""
        self._listeners.append(listener)

    def every(self, interval: float, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` every ``interval`` seconds in the pool's task group (register before
        entering the pool). Failures are logged and the job runs again next time."""
        self._periodic.append((interval, job))

    async def _repeat(self, interval: float, job: Callable[[], Awaitable[object]]) -> None:
        while True:
            await anyio.sleep(interval)
            try:
                await job()
            except Exception:
                logger.exception("periodic job %s failed", getattr(job, "__name__", job))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.shutdown()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()  # the sweeper; every generation has ended
        await self._stack.aclose()
        with anyio.CancelScope(shield=True):
            try:
                await self.store.remove_worker(self.worker.id)
            except StoreError:
                logger.warning("could not deregister worker %s", self.worker.id)

    async def shutdown(self) -> None:
        """Stop intake, interrupt queued work, give running work ``shutdown_grace`` seconds."""
        self._closing = True
        for handle in list(self._handles.values()):
            if not handle.started:
                handle.stop("interrupted")
        with anyio.move_on_after(self.shutdown_grace):
            for handle in list(self._handles.values()):
                await handle.done.wait()
        for handle in list(self._handles.values()):
            handle.stop("interrupted")
        # Each supervisor bounds its own final write; this bound is only a backstop.
        with anyio.move_on_after(FINALIZE_TIMEOUT + 1):
            for handle in list(self._handles.values()):
                await handle.done.wait()

    @property
    def accepting(self) -> bool:
        """Whether ``submit`` takes new work (started, and not shutting down)."""
        return self._tg is not None and not self._closing

    @property
    def running(self) -> int:
        """Generations running now."""
        return sum(1 for h in self._handles.values() if h.started)

    @property
    def queued(self) -> int:
        """Generations waiting for a slot."""
        return len(self._handles) - self.running

    # -- intake -------------------------------------------------------------------------------

    def resolve_provider(self, request: GenerationRequest) -> Provider:
        """The provider a request runs on; raises ``UnknownProvider`` or ``ValueError``."""
        name = request.provider or self.default_provider
        provider = self.providers.get(name)
        if provider is None:
            raise UnknownProvider(name, sorted(self.providers))
        provider.validate(request)
        return provider

    async def submit(
        self,
        request: GenerationRequest,
        *,
        owner: str | None = None,
        session_id: str | None = None,
        session_write: Callable[[str], SessionWrite] | None = None,
        after: Sequence[str] = (),
        prepare: Callable[[], Awaitable[GenerationRequest]] | None = None,
    ) -> GenerationRecord:
        """Persist a new generation and schedule it; return its ``queued`` record.

        ``session_write(generation_id)`` gives the changes to its session (its messages,
        say) written in the same transaction as the generation: both happen, or neither
        (``WriteRejected`` from the session write). With ``after``, the generation
        waits (queued) until those have ended. ``prepare()`` builds the request when the
        generation starts, replacing ``request`` (a conversation's prompt must include the
        answer it waited for).
        """
        if self._closing or self._tg is None:
            raise PoolClosed()
        provider = self.resolve_provider(request)
        if len(self._handles) + self._reserved >= self.max_running + self.max_queued:
            raise PoolFull(running=self.running, queued=self.queued, retry_after=self.retry_after)
        if owner is not None and self.max_per_owner is not None:
            held = self._per_owner[owner]
            if held >= self.max_per_owner:
                mine = [h for h in self._handles.values() if h.record.owner == owner]
                running = sum(1 for h in mine if h.started)
                raise PoolFull(
                    running=running,
                    queued=held - running,
                    retry_after=self.retry_after,
                    limit="max_generations_per_user",
                )
        generation_id = new_generation_id()
        record = GenerationRecord(
            id=generation_id,
            stream_id=generation_id,
            status="queued",
            provider=provider.name,
            model=request.model,
            request=request.to_json(),
            owner=owner,
            worker_id=self.worker.id,
            created_at=self._creation_time(),
            session_id=session_id,
        )
        self._reserved += 1
        self._hold(owner)
        try:
            await self.store.create_generation(
                record,
                session_write=None if session_write is None else session_write(record.id),
                # Checked again by the store, against every process's generations.
                max_active_per_owner=self.max_per_owner,
            )
        except WriteRejected as exc:
            self._let_go(owner)
            if exc.reason != "max_generations_per_user":
                raise
            raise PoolFull(
                running=0,
                queued=int(exc.detail or 0),
                retry_after=self.retry_after,
                limit="max_generations_per_user",
            ) from exc
        except BaseException:
            self._let_go(owner)
            raise
        finally:
            self._reserved -= 1
        if self._closing:
            self._let_go(owner)
            await self._finish_unstarted(record, "interrupted")
            raise PoolClosed()
        handle = Handle(
            record,
            request,
            GenerationLog(self.store, record.id, record.stream_id, worker_id=self.worker.id),
            after=tuple(after),
            prepare=prepare,
        )
        self._handles[record.id] = handle
        self._tg.start_soon(self._supervise, handle, name=f"generation {record.id}")
        return record

    def _creation_time(self) -> float:
        """Now, but later than any generation this pool created before: the store orders a
        session's generations by creation time (a row's place in its table is not kept)."""
        self._last_created = max(self._clock(), math.nextafter(self._last_created, math.inf))
        return self._last_created

    def _hold(self, owner: str | None) -> None:
        if owner is not None:
            self._per_owner[owner] += 1

    def _let_go(self, owner: str | None) -> None:
        if owner is not None:
            self._per_owner[owner] -= 1
            if self._per_owner[owner] <= 0:
                del self._per_owner[owner]

    async def cancel(
        self, generation_id: str, *, owner: str | None = None, wait: bool = True
    ) -> GenerationRecord:
        """Stop a generation; idempotent. A finished generation is returned unchanged.

        The request is persisted first, so a generation whose process dies before it stops
        is still ended ``cancelled``. Returns the record after the cancel took effect here
        (for a generation another live process runs, once that process notices); with
        ``wait=False``, at once (see ``wait_ended``).
        """
        record = await self.get(generation_id, owner=owner)
        if record.status in TERMINAL_STATUSES:
            return record
        if not await self.store.request_cancel(generation_id, only_if=ACTIVE_STATUSES):
            return await self.store.get_generation(generation_id)  # it finished meanwhile
        handle = self._handles.get(generation_id)
        if handle is not None:
            handle.stop("cancelled")
            if wait:
                with anyio.move_on_after(FINALIZE_TIMEOUT):
                    await handle.done.wait()
        return await self.store.get_generation(generation_id)

    async def get(self, generation_id: str, *, owner: str | None = None) -> GenerationRecord:
        """The committed snapshot; a generation of another owner is reported as not found."""
        record = await self.store.get_generation(generation_id)
        if owner is not None and record.owner != owner:
            raise GenerationNotFound(generation_id)
        return record

    async def locate(self, generation_id: str, *, owner: str | None = None) -> GenerationRecord:
        """Who a generation belongs to and which stream it writes — without its text.

        For a generation this process runs, no query is made; otherwise the committed row is
        read without its text and request (so a thousand readers resuming a long answer do
        not each load it). Use ``get`` for the snapshot (status, text, offsets).
        """
        handle = self._handles.get(generation_id)
        if handle is None:
            record = await self.store.locate_generation(generation_id)
            if owner is not None and record.owner != owner:
                raise GenerationNotFound(generation_id)
            return record
        if owner is not None and handle.record.owner != owner:
            raise GenerationNotFound(generation_id)
        return handle.record

    # -- running ------------------------------------------------------------------------------

    async def _supervise(self, handle: Handle) -> None:
        record = handle.record
        outcome: tuple[FinalStatus, JSONDict | None, JSONDict | None] = ("interrupted", None, None)
        try:
            try:
                with handle.scope:
                    for earlier in handle.after:
                        await self.wait_ended(earlier)
                    await self._slots.acquire(record.owner)  # in turn with other owners
                    try:
                        if handle.prepare is not None:
                            handle.request = await handle.prepare()
                            self.resolve_provider(handle.request)
                            await self.store.update_generation(
                                record.id, {"request": handle.request.to_json()}
                            )
                        handle.started = True
                        with anyio.move_on_after(self._time_left(handle)) as limit:
                            outcome = await self._run(handle)
                        if limit.cancelled_caught:
                            outcome = ("failed", self._deadline_error(), None)
                    finally:
                        self._slots.release()
                if handle.scope.cancelled_caught:
                    outcome = (handle.stop_reason or "interrupted", None, None)
            except Fenced:
                logger.warning(
                    "generation %s was taken over by another worker; stopped here",
                    record.id,
                    extra=log_context(record),
                )
            except Exception as exc:
                logger.exception("generation %s crashed", record.id, extra=log_context(record))
                crash = {"type": "internal_error", "message": f"{type(exc).__name__}: {exc}"}
                outcome = ("failed", crash, None)
            status, error, usage = outcome
            error_type = error.get("type") if error else None
            fenced = False
            with anyio.move_on_after(FINALIZE_TIMEOUT, shield=True) as waited:
                try:
                    await self._finish(handle, status, error=scrub(error), usage=scrub(usage))
                except Fenced:
                    fenced = True  # another worker took it over: its end is theirs to write
                    logger.warning(
                        "generation %s belongs to another worker now; its end was not written",
                        record.id,
                        extra=log_context(record),
                    )
                except Exception:
                    logger.exception("could not record the end of generation %s", record.id)
            # Ended: whoever waits for it (a cancel, a queued successor) goes on now, without
            # waiting for the listeners, which may wait for those very callers' locks.
            self._ended(handle)
            if waited.cancelled_caught:
                # The store keeps retrying the write; the generation ends when it lands.
                logger.error("recording the end of generation %s is still pending", record.id)
            elif not fenced:  # a fenced one ends with its new owner, who counts and tells
                self.stats.finished[status] += 1
                logger.info(
                    "generation %s ended %s",
                    record.id,
                    status,
                    extra={**log_context(record), "status": status, "error_type": error_type},
                )
                await self._notify(record, status)
        finally:
            self._ended(handle)

    def _time_left(self, handle: Handle) -> float:
        """Seconds the generation may still run: ``time_limit`` from its start, or, for a
        continued one, what its first run left of it."""
        if not self.time_limit:
            return math.inf
        if handle.record.continuations:
            return self.time_limit - (self._clock() - handle.record.created_at)
        return self.time_limit

    def _deadline_error(self) -> JSONDict:
        return {
            "type": "deadline_exceeded",
            "message": f"the generation ran longer than its limit of {self.time_limit:g} s",
        }

    def _ended(self, handle: Handle) -> None:
        """Forget a generation that has ended and wake whoever waits for it (once)."""
        if self._handles.pop(handle.record.id, None) is not None:
            self._let_go(handle.record.owner)
            self._recently_ended[handle.record.id] = None
            if len(self._recently_ended) > RECENTLY_ENDED:
                self._recently_ended.popitem(last=False)
        handle.done.set()

    async def _notify(self, record: GenerationRecord, status: FinalStatus) -> None:
        for listener in self._listeners:
            with anyio.move_on_after(FINALIZE_TIMEOUT, shield=True):
                try:
                    await listener(record, status)
                except Exception:
                    logger.exception("a listener failed for generation %s", record.id)

    async def wait_ended(self, generation_id: str) -> None:
        """Until a generation has a terminal status (or no longer exists), whichever process
        runs it."""
        handle = self._handles.get(generation_id)
        if handle is not None:
            await handle.done.wait()
            return
        if generation_id in self._recently_ended:
            return
        while True:  # another process runs it: its row tells when it ends
            try:
                record = await self.store.locate_generation(generation_id)
            except GenerationNotFound:
                return
            if record.status in TERMINAL_STATUSES:
                return
            await anyio.sleep(REMOTE_POLL_INTERVAL)

    async def _run(self, handle: Handle) -> tuple[FinalStatus, JSONDict | None, JSONDict | None]:
        """Stream the provider's answer into the log; return (status, error, usage).

        A transport fault in the middle of the answer (a dropped connection, a stall) is
        continued, where the provider can go on from a prefix, up to ``max_continuations``
        times: the provider is asked again with the text so far as ``run.partial``, and a
        ``resumed`` event marks the seam. Readers see one answer.
        """
        log = handle.log
        record = handle.record
        provider = self.providers[record.provider]
        if handle.partial is None:
            log.add_event(
                status_event("running"),
                fields={"status": "running", "started_at": self._clock()},
            )
        else:
            # The seam: readers see one answer; those that skip unknown events lose nothing.
            log.add_event({"type": "resumed", "continuation": record.continuations})
        sanitizer = TextSanitizer()
        usage: JSONDict | None = None
        pieces = [handle.partial] if handle.partial else []  # the answer so far
        resumed = 0
        while True:
            run = GenerationRun(
                record.id,
                owner=record.owner,
                session_id=record.session_id,
                partial="".join(pieces),
            )
            try:
                # aclosing: whatever ends the loop, the provider's stream (and its upstream
                # connection) is closed now, not whenever the garbage collector gets to it.
                async with aclosing(provider.stream(handle.request, run=run)) as chunks:
                    async for chunk in chunks:
                        if chunk.text:
                            self.stats.chunks += 1
                            text = sanitizer.feed(chunk.text)
                            pieces.append(text)
                            log.add_text(text)
                            if log.error is not None:
                                raise log.error  # refused for good (fenced, say): stop here
                            if log.pending_chars > MAX_UNCOMMITTED_CHARS:
                                await log.wait_for_room(MAX_UNCOMMITTED_CHARS)
                        if chunk.usage is not None:
                            usage = json_object(chunk.usage, "usage")
                        if chunk.state is not None and chunk.state != handle.provider_state:
                            # Kept at once, with the text it came with: a crash must not
                            # lose the conversation the provider has started.
                            handle.provider_state = json_object(chunk.state, "state")
                            log.set_fields({"provider_state": handle.provider_state})
            except ProviderError as exc:
                self.stats.upstream_errors[exc.kind] += 1
                held = sanitizer.flush()
                pieces.append(held)
                log.add_text(held)
                if (
                    exc.kind in CONTINUABLE_FAULTS
                    and any(pieces)
                    and resumed < self.max_continuations
                    and supports_continuation(provider, handle.request)
                ):
                    resumed += 1
                    log.add_event({"type": "resumed", "after": exc.kind})
                    logger.info(
                        "continuing generation %s after %s",
                        record.id,
                        exc.kind,
                        extra=log_context(record),
                    )
                    continue
                return "failed", {"type": exc.kind, "message": exc.message}, usage
            log.add_text(sanitizer.flush())
            return "completed", None, usage

    async def _finish(
        self,
        handle: Handle,
        status: FinalStatus,
        *,
        error: JSONDict | None,
        usage: JSONDict | None,
    ) -> None:
        """Append the final status event, close the stream, update the row: one commit.
        Raises ``Fenced`` once another worker owns the generation (its end is theirs)."""
        if isinstance(handle.log.error, Fenced):
            raise handle.log.error
        if not handle.started:
            await self._finish_unstarted(handle.record, status)
            return
        handle.log.add_event(
            status_event(status, error=error, usage=usage),
            fields={"status": status, "error": error, "usage": usage, "finished_at": self._clock()},
            close=True,
        )
        await handle.log.flush()

    async def _finish_unstarted(self, record: GenerationRecord, status: FinalStatus) -> None:
        await self._end_elsewhere(record.id, status, worker=self.worker.id, orphan=False)
