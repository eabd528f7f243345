"""Errors raised by the generation engine.

StreamingError
├── PoolFull           too many generations running and queued (retry later)
├── PoolClosed         the pool is shutting down and takes no new work
├── UnknownProvider    the request names a provider that is not configured
├── SessionClosed      a message to a closed session whose policy is to reject it
├── SessionBusy        a message while the session's answer runs, under on_busy=reject
├── LimitExceeded      a configured bound (sessions per user, context size, ...) was reached
└── ProviderError      the model provider failed (HTTP error, dropped stream, bad chunk)

Invalid requests raise ``ValueError``.
"""

from __future__ import annotations


class StreamingError(Exception):
    """Base class of the engine's errors."""


class PoolFull(StreamingError):
    """No room: ``max_running`` generations run and ``max_queued`` wait (``limit`` is
    ``max_queued``), or this owner already has ``max_generations_per_user`` of them."""

    def __init__(
        self, *, running: int, queued: int, retry_after: float, limit: str = "max_queued"
    ) -> None:
        if limit == "max_queued":
            message = f"generation pool is full ({running} running, {queued} queued); retry later"
        else:
            message = (
                f"you have {running + queued} generations running or queued, the most"
                f" {limit} allows; retry when one has ended"
            )
        super().__init__(message)
        self.running = running
        self.queued = queued
        self.retry_after = retry_after
        self.limit = limit


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


class SessionClosed(StreamingError):
    """The session is closed and its ``on_closed`` policy rejects new messages."""

    def __init__(self, session_id: str, reason: str | None) -> None:
        super().__init__(
            f"session {session_id!r} is closed ({reason or 'no reason'}) and rejects new "
            "messages (on_closed=reject); reopen it with PATCH status=active"
        )
        self.session_id = session_id
        self.reason = reason


class SessionBusy(StreamingError):
    """A generation is running in the session and ``on_busy`` is ``reject``."""

    def __init__(self, session_id: str, generation_id: str) -> None:
        super().__init__(
            f"session {session_id!r} is still answering (generation {generation_id}); "
            "wait for it, cancel it, or set on_busy=interrupt"
        )
        self.session_id = session_id
        self.generation_id = generation_id


class LimitExceeded(StreamingError):
    """A configured limit was reached; ``too_large`` when it bounds a size."""

    def __init__(self, limit: str, maximum: int, *, too_large: bool = False) -> None:
        super().__init__(f"limit {limit} reached: at most {maximum}")
        self.limit = limit
        self.maximum = maximum
        self.too_large = too_large
