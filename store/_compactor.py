"""Compaction, driven: which closed streams still have message rows, and packing them into
blocks (``_blocks.compact``) a few blocks per transaction while the writer is idle."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable

from . import _blocks as blocks
from ._context import is_transient

logger = logging.getLogger("keepstream.store")

# Each transaction moves at most this many blocks, so new work waits for one such
# transaction at most; the scan for streams left from before a start reads this many
# streams per query.
COMPACT_BLOCKS = 4
SCAN_STREAMS = 1024


class Compactor:
    """The writer's queue of closed streams to compact (those it closed, and those a scan
    finds left over from before this start). Used on the writer thread only."""

    def __init__(self) -> None:
        self._queue: deque[str] = deque()
        self._scan_from: int | None = 0  # the streams' rowid the scan got to; None: done
        self.compacted = 0  # messages moved into blocks

    @property
    def has_work(self) -> bool:
        """Whether streams are queued or the scan is not finished."""
        return bool(self._queue) or self._scan_from is not None

    def add(self, stream_ids: Iterable[str]) -> None:
        """Queue streams just closed."""
        self._queue.extend(stream_ids)

    def run(
        self, conn: sqlite3.Connection, seconds: float, *, interrupted: Callable[[], bool]
    ) -> None:
        """Compact for up to ``seconds``, one transaction at a time, stopping as soon as
        ``interrupted()`` (other work arrived: it goes first)."""
        until = time.monotonic() + seconds
        while time.monotonic() < until and not interrupted():
            if not self._queue:
                if self._scan_from is None:
                    return
                self._scan_from = self._scan(conn, self._scan_from)
                continue
            stream_id = self._queue[0]
            try:
                conn.execute("BEGIN IMMEDIATE")
                moved, done = blocks.compact(conn, stream_id, max_blocks=COMPACT_BLOCKS)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if is_transient(exc):
                    return  # tried again on the next idle turn
                # Left as rows, which read as well; the next start's scan tries it again.
                logger.warning("could not compact stream %s: %s", stream_id, exc)
                done, moved = True, 0
            self.compacted += moved
            if done:
                self._queue.popleft()

    def _scan(self, conn: sqlite3.Connection, after: int) -> int | None:
        """Queue closed streams past rowid ``after`` that still have message rows (closed
        by a process that died first, say); where the next scan starts, ``None`` when done."""
        try:
            rows = conn.execute(
                "SELECT rowid, closed AND EXISTS (SELECT 1 FROM messages WHERE stream_id = id),"
                " id FROM streams WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, SCAN_STREAMS),
            ).fetchall()
        except sqlite3.Error as exc:
            logger.warning("could not look for streams to compact: %s", exc)
            return None
        self._queue.extend(stream_id for _, uncompacted, stream_id in rows if uncompacted)
        return rows[-1][0] if len(rows) == SCAN_STREAMS else None
