"""A FastAPI app with keepstream inside: its own route at ``/``, keepstream's HTTP API at
``/ks``, its own generation code as provider ``custom``, and its own idea of who is asking.

Run it from the repository root::

    uvicorn examples.fastapi_app:app

then, as the example user ``alice``::

    curl -s localhost:8000/ks/v1/generations -H 'Authorization: Bearer alice-example-token' \\
      -d '{"prompt": "durable answers", "provider": "custom"}'

Environment: ``KEEPSTREAM_DB`` (the SQLite file, ``./keepstream-example.db`` by default) and
``EXAMPLE_ANSWER_SECONDS`` (how long an answer takes, 3 by default).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI, HTTPException, Request

from keepstream import GeneratorInput, Keepstream, Settings

# The example's users. A real app asks its own authentication here (a session cookie, a
# JWT, an OAuth token introspection): whatever it returns owns the generations.
EXAMPLE_TOKENS = {
    "alice-example-token": "alice",
    "bob-example-token": "bob",
}
DEFAULT_ANSWER_SECONDS = 3.0
ANSWER_SECONDS = float(os.environ.get("EXAMPLE_ANSWER_SECONDS", DEFAULT_ANSWER_SECONDS))


def authenticate(request: Request) -> str:
    """The user a request acts for, from its ``Authorization: Bearer <token>`` header;
    401 without a known token."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    user = EXAMPLE_TOKENS.get(token.strip()) if scheme.lower() == "bearer" else None
    if user is None:
        raise HTTPException(401, "log in first", headers={"WWW-Authenticate": "Bearer"})
    return user


ks = Keepstream(
    Settings(db=os.environ.get("KEEPSTREAM_DB", "./keepstream-example.db")),
    authenticate=authenticate,
)


def answer_for(prompt: str) -> str:
    """The ``custom`` provider's answer to ``prompt``: it depends on nothing else."""
    return (
        f"You asked about {prompt.strip() or 'nothing'}. Every word of this answer is"
        " committed to SQLite before any client sees it, so a client that drops its"
        " connection can come back with the last event id it saw and read exactly the rest:"
        " nothing missing, nothing twice."
    )


@ks.provider("custom")
async def custom(request: GeneratorInput) -> AsyncIterator[str]:
    """The host's own generation code: ``answer_for(prompt)``, a word at a time, paced so
    the whole answer takes ``ANSWER_SECONDS``. Whatever it raises ends the generation
    ``failed``; a cancel arrives as cancellation at its ``await``."""
    words = answer_for(request.prompt).split(" ")
    pause = ANSWER_SECONDS / len(words)
    for index, word in enumerate(words):
        await anyio.sleep(pause)
        yield word if index == 0 else f" {word}"


app = FastAPI(title="keepstream example", lifespan=ks.lifespan)
app.mount("/ks", ks.asgi_app())


@app.get("/")
async def home() -> dict[str, str]:
    """The host app's own route, untouched by keepstream."""
    return {"app": "keepstream example", "keepstream": "/ks/v1/generations"}
