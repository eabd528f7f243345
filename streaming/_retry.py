"""When and how long to wait before calling an upstream again.

Only failures *before the answer started* are retried: nothing was received, so a second call
cannot duplicate or lose text. The policy is stamina's retry loop (attempts and a total
deadline); this module decides which failures qualify and how long each backoff is: full
jitter (a uniform wait between 0 and an exponentially growing cap), or the upstream's own
``Retry-After``, never beyond the remaining deadline.
"""

from __future__ import annotations

import email.utils
import random
import time

from ._exceptions import ProviderError

DEFAULT_RETRY_ATTEMPTS = 4
DEFAULT_RETRY_DEADLINE = 30.0
# Full jitter: attempt n waits uniform(0, min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (n - 1))).
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
# 408 Request Timeout, 409 Conflict (OpenAI's "try again"), 429 Too Many Requests; and 5xx.
RETRYABLE_STATUSES = frozenset({408, 409, 429})


def is_retryable_status(status: int) -> bool:
    """Whether an upstream answering ``status`` may be called again."""
    return status in RETRYABLE_STATUSES or 500 <= status <= 599


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now: delta-seconds or an HTTP-date.

    ``None`` when absent or unreadable; a date in the past is 0.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class RetryableError(ProviderError):
    """A failure before the answer started that another attempt may fix.

    ``attempt`` is the 1-based attempt that failed, ``retry_after`` the upstream's requested
    wait (if it gave one), ``remaining`` the seconds left of the retry deadline when it failed.
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        attempt: int,
        remaining: float,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, kind=kind)
        self.attempt = attempt
        self.remaining = remaining
        self.retry_after = retry_after


def backoff(exc: Exception) -> bool | float:
    """stamina's backoff hook: ``False`` (do not retry) or the seconds to wait first.

    A wait that would end at or past the deadline is not worth making (the attempt after it
    could not run): the retries end instead — which also covers a ``Retry-After`` longer than
    the time left, since calling sooner would ignore what the upstream asked.
    """
    if not isinstance(exc, RetryableError):
        return False
    if exc.retry_after is not None:
        wait = exc.retry_after
    else:
        cap = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (exc.attempt - 1))
        wait = random.uniform(0, cap)  # jitter, not secrecy
    if wait >= exc.remaining:
        return False
    return wait
