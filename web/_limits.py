"""Per-user bounds the web layer enforces: open SSE responses per user."""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable

from ._errors import LimitRefused


class OpenReaders:
    """Counts each user's open SSE responses and refuses one past ``limit`` (429).

    Without API keys (``user`` is ``None``) the server is single-user and nothing is
    counted.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def open(self, user: str | None) -> int:
        """How many SSE responses ``user`` has open."""
        return self._open[user] if user is not None else 0

    def check(self, user: str | None) -> None:
        """Raise ``LimitRefused`` if ``user`` may open no more."""
        if user is not None and self._open[user] >= self.limit:
            raise LimitRefused(
                "max_streams_per_user",
                f"you have {self._open[user]} event streams open, the most"
                " max_streams_per_user allows; close one (or wait) and retry",
            )

    def claim(self, user: str | None) -> Callable[[], None]:
        """Count one more open response for ``user`` (after ``check``); returns the
        function that gives it back (idempotent)."""
        self.check(user)
        if user is None:
            return lambda: None
        self._open[user] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[user] -= 1
                if self._open[user] <= 0:
                    del self._open[user]

        return release

    def guard(self, chunks: AsyncIterator[bytes], user: str | None) -> AsyncIterator[bytes]:
        """``chunks``, counted as one open response of ``user`` until they end, fail or
        are dropped (even unstarted: a response whose client vanished first)."""
        release = self.claim(user)

        async def counted() -> AsyncIterator[bytes]:
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                release()

        wrapped = counted()
        weakref.finalize(wrapped, release)
        return wrapped
