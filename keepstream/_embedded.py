"""keepstream inside your own Python application: your generation code, made durable and
resumable, with or without HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import msgspec
from starlette.applications import Starlette

from client import Delta, Event, Generation, Status
from store import GenerationRecord, StreamNotFound
from store.types import JSONDict
from streaming import (
    GenerationRequest,
    GeneratorProvider,
    Provider,
    TextGenerator,
    decode_event,
)
from web import Authenticate, Runtime, Settings, build_app
from web._generations import generation_json

ParamsCheck = Callable[[JSONDict], None]
# One read of a follow takes at most about this much (a single larger message excepted).
FOLLOW_READ_BYTES = 128 * 1024


class Keepstream(Runtime):
    """A keepstream instance in this process: the same store, pool and guarantees as
    ``keepstream serve``, over the same ``Settings``.

    Register providers (``@ks.provider("name")`` on an async generator function, or
    ``add_provider``) before it starts. Run it with ``async with ks:`` — or pass
    ``ks.lifespan`` to your ASGI framework — then ``start``, ``get``, ``follow`` and
    ``cancel`` generations directly, and mount ``ks.asgi_app()`` for the HTTP API.
    ``authenticate(request) -> owner`` lets the host's own auth decide who owns what (the
    API keys of ``settings`` otherwise). ``url_prefix`` is where the host mounts the HTTP
    API, for the URLs in the snapshots the Python API returns (those the HTTP API answers
    with carry their prefix anyway). Nothing process-wide is changed: no logging set-up,
    no garbage-collector tuning, no signal handlers.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        providers: Mapping[str, Provider | TextGenerator] | None = None,
        authenticate: Authenticate | None = None,
        url_prefix: str = "",
    ) -> None:
        super().__init__(settings, providers=providers, authenticate=authenticate)
        self.url_prefix = url_prefix.rstrip("/")
        self._app: Starlette | None = None

    # -- providers -----------------------------------------------------------------------------

    def add_provider(
        self,
        name: str,
        source: Provider | TextGenerator,
        *,
        check_params: ParamsCheck | None = None,
        continues: bool = False,
    ) -> None:
        """Make ``source`` provider ``name``: a ``Provider``, or a callable that takes a
        ``GeneratorInput`` and returns an async iterator of ``str`` (or ``ProviderChunk``,
        to report usage). ``check_params(params)`` may raise ``ValueError`` to refuse a
        request's params before it starts. ``continues=True`` says the callable can go on
        from ``input.partial`` (the committed text of an answer whose process died): such
        a generation is then continued instead of ended ``interrupted``."""
        if check_params is not None or continues:
            source = GeneratorProvider(
                name,
                source,  # type: ignore[arg-type]
                check_params=check_params,
                continues=continues,
            )
        super().add_provider(name, source)

    def provider(
        self, name: str, *, check_params: ParamsCheck | None = None, continues: bool = False
    ) -> Callable[[TextGenerator], TextGenerator]:
        """A decorator registering an async generator function as provider ``name`` (the
        options as for ``add_provider``)."""

        def register(generate: TextGenerator) -> TextGenerator:
            self.add_provider(name, generate, check_params=check_params, continues=continues)
            return generate

        return register

    # -- hosting -------------------------------------------------------------------------------

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """Runs keepstream for as long as the host app runs (``FastAPI(lifespan=...)``)."""
        async with self:
            yield

    def asgi_app(self) -> Starlette:
        """The HTTP API over this instance, to mount (``app.mount("/ks", ks.asgi_app())``).

        It has no lifespan of its own: the host's runs this instance. Its URLs (``Location``,
        ``events_url``) carry the prefix it is mounted under.
        """
        if self._app is None:
            self._app = build_app(self)
        return self._app

    # -- generations ---------------------------------------------------------------------------

    async def start(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        provider: str | None = None,
        model: str | None = None,
        params: JSONDict | None = None,
        owner: str | None = None,
    ) -> Generation:
        """Start a generation (a ``prompt``, or ``messages`` of ``{role, content}``) and
        return its ``queued`` snapshot at once; it runs in the background, owned by
        ``owner``. Raises ``ValueError`` for an invalid request, ``UnknownProvider`` for a
        provider nobody registered, and ``PoolFull`` when no more may wait."""
        body: dict[str, Any] = {"params": params or {}}
        if prompt is not None:
            body["prompt"] = prompt
        if messages is not None:
            body["messages"] = messages
        if provider is not None:
            body["provider"] = provider
        if model is not None:
            body["model"] = model
        request = GenerationRequest.from_json(body)
        pool = self.state.pool
        pool.resolve_provider(request)
        return snapshot(await pool.submit(request, owner=owner), base=self.url_prefix)

    async def get(self, generation_id: str, *, owner: str | None = None) -> Generation:
        """The committed snapshot: status, text so far, ``next_offset``. ``owner`` scopes
        the lookup (another owner's generation is ``GenerationNotFound``)."""
        return snapshot(await self.state.pool.get(generation_id, owner=owner), base=self.url_prefix)

    async def cancel(self, generation_id: str, *, owner: str | None = None) -> Generation:
        """Stop a generation, keeping its text; idempotent. Returns the snapshot after."""
        record = await self.state.pool.cancel(generation_id, owner=owner)
        return snapshot(record, base=self.url_prefix)

    async def follow(
        self, generation_id: str, *, offset: int = 0, owner: str | None = None
    ) -> AsyncIterator[Event]:
        """The generation's events from ``offset`` (an event's ``offset``, or a snapshot's
        ``next_offset``) as they commit, until its final ``Status``: exactly what the HTTP
        API would send, nothing before it is durable."""
        state = self.state
        record = await state.pool.locate(generation_id, owner=owner)
        reads = state.store.follow(record.stream_id, offset, max_bytes=FOLLOW_READ_BYTES)
        try:
            async with aclosing(reads):
                async for result in reads:
                    for payload in result.messages:
                        offset += 1
                        event = event_of(decode_event(payload), offset, generation_id)
                        if event is not None:
                            yield event
        except StreamNotFound:
            return  # deleted


def snapshot(record: GenerationRecord, *, base: str = "") -> Generation:
    """A generation record as the snapshot type the HTTP client uses too."""
    return msgspec.convert(msgspec.to_builtins(generation_json(record, base=base)), Generation)


def event_of(event: JSONDict, offset: int, generation_id: str) -> Event | None:
    """A stored event as the event type the HTTP client uses too; ``None`` for the others
    (the ``resumed`` seam of a continued answer), which a follow skips as the client does."""
    kind = event.get("type")
    if kind == "delta":
        return Delta(event["text"], offset, generation_id)
    if kind == "status":
        return Status(
            event["status"], event.get("usage"), event.get("error"), offset, generation_id
        )
    return None
