"""API-key authentication with scopes, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from shared.config import ApiKey


class AuthError(Exception):
    """Missing or wrong key (401) or a key without the scope (403)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class KeyRing:
    """The configured keys; answers which key a bearer secret belongs to."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = tuple(keys)

    def identify(self, authorization: str | None) -> ApiKey:
        """The key named by an `Authorization: Bearer <secret>` header, else AuthError(401)."""
        if not authorization:
            raise AuthError(401, "unauthorized", "missing Authorization: Bearer <key>")
        scheme, _, secret = authorization.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise AuthError(401, "unauthorized", "Authorization must be 'Bearer <key>'")
        candidate = secret.strip().encode()
        found: ApiKey | None = None
        # Compare against every key so timing does not reveal which prefix matched.
        for key in self._keys:
            if hmac.compare_digest(candidate, key.secret.encode()):
                found = key
        if found is None:
            raise AuthError(401, "unauthorized", "unknown API key")
        return found

    def authorize(self, authorization: str | None, scope: str) -> ApiKey:
        """The key, if it holds `scope`; AuthError(401/403) otherwise."""
        key = self.identify(authorization)
        if scope not in key.scopes:
            raise AuthError(403, "forbidden", f"API key {key.name!r} lacks the {scope!r} scope")
        return key
