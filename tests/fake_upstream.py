"""A fake OpenAI-compatible and Dify upstream: a raw asyncio HTTP/1.1 server in a thread of
its own.

It is deliberately *not* a framework app: tests need to write exact byte pieces (half a UTF-8
character per TCP write), drop a connection in the middle of a chunked body, and stall until
the client hangs up — things an ASGI server does not let an app do.

A test registers a scripted ``Reply`` with ``expect()`` and gets a unique prompt back; the
upstream answers each ``POST .../chat/completions`` (or Dify's ``POST .../chat-messages``)
with the reply registered for the last user message of the request (for Dify, the last line
of its ``query``), and records what it received. Dify's ``.../chat-messages/{task}/stop``
is answered with success.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

from .support import free_port

STOP_TIMEOUT = 10.0
DEFAULT_PIECE_PAUSE = 0.002

Framing = Literal["chunked", "close", "length"]
Ending = Literal["complete", "drop", "stall"]


class Gate:
    """A point a reply waits at until the test calls ``open()`` (from any thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._event = asyncio.Event()

    def open(self) -> None:
        """Let the reply go on."""
        self._loop.call_soon_threadsafe(self._event.set)

    async def wait(self) -> None:
        await self._event.wait()


# A step of a reply body: bytes are written and flushed, a float is a pause in seconds,
# a Gate is waited for.
Step = bytes | float | Gate


@dataclass
class Reply:
    """What the upstream answers to one request.

    ``framing``: ``chunked`` (each bytes step is one HTTP chunk and one TCP write), ``close``
    (no length; the body ends when the connection closes) or ``length`` (Content-Length; the
    steps are joined and written at once — for plain error bodies).
    ``end``: ``complete`` ends the body properly, ``drop`` closes the connection without the
    chunked terminator, ``stall`` sends nothing more until the client hangs up.
    A reply whose client hangs up is abandoned at once, wherever it is (a gate, a stall).
    """

    steps: Sequence[Step]
    status: int = 200
    content_type: str = "text/event-stream"
    framing: Framing = "chunked"
    end: Ending = "complete"
    send_head: bool = True  # False: not even the status line is sent (a stall before headers)
    headers: Sequence[tuple[str, str]] = ()  # extra response headers (``Retry-After``, ...)


@dataclass
class Received:
    """One request as the upstream saw it.

    ``hung_up`` is set if the client closed the connection before the reply was complete.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    hung_up: threading.Event = field(default_factory=threading.Event)


class FakeUpstream:
    """The server. ``start()`` runs it on 127.0.0.1 and a free port; ``stop()`` ends it.

    ``base_url`` (with ``/v1``) is what keepstream's ``--upstream-url`` takes.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Received] = []
        self._replies: dict[str, Reply] = {STOP: STOPPED}
        self._sequences: dict[str, list[Reply]] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- the test's side ----------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        """Start the thread and wait until the socket listens."""
        self._thread.start()
        if not self._ready.wait(STOP_TIMEOUT):
            raise RuntimeError("the fake upstream did not start")
        if self._error is not None:
            raise RuntimeError(f"the fake upstream did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        """Cancel every open reply, close the socket and end the thread."""
        if self._thread.is_alive():
            stopping = self._stopping
            if stopping is not None:
                self._loop.call_soon_threadsafe(stopping.set)
            self._thread.join(STOP_TIMEOUT)
            if self._thread.is_alive():
                raise RuntimeError("the fake upstream did not stop")

    def gate(self) -> Gate:
        """A new gate for a reply's steps."""
        return Gate(self._loop)

    def expect(self, reply: Reply, *, label: str = "case") -> str:
        """Register ``reply``; return the unique prompt that selects it."""
        prompt = f"{label}-{next(self._counter)}"
        with self._lock:
            self._replies[prompt] = reply
        return prompt

    def expect_sequence(self, replies: Sequence[Reply], *, label: str = "case") -> str:
        """Register ``replies`` for successive requests (the last one repeats); return the
        unique prompt that selects them."""
        if not replies:
            raise ValueError("expect_sequence needs at least one reply")
        prompt = f"{label}-{next(self._counter)}"
        with self._lock:
            self._sequences[prompt] = list(replies)
        return prompt

    def requests_for(self, prompt: str) -> list[Received]:
        """The requests whose last user message was ``prompt``."""
        with self._lock:
            return [r for r in self.requests if _last_user_message(r.body) == prompt]

    def stops(self) -> list[Received]:
        """The Dify stop requests received."""
        with self._lock:
            return [r for r in self.requests if r.path.endswith("/stop")]

    # -- the server's side --------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        received: Received | None = None
        try:
            received = await _read_request(reader)
            with self._lock:
                self.requests.append(received)
                prompt = _last_user_message(received.body) or ""
                if received.path.endswith("/stop"):
                    prompt = STOP
                reply = self._replies.get(prompt)
                sequence = self._sequences.get(prompt)
                if sequence is not None:
                    reply = sequence.pop(0) if len(sequence) > 1 else sequence[0]
            if reply is None:
                reply = error_reply(404, "the fake upstream has no reply for this prompt")
            # The reply may wait (a gate, a stall): watch for the client hanging up meanwhile,
            # which is the only way a stalled reply ends.
            answering = asyncio.ensure_future(_write_reply(writer, reply))
            hanging_up = asyncio.ensure_future(_until_eof(reader))
            try:
                await asyncio.wait({answering, hanging_up}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pending in (answering, hanging_up):
                    pending.cancel()
                await asyncio.gather(answering, hanging_up, return_exceptions=True)
            if hanging_up.done() and not hanging_up.cancelled():
                received.hung_up.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: nothing to answer
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _until_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


async def _read_request(reader: asyncio.StreamReader) -> Received:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    request_line, *header_lines = head.split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers: dict[str, str] = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    raw = await reader.readexactly(int(headers.get("content-length", "0")))
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw
    return Received(method, path, headers, body)


async def _write_reply(writer: asyncio.StreamWriter, reply: Reply) -> None:
    reason = HTTPStatus(reply.status).phrase
    head = [
        f"HTTP/1.1 {reply.status} {reason}",
        f"Content-Type: {reply.content_type}",
        "Cache-Control: no-cache",
        "Connection: close",
        *(f"{name}: {value}" for name, value in reply.headers),
    ]
    if reply.framing == "chunked":
        head.append("Transfer-Encoding: chunked")
    elif reply.framing == "length":
        size = sum(len(step) for step in reply.steps if isinstance(step, bytes))
        head.append(f"Content-Length: {size}")
    if reply.send_head:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await writer.drain()
    for step in reply.steps:
        if isinstance(step, bytes):
            if reply.framing == "chunked":
                step = b"%x\r\n%s\r\n" % (len(step), step)
            writer.write(step)
            await writer.drain()
        elif isinstance(step, Gate):
            await step.wait()
        else:
            await asyncio.sleep(step)
    if reply.end == "stall":
        await asyncio.Event().wait()  # ended by the client hanging up, or by stop()
    elif reply.end == "complete" and reply.framing == "chunked":
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    # "drop", and the end of a "close" body: closing the connection is all there is to do.


def _last_user_message(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("query"), str):  # Dify
        return str(body["query"]).rpartition("\n")[2]
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    for message in reversed(body["messages"]):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


# -- building replies -------------------------------------------------------------------------

STOP = "\x00stop"  # the key of the reply to Dify's stop requests
STOPPED = Reply([b'{"result": "success"}'], content_type="application/json", framing="length")

DONE = b"data: [DONE]\n\n"


def sse_data(data: str) -> bytes:
    """One SSE event carrying ``data`` (used as is: malformed JSON is the caller's choice)."""
    return f"data: {data}\n\n".encode()


def completion_chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish_reason: str | None = None,
    ascii_only: bool = False,
) -> bytes:
    """A ``chat.completion.chunk`` event.

    With ``ascii_only`` the JSON escapes everything beyond ASCII — and a lone surrogate in
    ``content`` becomes a ``\\udXXX`` escape, exactly what splits a pair across two chunks.
    """
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return sse_data(json.dumps(chunk, ensure_ascii=ascii_only))


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> bytes:
    """The last chunk OpenAI sends with ``stream_options.include_usage``: no choices, usage."""
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "test-model",
        "choices": [],
        "usage": usage_of(prompt_tokens, completion_tokens),
    }
    return sse_data(json.dumps(chunk))


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def answer(
    deltas: Sequence[str],
    *,
    usage: tuple[int, int] | None = None,
    done: bool = True,
    ascii_only: bool = False,
) -> list[bytes]:
    """A whole streamed answer: a role chunk, one chunk per delta, the ``stop`` chunk, an
    optional usage chunk and ``[DONE]``."""
    events = [completion_chunk(role="assistant", content="")]
    events.extend(completion_chunk(text, ascii_only=ascii_only) for text in deltas)
    events.append(completion_chunk(finish_reason="stop"))
    if usage is not None:
        events.append(usage_chunk(*usage))
    if done:
        events.append(DONE)
    return events


def error_reply(status: int, message: str, *, kind: str = "server_error") -> Reply:
    """An OpenAI-style JSON error answer."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return Reply([body.encode()], status=status, content_type="application/json", framing="length")


def split_inside_characters(data: bytes) -> list[bytes]:
    """``data`` cut at every byte boundary that falls *inside* a multi-byte UTF-8 character
    (and nowhere else), so every such character arrives in two or more pieces."""
    pieces: list[bytes] = []
    start = 0
    for i in range(1, len(data)):
        if 0x80 <= data[i] <= 0xBF:  # a continuation byte: the cut lands inside a character
            pieces.append(data[start:i])
            start = i
    pieces.append(data[start:])
    return pieces


def paced(pieces: Sequence[bytes], pause: float = DEFAULT_PIECE_PAUSE) -> list[Step]:
    """``pieces`` with a short pause after each, so each leaves in a TCP write of its own."""
    steps: list[Step] = []
    for piece in pieces:
        steps.extend((piece, pause))
    return steps


def utf16_pieces(text: str, cuts: Sequence[int]) -> list[str]:
    """``text`` cut at UTF-16 code-unit positions ``cuts``: a cut inside a surrogate pair gives
    pieces that end with a lone high surrogate or start with a lone low one."""
    units = text.encode("utf-16-le")
    bounds = [0, *cuts, len(units) // 2]
    return [
        units[2 * a : 2 * b].decode("utf-16-le", "surrogatepass")
        for a, b in itertools.pairwise(bounds)
    ]


def pair_cuts(text: str) -> Iterator[int]:
    """The UTF-16 positions that fall inside a surrogate pair of ``text``."""
    position = 0
    for ch in text:
        if ord(ch) > 0xFFFF:
            yield position + 1
            position += 2
        else:
            position += 1


# -- Dify -------------------------------------------------------------------------------------


def dify_event(event: str, **fields: Any) -> bytes:
    """One Dify stream event: ``data: {"event": ..., **fields}``."""
    return sse_data(json.dumps({"event": event, "task_id": "task-1", **fields}))


DIFY_PING = b"event: ping\n\n"


def dify_answer(
    deltas: Sequence[str],
    *,
    conversation_id: str = "conv-1",
    usage: tuple[int, int] | None = (3, 4),
    event: str = "message",
) -> list[bytes]:
    """A whole streamed Dify answer: a ping, one ``message`` event per delta, ``message_end``
    with the usage."""
    ids = {"conversation_id": conversation_id, "message_id": "msg-1"}
    events = [DIFY_PING]
    events.extend(dify_event(event, answer=text, **ids) for text in deltas)
    metadata = {"usage": usage_of(*usage)} if usage is not None else {}
    events.append(dify_event("message_end", metadata=metadata, **ids))
    return events


def dify_error_reply(status: int, code: str, message: str) -> Reply:
    """A Dify JSON error answer: ``{"code", "message", "status"}``."""
    body = json.dumps({"code": code, "message": message, "status": status})
    return Reply([body.encode()], status=status, content_type="application/json", framing="length")
