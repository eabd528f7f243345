"""The Durable Streams protocol view: ``/v1/stream/{name}``.

PUT creates, POST appends (and closes), GET reads (catch-up, ``live=long-poll``,
``live=sse``), HEAD describes, DELETE deletes, OPTIONS answers CORS preflights. Names are
per owner; a generation's id names its event stream, readable and never writable here.
Offsets are the stream's own message offsets, fixed-width so they sort as strings.
"""

from __future__ import annotations

import base64
import math
import random
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from store import (
    CreateRequest,
    Producer,
    StreamGone,
    StreamInfo,
    StreamNotFound,
    format_offset,
    is_json,
    media_type,
)

from ._auth import access_of, current_user
from ._durable_streams import Chunk, DurableStreams
from ._errors import BadRequest
from ._generations import app_state, read_body, sse_response
from ._json import encode_json, parse_json
from ._settings import Settings

STREAM_PATH = "/v1/stream/"
NAME = re.compile(r"[A-Za-z0-9._~-]{1,200}")
OFFSET = re.compile(r"0{16}_(\d{16})")
DECIMAL = re.compile(r"0|[1-9][0-9]{0,15}")
MAX_SAFE_INTEGER = 2**53 - 1
NOW = -1  # ``offset=now``: the stream's tail, whatever it is at the time of the request
# One response carries at most this much (a single larger message excepted): a reader far
# behind comes back for the rest, and a stuck one holds little.
READ_MESSAGES = 4096
READ_BYTES = 128 * 1024
# Stream-Cursor counts 20 s intervals since 2024-10-09T00:00:00Z (the protocol's epoch).
CURSOR_EPOCH = 1728432000
CURSOR_INTERVAL = 20
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")

CORS_HEADERS = ", ".join(
    (
        "Authorization",
        "Content-Type",
        "If-None-Match",
        "Last-Event-ID",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-Closed",
        "Stream-Seq",
        "Stream-Forked-From",
        "Stream-Fork-Offset",
        "Stream-Fork-Sub-Offset",
        "Producer-Id",
        "Producer-Epoch",
        "Producer-Seq",
    )
)


# -- parsing -----------------------------------------------------------------------------------


def stream_name(request: Request) -> str:
    """The stream's name from the path; 400 when it is not one."""
    name: str = request.path_params["name"]
    if not NAME.fullmatch(name) or name.startswith("__") or set(name) == {"."}:
        raise BadRequest(f"invalid stream name {name[:60]!r}: use letters, digits and ._~-")
    return name


# RFC 9110 media-type: type "/" subtype *( OWS ";" OWS parameter ), tokens and quoted strings.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(
    rf"{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|\"(?:[^\"\\]|\\.)*\"))*[ \t]*"
)


def content_type_of(request: Request) -> str | None:
    """The request's ``Content-Type`` (``None`` when absent); 400 unless it is one media
    type, without wildcards (a stream keeps it and answers with it, so no list, pattern or
    garbage may get in)."""
    value = request.headers.get("content-type")
    if not value:
        return None
    if not _MEDIA_TYPE.fullmatch(value) or "*" in media_type(value):
        raise BadRequest(f"Content-Type must be one media type, like text/plain: {value[:60]!r}")
    return value


def flag(request: Request, header: str) -> bool:
    """A boolean header: only ``true`` (any case) counts; anything else is absent."""
    return request.headers.get(header, "").strip().lower() == "true"


def parse_decimal(value: str, header: str) -> int:
    """A non-negative integer in strict decimal (no sign, no leading zero, at most 2^53-1)."""
    if not DECIMAL.fullmatch(value) or int(value) > MAX_SAFE_INTEGER:
        raise BadRequest(f"{header} must be a non-negative integer, got {value[:40]!r}")
    return int(value)


def parse_offset(value: str, header: str) -> int:
    """A fixed-width offset this server minted; 400 otherwise."""
    match = OFFSET.fullmatch(value)
    if match is None:
        raise BadRequest(f"{header} {value[:40]!r} is not an offset of this server")
    return int(match[1])


