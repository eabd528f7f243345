"""The Vercel AI SDK view: ``useChat`` / ``DefaultChatTransport`` over keepstream sessions.

A chat id names one keepstream session per owner. ``POST /api/chat`` posts the last user
message (or, with ``trigger: "regenerate-message"``, replaces the last answer) and answers
with the UI message stream v1; ``GET /api/chat/{id}/stream`` replays the running answer from
its ``start`` chunk and follows it live (204 when nothing runs); ``POST /api/chat/{id}/stop``
cancels it and keeps the partial text. Wire format: ``../shared/docs/client-protocols.md``.

The chunks carry exactly the fields of the SDK's chunk types and nothing more: clients
before ai 5.0.217 / 6.0.231 / 7.0.32 validate strictly and reject unknown fields.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from store import ACTIVE_STATUSES, SessionNotFound, StreamNotFound
from streaming import answer_message_id, decode_event

from ._auth import current_user
from ._errors import InvalidRequest, WebError
from ._generations import AppState, app_state, read_json_body, sse_response
from ._json import encode_json
from ._sse import READ_BYTES, batched_writes

PROTOCOL = "ai-sdk"
MAX_CHAT_ID = 200
MAX_MESSAGE_ID = 255
# Headers of a UI message stream, as the SDK's own ``createUIMessageStreamResponse`` sends
# them (``Cache-Control: no-cache`` comes from ``sse_response``). The content type is given
# explicitly so no ``charset`` parameter is appended.
STREAM_HEADERS = {
    "content-type": "text/event-stream",
    "x-vercel-ai-ui-message-stream": "v1",
    "x-accel-buffering": "no",
}
TEXT_PART_ID = "text-0"  # one text part per answer
DONE = b"data: [DONE]\n\n"
# A chat session's settings: it closes when an answer completes and reopens with the next
# message ("reopen" keeps the chat in the same session: a successor would lose the chat id's
# mapping), so only chats with an answer under way count as open sessions: a user with
# hundreds of chats is not held to --max-sessions-per-user of them.
CHAT_SESSION_SETTINGS: dict[str, Any] = {
    "on_closed": "reopen",
    "on_busy": "reject",
    "close_on_complete": True,
}


# -- the request body --------------------------------------------------------------------------
# Unknown fields are accepted on purpose: the SDK sends its own extras (``metadata``, the
# transport's ``body`` option, tool parts) and a view must not refuse them.


class UIMessagePart(Struct, kw_only=True):
    """One part of a UI message; only ``text`` parts are read."""

    type: str
    text: str | UnsetType = UNSET


class UIMessage(Struct, kw_only=True):
    """A message as ``useChat`` holds it."""

    id: Annotated[str, Meta(min_length=1, max_length=MAX_MESSAGE_ID)]
    role: Literal["system", "user", "assistant"]
    parts: list[UIMessagePart]


class ChatRequest(Struct, kw_only=True):
    """``POST /api/chat``: what ``DefaultChatTransport`` sends."""

    id: Annotated[str, Meta(min_length=1, max_length=MAX_CHAT_ID)]
    messages: Annotated[list[UIMessage], Meta(min_length=1)]
    trigger: Literal["submit-message", "regenerate-message"]
    messageId: Annotated[str, Meta(max_length=MAX_MESSAGE_ID)] | UnsetType | None = UNSET


class ChatPaused(WebError):
    """The chat's session is paused: nothing can be answered there (409)."""

    status = 409
    type = "session_paused"


def decode_chat_request(value: Any) -> ChatRequest:
    """The parsed body as a ``ChatRequest``, or 422 naming the field."""
    try:
        return msgspec.convert(value, ChatRequest)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(str(exc).replace(" - at `$`", "").replace("`$.", "`")) from None


def question_of(body: ChatRequest) -> tuple[UIMessage, str]:
    """The last message, which must be the user's, and its text parts joined; else 422."""
    message = body.messages[-1]
    if message.role != "user":
        raise InvalidRequest("the last of 'messages' must be the user's message to answer")
    text = "\n".join(p.text for p in message.parts if p.type == "text" and isinstance(p.text, str))
    if not text:
        raise InvalidRequest("the last user message has no text part with text")
    return message, text


def chat_session_id(owner: str | None, chat_id: str) -> str:
    """The keepstream session a chat id names for ``owner``: derived, so no mapping is
    stored and two owners' equal chat ids never meet."""
    digest = hashlib.sha256(f"ai-sdk-chat\0{owner or ''}\0{chat_id}".encode()).digest()
    return "ses_" + base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()


def _key(*parts: str) -> str:
    return "ai-sdk:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


# -- the UI message stream ---------------------------------------------------------------------


def frame(chunk: dict[str, Any]) -> bytes:
    """One UI message chunk as an SSE event (``data:`` only, as the SDK writes it)."""
    return b"data: " + encode_json(chunk) + b"\n\n"


