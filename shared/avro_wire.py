"""Avro's binary primitives read and written straight from bytes, for services' lean codecs of hot
topics.

A service that needs a handful of fields of a large record (loyalty of a resolved event, identity of
an ingest event) reads them here instead of decoding the whole record; anything unexpected raises
IndexError/ValueError and the caller falls back to the full codec.

`read` and `write` run a *program*: one byte per field, saying how to read, skip or write it. The
whole record is then one call into compiled code, with C integers and no tuple per field: the
hand-written readers this replaced, compiled without types, cost loyalty's worker ~6 µs a record
(3x this). The Cython declarations (pure Python mode) are no-ops as source (shared/nocython.py).
"""

from __future__ import annotations

import datetime as dt

try:
    import cython
except ImportError:  # running as source without Cython: its declarations mean nothing
    from shared import nocython as cython
if not cython.compiled:  # as source, the no-ops (Cython's own Shadow module casts by constructing)
    from shared import nocython as cython

# -- the operations of a program ---------------------------------------------------------------
STRING = b"s"                 # a string (or bytes, decoded as UTF-8): read
LONG = b"l"                   # an int or long: read
OPTIONAL_STRING = b"o"        # ["null", "string"]: read, None or the string
SKIP_STRING = b"S"            # a string or bytes: skipped
SKIP_LONG = b"L"              # an int, long or enum: skipped
SKIP_OPTIONAL_STRING = b"O"   # ["null", "string"]: skipped
SKIP_OPTIONAL_LONG = b"P"     # ["null", "long"]: skipped
# written only
TIMESTAMP_MILLIS = b"t"           # an aware datetime as timestamp-millis
OPTIONAL_TIMESTAMP_MILLIS = b"T"  # ["null", timestamp-millis]

_SKIPS = frozenset(SKIP_STRING + SKIP_LONG + SKIP_OPTIONAL_STRING + SKIP_OPTIONAL_LONG + b"[]")
_READS = frozenset(STRING + LONG + OPTIONAL_STRING)
_WRITES = frozenset(STRING + LONG + OPTIONAL_STRING + TIMESTAMP_MILLIS + OPTIONAL_TIMESTAMP_MILLIS)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# The same, as C constants compiled (and plain ints as source, where ord() would be a call each).
_OP_STRING = cython.declare(cython.uchar, ord(STRING))
_OP_LONG = cython.declare(cython.uchar, ord(LONG))
_OP_OPTIONAL_STRING = cython.declare(cython.uchar, ord(OPTIONAL_STRING))
_OP_SKIP_STRING = cython.declare(cython.uchar, ord(SKIP_STRING))
_OP_SKIP_LONG = cython.declare(cython.uchar, ord(SKIP_LONG))
_OP_SKIP_OPTIONAL_STRING = cython.declare(cython.uchar, ord(SKIP_OPTIONAL_STRING))
_OP_SKIP_OPTIONAL_LONG = cython.declare(cython.uchar, ord(SKIP_OPTIONAL_LONG))
_OP_TIMESTAMP_MILLIS = cython.declare(cython.uchar, ord(TIMESTAMP_MILLIS))
_OPEN = cython.declare(cython.uchar, ord("["))
_CLOSE = cython.declare(cython.uchar, ord("]"))


def array(*items: bytes) -> bytes:
    """An array skipped over, each item made of the skip operations `items`."""
    body = b"".join(items)
    if not body or not set(body) <= _SKIPS:
        raise ValueError("an array's items are skipped: only skip operations")
    return b"[" + body + b"]"


def program(*ops: bytes) -> bytes:
    """A read program: the operations in order (arrays from array())."""
    prog = b"".join(ops)
    depth = 0
    for op in prog:
        depth += (op == _OPEN) - (op == _CLOSE)
        if depth < 0 or not (op in _SKIPS or op in _READS):
            raise ValueError(f"not a read program: {prog!r}")
    if depth:
        raise ValueError(f"unbalanced array in {prog!r}")
    return prog


def write_program(*ops: bytes) -> bytes:
    """A write program: one operation per value written."""
    prog = b"".join(ops)
    if not set(prog) <= _WRITES:
        raise ValueError(f"not a write program: {prog!r}")
    return prog


# -- reading -----------------------------------------------------------------------------------

@cython.cclass
class _Cursor:
    buf = cython.declare(bytes)
    pos = cython.declare(cython.Py_ssize_t)
    end = cython.declare(cython.Py_ssize_t)

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf)

    @cython.cfunc
    @cython.returns(cython.longlong)
    @cython.locals(b=cython.uchar, n=cython.ulonglong, shift=cython.Py_ssize_t, p=cython.Py_ssize_t)
    def long(self):
        p = self.pos
        if p < 0 or p >= self.end:
            raise IndexError("a long past the end")
        b = self.buf[p]
        p += 1
        if b < 0x80:
            self.pos = p
            return (b >> 1) ^ -(b & 1)
        n = b & 0x7F
        shift = 7
        while b & 0x80:
            if p >= self.end or shift > 63:
                raise IndexError("a long past the end or longer than 64 bits")
            b = self.buf[p]
            p += 1
            n |= cython.cast(cython.ulonglong, b & 0x7F) << shift
            shift += 7
        self.pos = p
        return cython.cast(cython.longlong, n >> 1) ^ -cython.cast(cython.longlong, n & 1)

    @cython.cfunc
    @cython.returns(cython.Py_ssize_t)
    @cython.locals(n=cython.longlong, start=cython.Py_ssize_t, b=cython.uchar)
    def skip_bytes(self):
        """Past a length-prefixed string; returns where it started."""
        start = self.pos
        if start < self.end and self.buf[start] < 0x80:  # a length below 64: one byte
            b = self.buf[start]
            if b & 1:
                raise IndexError("a negative length")
            start += 1
            n = b >> 1
        else:
            n = self.long()
            start = self.pos
        if n < 0 or n > self.end - start:
            raise IndexError("a string past the end")
        self.pos = start + n
        return start

    @cython.cfunc
    @cython.locals(start=cython.Py_ssize_t)
    def text(self):
        start = self.skip_bytes()
        return self.buf[start:self.pos].decode("utf-8")

    @cython.cfunc
    @cython.returns(cython.longlong)
    def branch(self):
        """The union branch of ["null", T]: 0 or 1."""
        b = self.long()
        if b != 0 and b != 1:
            raise IndexError("not a branch of [null, T]")
        return b


