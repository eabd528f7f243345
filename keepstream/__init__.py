"""keepstream: LLM answers that cannot be lost.

``Keepstream`` runs it inside your application (your own generation code as providers, the
HTTP API to mount); ``KeepstreamClient`` and ``AsyncKeepstreamClient`` talk to a server.
Both give the same snapshot and event types.
"""

from __future__ import annotations

from client import AsyncKeepstreamClient as AsyncKeepstreamClient
from client import Delta as Delta
from client import Event as Event
from client import Generation as Generation
from client import KeepstreamClient as KeepstreamClient
from client import Status as Status
from streaming import GeneratorInput as GeneratorInput
from streaming import ProviderChunk as ProviderChunk
from streaming import TextGenerator as TextGenerator
from streaming import UnknownProvider as UnknownProvider
from web import Authenticate as Authenticate
from web import Settings as Settings

from ._embedded import Keepstream as Keepstream

__all__ = [
    "AsyncKeepstreamClient",
    "Authenticate",
    "Delta",
    "Event",
    "Generation",
    "GeneratorInput",
    "Keepstream",
    "KeepstreamClient",
    "ProviderChunk",
    "Settings",
    "Status",
    "TextGenerator",
    "UnknownProvider",
]
