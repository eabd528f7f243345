"""The sessions API: conversations, their messages, and their answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from store import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    SessionMessage,
    SessionNotFound,
    SessionRecord,
    SessionSummary,
)
from streaming import PostedMessage

from . import _schemas as schemas
from ._auth import check_event_token, current_user, event_token, events_url
from ._errors import BadRequest, InvalidRequest, Unauthorized
from ._generations import (
    AppState,
    app_state,
    event_stream,
    generation_json,
    lifetime_deadline,
    parse_offset,
    read_json_body,
    sse_response,
    url_base,
    wants_event_stream,
)
from ._json import JSONResponse
from ._sse import follow

MERGE_PATCH = "application/merge-patch+json"
MAX_LIST_LIMIT = 1000
MAX_IDEMPOTENCY_KEY = 255


def session_json(record: SessionRecord, *, base: str = "") -> schemas.Session:
    """The public form of a session; its URL starts with ``base``."""
    return schemas.Session(**_session_fields(record, base))


def _session_fields(record: SessionRecord, base: str) -> dict[str, Any]:
    return {
        "id": record.id,
        "title": record.title,
        "status": record.status,
        "closed_reason": record.closed_reason,
        "context": record.context,
        "keep_open": record.keep_open,
        "on_closed": record.on_closed,
        "on_busy": record.on_busy,
        "close_on_complete": record.close_on_complete,
        "previous_session_id": record.previous_session_id,
        "message_count": record.message_count,
        "trimmed_messages": record.trimmed_messages,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "last_activity_at": record.last_activity_at,
        "closed_at": record.closed_at,
        "url": f"{base}/v1/sessions/{record.id}",
    }


def summary_json(summary: SessionSummary, *, base: str = "") -> schemas.SessionSummary:
    """A session as a list shows it: with its newest generation and whether it is running."""
    latest = None
    if summary.latest_generation_id is not None:
        latest = schemas.LatestGeneration(
            id=summary.latest_generation_id,
            status=summary.latest_generation_status,  # type: ignore[arg-type]
        )
    active = latest is not None and latest.status in ACTIVE_STATUSES
    return schemas.SessionSummary(
        **_session_fields(summary.session, base),
        latest_generation=latest,
        active_generation_id=summary.latest_generation_id if active else None,
    )


def message_json(message: SessionMessage) -> schemas.SessionMessage:
    """The public form of a session message."""
    return schemas.SessionMessage(
        id=message.id,
        role=message.role,  # type: ignore[arg-type]
        content=message.content,
        generation_id=message.generation_id,
        generation_status=message.generation_status,  # type: ignore[arg-type]
        created_at=message.created_at,
    )


def request_fields(body: Any, kind: type[schemas.Request]) -> dict[str, Any]:
    """The fields a JSON body of type ``kind`` sets, or 422 naming what is wrong."""
    try:
        return schemas.set_fields(schemas.decode_body(body, kind))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


async def create_session(request: Request) -> Response:
    """``POST /v1/sessions``: open a session; 201 with it."""
    state = app_state(request)
    user = await current_user(request)
    await state.stored.check(user)
    body = request_fields(await read_json_body(request, state.settings), schemas.CreateSession)
    try:
        record = await state.sessions.create(user, body)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    base = url_base(request)
    return JSONResponse(
        session_json(record, base=base),
        201,
        headers={"Location": f"{base}/v1/sessions/{record.id}"},
    )


async def list_sessions(request: Request) -> Response:
    """``GET /v1/sessions``: the caller's sessions, newest activity first (``?status=``)."""
    state = app_state(request)
    user = await current_user(request)
    status = request.query_params.get("status")
    raw_limit = request.query_params.get("limit", "100")
    if (
        not raw_limit.isascii()
        or not raw_limit.isdigit()
        or not 1 <= int(raw_limit) <= (MAX_LIST_LIMIT)
    ):
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}")
    try:
        summaries = await state.sessions.list_for(owner=user, status=status, limit=int(raw_limit))
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    base = url_base(request)
    return JSONResponse(schemas.SessionList(data=[summary_json(s, base=base) for s in summaries]))


async def get_session(request: Request) -> Response:
    """``GET /v1/sessions/{id}``: the session with its messages."""
    state = app_state(request)
    user = await current_user(request)
    session_id = request.path_params["session_id"]
    record = await state.sessions.get(session_id, owner=user)
    messages = await state.sessions.messages(session_id, owner=user)
    return JSONResponse(
        schemas.SessionWithMessages(
            **_session_fields(record, url_base(request)),
            messages=[message_json(m) for m in messages],
        )
    )


