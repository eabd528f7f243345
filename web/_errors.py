"""HTTP errors: the web layer's own exceptions and the one table mapping every error to HTTP.

WebError
├── BadRequest        400: malformed JSON, bad offsets
├── Unauthorized      401: a missing or unknown API key
├── InvalidRequest    422: a well-formed body that does not describe a valid request
├── LimitRefused      429: a per-user limit (open event streams, …) is reached
├── NotStarted        503: mounted in a host app whose lifespan has not started keepstream
└── PayloadTooLarge   413: the body exceeds ``max_body_bytes``

``InvalidJSON`` (from ``_json``) answers 400 too.
Every error answers ``{"error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from store import (
    ConfigConflict,
    ContentTypeMismatch,
    EpochSeq,
    GenerationNotFound,
    InvalidFork,
    SeqConflict,
    SeqGap,
    SessionNotFound,
    StaleEpoch,
    StoreBusy,
    StoreUnavailable,
    StreamClosed,
    StreamGone,
    StreamNotFound,
    StreamReadOnly,
    format_offset,
)
from streaming import (
    LimitExceeded,
    PoolClosed,
    PoolFull,
    SessionBusy,
    SessionClosed,
    UnknownProvider,
)

from ._json import InvalidJSON, JSONResponse

logger = logging.getLogger("keepstream.web")


class WebError(Exception):
    """An error with its HTTP status and type."""

    status = 400
    type = "bad_request"
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(WebError):
    """The request cannot be parsed (malformed JSON, a bad offset)."""


class Unauthorized(WebError):
    """No API key, or one this server does not know."""

    status = 401
    type = "unauthorized"
    headers = {"WWW-Authenticate": "Bearer"}


class InvalidRequest(WebError):
    """The request parses but is not valid (missing or wrong fields)."""

    status = 422
    type = "invalid_request"


class LimitRefused(WebError):
    """A per-user limit refuses the request for now: 429 naming the limit's setting."""

    status = 429
    type = "limit_exceeded"
    headers = {"Retry-After": "1"}

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class NotStarted(WebError):
    """The API is mounted in a host app, but the keepstream instance behind it is not
    running (the host's lifespan has not entered it, or has left it)."""

    status = 503
    type = "not_started"


class PayloadTooLarge(WebError):
    """The body is larger than allowed."""

    status = 413
    type = "payload_too_large"


# exception class → (status, error type); the first match in order wins.
ERROR_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (InvalidJSON, 400, "bad_request"),
    # The client went away mid-body (or was cut off for sending it too slowly): nobody
    # will read the answer, and it is no server error.
    (ClientDisconnect, 400, "client_disconnected"),
    (GenerationNotFound, 404, "not_found"),
    (StreamNotFound, 404, "not_found"),
    (SessionNotFound, 404, "not_found"),
    (StreamGone, 410, "gone"),
    (StreamReadOnly, 405, "read_only"),
    (StreamClosed, 409, "stream_closed"),
    (ConfigConflict, 409, "conflict"),
    (ContentTypeMismatch, 409, "content_type_mismatch"),
    (SeqConflict, 409, "sequence_conflict"),
    (InvalidFork, 400, "invalid_fork"),
    (StaleEpoch, 403, "stale_producer_epoch"),
    (SeqGap, 409, "producer_sequence_gap"),
    (EpochSeq, 400, "invalid_producer_epoch"),
    (SessionClosed, 409, "session_closed"),
    (SessionBusy, 409, "session_busy"),
    (UnknownProvider, 422, "invalid_request"),
    (PoolFull, 429, "pool_full"),
    (PoolClosed, 503, "shutting_down"),
    (StoreBusy, 503, "store_busy"),
    (StoreUnavailable, 503, "store_unavailable"),
)

HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
}


def error_headers(exc: BaseException) -> dict[str, str] | None:
    """The headers an error answers with besides its body (what a client acts on)."""
    if isinstance(exc, PoolFull):
        return {"Retry-After": str(max(1, round(exc.retry_after)))}
    if isinstance(exc, StoreBusy):
        return {"Retry-After": "1"}
    if isinstance(exc, StreamClosed):
        headers = {"Stream-Closed": "true"}
        if exc.next_offset is not None:
            headers["Stream-Next-Offset"] = format_offset(exc.next_offset)
        return headers
    if isinstance(exc, StaleEpoch):
        return {"Producer-Epoch": str(exc.current_epoch)}
    if isinstance(exc, SeqGap):
        return {
            "Producer-Expected-Seq": str(exc.expected),
            "Producer-Received-Seq": str(exc.received),
        }
    if isinstance(exc, StreamReadOnly):
        return {"Allow": "GET, HEAD, OPTIONS"}
    return None


def error_response(
    status: int, kind: str, message: str, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON error body every failure answers with."""
    return JSONResponse({"error": {"type": kind, "message": message}}, status, headers=headers)


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """What an error answers: status, ``error.type``, message and extra headers."""

    status: int
    type: str
    message: str
    headers: dict[str, str] | None = None


async def handle_error(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: map ``exc`` through the table; count the answer."""
    answer = map_error(exc)
    if answer.status >= 500 and answer.type == "internal_error":
        logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(str(answer.status), answer.type).inc()
        limit = refused_limit(exc)
        if limit is not None:
            metrics.refusals.labels(limit).inc()
    return error_response(answer.status, answer.type, answer.message, headers=answer.headers)


def map_error(exc: BaseException) -> ErrorAnswer:
    """The answer for ``exc``: its own for web errors, else the table's; 500 for the rest."""
    if isinstance(exc, WebError):
        return ErrorAnswer(exc.status, exc.type, exc.message, exc.headers)
    if isinstance(exc, HTTPException):
        return ErrorAnswer(
            exc.status_code,
            HTTP_TYPES.get(exc.status_code, "http_error"),
            str(exc.detail),
            dict(exc.headers) if exc.headers else None,
        )
    if isinstance(exc, LimitExceeded):
        return ErrorAnswer(413 if exc.too_large else 409, "limit_exceeded", str(exc))
    if isinstance(exc, PoolFull) and exc.limit != "max_queued":  # the user's own bound
        return ErrorAnswer(429, "limit_exceeded", str(exc), error_headers(exc))
    for cls, status, kind in ERROR_TABLE:
        if isinstance(exc, cls):
            return ErrorAnswer(status, kind, str(exc), error_headers(exc))
    return ErrorAnswer(500, "internal_error", "internal server error")


def refused_limit(exc: BaseException) -> str | None:
    """The setting whose limit refused a request, if a limit did."""
    if isinstance(exc, LimitExceeded | PoolFull | LimitRefused):
        return exc.limit
    if isinstance(exc, StoreBusy):
        return "max_pending_writes"
    if isinstance(exc, PayloadTooLarge):
        return "max_body_bytes"
    return None


def handled_exceptions() -> dict[type[Exception] | int, object]:
    """The exception handlers to install on the app."""
    handlers: dict[type[Exception] | int, object] = {
        WebError: handle_error,
        HTTPException: handle_error,
        Exception: handle_error,
    }
    for cls in (LimitExceeded, *(row[0] for row in ERROR_TABLE)):
        handlers[cls] = handle_error  # type: ignore[index]
    return handlers
