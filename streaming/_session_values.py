"""What the session rules work with: limits, what a post did, ids, JSON Merge Patch, the
idempotency record and the per-session lock."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import anyio

from store import GenerationRecord, KeptResponse, SessionRecord


@dataclass(frozen=True)
class SessionLimits:
    """Bounds on what one user and one session may hold (defaults from common practice),
    and how long sessions live: closed after ``idle_timeout`` seconds without activity
    (unless ``keep_open``), deleted ``retention`` seconds after closing when ``auto_clean``."""

    active_sessions_per_user: int = 10
    messages_per_session: int = 1000
    context_bytes: int = 1_000_000
    message_chars: int = 100_000
    history_chars: int = 32_000
    idle_timeout: float = 1800.0
    retention: float = 30 * 24 * 3600.0
    auto_clean: bool = False


@dataclass(frozen=True)
class PostedMessage:
    """What posting a message did: where it went and which generation (if any) answers it.
    ``replayed``: an earlier request with the same idempotency key did this."""

    session: SessionRecord
    message_id: str
    generation: GenerationRecord | None
    reopened: bool = False
    replayed: bool = False


@dataclass(frozen=True)
class Idempotency:
    """Who asked with which ``Idempotency-Key``, and for which session."""

    owner: str | None
    key: str
    requested_session_id: str

    def kept(self, session_id: str, message_id: str, generation_id: str | None) -> KeptResponse:
        """What to keep for the key: where the request's message and answer went."""
        return KeptResponse(
            self.owner,
            self.key,
            {
                "requested_session_id": self.requested_session_id,
                "session_id": session_id,
                "message_id": message_id,
                "generation_id": generation_id,
            },
        )


def new_session_id() -> str:
    """A random, unguessable session id."""
    return "ses_" + secrets.token_urlsafe(16)


def new_message_id() -> str:
    """A random message id."""
    return "msg_" + secrets.token_urlsafe(12)


def answer_message_id(generation_id: str) -> str:
    """The id of the assistant message a generation answers with: derived from the
    generation's, so a view of the generation names the message without a lookup."""
    return f"msg_{generation_id}"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON Merge Patch: ``patch`` applied to ``target`` (neither is modified)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class SessionLock:
    """One lock per session id, created on first use and dropped when nobody holds it."""

    def __init__(self, locks: dict[str, tuple[anyio.Lock, int]], session_id: str) -> None:
        self._locks = locks
        self._id = session_id

    async def __aenter__(self) -> None:
        lock, users = self._locks.get(self._id, (anyio.Lock(), 0))
        self._locks[self._id] = (lock, users + 1)
        try:
            await lock.acquire()
        except BaseException:
            self._release_user()
            raise

    async def __aexit__(self, *exc: object) -> None:
        lock, _ = self._locks[self._id]
        lock.release()
        self._release_user()

    def _release_user(self) -> None:
        lock, users = self._locks[self._id]
        if users <= 1:
            del self._locks[self._id]
        else:
            self._locks[self._id] = (lock, users - 1)
