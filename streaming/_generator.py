"""Your own generation code as a provider: any callable that returns an async iterator of text.

A LangChain chain's ``astream``, an agent loop, a call to another vendor's SDK: wrapped in a
``GeneratorProvider``, its chunks go through the same log, under the same guarantees, as the
built-in providers' do.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from store.types import JSONDict

from ._exceptions import ProviderError
from ._provider import GenerationRun
from .types import ChatMessage, GenerationRequest, ProviderChunk


@dataclass(frozen=True, slots=True)
class GeneratorInput:
    """What a registered generator is asked: the conversation, the model and params of the
    request, and whose generation (and session) it is."""

    messages: tuple[ChatMessage, ...]
    model: str | None
    params: JSONDict
    generation_id: str
    owner: str | None
    session_id: str | None
    # When the generation is being continued (its process died mid-answer, and the
    # generator was registered with ``continues=True``): the text already committed. The
    # generator yields only what follows it.
    partial: str = ""
    # What the generator kept from its newest answer in the session (a ``ProviderChunk``
    # it yielded with ``state=``), with ``unheard``: how many of ``messages`` before the
    # last came after that answer. Empty for a first answer or a regenerated one.
    state: JSONDict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The last user message."""
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


# A generator yields text, or ``ProviderChunk``s where it also reports usage (usually last).
TextGenerator = Callable[[GeneratorInput], AsyncIterator[str | ProviderChunk]]
ParamsCheck = Callable[[JSONDict], None]


class GeneratorProvider:
    """A provider named ``name`` whose answers come from ``generate``.

    ``generate(input)`` returns an async iterator (an ``async def`` with ``yield``, say) of
    ``str`` or ``ProviderChunk``. Whatever it raises ends the generation ``failed`` with the
    exception's message; cancelling the generation cancels it at its current ``await`` and
    closes it. ``check_params``, if given, raises ``ValueError`` for params it refuses,
    before anything starts (the HTTP API answers 422 with the message). ``continues``
    says that ``generate`` can go on from ``input.partial``, so a generation whose process
    died is continued rather than ended ``interrupted``.
    """

    def __init__(
        self,
        name: str,
        generate: TextGenerator,
        *,
        check_params: ParamsCheck | None = None,
        continues: bool = False,
    ) -> None:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"a provider name is letters, digits, - and _; got {name!r}")
        if not callable(generate):
            raise TypeError(f"provider {name!r}: {generate!r} is not callable")
        self.name = name
        self.generate = generate
        self.check_params = check_params
        self.continues = continues

    def validate(self, request: GenerationRequest) -> None:
        """Raise ``ValueError`` for params ``check_params`` refuses."""
        if self.check_params is not None:
            self.check_params(request.params)

    def can_continue(self, request: GenerationRequest) -> bool:
        """Whether it was registered as able to go on from a partial answer."""
        return self.continues

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        """The generator's chunks; anything it raises becomes ``ProviderError``."""
        given = GeneratorInput(
            messages=request.messages,
            model=request.model,
            params=request.params,
            generation_id=run.generation_id,
            owner=run.owner,
            session_id=run.session_id,
            partial=run.partial,
            state=request.provider_state,
        )
        try:
            chunks: Any = self.generate(given)
            if not hasattr(chunks, "__aiter__"):
                raise TypeError(f"returned {type(chunks).__name__}, not an async iterator of text")
            async with aclosing(_closable(chunks)) as items:
                async for item in items:
                    yield self._chunk(item)
        except ProviderError:
            raise
        except Exception as exc:
            raise ProviderError(
                f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                kind="provider_error",
            ) from exc

    def _chunk(self, item: object) -> ProviderChunk:
        if isinstance(item, str):
            return ProviderChunk(item)
        if isinstance(item, ProviderChunk):
            return item
        raise TypeError(f"yielded a {type(item).__name__}; expected str or ProviderChunk")

    async def aclose(self) -> None:
        """Nothing to release: the generator owns its own resources."""


async def _closable(chunks: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
    """``chunks`` as an async generator, closing the source (when it can be) at the end."""
    try:
        async for item in chunks:
            yield item
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()
