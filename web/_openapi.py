"""``/openapi.json`` (OpenAPI 3.1) and a reference page at ``/docs``.

The document is generated: body schemas come from the msgspec types the handlers decode and
answer with (``_schemas``), and a test checks that every route of the app is described here
and nothing else is. What a table cannot derive from types (parameters, status codes, media
types) is stated once per operation below.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from . import _responses_schemas as responses_schemas
from . import _schemas as schemas
from ._chat import ChatRequest

Where = Literal["query", "header", "path"]
SSE = "text/event-stream"
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
ANY_BYTES = "*/*"


@dataclass(frozen=True)
class Param:
    """A query, header or path parameter."""

    name: str
    where: Where
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


@dataclass(frozen=True)
class Answer:
    """One documented response: a JSON type, media types with plain schemas, or nothing."""

    description: str
    body: type | None = None
    content: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    """One method on one path."""

    summary: str
    tag: str
    answers: Mapping[int, Answer]
    body: type | None = None  # a JSON request type
    body_media: tuple[str, ...] = (JSON,)
    raw_body: bool = False  # any bytes (Durable Streams)
    params: tuple[Param, ...] = ()
    public: bool = False  # no API key needed


# An SSE response's schema describes each of its events (as schemathesis reads it too).
SSE_EVENT = {
    "type": "object",
    "properties": {
        "event": {"type": "string"},
        "data": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
}


def sse(description: str) -> Answer:
    """An SSE response."""
    return Answer(description, content={SSE: SSE_EVENT})


GENERATION_ID = Param("generation_id", "path", "a generation's id (gen_…)", required=True)
SESSION_ID = Param("session_id", "path", "a session's id (ses_…)", required=True)
CHAT_ID = Param("chat_id", "path", "a Vercel AI SDK chat id (per owner)", required=True)
RESPONSE_ID = Param("response_id", "path", "a response's id: a generation's (gen_…)", required=True)
STREAM_NAME = Param(
    "name",
    "path",
    "the stream's name ([A-Za-z0-9._~-], up to 200), or a generation's id (read-only)",
    required=True,
)
ACCEPT = Param("Accept", "header", "text/event-stream to stream the answer in this response")
LAST_EVENT_ID = Param("Last-Event-ID", "header", "resume after this event id")
EVENT_TOKEN = Param("token", "query", "a signed URL's token, in place of the API key")
STREAM_HEADERS = tuple(
    Param(name, "header", description)
    for name, description in (
        ("Content-Type", "the stream's content type (PUT) or the body's (POST)"),
        ("Stream-TTL", "seconds of inactivity before the stream expires (PUT)"),
        ("Stream-Expires-At", "RFC 3339 time the stream expires at (PUT)"),
        ("Stream-Closed", "true: create closed (PUT), or close (POST)"),
        ("Stream-Seq", "must increase, bytewise, with every append (POST)"),
        ("Stream-Forked-From", "/v1/stream/<source>: create as a fork (PUT)"),
        ("Stream-Fork-Offset", "the offset to fork at (PUT)"),
        ("Stream-Fork-Sub-Offset", "bytes or JSON values of the message at the offset (PUT)"),
        ("Producer-Id", "an idempotent producer's id (POST)"),
        ("Producer-Epoch", "its epoch (POST)"),
        ("Producer-Seq", "its sequence number (POST)"),
    )
)
STREAM_READ = (
    Param("offset", "query", "where to read from: an offset, -1 for the start, now for the tail"),
    Param("live", "query", "long-poll or sse", {"type": "string", "enum": ["long-poll", "sse"]}),
    Param("cursor", "query", "the Stream-Cursor of the previous live response"),
    Param("If-None-Match", "header", "an ETag of a catch-up read held by the client"),
)
NO_CONTENT = Answer("nothing (more) to send")
BYTES = {"type": "string", "format": "binary"}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/generations"): Operation(
        "Start a generation",
        "generations",
        {
            202: Answer("started (queued); it runs in the background", schemas.Generation),
            200: sse("its events, when asked for with Accept: text/event-stream"),
        },
        body=schemas.CreateGeneration,
        params=(ACCEPT,),
    ),
    ("GET", "/v1/generations/{generation_id}"): Operation(
        "A generation's snapshot",
        "generations",
        {200: Answer("status, text so far, next offset", schemas.Generation)},
        params=(GENERATION_ID,),
    ),
    ("GET", "/v1/generations/{generation_id}/events"): Operation(
        "Follow a generation from a resume point",
        "generations",
        {200: sse("events from the resume point to the end"), 204: NO_CONTENT},
        params=(
            GENERATION_ID,
            LAST_EVENT_ID,
            Param("offset", "query", "resume at this event offset"),
            Param("text_offset", "query", "resume after this many characters of text"),
            EVENT_TOKEN,
        ),
    ),
    ("POST", "/v1/generations/{generation_id}/cancel"): Operation(
        "Cancel a generation (idempotent)",
        "generations",
        {200: Answer("the snapshot after the cancel", schemas.Generation)},
        params=(GENERATION_ID,),
    ),
    ("POST", "/v1/sessions"): Operation(
        "Open a session",
        "sessions",
        {201: Answer("the new session", schemas.Session)},
        body=schemas.CreateSession,
    ),
    ("GET", "/v1/sessions"): Operation(
        "The caller's sessions, newest activity first",
        "sessions",
        {200: Answer("the sessions", schemas.SessionList)},
        params=(
            Param(
                "status",
                "query",
                "only sessions in this state",
                {"type": "string", "enum": ["active", "paused", "closed"]},
            ),
            Param("limit", "query", "at most this many (1 to 1000, default 100)"),
        ),
    ),
    ("GET", "/v1/sessions/{session_id}"): Operation(
        "A session with its messages",
        "sessions",
        {200: Answer("the session", schemas.SessionWithMessages)},
        params=(SESSION_ID,),
    ),
    ("PATCH", "/v1/sessions/{session_id}"): Operation(
        "Change a session (merge-patch the context with application/merge-patch+json)",
        "sessions",
        {200: Answer("the session after the change", schemas.Session)},
        body=schemas.UpdateSession,
        body_media=(JSON, MERGE_PATCH),
        params=(SESSION_ID,),
    ),
    ("DELETE", "/v1/sessions/{session_id}"): Operation(
        "Delete a session, cancelling its answer",
        "sessions",
        {204: Answer("deleted")},
        params=(SESSION_ID,),
    ),
    ("POST", "/v1/sessions/{session_id}/messages"): Operation(
        "Post a message and start its answer",
        "sessions",
        {
            202: Answer("stored; its answer (if any) runs", schemas.PostedMessage),
            200: sse("the answer's events, when asked for with Accept: text/event-stream"),
        },
        body=schemas.PostMessage,
        params=(
            SESSION_ID,
            ACCEPT,
            Param("Idempotency-Key", "header", "a retry with the same key changes nothing"),
        ),
    ),
    ("POST", "/v1/sessions/{session_id}/regenerate"): Operation(
        "Replace the last answer with a new one",
        "sessions",
        {
            202: Answer("the new answer runs", schemas.PostedMessage),
            200: sse("the answer's events, when asked for with Accept: text/event-stream"),
        },
        params=(
            SESSION_ID,
            ACCEPT,
            Param("Idempotency-Key", "header", "a retry with the same key changes nothing"),
        ),
    ),
    ("GET", "/v1/sessions/{session_id}/events"): Operation(
        "Follow a session's answers",
        "sessions",
        {200: sse("the latest answer, then every newer one"), 204: NO_CONTENT},
        params=(SESSION_ID, LAST_EVENT_ID, EVENT_TOKEN),
    ),
    ("PUT", "/v1/stream/{name}"): Operation(
        "Create a Durable Stream",
        "durable streams",
        {201: Answer("created"), 200: Answer("exists with the same configuration")},
        raw_body=True,
        params=(STREAM_NAME, *STREAM_HEADERS),
    ),
    ("POST", "/v1/stream/{name}"): Operation(
        "Append to a Durable Stream, close it, or both",
        "durable streams",
        {200: Answer("appended (an idempotent producer's new data)"), 204: Answer("done")},
        raw_body=True,
        params=(STREAM_NAME, *STREAM_HEADERS),
    ),
    ("GET", "/v1/stream/{name}"): Operation(
        "Read a Durable Stream: catch-up, long-poll or SSE",
        "durable streams",
        {
            200: Answer(
                "the messages (a JSON array for JSON streams), or SSE with live=sse",
                # Any media type: the stream's own, chosen by whoever created it.
                content={JSON: {"type": "array"}, SSE: SSE_EVENT, ANY_BYTES: {}},
            ),
            204: Answer("a long-poll found nothing new, or the stream is closed"),
            304: Answer("the client holds exactly this chunk"),
        },
        params=(STREAM_NAME, *STREAM_READ),
    ),
    ("HEAD", "/v1/stream/{name}"): Operation(
        "A Durable Stream's metadata",
        "durable streams",
        {200: Answer("in the headers")},
        params=(STREAM_NAME,),
    ),
    ("DELETE", "/v1/stream/{name}"): Operation(
        "Delete a Durable Stream",
        "durable streams",
        {204: Answer("deleted")},
        params=(STREAM_NAME,),
    ),
    ("OPTIONS", "/v1/stream/{name}"): Operation(
        "CORS preflight",
        "durable streams",
        {204: Answer("the methods and headers allowed")},
        params=(STREAM_NAME,),
        public=True,
    ),
    ("GET", "/healthz"): Operation(
        "Liveness", "operations", {200: Answer("alive", schemas.Health)}, public=True
    ),
    ("GET", "/readyz"): Operation(
        "Readiness",
        "operations",
        {
            200: Answer("ready", schemas.Readiness),
            503: Answer("not ready: starting, draining, or the store fails", schemas.Readiness),
        },
        public=True,
    ),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics",
        "operations",
        {200: Answer("text exposition format", content={"text/plain": {"type": "string"}})},
        public=True,
    ),
    ("GET", "/openapi.json"): Operation(
        "This document",
        "operations",
        {200: Answer("OpenAPI 3.1", content={JSON: {"type": "object"}})},
        public=True,
    ),
    ("GET", "/docs"): Operation(
        "A readable reference of this API",
        "operations",
        {200: Answer("an HTML page", content={"text/html": {"type": "string"}})},
        public=True,
    ),
    # -- signed event URLs ------------------------------------------------------------------
    ("POST", "/v1/generations/{generation_id}/events-url"): Operation(
        "A short-lived URL for a generation's events (for EventSource)",
        "generations",
        {200: Answer("the URL and when its token expires", schemas.EventsUrl)},
        params=(GENERATION_ID,),
    ),
    ("POST", "/v1/sessions/{session_id}/events-url"): Operation(
        "A short-lived URL for a session's events (for EventSource)",
        "sessions",
        {200: Answer("the URL and when its token expires", schemas.EventsUrl)},
        params=(SESSION_ID,),
    ),
    # -- the OpenAI Responses view (/v1/responses) -------------------------------------------
    ("POST", "/v1/responses"): Operation(
        "Create a response (a generation; background: true runs it detached)",
        "openai responses",
        {
            200: Answer(
                "the Response (queued with background, final without), or its events as SSE"
                " with stream: true",
                responses_schemas.OpenAIResponse,
                content={SSE: SSE_EVENT},
            ),
        },
        body=responses_schemas.CreateResponse,
    ),
    ("GET", "/v1/responses/{response_id}"): Operation(
        "A response, or its events from the start (or after starting_after) with stream=true",
        "openai responses",
        {
            200: Answer(
                "the Response, or its events as SSE with stream=true",
                responses_schemas.OpenAIResponse,
                content={SSE: SSE_EVENT},
            ),
        },
        params=(
            RESPONSE_ID,
            Param(
                "stream",
                "query",
                "true: the events, replayed from sequence 0, then live until the end",
                {"type": "string", "enum": ["true", "false"]},
            ),
            Param(
                "starting_after",
                "query",
                "with stream=true: only the events with a higher sequence_number",
                {"type": "integer", "minimum": 0},
            ),
        ),
    ),
    ("POST", "/v1/responses/{response_id}/cancel"): Operation(
        "Cancel a response (idempotent; the text so far is kept)",
        "openai responses",
        {200: Answer("the Response after the cancel", responses_schemas.OpenAIResponse)},
        params=(RESPONSE_ID,),
    ),
    # -- the Vercel AI SDK chat view (/api/chat) ---------------------------------------------
    ("POST", "/api/chat"): Operation(
        "Send a chat message (or regenerate the last answer), as the Vercel AI SDK does",
        "ai sdk",
        {200: sse("the answer as a UI message stream v1 (data: chunks, then [DONE])")},
        body=ChatRequest,
    ),
    ("GET", "/api/chat/{chat_id}/stream"): Operation(
        "Resume a chat's running answer from its start chunk",
        "ai sdk",
        {200: sse("the running answer as a UI message stream v1"), 204: NO_CONTENT},
        params=(CHAT_ID,),
    ),
    ("POST", "/api/chat/{chat_id}/stop"): Operation(
        "Stop a chat's running answer, keeping its partial text (idempotent)",
        "ai sdk",
        {204: Answer("stopped, or nothing was running")},
        params=(CHAT_ID,),
    ),
}


def package_version() -> str:
    """keepstream's installed version."""
    try:
        return version("keepstream")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _types() -> list[type]:
    found: list[type] = [schemas.Error]
    for operation in OPERATIONS.values():
        if operation.body is not None:
            found.append(operation.body)
        found.extend(a.body for a in operation.answers.values() if a.body is not None)
    return list(dict.fromkeys(found))


