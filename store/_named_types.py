"""What the Durable Streams view and every store backend share about named streams: the
protocol's offsets and media types, and the plain data of creating, appending to and
describing a named stream."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ._exceptions import InvalidFork

OFFSET_WIDTH = 16
DEFAULT_CONTENT_TYPE = "application/octet-stream"
SOFT_DELETED = 1  # deleted while forks read it: 410 until the last fork goes
EXPIRED_KEPT = 2  # expired while forks read it: its name is free again


def format_offset(offset: int) -> str:
    """An offset as the protocol shows it: fixed-width, so offsets sort as strings.

    The shape is the reference server's ``<16 digits>_<16 digits>``; the first field is
    reserved and always zero, the second is the stream's own offset.
    """
    return f"{0:0{OFFSET_WIDTH}d}_{offset:0{OFFSET_WIDTH}d}"


def media_type(content_type: str) -> str:
    """The media type alone, lower-cased: ``Text/Plain; charset=utf-8`` → ``text/plain``."""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(content_type: str) -> bool:
    """Whether a stream of this type keeps JSON message boundaries."""
    return media_type(content_type) == "application/json"


@dataclass(frozen=True, slots=True)
class Producer:
    """An idempotent producer's headers: who it is, its epoch, and this append's seq."""

    id: str
    epoch: int
    seq: int


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """What a PUT asks for. ``payloads`` is the initial content, one message (or none)."""

    content_type: str | None = None
    ttl: int | None = None
    expires_at: float | None = None
    closed: bool = False
    forked_from: str | None = None
    fork_offset: int | None = None
    fork_sub_offset: int = 0
    payloads: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's metadata as committed.

    ``segments`` lists ``(stream id, first offset)`` from the root of its fork chain to the
    stream itself: offsets from each segment's first up to the next one's are read there.
    """

    name: str
    stream_id: str
    content_type: str
    closed: bool
    next_offset: int
    ttl: int | None
    expires_at: float | None
    expiry_at: float | None
    writable: bool
    segments: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class AppendOutcome:
    """Where an append left the stream; ``duplicate`` when a producer retry was dropped."""

    next_offset: int
    closed: bool
    duplicate: bool = False
    producer_epoch: int | None = None
    producer_seq: int | None = None


def sub_offset_prefix(data: bytes, sub_offset: int, json_mode: bool) -> bytes:
    """The first ``sub_offset`` values (JSON) or bytes of a message."""
    if not json_mode:
        if sub_offset > len(data):
            raise InvalidFork(f"Stream-Fork-Sub-Offset {sub_offset} is beyond the message")
        return data[:sub_offset]
    values = json.loads(b"[" + data + b"]")
    if sub_offset > len(values):
        raise InvalidFork(f"Stream-Fork-Sub-Offset {sub_offset} is beyond the message")
    return ",".join(json.dumps(v, ensure_ascii=False) for v in values[:sub_offset]).encode()
