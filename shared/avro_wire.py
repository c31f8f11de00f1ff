"""Reading Avro's binary primitives straight from bytes, for services' lean decoders of hot topics.

A service that needs a handful of fields of a large record (loyalty of a resolved event, identity of
an ingest event) reads them here instead of decoding the whole record; anything unexpected raises
IndexError/ValueError and the caller falls back to the full codec.
"""

from __future__ import annotations


def read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """A zig-zag varint at `pos`: (value, position after it)."""
    b = buf[pos]
    pos += 1
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


def read_string(buf: bytes, pos: int) -> tuple[str, int]:
    """A length-prefixed UTF-8 string at `pos`: (value, position after it)."""
    n, pos = read_long(buf, pos)
    end = pos + n
    if n < 0 or end > len(buf):
        raise IndexError("string past the end")
    return buf[pos:end].decode(), end
