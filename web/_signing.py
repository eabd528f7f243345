"""Signed event URLs: how a browser's ``EventSource``, which cannot send headers, reads an
answer on a server with API keys.

A token is ``<expiry>.<signature>``: an HMAC-SHA256 over the resource (``generation:<id>`` or
``session:<id>``), its owner and the expiry. The owner is not in the URL; the server looks the
resource's owner up and checks the signature against it, so a token is good for one
resource's events, only while that resource belongs to the user it was issued to, and only
until it expires. It authorises nothing else: no snapshot, no cancel, no other resource.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import Unauthorized

TOKEN_PARAM = "token"
# A token's expiry is whole seconds; a signature is the first 24 bytes of the HMAC (192 bits).
SIGNATURE_BYTES = 24
MAX_TOKEN_CHARS = 64


@dataclass(frozen=True)
class SignedUrl:
    """A URL with its token, and when the token stops opening it (Unix seconds)."""

    url: str
    expires_at: int


class UrlSigner:
    """Issues and checks event-URL tokens with one secret key."""

    def __init__(self, key: bytes, *, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self.ttl = ttl
        self._clock = clock

    def _signature(self, resource: str, owner: str | None, expires_at: int) -> str:
        message = f"{resource}\n{owner or ''}\n{expires_at}".encode()
        digest = hmac.new(self._key, message, hashlib.sha256).digest()[:SIGNATURE_BYTES]
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def sign(self, path: str, *, resource: str, owner: str | None) -> SignedUrl:
        """``path`` with a token for ``resource`` of ``owner`` that expires in ``ttl``."""
        expires_at = int(self._clock() + self.ttl)
        token = f"{expires_at}.{self._signature(resource, owner, expires_at)}"
        return SignedUrl(f"{path}?{TOKEN_PARAM}={token}", expires_at)

    def verify(self, token: str, *, resource: str, owner: str | None) -> None:
        """Raise ``Unauthorized`` unless ``token`` was issued for ``resource`` of ``owner``
        and has not expired."""
        expiry, sep, signature = token.partition(".")
        if len(token) > MAX_TOKEN_CHARS or not sep or not expiry.isascii() or not expiry.isdigit():
            raise Unauthorized("the signed URL's token is malformed")
        expected = self._signature(resource, owner, int(expiry))
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            raise Unauthorized("the signed URL's token is not valid for this resource")
        if int(expiry) < self._clock():
            raise Unauthorized("the signed URL has expired; ask for a new one")


def signing_key(configured: str | None, key_digests: list[bytes]) -> bytes:
    """The key that signs URLs: the configured secret, else one derived from the API keys,
    else (no keys: a host authenticates) a random one, good until the process ends.

    Derived from the keys, every process of a deployment with the same keys file agrees on
    it and tokens survive restarts; changing the keys invalidates the tokens, as it should.
    """
    if configured:
        return hashlib.sha256(b"keepstream url signing\n" + configured.encode()).digest()
    if not key_digests:  # a host's own authentication: a key of this process only
        return secrets.token_bytes(32)
    material = b"".join(sorted(key_digests))
    return hashlib.sha256(b"keepstream url signing from keys\n" + material).digest()
