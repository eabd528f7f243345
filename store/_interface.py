"""What ``streaming`` and ``web`` may ask of a store: typed protocols with no SQL, no writer
internals and no backend types in them.

``StreamStore`` and ``SessionStore`` (SQLite) implement them; a second backend implements
the same, and everything above ``store`` is typed against these, never against a backend's
class. Every write is either plain data (records, payloads, ``SessionWrite``) or a pull
from an ``AppendSource``; every check-and-write is the backend's to make atomic.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Mapping
from typing import Protocol

import anyio

from ._context import AppendSource
from ._named_types import AppendOutcome, CreateRequest, Producer, StreamInfo
from .types import (
    ActiveGeneration,
    AppendResult,
    GenerationRecord,
    JSONDict,
    ReadResult,
    SessionMessage,
    SessionRecord,
    SessionSummary,
    SessionWrite,
    WorkerRecord,
)


class StreamBackend(Protocol):
    """Durable streams: append after commit, read any range, follow as they grow."""

    @property
    def stats(self) -> dict[str, int]:
        """Counters and gauges for ``/metrics``."""
        ...

    async def readiness(self, *, write_within: float) -> dict[str, bool]:
        """Whether the schema is current and a write commits within ``write_within`` s."""
        ...

    def mark_dirty(self, source: AppendSource) -> None:
        """Have ``source``'s buffered messages taken at the next flush."""
        ...

    async def create_stream(
        self, stream_id: str, *, content_type: str = "application/json"
    ) -> None:
        """Create an empty, open stream."""
        ...

    async def append(
        self, stream_id: str, payloads: list[bytes], *, close: bool = False
    ) -> AppendResult:
        """Append messages (and optionally close) atomically; where they landed."""
        ...

    async def close_stream(self, stream_id: str) -> None:
        """Close a stream (idempotent)."""
        ...

    async def delete_stream(self, stream_id: str) -> None:
        """Delete a stream and its messages."""
        ...

    def change_event(self, stream_id: str) -> anyio.Event:
        """The event the next commit touching ``stream_id`` sets (take it before reading)."""
        ...

    def follow(
        self, stream_id: str, offset: int, *, max_bytes: int, deadline: float = ...
    ) -> AsyncGenerator[ReadResult, None]:
        """Reads from ``offset`` as the stream grows, until it is closed and read."""
        ...

    async def read(
        self,
        stream_id: str,
        offset: int,
        *,
        limit: int = ...,
        max_bytes: int | None = None,
        from_disk: bool = False,
    ) -> ReadResult:
        """Committed messages from ``offset``, within ``limit`` and ``max_bytes``."""
        ...

    async def stream_length(self, stream_id: str) -> tuple[int, bool]:
        """``(next_offset, closed)`` as committed."""
        ...

    async def stored_bytes(self, owner: str) -> int:
        """Bytes ``owner`` stores."""
        ...


class GenerationBackend(Protocol):
    """Generation snapshot rows, their state transitions, and the workers that run them."""

    async def create_generation(
        self,
        record: GenerationRecord,
        *,
        content_type: str = "application/json",
        session_write: SessionWrite | None = None,
        max_active_per_owner: int | None = None,
    ) -> None:
        """A generation and its empty stream (and ``session_write``), in one write; with
        ``max_active_per_owner``, only while its owner has fewer queued or running ones
        (``WriteRejected("max_generations_per_user")`` otherwise)."""
        ...

    async def update_generation(self, generation_id: str, fields: JSONDict) -> None:
        """Set fields of a generation's row."""
        ...

    async def finish_generation(
        self,
        generation_id: str,
        payload: bytes,
        fields: JSONDict,
        *,
        only_if: Iterable[str],
        only_worker: tuple[str | None] | None = None,
    ) -> bool:
        """Append the final event, close the stream and set the final fields, atomically,
        only while the status is one of ``only_if`` (and the owner ``only_worker``)."""
        ...

    async def claim_generation(
        self,
        generation_id: str,
        *,
        from_worker: str | None,
        to_worker: str,
        max_continuations: int,
        only_if: Iterable[str],
    ) -> bool:
        """Take a dead worker's generation over (fenced by its current owner)."""
        ...

    async def request_cancel(self, generation_id: str, *, only_if: Iterable[str]) -> bool:
        """Persist a cancel request while the status is one of ``only_if``."""
        ...

    async def get_generation(self, generation_id: str) -> GenerationRecord:
        """The committed snapshot."""
        ...

    async def locate_generation(self, generation_id: str) -> GenerationRecord:
        """The row without its text and request."""
        ...

    async def snapshot_length(self, generation_id: str) -> tuple[int, int]:
        """``(characters, next_offset)`` of the snapshot, without its text."""
        ...

    async def list_generations(
        self, *, statuses: Iterable[str] | None = None
    ) -> list[GenerationRecord]:
        """Generations, optionally only those in ``statuses``, oldest first."""
        ...

    async def active_generations(self, statuses: Iterable[str]) -> list[ActiveGeneration]:
        """Summaries of the generations in ``statuses`` (no text)."""
        ...

    async def register_worker(self, worker: WorkerRecord) -> None:
        """Record (or refresh) a worker."""
        ...

    async def heartbeat(self, worker: WorkerRecord, now: float | None = None) -> bool:
        """Refresh a worker's lease; ``False`` when it had been taken for dead."""
        ...

    async def remove_worker(self, worker_id: str) -> None:
        """Forget a worker."""
        ...

    async def list_workers(self) -> list[WorkerRecord]:
        """Every registered worker."""
        ...


