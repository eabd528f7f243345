"""keepstream's HTTP surface: the Starlette app, its SSE views, errors and the CLI."""

from __future__ import annotations

from ._app import build_app as build_app
from ._app import create_app as create_app
from ._auth import Authenticate as Authenticate
from ._cli import main as main
from ._runtime import Runtime as Runtime
from ._runtime import build_providers as build_providers
from ._settings import Settings as Settings

__all__ = [
    "Authenticate",
    "Runtime",
    "Settings",
    "build_app",
    "build_providers",
    "create_app",
    "main",
]
