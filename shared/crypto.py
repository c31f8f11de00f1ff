"""Contact data encrypted at rest: AES-256-GCM with rotating data keys, plus a keyed blind index so
a service can look an email or phone up without storing it in clear.

Keys come from the environment (or a file it names), never from code:
  OMNICRM_DATA_KEYS  = "k2:<base64 32 bytes>,k1:<base64 32 bytes>"  first = encrypts; all = decrypt
  OMNICRM_INDEX_KEY  = "<base64 32 bytes>"                           HMAC key of the blind index
Rotation: put the new key first, restart the services (new writes use it, old rows still open),
then run `omnicrm rekey` to re-encrypt old rows and drop the old key afterwards. The index key is
not rotated in place: changing it means re-indexing every row (`omnicrm rekey --reindex`).
In embedded mode (demo, tests) fixed development keys are used when none are set.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from shared.errors import ConfigError, OmnicrmError

_MAGIC = b"\x01"
# Development keys for the embedded default only (derived, not secret; never used outside embedded mode).
_DEV_DATA_KEY = hashlib.sha256(b"omnicrm-embedded-development-data-key").digest()
_DEV_INDEX_KEY = hashlib.sha256(b"omnicrm-embedded-development-index-key").digest()


class DecryptionError(OmnicrmError):
    """A sealed value cannot be opened: unknown key id or tampered bytes (no plaintext in the message)."""


def _key(raw: str, variable: str) -> bytes:
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        raise ConfigError(variable, "keys must be base64") from None
    if len(key) != 32:
        raise ConfigError(variable, f"keys must be 32 bytes (AES-256), got {len(key)}")
    return key


@dataclass(frozen=True)
class Vault:
    """Seals and opens contact values; builds blind-index tokens for lookups."""

    keys: tuple[tuple[str, bytes], ...] = field(repr=False)
    index_key: bytes = field(repr=False)
    # One AES-GCM context per key, built once: building it costs more than sealing a short value.
    _aead: dict[str, AESGCM] = field(init=False, repr=False, compare=False)
    _header: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_aead", {kid: AESGCM(key) for kid, key in self.keys})
        kid = self.keys[0][0].encode()
        object.__setattr__(self, "_header", _MAGIC + bytes([len(kid)]) + kid)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, embedded: bool = True) -> Vault:
        env = os.environ if env is None else env
        raw = _read(env, "OMNICRM_DATA_KEYS")
        index = _read(env, "OMNICRM_INDEX_KEY")
        if not raw or not index:
            if not embedded:
                raise ConfigError("OMNICRM_DATA_KEYS" if not raw else "OMNICRM_INDEX_KEY",
                                  "required outside embedded mode (contact data is encrypted at rest)")
        keys: list[tuple[str, bytes]] = []
        for part in (raw or "").split(","):
            if not part.strip():
                continue
            kid, sep, b64 = part.strip().partition(":")
            if not sep or not kid or len(kid) > 32:
                raise ConfigError("OMNICRM_DATA_KEYS", "each entry is <key id>:<base64 key>")
            keys.append((kid, _key(b64, "OMNICRM_DATA_KEYS")))
        if not keys:
            keys = [("dev", _DEV_DATA_KEY)]
        return cls(tuple(keys), _key(index, "OMNICRM_INDEX_KEY") if index else _DEV_INDEX_KEY)

    @property
    def active_key_id(self) -> str:
        return self.keys[0][0]

    def seal(self, plaintext: str, context: str) -> bytes:
        """`01 | len(kid) | kid | nonce(12) | ciphertext+tag`; `context` is bound as associated data."""
        nonce = os.urandom(12)
        body = self._aead[self.keys[0][0]].encrypt(nonce, plaintext.encode(), context.encode())
        return self._header + nonce + body

    def open(self, sealed: bytes, context: str) -> str:
        if not sealed or sealed[:1] != _MAGIC:
            raise DecryptionError("not a sealed value")
        n = sealed[1]
        kid = sealed[2:2 + n].decode()
        nonce, body = sealed[2 + n:14 + n], sealed[14 + n:]
        aead = self._aead.get(kid)
        if aead is None:
            raise DecryptionError(f"sealed with key {kid!r}, which is not in OMNICRM_DATA_KEYS")
        try:
            return aead.decrypt(nonce, body, context.encode()).decode()
        except InvalidTag:
            raise DecryptionError("sealed value failed authentication") from None

    def key_id_of(self, sealed: bytes) -> str:
        return sealed[2:2 + sealed[1]].decode()

    def index(self, kind: str, value: str) -> bytes:
        """A deterministic token for equality lookups; reveals nothing without the index key."""
        return hmac.new(self.index_key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()


def _read(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    path = env.get(f"{name}_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE", f"cannot read {path}: {exc.strerror}") from None
    return value.strip() if value else None
