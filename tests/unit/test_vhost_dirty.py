"""The backend's own per-region bitmaps and the shared vhost log (hvtools.vhost.dirty)."""

from __future__ import annotations

import mmap
import threading

from hvtools.vhost.dirty import DirtyLog
from hvtools.vhost.virtq import GuestMemory, Region


def _mem() -> GuestMemory:
    return GuestMemory([Region(0, 0xA0000, 0, memoryview(bytearray(0xA0000))),
                        Region(0x100000, 0x100000, 0, memoryview(bytearray(0x100000)))])


def test_own_bitmap_per_region_and_harvest_clears() -> None:
    d = DirtyLog()
    d.set_regions(_mem())
    d.mark(0x1FFF, 2)  # pages 1 and 2 of region 0
    d.mark(0x100000 + 5 * 4096, 3 * 4096)  # pages 5-7 of region 1
    d.mark(0xB0000, 4096)  # in the hole: nobody's page
    h = d.harvest()
    assert h["total"] == 5
    assert [r["runs"] for r in h["regions"]] == [[[1, 2]], [[5, 3]]]
    assert h["regions"][1]["gpa"] == 0x100000
    assert d.harvest()["total"] == 0


def test_shared_log_only_with_log_all_and_switch() -> None:
    d = DirtyLog()
    d.set_regions(_mem())
    m = mmap.mmap(-1, 4096 + 64)
    d.set_log(m, 64)
    d.mark(0x3000, 1)
    assert m[64:72] == bytes(8)  # VHOST_F_LOG_ALL not negotiated
    d.log_all = True
    d.mark(0x3000, 1)
    d.mark(64 * 4096, 4096)  # bit 64: second word
    assert m[64] == 0x08 and m[72] == 0x01 and d.log_writes == 2
    d.shared_enabled = False
    d.mark(0x4000, 1)
    assert m[64] == 0x08 and not d.shared_active
    d.shared_enabled = True
    d.mark(1 << 40, 1)  # beyond the log: counted, not written
    assert d.log_overflows == 1
    d.close()


def test_harvest_loses_no_bit_under_concurrent_marking() -> None:
    d = DirtyLog()
    d.set_regions(_mem())
    pages = 0xA0000 // 4096
    stop = threading.Event()
    marked: list[int] = []

    def writer() -> None:
        i = 0
        while not stop.is_set() or i < 5000:
            d.mark((i % pages) * 4096, 1)
            marked.append(i % pages)
            i += 1
            if i >= 20000:
                break

    t = threading.Thread(target=writer)
    t.start()
    seen: set[int] = set()
    while t.is_alive():
        for first, n in d.harvest()["regions"][0]["runs"]:
            seen.update(range(first, first + n))
    t.join()
    for first, n in d.harvest()["regions"][0]["runs"]:
        seen.update(range(first, first + n))
    assert seen == set(marked)
