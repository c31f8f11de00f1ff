"""Contact data at rest: sealed with the active key, opened with any configured key, tamper-evident."""

from __future__ import annotations

import base64
import os

import pytest

from shared.crypto import DecryptionError, Vault
from shared.errors import ConfigError


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def test_seal_open_round_trip_and_rotation() -> None:
    old_key, new_key, index = key(), key(), key()
    old = Vault.from_env({"OMNICRM_DATA_KEYS": f"k1:{old_key}", "OMNICRM_INDEX_KEY": index}, embedded=False)
    sealed = old.seal("ada@example.com", "identity.identifier")
    assert b"ada@example.com" not in sealed
    rotated = Vault.from_env({"OMNICRM_DATA_KEYS": f"k2:{new_key},k1:{old_key}", "OMNICRM_INDEX_KEY": index},
                             embedded=False)
    assert rotated.open(sealed, "identity.identifier") == "ada@example.com"
    assert rotated.key_id_of(rotated.seal("x", "c")) == "k2"
    # the blind index does not change with data-key rotation
    assert old.index("email", "ada@example.com") == rotated.index("email", "ada@example.com")
    dropped = Vault.from_env({"OMNICRM_DATA_KEYS": f"k2:{new_key}", "OMNICRM_INDEX_KEY": index}, embedded=False)
    with pytest.raises(DecryptionError) as err:
        dropped.open(sealed, "identity.identifier")
    assert "ada" not in str(err.value)


def test_tampering_and_wrong_context_are_detected() -> None:
    vault = Vault.from_env({}, embedded=True)
    sealed = bytearray(vault.seal("+12125550142", "notifications.contact"))
    with pytest.raises(DecryptionError):
        vault.open(bytes(sealed), "identity.identifier")
    sealed[-1] ^= 1
    with pytest.raises(DecryptionError):
        vault.open(bytes(sealed), "notifications.contact")


def test_keys_are_required_outside_embedded_mode_and_validated() -> None:
    with pytest.raises(ConfigError) as err:
        Vault.from_env({}, embedded=False)
    assert err.value.variable == "OMNICRM_DATA_KEYS"
    with pytest.raises(ConfigError):
        Vault.from_env({"OMNICRM_DATA_KEYS": "k1:c2hvcnQ=", "OMNICRM_INDEX_KEY": key()}, embedded=False)
