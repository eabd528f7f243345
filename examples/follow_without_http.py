"""keepstream without HTTP: start a generation in this process, follow it as it commits, and
read its snapshot. No server, no port; the same store and guarantees::

    python -m examples.follow_without_http

``KEEPSTREAM_DB`` names the SQLite file (``./keepstream-example.db`` by default).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import anyio

from keepstream import Delta, GeneratorInput, Keepstream, ProviderChunk, Settings

ks = Keepstream(Settings(db=os.environ.get("KEEPSTREAM_DB", "./keepstream-example.db")))


@ks.provider("countdown")
async def countdown(request: GeneratorInput) -> AsyncIterator[str | ProviderChunk]:
    """Counts down from ``params["start"]`` (3 by default), then reports its usage."""
    start = int(request.params.get("start", 3))
    for number in range(start, 0, -1):
        await anyio.sleep(0.05)
        yield f"{number}... "
    yield "liftoff"
    yield ProviderChunk(usage={"input_tokens": 0, "output_tokens": start + 1})


async def main() -> None:
    """Start a countdown, print its events as they commit, then its snapshot."""
    async with ks:
        generation = await ks.start("count down", provider="countdown", params={"start": 5})
        async for event in ks.follow(generation.id):
            if isinstance(event, Delta):
                print(f"delta  @{event.offset}: {event.text!r}")
            else:
                print(f"status @{event.offset}: {event.status}")
        snapshot = await ks.get(generation.id)
        print(f"snapshot: {snapshot.status} {snapshot.text!r} usage={snapshot.usage}")


if __name__ == "__main__":
    anyio.run(main)
