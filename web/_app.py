"""The Starlette app factory; its lifespan owns the store and the generation pool."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from store import DurableStreams, SessionStore, StreamStore
from streaming import (
    GenerationPool,
    OpenAIProvider,
    Provider,
    SessionLimits,
    SessionManager,
    SimulatedProvider,
)

from ._auth import ApiKeys
from ._chat import routes as chat_routes
from ._cors import ApiCors
from ._durable import STREAM_PATH
from ._durable import routes as stream_routes
from ._errors import handled_exceptions
from ._generations import AppState
from ._generations import routes as generation_routes
from ._limits import OpenReaders, StoredBytes
from ._metrics import Metrics
from ._metrics import routes as operator_routes
from ._openapi import routes as openapi_routes
from ._responses import routes as responses_routes
from ._security import SecurityHeaders
from ._sessions import routes as session_routes
from ._settings import Settings
from ._signing import UrlSigner, signing_key

logger = logging.getLogger("keepstream")

# Young collections every 50,000 allocations instead of 700; a full one every 50 x 100 of
# those. Cycles are still collected, just in fewer, larger batches.
GC_THRESHOLDS = (50_000, 50, 100)
# Expired Durable Streams are removed this often (any access finds them gone at once).
EXPIRY_SWEEP_INTERVAL = 1.0


def build_providers(settings: Settings) -> dict[str, Provider]:
    """The providers the settings configure: ``simulated`` always, ``openai`` with a URL."""
    providers: dict[str, Provider] = {
        "simulated": SimulatedProvider(
            tokens_per_second=settings.sim_tokens_per_second, max_tokens=settings.sim_max_tokens
        )
    }
    if settings.upstream_url:
        providers["openai"] = OpenAIProvider(
            base_url=settings.upstream_url,
            api_key=settings.upstream_api_key,
            model=settings.model,
            read_timeout=settings.upstream_read_timeout,
        )
    return providers


def create_app(settings: Settings | None = None) -> Starlette:
    """A keepstream ASGI app. Nothing is opened until its lifespan starts."""
    settings = settings or Settings()
    settings.validate()
    api_keys = ApiKeys.load(inline=settings.api_keys, file=settings.api_keys_file)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            store = await stack.enter_async_context(
                StreamStore(
                    settings.db,
                    synchronous="FULL" if settings.synchronous == "FULL" else "NORMAL",
                    flush_interval=settings.flush_interval,
                    coalesce_window=settings.coalesce_window,
                    max_pending_writes=settings.max_pending_writes,
                    write_wait=settings.write_wait,
                    tail_cache_bytes=settings.tail_cache_bytes,
                    on_commit=metrics.observe_commit,
                )
            )
            providers = build_providers(settings)
            for provider in providers.values():
                stack.push_async_callback(provider.aclose)
            pool = GenerationPool(
                store,
                providers,
                default_provider=settings.provider,
                max_running=settings.max_running,
                max_queued=settings.max_queued,
                max_per_owner=settings.max_generations_per_user,
                shutdown_grace=settings.shutdown_grace,
                time_limit=settings.generation_time_limit or None,
            )
            sessions = SessionManager(
                SessionStore(store),
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
            streams = DurableStreams(store)
            pool.every(settings.session_sweep_interval, sessions.sweep)
            pool.every(EXPIRY_SWEEP_INTERVAL, streams.sweep)
            await stack.enter_async_context(pool)
            readers = OpenReaders(settings.max_streams_per_user)
            stored = StoredBytes(store, settings.max_stored_bytes_per_user)
            state = AppState(settings, store, pool, sessions, streams, metrics, readers, stored)
            metrics.watch(state)
            app.state.keepstream = state
            # Long-lived start-up objects never need collecting; freezing them keeps the
            # collector's full passes (which stall every stream at once) short, and the
            # thresholds make those passes rare: with a thousand live streams the default
            # ones ran a full pass every few seconds, each a 100-160 ms pause for everyone.
            gc.collect()
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            logger.info("keepstream ready: db=%s worker=%s", settings.db, pool.worker.id)
            yield

    app = Starlette(
        routes=[
            *generation_routes,
            *session_routes,
            *stream_routes,
            *operator_routes,
            *openapi_routes,
            *chat_routes,
            *responses_routes,
        ],
        lifespan=lifespan,
        middleware=[
            Middleware(SecurityHeaders, cross_origin_prefix=STREAM_PATH),
            Middleware(ApiCors, origins=settings.allowed_origins, skip_prefix=STREAM_PATH),
        ],
        exception_handlers=handled_exceptions(),  # type: ignore[arg-type]
    )
    app.state.api_keys = api_keys
    app.state.url_signer = UrlSigner(
        signing_key(settings.url_signing_key, api_keys.digests()), ttl=settings.signed_url_ttl
    )
    app.state.metrics = metrics
    return app
