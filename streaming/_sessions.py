"""SessionManager: the rules of conversations — lifecycle, policies, limits (posting and
regenerating, and the prompts, are its ``Conversations`` half, in ``_conversation.py``).

What existing chat systems get wrong, and what this module promises instead:

* switching away never stops an answer (generations belong to the pool, not to a client);
* a message is never silently dropped: a closed session follows ``on_closed`` (reopen, start
  a linked new session, or reject with an error), a paused one stores it;
* finishing a generation never closes its session unless ``close_on_complete`` is set;
* one generation at a time per session; a second message follows ``on_busy`` (reject it,
  queue it after the running one, or interrupt the running one), and concurrent requests on
  one session are serialised;
* history, context and the number of open sessions are bounded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from store import (
    ChangeEvents,
    GenerationRecord,
    SessionBackend,
    SessionMessage,
    SessionNotFound,
    SessionRecord,
    SessionSummary,
    WriteRejected,
)
from store.types import (
    ACTIVE_STATUSES,
    ON_BUSY,
    ON_CLOSED,
    SESSION_STATUSES,
    FinalStatus,
    JSONDict,
)

from ._conversation import Conversations
from ._exceptions import LimitExceeded
from ._pool import GenerationPool
from ._session_values import (
    SessionLimits,
    SessionLock,
    merge_patch,
    new_session_id,
)

INTERRUPT_TIMEOUT = 10.0


class SessionManager(Conversations):
    """Sessions for owners, on a ``SessionBackend`` and a ``GenerationPool``.

    Every method takes the caller's ``owner``; a session of another owner is reported as not
    found, exactly like a missing one.
    """

    def __init__(
        self,
        store: SessionBackend,
        pool: GenerationPool,
        *,
        limits: SessionLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.pool = pool
        self.limits = limits or SessionLimits()
        self._clock = clock
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}
        self._changed = ChangeEvents()  # per session, only while a follower holds one
        self._deleting: set[str] = set()  # sessions a delete is under way for
        pool.on_finished(self._generation_finished)

    def changed(self, session_id: str) -> anyio.Event:
        """Set by the next change to the session in this process (a new generation, a status
        change, deletion). Take it before reading the session; it is then replaced.

        Followers of one session share one event, kept only while one of them holds it.
        """
        return self._changed.event(session_id)

    def _signal(self, session_id: str) -> None:
        self._changed.wake([session_id])

    # -- sessions -----------------------------------------------------------------------------

    async def create(self, owner: str | None, settings: Mapping[str, Any]) -> SessionRecord:
        """Open a new session. ``settings``: title, context, keep_open, on_closed, on_busy,
        close_on_complete (all optional). Raises ``ValueError`` or ``LimitExceeded``."""
        record = self._new_record(new_session_id(), owner, settings)
        await self._create(record)
        return record

    async def get_or_create(
        self, session_id: str, *, owner: str | None, settings: Mapping[str, Any]
    ) -> SessionRecord:
        """The session ``session_id`` of ``owner``, created with ``settings`` (as for
        ``create``) if it does not exist yet — once, however many callers race. Raises
        ``SessionNotFound`` if the id is another owner's, ``LimitExceeded`` when creating
        would pass the open-session limit."""
        try:
            return await self.get(session_id, owner=owner)
        except SessionNotFound:
            if session_id in self._deleting:
                raise
        record = self._new_record(session_id, owner, settings)
        try:
            await self.store.create_if_absent(record, max_open=self.limits.active_sessions_per_user)
        except WriteRejected:
            raise self._too_many_open() from None
        return await self.get(session_id, owner=owner)

    def _new_record(
        self, session_id: str, owner: str | None, settings: Mapping[str, Any]
    ) -> SessionRecord:
        values = self._validated(settings, creating=True)
        self._check_context(values.setdefault("context", {}))
        now = self._clock()
        return SessionRecord(
            id=session_id,
            owner=owner,
            title=values.get("title", ""),
            status="active",
            on_closed=values.get("on_closed", "reopen"),
            on_busy=values.get("on_busy", "reject"),
            created_at=now,
            updated_at=now,
            last_activity_at=now,
            context=values.get("context", {}),
            keep_open=values.get("keep_open", False),
            close_on_complete=values.get("close_on_complete", False),
        )

    async def _create(self, record: SessionRecord) -> None:
        """Insert a session within the owner's open-session limit (checked atomically)."""
        try:
            await self.store.create(record, max_open=self.limits.active_sessions_per_user)
        except WriteRejected:
            raise self._too_many_open() from None

    async def _reopen(self, session_id: str, fields: JSONDict) -> None:
        """Apply ``fields`` that open a closed session, within the open-session limit."""
        try:
            await self.store.update(
                session_id, fields, max_open=self.limits.active_sessions_per_user
            )
        except WriteRejected:
            raise self._too_many_open() from None

    def _too_many_open(self) -> LimitExceeded:
        return LimitExceeded("max_sessions_per_user", self.limits.active_sessions_per_user)

    async def get(self, session_id: str, *, owner: str | None) -> SessionRecord:
        """A session of ``owner``. Raises ``SessionNotFound`` (also for another's, and for
        one being deleted)."""
        if session_id in self._deleting:
            raise SessionNotFound(session_id)
        record = await self.store.get(session_id)
        if record.owner != owner:
            raise SessionNotFound(session_id)
        return record

    async def list_for(
        self, *, owner: str | None, status: str | None = None, limit: int = 100
    ) -> list[SessionSummary]:
        """An owner's sessions, most recent activity first."""
        if status is not None and status not in SESSION_STATUSES:
            raise ValueError(f"status must be one of {', '.join(SESSION_STATUSES)}")
        return await self.store.list_for(owner, status=status, limit=limit)

    async def messages(self, session_id: str, *, owner: str | None) -> list[SessionMessage]:
        """A session's stored messages, oldest first (an answer in progress shows its text)."""
        await self.get(session_id, owner=owner)
        return await self.store.messages(session_id)

    async def update(
        self, session_id: str, changes: Mapping[str, Any], *, owner: str | None, merge: bool
    ) -> SessionRecord:
        """Change title, context, status, keep_open or a policy.

        With ``merge``, ``changes["context"]`` is an RFC 7396 merge patch of the context;
        otherwise it replaces it. Closing sets ``closed_reason`` "user"; reopening clears it.
        """
        async with self._serialised(session_id):
            record = await self.get(session_id, owner=owner)
            values = self._validated(changes, creating=False)
            if "context" in values:
                if merge:
                    values["context"] = merge_patch(record.context, values["context"])
                self._check_context(values["context"])
            now = self._clock()
            fields: JSONDict = {**values, "updated_at": now}
            status = values.get("status")
            if status is not None and status != record.status:
                fields["closed_reason"] = "user" if status == "closed" else None
                fields["closed_at"] = now if status == "closed" else None
            if record.status == "closed" and status in ("active", "paused"):
                await self._reopen(session_id, fields)
            else:
                await self.store.update(session_id, fields)
            self._signal(session_id)
            return await self.store.get(session_id)

    async def delete(self, session_id: str, *, owner: str | None) -> None:
        """Cancel the session's running generation, then delete it and all it holds.

        The session answers "not found" from the moment this starts. Waiting for its answer
        to stop happens without the session's lock, so nothing else queues behind it.
        """
        async with self._serialised(session_id):
            await self.get(session_id, owner=owner)
            self._deleting.add(session_id)
        try:
            active = [
                generation_id
                for generation_id, status in await self.store.generations(session_id)
                if status in ACTIVE_STATUSES
            ]
            for generation_id in active:
                await self.pool.cancel(generation_id, wait=False)
            with anyio.move_on_after(INTERRUPT_TIMEOUT):
                for generation_id in active:
                    await self.pool.wait_ended(generation_id)
            async with self._serialised(session_id):
                await self.store.delete(session_id)
                self._signal(session_id)
        finally:
            self._deleting.discard(session_id)

    async def _generation_finished(self, generation: GenerationRecord, status: FinalStatus) -> None:
        """``close_on_complete``: a completed answer closes its session — only when asked."""
        if generation.session_id is None or status != "completed":
            return
        async with self._serialised(generation.session_id):
            try:
                record = await self.store.get(generation.session_id)
            except SessionNotFound:
                return
            if record.close_on_complete and record.status != "closed":
                if await self._running_generation(record.id) is None:  # nothing queued
                    await self._close(record.id, "completed")

    async def sweep(self) -> tuple[int, int]:
        """Close sessions idle past ``idle_timeout`` (not ``keep_open``, nothing running);
        with ``auto_clean``, delete those closed longer than ``retention``.

        Returns (closed, deleted). The pool runs this periodically; tests call it with a
        controlled clock.
        """
        now = self._clock()
        closed = deleted = 0
        for session_id in await self.store.idle(before=now - self.limits.idle_timeout):
            async with self._serialised(session_id):
                if await self._running_generation(session_id) is not None:
                    continue
                record = await self.store.get(session_id)
                if record.status != "closed" and not record.keep_open:
                    await self._close(session_id, "expired")
                    closed += 1
        if self.limits.auto_clean:
            for session_id in await self.store.closed_before(now - self.limits.retention):
                async with self._serialised(session_id):
                    await self.store.delete(session_id)
                    self._signal(session_id)
                    deleted += 1
        return closed, deleted

    async def _close(self, session_id: str, reason: str) -> None:
        now = self._clock()
        await self.store.update(
            session_id,
            {"status": "closed", "closed_reason": reason, "closed_at": now, "updated_at": now},
        )
        self._signal(session_id)

    async def active_generation(self, session_id: str, *, owner: str | None) -> str | None:
        """The id of the session's queued or running generation (the newest), if any."""
        await self.get(session_id, owner=owner)
        return await self._running_generation(session_id)

    async def _running_generation(self, session_id: str) -> str | None:
        """The session's newest queued or running generation, if any."""
        active = await self._active_generations(session_id)
        return active[-1] if active else None

    async def _active_generations(self, session_id: str) -> list[str]:
        """The session's queued and running generations, oldest first."""
        return [
            generation_id
            for generation_id, status in await self.store.generations(session_id)
            if status in ACTIVE_STATUSES
        ]

    # -- checks -------------------------------------------------------------------------------

    def _check_context(self, context: Any) -> None:
        if not isinstance(context, dict):
            raise ValueError("'context' must be a JSON object")
        size = len(json.dumps(context, ensure_ascii=False).encode())
        if size > self.limits.context_bytes:
            raise LimitExceeded("max_context_bytes", self.limits.context_bytes, too_large=True)

    def _validated(self, settings: Mapping[str, Any], *, creating: bool) -> JSONDict:
        allowed = {"title", "context", "keep_open", "on_closed", "on_busy", "close_on_complete"}
        if not creating:
            allowed.add("status")
        unknown = set(settings) - allowed
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
        values: JSONDict = dict(settings)
        if "title" in values and not isinstance(values["title"], str):
            raise ValueError("'title' must be a string")
        for flag in ("keep_open", "close_on_complete"):
            if flag in values and not isinstance(values[flag], bool):
                raise ValueError(f"'{flag}' must be a boolean")
        if values.get("on_closed", "reopen") not in ON_CLOSED:
            raise ValueError(f"'on_closed' must be one of {', '.join(ON_CLOSED)}")
        if values.get("on_busy", "reject") not in ON_BUSY:
            raise ValueError(f"'on_busy' must be one of {', '.join(ON_BUSY)}")
        if values.get("status", "active") not in SESSION_STATUSES:
            raise ValueError(f"'status' must be one of {', '.join(SESSION_STATUSES)}")
        return values

    def _serialised(self, session_id: str) -> SessionLock:
        return SessionLock(self._locks, session_id)
