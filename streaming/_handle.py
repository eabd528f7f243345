"""A generation this process runs, as the pool holds it, and the ids its log lines carry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio

from store import GenerationRecord
from store.types import JSONDict

from ._log import GenerationLog
from .types import GenerationRequest


def log_context(record: GenerationRecord) -> JSONDict:
    """The ids a log line about a generation carries (never its prompt or text)."""
    return {
        "generation_id": record.id,
        "session_id": record.session_id,
        "user": record.owner,
        "worker_id": record.worker_id,
    }


StopReason = Literal["cancelled", "interrupted"]  # why a generation was stopped


@dataclass(eq=False)
class Handle:
    """A generation this process owns: its cancel scope, its log, and why it was stopped."""

    record: GenerationRecord
    request: GenerationRequest
    log: GenerationLog
    after: tuple[str, ...] = ()  # generations to wait for before starting
    prepare: Callable[[], Awaitable[GenerationRequest]] | None = None  # the request, at start
    partial: str | None = None  # a continuation: the text its dead process committed
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    stop_reason: StopReason | None = None
    started: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    provider_state: JSONDict | None = None  # the last state its provider gave

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.scope.cancel()
