"""RedisSessionStore: sessions, their messages and kept responses on the Redis store
(``SessionBackend``); every check-and-write is one of ``_lua``'s scripts."""

from __future__ import annotations

import json
from typing import Any

from .._exceptions import SessionNotFound
from ..types import (
    TERMINAL_STATUSES,
    JSONDict,
    SessionMessage,
    SessionRecord,
    SessionSummary,
    SessionWrite,
)
from ._base import call_token, unavailable_on_error
from ._codec import check, dumps, field_pairs, record_from_hash, session_write_args
from ._codec import names as names_of
from ._store import RedisStore

_SESSION_FIELDS = tuple(SessionRecord.blank("").to_row())


def generation_ids(members: Any) -> list[str]:
    """The generation ids of ``sg:<session>`` members (``<seq>:<id>``)."""
    return [member.decode().split(":", 1)[1] for member in members]


class RedisSessionStore:
    """Sessions and their messages, on the same Redis (and in the same scripts) as the
    generations they start."""

    def __init__(self, streams: RedisStore) -> None:
        self.streams = streams

    @property
    def _p(self) -> str:
        return self.streams.prefix

    async def _create(self, record: SessionRecord, max_open: int | None, if_absent: bool) -> bool:
        pairs = field_pairs({name: getattr(record, name) for name in _SESSION_FIELDS})
        reply = await self.streams.run(
            self.streams.scripts.create_session,
            record.id,
            dumps(record.owner),
            -1 if max_open is None else max_open,
            int(if_absent),
            call_token(),
            len(pairs) // 2,
            *pairs,
        )
        return bool(check(reply, record.id))

    async def create(self, record: SessionRecord, *, max_open: int | None = None) -> None:
        """Insert a session (while its owner has fewer than ``max_open`` open ones)."""
        await self._create(record, max_open, False)

    async def create_if_absent(self, record: SessionRecord, *, max_open: int | None = None) -> bool:
        """Insert ``record`` unless its id exists; whether it did."""
        return await self._create(record, max_open, True)

    async def get(self, session_id: str) -> SessionRecord:
        """A session. Raises ``SessionNotFound``."""
        with unavailable_on_error():
            values = await self.streams.client.hgetall(self._p + "S:" + session_id)
        if not values:
            raise SessionNotFound(session_id)
        return record_from_hash(SessionRecord, values)

    async def update(
        self, session_id: str, fields: JSONDict, *, max_open: int | None = None
    ) -> None:
        """Set fields of a session (with ``max_open``: only while its owner has fewer other
        open sessions). Raises ``SessionNotFound``."""
        names = sorted(fields)
        if not names or set(names) - set(_SESSION_FIELDS) or "id" in fields:
            raise ValueError(f"cannot set session fields {names}")
        pairs = field_pairs(fields)
        reply = await self.streams.run(
            self.streams.scripts.update_session,
            session_id,
            -1 if max_open is None else max_open,
            len(pairs) // 2,
            *pairs,
        )
        check(reply, session_id)

    async def delete(self, session_id: str) -> None:
        """Delete a session, its messages, kept responses, generations and their streams."""
        reply = await self.streams.run(
            self.streams.scripts.delete_session, self.streams.node_id, session_id
        )
        self.streams.wake(names_of(check(reply, session_id)))

    async def add_messages(self, write: SessionWrite) -> None:
        """Apply a session write on its own."""
        reply = await self.streams.run(
            self.streams.scripts.session_write, *session_write_args(write)
        )
        check(reply, write.session_id)

    async def messages(self, session_id: str) -> list[SessionMessage]:
        """The stored messages, oldest first; an answer's text is its generation's snapshot."""
        reply = await self.streams.run(self.streams.scripts.messages, session_id)
        messages = []
        for entry, status, text in zip(reply[::3], reply[1::3], reply[2::3], strict=True):
            m = json.loads(entry)
            content = m["content"] if m["content"] is not None else text.decode()
            messages.append(
                SessionMessage(
                    m["id"],
                    m["seq"],
                    m["role"],
                    content,
                    m["generation_id"],
                    json.loads(status) if status else None,
                    m["created_at"],
                )
            )
        return messages

    async def _generation_fields(
        self, session_id: str, fields: list[str]
    ) -> list[tuple[str, list[object]]]:
        """``(id, [fields…])`` of a session's generations, oldest first."""
        client = self.streams.client
        with unavailable_on_error():
            ids = generation_ids(await client.zrange(self._p + "sg:" + session_id, 0, -1))
            async with client.pipeline(transaction=False) as pipe:
                for gid in ids:
                    pipe.hmget(self._p + "g:" + gid, fields)
                rows = await pipe.execute()
        return [
            (gid, [json.loads(v) if v is not None else None for v in row])
            for gid, row in zip(ids, rows, strict=True)
            if row[0] is not None
        ]

    async def generations(self, session_id: str) -> list[tuple[str, str]]:
        """``(id, status)`` of a session's generations, oldest first."""
        return [
            (gid, str(f[0])) for gid, f in await self._generation_fields(session_id, ["status"])
        ]

    async def provider_state(self, session_id: str, provider: str) -> tuple[str, JSONDict] | None:
        """The newest ended generation on ``provider`` that kept a state, and that state."""
        rows = await self._generation_fields(session_id, ["status", "provider", "provider_state"])
        for gid, (status, name, state) in reversed(rows):
            if status in TERMINAL_STATUSES and name == provider and isinstance(state, dict):
                return gid, state
        return None

    async def list_for(
        self, owner: str | None, *, status: str | None = None, limit: int = 100
    ) -> list[SessionSummary]:
        """An owner's sessions, newest activity first (ties by id), with their newest
        generation."""
        client = self.streams.client
        with unavailable_on_error():
            scored: Any = await client.zrange(
                self._p + "os:" + dumps(owner), 0, -1, withscores=True
            )
            ordered = [sid.decode() for sid, _ in sorted(scored, key=lambda e: (-e[1], e[0]))]
            summaries: list[SessionSummary] = []
            for start in range(0, len(ordered), max(limit, 16)):
                page = ordered[start : start + max(limit, 16)]
                async with client.pipeline(transaction=False) as pipe:
                    for sid in page:
                        pipe.hgetall(self._p + "S:" + sid)
                        pipe.zrange(self._p + "sg:" + sid, -1, -1)
                    replies = await pipe.execute()
                wanted: list[tuple[SessionRecord, str | None]] = []
                for values, latest in zip(replies[::2], replies[1::2], strict=True):
                    if not values:
                        continue
                    record = record_from_hash(SessionRecord, values)
                    if status is None or record.status == status:
                        wanted.append((record, generation_ids(latest)[0] if latest else None))
                wanted = wanted[: limit - len(summaries)]
                summaries += await self._summaries(wanted)
                if len(summaries) == limit:
                    break
        return summaries

    async def _summaries(
        self, sessions: list[tuple[SessionRecord, str | None]]
    ) -> list[SessionSummary]:
        """Each session with its newest generation's status (one round trip for all)."""
        async with self.streams.client.pipeline(transaction=False) as pipe:
            for _, gid in sessions:
                if gid is not None:
                    pipe.hget(self._p + "g:" + gid, "status")
            statuses = iter(await pipe.execute())
        summaries = []
        for record, gid in sessions:
            raw = next(statuses) if gid is not None else None
            summaries.append(SessionSummary(record, gid, json.loads(raw) if raw else None))
        return summaries

    async def idle(self, *, before: float, limit: int = 1000) -> list[str]:
        """Open sessions (not kept open) without activity since ``before``."""
        with unavailable_on_error():
            ids = await self.streams.client.zrangebyscore(
                self._p + "idle", "-inf", f"({before!r}", start=0, num=limit
            )
        return names_of(ids)

    async def closed_before(self, before: float, *, limit: int = 1000) -> list[str]:
        """Sessions closed before ``before``."""
        with unavailable_on_error():
            ids = await self.streams.client.zrangebyscore(
                self._p + "closed", "-inf", f"({before!r}", start=0, num=limit
            )
        return names_of(ids)

    async def recall(self, owner: str | None, key: str) -> JSONDict | None:
        """The response kept for an idempotency key."""
        with unavailable_on_error():
            raw = await self.streams.client.hget(self._p + "keys", f"{owner or ''}\n{key}")
        if raw is None:
            return None
        response: JSONDict = json.loads(raw)
        return response
