"""The HTTP API's request and response bodies, as msgspec types.

Handlers decode request bodies into these types and answer with them; ``/openapi.json`` is
generated from the same types, so the published schema is the code's own, never a copy.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

GenerationStatus = Literal["queued", "running", "completed", "failed", "cancelled", "interrupted"]
Role = Literal["system", "user", "assistant", "tool", "developer"]
SessionStatus = Literal["active", "paused", "closed"]
OnClosed = Literal["reopen", "new", "reject"]
OnBusy = Literal["reject", "queue", "interrupt"]


class Request(Struct, forbid_unknown_fields=True, kw_only=True):
    """A request body: unknown fields are refused."""


# -- generations -------------------------------------------------------------------------------


class ChatMessageBody(Request):
    """One message of a conversation."""

    role: Role
    content: str


class CreateGeneration(Request):
    """``POST /v1/generations``: exactly one of ``prompt`` and ``messages``."""

    prompt: str | UnsetType = UNSET
    messages: list[ChatMessageBody] | UnsetType = UNSET
    provider: str | None = None
    model: str | None = None
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class Generation(Struct, kw_only=True):
    """A generation's snapshot: where it stands and its text so far."""

    id: str
    object: Literal["generation"] = "generation"
    status: GenerationStatus
    provider: str
    model: str | None
    text: str
    next_offset: int
    error: dict[str, Any] | None
    usage: dict[str, Any] | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    url: str
    events_url: str


class EventsUrl(Struct, kw_only=True):
    """A URL that opens a generation's or session's events without an ``Authorization``
    header (for ``EventSource``); ``expires_at`` (Unix seconds) is ``null`` when the server
    has no API keys and the URL needs no token."""

    url: str
    expires_at: int | None


# -- sessions ----------------------------------------------------------------------------------


class CreateSession(Request):
    """``POST /v1/sessions``: every field optional."""

    title: str | UnsetType = UNSET
    context: dict[str, Any] | UnsetType = UNSET
    keep_open: bool | UnsetType = UNSET
    on_closed: OnClosed | UnsetType = UNSET
    on_busy: OnBusy | UnsetType = UNSET
    close_on_complete: bool | UnsetType = UNSET


class UpdateSession(CreateSession):
    """``PATCH /v1/sessions/{id}``: what to change (``context`` is merged with
    ``application/merge-patch+json``, replaced otherwise)."""

    status: SessionStatus | UnsetType = UNSET


class PostMessage(Request):
    """``POST /v1/sessions/{id}/messages``."""

    content: str


class Session(Struct, kw_only=True):
    """A conversation's settings and state."""

    id: str
    object: Literal["session"] = "session"
    title: str
    status: SessionStatus
    closed_reason: str | None
    context: dict[str, Any]
    keep_open: bool
    on_closed: OnClosed
    on_busy: OnBusy
    close_on_complete: bool
    previous_session_id: str | None
    message_count: int
    trimmed_messages: int
    created_at: float
    updated_at: float
    last_activity_at: float
    closed_at: float | None
    url: str


class LatestGeneration(Struct, kw_only=True):
    """A session's newest generation, as a list shows it."""

    id: str
    status: GenerationStatus | None


class SessionSummary(Session, kw_only=True):
    """A session in a list: with its newest generation and the one running, if any."""

    latest_generation: LatestGeneration | None
    active_generation_id: str | None


class SessionMessage(Struct, kw_only=True):
    """A stored message; an assistant message in progress shows its text so far."""

    id: str
    role: Role
    content: str | None
    generation_id: str | None
    generation_status: GenerationStatus | None
    created_at: float


class SessionWithMessages(Session, kw_only=True):
    """A session with its messages, oldest first."""

    messages: list[SessionMessage]


class SessionList(Struct, kw_only=True):
    """The caller's sessions, newest activity first."""

    object: Literal["list"] = "list"
    data: list[SessionSummary]


class PostedMessage(Struct, kw_only=True):
    """What posting a message did: where it went and which generation answers it."""

    session: Session
    session_id: str
    message_id: str
    generation: Generation | None
    generation_id: str | None
    reopened: bool
    replayed: bool


# -- operations and errors ---------------------------------------------------------------------


class ErrorDetail(Struct, kw_only=True):
    """What went wrong: a stable ``type`` to act on and a message for people."""

    type: str
    message: str


class Error(Struct, kw_only=True):
    """Every error answers this."""

    error: ErrorDetail


class Health(Struct, kw_only=True):
    """Liveness."""

    status: Literal["ok"]


class Readiness(Struct, kw_only=True):
    """Readiness, check by check."""

    status: Literal["ready", "not_ready", "starting"]
    checks: dict[str, bool] = msgspec.field(default_factory=dict)


def decode_body(value: Any, kind: type[Request]) -> Any:
    """``value`` (parsed JSON) as ``kind``; ``ValueError`` naming the field otherwise."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc).replace(" - at `$`", "").replace("`$.", "`")) from None


def set_fields(body: Struct) -> dict[str, Any]:
    """The fields a request body set, as a dict (unset ones left out)."""
    return {
        name: value for name, value in msgspec.structs.asdict(body).items() if value is not UNSET
    }
