"""The one JSON boundary: every request body is parsed here and every JSON response encoded
here, both with msgspec.

Parsing is strict, so nothing that could fail later is ever stored: ``NaN``, ``Infinity``
and numbers out of range, lone UTF-16 surrogates (``"\\ud800"``), invalid UTF-8, trailing
data and nesting deeper than ``max_depth`` are refused with a 400 that names the problem.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import JSONResponse as StarletteJSONResponse

DEFAULT_MAX_JSON_DEPTH = 64

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_CONTAINERS = (list, dict)


class InvalidJSON(ValueError):
    """A body that is not strict JSON, or nests too deeply (the web layer answers 400)."""


def parse_json(body: bytes, *, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """The JSON value in ``body``; ``InvalidJSON`` naming the problem for anything that is
    not strict JSON (RFC 8259 text that is also valid I-JSON text) or nests too deeply."""
    try:
        value = _decoder.decode(body)
    except RecursionError:
        raise InvalidJSON(f"malformed JSON: nested deeper than {max_depth} levels") from None
    except msgspec.ValidationError as exc:  # "Number out of range"
        raise InvalidJSON(f"malformed JSON: {_describe(str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise InvalidJSON(f"malformed JSON: {_describe(str(exc))}") from None
    # Counting brackets is a fast upper bound on the depth; only a body that might be too
    # deep is walked.
    if body.count(b"[") + body.count(b"{") > max_depth and depth_of(value) > max_depth:
        raise InvalidJSON(f"malformed JSON: nested deeper than {max_depth} levels")
    return value


def _describe(message: str) -> str:
    """msgspec's message, made plain where it is cryptic."""
    if message == "Input data was truncated":
        return "the text ends early, or a \\ud800-\\udbff escape lacks its low surrogate"
    if message.startswith("Number out of range"):
        return "a number is out of range (it would be infinite)"
    return message.removeprefix("JSON is malformed: ")


def depth_of(value: Any) -> int:
    """How deeply ``value`` nests: 0 for a scalar, 1 for a flat array or object, …"""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, _CONTAINERS) else []
    while stack:
        container, depth = stack.pop()
        deepest = max(deepest, depth)
        items = container.values() if isinstance(container, dict) else container
        stack.extend((item, depth + 1) for item in items if isinstance(item, _CONTAINERS))
    return deepest


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON for ``value``."""
    return _encoder.encode(value)


class JSONResponse(StarletteJSONResponse):
    """A JSON response encoded by msgspec (the same library that parses the requests)."""

    def render(self, content: Any) -> bytes:
        return encode_json(content)
