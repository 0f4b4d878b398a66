"""Build (once) and load the tiny cffi extension that sets bits in a shared dirty log atomically.

QEMU harvests the vhost log with an atomic exchange of each 64-bit word (``vhost_log_sync`` in
hw/virtio/vhost.c: ``qatomic_xchg(from, 0)``), concurrently with the backend setting bits. A
plain read-modify-write from Python could lose a bit set between our read and our write-back or
resurrect one QEMU has just cleared, so every bit is set with ``__atomic_fetch_or`` on its word.
The same call sets bits in the backend's own bitmaps. Cached under ``$HVTOOLS_HOME/cache/vhost``
keyed by a hash of the source (the pattern of ``hvtools.transport._fabric_build``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from hvtools import paths
from hvtools.errors import DependencyError

CDEF = r"""
int hvt_set_bits(uint64_t *map, size_t nwords, uint64_t first, uint64_t last);
"""

SOURCE = r"""
#include <stdint.h>
#include <stddef.h>

/* Set bits first..last (inclusive) of a bitmap of nwords little-endian u64 words, one atomic
 * OR per word touched. Returns -1 (and sets nothing) if the range ends beyond the map. */
int hvt_set_bits(uint64_t *map, size_t nwords, uint64_t first, uint64_t last)
{
    uint64_t w, fw = first >> 6, lw = last >> 6;
    if (first > last) return 0;
    if (lw >= nwords) return -1;
    for (w = fw; w <= lw; w++) {
        unsigned lo = w == fw ? (unsigned)(first & 63) : 0;
        unsigned hi = w == lw ? (unsigned)(last & 63) : 63;
        uint64_t mask = (hi == 63 ? ~0ULL : ((1ULL << (hi + 1)) - 1)) & ~((1ULL << lo) - 1);
        __atomic_fetch_or(&map[w], mask, __ATOMIC_SEQ_CST);
    }
    return 0;
}
"""

_lock = threading.Lock()
_module: ModuleType | None = None


def module_key() -> str:
    h = hashlib.sha256((CDEF + "\0" + SOURCE + "\0" + sys.implementation.cache_tag).encode())
    return h.hexdigest()[:16]


def _build(dest: Path, name: str) -> Path:
    import cffi

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        raise DependencyError("cannot build the vhost dirty-log helper: gcc is missing "
                              "(apt-get install gcc libc6-dev)")
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(name, SOURCE, extra_compile_args=["-O2", "-Wall"])
    with tempfile.TemporaryDirectory(prefix="hvt-vhost-", dir=dest) as tmp:
        try:
            built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        except Exception as err:  # cffi raises VerificationError / distutils errors
            raise DependencyError(f"cannot build the vhost dirty-log helper: {err}") from err
        final = dest / built.name
        os.replace(built, final)
    return final


def load() -> Any:
    """The compiled module (``.ffi``, ``.lib``), built on first use and cached."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        name = f"_hvt_vhost_{module_key()}"
        dest = paths.cache_dir() / "vhost"
        dest.mkdir(parents=True, exist_ok=True)
        found = sorted(dest.glob(f"{name}.*.so"))
        if not found:
            with open(dest / ".lock", "w") as lk:
                fcntl.flock(lk, fcntl.LOCK_EX)
                found = sorted(dest.glob(f"{name}.*.so")) or [_build(dest, name)]
        spec = importlib.util.spec_from_file_location(name, found[0])
        if spec is None or spec.loader is None:
            raise DependencyError(f"cannot load the vhost dirty-log helper {found[0]}")
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
        except ImportError as err:
            found[0].unlink(missing_ok=True)
            raise DependencyError(f"cannot load the vhost dirty-log helper: {err}") from err
        _module = mod
        return mod
