"""Small pieces: text sanitising, event framing, settings, request validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from store import GenerationRecord, StreamStore
from streaming import GenerationLog, GenerationRequest, TextSanitizer, decode_event
from streaming._log import MAX_DELTA_CHARS
from web import Settings
from web._sse import format_events


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        (["ab", "c"], "abc"),
        (["x\ud83d", "\ude00y"], "x\U0001f600y"),
        (["\ud83d", "\ude00"], "\U0001f600"),
        (["a\ud83d"], "a\ufffd"),  # a high surrogate never completed
        (["\ude00b"], "\ufffdb"),  # a stray low surrogate
        (["e", "\u0301"], "e\u0301"),  # combining marks are ordinary code points
    ],
    ids=["plain", "pair-split", "pair-alone", "unpaired-high", "unpaired-low", "combining"],
)
def test_text_sanitizer_joins_split_surrogate_pairs(chunks: list[str], expected: str) -> None:
    sanitizer = TextSanitizer()
    out = "".join(sanitizer.feed(chunk) for chunk in chunks) + sanitizer.flush()
    assert out == expected
    out.encode()  # always valid UTF-8


def test_sse_frames_carry_the_offset_after_each_event() -> None:
    frames = format_events(4, [b'{"type":"delta","text":"a"}', b'{"type":"status","status":"x"}'])
    assert frames == (
        b'id: 5\nevent: delta\ndata: {"type":"delta","text":"a"}\n\n'
        b'id: 6\nevent: status\ndata: {"type":"status","status":"x"}\n\n'
    )


def test_settings_come_from_flags_then_environment_then_defaults() -> None:
    env = {
        "KEEPSTREAM_PORT": "9001",
        "KEEPSTREAM_FLUSH_INTERVAL": "0.05",
        "KEEPSTREAM_ALLOW_REMOTE": "true",
        "KEEPSTREAM_DB": "/tmp/x.db",
    }
    settings = Settings.from_args(["--port", "9002"], env=env)
    assert settings.port == 9002
    assert settings.flush_interval == 0.05
    assert settings.allow_remote is True
    assert settings.db == "/tmp/x.db"
    assert Settings.from_args([], env={}).port == 8000


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (Settings(host="0.0.0.0"), "refusing to bind"),
        (Settings(provider="openai"), "--upstream-url"),
        (Settings(provider="dify"), "--dify-url"),
        (Settings(dify_url="http://127.0.0.1:5001/v1"), "--dify-api-key"),
        (Settings(max_running=0), "max_running"),
        (Settings(flush_interval=-1), "flush_interval"),
    ],
    ids=[
        "remote-bind",
        "openai-without-url",
        "dify-without-url",
        "dify-without-key",
        "no-slots",
        "negative-flush",
    ],
)
def test_settings_that_cannot_work_are_refused(settings: Settings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings.validate()


def test_requests_accept_prompt_or_messages() -> None:
    by_prompt = GenerationRequest.from_json({"prompt": "hi"})
    by_messages = GenerationRequest.from_json({"messages": [{"role": "user", "content": "hi"}]})
    assert by_prompt.messages == by_messages.messages
    assert by_prompt.prompt == "hi"


async def test_coalesced_text_is_cut_into_bounded_delta_events(tmp_path: Path) -> None:
    async with StreamStore(str(tmp_path / "u.db")) as store:
        await store.create_generation(GenerationRecord("g", "g", "running", "simulated"))
        log = GenerationLog(store, "g", "g")
        text = "ab" * MAX_DELTA_CHARS + "🙂"
        for piece in (text[:5], text[5:]):
            log.add_text(piece)
        await log.flush()
        events = [decode_event(m) for m in (await store.read("g", 0)).messages]
        assert all(len(e["text"]) <= MAX_DELTA_CHARS for e in events)
        assert "".join(e["text"] for e in events) == text
        assert (await store.get_generation("g")).text == text
