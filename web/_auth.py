"""API keys: who is asking. Keys map to users; with no keys configured the server is
single-user and asks nobody."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from starlette.requests import Request

from ._errors import Unauthorized

MIN_KEY_LENGTH = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """A map from API key to user. Keys are held only as SHA-256 digests."""

    def __init__(self, users_by_key: Mapping[str, str]) -> None:
        self._users = {_digest(key): user for key, user in users_by_key.items()}

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (otherwise the server is single-user)."""
        return bool(self._users)

    @classmethod
    def parse(cls, pairs: Iterable[str], *, source: str) -> ApiKeys:
        """Keys from ``user=key`` entries (blank entries and ``#`` comments are skipped).

        Raises ``ValueError`` naming ``source`` and the entry for a malformed one.
        """
        users: dict[str, str] = {}
        for number, raw in enumerate(pairs, start=1):
            entry = raw.strip()
            if not entry or entry.startswith("#"):
                continue
            user, sep, key = entry.partition("=")
            user, key = user.strip(), key.strip()
            if not sep or not user or not key:
                raise ValueError(f"{source}, entry {number}: expected user=key")
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"{source}, entry {number}: a key must be at least {MIN_KEY_LENGTH} characters"
                )
            if key in users:
                raise ValueError(f"{source}, entry {number}: a key is listed twice")
            users[key] = user
        return cls(users)

    @classmethod
    def load(cls, *, inline: str | None, file: str | None) -> ApiKeys:
        """Keys from a comma-separated ``user=key`` list and/or a file of one per line."""
        users: dict[bytes, str] = {}
        if inline:
            users.update(cls.parse(inline.split(","), source="api keys setting")._users)
        if file:
            try:
                lines = Path(file).read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read the API keys file: {exc}") from None
            users.update(cls.parse(lines, source=file)._users)
        keys = cls({})
        keys._users = users
        return keys

    def user_for(self, authorization: str | None) -> str | None:
        """The user a request's ``Authorization`` header names; ``None`` when single-user.

        Raises ``Unauthorized`` when keys are configured and the header is missing or wrong.
        """
        if not self._users:
            return None
        if authorization is None:
            raise Unauthorized("this server needs an API key: send Authorization: Bearer <key>")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        user = self._users.get(_digest(key.strip()))
        if user is None:
            raise Unauthorized("unknown API key")
        return user


def current_user(request: Request) -> str | None:
    """The user making ``request`` (``None`` on a single-user server)."""
    keys: ApiKeys = request.app.state.api_keys
    return keys.user_for(request.headers.get("authorization"))
