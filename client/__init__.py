"""keepstream's Python client: start generations, send session messages, and follow their
events with automatic resume (sync ``KeepstreamClient``, async ``AsyncKeepstreamClient``)."""

from __future__ import annotations

from ._async import AsyncKeepstreamClient as AsyncKeepstreamClient
from ._events import AsyncEventStream as AsyncEventStream
from ._events import EventStream as EventStream
from ._exceptions import APIError as APIError
from ._exceptions import BadRequest as BadRequest
from ._exceptions import Conflict as Conflict
from ._exceptions import InvalidRequest as InvalidRequest
from ._exceptions import KeepstreamError as KeepstreamError
from ._exceptions import NotFound as NotFound
from ._exceptions import PayloadTooLarge as PayloadTooLarge
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import RateLimited as RateLimited
from ._exceptions import RetriesExhausted as RetriesExhausted
from ._exceptions import ServerError as ServerError
from ._exceptions import TransportError as TransportError
from ._exceptions import Unauthorized as Unauthorized
from ._protocol import DEFAULT_BASE_URL as DEFAULT_BASE_URL
from ._protocol import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from ._retry import RetryPolicy as RetryPolicy
from ._sync import KeepstreamClient as KeepstreamClient
from .types import TERMINAL_STATUSES as TERMINAL_STATUSES
from .types import ChatMessage as ChatMessage
from .types import Delta as Delta
from .types import Event as Event
from .types import Generation as Generation
from .types import PostedMessage as PostedMessage
from .types import Session as Session
from .types import SessionMessage as SessionMessage
from .types import SessionWithMessages as SessionWithMessages
from .types import Status as Status

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "TERMINAL_STATUSES",
    "APIError",
    "AsyncEventStream",
    "AsyncKeepstreamClient",
    "BadRequest",
    "ChatMessage",
    "Conflict",
    "Delta",
    "Event",
    "EventStream",
    "Generation",
    "InvalidRequest",
    "KeepstreamClient",
    "KeepstreamError",
    "NotFound",
    "PayloadTooLarge",
    "PostedMessage",
    "ProtocolError",
    "RateLimited",
    "RetriesExhausted",
    "RetryPolicy",
    "ServerError",
    "Session",
    "SessionMessage",
    "SessionWithMessages",
    "Status",
    "TransportError",
    "Unauthorized",
]
