"""How identifiers are kept at rest: a blind-index token for lookups and uniqueness, the value
sealed for contact types (email, phone, whatsapp_id) and clear for the others.

The domain (resolution, profile) works on clear `(type, value)` pairs; only the store goes through
this. A sealed value is bound (AES-GCM associated data) to its type and token, so a blob copied onto
another identifier's row fails to open instead of answering the wrong person.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from services.identity.normalise import Ident
from shared.crypto import Vault

CONTACT_TYPES = frozenset({"email", "phone", "whatsapp_id"})
_BLOCK = 64  # SHA-256's block size: HMAC pads (or first hashes) the key to it
_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


class Sealer:
    """Identifier <-> stored columns with one Vault (keys from the environment)."""

    def __init__(self, vault: Vault) -> None:
        self.vault = vault
        self._tokens: dict[Ident, bytes] = {}
        # Vault.index's HMAC-SHA256 taken apart (RFC 2104): the inner and outer hashes with the
        # padded key already absorbed, copied per token. The same digest as hmac.new (the tests
        # pin it to Vault.index) at about half the cost of copying an hmac.HMAC object, whose
        # copy() builds Python objects around the two hashes (measured 0.75 against 1.3-1.6 us).
        key = vault.index_key
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def forget(self) -> None:
        """Drop the batch's token memo (clear values are not kept across batches)."""
        self._tokens.clear()

    @property
    def active_key_id(self) -> str:
        return self.vault.active_key_id

    def token(self, ident: Ident) -> bytes:
        token = self._tokens.get(ident)
        if token is None:
            inner = self._inner.copy()
            inner.update(f"{ident[0]}\x00{ident[1]}".encode())
            outer = self._outer.copy()
            outer.update(inner.digest())
            token = self._tokens[ident] = outer.digest()
        return token

    def tokens(self, idents: list[Ident]) -> list[bytes]:
        """The tokens of many identifiers (memoised for the batch, like `token`)."""
        memo, inner_keyed, outer_keyed = self._tokens, self._inner, self._outer
        out = []
        for ident in idents:
            token = memo.get(ident)
            if token is None:
                inner = inner_keyed.copy()
                inner.update(f"{ident[0]}\x00{ident[1]}".encode())
                outer = outer_keyed.copy()
                outer.update(inner.digest())
                token = memo[ident] = outer.digest()
            out.append(token)
        return out

    @staticmethod
    def context(kind: str, token: bytes) -> str:
        return f"identity/{kind}/{token.hex()}"

    def columns(self, ident: Ident, token: bytes | None = None) -> tuple[bytes, str | None, bytes | None]:
        """(token, clear value or None, sealed value or None) of the identifiers row."""
        kind, value = ident
        token = token if token is not None else self.token(ident)
        if kind in CONTACT_TYPES:
            return token, None, self.vault.seal(value, self.context(kind, token))
        return token, value, None

    def open(self, kind: str, token: bytes, value: str | None, sealed: bytes | None) -> str:
        if sealed is None:
            assert value is not None
            return value
        return self.vault.open(bytes(sealed), self.context(kind, bytes(token)))

    def reseal(self, kind: str, token: bytes, sealed: bytes) -> bytes:
        """The same value sealed under the active key."""
        return self.vault.seal(self.open(kind, token, None, sealed), self.context(kind, bytes(token)))

    # -- quarantine notes (customers.quarantined jsonb) --------------------------------------
    def seal_note(self, note: Mapping[str, Any]) -> dict[str, Any]:
        """A clear note {type, value, reason} as stored: contact values sealed (with the key id,
        so rekey can find old ones in SQL)."""
        kind = note["type"]
        if kind not in CONTACT_TYPES:
            return dict(note)
        token = self.token((kind, note["value"]))
        sealed = self.vault.seal(note["value"], self.context(kind, token))
        return {"type": kind, "reason": note["reason"], "token": token.hex(),
                "sealed": base64.b64encode(sealed).decode(), "kid": self.vault.key_id_of(sealed)}

    def open_note(self, stored: Mapping[str, Any]) -> dict[str, Any]:
        if "sealed" not in stored:
            return {"type": stored["type"], "value": stored["value"], "reason": stored["reason"]}
        kind = stored["type"]
        value = self.vault.open(base64.b64decode(stored["sealed"]),
                                self.context(kind, bytes.fromhex(stored["token"])))
        return {"type": kind, "value": value, "reason": stored["reason"]}

    def note_is_current(self, stored: Mapping[str, Any]) -> bool:
        """False for a clear contact value (legacy) or one sealed under an older key."""
        if stored.get("type") not in CONTACT_TYPES:
            return True
        return "sealed" in stored and stored.get("kid") == self.active_key_id