class NamedStreamBackend(Protocol):
    """Named streams, as the Durable Streams view uses them: every check-and-write in one
    transaction or script. ``touched``: the caller's accesses (by stream id) that slid a TTL
    and are not yet written out by ``sweep_named``."""

    async def named_info(
        self, owner: str | None, name: str, *, now: float, touched: Mapping[str, float]
    ) -> StreamInfo:
        """A named stream's metadata; ``StreamNotFound`` (missing or expired: retired now),
        ``StreamGone`` (soft-deleted)."""
        ...

    async def create_named(
        self,
        owner: str | None,
        name: str,
        request: CreateRequest,
        *,
        now: float,
        touched: Mapping[str, float],
    ) -> tuple[bool, StreamInfo]:
        """Create a named stream (or find it with the same configuration): ``(created,
        info)``."""
        ...

    async def append_named(
        self,
        owner: str | None,
        name: str,
        *,
        content_type: str | None,
        payload: bytes | None,
        close: bool,
        seq: str | None,
        producer: Producer | None,
        now: float,
        touched: Mapping[str, float],
    ) -> AppendOutcome:
        """Append one message (or only close), with every protocol check."""
        ...

    async def delete_named(self, info: StreamInfo) -> None:
        """Delete a named stream (soft while forks read it)."""
        ...

    async def sweep_named(self, *, now: float, touched: Mapping[str, float]) -> int:
        """Write out slid TTLs and retire expired streams; how many expired."""
        ...


class StoreBackend(StreamBackend, GenerationBackend, Protocol):
    """Streams, generations and workers: the store the engine and the HTTP API run on."""


class SessionBackend(Protocol):
    """Sessions, their messages and kept idempotent responses."""

    async def create(self, record: SessionRecord, *, max_open: int | None = None) -> None:
        """Insert a session (while its owner has fewer than ``max_open`` open ones)."""
        ...

    async def create_if_absent(self, record: SessionRecord, *, max_open: int | None = None) -> bool:
        """Insert ``record`` unless its id exists; whether it did."""
        ...

    async def get(self, session_id: str) -> SessionRecord:
        """A session."""
        ...

    async def update(
        self, session_id: str, fields: JSONDict, *, max_open: int | None = None
    ) -> None:
        """Set fields of a session."""
        ...

    async def delete(self, session_id: str) -> None:
        """Delete a session, its messages and its generations."""
        ...

    async def add_messages(self, write: SessionWrite) -> None:
        """Apply a session write on its own."""
        ...

    async def messages(self, session_id: str) -> list[SessionMessage]:
        """A session's messages, oldest first."""
        ...

    async def generations(self, session_id: str) -> list[tuple[str, str]]:
        """``(id, status)`` of a session's generations."""
        ...

    async def provider_state(self, session_id: str, provider: str) -> tuple[str, JSONDict] | None:
        """The newest state ``provider`` kept in a session's answers, with its answer's id."""
        ...

    async def list_for(
        self, owner: str | None, *, status: str | None = None, limit: int = 100
    ) -> list[SessionSummary]:
        """An owner's sessions, newest activity first."""
        ...

    async def idle(self, *, before: float, limit: int = ...) -> list[str]:
        """Open sessions without activity since ``before``."""
        ...

    async def closed_before(self, before: float, *, limit: int = ...) -> list[str]:
        """Sessions closed before ``before``."""
        ...

    async def recall(self, owner: str | None, key: str) -> JSONDict | None:
        """The response kept for an idempotency key."""
        ...
