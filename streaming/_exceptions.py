"""Errors raised by the generation engine.

StreamingError
├── PoolFull           too many generations running and queued (retry later)
├── PoolClosed         the pool is shutting down and takes no new work
├── UnknownProvider    the request names a provider that is not configured
└── ProviderError      the model provider failed (HTTP error, dropped stream, bad chunk)

Invalid requests raise ``ValueError``.
"""

from __future__ import annotations


class StreamingError(Exception):
    """Base class of the engine's errors."""


class PoolFull(StreamingError):
    """No room: ``max_running`` generations run and ``max_queued`` wait."""

    def __init__(self, *, running: int, queued: int, retry_after: float) -> None:
        super().__init__(
            f"generation pool is full ({running} running, {queued} queued); retry later"
        )
        self.running = running
        self.queued = queued
        self.retry_after = retry_after


class PoolClosed(StreamingError):
    """The pool is shutting down."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down and accepts no new generations")


class UnknownProvider(StreamingError):
    """The provider named by a request is not configured."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown provider {name!r}; configured: {', '.join(known)}")
        self.name = name
        self.known = known


class ProviderError(StreamingError):
    """A model provider failed. ``message`` is what the upstream said, where it said anything."""

    def __init__(self, message: str, *, status: int | None = None, kind: str = "provider_error"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
