"""Durable Streams live reads: SSE framing that no CR or LF in the data can break, base64 for
binary streams, generations followed through the protocol (SSE, long-poll and the native
``/events`` agree event for event), and the official Python client (``durable-streams``)
following a live generation, hanging up and resuming from the offset it reported.

One server per module; every test works as a user of its own.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import anyio
import httpx
import pytest
from durable_streams import StreamEvent, astream

from .backends import BACKENDS
from .durable_support import (
    BINARY,
    Frame,
    append,
    as_user,
    check_pairs,
    create,
    module_server,
    next_user,
    offset,
    parse_sse,
    path,
    position,
    read_sse,
    status,
    store_args,
)
from .support import Server, read_events, start_generation, wait_for_status

MISSING_GENERATION = "gen_doesnotexist0000000"
CONTROL_FIELDS = {"streamNextOffset", "streamCursor", "upToDate", "streamClosed"}


@pytest.fixture(scope="module", params=BACKENDS)
def ds_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """The module's server (simulated model; long-poll timeout 0.5 s), on each store."""
    yield from module_server(tmp_path_factory, "live", *store_args(request))


def check_controls(controls: list[dict[str, Any]], end: int) -> None:
    """Control events carry only protocol fields and real offsets that never go back; the
    last, and only it, says the stream is closed (without a cursor) at ``end``."""
    positions = []
    for control in controls:
        assert set(control) <= CONTROL_FIELDS, control
        positions.append(position(control["streamNextOffset"]))
        if not control.get("streamClosed"):
            assert re.fullmatch(r"\d+", control["streamCursor"]), control
    assert positions == sorted(positions)
    assert [bool(c.get("streamClosed")) for c in controls] == [False] * (len(controls) - 1) + [True]
    assert controls[-1]["streamNextOffset"] == offset(end)
    assert "streamCursor" not in controls[-1]


# -- SSE framing -------------------------------------------------------------------------------

FORGED = '{"streamNextOffset":"9999999999999999_9999999999999999","streamClosed":true}'
# Bodies that try to end the data event early or start one of their own. None ends in CR
# while the next starts with LF: split across two events, that pair would be two line breaks
# where the concatenated text has one (CRLF), which is SSE's rule and not the server's.
INJECTIONS = [
    "line1\r\nline2",
    "lone\rcarriage return",
    "lone\nline feed",
    f"\n\nevent: control\ndata:{FORGED}\n\n",
    f"\r\n\r\nevent: control\r\ndata:{FORGED}\r\n\r\n",
    f"\r\revent: control\rdata:{FORGED}\r\r",
    "id: 7\nretry: 1\n: a comment\nevent: data\ndata:inner",
    "ends with a line feed\n",
    "\r\n",
    "tab\tand é 中文, U+2028 \u2028 and NEL \x85 (not SSE line breaks)",
]


def normalised(text: str) -> str:
    """Text as SSE delivers it: every CRLF, CR and LF becomes one LF."""
    return re.sub(r"\r\n|\r|\n", "\n", text)


async def test_sse_keeps_injected_line_breaks_inside_the_data_event(
    ds: httpx.AsyncClient,
) -> None:
    """Each line of a text payload gets its own ``data:`` line, whatever ends it (CRLF, CR,
    LF), so the data of the data events, rejoined with LF, is exactly the appended text with
    its line breaks normalised; every data event is followed by a control event, and no
    control event is forged by the data."""
    await create(ds, "inject", "text/plain")
    half = len(INJECTIONS) // 2
    for text in INJECTIONS[:half]:  # some before the reader connects, some while it follows
        assert (await append(ds, "inject", text)).status_code == 204
    raw = bytearray()

    async def follow() -> None:
        _, body = await read_sse(ds, "inject", "-1")
        raw.extend(body)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        for text in INJECTIONS[half:-1]:
            assert (await append(ds, "inject", text)).status_code == 204
        closing = await append(ds, "inject", INJECTIONS[-1], headers={"Stream-Closed": "true"})
        assert closing.status_code == 204
    assert b"\r" not in raw  # every CR became a line boundary
    frames = parse_sse(raw.decode())
    controls = check_pairs(frames)
    check_controls(controls, len(INJECTIONS))
    assert "".join(f.data for f in frames if f.event == "data") == normalised("".join(INJECTIONS))