def read_offset(request: Request) -> int | None:
    """``?offset=``: ``None`` when absent, ``NOW``, or an offset (``-1`` is the start)."""
    values = request.query_params.getlist("offset")
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest("give one offset parameter")
    if values[0] == "-1":
        return 0
    if values[0] == "now":
        return NOW
    return parse_offset(values[0], "offset")


def parse_expires_at(value: str) -> float:
    """An RFC 3339 timestamp with its time zone, as a Unix time."""
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in value.upper():
        raise BadRequest(f"Stream-Expires-At must be an RFC 3339 timestamp, got {value[:60]!r}")
    return moment.timestamp()


def parse_producer(request: Request) -> Producer | None:
    """The idempotent producer headers: all three or none."""
    names = ("producer-id", "producer-epoch", "producer-seq")
    values = [request.headers.get(n) for n in names]
    if all(v is None for v in values):
        return None
    producer_id, epoch, seq = values
    if producer_id is None or epoch is None or seq is None:
        raise BadRequest("send Producer-Id, Producer-Epoch and Producer-Seq together")
    if not producer_id.strip():
        raise BadRequest("Producer-Id must not be empty")
    return Producer(
        producer_id,
        parse_decimal(epoch.strip(), "Producer-Epoch"),
        parse_decimal(seq.strip(), "Producer-Seq"),
    )


def fork_source(value: str) -> str:
    """The source's name from ``Stream-Forked-From`` (a path or URL on this server)."""
    path = urlsplit(value.strip()).path
    name = path[len(STREAM_PATH) :] if path.startswith(STREAM_PATH) else ""
    if not NAME.fullmatch(name):
        raise BadRequest(f"Stream-Forked-From must be a path like /v1/stream/<name>: {value!r}")
    return name


def json_message(body: bytes, *, allow_empty: bool, max_depth: int) -> bytes:
    """A JSON body as one stored message: one array level flattened, values comma-joined.

    ``b""`` for ``[]`` when ``allow_empty`` (a PUT creating an empty stream), else 400.
    """
    value = parse_json(body, max_depth=max_depth)
    values = value if isinstance(value, list) else [value]
    if not values and not allow_empty:
        raise BadRequest("an empty JSON array appends nothing")
    return b",".join(encode_json(v) for v in values)


# -- response pieces ---------------------------------------------------------------------------


