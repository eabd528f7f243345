"""SessionManager: the rules of conversations — lifecycle, policies, limits, prompts.

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
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import anyio

from store import (
    GenerationRecord,
    NewMessage,
    SessionBackend,
    SessionMessage,
    SessionNotFound,
    SessionRecord,
    SessionSummary,
    SessionWrite,
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

from ._exceptions import LimitExceeded, SessionBusy, SessionClosed
from ._pool import GenerationPool
from ._session_values import (
    Idempotency,
    PostedMessage,
    SessionLimits,
    SessionLock,
    answer_message_id,
    merge_patch,
    new_message_id,
    new_session_id,
)
from .types import ChatMessage, GenerationRequest, fit_history

INTERRUPT_TIMEOUT = 10.0


class SessionManager:
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
        # Only as long as a follower holds the event: one that stops waiting on a session
        # that never changes again must not leave its entry behind.
        self._changed: weakref.WeakValueDictionary[str, anyio.Event] = weakref.WeakValueDictionary()
        self._deleting: set[str] = set()  # sessions a delete is under way for
        pool.on_finished(self._generation_finished)

    def changed(self, session_id: str) -> anyio.Event:
        """Set by the next change to the session in this process (a new generation, a status
        change, deletion). Take it before reading the session; it is then replaced.

        Followers of one session share one event, kept only while one of them holds it.
        """
        event = self._changed.get(session_id)
        if event is None:
            event = self._changed[session_id] = anyio.Event()
        return event

    def _signal(self, session_id: str) -> None:
        event = self._changed.pop(session_id, None)
        if event is not None:
            event.set()

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

    # -- messages -----------------------------------------------------------------------------

    async def post(
        self,
        session_id: str,
        content: str,
        *,
        owner: str | None,
        role: str = "user",
        idempotency_key: str | None = None,
    ) -> PostedMessage:
        """Store a message and, unless the session is paused, start its answer.

        A closed session follows its ``on_closed``; a session with a running generation
        follows its ``on_busy``. Never drops the message silently: it is stored, or an
        error says why not. A request repeating an ``idempotency_key`` gets what the first
        one did (same message, same generation) and changes nothing.
        """
        if not isinstance(content, str) or not content:
            raise ValueError("'content' must be a non-empty string")
        if len(content) > self.limits.message_chars:
            raise LimitExceeded("max_message_chars", self.limits.message_chars, too_large=True)
        async with self._serialised(session_id):
            record = await self.get(session_id, owner=owner)
            replay, idempotency = await self._idempotency(session_id, owner, idempotency_key)
            if replay is not None:
                return replay
            reopened = False
            if record.status == "closed":
                if record.on_closed == "reject":
                    raise SessionClosed(session_id, record.closed_reason)
                if record.on_closed == "new":
                    successor = await self._successor(record)
                    # The message goes to the new session; its own lock is not needed yet,
                    # nobody else knows its id.
                    return await self._post_unlocked(
                        successor, content, role, reopened=False, idempotency=idempotency
                    )
                if record.on_busy == "reject":  # refuse before reopening anything
                    running = await self._running_generation(session_id)
                    if running is not None:
                        raise SessionBusy(session_id, running)
                await self._reopen(
                    session_id, {"status": "active", "closed_reason": None, "closed_at": None}
                )
                record = await self.store.get(session_id)
                reopened = True
            return await self._post_unlocked(
                record, content, role, reopened=reopened, idempotency=idempotency
            )

    async def _idempotency(
        self, session_id: str, owner: str | None, key: str | None
    ) -> tuple[PostedMessage | None, Idempotency | None]:
        """For a request with ``key``: what an earlier one with it got (to answer again),
        or else the record this one leaves behind. ``(None, None)`` without a key."""
        if key is None:
            return None, None
        replay = await self._replay(session_id, owner, key)
        if replay is not None:
            return replay, None
        return None, Idempotency(owner, key, session_id)

    async def _replay(self, session_id: str, owner: str | None, key: str) -> PostedMessage | None:
        earlier = await self.store.recall(owner, key)
        if earlier is None:
            return None
        if earlier["requested_session_id"] != session_id:
            raise ValueError("this Idempotency-Key was already used for another session")
        generation_id = earlier["generation_id"]
        return PostedMessage(
            await self.store.get(earlier["session_id"]),
            earlier["message_id"],
            await self.pool.get(generation_id) if generation_id else None,
            replayed=True,
        )

    async def _post_unlocked(
        self,
        record: SessionRecord,
        content: str,
        role: str,
        *,
        reopened: bool,
        idempotency: Idempotency | None,
    ) -> PostedMessage:
        now = self._clock()
        message_id = new_message_id()
        question = NewMessage(message_id, role, content)

        def write(generation_id: str | None, *, only_if_idle: bool = False) -> SessionWrite:
            """The message (and its answer's placeholder) and the idempotency record."""
            messages = [question]
            if generation_id is not None:
                answer_id = answer_message_id(generation_id)
                messages.append(NewMessage(answer_id, "assistant", generation_id=generation_id))
            kept = None
            if idempotency is not None:
                kept = idempotency.kept(record.id, message_id, generation_id)
            return SessionWrite(
                record.id,
                tuple(messages),
                now=now,
                max_messages=self.limits.messages_per_session,
                only_if_idle=only_if_idle,
                kept=kept,
            )

        if record.status == "paused":
            await self.store.add_messages(write(None))
            return PostedMessage(await self.store.get(record.id), message_id, None, reopened)
        active = await self._active_generations(record.id)
        running = active[-1] if active else None
        after: list[str] = []
        if running is not None:
            if record.on_busy == "reject":
                raise SessionBusy(record.id, running)
            if record.on_busy == "interrupt":
                # Ask it to stop, and answer once it has: not waited for here, under the
                # session's lock, however long its provider takes to let go.
                await self.pool.cancel(running, wait=False)
            # The new answer waits (queued) until every answer before it has ended (one
            # queued and cancelled may end before the one it waited for), and has them in
            # its history.
            after = active

        async def prepare() -> GenerationRequest:
            return await self._request(record.id, message_id, content, role)

        try:
            generation = await self.pool.submit(
                GenerationRequest((ChatMessage(role, content),)),
                owner=record.owner,
                session_id=record.id,
                # With nothing to wait for, nothing else may be running now.
                session_write=lambda generation_id: write(generation_id, only_if_idle=not after),
                after=after,
                prepare=prepare,
            )
        except WriteRejected as exc:  # another process started an answer meanwhile
            raise SessionBusy(record.id, exc.detail or "?") from None
        self._signal(record.id)
        return PostedMessage(await self.store.get(record.id), message_id, generation, reopened)

    async def regenerate(
        self, session_id: str, *, owner: str | None, idempotency_key: str | None = None
    ) -> PostedMessage:
        """Replace the session's last answer with a new answer to its last user message.

        The last message, if it is an answer, leaves the history (its generation stays in the
        log; if still running it is cancelled, and the new answer waits for it to end); no
        message is added but the new answer's. A closed session reopens only if its
        ``on_closed`` is "reopen" (``SessionClosed`` otherwise). ``ValueError`` in a paused
        session or one with no user message to answer. ``idempotency_key`` as for ``post``.
        """
        async with self._serialised(session_id):
            record = await self.get(session_id, owner=owner)
            replay, idempotency = await self._idempotency(session_id, owner, idempotency_key)
            if replay is not None:
                return replay
            reopened = record.status == "closed"
            if record.status == "paused":
                raise ValueError("the session is paused: set it active to answer in it")
            if reopened and record.on_closed != "reopen":
                raise SessionClosed(session_id, record.closed_reason)
            question = next(
                (m for m in reversed(await self.store.messages(session_id)) if m.role == "user"),
                None,
            )
            if question is None:
                raise ValueError("the session has no user message to answer")
            if reopened:
                await self._reopen(
                    session_id, {"status": "active", "closed_reason": None, "closed_at": None}
                )
            active = await self._active_generations(session_id)
            running = active[-1] if active else None
            if running is not None:
                await self.pool.cancel(running, wait=False)  # it is being replaced
            now = self._clock()

            def write(generation_id: str) -> SessionWrite:
                """The new answer in the old one's place, and the idempotency record."""
                answer = NewMessage(
                    answer_message_id(generation_id), "assistant", generation_id=generation_id
                )
                kept = None
                if idempotency is not None:
                    kept = idempotency.kept(session_id, question.id, generation_id)
                return SessionWrite(
                    session_id,
                    (answer,),
                    now=now,
                    max_messages=self.limits.messages_per_session,
                    only_if_idle=running is None,
                    replace_answer=True,
                    kept=kept,
                )

            async def prepare() -> GenerationRequest:
                return await self._request(session_id, question.id, question.content, "user")

            try:
                generation = await self.pool.submit(
                    GenerationRequest((ChatMessage("user", question.content),)),
                    owner=record.owner,
                    session_id=session_id,
                    session_write=write,
                    after=active,
                    prepare=prepare,
                )
            except WriteRejected as exc:  # another process started an answer meanwhile
                raise SessionBusy(session_id, exc.detail or "?") from None
            self._signal(session_id)
            return PostedMessage(
                await self.store.get(session_id), question.id, generation, reopened
            )

    async def active_generation(self, session_id: str, *, owner: str | None) -> str | None:
        """The id of the session's queued or running generation (the newest), if any."""
        await self.get(session_id, owner=owner)
        return await self._running_generation(session_id)

    async def _successor(self, record: SessionRecord) -> SessionRecord:
        """The fresh session a message to a closed ``on_closed="new"`` session opens."""
        now = self._clock()
        successor = SessionRecord(
            id=new_session_id(),
            owner=record.owner,
            title=record.title,
            status="active",
            on_closed=record.on_closed,
            on_busy=record.on_busy,
            created_at=now,
            updated_at=now,
            last_activity_at=now,
            context=record.context,
            keep_open=record.keep_open,
            close_on_complete=record.close_on_complete,
            previous_session_id=record.id,
        )
        await self._create(successor)
        return successor

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

    async def _request(
        self, session_id: str, message_id: str, content: str, role: str
    ) -> GenerationRequest:
        """The request that answers ``message_id``: the most recent history before it that
        fits ``history_chars``, then the message itself; and what the provider kept from the
        answer before."""
        stored = await self.store.messages(session_id)
        position = next((i for i, m in enumerate(stored) if m.id == message_id), len(stored))
        before = stored[:position]
        history = [  # an answer that has not produced text yet is left out
            ChatMessage(m.role, m.content) for m in before if m.content
        ]
        budget = self.limits.history_chars - len(content)
        return GenerationRequest(
            (*fit_history(history, budget), ChatMessage(role, content)),
            provider_state=await self._provider_state(session_id, before),
        )

    async def _provider_state(self, session_id: str, before: list[SessionMessage]) -> JSONDict:
        """What the provider kept from its newest answer in the session (see
        ``ProviderChunk.state``), with ``unheard``: how many messages of the history came
        after that answer (the provider's side has not heard them: an answer that failed
        before reaching it, a message posted while paused). Nothing when that answer is no
        longer in the history (it was regenerated: the provider's side holds an answer the
        user discarded) — the provider then starts afresh from the history."""
        provider = self.pool.providers.get(self.pool.default_provider)
        if provider is None:
            return {}
        found = await self.store.provider_state(session_id, provider.name)
        if found is None:
            return {}
        generation_id, state = found
        where = next((i for i, m in enumerate(before) if m.generation_id == generation_id), None)
        if where is None:
            return {}
        return {**state, "unheard": sum(1 for m in before[where + 1 :] if m.content)}

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
