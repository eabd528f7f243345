"""A keepstream instance's running parts, opened and closed together: the store, the
providers, the generation pool, sessions, the Durable Streams view and the limits.

``keepstream serve`` opens them in its app's lifespan; an application that embeds keepstream
opens them in its own. Nothing here touches process-wide state (the garbage collector,
logging, signals): that is the CLI's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Self

from store import (
    RedisSessionStore,
    RedisStore,
    SessionBackend,
    SessionStore,
    StoreBackend,
    StreamStore,
)
from streaming import (
    DifyProvider,
    GenerationPool,
    GeneratorProvider,
    OpenAIProvider,
    Provider,
    SessionLimits,
    SessionManager,
    SimulatedProvider,
    TextGenerator,
    UpstreamLimits,
)

from ._auth import Access, ApiKeys, Authenticate
from ._durable_streams import DurableStreams
from ._errors import NotStarted
from ._generations import AppState
from ._limits import OpenReaders, StoredBytes
from ._metrics import Metrics
from ._settings import Settings
from ._signing import UrlSigner, signing_key

# Expired Durable Streams are removed this often (any access finds them gone at once).
EXPIRY_SWEEP_INTERVAL = 1.0
BUILT_IN_PROVIDERS = ("simulated", "openai", "dify")


def build_providers(settings: Settings) -> dict[str, Provider]:
    """The providers the settings configure: ``simulated`` always, ``openai`` and ``dify``
    each with its URL."""
    providers: dict[str, Provider] = {
        "simulated": SimulatedProvider(
            tokens_per_second=settings.sim_tokens_per_second, max_tokens=settings.sim_max_tokens
        )
    }
    limits = UpstreamLimits(
        read_timeout=settings.upstream_read_timeout,
        idle_timeout=settings.upstream_idle_timeout,
        retry_attempts=settings.upstream_retry_attempts,
        retry_deadline=settings.upstream_retry_deadline,
    )
    if settings.upstream_url:
        providers["openai"] = OpenAIProvider(
            base_url=settings.upstream_url,
            api_key=settings.upstream_api_key,
            model=settings.model,
            limits=limits,
            continuation=settings.continuation_fields,
            continuation_message=settings.continuation_message_fields,
        )
    if settings.dify_url:
        providers["dify"] = DifyProvider(
            base_url=settings.dify_url,
            api_key=settings.dify_api_key or "",
            limits=limits,
        )
    return providers


def as_provider(name: str, source: Provider | TextGenerator) -> Provider:
    """``source`` as a provider named ``name``: a ``Provider`` as it is, any other callable
    (returning an async iterator of text) wrapped in a ``GeneratorProvider``."""
    if hasattr(source, "stream") and hasattr(source, "validate"):
        provider: Provider = source  # type: ignore[assignment]
        if provider.name != name:
            raise ValueError(f"provider {provider.name!r} registered as {name!r}")
        return provider
    return GeneratorProvider(name, source)


class Runtime:
    """What a keepstream app runs on, with its settings, providers, access rules and
    metrics. ``async with`` opens it (``state`` is then available) and closes it: running
    generations get ``shutdown_grace`` to finish, then the store closes, then the providers
    it built from the settings (those it was given belong to their owner). It may be
    opened again after it closed.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        providers: Mapping[str, Provider | TextGenerator] | None = None,
        authenticate: Authenticate | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self.settings.validate()
        self.providers: dict[str, Provider] = {}
        for name, source in (providers or {}).items():
            self.add_provider(name, source)
        keys = ApiKeys.load(inline=self.settings.api_keys, file=self.settings.api_keys_file)
        signer = UrlSigner(
            signing_key(self.settings.url_signing_key, keys.digests()),
            ttl=self.settings.signed_url_ttl,
        )
        self.access = Access(keys, signer, authenticate=authenticate)
        self.metrics = Metrics()
        self._state: AppState | None = None
        self._stack: AsyncExitStack | None = None

    def add_provider(self, name: str, source: Provider | TextGenerator) -> None:
        """Make ``source`` available as provider ``name`` (before the runtime starts)."""
        if self._running:
            raise RuntimeError("providers are added before keepstream starts")
        if name in BUILT_IN_PROVIDERS or name in self.providers:
            raise ValueError(f"a provider named {name!r} already exists")
        self.providers[name] = as_provider(name, source)

    def check_default_provider(self) -> None:
        """Raise ``ValueError`` unless the ``provider`` setting names a provider there is."""
        known = {"simulated", *self.providers}
        if self.settings.upstream_url:
            known.add("openai")
        if self.settings.dify_url:
            known.add("dify")
        if self.settings.provider not in known:
            raise ValueError(
                f"the default provider {self.settings.provider!r} is not configured"
                f" (known: {', '.join(sorted(known))})"
            )

    @property
    def _running(self) -> bool:
        return getattr(self, "_stack", None) is not None

    @property
    def state(self) -> AppState:
        """The running parts; ``NotStarted`` (503 over HTTP) before the runtime starts."""
        if self._state is None:
            raise NotStarted("keepstream is not running: enter it in the app's lifespan")
        return self._state

    @property
    def started(self) -> bool:
        """Whether the runtime is open."""
        return self._state is not None

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError("this keepstream instance is already running")
        self.check_default_provider()
        stack = AsyncExitStack()
        try:
            # The providers built here are closed on exit (first thing registered: even when
            # the store fails to open); those given to the runtime belong to their owner.
            built = build_providers(self.settings)
            for provider in built.values():
                stack.push_async_callback(provider.aclose)
            self._state = await stack.enter_async_context(
                open_state(self.settings, {**built, **self.providers}, self.metrics)
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack, self._state = self._stack, None, None
        if stack is not None:
            await stack.aclose()


@asynccontextmanager
async def open_store(
    settings: Settings, metrics: Metrics
) -> AsyncIterator[tuple[StoreBackend, SessionBackend, DurableStreams]]:
    """The store ``settings.store`` names (SQLite by default), its session store, and the
    Durable Streams view of it; closed on exit."""
    kind, location = settings.store_location
    if kind == "redis":
        async with RedisStore(
            location,
            prefix=settings.redis_prefix,
            flush_interval=settings.flush_interval,
            coalesce_window=settings.coalesce_window,
            max_pending_writes=settings.max_pending_writes,
            write_wait=settings.write_wait,
            require_persistence=not settings.redis_allow_volatile,
            connections=settings.redis_connections,
            tail_cache_bytes=settings.tail_cache_bytes,
            on_commit=metrics.observe_commit,
        ) as redis_store:
            yield redis_store, RedisSessionStore(redis_store), DurableStreams(redis_store)
        return
    async with StreamStore(
        location,
        synchronous="FULL" if settings.synchronous == "FULL" else "NORMAL",
        flush_interval=settings.flush_interval,
        coalesce_window=settings.coalesce_window,
        max_pending_writes=settings.max_pending_writes,
        write_wait=settings.write_wait,
        tail_cache_bytes=settings.tail_cache_bytes,
        on_commit=metrics.observe_commit,
    ) as sqlite_store:
        yield sqlite_store, SessionStore(sqlite_store), DurableStreams(sqlite_store)


@asynccontextmanager
async def open_state(
    settings: Settings, providers: Mapping[str, Provider], metrics: Metrics
) -> AsyncIterator[AppState]:
    """Open everything a keepstream instance runs on; on exit, drain the pool (running
    generations get ``shutdown_grace``) and close the store. ``providers`` are used, not
    closed: their owner closes them."""
    async with AsyncExitStack() as stack:
        store, session_store, streams = await stack.enter_async_context(
            open_store(settings, metrics)
        )
        pool = GenerationPool(
            store,
            providers,
            default_provider=settings.provider,
            max_running=settings.max_running,
            max_queued=settings.max_queued,
            max_per_owner=settings.max_generations_per_user,
            shutdown_grace=settings.shutdown_grace,
            time_limit=settings.generation_time_limit or None,
            max_continuations=settings.max_continuations,
            heartbeat_interval=settings.heartbeat_interval,
            lease_timeout=settings.lease_timeout,
        )
        sessions = SessionManager(
            session_store,
            pool,
            limits=SessionLimits(
                active_sessions_per_user=settings.max_sessions_per_user,
                messages_per_session=settings.max_session_messages,
                context_bytes=settings.max_context_bytes,
                message_chars=settings.max_message_chars,
                history_chars=settings.history_chars,
                idle_timeout=settings.idle_timeout,
                retention=settings.retention,
                auto_clean=settings.auto_clean,
            ),
        )
        pool.every(settings.session_sweep_interval, sessions.sweep)
        pool.every(EXPIRY_SWEEP_INTERVAL, streams.sweep)
        await stack.enter_async_context(pool)
        readers = OpenReaders(settings.max_streams_per_user)
        stored = StoredBytes(store, settings.max_stored_bytes_per_user)
        state = AppState(settings, store, pool, sessions, streams, metrics, readers, stored)
        metrics.watch(state)
        yield state
