"""Named streams on Redis (``NamedStreamBackend``): the Durable Streams view's primitives,
each check-and-write one script of ``_named_lua``."""

from __future__ import annotations

import secrets
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

from .._exceptions import (
    InvalidFork,
    StreamNotFound,
)
from .._named_types import (
    DEFAULT_CONTENT_TYPE,
    AppendOutcome,
    CreateRequest,
    Producer,
    StreamInfo,
    is_json,
    sub_offset_prefix,
)
from ..types import ReadResult
from ._base import RedisPart
from ._codec import Arg, Asked, check, dumps, names


def _key(owner: str | None, name: str) -> str:
    return f"{owner or ''}/{name}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(value: Any) -> str | None:
    text = _text(value)
    return text or None


def _info(name: str, reply: list[Any], *, writable: bool = True) -> StreamInfo:
    """A ``StreamInfo`` from a script's ``{id, ct, closed, next, ttl, exp_at, expiry,
    segments}``."""
    sid, ct, closed, next_offset, ttl, exp_at, expiry, flat = reply
    ttl_text, exp_text, expiry_text = _optional(ttl), _optional(exp_at), _optional(expiry)
    segment_ids = names(flat[::2])
    return StreamInfo(
        name=name,
        stream_id=_text(sid),
        content_type=_text(ct),
        closed=bool(closed),
        next_offset=int(next_offset),
        ttl=None if ttl_text is None else int(ttl_text),
        expires_at=None if exp_text is None else float(exp_text),
        expiry_at=None if expiry_text is None else float(expiry_text),
        writable=writable,
        segments=tuple(zip(segment_ids, (int(b) for b in flat[1::2]), strict=True)),
    )


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


class RedisNamedStreams(RedisPart):
    """The named-stream half of ``RedisStore`` (its methods, kept apart by job)."""

    @abstractmethod
    async def read(
        self,
        stream_id: str,
        offset: int,
        *,
        limit: int = ...,
        max_bytes: int | None = None,
        from_disk: bool = False,
    ) -> ReadResult:
        """Committed messages from ``offset``."""

    async def _touched_of(self, key: str, touched: Mapping[str, float]) -> str:
        """The caller's last access to the stream ``key`` names now ('' for none; with no
        access recorded at all, as usual, without asking Redis which stream that is)."""
        if not touched:
            return ""
        sid = await self.client.hget(self.prefix + "names", key)
        return "" if sid is None else _number(touched.get(_text(sid)))

    async def named_info(
        self, owner: str | None, name: str, *, now: float, touched: Mapping[str, float]
    ) -> StreamInfo:
        """A named stream's metadata (expiring it, if due)."""
        key = _key(owner, name)
        reply = await self.run(
            self.scripts.named_info,
            self.node_id,
            key,
            repr(now),
            await self._touched_of(key, touched),
        )
        return _info(name, check(reply, name))

    async def create_named(
        self,
        owner: str | None,
        name: str,
        request: CreateRequest,
        *,
        now: float,
        touched: Mapping[str, float],
    ) -> tuple[bool, StreamInfo]:
        """Create a named stream, or find it with the same configuration."""
        key = _key(owner, name)
        source_key = "" if request.forked_from is None else _key(owner, request.forked_from)
        prefix = b""
        if request.forked_from is not None and request.fork_sub_offset:
            prefix = await self._sub_offset_prefix(owner, request, now, touched)
        args: list[Arg] = [
            self.node_id,
            key,
            source_key,
            repr(now),
            await self._touched_of(key, touched),
            await self._touched_of(source_key, touched) if source_key else "",
            request.content_type or "",
            "" if request.ttl is None else str(request.ttl),
            _number(request.expires_at),
            int(request.closed),
            "" if request.fork_offset is None else request.fork_offset,
            request.fork_sub_offset,
            prefix,
            "ds_" + secrets.token_urlsafe(12),
            dumps(owner),
            DEFAULT_CONTENT_TYPE,
            len(request.payloads),
            *request.payloads,
        ]
        reply = await self.run(self.scripts.named_create, *args)
        if reply == b"E:source_not_found":
            raise StreamNotFound(request.forked_from or "")
        check(reply, name, asked=Asked(content_type=request.content_type or ""))
        info = _info(name, reply[1:])
        self.wake([info.stream_id])
        return bool(reply[0]), info

    async def _sub_offset_prefix(
        self, owner: str | None, request: CreateRequest, now: float, touched: Mapping[str, float]
    ) -> bytes:
        """The first values (JSON) or bytes of the source's message at the fork offset: read
        before the creating script, which checks the offset again (messages never change)."""
        assert request.forked_from is not None
        source = await self.named_info(owner, request.forked_from, now=now, touched=touched)
        at = source.next_offset if request.fork_offset is None else request.fork_offset
        for stream_id, base in reversed(source.segments):
            if base <= at:
                found = await self.read(stream_id, at, limit=1)
                if found.messages and at < source.next_offset:
                    return sub_offset_prefix(
                        found.messages[0], request.fork_sub_offset, is_json(source.content_type)
                    )
                break
        raise InvalidFork("Stream-Fork-Sub-Offset needs a message at the fork offset")

    async def append_named(
        self,
        owner: str | None,
        name: str,
        *,
        content_type: str | None,
        payload: bytes | None,
        close: bool,
        seq: str | None,
        producer: Producer | None,
        now: float,
        touched: Mapping[str, float],
    ) -> AppendOutcome:
        """Append one message (or only close) with every protocol check, in one script."""
        key = _key(owner, name)
        reply = await self.run(
            self.scripts.named_append,
            self.node_id,
            key,
            repr(now),
            await self._touched_of(key, touched),
            content_type or "",
            int(payload is not None),
            payload or b"",
            int(close),
            seq or "",
            int(producer is not None),
            *((producer.id, producer.epoch, producer.seq) if producer else ("", 0, 0)),
        )
        asked = Asked(content_type or "", producer.seq if producer else -1, seq or "")
        check(reply, name, asked=asked)
        next_offset, closed, duplicate, epoch, producer_seq, *written = reply
        self.wake(names(written))  # this node's readers; the others hear the script's message
        if closed and not duplicate:
            for stream_id in names(written):
                self.stream_closed(stream_id)
        return AppendOutcome(
            int(next_offset),
            bool(closed),
            bool(duplicate),
            None if epoch in (b"", "") else int(epoch),
            None if producer_seq in (b"", "") else int(producer_seq),
        )

    async def delete_named(self, info: StreamInfo) -> None:
        """Delete a named stream: soft-delete it while forks read it."""
        reply = await self.run(self.scripts.named_delete, self.node_id, info.stream_id)
        check(reply, info.name)
        self.wake([info.stream_id])

    async def sweep_named(self, *, now: float, touched: Mapping[str, float]) -> int:
        """Slide the TTLs of the streams touched and retire those expired by ``now``."""
        pairs: list[Arg] = []
        for stream_id, at in touched.items():
            pairs += [stream_id, repr(at)]
        reply = await self.run(
            self.scripts.named_sweep, self.node_id, repr(now), len(pairs) // 2, *pairs
        )
        return int(reply)
