"""The native generations API: start, read, follow (SSE), cancel."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from store import (
    GenerationNotFound,
    GenerationRecord,
    StoreBackend,
    StreamBackend,
    StreamNotFound,
)
from streaming import GenerationPool, GenerationRequest, SessionManager, decode_event

from ._auth import check_event_token, current_user, event_token, events_url
from ._durable_streams import DurableStreams
from ._errors import BadRequest, InvalidRequest, PayloadTooLarge, Unauthorized
from ._json import JSONResponse, parse_json
from ._limits import OpenReaders, StoredBytes
from ._metrics import Metrics
from ._schemas import CreateGeneration, Generation, decode_body
from ._settings import Settings
from ._sse import READ_BYTES, follow

# No stream holds 10**18 messages; longer digit strings are refused before int() sees them.
MAX_OFFSET_DIGITS = 18
SEARCH_STEP = 256  # events a text_offset search steps back at a time from a known point


@dataclass(frozen=True)
class AppState:
    """What the handlers share: settings, the store, the pool, the sessions, the Durable
    Streams view of the store, and the metrics."""

    settings: Settings
    store: StoreBackend
    pool: GenerationPool
    sessions: SessionManager
    streams: DurableStreams
    metrics: Metrics
    readers: OpenReaders
    stored: StoredBytes


def app_state(request: Request) -> AppState:
    """The running app's state."""
    state: AppState = request.app.state.runtime.state
    return state


def url_base(request: Request) -> str:
    """The prefix of the API's own URLs: where it is mounted in a host app ("" at the root)."""
    base: str = request.scope.get("root_path", "")
    return base.rstrip("/")


