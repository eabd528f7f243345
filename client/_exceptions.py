"""The client's exceptions, and the mapping of HTTP answers to them.

KeepstreamError
├── TransportError        the server could not be reached, or the connection broke
├── ProtocolError         the server answered something this client cannot read
├── RetriesExhausted      a follow gave up reconnecting: its retry budget is spent
└── APIError              the server answered an error: ``status_code``, ``code``, ``message``
    ├── BadRequest        400: malformed JSON, a bad offset or ``Last-Event-ID``
    ├── Unauthorized      401: a missing or unknown API key
    ├── NotFound          404: no such id (or another user's)
    ├── Conflict          409: ``session_busy``, ``session_closed``, …
    ├── PayloadTooLarge   413: the body, or what it would store, is too large
    ├── InvalidRequest    422: a well-formed request that is not valid
    ├── RateLimited       429: a limit refused it for now (see ``retry_after``)
    └── ServerError       5xx: the server failed, is starting or is shutting down
"""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
from httpx_sse import SSEError


class KeepstreamError(Exception):
    """Every error this client raises."""


class TransportError(KeepstreamError):
    """The server could not be reached, or the connection broke (the httpx error is the
    ``__cause__``)."""


class ProtocolError(KeepstreamError):
    """The server answered something this client cannot read (not the documented JSON or
    SSE)."""


class RetriesExhausted(KeepstreamError):
    """A follow gave up: ``attempts`` connection attempts over ``elapsed`` seconds all
    failed. ``last_error`` (also the ``__cause__``) is the last failure; ``last_event_id``
    is where a new follow would resume."""

    def __init__(
        self,
        what: str,
        *,
        attempts: int,
        elapsed: float,
        last_error: BaseException,
        last_event_id: str | None,
    ) -> None:
        super().__init__(
            f"gave up following {what} after {attempts} attempt(s) in {elapsed:.1f} s: "
            f"{type(last_error).__name__}: {last_error}"
        )
        self.attempts = attempts
        self.elapsed = elapsed
        self.last_error = last_error
        self.last_event_id = last_event_id


class APIError(KeepstreamError):
    """The server answered an error. ``code`` is the server's stable ``error.type`` to act
    on, ``message`` its explanation; ``body`` the parsed JSON (``None`` if it was not JSON);
    ``retry_after`` the seconds of a ``Retry-After`` header, if any."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.message = message
        self.status_code = status_code
        self.code = code
        self.body = body
        self.retry_after = retry_after


class BadRequest(APIError):
    """400: malformed JSON, a bad offset or ``Last-Event-ID``."""


class Unauthorized(APIError):
    """401: a missing or unknown API key."""


class NotFound(APIError):
    """404: no such generation or session (or one that belongs to another user)."""


class Conflict(APIError):
    """409: the request conflicts with the resource's state (``session_busy``, …)."""


class PayloadTooLarge(APIError):
    """413: the body, or what it would store, is over a limit."""


class InvalidRequest(APIError):
    """422: a well-formed request that does not describe a valid one."""


class RateLimited(APIError):
    """429: a limit refuses the request for now; ``retry_after`` says when to try again."""


class ServerError(APIError):
    """5xx: the server failed, is starting, or is shutting down."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
}
_MAX_MESSAGE = 500


def error_for_response(response: httpx.Response) -> APIError:
    """The typed error for a read error ``response``, carrying the server's JSON error."""
    status = response.status_code
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else APIError)
    body: Any = None
    code, message = "http_error", response.text[:_MAX_MESSAGE] or response.reason_phrase
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        pass  # a proxy's HTML page, say: the status and its text still say what happened
    else:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = str(error.get("type", code))
            message = str(error.get("message", message))
    return kind(
        message,
        status_code=status,
        code=code,
        body=body,
        retry_after=_retry_after(response.headers.get("retry-after")),
    )


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (keepstream sends seconds, never a date)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def as_keepstream_error(exc: Exception) -> Exception:
    """``exc`` as this client's error (raise it ``from exc``): a response that is not SSE
    becomes ``ProtocolError``, other httpx errors ``TransportError``; the rest are returned as
    they are."""
    if isinstance(exc, SSEError):  # an httpx.TransportError subclass, but no transport fault
        return ProtocolError(str(exc))
    if isinstance(exc, httpx.HTTPError):
        return TransportError(f"{type(exc).__name__}: {exc}")
    return exc
