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
