"""When a follow reconnects: which failures are retried, the backoff, and the budget."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Protocol

import httpx
import stamina
from httpx_sse import SSEError

from ._exceptions import APIError

DEFAULT_ATTEMPTS = 12
DEFAULT_RETRY_TIMEOUT = 60.0
DEFAULT_WAIT_INITIAL = 0.1
DEFAULT_WAIT_MAX = 5.0
DEFAULT_WAIT_JITTER = 0.5
# 408 and 429 say "later"; 5xx covers a server that is starting, draining or failing.
RETRY_STATUSES = frozenset({408, 429})


class RetryContext(Protocol):
    """What ``stamina.retry_context`` returns: attempts to iterate, sync or async."""

    def __iter__(self) -> Iterator[stamina.Attempt]: ...

    def __aiter__(self) -> AsyncIterator[stamina.Attempt]: ...


class StreamEnded(Exception):
    """The server ended a follow's response before its end (a graceful restart does that):
    reconnect and ask again."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A follow's reconnect budget for one outage.

    After a dropped or refused connection, a timeout, or a 408/429/5xx answer, a follow
    reconnects with exponential backoff (``wait_initial`` doubling up to ``wait_max``, plus
    up to ``wait_jitter`` of random jitter; a ``Retry-After`` is honoured up to
    ``wait_max``). It gives up with ``RetriesExhausted`` after ``attempts`` attempts or
    once ``timeout`` seconds have passed since the outage began, whichever comes first
    (``None`` turns either bound off). The budget is per outage: a connection that
    delivered an event, or stayed open ``healthy_after`` seconds, proves the server is
    back, and the next failure starts a fresh budget.
    """

    attempts: int | None = DEFAULT_ATTEMPTS
    timeout: float | None = DEFAULT_RETRY_TIMEOUT
    wait_initial: float = DEFAULT_WAIT_INITIAL
    wait_max: float = DEFAULT_WAIT_MAX
    wait_jitter: float = DEFAULT_WAIT_JITTER
    healthy_after: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts must be at least 1 or None, got {self.attempts}")
        if self.timeout is not None and not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout}")
        for name in ("wait_initial", "wait_max", "wait_jitter", "healthy_after"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value}")

    def retry_context(self) -> RetryContext:
        """A fresh stamina retry context holding this budget (for one outage)."""
        return stamina.retry_context(
            on=self.backoff,
            attempts=self.attempts,
            timeout=self.timeout,
            wait_initial=self.wait_initial,
            wait_max=self.wait_max,
            wait_jitter=self.wait_jitter,
        )

    def backoff(self, exc: Exception) -> bool | float:
        """stamina's hook: ``False`` when ``exc`` is not worth retrying, the server's
        ``Retry-After`` (at most ``wait_max``) when it sent one, else ``True`` (the
        exponential backoff)."""
        if not is_retryable(exc):
            return False
        if isinstance(exc, APIError) and exc.retry_after is not None:
            return min(exc.retry_after, self.wait_max)
        return True


def is_retryable(exc: BaseException) -> bool:
    """Whether a follow should reconnect after ``exc``: a network fault or timeout, a
    response cut short, or a 408/429/5xx answer. Cancellation and every other error are
    not."""
    if isinstance(exc, APIError):
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    if isinstance(exc, SSEError):
        return False  # a 200 that is not SSE: no retry will change that
    return isinstance(
        exc, httpx.NetworkError | httpx.TimeoutException | httpx.RemoteProtocolError | StreamEnded
    )
