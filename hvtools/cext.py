"""C extensions built with cffi on first use and cached (the libfabric binding, the vhost
dirty-log atomics): one build-and-load rule.

A module is keyed by a hash of its cdef, its C source and the interpreter's cache tag, built
under ``$HVTOOLS_HOME/cache/<kind>/`` by one process at a time (flock), published by an
atomic rename, and rebuilt when loading it fails (e.g. a library it links was upgraded).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from hvtools import paths
from hvtools.errors import DependencyError

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}


def module_key(cdef: str, source: str) -> str:
    h = hashlib.sha256((cdef + "\0" + source + "\0" + sys.implementation.cache_tag).encode())
    return h.hexdigest()[:16]


def _build(dest: Path, name: str, cdef: str, source: str, libraries: list[str],
           what: str, missing: Callable[[], str | None]) -> Path:
    import cffi  # only the build needs the compiler side of cffi

    why = missing()
    if why:
        raise DependencyError(f"cannot build {what}: {why}")
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    ffi.set_source(name, source, libraries=libraries, extra_compile_args=["-O2", "-Wall"])
    with tempfile.TemporaryDirectory(prefix=f"{name}-", dir=dest) as tmp:
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        except Exception as err:  # cffi raises VerificationError / distutils errors
            raise DependencyError(f"cannot build {what}: {err}") from err
        final = dest / built.name
        os.replace(built, final)  # atomic: readers never see a half-written module
    return final


def load(kind: str, cdef: str, source: str, *, what: str, libraries: list[str] | None = None,
         missing: Callable[[], str | None] = lambda: None) -> ModuleType:
    """The compiled module (``.ffi``, ``.lib``) named ``_hvt_<kind>_<key>``, built if needed."""
    name = f"_hvt_{kind}_{module_key(cdef, source)}"
    with _lock:
        if name in _loaded:
            return _loaded[name]
        dest = paths.cache_dir() / kind
        dest.mkdir(parents=True, exist_ok=True)
        found = sorted(dest.glob(f"{name}*.so"))
        if not found:
            with open(dest / ".lock", "w") as lk:
                fcntl.flock(lk, fcntl.LOCK_EX)
                found = sorted(dest.glob(f"{name}*.so")) or [
                    _build(dest, name, cdef, source, libraries or [], what, missing)]
        spec = importlib.util.spec_from_file_location(name, found[0])
        if spec is None or spec.loader is None:
            raise DependencyError(f"cannot load {what} {found[0]}")
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except ImportError as err:
            found[0].unlink(missing_ok=True)  # stale; rebuilt next time
            raise DependencyError(f"cannot load {what}: {err}") from err
        _loaded[name] = mod
        return mod
