"""Errors raised by the store.

StoreError
├── StreamNotFound      the stream does not exist (or was deleted)
├── StreamExists        create of a stream id that is already taken
├── StreamClosed        append to a stream that was closed
├── StreamConflict      another writer appended at offsets this one expected to use
├── StreamGone          a soft-deleted stream (kept only for its forks)
├── StreamReadOnly      a write to a stream only keepstream itself writes (a generation's)
├── ConfigConflict      create of a name taken by a stream configured differently
├── ContentTypeMismatch an append whose content type is not the stream's
├── SeqConflict         a ``Stream-Seq`` not above the last one
├── InvalidFork         a fork offset or sub-offset the source cannot satisfy
├── ProducerError       an idempotent producer's epoch or seq out of order
│   ├── StaleEpoch      an epoch below the producer's current one (a zombie writer)
│   ├── SeqGap          a seq beyond the next expected one
│   └── EpochSeq        a new epoch that does not start at seq 0
├── GenerationNotFound  no generation with that id
├── SessionNotFound     no session with that id
├── WriteRejected       a condition checked inside the write's transaction did not hold
├── StoreBusy           the writer's queue stayed full for the whole wait (back-pressure)
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
    """The stream is closed: nothing more can be appended. ``next_offset`` is its end, when
    known."""

    def __init__(self, stream_id: str, next_offset: int | None = None) -> None:
        super().__init__(f"stream {stream_id!r} is closed")
        self.stream_id = stream_id
        self.next_offset = next_offset


class StreamConflict(StoreError):
    """Another writer appended to this stream (one writer per stream was assumed)."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} was written by another process")
        self.stream_id = stream_id


class StreamGone(StoreError):
    """The stream was deleted while forks still read it: it answers only to them."""

    def __init__(self, name: str) -> None:
        super().__init__(f"stream {name!r} was deleted")
        self.name = name


class StreamReadOnly(StoreError):
    """The stream is written only by keepstream (a generation's events)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"stream {name!r} is read-only: a generation's events")
        self.name = name


class ConfigConflict(StoreError):
    """The name is taken by a stream with another configuration (or a soft-deleted one)."""


class ContentTypeMismatch(StoreError):
    """An append's (or a fork's) content type is not the stream's."""

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(f"content type {got!r} does not match the stream's {expected!r}")
        self.expected = expected
        self.got = got


class SeqConflict(StoreError):
    """A ``Stream-Seq`` that is not above the stream's last one."""

    def __init__(self, last: str, got: str) -> None:
        super().__init__(f"Stream-Seq {got!r} is not above the last one, {last!r}")
        self.last = last
        self.got = got


class InvalidFork(StoreError):
    """A fork offset or sub-offset the source cannot satisfy."""


class ProducerError(StoreError):
    """An idempotent producer's append out of order."""


class StaleEpoch(ProducerError):
    """The producer's epoch is below its current one: another instance took over."""

    def __init__(self, current_epoch: int) -> None:
        super().__init__(f"producer epoch is stale; the current epoch is {current_epoch}")
        self.current_epoch = current_epoch


class SeqGap(ProducerError):
    """The producer's seq skips ahead of the next expected one."""

    def __init__(self, expected: int, received: int) -> None:
        super().__init__(f"producer seq {received} is out of order; expected {expected}")
        self.expected = expected
        self.received = received


class EpochSeq(ProducerError):
    """A new producer epoch must start at seq 0."""

    def __init__(self) -> None:
        super().__init__("a new producer epoch must start at Producer-Seq 0")


class GenerationNotFound(StoreError):
    """No generation with this id."""

    def __init__(self, generation_id: str) -> None:
        super().__init__(f"generation {generation_id!r} not found")
        self.generation_id = generation_id


class Fenced(StoreError):
    """A write for a generation made by a worker that no longer owns it: a peer took the
    generation over (after this worker's lease ran out) and only the peer writes it now."""

    def __init__(self, generation_id: str, worker_id: str | None) -> None:
        super().__init__(f"generation {generation_id!r} is no longer owned by {worker_id!r}")
        self.generation_id = generation_id
        self.worker_id = worker_id


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


class StoreBusy(StoreError):
    """The writer already holds ``max_pending`` writes and none finished within ``waited``
    seconds (the disk is failing, or far too slow for the load): try again later."""

    def __init__(self, max_pending: int, waited: float) -> None:
        super().__init__(
            f"the store is busy: {max_pending} writes are waiting for the disk and none"
            f" finished within {waited:g} s"
        )
        self.max_pending = max_pending
        self.waited = waited


class StoreUnavailable(StoreError):
    """The database could not be written or read (I/O error, disk full, store closed)."""
