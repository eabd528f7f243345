"""Deadlines for slow clients: a request's head and its body must arrive in time.

uvicorn closes a keep-alive connection that stays silent for ``timeout_keep_alive``, but it
has no deadline for *reading* a request: every byte that arrives cancels that timer, so a
client sending its head or its body one byte at a time holds a connection, its task and its
buffers for as long as it likes, and a connection that never sends a byte is never timed out.
The classes here are uvicorn's own HTTP/1.1 protocols (h11 and httptools) with two timers:

* The **head deadline** starts when the connection is made and again whenever a keep-alive
  connection goes back to waiting for a request (its previous response is complete). It
  stops when the request line and all headers have arrived. When it passes, the connection
  is closed without an answer: on an idle keep-alive connection a 408 could cross the next
  request on the wire, and the client would take it for that request's answer.
* The **body deadline** starts when the head is complete and stops when the body is (at
  once for a request without one). When it passes, a request that has no response yet is
  answered ``408`` with the JSON error body and ``Connection: close``; then the connection
  is closed. The application's ``receive()`` then reports ``http.disconnect`` and whatever it
  sends is dropped. The deadline is about *reading*: a response, such as an SSE stream, may
  go on for as long as it likes once the body is in.

While the server itself holds the body back (uvicorn stopped reading because the
application has not consumed what it has, or because the request waits behind a pipelined
one, or the client waits for the ``100 Continue`` the application has not asked for yet),
the client is not late: a body deadline that passes then starts over.

Every connection closed this way is counted in ``timeout_counts`` (per process).

This relies on uvicorn internals, checked against uvicorn 0.55.0: the protocols' hooks
(``connection_made``, ``connection_lost``, ``on_response_complete``, h11's
``handle_events`` and httptools' ``on_headers_complete`` / ``on_message_complete`` parser
callbacks), their attributes (``transport``, ``loop``, ``flow``, ``server_state``, ``client``,
``cycle``, ``scope``, h11's ``conn`` and httptools' ``pipeline``) and the request cycle's
``response_started`` / ``disconnected`` / ``waiting_for_100_continue`` / ``message_event``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol, cast

import h11
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ._json import encode_json

DEFAULT_REQUEST_HEAD_TIMEOUT = 10.0
DEFAULT_REQUEST_BODY_TIMEOUT = 30.0
HTTP_CHOICES = ("auto", "h11", "httptools")

logger = logging.getLogger("keepstream.web")


@dataclass
class TimeoutCounts:
    """Connections this process closed because a client was too slow; only ever grows."""

    head_timeouts: int = 0
    """Closed because a request head did not arrive within the head deadline."""
    body_timeouts: int = 0
    """Closed because a request body did not arrive within the body deadline."""


timeout_counts = TimeoutCounts()
"""The process's counts (one event loop updates them: no lock)."""


class _Cycle(Protocol):
    """What the deadlines use of a uvicorn ``RequestResponseCycle`` (h11 or httptools)."""

    response_started: bool
    disconnected: bool
    waiting_for_100_continue: bool
    message_event: asyncio.Event


