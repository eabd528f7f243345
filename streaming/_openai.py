"""A provider for any OpenAI-compatible streaming ``/v1/chat/completions`` endpoint.

OpenAI, vLLM, Ollama, llama.cpp's server and LM Studio all speak it. Upstream failures become
``ProviderError`` with the upstream's own message, so the generation ends ``failed`` with a
reason a person can act on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from ._exceptions import ProviderError
from ._provider import GenerationRun
from .types import GenerationRequest, ProviderChunk

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 120.0

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
    ``http://127.0.0.1:11434/v1``). A stall longer than ``read_timeout`` between chunks, a
    dropped connection, or an end without ``[DONE]`` or a ``finish_reason`` all fail the
    generation — an answer is never silently cut short. A ``read_timeout`` of 0 (or ``None``)
    means no limit (as ``--sse-send-timeout 0`` does).
    """

    name = "openai"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float | None = DEFAULT_READ_TIMEOUT,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            headers=headers,
            # httpx reads a timeout of 0 as "already expired": every request would fail at
            # its first write, so 0 is mapped to None (no limit) instead.
            timeout=httpx.Timeout(read_timeout or None, connect=connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    def validate(self, request: GenerationRequest) -> None:
        """Raise ``ValueError`` for params not passed through, or when no model is known."""
        unknown = set(request.params) - PASSTHROUGH_PARAMS
        if unknown:
            raise ValueError(f"unsupported openai params: {', '.join(sorted(unknown))}")
        if not (request.model or self.model):
            raise ValueError("no model given: set 'model' in the request or --model on the server")

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update(request.params)
        return body

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        """The upstream's answer; every failure becomes ``ProviderError``."""
        url = f"{self.base_url}/chat/completions"
        finished = False
        try:
            async with aconnect_sse(self._client, "POST", url, json=self._body(request)) as source:
                response = source.response
                if response.status_code != 200:
                    await response.aread()
                    raise ProviderError(
                        f"upstream answered {response.status_code}: {_upstream_message(response)}",
                        status=response.status_code,
                        kind="upstream_error",
                    )
                async for sse in source.aiter_sse():
                    if sse.data == "[DONE]":
                        finished = True
                        break
                    if not sse.data:
                        continue
                    chunk, done = _parse_chunk(sse.data)
                    finished = finished or done
                    if chunk is not None:
                        yield chunk
        except httpx.TimeoutException as exc:
            raise ProviderError(
                f"upstream timed out: {type(exc).__name__}", kind="upstream_timeout"
            ) from exc
        except SSEError as exc:
            raise ProviderError(
                f"upstream did not stream events: {exc}", kind="upstream_error"
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderError(
                f"upstream connection failed: {type(exc).__name__}: {exc}", kind="upstream_dropped"
            ) from exc
        if not finished:
            raise ProviderError(
                "upstream stream ended before the answer was complete", kind="upstream_dropped"
            )

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.aclose()


def _parse_chunk(data: str) -> tuple[ProviderChunk | None, bool]:
    """One ``chat.completion.chunk``: its text and usage, and whether it finished the answer."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ProviderError(
            f"upstream sent a malformed chunk: {data[:200]!r}", kind="upstream_malformed"
        ) from exc
    if not isinstance(obj, dict):
        raise ProviderError(
            f"upstream sent a malformed chunk: {data[:200]!r}", kind="upstream_malformed"
        )
    if "error" in obj:
        raise ProviderError(f"upstream error: {_error_text(obj['error'])}", kind="upstream_error")
    text: list[str] = []
    finished = False
    for choice in obj.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if isinstance(content, str):
            text.append(content)
        finished = finished or bool(choice.get("finish_reason"))
    usage = obj.get("usage")
    if not text and not isinstance(usage, dict):
        return None, finished
    return ProviderChunk("".join(text), usage if isinstance(usage, dict) else None), finished


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return str(error)


def _upstream_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return _error_text(body["error"])
    return response.text[:500]