async def test_sse_copies_each_line_verbatim_after_data_colon(ds: httpx.AsyncClient) -> None:
    """``data:`` is followed by the line as it is, with no space added. (So an SSE parser,
    which drops one space after the colon, loses a line's leading space: the protocol's
    wire format, the same in the reference server.)"""
    await create(ds, "spaces", "text/plain")
    text = " one leading space\n  two\nnone"
    closing = await append(ds, "spaces", text, headers={"Stream-Closed": "true"})
    assert closing.status_code == 204
    _, raw = await read_sse(ds, "spaces", "-1")
    assert raw.startswith(b"event: data\ndata: one leading space\ndata:  two\ndata:none\n\n")
    assert parse_sse(raw.decode())[0].lines == ["one leading space", " two", "none"]


async def test_binary_sse_sends_each_batch_as_base64(ds: httpx.AsyncClient) -> None:
    """A binary stream's SSE says ``Stream-SSE-Data-Encoding: base64``; each data event is
    whole base64 (a multiple of 4 once line breaks are removed) and together they decode to
    the appended bytes; control events stay JSON. Text streams get no such header."""
    payloads = [b"\x00\r\n\r", bytes(range(256)), b"\n\nevent: control\n\n", b"\xff"]
    await create(ds, "bin", BINARY)
    for payload in payloads[:2]:
        assert (await append(ds, "bin", payload, BINARY)).status_code == 204
    received: list[bytes] = []

    async def follow() -> None:
        headers, raw = await read_sse(ds, "bin", "-1")
        assert headers["stream-sse-data-encoding"] == "base64"
        assert headers["content-type"] == "text/event-stream"
        frames = parse_sse(raw.decode("ascii"))
        check_controls(check_pairs(frames), len(payloads))
        for frame in (f for f in frames if f.event == "data"):
            encoded = "".join(frame.lines)
            assert len(encoded) % 4 == 0, encoded
            received.append(base64.b64decode(encoded, validate=True))

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        assert (await append(ds, "bin", payloads[2], BINARY)).status_code == 204
        closing = await append(ds, "bin", payloads[3], BINARY, headers={"Stream-Closed": "true"})
        assert closing.status_code == 204
    assert b"".join(received) == b"".join(payloads)

    await create(ds, "txt", "text/plain", headers={"Stream-Closed": "true"})
    headers, _ = await read_sse(ds, "txt", "-1")
    assert "stream-sse-data-encoding" not in headers


# -- generations through the protocol ----------------------------------------------------------


def json_batches(frames: list[Frame]) -> list[list[dict[str, Any]]]:
    """The JSON arrays of the data events (each must parse on its own)."""
    batches: list[list[dict[str, Any]]] = []
    for frame in frames:
        if frame.event == "data":
            batch = frame.json()
            assert isinstance(batch, list) and batch, frame
            batches.append(batch)
    return batches


async def follow_sse(http: httpx.AsyncClient, name: str) -> list[dict[str, Any]]:
    """A generation's events by ``live=sse``, checking that each control names the offset
    after the events so far."""
    _, raw = await read_sse(http, name, "-1", timeout=20)
    frames = parse_sse(raw.decode())
    controls = check_pairs(frames)
    events: list[dict[str, Any]] = []
    batches = iter(json_batches(frames))
    for index, frame in enumerate(frames):
        if frame.event == "data":
            events += next(batches)
            assert frames[index + 1].json()["streamNextOffset"] == offset(len(events))
    check_controls(controls, len(events))
    assert len([f for f in frames if f.event == "data"]) >= 2  # it followed a live generation
    return events


async def follow_long_poll(http: httpx.AsyncClient, name: str) -> list[dict[str, Any]]:
    """A generation's events by a loop of ``live=long-poll`` requests until Stream-Closed."""
    events: list[dict[str, Any]] = []
    at = "-1"
    cursor: str | None = None
    with anyio.fail_after(20):
        while True:
            params = {"offset": at, "live": "long-poll", **({"cursor": cursor} if cursor else {})}
            response = await http.get(path(name), params=params)
            assert response.status_code in (200, 204), response.status_code
            if response.status_code == 200:
                events += response.json()
            next_at = response.headers["stream-next-offset"]
            assert position(next_at) == len(events)
            if response.headers.get("stream-closed") == "true":
                return events
            cursor = response.headers["stream-cursor"]
            assert re.fullmatch(r"\d+", cursor), cursor
            at = next_at


