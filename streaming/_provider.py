"""The provider interface: how the engine asks a model for a streamed answer."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from .types import GenerationRequest, ProviderChunk


@dataclass(frozen=True, slots=True)
class GenerationRun:
    """Which generation a provider is answering: its id, its owner, its session, and the
    text already committed when it is being continued."""

    generation_id: str
    owner: str | None = None
    session_id: str | None = None
    # When the generation is being continued (after a crash): its committed text, which
    # the provider's answer must go on from, not repeat.
    partial: str = ""


def supports_continuation(provider: Provider, request: GenerationRequest) -> bool:
    """Whether ``provider`` can go on with ``request`` from a committed partial answer
    (``run.partial``): it says so with a ``can_continue(request) -> bool`` method. Other
    generations end ``interrupted`` when their process dies."""
    can_continue = getattr(provider, "can_continue", None)
    return callable(can_continue) and can_continue(request) is True


class Provider(Protocol):
    """A source of streamed model output.

    ``stream`` yields text chunks in order and may end with a chunk carrying ``usage``.
    It raises ``ProviderError`` for upstream failures and ``ValueError`` (before yielding
    anything) for parameters it cannot accept. Cancellation may arrive at any await.
    """

    name: str

    def validate(self, request: GenerationRequest) -> None:
        """Raise ``ValueError`` if the request's params are not acceptable."""

    def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        """The answer to ``request`` for the generation ``run``, chunk by chunk."""

    async def aclose(self) -> None:
        """Release connections."""
