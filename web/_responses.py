"""The OpenAI Responses API (background mode) as a view over generations.

A response *is* a keepstream generation: its id is the generation's id, so
``/v1/responses/{id}`` and ``/v1/generations/{id}`` name the same thing, with the same owner
scoping (another user's id is not found). Nothing is stored twice: the Response object and
every stream event are computed from the generation's row and log (``_responses_events``).

``previous_response_id`` continues a conversation by building the new request's context from
the previous generation's stored messages (without its instructions, as OpenAI does) and its
text. Deliberately not a keepstream session: OpenAI lets two responses continue the same
previous one (a fork), while a session is one linear conversation with a per-user limit on
open sessions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from store import TERMINAL_STATUSES, GenerationNotFound, StreamNotFound
from streaming import ChatMessage, GenerationRequest, decode_event, fit_history

from ._auth import current_user
from ._errors import BadRequest, InvalidRequest
from ._generations import AppState, app_state, parse_offset, read_json_body, sse_response
from ._json import JSONResponse, encode_json
from ._responses_events import OPTIONS_KEY, EventMapper, ResponseView, snapshot
from ._responses_schemas import CreateResponse, ResponseInputMessage
from ._schemas import decode_body
from ._sse import READ_BYTES, batched_writes

PROTOCOL = "responses"
# Options kept with the generation and echoed in its Response object.
ECHOED = (
    "background",
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "previous_response_id",
    "temperature",
    "tool_choice",
    "top_p",
    "truncation",
    "user",
)
BOOLEANS = {"true": True, "false": False}


# -- the request -------------------------------------------------------------------------------


def input_messages(body: CreateResponse) -> list[ChatMessage]:
    """``input`` as chat messages (a string is one user message)."""
    if isinstance(body.input, str):
        return [ChatMessage("user", body.input)]
    if not isinstance(body.input, list):
        return []
    return [ChatMessage(item.role, message_text(item)) for item in body.input]


def message_text(item: ResponseInputMessage) -> str:
    """A message's text: its content string, or its text parts joined."""
    if isinstance(item.content, str):
        return item.content
    return "".join(part.text for part in item.content)


def check_supported(body: CreateResponse) -> None:
    """Refuse (422) what keepstream cannot honour: tools, and formats other than text."""
    if body.tools:
        raise InvalidRequest("tools are not supported: keepstream streams text answers only")
    text_format = (body.text or {}).get("format")
    if text_format is not None and (
        not isinstance(text_format, dict) or text_format.get("type") != "text"
    ):
        raise InvalidRequest(
            "text.format must be {'type': 'text'}: only text answers are supported"
        )


async def history(state: AppState, previous_id: str, user: str | None) -> list[ChatMessage]:
    """The conversation up to and including the previous response's answer: its request's
    messages without the instructions it was given, then its text."""
    previous = await state.pool.get(previous_id, owner=user)  # not found: 404
    if previous.status not in TERMINAL_STATUSES:
        raise BadRequest(
            f"previous response {previous_id} is still in progress; wait for it to finish"
        )
    view = ResponseView.of(previous)
    stored = previous.request.get("messages") or []
    messages = [ChatMessage(m["role"], m["content"]) for m in stored]
    if view.options.get("instructions") is not None and messages:
        messages = messages[1:]
    if previous.text:
        messages.append(ChatMessage("assistant", previous.text))
    return messages


async def generation_request(
    state: AppState, body: CreateResponse, user: str | None
) -> GenerationRequest:
    """The generation a Responses request asks for; 422 for what cannot run, 404 for an
    unknown ``previous_response_id``."""
    check_supported(body)
    messages: list[ChatMessage] = []
    if body.instructions is not None:
        messages.append(ChatMessage("system", body.instructions))
    given = input_messages(body)
    if body.previous_response_id is not None:
        # The conversation so far, as much of it as fits --history-chars (as for sessions):
        # a long chain neither grows every request nor overflows the model's context.
        earlier = await history(state, body.previous_response_id, user)
        budget = state.settings.history_chars - sum(len(m.content) for m in given)
        messages += fit_history(earlier, budget)
    messages += given
    if not messages:
        raise InvalidRequest("give 'input' (a string or a list of messages)")
    params: dict[str, Any] = {}
    if body.max_output_tokens is not None:
        params["max_tokens"] = body.max_output_tokens
    options = {name: getattr(body, name) for name in ECHOED if getattr(body, name) is not None}
    request = GenerationRequest(
        tuple(messages), model=body.model, params=params, metadata={OPTIONS_KEY: options}
    )
    sampling = {
        name: value
        for name, value in (("temperature", body.temperature), ("top_p", body.top_p))
        if value is not None
    }
    if sampling:
        # Sampling is a hint (OpenAI's reasoning models ignore it too): providers that take
        # it get it, the others (the simulated model) run without it.
        sampled = replace(request, params={**params, **sampling})
        with suppress(ValueError):
            state.pool.resolve_provider(sampled)
            return sampled
    try:
        state.pool.resolve_provider(request)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return request


