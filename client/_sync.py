"""``KeepstreamClient``: the blocking client."""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx
from httpx_sse import connect_sse

from . import _protocol as protocol
from ._events import EventStream, FollowCursor
from ._exceptions import RetriesExhausted, as_keepstream_error, error_for_response
from ._protocol import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, Call, ClientConfig
from ._retry import RetryPolicy, is_retryable
from .types import ChatMessage, Event, Generation, PostedMessage, Session, SessionWithMessages

T = TypeVar("T")


class KeepstreamClient:
    """A blocking client of one keepstream server.

    ``api_key`` is sent as ``Authorization: Bearer``. ``timeout`` is the HTTP client's (by
    default 5 s to connect and 30 s between reads; a follow's read timeout must outlast the
    server's keep-alive interval). ``retry`` is the reconnect budget of follows. Pass
    ``http_client`` to use your own ``httpx.Client`` (its transport, proxies, limits and
    timeout; ``timeout`` is then unused); its caller closes it. Methods raise
    ``APIError`` subclasses for error answers and ``TransportError`` when the server cannot
    be reached; only follows retry.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._config = ClientConfig.build(base_url, api_key=api_key, headers=headers, retry=retry)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=timeout)

    # -- generations ---------------------------------------------------------------------------

    def start_generation(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage] | None = None,
        provider: str | None = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Generation:
        """Start a generation from ``prompt`` or ``messages`` (exactly one); it runs in the
        server's pool whatever happens to this client. Returns its first snapshot
        (``queued``). Not retried: a retry could start it twice."""
        return self._call(
            protocol.start_generation(
                prompt, messages=messages, provider=provider, model=model, params=params
            )
        )

    def get_generation(self, generation_id: str) -> Generation:
        """The generation's snapshot: status, text so far, ``next_offset``."""
        return self._call(protocol.get_generation(generation_id))

    def cancel_generation(self, generation_id: str) -> Generation:
        """Cancel the generation, keeping its partial text; idempotent, and a finished one
        is unchanged. Returns its snapshot."""
        return self._call(protocol.cancel_generation(generation_id))

    def follow_generation(self, generation_id: str, *, offset: int = 0) -> EventStream:
        """The generation's events after ``offset`` (a snapshot's ``next_offset``, or an
        event's ``offset``), to its terminal ``Status``.

        Survives dropped and refused connections and server restarts: it reconnects with
        backoff from the last event it delivered, so each event is yielded exactly once,
        and raises ``RetriesExhausted`` when the retry budget of one outage is spent. Ends
        at once when the generation has ended and nothing is left after ``offset``.
        """
        cursor = protocol.follow_generation(generation_id, offset=offset)
        return EventStream(cursor, self._follow(cursor))

    # -- sessions ------------------------------------------------------------------------------

    def create_session(
        self,
        *,
        title: str | None = None,
        context: Mapping[str, Any] | None = None,
        keep_open: bool | None = None,
        on_closed: str | None = None,
        on_busy: str | None = None,
        close_on_complete: bool | None = None,
    ) -> Session:
        """Open a session; arguments left ``None`` take the server's defaults."""
        return self._call(
            protocol.create_session(
                {
                    "title": title,
                    "context": dict(context) if context is not None else None,
                    "keep_open": keep_open,
                    "on_closed": on_closed,
                    "on_busy": on_busy,
                    "close_on_complete": close_on_complete,
                }
            )
        )

    def get_session(self, session_id: str) -> SessionWithMessages:
        """The session with its messages; an answer in progress shows its text so far."""
        return self._call(protocol.get_session(session_id))

    def send_message(
        self, session_id: str, content: str, *, idempotency_key: str | None = None
    ) -> PostedMessage:
        """Add a user message to the session and start its answer (per the session's
        ``on_busy`` and ``on_closed``). A request repeated with the same
        ``idempotency_key`` gets the first one's message and generation, so only a keyed
        send is safe to retry."""
        return self._call(
            protocol.send_message(session_id, content, idempotency_key=idempotency_key)
        )

    def follow_session(self, session_id: str, *, last_event_id: str | None = None) -> EventStream:
        """The session's events: its latest answer (or the one ``last_event_id``, an
        event stream's ``last_event_id``, points into), then each newer answer, for as long
        as the session is open. Events carry their ``generation_id``. Reconnects like
        ``follow_generation``; ends when the session is closed and fully read."""
        cursor = protocol.follow_session(session_id, last_event_id=last_event_id)
        return EventStream(cursor, self._follow(cursor))

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the HTTP client, unless it was injected."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> KeepstreamClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the wire ------------------------------------------------------------------------------

    def _call(self, call: Call[T]) -> T:
        try:
            response = self._http.request(
                call.method,
                self._config.url(call.path),
                json=call.json,
                headers=self._config.request_headers(call.headers),
            )
        except httpx.HTTPError as exc:
            raise as_keepstream_error(exc) from exc
        return call.decode(response)

    def _follow(self, cursor: FollowCursor) -> Generator[Event, None, None]:
        policy = self._config.retry
        while not cursor.done:  # one pass per outage, each with a fresh budget
            started, attempts = time.monotonic(), 0
            try:
                for attempt in policy.retry_context():
                    # Yielding inside the attempt is safe: tenacity's attempt swallows
                    # any exception, GeneratorExit and cancellation too, and the next turn
                    # of the loop re-raises it, since ``policy.backoff`` retries none of them.
                    with attempt:
                        attempts += 1
                        try:
                            yield from self._connect(cursor)
                        except Exception as exc:
                            if not (is_retryable(exc) and cursor.recovered(policy.healthy_after)):
                                raise
                            # The server had recovered before this failure: a new outage
                            # begins, so leave this budget and reconnect at once.
            except Exception as exc:
                if is_retryable(exc):
                    raise RetriesExhausted(
                        cursor.describe(),
                        attempts=attempts,
                        elapsed=time.monotonic() - started,
                        last_error=exc,
                        last_event_id=cursor.last_event_id,
                    ) from exc
                error = as_keepstream_error(exc)
                if error is exc:
                    raise
                raise error from exc

    def _connect(self, cursor: FollowCursor) -> Generator[Event, None, None]:
        """One connection: the events it carries, until the end or a failure."""
        cursor.connecting()
        with connect_sse(
            self._http,
            "GET",
            self._config.url(cursor.path),
            headers=self._config.request_headers(cursor.request_headers()),
        ) as source:
            response = source.response
            if response.status_code == 204:  # ended, and nothing is left after our offset
                cursor.done = True
                return
            if response.status_code != 200:
                response.read()
                raise error_for_response(response)
            cursor.opened()
            for sse in source.iter_sse():
                event = cursor.accept(sse)
                if event is not None:
                    yield event
                if cursor.done:
                    return
        cursor.ended()