class _Deadlines(asyncio.Protocol):
    """Mixin for a uvicorn HTTP/1.1 protocol class: the head and body timers and what they
    do when they fire. The subclasses decide when to arm and cancel them."""

    head_timeout: ClassVar[float] = DEFAULT_REQUEST_HEAD_TIMEOUT
    body_timeout: ClassVar[float] = DEFAULT_REQUEST_BODY_TIMEOUT

    # Set by the uvicorn protocol this is mixed into.
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    flow: FlowControl
    server_state: ServerState
    client: tuple[str, int] | None

    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None

    def _late_cycle(self) -> _Cycle | None:
        """The cycle of the request whose body is being read."""
        raise NotImplementedError

    def _may_answer(self) -> bool:
        """Whether a 408 could be written now without landing inside another response."""
        return True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # uvicorn's protocol, next in the MRO
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadlines()
        super().connection_lost(exc)

    def _arm(
        self, timer: asyncio.TimerHandle | None, seconds: float, fire: Callable[[], None]
    ) -> asyncio.TimerHandle | None:
        """A new timer for ``fire`` in ``seconds`` (none for 0), replacing ``timer``."""
        if timer is not None:
            timer.cancel()
        return self.loop.call_later(seconds, fire) if seconds > 0 else None

    def _arm_head_deadline(self) -> None:
        self._head_timer = self._arm(
            self._head_timer, self.head_timeout, self._head_deadline_passed
        )

    def _cancel_head_deadline(self) -> None:
        self._head_timer = self._arm(self._head_timer, 0, self._head_deadline_passed)

    def _arm_body_deadline(self) -> None:
        self._body_timer = self._arm(
            self._body_timer, self.body_timeout, self._body_deadline_passed
        )

    def _cancel_body_deadline(self) -> None:
        self._body_timer = self._arm(self._body_timer, 0, self._body_deadline_passed)

    def _cancel_deadlines(self) -> None:
        self._cancel_head_deadline()
        self._cancel_body_deadline()

    def _serving(self) -> bool:
        """The transport is open and still ours (not handed to a WebSocket protocol)."""
        return not self.transport.is_closing() and self.transport.get_protocol() is self

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        if not self._serving():
            return
        timeout_counts.head_timeouts += 1
        logger.debug("%s: no request head within %gs, closing", self.client, self.head_timeout)
        self.transport.close()

    def _body_deadline_passed(self) -> None:
        self._body_timer = None
        if not self._serving():
            return
        cycle = self._late_cycle()
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # The server holds the body back, not the client: start over.
            self._arm_body_deadline()
            return
        timeout_counts.body_timeouts += 1
        logger.debug("%s: request body not in within %gs, closing", self.client, self.body_timeout)
        if cycle is not None and not cycle.response_started and self._may_answer():
            # What uvicorn does when the client goes away: the application's receive()
            # returns http.disconnect from now on, and its sends are dropped.
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(self._request_timeout_response())
        self.transport.close()

    def _request_timeout_response(self) -> bytes:
        message = f"the request body did not arrive within {self.body_timeout:g} seconds"
        body = encode_json({"error": {"type": "request_timeout", "message": message}})
        headers = [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"connection", b"close"),
        ]
        lines = [b"HTTP/1.1 408 Request Timeout"]
        lines += [name + b": " + value for name, value in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


class _H11DeadlineProtocol(_Deadlines, H11Protocol):
    """uvicorn's h11 protocol with the head and body deadlines."""

    def handle_events(self) -> None:
        # h11 only reports a request once its head is complete, and uvicorn makes a new
        # scope for each one (WebSocket upgrades included, unlike the cycle).
        scope = self.scope
        super().handle_events()
        head_arrived = self.scope is not scope
        if head_arrived:
            self._cancel_head_deadline()
        if self.conn.their_state is not h11.SEND_BODY:
            self._cancel_body_deadline()
        elif head_arrived:
            self._arm_body_deadline()

    def on_response_complete(self) -> None:
        # Armed before uvicorn goes on to a pipelined request, whose head (parsed in
        # handle_events above) cancels it again.
        if not self.transport.is_closing():
            self._arm_head_deadline()
        super().on_response_complete()

    def _late_cycle(self) -> _Cycle | None:
        return self.cycle


@functools.cache
def _httptools_deadline_protocol() -> type[asyncio.Protocol]:
    # Defined on first use: httptools is optional for uvicorn (no wheels for PyPy).
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _HttpToolsDeadlineProtocol(_Deadlines, HttpToolsProtocol):
        """uvicorn's httptools protocol with the head and body deadlines."""

        def on_headers_complete(self) -> None:
            self._cancel_head_deadline()
            super().on_headers_complete()
            self._arm_body_deadline()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._cancel_body_deadline()

        def on_response_complete(self) -> None:
            # With a pipelined request queued, uvicorn starts it: its head is in already.
            waiting = not self.pipeline
            super().on_response_complete()
            if waiting and not self.transport.is_closing():
                self._arm_head_deadline()

        def _late_cycle(self) -> _Cycle | None:
            return self.cycle

        def _may_answer(self) -> bool:
            # A queued pipelined request's 408 would land inside the running response.
            return not self.pipeline

    return _HttpToolsDeadlineProtocol


def build_http_protocol(
    http: str, *, head_timeout: float, body_timeout: float
) -> type[asyncio.Protocol]:
    """The protocol class to pass to ``uvicorn.run(http=...)``: uvicorn's HTTP/1.1 protocol
    named by ``http`` (``"h11"``, ``"httptools"``, or ``"auto"``: httptools when it can be
    imported, else h11) with a head and a body deadline of that many seconds (0: none).

    Each call makes a new class; the deadlines are class attributes, since uvicorn makes
    each connection's protocol from the class with arguments of its own."""
    if http not in HTTP_CHOICES:
        raise ValueError(f"unknown HTTP implementation {http!r}; expected one of {HTTP_CHOICES}")
    if head_timeout < 0 or body_timeout < 0:
        raise ValueError("request deadlines must be >= 0")
    base: type[asyncio.Protocol] = _H11DeadlineProtocol
    if http != "h11":
        try:
            base = _httptools_deadline_protocol()
        except ImportError:
            if http == "httptools":
                raise
    namespace = {"head_timeout": head_timeout, "body_timeout": body_timeout}
    return cast("type[asyncio.Protocol]", type(base.__name__, (base,), namespace))
