"""CORS for the API, so a frontend on another origin (a dev server on ``localhost:3000``)
can call it: allowed origins are configured (none by default); preflights are answered.

The Durable Streams view (``/v1/stream``) keeps its own rule (any origin, as its protocol's
browser clients expect) and is not touched here.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ._errors import error_response
from ._security import EXPOSED, route_path

METHODS = ("GET", "POST", "PATCH", "DELETE", "OPTIONS")
# What a browser script may read besides the safelisted headers.
API_EXPOSED = (
    f"{EXPOSED}, Keepstream-Generation-Id, Keepstream-Session-Id, Keepstream-Message-Id, "
    "x-vercel-ai-ui-message-stream"
)
PREFLIGHT_MAX_AGE = 600


class _JsonRefusals(CORSMiddleware):
    """Starlette's CORS middleware, with a refused preflight answered in the API's JSON
    error shape rather than plain text."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        message = bytes(response.body).decode()
        headers = {k: v for k, v in response.headers.items() if k.lower().startswith("vary")}
        return error_response(
            response.status_code, "cors_refused", f"{message} (see --cors-origins)", headers=headers
        )


class ApiCors:
    """ASGI middleware: CORS for ``origins`` on every path but those under ``skip_prefix``.

    Requests carry an API key in ``Authorization``, never cookies, so any request header is
    allowed and credentials are not.
    """

    def __init__(self, app: ASGIApp, *, origins: Sequence[str], skip_prefix: str) -> None:
        self.app = app
        self.skip_prefix = skip_prefix
        self.cors = _JsonRefusals(
            app,
            allow_origins=list(origins),
            allow_methods=METHODS,
            allow_headers=["*"],
            expose_headers=[h.strip() for h in API_EXPOSED.split(",")],
            max_age=PREFLIGHT_MAX_AGE,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope).startswith(self.skip_prefix):
            await self.app(scope, receive, send)
            return
        await self.cors(scope, receive, send)
