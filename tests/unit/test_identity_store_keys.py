"""Identifier keys go to PostgreSQL as two scalars (types joined, tokens concatenated) that the
SQL splits back by position: anything that would not split back must be refused, not misread."""

from __future__ import annotations

import pytest

from services.identity.sealing import Sealer
from services.identity.store import TOKEN_LEN, key_params
from shared.crypto import Vault

SEALER = Sealer(Vault.from_env({}, embedded=True))


def test_keys_split_back_by_position() -> None:
    idents = [("email", "ann@example.com"), ("loyalty_id", "L-1"), ("phone", "+12125550100")]
    tokens = SEALER.tokens(idents)
    types, blob = key_params(idents, tokens)
    assert types.split(",") == [t for t, _ in idents]
    assert [blob[i * TOKEN_LEN:(i + 1) * TOKEN_LEN] for i in range(len(idents))] == tokens
    assert key_params([], []) == ("", b"")


def test_keys_that_would_not_split_back_are_refused() -> None:
    token = SEALER.token(("email", "ann@example.com"))
    with pytest.raises(ValueError):
        key_params([("e,mail", "ann@example.com")], [token])
    with pytest.raises(ValueError):
        key_params([("email", "ann@example.com")], [token[:-1]])
