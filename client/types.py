"""The client's public types: snapshots the server answers, and the events a follow yields.

Snapshots are frozen msgspec Structs decoded from the server's JSON; fields the server adds
later are ignored, and statuses are plain strings, so a newer server never breaks an older
client.
"""

from __future__ import annotations

from typing import Any, TypeAlias, TypedDict

import msgspec

JSONDict: TypeAlias = dict[str, Any]

#: The statuses a generation ends in; its last event is a ``Status`` with one of them.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "interrupted"})


class ChatMessage(TypedDict):
    """One message of a conversation sent to ``start_generation(messages=...)``."""

    role: str
    content: str


# -- events ------------------------------------------------------------------------------------


class Delta(msgspec.Struct, frozen=True):
    """More text of generation ``generation_id``. ``offset`` is the stream offset after this
    event: a follow resumed from it yields what came after."""

    text: str
    offset: int
    generation_id: str


class Status(msgspec.Struct, frozen=True):
    """Generation ``generation_id`` changed status; a terminal one (``completed``,
    ``failed``, ``cancelled``, ``interrupted``) is its last event and carries ``usage`` or
    ``error``. ``offset`` is the stream offset after this event."""

    status: str
    usage: JSONDict | None
    error: JSONDict | None
    offset: int
    generation_id: str

    @property
    def terminal(self) -> bool:
        """Whether this is the generation's final event."""
        return self.status in TERMINAL_STATUSES


Event: TypeAlias = Delta | Status


# -- snapshots ---------------------------------------------------------------------------------


class Generation(msgspec.Struct, frozen=True, kw_only=True):
    """A generation's snapshot: its status, its text so far, and ``next_offset``, the offset
    to follow from to get what comes after that text."""

    id: str
    status: str
    provider: str
    model: str | None
    text: str
    next_offset: int
    error: JSONDict | None
    usage: JSONDict | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    url: str
    events_url: str
    object: str = "generation"

    @property
    def terminal(self) -> bool:
        """Whether the generation has ended (its text is final)."""
        return self.status in TERMINAL_STATUSES


class Session(msgspec.Struct, frozen=True, kw_only=True):
    """A conversation's settings and state."""

    id: str
    title: str
    status: str
    closed_reason: str | None
    context: JSONDict
    keep_open: bool
    on_closed: str
    on_busy: str
    close_on_complete: bool
    previous_session_id: str | None
    message_count: int
    trimmed_messages: int
    created_at: float
    updated_at: float
    last_activity_at: float
    closed_at: float | None
    url: str
    object: str = "session"


class SessionMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A stored message; an assistant message in progress shows its text so far."""

    id: str
    role: str
    content: str | None
    generation_id: str | None
    generation_status: str | None
    created_at: float


class SessionWithMessages(Session, frozen=True, kw_only=True):
    """A session with its messages, oldest first."""

    messages: list[SessionMessage]


class PostedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """What sending a message did: the session that took it (a new one with
    ``on_closed="new"``), the message, and the generation answering it (``None`` while the
    session is paused). ``replayed`` is true when an ``Idempotency-Key`` matched an earlier
    request, which this answer repeats."""

    session: Session
    session_id: str
    message_id: str
    generation: Generation | None
    generation_id: str | None
    reopened: bool
    replayed: bool
