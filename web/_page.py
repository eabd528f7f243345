"""The chat page: a single-page client at ``/`` and its static files under ``/static``.

Plain HTML, CSS and ES modules from ``web/static`` (no build step, no CDN). Every URL the page
uses is relative to where it is served, so it works mounted under a prefix too. The routes
are not API operations: they stay out of the OpenAPI document (``include_in_schema=False``).
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX = STATIC_DIR / "index.html"

# The page is small and changes with the package: always revalidate it. Model output never
# reaches the DOM as HTML (markdown.js builds nodes); the policy is the second line: only the
# page's own scripts run and it talks only to its own server.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "frame-ancestors 'self'",
    )
)
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Referrer-Policy": "same-origin",
}


async def chat_page(request: Request) -> Response:
    """``GET /``: the chat page."""
    return FileResponse(INDEX, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


routes: list[Route | Mount] = [
    Route("/", chat_page, methods=["GET"], include_in_schema=False),
    Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
]