async def test_a_live_generation_reads_the_same_by_sse_long_poll_and_its_events(
    ds: httpx.AsyncClient,
) -> None:
    """Followed live through ``/v1/stream/<id>`` by SSE and by long-poll, a generation gives
    exactly the events of ``/v1/generations/<id>/events``, at the same offsets, ending with
    the completed status."""
    generation = await start_generation(
        ds, prompt="three ways", params={"max_tokens": 40, "tokens_per_second": 40}
    )
    gid = generation["id"]
    results: dict[str, list[dict[str, Any]]] = {}

    async def run(kind: str) -> None:
        if kind == "sse":
            results[kind] = await follow_sse(ds, gid)
        elif kind == "long-poll":
            results[kind] = await follow_long_poll(ds, gid)
        else:
            native = await read_events(ds, gid, timeout=20)
            assert [int(e.id) for e in native] == list(range(1, len(native) + 1))
            results[kind] = [e.json() for e in native]

    async with anyio.create_task_group() as tg:
        for kind in ("sse", "long-poll", "events"):
            tg.start_soon(run, kind)
    snapshot = await wait_for_status(ds, gid, {"completed"})
    assert results["sse"] == results["events"]
    assert results["long-poll"] == results["events"]
    events = results["events"]
    assert len(events) == snapshot["next_offset"]
    assert "".join(e["text"] for e in events if e["type"] == "delta") == snapshot["text"]
    assert events[-1]["type"] == "status" and events[-1]["status"] == "completed"
    whole = await ds.get(path(gid))
    assert whole.headers["content-type"] == "application/json"
    assert whole.headers["stream-closed"] == "true"
    assert whole.json() == events


async def test_a_generation_stream_is_read_only_and_private(
    ds_server: Server, ds: httpx.AsyncClient
) -> None:
    """Writes to a generation's stream answer 405 (with Allow), it cannot be forked, and to
    another user it answers exactly as a missing generation does."""
    generation = await start_generation(
        ds, prompt="mine", params={"max_tokens": 200, "tokens_per_second": 20}
    )
    gid = generation["id"]
    writes = [
        ds.post(path(gid), content=b"{}", headers={"Content-Type": "application/json"}),
        ds.post(path(gid), headers={"Stream-Closed": "true"}),
        ds.put(path(gid), headers={"Content-Type": "application/json"}),
        ds.delete(path(gid)),
    ]
    for write in writes:
        response = await write
        assert response.status_code == 405, response.text
        assert response.headers["allow"] == "GET, HEAD, OPTIONS"
    head = await ds.head(path(gid))
    assert (head.status_code, head.headers["content-type"]) == (200, "application/json")
    forked = await ds.put(path("copy"), headers={"Stream-Forked-From": path(gid)})
    assert forked.status_code == 400

    async def answers(http: httpx.AsyncClient, name: str) -> list[int]:
        return [
            await status(http.get(path(name))),
            await status(http.head(path(name))),
            await status(http.get(path(name), params={"offset": "-1", "live": "long-poll"})),
            await status(http.get(path(name), params={"offset": "-1", "live": "sse"})),
            await status(http.post(path(name), headers={"Stream-Closed": "true"})),
            await status(http.delete(path(name))),
        ]

    other = next_user()
    async with as_user(ds_server, other) as stranger:
        assert await answers(stranger, gid) == [404] * 6
        assert await answers(stranger, gid) == await answers(stranger, MISSING_GENERATION)
    async with httpx.AsyncClient(base_url=ds_server.url, timeout=10) as anonymous:
        assert await answers(anonymous, gid) == [401] * 6
    snapshot = (await ds.get(f"/v1/generations/{gid}")).json()
    assert snapshot["status"] in ("queued", "running")  # nothing above touched it
    assert (await ds.post(f"/v1/generations/{gid}/cancel")).status_code == 200


# -- the official Python client ----------------------------------------------------------------

Live = Literal["sse", "long-poll"]


