"""The requests both clients send: URLs, headers and bodies, and decoding the answers.

Each public method of ``KeepstreamClient`` and ``AsyncKeepstreamClient`` builds a ``Call``
here and only sends it, so the protocol is written once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from ._events import FollowCursor
from ._exceptions import ProtocolError, error_for_response
from ._retry import RetryPolicy
from .types import ChatMessage, Generation, PostedMessage, Session, SessionWithMessages

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
# Reads must outlast the server's SSE keep-alive comments (every 15 s by default).
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request and the type its success answer decodes to."""

    method: str
    path: str
    result: type[T]
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def decode(self, response: httpx.Response) -> T:
        """The answer as ``result``; the typed error if it is an error."""
        if response.is_error:
            raise error_for_response(response)
        try:
            return msgspec.json.decode(response.content, type=self.result)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProtocolError(
                f"{self.method} {self.path} answered {response.status_code} with an"
                f" unexpected body: {exc}"
            ) from None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What both clients are configured with."""

    base_url: str
    headers: Mapping[str, str]
    retry: RetryPolicy

    @classmethod
    def build(
        cls,
        base_url: str,
        *,
        api_key: str | None,
        headers: Mapping[str, str] | None,
        retry: RetryPolicy | None,
    ) -> ClientConfig:
        """Check and combine the constructor's arguments."""
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        all_headers = dict(headers or {})
        if api_key is not None:
            if not api_key or api_key != api_key.strip():
                raise ValueError("api_key must be a non-empty string without surrounding spaces")
            all_headers["Authorization"] = f"Bearer {api_key}"
        return cls(base_url.rstrip("/"), all_headers, retry or RetryPolicy())

    def url(self, path: str) -> str:
        """The absolute URL of ``path``, kept under the base URL's own path prefix."""
        return self.base_url + path

    def request_headers(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The client's headers (with ``Authorization``) and ``extra``."""
        return {**self.headers, **extra}


def _id(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"an id must be a non-empty string, got {value!r}")
    return quote(value, safe="")


def start_generation(
    prompt: str | None,
    *,
    messages: Sequence[ChatMessage] | None,
    provider: str | None,
    model: str | None,
    params: Mapping[str, Any] | None,
) -> Call[Generation]:
    """``POST /v1/generations`` with exactly one of ``prompt`` and ``messages``."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    body: dict[str, Any] = (
        {"prompt": prompt}
        if prompt is not None
        else {"messages": [{"role": m["role"], "content": m["content"]} for m in messages or ()]}
    )
    if provider is not None:
        body["provider"] = provider
    if model is not None:
        body["model"] = model
    if params:
        body["params"] = dict(params)
    return Call("POST", "/v1/generations", Generation, json=body)


def get_generation(generation_id: str) -> Call[Generation]:
    """``GET /v1/generations/{id}``."""
    return Call("GET", f"/v1/generations/{_id(generation_id)}", Generation)


def cancel_generation(generation_id: str) -> Call[Generation]:
    """``POST /v1/generations/{id}/cancel``."""
    return Call("POST", f"/v1/generations/{_id(generation_id)}/cancel", Generation)


def create_session(fields: Mapping[str, Any]) -> Call[Session]:
    """``POST /v1/sessions`` with the fields that are not ``None``."""
    body = {name: value for name, value in fields.items() if value is not None}
    return Call("POST", "/v1/sessions", Session, json=body)


def get_session(session_id: str) -> Call[SessionWithMessages]:
    """``GET /v1/sessions/{id}``."""
    return Call("GET", f"/v1/sessions/{_id(session_id)}", SessionWithMessages)


def send_message(
    session_id: str, content: str, *, idempotency_key: str | None
) -> Call[PostedMessage]:
    """``POST /v1/sessions/{id}/messages``, with an ``Idempotency-Key`` if given."""
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}
    return Call(
        "POST",
        f"/v1/sessions/{_id(session_id)}/messages",
        PostedMessage,
        json={"content": content},
        headers=headers,
    )


def follow_generation(generation_id: str, *, offset: int) -> FollowCursor:
    """A cursor following a generation's events after ``offset`` (0: from the start)."""
    _id(generation_id)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
    return FollowCursor("generation", generation_id, str(offset) if offset else None)


def follow_session(session_id: str, *, last_event_id: str | None) -> FollowCursor:
    """A cursor following a session's events after ``last_event_id`` (``None``: its latest
    answer from the start)."""
    _id(session_id)
    return FollowCursor("session", session_id, last_event_id or None)
