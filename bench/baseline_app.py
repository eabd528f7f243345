"""The baseline the spine benchmark compares keepstream against: no persistence at all.

A tiny Starlette app with the same two endpoints and the same wire format as keepstream's
native API, doing the obvious thing: ``POST /v1/generations`` only remembers the request;
``GET /v1/generations/{id}/events`` runs the same ``streaming.SimulatedProvider`` inside the
request and sends **one** sse-starlette event per token, straight from the provider — no log,
no SQLite, no coalescing. Events carry the same ``id:`` (offset after), ``event:`` names and
compact JSON ``data:`` as keepstream (a ``running`` status first, the final status last).

It is served by uvicorn exactly as ``keepstream serve`` is (``uvicorn.run`` with the same
defaults, so uvloop and httptools when installed)::

    python -m bench.baseline_app --port 8001 --sim-tokens-per-second 50 --sim-max-tokens 500
"""

from __future__ import annotations

import argparse
import json
import secrets
from collections.abc import AsyncIterator, Sequence

import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streaming import (
    GenerationRequest,
    GenerationRun,
    SimulatedProvider,
    encode_event,
    status_event,
)

SSE_SEP = "\n"  # keepstream's native SSE uses bare LF separators too
SSE_PING = 15.0
SSE_SEND_TIMEOUT = 30.0
SSE_RETRY_MS = 1000


def create_app(*, tokens_per_second: float, max_tokens: int) -> Starlette:
    """The baseline app; its simulated model has the given defaults (requests may override)."""
    provider = SimulatedProvider(tokens_per_second=tokens_per_second, max_tokens=max_tokens)
    pending: dict[str, GenerationRequest] = {}

    async def create_generation(request: Request) -> Response:
        """``POST /v1/generations``: validate and remember the request; 202 with its id."""
        try:
            generation_request = GenerationRequest.from_json(json.loads(await request.body()))
            provider.validate(generation_request)
        except ValueError as exc:
            return JSONResponse({"error": {"type": "invalid_request", "message": str(exc)}}, 422)
        generation_id = "gen_" + secrets.token_urlsafe(16)
        pending[generation_id] = generation_request
        return JSONResponse({"id": generation_id, "object": "generation", "status": "queued"}, 202)

    async def events(request: Request) -> Response:
        """``GET /v1/generations/{id}/events``: run the model here, one event per token."""
        generation_request = pending.pop(request.path_params["generation_id"], None)
        if generation_request is None:
            return JSONResponse({"error": {"type": "not_found"}}, 404)
        return EventSourceResponse(
            follow(provider, generation_request),
            ping=SSE_PING,
            send_timeout=SSE_SEND_TIMEOUT,
            sep=SSE_SEP,
            headers={"Cache-Control": "no-cache"},
        )

    async def healthz(request: Request) -> Response:
        """``GET /healthz``: liveness."""
        return JSONResponse({"status": "ok", "pending": len(pending)})

    return Starlette(
        routes=[
            Route("/v1/generations", create_generation, methods=["POST"]),
            Route("/v1/generations/{generation_id}/events", events, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


async def follow(
    provider: SimulatedProvider, request: GenerationRequest
) -> AsyncIterator[ServerSentEvent | dict[str, object]]:
    """One event per token, in keepstream's native event format, ids = offset after."""
    yield {"retry": SSE_RETRY_MS}
    offset = 0

    def event(payload: dict[str, object]) -> ServerSentEvent:
        nonlocal offset
        offset += 1
        name = "delta" if payload["type"] == "delta" else "status"
        return ServerSentEvent(
            encode_event(payload).decode(), event=name, id=str(offset), sep=SSE_SEP
        )

    yield event(status_event("running"))
    usage = None
    async for chunk in provider.stream(request, run=GenerationRun("baseline")):
        if chunk.text:
            yield event({"type": "delta", "text": chunk.text})
        if chunk.usage is not None:
            usage = chunk.usage
    yield event(status_event("completed", usage=usage))


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the baseline app with uvicorn's defaults, as ``keepstream serve`` does."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_app")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--sim-tokens-per-second", type=float, default=50.0)
    parser.add_argument("--sim-max-tokens", type=int, default=200)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto")
    args = parser.parse_args(argv)
    app = create_app(tokens_per_second=args.sim_tokens_per_second, max_tokens=args.sim_max_tokens)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        loop=args.loop,
        http=args.http,
        timeout_graceful_shutdown=max(1, int(SSE_SEND_TIMEOUT)),
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