@cython.cfunc
@cython.returns(cython.Py_ssize_t)
@cython.locals(prog=bytes, i=cython.Py_ssize_t, depth=cython.Py_ssize_t, op=cython.uchar)
def _close_of(prog, i):
    """Where the array opened at `i` closes."""
    depth = 0
    while True:
        op = prog[i]
        if op == _OPEN:
            depth += 1
        elif op == _CLOSE:
            depth -= 1
            if depth == 0:
                return i
        i += 1


@cython.cfunc
@cython.returns(cython.Py_ssize_t)
@cython.locals(c=_Cursor, prog=bytes, i=cython.Py_ssize_t, stop=cython.Py_ssize_t, out=list,
               op=cython.uchar, close=cython.Py_ssize_t, count=cython.longlong, _k=cython.longlong)
def _run(c, prog, i, stop, out):
    while i < stop:
        op = prog[i]
        if op == _OP_STRING:
            out.append(c.text())
        elif op == _OP_LONG:
            out.append(c.long())
        elif op == _OP_OPTIONAL_STRING:
            out.append(c.text() if c.branch() else None)
        elif op == _OP_SKIP_STRING:
            c.skip_bytes()
        elif op == _OP_SKIP_LONG:
            c.long()
        elif op == _OP_SKIP_OPTIONAL_STRING:
            if c.branch():
                c.skip_bytes()
        elif op == _OP_SKIP_OPTIONAL_LONG:
            if c.branch():
                c.long()
        elif op == _OPEN:
            close = _close_of(prog, i)
            while True:
                count = c.long()
                if count == 0:
                    break
                if count < 0:  # a block that says its size in bytes: jumped over
                    count = c.long()
                    if count < 0 or count > c.end - c.pos:
                        raise IndexError("an array block past the end")
                    c.pos += count
                    continue
                for _k in range(count):
                    _run(c, prog, i + 1, close, out)
            i = close
        else:
            raise ValueError(f"no operation {op!r}")
        i += 1
    return i


@cython.locals(c=_Cursor)
def read(buf: bytes, pos: int, prog: bytes) -> list:
    """Run `prog` (from program()) on `buf` at `pos`: the values it reads, then the position after
    them. IndexError when the bytes end early or say something impossible; UnicodeDecodeError for a
    string that is not UTF-8."""
    if type(buf) is not bytes:
        buf = bytes(buf)
    c = _Cursor(buf, pos)
    out: list = []
    _run(c, prog, 0, len(prog), out)
    out.append(c.pos)
    return out


# -- writing -----------------------------------------------------------------------------------

@cython.cfunc
@cython.returns(cython.void)
@cython.locals(out=bytearray, n=cython.longlong, z=cython.ulonglong)
def _put_long(out, n):
    z = (cython.cast(cython.ulonglong, n) << 1) ^ cython.cast(cython.ulonglong, n >> 63)  # zig-zag
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)


@cython.cfunc
@cython.returns(cython.void)
@cython.locals(out=bytearray, data=bytes)
def _put_text(out, s):
    data = s.encode("utf-8")
    _put_long(out, len(data))
    out += data


@cython.cfunc
@cython.returns(cython.longlong)
def _millis(at):
    d = at - _EPOCH
    return d.days * 86_400_000 + d.seconds * 1000 + d.microseconds // 1000  # floor, as // would


@cython.locals(prog=bytes, values=tuple, out=bytearray, i=cython.Py_ssize_t, op=cython.uchar)
def write(header: bytes, prog: bytes, values: tuple) -> bytes:
    """`header` then `values` written as `prog` (from write_program()) says, one op per value."""
    if len(values) != len(prog):
        raise ValueError(f"{len(values)} values for a program of {len(prog)}")
    out = bytearray(header)
    for i in range(len(prog)):
        op = prog[i]
        v = values[i]
        if op == _OP_STRING:
            _put_text(out, v)
        elif op == _OP_LONG:
            _put_long(out, v)
        elif op == _OP_TIMESTAMP_MILLIS:
            _put_long(out, _millis(v))
        elif v is None:  # the optional ones
            out.append(0)
        else:
            out.append(2)
            if op == _OP_OPTIONAL_STRING:
                _put_text(out, v)
            else:
                _put_long(out, _millis(v))
    return bytes(out)
