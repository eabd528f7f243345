"""Persistence for keepstream: durable streams and generation rows on SQLite.

No policy lives here: the store appends, reads, wakes readers after commits, and keeps rows.
"""

from __future__ import annotations

from ._exceptions import GenerationNotFound as GenerationNotFound
from ._exceptions import SessionNotFound as SessionNotFound
from ._exceptions import StoreError as StoreError
from ._exceptions import StoreUnavailable as StoreUnavailable
from ._exceptions import StreamClosed as StreamClosed
from ._exceptions import StreamConflict as StreamConflict
from ._exceptions import StreamExists as StreamExists
from ._exceptions import StreamNotFound as StreamNotFound
from ._exceptions import WriteRejected as WriteRejected
from ._sessions import SessionStore as SessionStore
from ._sessions import check_not_busy as check_not_busy
from ._sessions import insert_messages as insert_messages
from ._sessions import remember as remember
from ._store import DEFAULT_FLUSH_INTERVAL as DEFAULT_FLUSH_INTERVAL
from ._store import StreamStore as StreamStore
from ._writer import AppendSource as AppendSource
from ._writer import Op as Op
from ._writer import WriterContext as WriterContext
from .types import TERMINAL_STATUSES as TERMINAL_STATUSES
from .types import ActiveGeneration as ActiveGeneration
from .types import AppendBatch as AppendBatch
from .types import AppendResult as AppendResult
from .types import GenerationRecord as GenerationRecord
from .types import ReadResult as ReadResult
from .types import SessionMessage as SessionMessage
from .types import SessionRecord as SessionRecord
from .types import SessionSummary as SessionSummary
from .types import WorkerRecord as WorkerRecord

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "TERMINAL_STATUSES",
    "ActiveGeneration",
    "AppendBatch",
    "AppendResult",
    "AppendSource",
    "GenerationNotFound",
    "GenerationRecord",
    "Op",
    "ReadResult",
    "SessionMessage",
    "SessionNotFound",
    "SessionRecord",
    "SessionStore",
    "SessionSummary",
    "StoreError",
    "StoreUnavailable",
    "StreamClosed",
    "StreamConflict",
    "StreamExists",
    "StreamNotFound",
    "StreamStore",
    "WorkerRecord",
    "WriteRejected",
    "WriterContext",
    "check_not_busy",
    "insert_messages",
    "remember",
]
