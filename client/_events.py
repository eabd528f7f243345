"""Following an event stream: parsing its SSE events and keeping the resume point.

A ``FollowCursor`` is the part of a follow that sync and async share: the path and headers
of the next request, the decoding of each SSE event into a ``Delta`` or ``Status``, and
``last_event_id``, the id of the last event *delivered* to the caller, which is exactly
what the next connection sends as ``Last-Event-ID``. ``EventStream`` and
``AsyncEventStream`` are what the caller iterates.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import msgspec
from httpx_sse import ServerSentEvent

from ._exceptions import ProtocolError
from ._retry import StreamEnded
from .types import Delta, Event, Status


@dataclass
class FollowCursor:
    """Where one follow of a generation's or a session's events stands.

    ``last_event_id`` is the id of the last event handed to the caller (``None`` before the
    first); ``done`` is set by the generation's terminal status event or a 204.
    """

    kind: Literal["generation", "session"]
    resource_id: str
    last_event_id: str | None = None
    done: bool = False
    _opened_at: float | None = field(default=None, repr=False)
    _delivered: int = field(default=0, repr=False)

    @property
    def path(self) -> str:
        """The events endpoint, relative to the base URL."""
        return f"/v1/{self.kind}s/{quote(self.resource_id, safe='')}/events"

    def describe(self) -> str:
        """What is followed, for messages."""
        return f"{self.kind} {self.resource_id}"

    def request_headers(self) -> dict[str, str]:
        """The headers of the next connection: resume after the last delivered event."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = self.last_event_id
        return headers

    def connecting(self) -> None:
        """A new connection is about to be made."""
        self._opened_at = None
        self._delivered = 0

    def opened(self) -> None:
        """The server answered 200: the events follow."""
        self._opened_at = time.monotonic()

    def recovered(self, healthy_after: float) -> bool:
        """Whether the current connection proved the server healthy before it failed: it
        delivered an event, or it stayed open ``healthy_after`` seconds."""
        if self._delivered:
            return True
        return self._opened_at is not None and time.monotonic() - self._opened_at >= (healthy_after)

    def accept(self, sse: ServerSentEvent) -> Event | None:
        """The event ``sse`` carries, recorded as delivered; ``None`` for what is not an
        event (the ``retry:`` line) or an event type this client does not know (skipped,
        but resumed after)."""
        if not sse.data:
            return None
        generation_id, offset = self._parse_id(sse.id)
        try:
            data: Any = msgspec.json.decode(sse.data)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"event {sse.id!r} is not JSON: {exc}") from None
        event: Event | None = None
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "delta" and isinstance(data.get("text"), str):
            event = Delta(data["text"], offset, generation_id)
        elif kind == "status" and isinstance(data.get("status"), str):
            event = Status(
                data["status"], data.get("usage"), data.get("error"), offset, generation_id
            )
            # A session's stream goes on with its next answer; a generation's ends here.
            self.done = self.kind == "generation" and event.terminal
        self.last_event_id = sse.id
        self._delivered += 1
        return event

    def ended(self) -> None:
        """The server closed the response cleanly: done after a terminal event, otherwise
        ``StreamEnded`` (reconnect; the server says 204 if nothing is left)."""
        if not self.done:
            raise StreamEnded(f"the server ended the events of {self.describe()} early")

    def _parse_id(self, event_id: str) -> tuple[str, int]:
        if self.kind == "generation":
            generation_id, offset = self.resource_id, event_id
        else:  # <generation id>:<offset>
            generation_id, _, offset = event_id.rpartition(":")
        if not generation_id or not offset.isdigit():
            raise ProtocolError(f"event id {event_id!r} is not a {self.kind} event id")
        return generation_id, int(offset)


class EventStream:
    """The events of a follow, each delivered once, across reconnects.

    Iterate it; it ends after the generation's terminal ``Status`` (or, for a session, once
    the session is closed and fully read). Close it (or use it as a context manager) to stop
    early. ``last_event_id`` is the resume point a new follow can start from.
    """

    def __init__(self, cursor: FollowCursor, events: Generator[Event, None, None]) -> None:
        self._cursor = cursor
        self._events = events

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event delivered (``None`` before the first)."""
        return self._cursor.last_event_id

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def close(self) -> None:
        """Stop following and close the connection."""
        self._events.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncEventStream:
    """The async twin of ``EventStream``: ``async for`` it, ``aclose()`` it, or use it as an
    async context manager."""

    def __init__(self, cursor: FollowCursor, events: AsyncGenerator[Event, None]) -> None:
        self._cursor = cursor
        self._events = events

    @property
    def last_event_id(self) -> str | None:
        """The id of the last event delivered (``None`` before the first)."""
        return self._cursor.last_event_id

    def __aiter__(self) -> AsyncEventStream:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        """Stop following and close the connection."""
        await self._events.aclose()

    async def __aenter__(self) -> AsyncEventStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
