"""Deterministic ids (DESIGN: "deterministic ids for everything derived"), made fast.

`uuid5(namespace_bytes, name)` is `str(uuid.uuid5(namespace, name))` without building UUID
objects: the hash, the version and variant bits, the text. Services derive an id per event, per
ledger entry, per trigger and per outcome, where uuid.UUID's constructor was a noticeable share of
the work.
"""

from __future__ import annotations

import hashlib


def uuid5(namespace: bytes, name: str) -> str:
    """str(uuid.uuid5(UUID(bytes=namespace), name))."""
    digest = bytearray(hashlib.sha1(namespace + name.encode(), usedforsecurity=False).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
