"""Where the backend records the guest memory it writes.

Two records, both one bit per 4 KiB page:

- its **own** bitmap per memory region (bit ``(gpa - region.gpa) >> 12``), kept whether or not
  QEMU asked for logging, and handed out by :meth:`DirtyLog.harvest` as an atomic
  snapshot-and-clear (issue 6: "transfer the bitmap's contents to the CPU");
- the **shared vhost log** QEMU gives with SET_LOG_BASE, bit ``gpa >> 12`` from the start of the
  log (vhost-user.rst "Migration": "the log is a bitmap, one bit per page of guest-physical
  memory, 4 KiB pages"), written only while VHOST_F_LOG_ALL is negotiated and the debug switch
  allows it.

Bits are set with atomic 64-bit ORs (see ``_atomic_build``). Harvest swaps in a fresh bitmap
under the same lock marking takes, so no bit is lost between the snapshot and the clear.
"""

from __future__ import annotations

import contextlib
import mmap
import threading
from dataclasses import dataclass
from typing import Any

from hvtools.tracking import DirtySet
from hvtools.vhost import _atomic_build
from hvtools.vhost.virtq import PAGE_SHIFT, GuestMemory


@dataclass
class _Own:
    gpa: int
    size: int
    bits: bytearray
    ptr: Any  # cffi uint64_t * into bits
    nwords: int


class DirtyLog:
    def __init__(self, *, shared_enabled: bool = True) -> None:
        self._mod = _atomic_build.load()
        self._lock = threading.Lock()
        self._own: list[_Own] = []
        self._log_map: mmap.mmap | None = None
        self._log_buf: Any = None
        self._log_ptr: Any = None
        self._log_words = 0
        #: VHOST_F_LOG_ALL negotiated (QEMU is migrating)
        self.log_all = False
        #: the debug switch (set_dirty_log): False makes the backend skip the shared log
        self.shared_enabled = shared_enabled
        self.log_writes = 0  # calls that set bits in the shared log
        self.log_overflows = 0  # writes past the end of the shared log (QEMU sized it short)

    # -- regions ------------------------------------------------------------------------------
    def set_regions(self, mem: GuestMemory) -> None:
        """New own bitmaps for a new memory table (bits of the old table are dropped: the
        front-end re-sends the table only when the layout changes)."""
        ffi = self._mod.ffi
        own = []
        for r in mem.regions:
            pages = (r.size + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
            nwords = (pages + 63) // 64
            bits = bytearray(nwords * 8)
            own.append(_Own(r.gpa, r.size, bits, ffi.cast("uint64_t *", ffi.from_buffer(bits)),
                            nwords))
        with self._lock:
            self._own = own

    # -- the shared vhost log -----------------------------------------------------------------
    def set_log(self, log_map: mmap.mmap | None, offset: int = 0) -> None:
        """Adopt a SET_LOG_BASE mapping (the old one is unmapped), or drop it with None."""
        ffi = self._mod.ffi
        with self._lock:
            old, oldbuf = self._log_map, self._log_buf
            self._log_map = log_map
            if log_map is None:
                self._log_buf = self._log_ptr = None
                self._log_words = 0
            else:
                self._log_buf = ffi.from_buffer(log_map)
                self._log_ptr = ffi.cast("uint64_t *", self._log_buf) + offset // 8
                self._log_words = (len(log_map) - offset) // 8
        if old is not None:
            ffi.release(oldbuf)
            with contextlib.suppress(BufferError):
                old.close()

    @property
    def shared_active(self) -> bool:
        return self.log_all and self.shared_enabled and self._log_ptr is not None

    # -- marking ------------------------------------------------------------------------------
    def mark(self, gpa: int, length: int) -> None:
        """Record a device write of ``[gpa, gpa+length)``."""
        if length <= 0:
            return
        last = gpa + length - 1
        set_bits = self._mod.lib.hvt_set_bits
        with self._lock:
            for o in self._own:
                lo = max(gpa, o.gpa)
                hi = min(last, o.gpa + o.size - 1)
                if lo <= hi:
                    set_bits(o.ptr, o.nwords, (lo - o.gpa) >> PAGE_SHIFT,
                             (hi - o.gpa) >> PAGE_SHIFT)
            if self.log_all and self.shared_enabled and self._log_ptr is not None:
                if set_bits(self._log_ptr, self._log_words, gpa >> PAGE_SHIFT,
                            last >> PAGE_SHIFT) < 0:
                    self.log_overflows += 1
                else:
                    self.log_writes += 1

    # -- transfer -----------------------------------------------------------------------------
    def harvest(self) -> dict[str, Any]:
        """Atomic snapshot-and-clear of every region's own bitmap."""
        ffi = self._mod.ffi
        with self._lock:
            snaps = []
            for o in self._own:
                snaps.append((o.gpa, o.size, o.bits))
                o.bits = bytearray(o.nwords * 8)
                o.ptr = ffi.cast("uint64_t *", ffi.from_buffer(o.bits))
        regions = []
        total = 0
        for gpa, size, bits in snaps:
            # The snapshot becomes an adaptive dirty set (hvtools.tracking): sparse, bitmap or
            # full by its density; its runs are what the control channel hands over.
            pages = max(1, size >> PAGE_SHIFT)
            dset = DirtySet.from_bitmap(bytes(bits)[:-(-pages // 64) * 8], pages)
            dirty = len(dset)
            total += dirty
            regions.append({"gpa": gpa, "size": size, "page_size": 1 << PAGE_SHIFT,
                            "dirty": dirty, "representation": str(dset.representation),
                            "runs": [[f, c] for f, c in dset.harvest_runs()]})
        return {"regions": regions, "total": total}

    def close(self) -> None:
        self.set_log(None)
