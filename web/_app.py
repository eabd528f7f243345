"""The Starlette app: the HTTP API over a keepstream ``Runtime``, standalone (its lifespan
opens the runtime) or mounted in a host application (the host's lifespan does)."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from streaming import Provider, TextGenerator

from ._chat import routes as chat_routes
from ._cors import ApiCors
from ._durable import STREAM_PATH
from ._durable import routes as stream_routes
from ._errors import handled_exceptions
from ._generations import routes as generation_routes
from ._metrics import routes as operator_routes
from ._openapi import routes as openapi_routes
from ._page import routes as page_routes
from ._responses import routes as responses_routes
from ._runtime import Runtime
from ._security import SecurityHeaders
from ._sessions import routes as session_routes
from ._settings import Settings

logger = logging.getLogger("keepstream")

# Young collections every 50,000 allocations instead of 700; a full one every 50 x 100 of
# those. Cycles are still collected, just in fewer, larger batches.
GC_THRESHOLDS = (50_000, 50, 100)
# The GIL handover interval (Python's default: 5 ms). The writer thread gives the GIL up
# around every SQLite call; with the event loop busy, taking it back waited out the whole
# interval each time, so a commit of a few statements spent tens of ms just waiting.
SWITCH_INTERVAL = 0.001

Lifespan = Callable[[Starlette], AbstractAsyncContextManager[None]]


def build_app(runtime: Runtime, *, lifespan: Lifespan | None = None) -> Starlette:
    """The HTTP API (native, sessions, Durable Streams, the client views) over ``runtime``.

    Without ``lifespan`` the app opens nothing itself: mount it in a host app whose own
    lifespan enters ``runtime``. Every URL it answers with starts with the prefix it is
    mounted under.
    """
    app = Starlette(
        routes=[
            *generation_routes,
            *session_routes,
            *stream_routes,
            *operator_routes,
            *openapi_routes,
            *chat_routes,
            *responses_routes,
            *page_routes,
        ],
        lifespan=lifespan,
        middleware=[
            Middleware(SecurityHeaders, cross_origin_prefix=STREAM_PATH),
            Middleware(ApiCors, origins=runtime.settings.allowed_origins, skip_prefix=STREAM_PATH),
        ],
        exception_handlers=handled_exceptions(),  # type: ignore[arg-type]
    )
    app.state.runtime = runtime
    app.state.access = runtime.access
    app.state.metrics = runtime.metrics
    return app


def create_app(
    settings: Settings | None = None,
    *,
    providers: Mapping[str, Provider | TextGenerator] | None = None,
    tune_process: bool = False,
) -> Starlette:
    """A standalone keepstream ASGI app; its lifespan opens and closes the runtime.

    ``providers`` adds providers (or generator functions) to the built-in ones.
    ``tune_process`` (what ``keepstream serve`` does, and only it: it changes the whole
    process) freezes the start-up objects and makes full collections rare once the app has
    started, and shortens the GIL's switch interval. Raises
    ``ValueError`` for settings that cannot work.
    """
    runtime = Runtime(settings, providers=providers)
    runtime.check_default_provider()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime:
            if tune_process:
                # Long-lived start-up objects never need collecting; freezing them keeps the
                # collector's full passes (which stall every stream at once) short, and the
                # thresholds make those passes rare: with a thousand live streams the default
                # ones ran a full pass every few seconds, each a 100-160 ms pause for everyone.
                gc.collect()
                gc.freeze()
                gc.set_threshold(*GC_THRESHOLDS)
                sys.setswitchinterval(SWITCH_INTERVAL)
            worker = runtime.state.pool.worker.id
            logger.info("keepstream ready: db=%s worker=%s", runtime.settings.db, worker)
            yield

    return build_app(runtime, lifespan=lifespan)
