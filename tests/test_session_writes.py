"""Session writes as plain data (``SessionWrite``), applied by the store atomically with the
generation they come with: what any store backend must do with them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from store import (
    GenerationNotFound,
    GenerationRecord,
    KeptResponse,
    NewMessage,
    SessionRecord,
    SessionStore,
    SessionWrite,
    StreamNotFound,
    StreamStore,
    WriteRejected,
)


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[SessionStore]:
    async with StreamStore(str(tmp_path / "s.db")) as store:
        session_store = SessionStore(store)
        await session_store.create(SessionRecord.blank("s"))
        yield session_store


def generation(generation_id: str) -> GenerationRecord:
    return GenerationRecord(generation_id, generation_id, "queued", "simulated", session_id="s")


def answer(generation_id: str) -> NewMessage:
    return NewMessage(f"msg_{generation_id}", "assistant", generation_id=generation_id)


async def ids(sessions: SessionStore) -> list[str]:
    return [m.id for m in await sessions.messages("s")]


async def test_a_session_write_lands_with_its_generation_or_not_at_all(
    sessions: SessionStore,
) -> None:
    streams = sessions.streams
    first = SessionWrite(
        "s", (NewMessage("q1", "user", "hi"), answer("g1")), 1.0, 100, only_if_idle=True
    )
    await streams.create_generation(generation("g1"), session_write=first)
    assert await ids(sessions) == ["q1", "msg_g1"]

    # Another answer while g1 is queued: refused, and nothing of it is written.
    second = SessionWrite(
        "s", (NewMessage("q2", "user", "again"), answer("g2")), 2.0, 100, only_if_idle=True
    )
    with pytest.raises(WriteRejected) as refused:
        await streams.create_generation(generation("g2"), session_write=second)
    assert (refused.value.reason, refused.value.detail) == ("busy", "g1")
    with pytest.raises(GenerationNotFound):
        await streams.get_generation("g2")
    with pytest.raises(StreamNotFound):
        await streams.stream_length("g2")
    assert await ids(sessions) == ["q1", "msg_g1"]

    # A regenerated answer takes the last one's place; its request's response is kept.
    kept = KeptResponse(None, "key-1", {"session_id": "s", "generation_id": "g3"})
    third = SessionWrite("s", (answer("g3"),), 3.0, 100, replace_answer=True, kept=kept)
    await streams.create_generation(generation("g3"), session_write=third)
    assert await ids(sessions) == ["q1", "msg_g3"]
    assert await sessions.recall(None, "key-1") == kept.response
    assert (await sessions.get("s")).message_count == 2


async def test_messages_alone_are_added_and_the_oldest_trimmed(sessions: SessionStore) -> None:
    messages = tuple(NewMessage(f"m{i}", "user", f"message {i}") for i in range(12))
    await sessions.add_messages(SessionWrite("s", messages, 1.0, max_messages=10))
    assert await ids(sessions) == [f"m{i}" for i in range(2, 12)]
    record = await sessions.get("s")
    assert (record.message_count, record.trimmed_messages) == (10, 2)
    await sessions.streams.create_generation(
        generation("g1"), session_write=SessionWrite("s", (answer("g1"),), 2.0, 10)
    )
    with pytest.raises(WriteRejected):  # not idle: g1 is queued
        await sessions.add_messages(SessionWrite("s", (), 3.0, 10, only_if_idle=True))
    assert await ids(sessions) == [f"m{i}" for i in range(3, 12)] + ["msg_g1"]