def generation_json(record: GenerationRecord, *, base: str = "") -> Generation:
    """The public form of a generation snapshot; its URLs start with ``base``."""
    return Generation(
        id=record.id,
        status=record.status,
        provider=record.provider,
        model=record.model,
        text=record.text,
        next_offset=record.next_offset,
        error=record.error,
        usage=record.usage,
        cancel_requested=record.cancel_requested,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        url=f"{base}/v1/generations/{record.id}",
        events_url=f"{base}/v1/generations/{record.id}/events",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than ``limit`` bytes with 413."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    return bytes(body)


async def read_json_body(request: Request, settings: Settings) -> Any:
    """The parsed JSON body, refusing more than ``max_body_bytes`` (413) and anything that is
    not strict JSON within ``max_json_depth`` (400)."""
    body = await read_body(request, settings.max_body_bytes)
    if not body:
        raise BadRequest("the request body is empty; send a JSON object")
    return parse_json(body, max_depth=settings.max_json_depth)


def wants_event_stream(request: Request) -> bool:
    """Whether the client asked for SSE."""
    return "text/event-stream" in request.headers.get("accept", "")


def parse_offset(value: str, name: str) -> int:
    """A non-negative integer offset, or 400 naming the parameter."""
    if not value.isascii() or not value.isdigit():
        raise BadRequest(f"{name} must be a non-negative integer, got {value[:40]!r}")
    if len(value) > MAX_OFFSET_DIGITS:
        end = "the text so far" if name == "text_offset" else "the end of the stream"
        raise BadRequest(f"{name} {value[:20]}… is beyond {end}")
    return int(value)


def sse_response(
    state: AppState,
    chunks: AsyncIterator[bytes],
    *,
    protocol: str,
    user: str | None,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """An SSE response of pre-formatted ``chunks``, with the server's keep-alive and
    send-timeout settings; its reader and events are counted under ``protocol``, and it
    counts as one of ``user``'s open streams (429 past ``max_streams_per_user``)."""
    settings = state.settings
    return EventSourceResponse(
        state.readers.guard(state.metrics.count_events(chunks, protocol), user),
        ping=settings.sse_ping,
        send_timeout=settings.sse_send_timeout or None,
        sep="\n",
        headers={"Cache-Control": "no-cache", **(headers or {})},
    )


def lifetime_deadline(settings: Settings) -> float:
    """When an event stream opened now ends by ``sse_lifetime`` (never when it is 0)."""
    if not settings.sse_lifetime:
        return math.inf
    return anyio.current_time() + settings.sse_lifetime


def event_stream(
    state: AppState,
    record: GenerationRecord,
    *,
    user: str | None,
    offset: int,
    skip_chars: int = 0,
    headers: dict[str, str] | None = None,
) -> EventSourceResponse:
    """An SSE response following ``record`` from ``offset``."""
    chunks = follow(
        state.store,
        record.stream_id,
        offset,
        skip_chars=skip_chars,
        retry_ms=state.settings.sse_retry_ms,
        deadline=lifetime_deadline(state.settings),
    )
    return sse_response(state, chunks, protocol="native", user=user, headers=headers)


async def create_generation(request: Request) -> Response:
    """``POST /v1/generations``: start a generation; 202 with it, or its events as SSE."""
    state = app_state(request)
    user = await current_user(request)
    body = await read_json_body(request, state.settings)
    try:
        generation_request = GenerationRequest.from_json(body)  # its messages say the most
        decode_body(body, CreateGeneration)  # and the published type holds too
        state.pool.resolve_provider(generation_request)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    await state.stored.check(user)
    streaming = wants_event_stream(request)
    if streaming:
        state.readers.check(user)  # refuse before anything starts
    record = await state.pool.submit(generation_request, owner=user)
    base = url_base(request)
    location = f"{base}/v1/generations/{record.id}"
    if streaming:
        return event_stream(
            state,
            record,
            user=user,
            offset=0,
            headers={"Location": location, "Keepstream-Generation-Id": record.id},
        )
    return JSONResponse(generation_json(record, base=base), 202, headers={"Location": location})


async def get_generation(request: Request) -> Response:
    """``GET /v1/generations/{id}``: the snapshot (status, text so far, next_offset, …)."""
    pool = app_state(request).pool
    record = await pool.get(request.path_params["generation_id"], owner=await current_user(request))
    return JSONResponse(generation_json(record, base=url_base(request)))


async def generation_events(request: Request) -> Response:
    """``GET /v1/generations/{id}/events``: SSE from the client's resume point.

    A ``?token=`` from ``POST …/events-url`` stands in for the API key. The start is
    ``Last-Event-ID``, else ``?offset=``, else ``?text_offset=`` (characters —
    Unicode code points — already shown), else 0. 204 when a finished generation has nothing
    left for this client.
    """
    state = app_state(request)
    generation_id = request.path_params["generation_id"]
    token = event_token(request)
    if token is None:
        user = await current_user(request)
        record = await state.pool.locate(generation_id, owner=user)
    else:
        try:
            record = await state.pool.locate(generation_id)
        except GenerationNotFound:
            raise Unauthorized("the signed URL's token is not valid for this resource") from None
        user = record.owner
        check_event_token(request, token, resource=f"generation:{generation_id}", owner=user)
    length, closed = await state.store.stream_length(record.stream_id)
    skip = 0
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None and last_event_id.strip():
        offset = parse_offset(last_event_id.strip(), "Last-Event-ID")
    elif "offset" in request.query_params:
        offset = parse_offset(request.query_params["offset"], "offset")
    elif "text_offset" in request.query_params:
        text_offset = parse_offset(request.query_params["text_offset"], "text_offset")
        # The snapshot is a known point (its text ends at its next_offset): all of a
        # finished answer, at most a second behind a live one's events.
        known = await state.store.snapshot_length(record.id)
        offset, skip = await locate_text_offset(
            state.store, record.stream_id, text_offset, known=known
        )
    else:
        offset = 0
    if offset > length:
        raise BadRequest(f"offset {offset} is beyond the end of the stream (next offset {length})")
    if closed and offset == length:
        return Response(status_code=204)
    return event_stream(state, record, user=user, offset=offset, skip_chars=skip)


async def locate_text_offset(
    store: StreamBackend, stream_id: str, text_offset: int, *, known: tuple[int, int] = (0, 0)
) -> tuple[int, int]:
    """Map "characters already shown" to (message offset, characters to skip in it).

    ``known``: a point where the text so far is known to end (``(characters, offset)``, a
    snapshot's). The search starts from whichever of the stream's start and that point is
    nearer ``text_offset``: a client that saw most of a long answer costs the events after
    what it saw, not the whole answer. Behind the point it steps back until it is strictly
    before ``text_offset`` (at it exactly, an event from before, a final status say, may
    still be due), then goes forward as from the start.
    """
    position, offset = (0, 0)
    if text_offset >= known[0] // 2:  # nearer the known point (or past it)
        position, offset = await _back_to(store, stream_id, text_offset, known)
    while True:
        result = await store.read(stream_id, offset, max_bytes=READ_BYTES)
        for index, payload in enumerate(result.messages, start=offset):
            event = decode_event(payload)
            if event.get("type") == "delta":
                length = len(event["text"])
                if position + length <= text_offset:
                    position += length
                    continue
                return index, text_offset - position
            if position >= text_offset:
                return index, 0
        offset = result.next_offset
        if not result.messages:
            break
    if text_offset > position:
        raise BadRequest(
            f"text_offset {text_offset} is beyond the text so far ({position} characters)"
        )
    return offset, 0


async def _back_to(
    store: StreamBackend, stream_id: str, text_offset: int, known: tuple[int, int]
) -> tuple[int, int]:
    """From ``known``, a ``(characters, offset)`` point: the first point going back,
    a step of events at a time, whose characters are below ``text_offset`` (or the start)."""
    position, offset = known
    while position >= text_offset and offset > 0:
        start = at = max(0, offset - SEARCH_STEP)
        while at < offset:  # the step's events, a bounded read at a time
            result = await store.read(stream_id, at, limit=offset - at, max_bytes=READ_BYTES)
            if not result.messages:
                raise StreamNotFound(stream_id)  # shorter than its snapshot: deleted meanwhile
            for payload in result.messages:
                event = decode_event(payload)
                if event.get("type") == "delta":
                    position -= len(event["text"])
            at = result.next_offset
        offset = start
    return position, offset


async def generation_events_url(request: Request) -> Response:
    """``POST /v1/generations/{id}/events-url``: a short-lived URL for its events that needs
    no ``Authorization`` header (for a browser's ``EventSource``)."""
    user = await current_user(request)
    generation_id = request.path_params["generation_id"]
    await app_state(request).pool.locate(generation_id, owner=user)
    return JSONResponse(
        events_url(
            request,
            f"{url_base(request)}/v1/generations/{generation_id}/events",
            resource=f"generation:{generation_id}",
            owner=user,
        )
    )


async def cancel_generation(request: Request) -> Response:
    """``POST /v1/generations/{id}/cancel``: stop it; idempotent; a finished one is unchanged."""
    pool = app_state(request).pool
    record = await pool.cancel(
        request.path_params["generation_id"], owner=await current_user(request)
    )
    return JSONResponse(generation_json(record, base=url_base(request)))


routes = [
    Route("/v1/generations", create_generation, methods=["POST"]),
    Route("/v1/generations/{generation_id}", get_generation, methods=["GET"]),
    Route("/v1/generations/{generation_id}/events", generation_events, methods=["GET"]),
    Route("/v1/generations/{generation_id}/cancel", cancel_generation, methods=["POST"]),
    Route("/v1/generations/{generation_id}/events-url", generation_events_url, methods=["POST"]),
]
