"""How identifiers are stored: contact values sealed and bound to their blind index, other ids clear."""

from __future__ import annotations

import pytest

from services.identity.sealing import Sealer
from shared.crypto import DecryptionError, Vault

SEALER = Sealer(Vault.from_env({}, embedded=True))


def test_contact_values_are_sealed_and_other_ids_stay_clear() -> None:
    token, value, sealed = SEALER.columns(("email", "ann@example.com"))
    assert value is None and sealed is not None and b"ann" not in sealed
    assert token == SEALER.token(("email", "ann@example.com")) != SEALER.token(("phone", "ann@example.com"))
    assert SEALER.open("email", token, value, sealed) == "ann@example.com"
    assert SEALER.columns(("loyalty_id", "L-1"))[1:] == ("L-1", None)


def test_a_sealed_value_moved_to_another_identifiers_row_does_not_open() -> None:
    _, _, sealed = SEALER.columns(("phone", "+12125550100"))
    other = SEALER.token(("phone", "+12125550199"))
    with pytest.raises(DecryptionError) as err:
        SEALER.open("phone", other, None, sealed)
    assert "555" not in str(err.value)


def test_quarantine_notes_round_trip_and_know_their_key() -> None:
    note = {"type": "phone", "value": "+12125550999", "reason": "shared_identifier"}
    stored = SEALER.seal_note(note)
    assert "value" not in stored and "2125550999" not in repr(stored)
    assert SEALER.note_is_current(stored) and not SEALER.note_is_current(note)
    assert SEALER.open_note(stored) == note
    plain = {"type": "loyalty_id", "value": "L-1", "reason": "type_limit"}
    assert SEALER.seal_note(plain) == plain and SEALER.note_is_current(plain)


def test_blind_index_tokens_are_the_vaults_index() -> None:
    """The Sealer computes tokens with a pre-keyed HMAC; they must stay Vault.index exactly."""
    vault = Vault.from_env({"OMNICRM_INDEX_KEY": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}, embedded=True)
    sealer = Sealer(vault)
    idents = [("email", "ann@example.com"), ("phone", "+12125550100"), ("loyalty_id", "Ĺ-ü-1"), ("email", "")]
    assert [sealer.token(i) for i in idents] == [vault.index(*i) for i in idents]
    sealer.forget()
    assert sealer.tokens(idents) == [vault.index(*i) for i in idents]
    assert Sealer(Vault.from_env({}, embedded=True)).token(idents[0]) != sealer.token(idents[0])


@pytest.mark.parametrize("size", [16, 63, 64, 65, 200])
def test_blind_index_tokens_match_for_any_key_length(size: int) -> None:
    """HMAC pads a short key and hashes one longer than SHA-256's 64-byte block first."""
    vault = Vault(keys=(("k", bytes(32)),), index_key=bytes(range(size)))
    idents = [("email", "ann@example.com"), ("anonymous_id", "x" * 300)]
    assert Sealer(vault).tokens(idents) == [vault.index(*i) for i in idents]
