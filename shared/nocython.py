"""Cython's pure-Python-mode declarations as no-ops, for a typed hot module run as source where
Cython is not installed (the Docker image): `try: import cython / except ImportError: from
shared import nocython as cython`. Compiled, the real declarations apply; as source they mean
nothing, and the code is plain Python. (Cython's own Shadow module does the same where it is
installed.)"""

from __future__ import annotations

from typing import Any

# C types named in declarations: as source, only names.
Py_ssize_t = int
uchar = int
longlong = int
ulonglong = int
void = None
bint = bool


def _identity(f: Any) -> Any:
    return f


cclass = cfunc = ccall = inline = final = _identity


def locals(**_types: Any) -> Any:  # noqa: A001 - Cython's name
    return _identity


def returns(_type: Any) -> Any:
    return _identity


def exceptval(_value: Any = None, **_kw: Any) -> Any:
    return _identity


def declare(_type: Any = None, value: Any = None, **_kw: Any) -> Any:
    return value


def cast(_type: Any, value: Any, **_kw: Any) -> Any:
    return value


compiled = False