def _content(media: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    return {media: {"schema": dict(schema)}}


def _operation(
    method: str, path: str, operation: Operation, refs: Mapping[type, Mapping[str, Any]]
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, answer in sorted(operation.answers.items()):
        entry: dict[str, Any] = {"description": answer.description}
        content = dict(answer.content)
        if answer.body is not None:
            content[JSON] = refs[answer.body]
        if content:
            entry["content"] = {
                media: {"schema": dict(schema)} for media, schema in content.items()
            }
        responses[str(status)] = entry
    responses["default"] = {
        "description": "an error: 4xx for the client's, 5xx for the server's",
        "content": _content(JSON, refs[schemas.Error]),
    }
    document: dict[str, Any] = {
        "operationId": method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_"),
        "summary": operation.summary,
        "tags": [operation.tag],
        "responses": responses,
    }
    if operation.params:
        document["parameters"] = [
            {
                "name": p.name,
                "in": p.where,
                "description": p.description,
                "required": p.required or p.where == "path",
                "schema": dict(p.schema),
            }
            for p in operation.params
        ]
    if operation.body is not None:
        document["requestBody"] = {
            "required": True,
            "content": {
                media: {"schema": dict(refs[operation.body])} for media in operation.body_media
            },
        }
    elif operation.raw_body:
        document["requestBody"] = {"required": False, "content": _content(ANY_BYTES, BYTES)}
    if operation.public:
        document["security"] = []
    return document


@cache
def openapi_document(base: str = "") -> bytes:
    """The whole document, encoded (it never changes while the process runs); ``base`` is
    the prefix the API is mounted under, if any (its one ``servers`` entry)."""
    types = _types()
    _, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    refs = {kind: {"$ref": f"#/components/schemas/{kind.__name__}"} for kind in types}
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), operation in OPERATIONS.items():
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, operation, refs)
    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "keepstream",
            "version": package_version(),
            "description": "LLM chat responses that cannot be lost: detached generations, a"
            " durable log, resumable SSE, sessions, and the Durable Streams protocol.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
    if base:
        document["servers"] = [{"url": base}]
    return msgspec.json.encode(document)


