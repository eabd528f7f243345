"""Headers every response carries: ``nosniff`` everywhere, and for the Durable Streams view
the cross-origin headers a browser client needs (CORP, CORS and the headers it may read)."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

EXPOSED = ", ".join(
    (
        "Stream-Next-Offset",
        "Stream-Cursor",
        "Stream-Up-To-Date",
        "Stream-Closed",
        "Stream-TTL",
        "Stream-Expires-At",
        "Stream-SSE-Data-Encoding",
        "ETag",
        "Location",
        "Producer-Epoch",
        "Producer-Seq",
        "Producer-Expected-Seq",
        "Producer-Received-Seq",
        "Retry-After",
    )
)


def route_path(scope: Scope) -> str:
    """The request's path within the app: without the prefix it is mounted under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :]
    return path


class SecurityHeaders:
    """ASGI middleware adding the headers to every response's start."""

    def __init__(self, app: ASGIApp, *, cross_origin_prefix: str) -> None:
        self.app = app
        self.prefix = cross_origin_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cross_origin = route_path(scope).startswith(self.prefix)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                if cross_origin:
                    headers["Cross-Origin-Resource-Policy"] = "cross-origin"
                    headers["Access-Control-Allow-Origin"] = "*"
                    headers["Access-Control-Expose-Headers"] = EXPOSED
            await send(message)

        await self.app(scope, receive, send_with_headers)
