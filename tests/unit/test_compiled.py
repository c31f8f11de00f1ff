"""The compiled hot modules: used while they match their source, never stale, source when not built."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shared import compiled
from shared.compiled import HOT, PURE_ENV, CompiledFinder, build, read_manifest


@pytest.fixture
def package(tmp_path: Path):
    """A throwaway package `pkg_<hex>` with a module `hot`, importable from tmp_path."""
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / name / "hot.py").write_text("VALUE = 1\n\ndef double(x):\n    return 2 * x\n")
    sys.path.insert(0, str(tmp_path))
    finders: list[CompiledFinder] = []
    yield name, finders
    sys.path.remove(str(tmp_path))
    for f in finders:
        sys.meta_path.remove(f)
    for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[m]


def _import_fresh(module: str, root: Path, out: Path, finders: list[CompiledFinder]):
    for f in finders:
        sys.meta_path.remove(f)
    finders.clear()
    finder = CompiledFinder(read_manifest(out), root, out)
    sys.meta_path.insert(0, finder)
    finders.append(finder)
    sys.modules.pop(module, None)
    return importlib.import_module(module)


def test_a_compiled_module_runs_while_its_source_is_unchanged_and_never_stale(package, tmp_path):
    name, finders = package
    module, out = f"{name}.hot", tmp_path / "out"
    built = build([module], root=tmp_path, out=out)
    assert module in built

    hot = _import_fresh(module, tmp_path, out, finders)
    assert hot.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert (hot.VALUE, hot.double(21)) == (1, 42)

    # Edited and not rebuilt: the source runs, not the extension built from the old source.
    (tmp_path / name / "hot.py").write_text("VALUE = 2\n\ndef double(x):\n    return 2 * x\n")
    hot = _import_fresh(module, tmp_path, out, finders)
    assert hot.__file__.endswith(".py") and hot.VALUE == 2

    # The next build compiles the new source. (Read in a new process: one that has loaded an
    # extension keeps that library's code for its life.)
    assert build([module], root=tmp_path, out=out)[module]["sha256"] == compiled.digest(
        tmp_path / name / "hot.py")
    probe = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); from pathlib import Path; "
             "from shared.compiled import install; "
             f"install(Path({str(tmp_path)!r}), Path({str(out)!r})); import {module} as m; "
             "print(m.__file__, m.VALUE)")
    where, value = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                  text=True, env={**os.environ, PURE_ENV: ""}).stdout.split()
    assert where.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) and value == "2"


def test_a_module_that_does_not_build_runs_as_source(package, tmp_path, monkeypatch, capsys):
    name, finders = package
    module, out = f"{name}.hot", tmp_path / "out"
    monkeypatch.setenv("CFLAGS", "-fno-such-compiler-option")  # the C compiler refuses to run
    assert build([module], root=tmp_path, out=out) == {}
    assert f"{module} not built" in capsys.readouterr().out
    assert read_manifest(out) == {}
    hot = _import_fresh(module, tmp_path, out, finders)
    assert hot.__file__.endswith(".py") and hot.double(2) == 4


def test_the_hot_modules_run_compiled_unless_turned_off():
    """make install builds every module of HOT: one that stopped compiling (a construct Cython
    refuses) shows here, not as a quietly slower service."""
    for module in HOT:
        importlib.import_module(module)
    pure = os.environ.get(PURE_ENV, "").strip() not in ("", "0")
    as_source = [m for m in HOT if sys.modules[m].__file__.endswith(".py")]
    if pure:
        assert as_source == list(HOT)
    else:
        assert as_source == [], (f"{as_source} run as Python source: run `make compiled` "
                                 f"(see {compiled.BUILD / 'build.log'})")


def _defines_a_function_in_a_coroutine(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        suspends = isinstance(node, ast.AsyncFunctionDef) or (
            isinstance(node, ast.FunctionDef)
            and any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(node)))
        if not suspends:
            continue
        for sub in ast.walk(node):
            if sub is not node and (isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
                                    or (isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Lambda))):
                found.append((sub.lineno, node.name))
    return found


def test_no_coroutine_of_a_hot_module_defines_a_function():
    """Compiled, a coroutine or generator keeps all its locals in one scope object, and a function
    defined in it (and kept in a local) refers back to that scope: the two keep each other, and the
    call's whole working set, until the collector's rare full pass (tests/support/cycles.py; the
    triggers worker held ~10 batches of records that way). Hot modules define such helpers at
    module level or as methods."""
    root = Path(__file__).resolve().parents[2]
    offenders = [f"{module}:{line} in {name}" for module in HOT
                 for line, name in _defines_a_function_in_a_coroutine(
                     ast.parse((root / (module.replace(".", "/") + ".py")).read_text()))]
    assert offenders == []
    assert _defines_a_function_in_a_coroutine(ast.parse(
        "async def f():\n    def g():\n        return 1\n    h = lambda: 2\n    return g() + h()\n")) == [
        (2, "f"), (4, "f")]