def documented_routes(routes: Iterable[BaseRoute]) -> set[tuple[str, str]]:
    """``(method, path)`` of every route an app serves (HEAD as Starlette adds it aside)."""
    served: set[tuple[str, str]] = set()
    for route in routes:
        if isinstance(route, Route) and route.methods and route.include_in_schema:
            served.update((method, route.path) for method in route.methods)
    return served


async def openapi_endpoint(request: Request) -> Response:
    """``GET /openapi.json``."""
    return Response(openapi_document(request.scope.get("root_path", "")), media_type=JSON)


DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>keepstream API</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/init.js"></script>
</body>
</html>
"""

DOCS_INIT = """window.onload = () => {
  window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui", deepLinking: true});
};
"""


async def docs_page(request: Request) -> Response:
    """``GET /docs``: Swagger UI (served from a pinned package, no CDN) on /openapi.json."""
    return HTMLResponse(DOCS_PAGE)


async def docs_init(request: Request) -> Response:
    """The page's start-up script."""
    return Response(DOCS_INIT, media_type="text/javascript")


routes: list[Route | Mount] = [
    Route("/openapi.json", openapi_endpoint, methods=["GET"]),
    Route("/docs", docs_page, methods=["GET"]),
    Route("/docs/init.js", docs_init, methods=["GET"], include_in_schema=False),
    Mount("/docs/assets", app=StaticFiles(directory=swagger_ui_path), name="docs-assets"),
]
