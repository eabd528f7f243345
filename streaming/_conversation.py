"""The conversation half of ``SessionManager``: posting a message and regenerating an answer
under the session's policies (``on_closed``, ``on_busy``), idempotency keys, and the prompt
an answer is asked with (the history that fits, and what the provider kept)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from store import (
    NewMessage,
    SessionBackend,
    SessionMessage,
    SessionRecord,
    SessionWrite,
    WriteRejected,
)
from store.types import JSONDict

from ._exceptions import LimitExceeded, SessionBusy, SessionClosed
from ._pool import GenerationPool
from ._session_values import (
    Idempotency,
    PostedMessage,
    SessionLimits,
    SessionLock,
    answer_message_id,
    new_message_id,
    new_session_id,
)
from .types import ChatMessage, GenerationRequest, fit_history


class Conversations(ABC):
    """Messages and answers in sessions; ``SessionManager`` is one (these are its methods,
    kept apart by job), and gives what the abstract members name."""

    store: SessionBackend
    pool: GenerationPool
    limits: SessionLimits
    _clock: Callable[[], float]

    @abstractmethod
    async def get(self, session_id: str, *, owner: str | None) -> SessionRecord:
        """A session of ``owner``."""

    @abstractmethod
    async def _create(self, record: SessionRecord) -> None:
        """Insert a new session within the owner's limit of open ones."""

    @abstractmethod
    async def _reopen(self, session_id: str, fields: JSONDict) -> None:
        """Reopen a closed session within the owner's limit of open ones."""

    @abstractmethod
    def _signal(self, session_id: str) -> None:
        """Wake the session's followers in this process."""

    @abstractmethod
    def _serialised(self, session_id: str) -> SessionLock:
        """The session's lock (requests on one session one at a time)."""

    @abstractmethod
    async def _running_generation(self, session_id: str) -> str | None:
        """The session's newest queued or running generation."""

    @abstractmethod
    async def _active_generations(self, session_id: str) -> list[str]:
        """The session's queued and running generations, oldest first."""

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
