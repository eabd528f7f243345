"""Any LangChain chat model or chain as a keepstream provider, through its ``astream``.

``langchain_provider(runnable)`` turns a ``Runnable`` that takes chat messages (a chat
model, or a chain that starts with a prompt and ends with one) into a generator keepstream
runs: the request's messages go in as LangChain messages, each streamed chunk's text comes
out. The demo uses langchain-core's fake chat model, so it needs no network::

    python -m examples.langchain_provider

``KEEPSTREAM_DB`` names the SQLite file (``./keepstream-example.db`` by default).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessageChunk, BaseMessage, convert_to_messages
from langchain_core.runnables import Runnable

from keepstream import Delta, GeneratorInput, Keepstream, ProviderChunk, Settings, TextGenerator

FAKE_ANSWER = "Durable streams keep every token, even when the reader goes away."


def langchain_provider(
    runnable: Runnable[Any, Any],
) -> TextGenerator:
    """A keepstream generator over ``runnable.astream``: the request's messages as LangChain
    messages in; each chunk's text out (a chunk that is a message, or a plain ``str`` from
    a chain ending in ``StrOutputParser``), then the usage the model reported, if any.

    Cancelling the generation cancels ``astream`` where it waits and closes it.
    """

    async def generate(request: GeneratorInput) -> AsyncIterator[str | ProviderChunk]:
        messages = convert_to_messages([(m.role, m.content) for m in request.messages])
        usage: dict[str, Any] | None = None
        async for chunk in runnable.astream(messages):
            if isinstance(chunk, str):
                text = chunk
            elif isinstance(chunk, BaseMessage):
                text = chunk.text
                if isinstance(chunk, AIMessageChunk) and chunk.usage_metadata:
                    usage = dict(chunk.usage_metadata)
            else:
                raise TypeError(f"the runnable streamed a {type(chunk).__name__}, not text")
            if text:
                yield text
        if usage is not None:
            yield ProviderChunk(usage=usage)

    return generate


async def main() -> None:
    """Register a fake chat model as provider ``langchain``, ask it something, follow the
    answer as it commits, and print it."""
    model = GenericFakeChatModel(messages=iter([FAKE_ANSWER]))
    ks = Keepstream(Settings(db=os.environ.get("KEEPSTREAM_DB", "./keepstream-example.db")))
    ks.add_provider("langchain", langchain_provider(model))
    async with ks:
        generation = await ks.start(
            messages=[
                {"role": "system", "content": "You answer in one sentence."},
                {"role": "user", "content": "What does keepstream keep?"},
            ],
            provider="langchain",
        )
        async for event in ks.follow(generation.id):
            if isinstance(event, Delta):
                print(event.text, end="", flush=True)
            elif event.terminal:
                print(f"\n[{event.status}]")


if __name__ == "__main__":
    anyio.run(main)
