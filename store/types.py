"""Value types shared by the store and its users."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

JSONDict = dict[str, Any]
Synchronous = Literal["NORMAL", "FULL"]

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled", "interrupted"})


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed: its messages hold offsets ``first_offset`` .. ``next_offset - 1``."""

    first_offset: int
    next_offset: int


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Messages read from ``offset`` on.

    ``at_end`` is true when the stream is closed and these messages are its last ones:
    nothing will ever follow ``next_offset``.
    """

    offset: int
    messages: list[bytes]
    at_end: bool

    @property
    def next_offset(self) -> int:
        """The offset after the last message returned."""
        return self.offset + len(self.messages)


@dataclass(slots=True)
class AppendBatch:
    """What an append source hands the writer at one flush.

    ``payloads`` become consecutive messages; ``generation_id`` names a generation whose
    snapshot row is updated in the same transaction (``text`` appended, ``next_offset`` set,
    ``fields`` assigned); ``close`` closes the stream after these messages.
    """

    payloads: list[bytes]
    generation_id: str | None = None
    text: str = ""
    fields: JSONDict = field(default_factory=dict)
    close: bool = False


@dataclass(slots=True)
class GenerationRecord:
    """One generation's snapshot row: what it was asked, where it stands, what it said so far."""

    id: str
    stream_id: str
    status: str
    provider: str
    model: str | None = None
    request: JSONDict = field(default_factory=dict)
    owner: str | None = None
    text: str = ""
    next_offset: int = 0
    error: JSONDict | None = None
    usage: JSONDict | None = None
    cancel_requested: bool = False
    worker_id: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    session_id: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GenerationRecord:
        """Build a record from a ``generations`` row."""
        return cls(
            id=row["id"],
            stream_id=row["stream_id"],
            status=row["status"],
            provider=row["provider"],
            model=row["model"],
            request=json.loads(row["request"]) if row["request"] else {},
            owner=row["owner"],
            text=row["text"],
            next_offset=row["next_offset"],
            error=json.loads(row["error"]) if row["error"] else None,
            usage=json.loads(row["usage"]) if row["usage"] else None,
            cancel_requested=bool(row["cancel_requested"]),
            worker_id=row["worker_id"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            session_id=row["session_id"],
        )

    def to_row(self) -> JSONDict:
        """The record as a ``generations`` row."""
        return {
            "id": self.id,
            "stream_id": self.stream_id,
            "status": self.status,
            "provider": self.provider,
            "model": self.model,
            "request": json.dumps(self.request),
            "owner": self.owner,
            "text": self.text,
            "next_offset": self.next_offset,
            "error": json.dumps(self.error) if self.error is not None else None,
            "usage": json.dumps(self.usage) if self.usage is not None else None,
            "cancel_requested": int(self.cancel_requested),
            "worker_id": self.worker_id,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "session_id": self.session_id,
        }


@dataclass(frozen=True, slots=True)
class ActiveGeneration:
    """The little the pool's sweeps need to know of an unfinished generation."""

    id: str
    worker_id: str | None
    cancel_requested: bool


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A server process that has used the database: who it is and when it last said so."""

    id: str
    hostname: str
    pid: int
    started_at: float
    heartbeat_at: float


JSON_FIELDS = frozenset({"request", "error", "usage"})


def encode_field(name: str, value: Any) -> Any:
    """Encode one generation field for its column (JSON columns as text, bools as ints)."""
    if name in JSON_FIELDS:
        return json.dumps(value) if value is not None else None
    if isinstance(value, bool):
        return int(value)
    return value


SESSION_STATUSES = ("active", "paused", "closed")


@dataclass(slots=True)
class SessionRecord:
    """A conversation: who owns it, where it stands, its context and its policies."""

    id: str
    owner: str | None
    title: str
    status: str
    on_closed: str
    on_busy: str
    created_at: float
    updated_at: float
    last_activity_at: float
    context: JSONDict = field(default_factory=dict)
    keep_open: bool = False
    close_on_complete: bool = False
    closed_reason: str | None = None
    closed_at: float | None = None
    previous_session_id: str | None = None
    message_count: int = 0
    trimmed_messages: int = 0
    next_seq: int = 0

    @classmethod
    def blank(cls, session_id: str) -> SessionRecord:
        """An empty record (for the column list)."""
        return cls(session_id, None, "", "active", "reopen", "reject", 0.0, 0.0, 0.0)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SessionRecord:
        """Build a record from a ``sessions`` row."""
        return cls(
            id=row["id"],
            owner=row["owner"],
            title=row["title"],
            status=row["status"],
            on_closed=row["on_closed"],
            on_busy=row["on_busy"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            last_activity_at=row["last_activity_at"],
            context=json.loads(row["context"]),
            keep_open=bool(row["keep_open"]),
            close_on_complete=bool(row["close_on_complete"]),
            closed_reason=row["closed_reason"],
            closed_at=row["closed_at"],
            previous_session_id=row["previous_session_id"],
            message_count=row["message_count"],
            trimmed_messages=row["trimmed_messages"],
            next_seq=row["next_seq"],
        )

    def to_row(self) -> JSONDict:
        """The record as a ``sessions`` row."""
        return {
            "id": self.id,
            "owner": self.owner,
            "title": self.title,
            "status": self.status,
            "closed_reason": self.closed_reason,
            "context": json.dumps(self.context),
            "keep_open": int(self.keep_open),
            "on_closed": self.on_closed,
            "on_busy": self.on_busy,
            "close_on_complete": int(self.close_on_complete),
            "previous_session_id": self.previous_session_id,
            "message_count": self.message_count,
            "trimmed_messages": self.trimmed_messages,
            "next_seq": self.next_seq,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "last_activity_at": self.last_activity_at,
            "closed_at": self.closed_at,
        }


@dataclass(frozen=True, slots=True)
class SessionMessage:
    """One message of a session; an assistant message's text is its generation's so far."""

    id: str
    seq: int
    role: str
    content: str
    generation_id: str | None
    generation_status: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class SessionSummary:
    """A session as a list shows it: the record and its newest generation."""

    session: SessionRecord
    latest_generation_id: str | None
    latest_generation_status: str | None
