"""keepstream's HTTP surface: the Starlette app, its SSE views, errors and the CLI."""

from __future__ import annotations

from ._app import build_providers as build_providers
from ._app import create_app as create_app
from ._cli import main as main
from ._settings import Settings as Settings

__all__ = ["Settings", "build_providers", "create_app", "main"]