class ChunkTranslator:
    """Turns a generation's stored events, in order, into UI message chunks."""

    def __init__(self) -> None:
        self.text_open = False

    def chunks(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks one stored event becomes (none for ``running``)."""
        kind, status = event.get("type"), event.get("status")
        if kind == "delta":
            delta = {"type": "text-delta", "id": TEXT_PART_ID, "delta": event["text"]}
            if self.text_open:
                return [delta]
            self.text_open = True
            return [{"type": "text-start", "id": TEXT_PART_ID}, delta]
        if kind != "status" or status in ACTIVE_STATUSES:
            return []
        chunks: list[dict[str, Any]] = []
        if self.text_open:
            chunks.append({"type": "text-end", "id": TEXT_PART_ID})
            self.text_open = False
        chunks.append({"type": "finish-step"})
        if status == "completed":
            chunks.append({"type": "finish"})
        elif status == "cancelled":
            chunks.append({"type": "abort"})
        else:
            error = event.get("error")
            text = error.get("message") if isinstance(error, dict) else None
            chunks.append({"type": "error", "errorText": str(text or f"the answer {status}")})
        return chunks


async def ui_message_stream(
    state: AppState, generation_id: str, message_id: str
) -> AsyncIterator[bytes]:
    """A generation's answer as the UI message stream v1, from its ``start`` chunk to
    ``[DONE]``: committed events first, then live ones as they commit.

    Reads are bounded (``READ_BYTES``) and each write holds at most about ``CHUNK_BYTES``.
    """
    # The metrics count ``event:`` lines, which this framing has none of: count here.
    sent = state.metrics.sse_events.labels(PROTOCOL)
    store = state.store
    translator = ChunkTranslator()
    yield frame({"type": "start", "messageId": message_id}) + frame({"type": "start-step"})
    sent.inc(2)
    reads = store.follow(generation_id, 0, max_bytes=READ_BYTES)  # it writes its own stream
    try:
        async with aclosing(reads):
            async for result in reads:
                frames = [
                    frame(chunk)
                    for payload in result.messages
                    for chunk in translator.chunks(decode_event(payload))
                ]
                sent.inc(len(frames))
                if result.at_end:
                    frames.append(DONE)  # no chunk: not counted
                for write in batched_writes(frames):
                    yield write
    except StreamNotFound:  # its session was deleted meanwhile
        yield frame({"type": "error", "errorText": "the chat was deleted"}) + DONE


def ui_response(
    state: AppState, session_id: str, generation_id: str, user: str | None
) -> EventSourceResponse:
    """The SSE response streaming a generation's answer to the AI SDK; its headers also
    name the keepstream session and generation (for the native APIs)."""
    return sse_response(
        state,
        ui_message_stream(state, generation_id, answer_message_id(generation_id)),
        protocol=PROTOCOL,
        user=user,
        headers={
            **STREAM_HEADERS,
            "Keepstream-Session-Id": session_id,
            "Keepstream-Generation-Id": generation_id,
        },
    )


# -- handlers ----------------------------------------------------------------------------------


async def send_chat(request: Request) -> Response:
    """``POST /api/chat``: answer the chat's last user message, or (``trigger:
    "regenerate-message"``) replace its last answer; 200 with the UI message stream.

    Idempotent: a retried request (same chat, same user message id and text) streams the
    answer the first one started instead of posting again; so does a retried regenerate
    that names the replaced message (``messageId``).
    """
    state = app_state(request)
    user = await current_user(request)
    body = decode_chat_request(await read_json_body(request, state.settings))
    if body.trigger == "submit-message" and isinstance(body.messageId, str):
        # The SDK's edit: it would rewind the chat to that message. A session's history
        # only grows (or drops its last answer), so an edit is refused, not mis-applied.
        raise InvalidRequest(
            "editing an earlier message is not supported; send the new text as a new message"
        )
    question = question_of(body) if body.trigger == "submit-message" else None
    await state.stored.check(user)
    state.readers.check(user)  # refuse before anything is stored
    sessions = state.sessions
    session = await sessions.get_or_create(
        chat_session_id(user, body.id),
        owner=user,
        settings={**CHAT_SESSION_SETTINGS, "title": body.id},
    )
    if session.status == "paused":
        raise ChatPaused(f"the chat's session {session.id!r} is paused; set it active to chat")
    try:
        if question is not None:
            message, text = question
            posted = await sessions.post(
                session.id, text, owner=user, idempotency_key=_key(body.id, message.id, text)
            )
        else:
            replaced = body.messageId if isinstance(body.messageId, str) else None
            posted = await sessions.regenerate(
                session.id,
                owner=user,
                idempotency_key=_key(body.id, "regenerate", replaced) if replaced else None,
            )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if posted.generation is None:  # paused in the meantime: stored, not answered
        raise ChatPaused(f"the chat's session {session.id!r} is paused; the message is kept")
    return ui_response(state, session.id, posted.generation.id, user)


async def _active_generation(state: AppState, user: str | None, session_id: str) -> str | None:
    try:
        return await state.sessions.active_generation(session_id, owner=user)
    except SessionNotFound:  # an unknown chat, or (the ids being per owner) another's
        return None


async def resume_chat(request: Request) -> Response:
    """``GET /api/chat/{chat_id}/stream``: the running answer from its ``start`` chunk, then
    live to its end; 204 when the chat has no queued or running answer (or is unknown)."""
    state = app_state(request)
    user = await current_user(request)
    session_id = chat_session_id(user, request.path_params["chat_id"])
    active = await _active_generation(state, user, session_id)
    if active is None:
        return Response(status_code=204)
    return ui_response(state, session_id, active, user)


async def stop_chat(request: Request) -> Response:
    """``POST /api/chat/{chat_id}/stop``: cancel the running answer, keeping its partial
    text (its streams end with ``abort``); idempotent, 204 whether or not one ran."""
    state = app_state(request)
    user = await current_user(request)
    session_id = chat_session_id(user, request.path_params["chat_id"])
    active = await _active_generation(state, user, session_id)
    if active is not None:
        await state.pool.cancel(active, owner=user)
    return Response(status_code=204)


routes = [
    Route("/api/chat", send_chat, methods=["POST"]),
    Route("/api/chat/{chat_id}/stream", resume_chat, methods=["GET"]),
    Route("/api/chat/{chat_id}/stop", stop_chat, methods=["POST"]),
]
