"""The fast uuid5 is uuid.uuid5, character for character."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from shared.ids import uuid5


@given(st.binary(min_size=16, max_size=16), st.text())
def test_uuid5_equals_the_standard_library(namespace, name):
    assert uuid5(namespace, name) == str(uuid.uuid5(uuid.UUID(bytes=namespace), name))
