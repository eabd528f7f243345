"""Errors raised by the store.

StoreError
├── StreamNotFound      the stream does not exist (or was deleted)
├── StreamExists        create of a stream id that is already taken
├── StreamClosed        append to a stream that was closed
├── StreamConflict      another writer appended at offsets this one expected to use
├── GenerationNotFound  no generation with that id
├── SessionNotFound     no session with that id
├── WriteRejected       a condition checked inside the write's transaction did not hold
└── StoreUnavailable    SQLite failed (disk full, I/O error, store closed)
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises."""


class StreamNotFound(StoreError):
    """The stream does not exist."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} not found")
        self.stream_id = stream_id


class StreamExists(StoreError):
    """A stream with this id already exists."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} already exists")
        self.stream_id = stream_id


class StreamClosed(StoreError):
    """The stream is closed: nothing more can be appended."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} is closed")
        self.stream_id = stream_id


class StreamConflict(StoreError):
    """Another writer appended to this stream (one writer per stream was assumed)."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} was written by another process")
        self.stream_id = stream_id


class GenerationNotFound(StoreError):
    """No generation with this id."""

    def __init__(self, generation_id: str) -> None:
        super().__init__(f"generation {generation_id!r} not found")
        self.generation_id = generation_id


class SessionNotFound(StoreError):
    """No session with this id."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id!r} not found")
        self.session_id = session_id


class WriteRejected(StoreError):
    """A write refused by a check made in its own transaction (so it holds across processes).

    ``reason`` names the check; ``detail`` carries what it found.
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(f"write rejected: {reason}")
        self.reason = reason
        self.detail = detail


class StoreUnavailable(StoreError):
    """The database could not be written or read (I/O error, disk full, store closed)."""