# -- the event stream --------------------------------------------------------------------------


def format_event(kind: str, data: dict[str, Any]) -> bytes:
    """One SSE frame: ``event: <type>`` and the JSON data (which has no raw newline)."""
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), encode_json(data))


async def response_events(
    state: AppState, view: ResponseView, stream_id: str, *, starting_after: int | None
) -> AsyncIterator[bytes]:
    """The response's events with a sequence number above ``starting_after`` (all when
    ``None``): the log replayed from its start, then followed live until it closes.

    Replaying from the start, rather than seeking, is what keeps the numbering exact: the
    sequence numbers are a function of the whole log (see ``_responses_events``).
    """
    store = state.store
    mapper = EventMapper(view)
    after = -1 if starting_after is None else starting_after
    pending = mapper.created()
    reads = store.follow(stream_id, 0, max_bytes=READ_BYTES)
    try:
        async with aclosing(reads):
            async for result in reads:
                for payload in result.messages:
                    event = decode_event(payload)
                    finished_at = None
                    if event.get("type") == "status" and event.get("status") in TERMINAL_STATUSES:
                        # The row's end time was committed with this very event.
                        with suppress(GenerationNotFound):  # deleted meanwhile: the rest holds
                            finished_at = (await store.locate_generation(view.id)).finished_at
                    pending += mapper.feed(event, finished_at=finished_at)
                frames = [format_event(kind, data) for seq, kind, data in pending if seq > after]
                pending = []
                for write in batched_writes(frames):
                    yield write
    except StreamNotFound:
        return


def stream_response(
    state: AppState,
    view: ResponseView,
    stream_id: str,
    *,
    user: str | None,
    starting_after: int | None = None,
) -> Response:
    """The response's events as SSE (counted as one of ``user``'s open streams)."""
    chunks = response_events(state, view, stream_id, starting_after=starting_after)
    return sse_response(state, chunks, protocol=PROTOCOL, user=user)


# -- handlers ----------------------------------------------------------------------------------


async def create_response(request: Request) -> Response:
    """``POST /v1/responses``: start a generation. With ``background`` the Response answers
    at once (``queued``), or its events with ``stream``; without it the answer is awaited
    (or streamed), as the real API does. The generation runs to its end either way."""
    state = app_state(request)
    user = await current_user(request)
    raw = await read_json_body(request, state.settings)
    try:
        body: CreateResponse = decode_body(raw, CreateResponse)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    generation = await generation_request(state, body, user)
    await state.stored.check(user)
    waits = not body.background  # the answer is awaited or streamed in this request
    if waits:
        state.readers.check(user)  # refuse before anything starts
    record = await state.pool.submit(generation, owner=user)
    view = ResponseView.of(record)
    if body.stream:
        return stream_response(state, view, record.stream_id, user=user)
    if body.background:
        return JSONResponse(snapshot(record))
    # Waiting holds a request open as a stream does: it counts as one of the user's.
    release = state.readers.claim(user)
    try:
        await state.pool.wait_ended(record.id)
    finally:
        release()
    return JSONResponse(snapshot(await state.pool.get(record.id, owner=user)))


def query_flag(request: Request, name: str) -> bool:
    """A ``true``/``false`` query parameter (absent: false), or 400."""
    value = request.query_params.get(name, "false")
    if value.lower() not in BOOLEANS:
        raise BadRequest(f"{name} must be true or false, got {value[:40]!r}")
    return BOOLEANS[value.lower()]


async def get_response(request: Request) -> Response:
    """``GET /v1/responses/{id}``: the Response; with ``?stream=true`` its events — all of
    them, or those after ``starting_after`` — then live until it ends."""
    state = app_state(request)
    user = await current_user(request)
    stream = query_flag(request, "stream")
    starting_after = None
    if stream and "starting_after" in request.query_params:
        starting_after = parse_offset(request.query_params["starting_after"], "starting_after")
    record = await state.pool.get(request.path_params["response_id"], owner=user)
    if stream:
        return stream_response(
            state,
            ResponseView.of(record),
            record.stream_id,
            user=user,
            starting_after=starting_after,
        )
    return JSONResponse(snapshot(record))


async def cancel_response(request: Request) -> Response:
    """``POST /v1/responses/{id}/cancel``: stop it, keeping the text so far; idempotent (a
    finished response is answered unchanged)."""
    state = app_state(request)
    record = await state.pool.cancel(
        request.path_params["response_id"], owner=await current_user(request)
    )
    return JSONResponse(snapshot(record))


routes = [
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/responses/{response_id}", get_response, methods=["GET"]),
    Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
]
