"""The hot modules as C extensions (Cython), loaded only while they match their source.

Why: the workers' Python per event bounds their throughput, and its profile is flat (domain code,
decoding, row building; nothing left that dominates). Cython compiles those modules as they are, no
annotations used, and the same code runs with less interpreter overhead: worker CPU per event 7-10 %
lower in bench.loyalty and bench.identity, measured against the source in alternating runs.

`make install` (and `make test`) run `build()`: each module of HOT whose source changed is compiled
into build/compiled/, and a manifest records the sha256 of the source it was built from. The finder
loads a compiled module only while its .py still has that digest: an edited module runs as its
source until the next build, so nothing ever runs stale code. A module that fails to build (no C
compiler, no Cython, a construct Cython refuses) runs as its source. `OMNICRM_PURE_PYTHON=1` turns
the finder off, for py-spy (which sees Python frames only) or to compare."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "compiled"
MANIFEST_NAME = "manifest.json"
PURE_ENV = "OMNICRM_PURE_PYTHON"

# The per-event paths of the workers: the shared consumer, outbox and Avro helpers, and each
# service's domain, handler and store modules. (Not modules that find files through __file__: a
# compiled module's __file__ is its .so under build/.)
HOT = (
    "shared.batch_consumer", "shared.avro_wire", "shared.avro_compiled", "shared.avro_reader",
    "shared.outbox", "shared.event_order", "shared.publish", "shared.pg_timestamptz",
    "services.identity.handlers", "services.identity.resolution", "services.identity.records",
    "services.identity.profile", "services.identity.normalise", "services.identity.wire",
    "services.identity.store",
    "services.loyalty.book", "services.loyalty.rules", "services.loyalty.ledger",
    "services.loyalty.wire", "services.loyalty.handlers", "services.loyalty.store",
    "services.triggers.handlers", "services.triggers.facts", "services.triggers.rules",
    "services.triggers.money", "services.triggers.store",
    "services.notifications.handlers", "services.notifications.policy",
    "services.notifications.contacts", "services.notifications.outcomes",
    "services.notifications.sender", "services.notifications.store",
)


def source_of(module: str, root: Path = ROOT) -> Path:
    return root / (module.replace(".", "/") + ".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds a module of the manifest as its extension while its source is the one it was built from."""

    def __init__(self, manifest: dict[str, dict[str, str]], root: Path = ROOT, build: Path = BUILD) -> None:
        self.manifest = manifest
        self.root = root
        self.build = build

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001 - importlib's protocol
        entry = self.manifest.get(fullname)
        if entry is None:
            return None
        so = self.build / entry["file"]
        try:
            if digest(source_of(fullname, self.root)) != entry["sha256"] or not so.is_file():
                return None
        except OSError:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(so))
        return importlib.util.spec_from_file_location(fullname, so, loader=loader)


def read_manifest(build: Path = BUILD) -> dict[str, dict[str, str]]:
    """The modules built for this interpreter (an extension of another one would not load)."""
    try:
        data = json.loads((build / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("python") != sys.implementation.cache_tag:
        return {}
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return {m: e for m, e in data.get("modules", {}).items() if str(e.get("file", "")).endswith(suffixes)}


def install(root: Path = ROOT, build: Path = BUILD) -> CompiledFinder | None:
    """Put a finder first on sys.meta_path (once per build directory); None when turned off or
    nothing is built. shared/__init__.py and services/__init__.py call it, so it is in place before
    any hot module is imported."""
    for finder in sys.meta_path:
        if isinstance(finder, CompiledFinder) and finder.build == build:
            return finder
    if os.environ.get(PURE_ENV, "").strip() not in ("", "0"):
        return None
    manifest = read_manifest(build)
    if not manifest:
        return None
    finder = CompiledFinder(manifest, root, build)
    sys.meta_path.insert(0, finder)
    return finder


def _build_one(job: tuple[str, Path, Path]) -> tuple[str, dict[str, str] | None, str]:
    """Compile one module, in a worker process (the compiler's output goes to build.log)."""
    module, root, build = job
    log = os.open(build / "build.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # -O1: as fast as -O3 in bench.loyalty (alternating runs), in half the build time.
    os.environ.setdefault("CFLAGS", "-O1")
    source = source_of(module, root)
    try:
        from Cython.Build import cythonize
        from setuptools import Distribution, Extension

        [ext] = cythonize([Extension(module, [str(source)])], quiet=True, language_level=3, force=True,
                          compiler_directives={"binding": True, "annotation_typing": False})
        dist = Distribution({"ext_modules": [ext], "script_name": "setup.py"})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib = str(build)
        cmd.build_temp = str(build / "tmp" / module)
        cmd.force = True  # the source changed: never judge the old extension up to date by file times
        cmd.ensure_finalized()
        so = Path(cmd.get_ext_fullpath(module))
        so.unlink(missing_ok=True)
        cmd.run()
    except (Exception, SystemExit) as exc:  # setuptools raises SystemExit on a compiler error
        return module, None, f"{type(exc).__name__}: {exc}"
    finally:
        source.with_suffix(".c").unlink(missing_ok=True)
    return module, {"file": str(so.relative_to(build)), "sha256": digest(source)}, ""


def build(modules: Iterable[str] = HOT, *, root: Path = ROOT, out: Path = BUILD,
          jobs: int | None = None) -> dict[str, dict[str, str]]:
    """Compile those of `modules` whose source changed since they were built; write the manifest.
    Each module builds on its own: one that fails runs as its source, the others compiled."""
    modules = tuple(modules)
    try:
        import Cython  # noqa: F401
    except ImportError as exc:
        print(f"shared.compiled: not building ({exc}); the services run as Python source", flush=True)
        return {}
    out.mkdir(parents=True, exist_ok=True)
    old = read_manifest(out)
    built = {m: e for m, e in old.items() if m in modules and (out / e["file"]).is_file()
             and source_of(m, root).is_file() and digest(source_of(m, root)) == e["sha256"]}
    todo = [m for m in modules if m not in built]
    if todo:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(len(todo), jobs or os.cpu_count() or 1)) as pool:
            for module, entry, why in pool.map(_build_one, [(m, root, out) for m in todo]):
                if entry is None:
                    print(f"shared.compiled: {module} not built ({why}); it runs as Python source "
                          f"(see {out / 'build.log'})", flush=True)
                else:
                    built[module] = entry
    manifest = {"python": sys.implementation.cache_tag, "modules": built}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    if todo:
        print(f"shared.compiled: {len(built)} of {len(modules)} hot modules compiled "
              f"({len(todo)} built now) in {out}", flush=True)
    return built