async def update_session(request: Request) -> Response:
    """``PATCH /v1/sessions/{id}``: title, context, status, keep_open, policies.

    With ``Content-Type: application/merge-patch+json`` the context is merged (RFC 7396);
    with ``application/json`` a given context replaces the old one.
    """
    state = app_state(request)
    user = await current_user(request)
    session_id = request.path_params["session_id"]
    raw = await read_json_body(request, state.settings)
    try:
        body = request_fields(raw, schemas.UpdateSession)
    except InvalidRequest:
        await state.sessions.get(session_id, owner=user)  # a missing session is 404 first
        raise
    if "context" in body or "title" in body:
        await state.stored.check(user)
    merge = request.headers.get("content-type", "").split(";")[0].strip() == MERGE_PATCH
    try:
        record = await state.sessions.update(session_id, body, owner=user, merge=merge)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return JSONResponse(session_json(record, base=url_base(request)))


async def delete_session(request: Request) -> Response:
    """``DELETE /v1/sessions/{id}``: cancel its answer, delete it and all it holds."""
    state = app_state(request)
    await state.sessions.delete(
        request.path_params["session_id"], owner=await current_user(request)
    )
    return Response(status_code=204)


async def post_message(request: Request) -> Response:
    """``POST /v1/sessions/{id}/messages`` ``{content}``: store it and start the answer.

    202 with the session, the message id and the generation (``null`` while paused); with
    ``Accept: text/event-stream``, the answer's events. A repeated ``Idempotency-Key`` gets
    the first request's message and generation.
    """
    state = app_state(request)
    user = await current_user(request)
    body = request_fields(await read_json_body(request, state.settings), schemas.PostMessage)
    content = body["content"]
    if not content:
        raise InvalidRequest("'content' must be a non-empty string")
    await state.stored.check(user)
    if wants_event_stream(request):
        state.readers.check(user)  # refuse before anything is stored
    try:
        posted = await state.sessions.post(
            request.path_params["session_id"],
            content,
            owner=user,
            idempotency_key=idempotency_key(request),
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return posted_answer(request, state, posted, user)


async def regenerate_answer(request: Request) -> Response:
    """``POST /v1/sessions/{id}/regenerate``: answer the last user message again.

    The last answer leaves the history (its generation stays readable; a running one is
    cancelled first) and a new one starts, with no new user message. Answers as ``POST
    …/messages`` does (202, or SSE with ``Accept: text/event-stream``); ``Idempotency-Key``
    likewise. 422 when the session is paused or has no user message to answer.
    """
    state = app_state(request)
    user = await current_user(request)
    await state.stored.check(user)
    if wants_event_stream(request):
        state.readers.check(user)
    try:
        posted = await state.sessions.regenerate(
            request.path_params["session_id"],
            owner=user,
            idempotency_key=idempotency_key(request),
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return posted_answer(request, state, posted, user)


def posted_answer(
    request: Request, state: AppState, posted: PostedMessage, user: str | None
) -> Response:
    """202 with what was posted, or (``Accept: text/event-stream``) the answer's events."""
    if posted.generation is not None and wants_event_stream(request):
        return event_stream(
            state,
            posted.generation,
            user=user,
            offset=0,
            headers={
                "Keepstream-Session-Id": posted.session.id,
                "Keepstream-Message-Id": posted.message_id,
                "Keepstream-Generation-Id": posted.generation.id,
            },
        )
    return JSONResponse(posted_json(posted, base=url_base(request)), 202)


def posted_json(posted: PostedMessage, *, base: str = "") -> schemas.PostedMessage:
    """What ``POST .../messages`` answers."""
    return schemas.PostedMessage(
        session=session_json(posted.session, base=base),
        session_id=posted.session.id,
        message_id=posted.message_id,
        generation=generation_json(posted.generation, base=base) if posted.generation else None,
        generation_id=posted.generation.id if posted.generation else None,
        reopened=posted.reopened,
        replayed=posted.replayed,
    )


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header, checked (1 to 255 printable ASCII characters)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )
    return key


SESSION_POLL_INTERVAL = 1.0  # how often a follower looks for another process's new answers


def parse_session_event_id(value: str) -> tuple[str, int]:
    """``<generation id>:<offset>`` from a session stream's ``Last-Event-ID``, or 400."""
    generation_id, sep, offset = value.strip().rpartition(":")
    if not sep or not generation_id:
        raise BadRequest(f"Last-Event-ID must be <generation id>:<offset>, got {value[:80]!r}")
    return generation_id, parse_offset(offset, "Last-Event-ID offset")


async def follow_session(
    state: AppState, session_id: str, start: tuple[str, int] | None
) -> AsyncIterator[bytes]:
    """SSE chunks of a session: its generation at ``start`` (or its latest one) to the end,
    then each newer one, while the session stays open."""
    sessions = state.sessions
    yield b"retry: %d\n\n" % state.settings.sse_retry_ms
    deadline = lifetime_deadline(state.settings)
    following, offset = start if start is not None else (None, 0)
    finished: str | None = None
    while anyio.current_time() < deadline:
        changed = sessions.changed(session_id)
        try:
            record = await sessions.store.get(session_id)
            ids = [gid for gid, _ in await sessions.store.generations(session_id)]
        except SessionNotFound:
            return
        if following not in ids:  # none yet, or it was deleted: the latest one
            following, offset = (ids[-1], 0) if ids else (None, 0)
        if following is not None and following != finished:
            # A session's generation writes the stream named by its id.
            async for chunk in follow(
                state.store,
                following,
                offset,
                id_prefix=following.encode() + b":",
                deadline=deadline,
            ):
                yield chunk
            if anyio.current_time() >= deadline:
                return  # maybe mid-answer: the client resumes from its last event id
            finished = following
        newer = ids[ids.index(following) + 1 :] if following in ids else []
        if newer:
            following, offset = newer[0], 0
            continue
        if record.status == "closed":
            return
        with anyio.move_on_after(min(SESSION_POLL_INTERVAL, deadline - anyio.current_time())):
            await changed.wait()


async def session_events(request: Request) -> Response:
    """``GET /v1/sessions/{id}/events``: what a client opens when it switches back.

    SSE following the session's latest generation (the running one, or the most recent),
    then every newer one while the session is open. Event ids are
    ``<generation id>:<offset>``, so a ``Last-Event-ID`` from an older answer first finishes
    that answer, then goes on with the newer ones. 204 when a closed session has nothing
    left for the client. A ``?token=`` from ``POST …/events-url`` stands in for the API key.
    """
    state = app_state(request)
    session_id = request.path_params["session_id"]
    token = event_token(request)
    if token is None:
        user = await current_user(request)
    else:
        try:
            user = (await state.sessions.store.get(session_id)).owner
        except SessionNotFound:
            raise Unauthorized("the signed URL's token is not valid for this resource") from None
        check_event_token(request, token, resource=f"session:{session_id}", owner=user)
    record = await state.sessions.get(session_id, owner=user)
    generations = await state.sessions.store.generations(session_id)
    ids = [gid for gid, _ in generations]
    start = None
    last_event_id = request.headers.get("last-event-id", "").strip()
    if last_event_id:
        start = parse_session_event_id(last_event_id)
        if start[0] not in ids:
            raise BadRequest(f"Last-Event-ID names generation {start[0]!r}, not of this session")
        length, _ = await state.store.stream_length(start[0])
        if start[1] > length:
            raise BadRequest(f"offset {start[1]} is beyond the end of {start[0]} ({length})")
    if record.status == "closed":
        nothing_left = not ids or (
            start is not None
            and start[0] == ids[-1]
            and generations[-1][1] in TERMINAL_STATUSES
            and start[1] == (await state.store.stream_length(start[0]))[0]
        )
        if nothing_left:
            return Response(status_code=204)
    return sse_response(
        state, follow_session(state, session_id, start), protocol="session", user=user
    )


async def session_events_url(request: Request) -> Response:
    """``POST /v1/sessions/{id}/events-url``: a short-lived URL for the session's events
    that needs no ``Authorization`` header (for a browser's ``EventSource``)."""
    user = await current_user(request)
    session_id = request.path_params["session_id"]
    await app_state(request).sessions.get(session_id, owner=user)
    return JSONResponse(
        events_url(
            request,
            f"{url_base(request)}/v1/sessions/{session_id}/events",
            resource=f"session:{session_id}",
            owner=user,
        )
    )


routes = [
    Route("/v1/sessions", create_session, methods=["POST"]),
    Route("/v1/sessions", list_sessions, methods=["GET"]),
    Route("/v1/sessions/{session_id}", get_session, methods=["GET"]),
    Route("/v1/sessions/{session_id}", update_session, methods=["PATCH"]),
    Route("/v1/sessions/{session_id}", delete_session, methods=["DELETE"]),
    Route("/v1/sessions/{session_id}/messages", post_message, methods=["POST"]),
    Route("/v1/sessions/{session_id}/regenerate", regenerate_answer, methods=["POST"]),
    Route("/v1/sessions/{session_id}/events", session_events, methods=["GET"]),
    Route("/v1/sessions/{session_id}/events-url", session_events_url, methods=["POST"]),
]
