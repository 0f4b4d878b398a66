"""Build (once) and load the tiny cffi extension that sets bits in a shared dirty log atomically.

QEMU harvests the vhost log with an atomic exchange of each 64-bit word (``vhost_log_sync`` in
hw/virtio/vhost.c: ``qatomic_xchg(from, 0)``), concurrently with the backend setting bits. A
plain read-modify-write from Python could lose a bit set between our read and our write-back or
resurrect one QEMU has just cleared, so every bit is set with ``__atomic_fetch_or`` on its word.
The same call sets bits in the backend's own bitmaps. Cached under ``$HVTOOLS_HOME/cache/vhost``
keyed by a hash of the source (the pattern of ``hvtools.transport._fabric_build``).
"""

from __future__ import annotations

import shutil
from typing import Any

from hvtools import cext

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

def _missing_dependency() -> str | None:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        return "gcc is missing (apt-get install gcc libc6-dev)"
    return None


def load() -> Any:
    """The compiled module (``.ffi``, ``.lib``), built on first use and cached."""
    return cext.load("vhost", CDEF, SOURCE, what="the vhost dirty-log helper",
                     missing=_missing_dependency)
