"""What the HTTP providers share: an upstream event stream opened with retries before the
answer starts, and read under an idle deadline with malformed events counted.

Faults, and what becomes of them:

* before the answer starts (a refused or reset connection, a timeout before the response
  head, 408/409/429/5xx): called again, see ``_retry`` — at most ``retry_attempts`` calls
  within ``retry_deadline`` seconds;
* any other status, or a 200 that is not an event stream: failed at once (no retry);
* once the response head has arrived nothing is retried here (continuing a partial answer
  is the pool's business): a dropped connection, a silence past ``read_timeout``, no
  progress for ``idle_timeout`` (text, or a format's work events such as Dify's workflow
  steps; keep-alive comments and pings do not count), an end before the answer is complete,
  or more than ``MAX_MALFORMED_EVENTS`` malformed events all fail the generation, its text
  so far kept;
* once the answer is complete (a ``finish_reason``, Dify's ``message_end``), whatever the
  connection does next (drop, stall, go quiet) ends it completed.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import stamina
from httpx_sse import EventSource, ServerSentEvent

from store.types import JSONDict

from ._exceptions import ProviderError
from ._retry import (
    DEFAULT_RETRY_ATTEMPTS,
    DEFAULT_RETRY_DEADLINE,
    RetryableError,
    backoff,
    is_retryable_status,
    retry_after_seconds,
)
from .types import ProviderChunk

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 120.0
DEFAULT_IDLE_TIMEOUT = 60.0
# Malformed events are skipped and counted (reported as ``usage["malformed_chunks"]``); one
# more than this in one answer fails it: the upstream is not speaking the protocol.
MAX_MALFORMED_EVENTS = 3
# An error body is read this far and no further (it may be a multi-megabyte HTML page).
MAX_ERROR_BODY = 16 * 1024
ERROR_MESSAGE_CHARS = 500


class Malformed(Exception):
    """An event that does not have the shape its format promises."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """What one event of an upstream stream means: a chunk of the answer (or nothing),
    whether the answer is now complete, whether nothing more is to be read, and whether it
    shows the upstream at work without text (a workflow step: the idle deadline moves)."""

    chunk: ProviderChunk | None = None
    finished: bool = False
    last: bool = False
    progress: bool = False


# Reads one event; raises ``Malformed`` for a misshapen one and ``ProviderError`` for an
# error the upstream reports in the stream.
EventParser = Callable[[ServerSentEvent], Parsed]


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """How long an HTTP upstream may take, and how often it is called before an answer
    starts. A ``read_timeout`` or ``idle_timeout`` of 0 (or ``None``) means no limit (as
    ``--sse-send-timeout 0`` does)."""

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read_timeout: float | None = DEFAULT_READ_TIMEOUT
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
    retry_deadline: float = DEFAULT_RETRY_DEADLINE

    def __post_init__(self) -> None:
        if self.retry_attempts < 1:
            raise ValueError("retry_attempts must be >= 1")
        if self.retry_deadline <= 0:
            raise ValueError("retry_deadline must be > 0")


DEFAULT_LIMITS = UpstreamLimits()


class EventStreamUpstream:
    """An HTTP upstream that answers a POST with a ``text/event-stream``, within
    ``limits``."""

    def __init__(
        self,
        *,
        headers: Mapping[str, str] | None = None,
        limits: UpstreamLimits = DEFAULT_LIMITS,
    ) -> None:
        self.idle_timeout = limits.idle_timeout or math.inf
        self.retry_attempts = limits.retry_attempts
        self.retry_deadline = limits.retry_deadline
        self.client = httpx.AsyncClient(
            headers=dict(headers or {}),
            # httpx reads a timeout of 0 as "already expired": every request would fail at
            # its first write, so 0 is mapped to None (no limit) instead.
            timeout=httpx.Timeout(limits.read_timeout or None, connect=limits.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    # -- the response head, retried -----------------------------------------------------------

    async def open(self, url: str, body: Mapping[str, Any]) -> httpx.Response:
        """An open 200 event-stream response to ``POST url``, after at most
        ``retry_attempts`` calls; ``ProviderError`` when there is none."""
        request = self.client.build_request(
            "POST",
            url,
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
            response = await self.client.send(request, stream=True)
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
                message = await error_message(response)
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

    async def chunks(
        self, response: httpx.Response, parse: EventParser
    ) -> AsyncGenerator[ProviderChunk, None]:
        """The answer in an open event stream, event by event through ``parse``, under the
        idle deadline. It must end with an event ``parse`` calls finished."""
        events = EventSource(response).aiter_sse()
        # The idle deadline moves only on progress (text, or a work event), so keep-alive
        # comments (which httpx-sse swallows) and pings cannot keep a dead answer alive. It
        # bounds each wait on its own: no cancel scope is held across a ``yield``.
        deadline = anyio.current_time() + self.idle_timeout
        finished = received = False
        malformed = 0
        usage: JSONDict | None = None
        try:
            while True:
                with anyio.CancelScope(deadline=deadline) as waiting:
                    try:
                        sse = await anext(events, None)
                    except httpx.HTTPError:
                        if finished:  # complete: only the goodbye was lost
                            break
                        raise
                if waiting.cancelled_caught:
                    if finished:
                        break
                    raise ProviderError(
                        f"upstream sent no text for {self.idle_timeout:g} s",
                        kind="upstream_stalled",
                    )
                if sse is None:
                    break
                received = True
                try:
                    parsed = parse(sse)
                except Malformed:
                    malformed += 1
                    if malformed > MAX_MALFORMED_EVENTS:
                        raise ProviderError(
                            f"upstream sent {malformed} malformed events, the last:"
                            f" {sse.data[:200]!r}",
                            kind="upstream_malformed",
                        ) from None
                    continue
                finished = finished or parsed.finished
                chunk = parsed.chunk
                if parsed.progress or (chunk is not None and chunk.text):
                    deadline = anyio.current_time() + self.idle_timeout
                if chunk is not None:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    yield chunk
                if parsed.last:
                    break
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


def json_object(data: str) -> dict[str, Any]:
    """An event's data as a JSON object; ``Malformed`` if it is not one."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError:
        raise Malformed(data) from None
    if not isinstance(obj, dict):
        raise Malformed(data)
    return obj


def error_text(error: Any) -> str:
    """What an upstream's error object says: its ``message``, else the object as it is."""
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return str(error)


def coded_error_text(error: dict[str, Any]) -> str:
    """A ``{"code", "message"}`` error (Dify's) as ``code: message``."""
    code = error.get("code")
    message = error_text(error)
    return f"{code}: {message}" if isinstance(code, str) and code else message


async def error_message(response: httpx.Response) -> str:
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
        return error_text(parsed["error"])[:ERROR_MESSAGE_CHARS]
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        return coded_error_text(parsed)[:ERROR_MESSAGE_CHARS]
    return text[:ERROR_MESSAGE_CHARS]
