"""The provider interface: how the engine asks a model for a streamed answer."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from .types import GenerationRequest, ProviderChunk


@dataclass(frozen=True, slots=True)
class GenerationRun:
    """Which generation a provider is answering: its id, its owner and its session."""

    generation_id: str
    owner: str | None = None
    session_id: str | None = None


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
