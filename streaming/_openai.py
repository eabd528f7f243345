"""A provider for any OpenAI-compatible streaming ``/v1/chat/completions`` endpoint.

OpenAI, vLLM, Ollama, llama.cpp's server and LM Studio all speak it. Upstream failures become
``ProviderError`` with the upstream's own message, so the generation ends ``failed`` with a
reason a person can act on.

Faults are handled as ``_upstream`` describes: retried before the answer starts, failed after
(or continued by the pool, where the server can continue a final assistant message).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

from httpx_sse import ServerSentEvent

from ._exceptions import ProviderError
from ._provider import GenerationRun
from ._upstream import (
    DEFAULT_LIMITS,
    EventStreamUpstream,
    Malformed,
    Parsed,
    UpstreamLimits,
    error_text,
    json_object,
)
from .types import GenerationRequest, ProviderChunk

# Request params passed through to the upstream as they are. ``n`` is not among them: one
# generation is one answer.
PASSTHROUGH_PARAMS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "response_format",
        "reasoning_effort",
    }
)


class OpenAIProvider:
    """Streams chat completions from ``{base_url}/chat/completions``.

    ``base_url`` includes the version prefix (``https://api.openai.com/v1``,
    ``http://127.0.0.1:11434/v1``). Failures before the answer starts are retried (at most
    ``limits.retry_attempts`` calls within ``limits.retry_deadline`` seconds, exponential
    backoff with full jitter, ``Retry-After`` honoured); after that, a stall longer than
    ``limits.read_timeout`` between chunks, no text for ``limits.idle_timeout`` (whatever
    else arrives), a dropped connection, or an end without ``[DONE]`` or a ``finish_reason``
    all fail the generation — an answer is never silently cut short.

    ``continuation``, the body fields with which the server continues a final assistant
    message instead of answering anew (vLLM: ``{"continue_final_message": true,
    "add_generation_prompt": false}``), or ``continuation_message``, the fields of that
    message which do it (DeepSeek and Mistral: ``{"prefix": true}``), makes answers
    continuable: after a mid-answer fault or a crash, the request is sent again with the
    text so far as that final assistant message, and the server's output is appended.
    Without either, nothing is continued.
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        limits: UpstreamLimits = DEFAULT_LIMITS,
        continuation: Mapping[str, Any] | None = None,
        continuation_message: Mapping[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.continuation = dict(continuation) if continuation is not None else None
        self.continuation_message = (
            dict(continuation_message) if continuation_message is not None else None
        )
        self.upstream = EventStreamUpstream(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None, limits=limits
        )

    def validate(self, request: GenerationRequest) -> None:
        """Raise ``ValueError`` for params not passed through, or when no model is known."""
        unknown = set(request.params) - PASSTHROUGH_PARAMS
        if unknown:
            raise ValueError(f"unsupported openai params: {', '.join(sorted(unknown))}")
        if not (request.model or self.model):
            raise ValueError("no model given: set 'model' in the request or --model on the server")

    def can_continue(self, request: GenerationRequest) -> bool:
        """Whether the server was declared able to continue a final assistant message."""
        return self.continuation is not None or self.continuation_message is not None

    def _body(self, request: GenerationRequest, partial: str = "") -> dict[str, Any]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update(request.params)
        if partial and self.can_continue(request):
            messages.append(
                {**(self.continuation_message or {}), "role": "assistant", "content": partial}
            )
            body.update(self.continuation or {})
        return body

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        """The upstream's answer; every failure becomes ``ProviderError``. Closing the
        generator (or cancelling it) closes the upstream connection."""
        response = await self.upstream.open(
            f"{self.base_url}/chat/completions", self._body(request, run.partial)
        )
        try:
            async with aclosing(self.upstream.chunks(response, _parse_event)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self.upstream.aclose()


def _parse_event(sse: ServerSentEvent) -> Parsed:
    """One event of a chat completion stream: ``[DONE]``, or a ``chat.completion.chunk``
    with its text and usage, and whether it finished the answer.

    Raises ``Malformed`` for anything not shaped like one, and ``ProviderError`` for an
    error object (the upstream's way of failing mid-stream).
    """
    data = sse.data
    if data == "[DONE]":
        return Parsed(finished=True, last=True)
    if not data:
        return Parsed()
    obj = json_object(data)
    if "error" in obj:
        raise ProviderError(f"upstream error: {error_text(obj['error'])}", kind="upstream_error")
    choices = obj.get("choices")
    usage = obj.get("usage")
    if not isinstance(choices, list) or not (choices or isinstance(usage, dict)):
        raise Malformed(data)
    text: list[str] = []
    finished = False
    for choice in choices:
        if not isinstance(choice, dict):
            raise Malformed(data)
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise Malformed(data)
        content = delta.get("content")
        if isinstance(content, str):
            text.append(content)
        elif content is not None:
            raise Malformed(data)
        finished = finished or bool(choice.get("finish_reason"))
    if not text and not isinstance(usage, dict):
        return Parsed(finished=finished)
    chunk = ProviderChunk("".join(text), usage if isinstance(usage, dict) else None)
    return Parsed(chunk, finished=finished)
