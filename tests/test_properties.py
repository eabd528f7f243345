"""Property-based tests (hypothesis): the JSON boundary, merge patches, Durable Streams
offsets, and text offsets over arbitrary Unicode against a real store."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any
from unittest.mock import patch

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import web._generations
from store import StreamStore, format_offset
from streaming import encode_event, merge_patch
from web._generations import locate_text_offset
from web._json import InvalidJSON, depth_of, encode_json, parse_json
from web._sse import trim_delta

# Text as JSON may carry it: any code point but the surrogates.
text = st.text(st.characters(codec="utf-8"))
finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers() | finite | text
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=30,
)


def reference_depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(reference_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(reference_depth, value), default=0)
    return 0


@given(json_values)
def test_every_json_value_round_trips_through_the_boundary(value: Any) -> None:
    assert parse_json(encode_json(value), max_depth=1000) == value
    assert parse_json(json.dumps(value).encode(), max_depth=1000) == value


@given(json_values, st.integers(0, 12))
def test_depth_is_refused_exactly_past_the_limit(value: Any, limit: int) -> None:
    depth = reference_depth(value)
    assert depth_of(value) == depth
    body = encode_json(value)
    if depth > limit:
        with pytest.raises(InvalidJSON, match="nested deeper"):
            parse_json(body, max_depth=limit)
    else:
        assert parse_json(body, max_depth=limit) == value


@given(st.integers(0xD800, 0xDFFF), text, text)
def test_a_lone_surrogate_anywhere_is_refused(surrogate: int, before: str, after: str) -> None:
    body = json.dumps({"k": before + chr(surrogate) + after}).encode()  # escaped as \udxxx
    with pytest.raises(InvalidJSON):
        parse_json(body)


@given(st.binary(max_size=64))
def test_any_bytes_parse_or_are_refused_cleanly(body: bytes) -> None:
    try:
        value = parse_json(body)
    except InvalidJSON as exc:
        assert str(exc).startswith("malformed JSON")
    else:
        assert parse_json(encode_json(value)) == value  # what is accepted can be sent back


objects = st.dictionaries(text, json_values, max_size=5)


@given(objects, objects)
def test_merge_patch_follows_rfc_7396(target: dict[str, Any], patch: dict[str, Any]) -> None:
    merged = merge_patch(target, patch)
    for key, value in patch.items():
        if value is None:
            assert key not in merged
        elif not isinstance(value, dict):
            assert merged[key] == value
    for key in set(target) - set(patch):
        assert merged[key] == target[key]
    assert merge_patch(merged, patch) == merged  # applying a patch twice changes nothing
    assert merge_patch(target, {}) == target


@given(st.lists(st.integers(0, 10**16 - 1), min_size=2, max_size=20))
def test_durable_stream_offsets_sort_as_their_positions(positions: list[int]) -> None:
    offsets = [format_offset(p) for p in positions]
    assert sorted(offsets) == [format_offset(p) for p in sorted(positions)]
    assert all(len(o) == 33 for o in offsets)


unicode_text = st.text(st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(unicode_text, min_size=1, max_size=8), st.data())
def test_text_offsets_resume_exactly_over_any_unicode(
    deltas: list[str], data: st.DataObject
) -> None:
    """Events after ``text_offset`` characters, the first one trimmed, give exactly the rest
    of the text: whatever the characters (astral, combining, zero-width), and whether the
    search starts at the stream's start or steps back (two events at a time) from its end."""
    deltas = [d for d in deltas if d]
    full = "".join(deltas)
    text_offset = data.draw(st.integers(0, len(full)))

    async def resume() -> str:
        with tempfile.TemporaryDirectory() as folder:
            async with StreamStore(str(Path(folder) / "s.db"), flush_interval=0) as store:
                await store.create_stream("s")
                payloads = [encode_event({"type": "status", "status": "running"})]
                payloads += [encode_event({"type": "delta", "text": d}) for d in deltas]
                payloads.append(encode_event({"type": "status", "status": "completed"}))
                await store.append("s", payloads, close=True)
                found = await locate_text_offset(store, "s", text_offset)
                with patch.object(web._generations, "SEARCH_STEP", 2):
                    end = (len(full), len(payloads))
                    assert await locate_text_offset(store, "s", text_offset, known=end) == found
                offset, skip = found
                rest = (await store.read("s", offset)).messages
                if skip:
                    rest = [trim_delta(rest[0], skip), *rest[1:]]
                return "".join(
                    event["text"] for event in map(json.loads, rest) if event["type"] == "delta"
                )

    assert anyio.run(resume) == full[text_offset:]
