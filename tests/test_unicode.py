"""Text beyond ASCII arrives intact however the upstream splits it, and every text offset
resumes exactly.

Emoji (with ZWJ sequences and flags), CJK and combining characters are cut two ways: the UTF-8
*bytes* of single characters across separate TCP writes, and UTF-16 surrogate pairs across two
chunks as JSON escapes (``"\\ud83d"`` then ``"\\ude00"``). The delta boundaries also fall
inside grapheme clusters. For each answer the snapshot, the SSE deltas and a resume from
*every* ``text_offset`` (in code points) must agree with the expected string exactly.
"""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import httpx
import pytest
from httpx_sse import ServerSentEvent

from .fake_upstream import (
    DONE,
    FakeUpstream,
    Framing,
    Reply,
    answer,
    completion_chunk,
    paced,
    pair_cuts,
    split_inside_characters,
    utf16_pieces,
)
from .support import final_status, get_snapshot, read_events, start_generation, text_of

REQUEST_TIMEOUT = 10.0
SWEEP_TIMEOUT = 20.0

# Delta boundaries inside a ZWJ sequence (👩 | ZWJ 💻), a flag (🇯 | 🇵), a combining
# sequence (e | U+0301) and CJK words.
GRAPHEME_DELTAS = (
    "Hi 👩",
    "\u200d",
    "💻 and 🇯",
    "🇵 — 日",
    "本語, 中文, 한국",
    "어; e",
    "\u0301 vs é; caf",
    "é naïve 🙂🚀 Ωmega 𝄞",
    " 👨‍👩‍👧‍👦 🏳️‍🌈 done",
)
GRAPHEME_TEXT = "".join(GRAPHEME_DELTAS)

# Non-BMP characters, so their UTF-16 form has surrogate pairs to split.
SURROGATE_TEXT = "😀 grin 👩‍💻 coder 🇯🇵 flag 𝄞 clef e\u0301 日本 🚀"

FINISH = (completion_chunk(finish_reason="stop"), DONE)


def assert_ids_increase(events: list[ServerSentEvent]) -> None:
    ids = [int(sse.id) for sse in events]
    assert all(a < b for a, b in itertools.pairwise(ids)), ids


async def assert_resumes_at_every_text_offset(
    client: httpx.AsyncClient, generation_id: str, text: str
) -> None:
    """``?text_offset=k`` gives exactly ``text[k:]`` and then the final status, for every k."""
    with anyio.fail_after(SWEEP_TIMEOUT):
        for k in range(len(text) + 1):
            events = await read_events(
                client, generation_id, params={"text_offset": k}, timeout=REQUEST_TIMEOUT
            )
            assert text_of(events) == text[k:], f"text_offset={k}"
            # A resume starts at the first character not yet shown: no empty delta first.
            assert all(sse.json()["text"] for sse in events if sse.event == "delta"), k
            assert final_status(events) == "completed", f"text_offset={k}"
            assert_ids_increase(events)


async def assert_intact(client: httpx.AsyncClient, generation_id: str, expected: str) -> None:
    """The snapshot, the live deltas and every text-offset resume agree with ``expected``."""
    events = await read_events(client, generation_id, timeout=REQUEST_TIMEOUT)
    assert final_status(events) == "completed"
    assert text_of(events) == expected
    assert [int(sse.id) for sse in events] == list(range(1, len(events) + 1))
    # The sweep only means something if the text spans several delta events.
    assert sum(1 for sse in events if sse.event == "delta") > 1
    snapshot = await get_snapshot(client, generation_id)
    assert snapshot["status"] == "completed", snapshot
    assert snapshot["text"] == expected
    await assert_resumes_at_every_text_offset(client, generation_id, expected)


async def start(client: httpx.AsyncClient, **body: Any) -> str:
    with anyio.fail_after(REQUEST_TIMEOUT):
        generation = await start_generation(client, **body)
    generation_id: str = generation["id"]
    return generation_id


@pytest.mark.parametrize("framing", ["chunked", "close"], ids=["chunked", "close-framed"])
async def test_utf8_bytes_split_across_tcp_writes_arrive_intact(
    openai_client: httpx.AsyncClient, upstream: FakeUpstream, framing: Framing
) -> None:
    body = b"".join(answer(GRAPHEME_DELTAS, usage=(3, 9)))
    pieces = split_inside_characters(body)
    # Every multi-byte character is cut: no piece but the first starts a character.
    assert all(0x80 <= piece[0] <= 0xBF for piece in pieces[1:])
    assert len(pieces) > sum(1 for ch in GRAPHEME_TEXT if ord(ch) > 0x7F)
    prompt = upstream.expect(Reply(paced(pieces), framing=framing), label="utf8")
    generation_id = await start(openai_client, prompt=prompt)
    await assert_intact(openai_client, generation_id, GRAPHEME_TEXT)


async def test_surrogate_pairs_split_across_chunks_arrive_intact(
    openai_client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    pieces = utf16_pieces(SURROGATE_TEXT, list(pair_cuts(SURROGATE_TEXT)))
    # Every pair is cut: pieces end with a lone high surrogate and start with a lone low one.
    assert sum(1 for p in pieces if "\ud800" <= p[-1] <= "\udbff") == sum(
        1 for ch in SURROGATE_TEXT if ord(ch) > 0xFFFF
    )
    chunks = [completion_chunk(piece, ascii_only=True) for piece in pieces]
    assert b"\\ud83d" in chunks[0] and b"\\ude00" in chunks[1]
    prompt = upstream.expect(
        Reply(paced([completion_chunk(role="assistant", content=""), *chunks, *FINISH])),
        label="utf16",
    )
    generation_id = await start(openai_client, prompt=prompt)
    await assert_intact(openai_client, generation_id, SURROGATE_TEXT)


async def test_unpaired_surrogates_become_replacement_characters(
    openai_client: httpx.AsyncClient, upstream: FakeUpstream
) -> None:
    # A high surrogate with no low one after it (mid-answer and at the very end), and a low
    # one with no high one before it: none can be encoded, each becomes U+FFFD.
    pieces = ["a\ud83d", "b", "\ude00c", "\ud83d"]
    chunks = [completion_chunk(piece, ascii_only=True) for piece in pieces]
    prompt = upstream.expect(Reply(paced([*chunks, *FINISH])), label="unpaired")
    generation_id = await start(openai_client, prompt=prompt)
    await assert_intact(openai_client, generation_id, "a\ufffdb\ufffdc\ufffd")


async def test_simulated_multibyte_text_resumes_at_every_text_offset(
    openai_client: httpx.AsyncClient,
) -> None:
    generation_id = await start(
        openai_client,
        prompt="unicode sweep",
        provider="simulated",
        params={"max_tokens": 48, "tokens_per_second": 600},
    )
    events = await read_events(openai_client, generation_id, timeout=REQUEST_TIMEOUT)
    text = text_of(events)
    assert any(ord(ch) > 0xFFFF for ch in text), text  # emoji: 4 UTF-8 bytes, 1 code point
    assert any("\u0300" <= ch <= "\u036f" or ch == "\u200d" for ch in text), text
    await assert_intact(openai_client, generation_id, text)
