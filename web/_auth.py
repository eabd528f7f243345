"""API keys: who is asking. Keys map to users; with no keys configured the server is
single-user and asks nobody."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from starlette.requests import Request

from ._errors import Unauthorized
from ._schemas import EventsUrl
from ._signing import TOKEN_PARAM, UrlSigner

MIN_KEY_LENGTH = 16


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """A map from API key to user. Keys are held only as SHA-256 digests."""

    def __init__(self, users_by_key: Mapping[str, str]) -> None:
        self._users = {_digest(key): user for key, user in users_by_key.items()}

    def digests(self) -> list[bytes]:
        """The keys' SHA-256 digests (what a URL-signing key can be derived from)."""
        return list(self._users)

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
        sources: list[ApiKeys] = []
        if inline:
            sources.append(cls.parse(inline.split(","), source="api keys setting"))
        if file:
            try:
                lines = Path(file).read_text().splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read the API keys file: {exc}") from None
            sources.append(cls.parse(lines, source=file))
        keys = cls({})
        for source in sources:
            if keys._users.keys() & source._users.keys():
                raise ValueError("a key is listed both in the api keys setting and in the file")
            keys._users.update(source._users)
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


# A host application's own authentication: the owner a request acts for (a non-empty
# string), or an exception (an HTTPException 401, say) to refuse it.
Authenticate = Callable[[Request], "str | Awaitable[str]"]


class Access:
    """Who is asking: by API key (the default; with no keys the server is single-user), or
    by a host application's ``authenticate`` callable; and the signer of event URLs."""

    def __init__(
        self, keys: ApiKeys, signer: UrlSigner, *, authenticate: Authenticate | None = None
    ) -> None:
        self.keys = keys
        self.signer = signer
        self.authenticate = authenticate

    @property
    def enabled(self) -> bool:
        """Whether requests are authenticated (resources then have owners)."""
        return self.authenticate is not None or self.keys.enabled

    async def user(self, request: Request) -> str | None:
        """The owner ``request`` acts for; ``None`` only on a single-user server."""
        if self.authenticate is None:
            return self.keys.user_for(request.headers.get("authorization"))
        owner = self.authenticate(request)
        if inspect.isawaitable(owner):
            owner = await owner
        if not isinstance(owner, str) or not owner:
            # None would mean "everyone's" to the engine: a host must name an owner.
            raise Unauthorized("the request was not authenticated")
        return owner


def access_of(request: Request) -> Access:
    """The app's ``Access``."""
    access: Access = request.app.state.access
    return access


async def current_user(request: Request) -> str | None:
    """The user making ``request`` (``None`` on a single-user server)."""
    return await access_of(request).user(request)


def event_token(request: Request) -> str | None:
    """The signed-URL token of an events request, when the server authenticates, one is
    given and no ``Authorization`` header is (a valid key wins over a stale token).
    Without authentication every request is the single user's: a token changes nothing."""
    if not access_of(request).enabled or "authorization" in request.headers:
        return None
    return request.query_params.get(TOKEN_PARAM)


def check_event_token(request: Request, token: str, *, resource: str, owner: str | None) -> None:
    """Raise ``Unauthorized`` unless ``token`` opens ``resource``'s events for ``owner``."""
    access_of(request).signer.verify(token, resource=resource, owner=owner)


def events_url(request: Request, path: str, *, resource: str, owner: str | None) -> EventsUrl:
    """A URL for ``path`` (an events endpoint of ``resource``) that needs no header."""
    access = access_of(request)
    if not access.enabled:
        return EventsUrl(url=path, expires_at=None)
    signed = access.signer.sign(path, resource=resource, owner=owner)
    return EventsUrl(url=signed.url, expires_at=signed.expires_at)
