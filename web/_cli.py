"""``keepstream serve``: run the server with uvicorn."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from ._app import create_app
from ._settings import Settings

USAGE = "usage: keepstream serve [options]   (keepstream serve --help for the options)"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keepstream`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "serve":
        print(USAGE, file=sys.stderr)
        return 2
    settings = Settings.from_args(args[1:])
    try:
        app = create_app(settings)
    except ValueError as exc:
        print(f"keepstream: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        loop=settings.loop,
        http=settings.http,
        timeout_graceful_shutdown=max(1, int(settings.sse_send_timeout)),
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
