"""The generation engine: the pool that owns generations, their event logs, and providers."""

from __future__ import annotations

from ._dify import DifyProvider as DifyProvider
from ._exceptions import LimitExceeded as LimitExceeded
from ._exceptions import PoolClosed as PoolClosed
from ._exceptions import PoolFull as PoolFull
from ._exceptions import ProviderError as ProviderError
from ._exceptions import SessionBusy as SessionBusy
from ._exceptions import SessionClosed as SessionClosed
from ._exceptions import StreamingError as StreamingError
from ._exceptions import UnknownProvider as UnknownProvider
from ._generator import GeneratorInput as GeneratorInput
from ._generator import GeneratorProvider as GeneratorProvider
from ._generator import TextGenerator as TextGenerator
from ._log import GenerationLog as GenerationLog
from ._log import TextSanitizer as TextSanitizer
from ._log import decode_event as decode_event
from ._log import encode_event as encode_event
from ._log import status_event as status_event
from ._openai import OpenAIProvider as OpenAIProvider
from ._pool import GenerationPool as GenerationPool
from ._pool import new_generation_id as new_generation_id
from ._provider import GenerationRun as GenerationRun
from ._provider import Provider as Provider
from ._session_values import PostedMessage as PostedMessage
from ._session_values import SessionLimits as SessionLimits
from ._session_values import answer_message_id as answer_message_id
from ._session_values import merge_patch as merge_patch
from ._sessions import SessionManager as SessionManager
from ._simulated import SimulatedProvider as SimulatedProvider
from ._upstream import UpstreamLimits as UpstreamLimits
from .types import ChatMessage as ChatMessage
from .types import GenerationRequest as GenerationRequest
from .types import ProviderChunk as ProviderChunk
from .types import fit_history as fit_history

__all__ = [
    "ChatMessage",
    "DifyProvider",
    "GenerationLog",
    "GenerationPool",
    "GenerationRequest",
    "GenerationRun",
    "GeneratorInput",
    "GeneratorProvider",
    "LimitExceeded",
    "OpenAIProvider",
    "PoolClosed",
    "PoolFull",
    "PostedMessage",
    "Provider",
    "ProviderChunk",
    "ProviderError",
    "SessionBusy",
    "SessionClosed",
    "SessionLimits",
    "SessionManager",
    "SimulatedProvider",
    "StreamingError",
    "TextGenerator",
    "TextSanitizer",
    "UnknownProvider",
    "UpstreamLimits",
    "answer_message_id",
    "decode_event",
    "encode_event",
    "fit_history",
    "merge_patch",
    "new_generation_id",
    "status_event",
]