def cursor(request: Request) -> str:
    """The ``Stream-Cursor`` for a live response: the current interval, or past the client's."""
    current = int((time.time() - CURSOR_EPOCH) // CURSOR_INTERVAL)
    given = request.query_params.get("cursor", "")
    if given.isascii() and given.isdigit() and len(given) < 20 and int(given) >= current:
        current = int(given) + random.randint(1, 3600 // CURSOR_INTERVAL)
    return str(current)


def body_of(info: StreamInfo, messages: list[bytes]) -> bytes:
    """Messages as a response body: a JSON array for JSON streams, else the bytes."""
    if is_json(info.content_type):
        return b"[" + b",".join(messages) + b"]"
    return b"".join(messages)


def is_binary(content_type: str) -> bool:
    """Whether SSE data must be base64: neither ``text/*`` nor JSON."""
    kind = media_type(content_type)
    return not (kind.startswith("text/") or kind == "application/json")


def read_headers(info: StreamInfo, chunk: Chunk) -> dict[str, str]:
    """The headers describing where a read left the client."""
    headers = {
        "Content-Type": info.content_type,
        "Stream-Next-Offset": format_offset(chunk.next_offset),
    }
    if chunk.up_to_date:
        headers["Stream-Up-To-Date"] = "true"
    if chunk.closed:
        headers["Stream-Closed"] = "true"
    return headers


def data_event(info: StreamInfo, messages: list[bytes]) -> bytes:
    """One SSE ``data`` event; every line of the payload gets its own ``data:`` field, so
    no CR or LF in the data can end the event or start a forged one."""
    payload = body_of(info, messages)
    if is_binary(info.content_type):
        payload = base64.b64encode(payload)
    lines = _LINE_BREAK.split(payload)
    return b"event: data\n" + b"".join(b"data:" + line + b"\n" for line in lines) + b"\n"


def control_event(chunk: Chunk, stream_cursor: str) -> bytes:
    """The SSE ``control`` event after a read: where to resume, and whether it is the end."""
    control: dict[str, Any] = {"streamNextOffset": format_offset(chunk.next_offset)}
    if chunk.closed:
        control["streamClosed"] = True
    else:
        control["streamCursor"] = stream_cursor
    if chunk.up_to_date:
        control["upToDate"] = True
    return b"event: control\ndata:" + encode_json(control) + b"\n\n"


# -- handlers ----------------------------------------------------------------------------------


def streams_of(request: Request) -> DurableStreams:
    """The running app's Durable Streams."""
    return app_state(request).streams


async def create_request(request: Request, owner: str | None, settings: Settings) -> CreateRequest:
    """What a PUT asks for, from its headers and body; 400 for anything malformed."""
    headers = request.headers
    ttl_header = headers.get("stream-ttl")
    expires_header = headers.get("stream-expires-at")
    if ttl_header is not None and expires_header is not None:
        raise BadRequest("give Stream-TTL or Stream-Expires-At, not both")
    forked_header = headers.get("stream-forked-from")
    source = None if forked_header is None else fork_source(forked_header)
    offset_header = headers.get("stream-fork-offset")
    sub_header = headers.get("stream-fork-sub-offset")
    if source is None and (offset_header is not None or sub_header is not None):
        raise BadRequest("Stream-Fork-Offset and -Sub-Offset need Stream-Forked-From")
    fork_offset = None
    if offset_header is not None:
        fork_offset = parse_offset(offset_header.strip(), "Stream-Fork-Offset")
    sub_offset = 0
    if sub_header is not None:
        sub_offset = parse_decimal(sub_header.strip(), "Stream-Fork-Sub-Offset")
    if sub_offset and fork_offset is None:
        raise BadRequest("Stream-Fork-Sub-Offset needs Stream-Fork-Offset")
    content_type = content_type_of(request)
    body = await read_body(request, settings.max_append_bytes)
    payloads: list[bytes] = []
    if body:
        if content_type is None and source is not None:  # a fork inherits its source's type
            json_mode = is_json((await streams_of(request).info(owner, source)).content_type)
        else:
            json_mode = content_type is not None and is_json(content_type)
        depth = settings.max_json_depth
        payloads = [json_message(body, allow_empty=True, max_depth=depth) if json_mode else body]
    return CreateRequest(
        content_type=content_type,
        ttl=None if ttl_header is None else parse_decimal(ttl_header.strip(), "Stream-TTL"),
        expires_at=None if expires_header is None else parse_expires_at(expires_header),
        closed=flag(request, "stream-closed"),
        forked_from=source,
        fork_offset=fork_offset,
        fork_sub_offset=sub_offset,
        payloads=payloads,
    )


async def create_stream(request: Request) -> Response:
    """``PUT``: create a stream (201), or find it with the same configuration (200)."""
    state = app_state(request)
    owner = await current_user(request)
    name = stream_name(request)
    await state.stored.check(owner)
    wanted = await create_request(request, owner, state.settings)
    created, info = await streams_of(request).create(owner, name, wanted)
    headers = {
        "Content-Type": info.content_type,
        "Stream-Next-Offset": format_offset(info.next_offset),
        "Location": str(request.url.replace(query="", fragment="")),
    }
    if info.closed:
        headers["Stream-Closed"] = "true"
    return Response(status_code=201 if created else 200, headers=headers)


async def append(request: Request) -> Response:
    """``POST``: append a body, close, or both; idempotent with producer headers."""
    state = app_state(request)
    owner = await current_user(request)
    close = flag(request, "stream-closed")
    producer = parse_producer(request)
    seq = request.headers.get("stream-seq")
    body = await read_body(request, state.settings.max_append_bytes)
    content_type = content_type_of(request)
    payload: bytes | None = None
    if body:
        if content_type is None:
            raise BadRequest("an append with a body needs a Content-Type")
        # A JSON body is taken apart here, before the store has looked at the stream: a
        # stream of another type refuses it (409) in the same write that finds the stream.
        depth = state.settings.max_json_depth
        json_mode = is_json(content_type)
        payload = json_message(body, allow_empty=False, max_depth=depth) if json_mode else body
    elif not close:
        raise BadRequest("the body is empty: send data, or Stream-Closed: true to close")
    if payload is not None:
        await state.stored.check(owner)
    outcome = await streams_of(request).append(
        owner,
        stream_name(request),
        content_type=content_type,
        payload=payload,
        close=close,
        seq=seq,
        producer=producer,
    )
    headers = {"Stream-Next-Offset": format_offset(outcome.next_offset)}
    if outcome.closed:
        headers["Stream-Closed"] = "true"
    if outcome.producer_epoch is not None:
        headers["Producer-Epoch"] = str(outcome.producer_epoch)
        headers["Producer-Seq"] = str(outcome.producer_seq)
    # A producer's new data answers 200; a duplicate, a close-only and a plain append 204.
    status = 200 if producer is not None and payload is not None and not outcome.duplicate else 204
    return Response(status_code=status, headers=headers)


async def describe(request: Request) -> Response:
    """``HEAD``: the stream's metadata; does not slide its TTL."""
    info = await streams_of(request).info(await current_user(request), stream_name(request))
    headers = {
        "Content-Type": info.content_type,
        "Stream-Next-Offset": format_offset(info.next_offset),
        "Cache-Control": "no-store",
    }
    if info.ttl is not None:
        headers["Stream-TTL"] = str(info.ttl)
    if info.expires_at is not None:
        moment = datetime.fromtimestamp(info.expires_at, UTC)
        headers["Stream-Expires-At"] = moment.isoformat().replace("+00:00", "Z")
    if info.closed:
        headers["Stream-Closed"] = "true"
    return Response(status_code=200, headers=headers)


async def delete(request: Request) -> Response:
    """``DELETE``: remove the stream (soft-deleted while forks read it)."""
    streams = streams_of(request)
    info = await streams.info(await current_user(request), stream_name(request))
    await streams.delete(info)
    return Response(status_code=204)


async def read(request: Request) -> Response:
    """``GET``: catch-up, long-poll or SSE from ``?offset=``."""
    state = app_state(request)
    owner = await current_user(request)
    info = await streams_of(request).info(owner, stream_name(request), touch=True)
    offset = read_offset(request)
    live = request.query_params.get("live")
    if live not in (None, "long-poll", "sse"):
        raise BadRequest(f"live must be long-poll or sse, got {live[:40]!r}")
    if live is not None and offset is None:
        raise BadRequest(f"live={live} needs an offset (-1 for the start, now for the tail)")
    start = info.next_offset if offset == NOW else offset or 0
    if start > info.next_offset:
        raise BadRequest(f"offset {format_offset(start)} is beyond the end of the stream")
    if live == "sse":
        return follow(request, info, start, owner=owner)
    if live == "long-poll":
        with state.metrics.open_readers.labels("durable_long_poll").track_inprogress():
            return await long_poll(request, info, start)
    if offset == NOW:
        chunk = Chunk(start, [], start, True, info.closed)
        headers = {**read_headers(info, chunk), "Cache-Control": "no-store"}
        return Response(body_of(info, []), headers=headers)
    chunk = await streams_of(request).read(info, start, limit=READ_MESSAGES, max_bytes=READ_BYTES)
    return chunk_response(request, info, chunk)


def chunk_response(request: Request, info: StreamInfo, chunk: Chunk) -> Response:
    """A catch-up response, or 304 when the client holds exactly this chunk."""
    end = format_offset(chunk.next_offset) + (":c" if chunk.closed else "")
    etag = f'"{info.stream_id}:{format_offset(chunk.offset)}:{end}"'
    headers = read_headers(info, chunk)
    headers["ETag"] = etag
    if chunk.up_to_date and not chunk.closed:
        headers["Cache-Control"] = "no-store"  # the tail of an open stream moves on
    else:
        scope = "private" if access_of(request).enabled else "public"
        headers["Cache-Control"] = f"{scope}, max-age=60, stale-while-revalidate=300"
    held = request.headers.get("if-none-match", "")
    if held.strip() == "*" or etag in (tag.strip() for tag in held.split(",")):
        return Response(status_code=304, headers={"ETag": etag})
    return Response(body_of(info, chunk.messages), headers=headers)


async def long_poll(request: Request, info: StreamInfo, start: int) -> Response:
    """Data from ``start`` as soon as there is any, else 204 after the long-poll timeout."""
    streams = streams_of(request)
    stream_cursor = cursor(request)
    with anyio.move_on_after(app_state(request).settings.long_poll_timeout):
        while True:
            changed = streams.change_event(info)
            chunk = await streams.read(info, start, limit=READ_MESSAGES, max_bytes=READ_BYTES)
            if chunk.messages:
                response = chunk_response(request, info, chunk)
                response.headers["Stream-Cursor"] = stream_cursor
                return response
            if chunk.closed:
                return Response(status_code=204, headers=read_headers(info, chunk))
            await changed.wait()
    headers = read_headers(info, Chunk(start, [], start, True, False))
    headers["Stream-Cursor"] = stream_cursor
    return Response(status_code=204, headers=headers)


def follow(request: Request, info: StreamInfo, start: int, *, owner: str | None) -> Response:
    """SSE from ``start``: a ``data`` event per read, each followed by a ``control`` event;
    ends after the closing control event, after ``stream_sse_lifetime``, or as soon as the
    stream is deleted or expires (a reconnect then gets the protocol's 404 or 410). An open
    reader counts as an access: it keeps sliding the stream's TTL."""
    settings = app_state(request).settings
    streams = streams_of(request)
    stream_cursor = cursor(request)
    # Wake at least this often to slide the TTL while nothing is appended.
    touch_every = info.ttl / 2 if info.ttl else math.inf

    async def events() -> AsyncIterator[bytes]:
        # A deadline, not a cancel scope around the loop: a generator must not yield
        # inside a scope that another task may end up closing.
        deadline = anyio.current_time() + settings.stream_sse_lifetime
        position = start
        first = True
        while anyio.current_time() < deadline:
            changed = streams.change_event(info)
            streams.touch(info)
            try:
                chunk = await streams.read(
                    info, position, limit=READ_MESSAGES, max_bytes=READ_BYTES
                )
                if not chunk.messages and not first:
                    # Woken with nothing to read: is the stream still there at all?
                    await streams.info(owner, info.name)
            except (StreamNotFound, StreamGone):
                return  # deleted or expired: end the response cleanly
            if chunk.messages:
                yield data_event(info, chunk.messages) + control_event(chunk, stream_cursor)
            elif first or chunk.closed:
                yield control_event(chunk, stream_cursor)
            first = False
            position = chunk.next_offset
            if chunk.closed:
                return
            if not chunk.messages or chunk.up_to_date:
                wait = min(deadline - anyio.current_time(), touch_every)
                with anyio.move_on_after(wait):
                    await changed.wait()

    headers = {"Content-Type": "text/event-stream"}
    if is_binary(info.content_type):
        headers["Stream-SSE-Data-Encoding"] = "base64"
    return sse_response(
        app_state(request), events(), protocol="durable_sse", user=owner, headers=headers
    )


async def preflight(request: Request) -> Response:
    """``OPTIONS``: a CORS preflight; the allowed headers include ``If-None-Match``."""
    asked = request.headers.get("access-control-request-headers")
    return Response(
        status_code=204,
        headers={
            "Access-Control-Allow-Methods": "GET, HEAD, POST, PUT, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": f"{CORS_HEADERS}, {asked}" if asked else CORS_HEADERS,
            "Access-Control-Max-Age": "86400",
        },
    )


HANDLERS = {
    "PUT": create_stream,
    "POST": append,
    "GET": read,
    "HEAD": describe,
    "DELETE": delete,
    "OPTIONS": preflight,
}


async def stream_endpoint(request: Request) -> Response:
    """Dispatch on the method."""
    return await HANDLERS[request.method](request)


routes = [Route(STREAM_PATH + "{name}", stream_endpoint, methods=list(HANDLERS))]