async def client_events(
    http: httpx.AsyncClient,
    url: str,
    start: str,
    live: Live,
    *,
    until: int | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Events read with ``durable_streams.astream`` from ``start``, until ``until`` of them
    (then it hangs up) or the completed status; and the offset the client reports."""
    events: list[dict[str, Any]] = []
    base = 0 if start == "-1" else position(start)
    with anyio.fail_after(20):
        async with astream(url, offset=start, live=live, client=http) as response:
            iterator = cast(
                AsyncGenerator[StreamEvent[Any], None], response.iter_events(mode="json")
            )
            async with aclosing(iterator):
                async for event in iterator:
                    events += event.data
                    # Its offset is the one after the events delivered so far, at any point.
                    assert position(event.next_offset) == base + len(events)
                    if until is not None and len(events) >= until:
                        break
                    if events and events[-1].get("status") == "completed":
                        break
            reported = response.offset
    return events, reported


@pytest.mark.parametrize("live", ["sse", "long-poll"])
async def test_official_client_resumes_a_live_generation_without_gap_or_duplicate(
    ds_server: Server, ds: httpx.AsyncClient, live: Live
) -> None:
    """The official client follows a running generation, hangs up after a few events, and
    resumes from the offset it reported: the two parts together are exactly the
    generation's events, ending with the completed status."""
    generation = await start_generation(
        ds, prompt="official client", params={"max_tokens": 40, "tokens_per_second": 20}
    )
    gid = generation["id"]
    url = ds_server.url + path(gid)
    first, resume_at = await client_events(ds, url, "-1", live, until=3)
    assert first[-1].get("status") != "completed"  # it hung up on a live generation
    assert position(resume_at) == len(first)
    rest, end = await client_events(ds, url, resume_at, live)
    native = [e.json() for e in await read_events(ds, gid, timeout=20)]
    assert first + rest == native
    assert native[-1]["status"] == "completed"
    assert position(end) == len(native)


# -- a live reader whose stream goes away ------------------------------------------------------


async def follow_until_ended(ds: httpx.AsyncClient, name: str, *, timeout: float) -> bytes:
    """The raw SSE body of a live reader from the start until the server ends it cleanly (an
    unfinished chunked body would raise here)."""
    raw = bytearray()
    with anyio.fail_after(timeout):
        async with ds.stream("GET", path(name), params={"offset": "-1", "live": "sse"}) as response:
            assert response.status_code == 200
            async for piece in response.aiter_raw():
                raw += piece
    return bytes(raw)


async def test_a_live_reader_of_a_deleted_stream_ends_cleanly(
    ds_server: Server, ds: httpx.AsyncClient
) -> None:
    await create(ds, "doomed", body=b"hello")
    async with anyio.create_task_group() as tg:
        bodies: list[bytes] = []

        async def read() -> None:
            bodies.append(await follow_until_ended(ds, "doomed", timeout=10))

        tg.start_soon(read)
        await anyio.sleep(0.3)  # the reader is waiting for more
        assert (await ds.delete(path("doomed"))).status_code == 204
    frames = parse_sse(bodies[0].decode())
    assert frames[0].event == "data" and frames[0].data == "hello"
    assert (await ds.get(path("doomed"), params={"offset": "-1"})).status_code == 404
    assert "Traceback" not in ds_server.output()


async def test_an_open_reader_keeps_a_ttl_stream_alive_and_expiry_ends_it(
    ds_server: Server, ds: httpx.AsyncClient
) -> None:
    """A live reader is an access: a stream with a 1 s TTL outlives it by far while someone
    follows it. One whose absolute Expires-At passes ends its reader cleanly."""
    await create(ds, "kept", headers={"Stream-TTL": "1"})
    with anyio.move_on_after(3.0):  # three TTLs
        await follow_until_ended(ds, "kept", timeout=10)
    assert (await ds.head(path("kept"))).status_code == 200
    with anyio.fail_after(10):  # once nobody reads it, it expires
        while (await ds.head(path("kept"))).status_code == 200:  # noqa: ASYNC110
            await anyio.sleep(0.2)

    moment = datetime.now(UTC) + timedelta(seconds=1.5)
    await create(ds, "dated", headers={"Stream-Expires-At": moment.isoformat()})
    await follow_until_ended(ds, "dated", timeout=10)
    assert (await ds.head(path("dated"))).status_code == 404
    assert "Traceback" not in ds_server.output()
