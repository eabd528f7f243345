"""Value types shared by the store and its users."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, TypeVar, get_args

JSONDict = dict[str, Any]
Synchronous = Literal["NORMAL", "FULL"]

# A generation is queued, then running, then ends in one of the final statuses (or ends
# while still queued: cancelled or interrupted).
ActiveStatus = Literal["queued", "running"]
FinalStatus = Literal["completed", "failed", "cancelled", "interrupted"]
GenerationStatus = ActiveStatus | FinalStatus
ACTIVE_STATUSES: Final[frozenset[str]] = frozenset(get_args(ActiveStatus))
TERMINAL_STATUSES: Final[frozenset[str]] = frozenset(get_args(FinalStatus))

# A session is active, paused (messages kept, no answer started) or closed; a message to a
# closed one follows its ``on_closed``, one to a busy one its ``on_busy``.
SessionStatus = Literal["active", "paused", "closed"]
OnClosed = Literal["reopen", "new", "reject"]
OnBusy = Literal["reject", "queue", "interrupt"]
SESSION_STATUSES: Final[tuple[SessionStatus, ...]] = get_args(SessionStatus)
ON_CLOSED: Final[tuple[OnClosed, ...]] = get_args(OnClosed)
ON_BUSY: Final[tuple[OnBusy, ...]] = get_args(OnBusy)


# Record fields stored as JSON text; every other field maps to its column as it is, but for
# booleans (stored as 0/1).
JSON_FIELDS = frozenset({"request", "error", "usage", "context", "provider_state"})
R = TypeVar("R")


def encode_field(name: str, value: Any) -> Any:
    """Encode one record field for its column (JSON columns as text, bools as ints)."""
    if name in JSON_FIELDS:
        return json.dumps(value) if value is not None else None
    if isinstance(value, bool):
        return int(value)
    return value


def to_row(record: Any) -> JSONDict:
    """A record dataclass as a row: each field encoded for its column."""
    return {f.name: encode_field(f.name, getattr(record, f.name)) for f in fields(record)}


def from_row(cls: type[R], row: Mapping[str, Any]) -> R:
    """A record dataclass from a row (columns the record does not know are ignored)."""
    values: JSONDict = {}
    for f in fields(cls):  # type: ignore[arg-type]
        value = row[f.name]
        if f.name in JSON_FIELDS:
            value = (
                json.loads(value)
                if value
                else f.default_factory()
                if callable(f.default_factory)
                else None
            )
        elif f.type == "bool":
            value = bool(value)
        values[f.name] = value
    return cls(**values)


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
    snapshot row is updated in the same transaction: ``fields`` assigned and, unless
    ``text`` is ``None``, ``text`` appended and ``next_offset`` set to the end of these
    messages (``text`` then holds all the text since the last such update, so the row's
    text always matches its ``next_offset``); ``close`` closes the stream after these
    messages. ``revisit_after``: seconds after which the source wants to be taken again even
    with nothing new (to bring a snapshot it left behind up to date). ``worker_id`` fences
    the batch: it is refused (``Fenced``) unless the generation still belongs to that worker.
    """

    payloads: list[bytes]
    generation_id: str | None = None
    text: str | None = ""
    fields: JSONDict = field(default_factory=dict)
    close: bool = False
    revisit_after: float | None = None
    worker_id: str | None = None


@dataclass(slots=True)
class GenerationRecord:
    """One generation's snapshot row: what it was asked, where it stands, what it said so far."""

    id: str
    stream_id: str
    status: GenerationStatus
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
    continuations: int = 0  # times it was taken over and continued after a crash
    # What its provider kept for the conversation's next answer (Dify's conversation id).
    provider_state: JSONDict | None = None

    @classmethod
    def blank(cls) -> GenerationRecord:
        """An empty record (for the column list)."""
        return cls("", "", "queued", "")

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> GenerationRecord:
        """Build a record from a ``generations`` row."""
        return from_row(cls, row)

    def to_row(self) -> JSONDict:
        """The record as a ``generations`` row."""
        return to_row(self)


@dataclass(frozen=True, slots=True)
class ActiveGeneration:
    """The little the pool's sweeps need to know of an unfinished generation."""

    id: str
    worker_id: str | None
    cancel_requested: bool
    provider: str = ""
    created_at: float = 0.0
    continuations: int = 0


@dataclass(frozen=True, slots=True)
class WorkerRecord:
    """A server process that has used the database: who it is and when it last said so."""

    id: str
    hostname: str
    pid: int
    started_at: float
    heartbeat_at: float


@dataclass(slots=True)
class SessionRecord:
    """A conversation: who owns it, where it stands, its context and its policies."""

    id: str
    owner: str | None
    title: str
    status: SessionStatus
    on_closed: OnClosed
    on_busy: OnBusy
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
        return from_row(cls, row)

    def to_row(self) -> JSONDict:
        """The record as a ``sessions`` row."""
        return to_row(self)


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


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to add to a session. An answer's message holds no content of its own:
    ``generation_id`` names the generation whose text it is."""

    id: str
    role: str
    content: str | None = None
    generation_id: str | None = None


@dataclass(frozen=True, slots=True)
class KeptResponse:
    """What a request with an ``Idempotency-Key`` did, kept to answer its repeats."""

    owner: str | None
    key: str
    response: JSONDict


@dataclass(frozen=True, slots=True)
class SessionWrite:
    """Changes to a session made atomically with another write (a generation's creation,
    say): plain data that the store applies inside that write's transaction.

    In order: refuse with ``WriteRejected("busy", …)`` if ``only_if_idle`` and another
    generation of the session is queued or running; drop the last message if it is an
    answer (``replace_answer``); add ``messages``, dropping the oldest past
    ``max_messages``; keep ``kept`` for its idempotency key.
    """

    session_id: str
    messages: tuple[NewMessage, ...]
    now: float
    max_messages: int
    only_if_idle: bool = False
    replace_answer: bool = False
    kept: KeptResponse | None = None
