"""The ``keepstream`` command: ``keepstream serve`` runs the server with uvicorn."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import uvicorn

from ._app import create_app
from ._logging import configure_logging
from ._openapi import package_version
from ._plugins import plugin_providers
from ._settings import Settings
from ._timeouts import build_http_protocol


def build_parser() -> argparse.ArgumentParser:
    """``keepstream [--version] serve [options]``."""
    parser = argparse.ArgumentParser(
        prog="keepstream",
        description="LLM chat responses that cannot be lost: detached generations, a durable"
        " SQLite log, resumable SSE.",
    )
    parser.add_argument("--version", action="version", version=f"keepstream {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Every option is also a KEEPSTREAM_* environment"
        " variable; a flag wins.",
    )
    Settings.add_arguments(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keepstream`` console script."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return 2
    settings = Settings.from_namespace(args)
    try:
        app = create_app(settings, providers=plugin_providers(settings), tune_process=True)
    except ValueError as exc:
        print(f"keepstream: {exc}", file=sys.stderr)
        return 2
    log_config = configure_logging(settings.log_level, settings.log_format)
    # One line even when quiet, so a person who started it sees where it is.
    print(
        f"keepstream {package_version()}: serving http://{settings.host}:{settings.port}"
        f" (store {settings.store or settings.db}; API reference at /docs)",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=log_config,
        access_log=settings.access_log,
        loop=settings.loop,
        # uvicorn's own protocol for --http, with the request head and body deadlines.
        http=build_http_protocol(
            settings.http,
            head_timeout=settings.request_head_timeout,
            body_timeout=settings.request_body_timeout,
        ),
        timeout_graceful_shutdown=max(1, int(settings.sse_send_timeout)),
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
