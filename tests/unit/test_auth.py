"""API keys: 401 for a missing or wrong key, 403 for a key without the scope."""

from __future__ import annotations

import pytest

from shared.auth import AuthError, KeyRing
from shared.config import parse_api_keys

RING = KeyRing(parse_api_keys("pos:pos-secret:ingest,bi:bi-secret:read|read_pii,ops:ops-secret:admin|read"))


def test_the_right_key_is_identified():
    assert RING.authorize("Bearer pos-secret", "ingest").name == "pos"
    assert RING.authorize("bearer bi-secret", "read_pii").name == "bi"


@pytest.mark.parametrize("header", [None, "", "pos-secret", "Basic pos-secret", "Bearer ", "Bearer wrong",
                                    "Bearer pos-secre", "Bearer pos-secretx"])
def test_missing_or_wrong_key_is_401(header):
    with pytest.raises(AuthError) as err:
        RING.authorize(header, "ingest")
    assert err.value.status == 401


def test_key_without_scope_is_403_and_names_the_scope_not_the_secret():
    with pytest.raises(AuthError) as err:
        RING.authorize("Bearer pos-secret", "admin")
    assert err.value.status == 403
    assert "admin" in str(err.value) and "pos-secret" not in str(err.value)
