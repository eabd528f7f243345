"""Records as Redis hashes and script arguments: every field's value is its JSON text (so a
script compares ``'"running"'`` and a reader gets back exactly what was written), but a
generation's text, which lives in a string key of its own."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from .._exceptions import (
    ConfigConflict,
    ContentTypeMismatch,
    EpochSeq,
    InvalidFork,
    SeqConflict,
    SeqGap,
    SessionNotFound,
    StaleEpoch,
    StoreError,
    StreamClosed,
    StreamExists,
    StreamGone,
    StreamNotFound,
    WriteRejected,
)
from ..types import NewMessage, SessionWrite

R = TypeVar("R")
Arg = str | bytes | int | float


def dumps(value: Any) -> str:
    """JSON as every hash field holds it: ``json.dumps``'s defaults, the very text SQLite
    stores (so a context counts the same bytes toward a user's quota on both)."""
    return json.dumps(value)


def field_pairs(values: Mapping[str, Any]) -> list[Arg]:
    """``name, value, …`` for a script; ``text`` (raw) comes with ``text_chars``."""
    pairs: list[Arg] = []
    for name, value in values.items():
        if name == "text":
            pairs += ["text", value, "text_chars", len(value)]
        else:
            pairs += [name, dumps(value)]
    return pairs


def names(reply: Any) -> list[str]:
    """A Redis reply's list of ids, decoded."""
    return [item.decode() for item in reply]


def record_from_hash(cls: type[R], values: Mapping[Any, Any], **extra: Any) -> R:
    """A record dataclass from a hash (fields it lacks keep their defaults)."""
    decoded: dict[str, Any] = dict(extra)
    for f in fields(cls):  # type: ignore[arg-type]
        raw = values.get(f.name.encode())
        if raw is not None and f.name not in decoded:
            decoded[f.name] = json.loads(raw)
    return cls(**decoded)


def session_write_args(write: SessionWrite) -> list[Arg]:
    """A ``SessionWrite`` as the arguments the scripts' ``session_write`` reads."""
    args: list[Arg] = [
        write.session_id,
        int(write.only_if_idle),
        int(write.replace_answer),
        dumps(write.now),
        write.max_messages,
        len(write.messages),
    ]
    args += [_message_fields(m, write.now) for m in write.messages]
    kept = write.kept
    if kept is None:
        args += [0, "", "", ""]
    else:
        args += [1, kept.owner or "", kept.key, dumps(kept.response)]
    return args


def _message_fields(message: NewMessage, now: float) -> str:
    """A stored message's JSON without its opening brace and ``seq`` (the script adds
    them: it assigns the sequence numbers)."""
    body = dumps(
        {
            "id": message.id,
            "role": message.role,
            "content": message.content,
            "generation_id": message.generation_id,
            "created_at": now,
        }
    )
    return body[1:-1]


@dataclass(frozen=True, slots=True)
class Asked:
    """What the caller asked, for the errors that quote it: the content type it sent, the
    producer seq and the ``Stream-Seq`` it gave."""

    content_type: str = ""
    producer_seq: int = -1
    stream_seq: str = ""


def check(
    reply: Any,
    subject: str = "",
    missing: type[StoreError] = StreamNotFound,
    asked: Asked = Asked(),
) -> Any:
    """A script's reply, or its ``E:<why>[:<detail>]`` raised as the store's typed error
    (see ``error_for``)."""
    if isinstance(reply, bytes) and reply.startswith(b"E:"):
        raise error_for(reply.decode(), subject, missing, asked)
    return reply


def error_for(
    reply: str,
    subject: str,
    missing: type[StoreError] = StreamNotFound,
    asked: Asked = Asked(),
) -> StoreError:
    """The typed error a script's ``E:`` reply stands for: ``subject`` is the id or name it
    was about, ``missing`` the error for ``not_found`` (``StreamNotFound``,
    ``GenerationNotFound``), ``asked`` what the caller sent. A reason it does not know is a
    ``WriteRejected`` naming it."""
    _, why, *rest = reply.split(":", 2)
    detail = rest[0] if rest else ""
    errors: dict[str, Callable[[], StoreError]] = {
        "not_found": lambda: missing(subject),
        "exists": lambda: StreamExists(subject),
        "closed": lambda: StreamClosed(subject, int(detail) if detail else None),
        "session_not_found": lambda: SessionNotFound(detail or subject),
        "gone": lambda: StreamGone(subject),
        "config": lambda: ConfigConflict(detail),
        "invalid_fork": lambda: InvalidFork(detail),
        "ct_mismatch": lambda: ContentTypeMismatch(detail, asked.content_type),
        "stale_epoch": lambda: StaleEpoch(int(detail)),
        "seq_gap": lambda: SeqGap(int(detail), asked.producer_seq),
        "epoch_seq": EpochSeq,
        "seq_conflict": lambda: SeqConflict(detail, asked.stream_seq),
    }
    make = errors.get(why)
    return make() if make is not None else WriteRejected(why, detail or None)
