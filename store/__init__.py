"""Persistence for keepstream: durable streams and generation rows on SQLite.

No policy lives here: the store appends, reads, wakes readers after commits, and keeps rows.
"""

from __future__ import annotations

from ._context import AppendSource as AppendSource
from ._events import ChangeEvents as ChangeEvents
from ._exceptions import ConfigConflict as ConfigConflict
from ._exceptions import ContentTypeMismatch as ContentTypeMismatch
from ._exceptions import EpochSeq as EpochSeq
from ._exceptions import Fenced as Fenced
from ._exceptions import GenerationNotFound as GenerationNotFound
from ._exceptions import InvalidFork as InvalidFork
from ._exceptions import ProducerError as ProducerError
from ._exceptions import SeqConflict as SeqConflict
from ._exceptions import SeqGap as SeqGap
from ._exceptions import SessionNotFound as SessionNotFound
from ._exceptions import StaleEpoch as StaleEpoch
from ._exceptions import StoreBusy as StoreBusy
from ._exceptions import StoreError as StoreError
from ._exceptions import StoreUnavailable as StoreUnavailable
from ._exceptions import StreamClosed as StreamClosed
from ._exceptions import StreamConflict as StreamConflict
from ._exceptions import StreamExists as StreamExists
from ._exceptions import StreamGone as StreamGone
from ._exceptions import StreamNotFound as StreamNotFound
from ._exceptions import StreamReadOnly as StreamReadOnly
from ._exceptions import WriteRejected as WriteRejected
from ._interface import GenerationBackend as GenerationBackend
from ._interface import NamedStreamBackend as NamedStreamBackend
from ._interface import SessionBackend as SessionBackend
from ._interface import StoreBackend as StoreBackend
from ._interface import StreamBackend as StreamBackend
from ._named_types import AppendOutcome as AppendOutcome
from ._named_types import CreateRequest as CreateRequest
from ._named_types import Producer as Producer
from ._named_types import StreamInfo as StreamInfo
from ._named_types import format_offset as format_offset
from ._named_types import is_json as is_json
from ._named_types import media_type as media_type
from ._redis import RedisSessionStore as RedisSessionStore
from ._redis import RedisStore as RedisStore
from ._sessions import SessionStore as SessionStore
from ._store import DEFAULT_FLUSH_INTERVAL as DEFAULT_FLUSH_INTERVAL
from ._store import StreamStore as StreamStore
from .types import ACTIVE_STATUSES as ACTIVE_STATUSES
from .types import TERMINAL_STATUSES as TERMINAL_STATUSES
from .types import ActiveGeneration as ActiveGeneration
from .types import AppendBatch as AppendBatch
from .types import AppendResult as AppendResult
from .types import GenerationRecord as GenerationRecord
from .types import KeptResponse as KeptResponse
from .types import NewMessage as NewMessage
from .types import ReadResult as ReadResult
from .types import SessionMessage as SessionMessage
from .types import SessionRecord as SessionRecord
from .types import SessionSummary as SessionSummary
from .types import SessionWrite as SessionWrite
from .types import WorkerRecord as WorkerRecord

__all__ = [
    "ACTIVE_STATUSES",
    "DEFAULT_FLUSH_INTERVAL",
    "TERMINAL_STATUSES",
    "ActiveGeneration",
    "AppendBatch",
    "AppendOutcome",
    "AppendResult",
    "AppendSource",
    "ChangeEvents",
    "ConfigConflict",
    "ContentTypeMismatch",
    "CreateRequest",
    "EpochSeq",
    "Fenced",
    "GenerationBackend",
    "GenerationNotFound",
    "GenerationRecord",
    "InvalidFork",
    "KeptResponse",
    "NamedStreamBackend",
    "NewMessage",
    "Producer",
    "ProducerError",
    "ReadResult",
    "RedisSessionStore",
    "RedisStore",
    "SeqConflict",
    "SeqGap",
    "SessionBackend",
    "SessionMessage",
    "SessionNotFound",
    "SessionRecord",
    "SessionStore",
    "SessionSummary",
    "SessionWrite",
    "StaleEpoch",
    "StoreBackend",
    "StoreBusy",
    "StoreError",
    "StoreUnavailable",
    "StreamBackend",
    "StreamClosed",
    "StreamConflict",
    "StreamExists",
    "StreamGone",
    "StreamInfo",
    "StreamNotFound",
    "StreamReadOnly",
    "StreamStore",
    "WorkerRecord",
    "WriteRejected",
    "format_offset",
    "is_json",
    "media_type",
]
