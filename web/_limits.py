"""Per-user bounds the web layer enforces: open SSE responses and stored bytes per user."""

from __future__ import annotations

import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable

from store import StreamBackend
from streaming import LimitExceeded

from ._errors import LimitRefused

# A user's stored bytes are read again at most this often (a write may overshoot the
# limit by what that user stores within the interval).
STORED_BYTES_TTL = 1.0
MAX_CACHED_USERS = 10_000


class OpenReaders:
    """Counts each user's open SSE responses and refuses one past ``limit`` (429).

    Without API keys (``user`` is ``None``) the server is single-user and nothing is
    counted.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

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


class StoredBytes:
    """``max_stored_bytes_per_user``: refuses writes (413) once a user stores the limit.

    Without API keys, or with a limit of 0, nothing is checked.
    """

    def __init__(self, store: StreamBackend, limit: int) -> None:
        self.store = store
        self.limit = limit
        self._known: dict[str, tuple[float, int]] = {}

    async def check(self, user: str | None) -> None:
        """Raise ``LimitExceeded`` (413) if ``user`` already stores ``limit`` bytes."""
        if user is None or not self.limit:
            return
        now = time.monotonic()
        known = self._known.get(user)
        if known is None or now - known[0] > STORED_BYTES_TTL:
            if len(self._known) >= MAX_CACHED_USERS:
                self._known.clear()
            known = self._known[user] = (now, await self.store.stored_bytes(user))
        if known[1] >= self.limit:
            raise LimitExceeded("max_stored_bytes_per_user", self.limit, too_large=True)
