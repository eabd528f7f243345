"""A provider for any OpenAI-compatible streaming ``/v1/chat/completions`` endpoint.

OpenAI, vLLM, Ollama, llama.cpp's server and LM Studio all speak it. Upstream failures become
``ProviderError`` with the upstream's own message, so the generation ends ``failed`` with a
reason a person can act on.

Faults, and what becomes of them:

* before the answer starts (a refused or reset connection, a timeout before the response
  head, 408/409/429/5xx): called again, see ``_retry`` — at most ``retry_attempts`` calls
  within ``retry_deadline`` seconds;
* any other status, or a 200 that is not an event stream: failed at once (no retry);
* once the response head has arrived nothing is retried (continuing a partial answer is the
  pool's business): a dropped connection, a silence past ``read_timeout``, no text for
  ``idle_timeout`` (keep-alive comments and empty chunks do not count), an end without
  ``[DONE]`` or ``finish_reason``, or more than ``MAX_MALFORMED_CHUNKS`` malformed chunks
  all fail the generation, its text so far kept.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator, Mapping
from contextlib import AsyncExitStack
from typing import Any

import anyio
import httpx
import stamina
from httpx_sse import EventSource

from store.types import JSONDict

from ._exceptions import ProviderError
from ._provider import GenerationRun
from ._retry import (
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_RETRY_DEADLINE,
    RetryableError,
    backoff,
    is_retryable_status,
    retry_after_seconds,
)
from .types import GenerationRequest, ProviderChunk

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 120.0
DEFAULT_IDLE_TIMEOUT = 60.0
# Malformed chunks are skipped and counted (reported as ``usage["malformed_chunks"]``); one
# more than this in one answer fails it: the upstream is not speaking the protocol.
MAX_MALFORMED_CHUNKS = 3
# An error body is read this far and no further (it may be a multi-megabyte HTML page).
MAX_ERROR_BODY = 16 * 1024
ERROR_MESSAGE_CHARS = 500

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


class _Malformed(Exception):
    """A chunk that is not JSON or not shaped like a ``chat.completion.chunk``."""


class OpenAIProvider:
    """Streams chat completions from ``{base_url}/chat/completions``.

    ``base_url`` includes the version prefix (``https://api.openai.com/v1``,
    ``http://127.0.0.1:11434/v1``). Failures before the answer starts are retried (at most
    ``retry_attempts`` calls within ``retry_deadline`` seconds, exponential backoff with full
    jitter, ``Retry-After`` honoured); after that, a stall longer than ``read_timeout`` between
    chunks, no text for ``idle_timeout`` (whatever else arrives), a dropped connection, or an
    end without ``[DONE]`` or a ``finish_reason`` all fail the generation — an answer is never
    silently cut short. A ``read_timeout`` or ``idle_timeout`` of 0 (or ``None``) means no
    limit (as ``--sse-send-timeout 0`` does).

    ``continuation``, the body fields with which the server continues a final assistant
    message instead of answering anew (vLLM: ``{"continue_final_message": true,
    "add_generation_prompt": false}``), makes answers continuable: after a mid-answer fault
    or a crash, the request is sent again with the text so far as that final assistant
    message, and the server's output is appended. Without it, nothing is continued.
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
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        retry_attempts: int = DEFAULT_RETRY_ATTEMPTS,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE,
        continuation: Mapping[str, Any] | None = None,
    ) -> None:
        if retry_attempts < 1:
            raise ValueError("retry_attempts must be >= 1")
        if retry_deadline <= 0:
            raise ValueError("retry_deadline must be > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.idle_timeout = idle_timeout or math.inf
        self.retry_attempts = retry_attempts
        self.retry_deadline = retry_deadline
        self.continuation = dict(continuation) if continuation is not None else None
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

    def can_continue(self, request: GenerationRequest) -> bool:
        """Whether the server was declared able to continue a final assistant message."""
        return self.continuation is not None

    def _body(self, request: GenerationRequest, partial: str = "") -> dict[str, Any]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        body: dict[str, Any] = {
            "model": request.model or self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update(request.params)
        if partial and self.continuation is not None:
            messages.append({"role": "assistant", "content": partial})
            body.update(self.continuation)
        return body

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        """The upstream's answer; every failure becomes ``ProviderError``. Closing the
        generator (or cancelling it) closes the upstream connection."""
        async with AsyncExitStack() as stack:
            response = await self._open(self._body(request, run.partial))
            stack.push_async_callback(response.aclose)
            async for chunk in self._chunks(response):
                yield chunk

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self._client.aclose()

    # -- the response head, retried -----------------------------------------------------------

    async def _open(self, body: dict[str, Any]) -> httpx.Response:
        """An open 200 event-stream response, after at most ``retry_attempts`` calls."""
        request = self._client.build_request(
            "POST",
            f"{self.base_url}/chat/completions",
            json=body,
            headers={"Accept": "text/event-stream", "Cache-Control": "no-store"},
        )
        started = time.monotonic()
        calls = 0
        try:
            async for attempt in stamina.retry_context(
                on=backoff, attempts=self.retry_attempts, timeout=self.retry_deadline
            ):
                with attempt:
                    calls = attempt.num
                    remaining = self.retry_deadline - (time.monotonic() - started)
                    return await self._call(request, attempt=calls, remaining=remaining)
        except RetryableError as exc:
            if calls < 2:
                raise
            raise ProviderError(
                f"{exc.message} (gave up after {calls} attempts)", status=exc.status, kind=exc.kind
            ) from exc
        raise AssertionError("unreachable: stamina either returns or raises")  # pragma: no cover

    async def _call(
        self, request: httpx.Request, *, attempt: int, remaining: float
    ) -> httpx.Response:
        """One upstream call, up to its response head."""
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise RetryableError(
                f"upstream timed out: {type(exc).__name__}",
                kind="upstream_timeout",
                attempt=attempt,
                remaining=remaining,
            ) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise RetryableError(
                f"upstream connection failed: {type(exc).__name__}: {exc}",
                kind="upstream_dropped",
                attempt=attempt,
                remaining=remaining,
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderError(
                f"upstream connection failed: {type(exc).__name__}: {exc}", kind="upstream_dropped"
            ) from exc
        status = response.status_code
        if status != 200:
            try:
                message = await _error_message(response)
            finally:
                await response.aclose()
            text = f"upstream answered {status}: {message}"
            if is_retryable_status(status):
                raise RetryableError(
                    text,
                    kind="upstream_error",
                    status=status,
                    attempt=attempt,
                    remaining=remaining,
                    retry_after=retry_after_seconds(response.headers.get("retry-after")),
                )
            raise ProviderError(text, status=status, kind="upstream_error")
        content_type = response.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "text/event-stream":
            # A 200 that is not a stream (an HTML login page, a JSON completion) will be the
            # same next time: not retried.
            await response.aclose()
            raise ProviderError(
                f"upstream answered 200 with content type {content_type or 'none'!r}, "
                "expected text/event-stream",
                status=status,
                kind="upstream_error",
            )
        return response

    # -- the body, never retried --------------------------------------------------------------

    async def _chunks(self, response: httpx.Response) -> AsyncGenerator[ProviderChunk, None]:
        """The chunks of an open event stream, under the idle deadline."""
        events = EventSource(response).aiter_sse()
        # The idle deadline moves only when text arrives, so keep-alive comments (which
        # httpx-sse swallows) and chunks without content cannot keep a dead answer alive. It
        # bounds each wait on its own: no cancel scope is held across a ``yield``.
        deadline = anyio.current_time() + self.idle_timeout
        finished = received = False
        malformed = 0
        usage: JSONDict | None = None
        try:
            while True:
                with anyio.CancelScope(deadline=deadline) as waiting:
                    sse = await anext(events, None)
                if waiting.cancelled_caught:
                    raise ProviderError(
                        f"upstream sent no text for {self.idle_timeout:g} s",
                        kind="upstream_stalled",
                    )
                if sse is None:
                    break
                received = True
                if sse.data == "[DONE]":
                    finished = True
                    break
                if not sse.data:
                    continue
                try:
                    chunk, done = _parse_chunk(sse.data)
                except _Malformed:
                    malformed += 1
                    if malformed > MAX_MALFORMED_CHUNKS:
                        raise ProviderError(
                            f"upstream sent {malformed} malformed chunks, the last:"
                            f" {sse.data[:200]!r}",
                            kind="upstream_malformed",
                        ) from None
                    continue
                finished = finished or done
                if chunk is None:
                    continue
                if chunk.text:
                    deadline = anyio.current_time() + self.idle_timeout
                if chunk.usage is not None:
                    usage = chunk.usage
                yield chunk
        except httpx.TimeoutException as exc:
            raise ProviderError(
                f"upstream timed out: {type(exc).__name__}", kind="upstream_timeout"
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderError(
                f"upstream connection failed: {type(exc).__name__}: {exc}", kind="upstream_dropped"
            ) from exc
        finally:
            await events.aclose()
        if not received:
            raise ProviderError("upstream sent an empty event stream", kind="upstream_dropped")
        if not finished:
            raise ProviderError(
                "upstream stream ended before the answer was complete", kind="upstream_dropped"
            )
        if malformed:
            # The pool keeps the last usage it sees: the count rides along with the upstream's.
            yield ProviderChunk("", {**(usage or {}), "malformed_chunks": malformed})


def _parse_chunk(data: str) -> tuple[ProviderChunk | None, bool]:
    """One ``chat.completion.chunk``: its text and usage, and whether it finished the answer.

    Raises ``_Malformed`` for anything not shaped like one, and ``ProviderError`` for an
    error object (the upstream's way of failing mid-stream).
    """
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        raise _Malformed(data) from None
    if not isinstance(obj, dict):
        raise _Malformed(data)
    if "error" in obj:
        raise ProviderError(f"upstream error: {_error_text(obj['error'])}", kind="upstream_error")
    choices = obj.get("choices")
    usage = obj.get("usage")
    if not isinstance(choices, list) or not (choices or isinstance(usage, dict)):
        raise _Malformed(data)
    text: list[str] = []
    finished = False
    for choice in choices:
        if not isinstance(choice, dict):
            raise _Malformed(data)
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise _Malformed(data)
        content = delta.get("content")
        if isinstance(content, str):
            text.append(content)
        elif content is not None:
            raise _Malformed(data)
        finished = finished or bool(choice.get("finish_reason"))
    if not text and not isinstance(usage, dict):
        return None, finished
    return ProviderChunk("".join(text), usage if isinstance(usage, dict) else None), finished


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return str(error)


async def _error_message(response: httpx.Response) -> str:
    """What an error answer says, from at most ``MAX_ERROR_BODY`` bytes of its body."""
    body = bytearray()
    truncated = False
    async for piece in response.aiter_bytes():
        body += piece
        if len(body) > MAX_ERROR_BODY:
            truncated = True
            del body[MAX_ERROR_BODY:]
            break
    text = body.decode(response.encoding or "utf-8", errors="replace")
    if truncated:
        return (
            f"{text[:ERROR_MESSAGE_CHARS]}… (error body truncated: longer than"
            f" {MAX_ERROR_BODY // 1024} KiB)"
        )
    try:
        parsed = json.loads(text)
    except ValueError:
        return text[:ERROR_MESSAGE_CHARS] or response.reason_phrase
    if isinstance(parsed, dict) and "error" in parsed:
        return _error_text(parsed["error"])
    return text[:ERROR_MESSAGE_CHARS]
