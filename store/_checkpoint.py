"""WAL checkpoints beside the writer."""

from __future__ import annotations

import logging
import sqlite3
import threading

from ._schema import connect

logger = logging.getLogger("keepstream.store")


class Checkpointer:
    """Runs a PASSIVE WAL checkpoint every ``every`` commits, on a thread of its own.

    Left alone under load the WAL grows without bound (automatic checkpoints are off);
    checkpointing on the writer's connection would stall commits, so it happens beside it.
    PASSIVE never takes the write lock; once a pass completes, the next commit reuses the WAL
    from its start, and ``journal_size_limit`` trims the file.
    """

    def __init__(self, path: str, every: int) -> None:
        self._path = path
        self._every = every
        self._busy = threading.Lock()
        self._commits = 0
        self._closed = False

    def maybe_run(self) -> None:
        """Count a commit; start a checkpoint on every ``every``-th unless one is running."""
        self._commits += 1
        if self._closed or self._commits % self._every or not self._busy.acquire(blocking=False):
            return
        threading.Thread(target=self._checkpoint, name="keepstream-checkpoint", daemon=True).start()

    def _checkpoint(self) -> None:
        try:
            conn = connect(self._path)
            try:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            logger.warning("WAL checkpoint failed: %s", exc)
        finally:
            self._busy.release()

    def close(self) -> None:
        """Start no more checkpoints, and wait for a running one to end."""
        self._closed = True
        with self._busy:
            pass
