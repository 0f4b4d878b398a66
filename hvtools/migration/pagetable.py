"""The recovery page table: a frozen VM's populated guest pages, where they live, their hashes.

Recovery from a failed host (issue 4, "seed design") moves a VM in two kinds of one-sided READs: one
for this table, then many for the pages it lists. The table maps each *populated* guest page to its
location in the owning host's RAM region (an offset in the VM's RAM file) and carries the page's
hash taken at freeze, which the puller verifies on arrival.

Binary layout, little-endian, so it can be READ in one operation and parsed without the sender::

    header (128 bytes)
      0   magic        8s   b"HVPGTBL1"
      8   page_size    u32
      12  flags        u32  (0)
      16  ram_size     u64  bytes in the RAM region (the memory-backend-file size)
      24  n_entries    u64
      32  dev_len      u64  bytes of device state (QEMU migration stream with x-ignore-shared)
      40  dev_hash     u64  xxh3-64 of the device state
      48  table_hash   u64  xxh3-64 of the header (this field as 0) and the entry array
      56  created_ns   u64  CLOCK_REALTIME at freeze
      64  vm           64s  VM name, NUL padded
    entries (n_entries x 24 bytes), sorted by offset
      gpa     u64  guest-physical address of the page (q35 layout of the RAM region)
      offset  u64  byte offset of the page in the host's RAM region
      hash    u64  xxh3-64 of the page's bytes at freeze

This module is pure: bytes and numpy arrays in, values out. Reading files and the fabric live in
:mod:`hvtools.migration.recovery`.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash

from hvtools.errors import HvError
from hvtools.memory.ramfile import q35_ram_layout

MAGIC = b"HVPGTBL1"
PAGE = 4096
HEADER = struct.Struct("<8sIIQQQQQQ64s")
assert HEADER.size == 128
ENTRY_DTYPE = np.dtype([("gpa", "<u8"), ("offset", "<u8"), ("hash", "<u8")])


class PageTableError(HvError):
    """A recovery page table that does not parse, or whose contents fail their hashes."""


@dataclass(frozen=True)
class PageTable:
    """A parsed table: header fields plus the entry array (a numpy structured array)."""

    vm: str
    ram_size: int
    entries: npt.NDArray[np.void]
    dev_len: int = 0
    dev_hash: int = 0
    created_ns: int = 0
    page_size: int = PAGE

    @property
    def populated_bytes(self) -> int:
        return len(self.entries) * self.page_size

    def to_bytes(self) -> bytes:
        body = np.ascontiguousarray(self.entries, dtype=ENTRY_DTYPE).tobytes()
        fields = (MAGIC, self.page_size, 0, self.ram_size, len(self.entries), self.dev_len,
                  self.dev_hash)
        tail = (self.created_ns, self.vm.encode()[:64])
        digest = _table_hash(HEADER.pack(*fields, 0, *tail), body)
        return HEADER.pack(*fields, digest, *tail) + body

    def relocated(self, offsets: npt.NDArray[np.uint64]) -> PageTable:
        """The same pages at other locations (the destination's own RAM region)."""
        if len(offsets) != len(self.entries):
            raise PageTableError("relocation needs one offset per entry")
        moved = self.entries.copy()
        moved["offset"] = offsets
        return PageTable(self.vm, self.ram_size, moved, self.dev_len, self.dev_hash,
                         self.created_ns, self.page_size)


def _table_hash(header: bytes, body: bytes | memoryview) -> int:
    h = xxhash.xxh3_64(header)
    h.update(body)
    return h.intdigest()


def parse(data: bytes | bytearray | memoryview) -> PageTable:
    """Parse and check a table (magic, sizes, body hash, entries inside the RAM region)."""
    data = memoryview(data)
    if len(data) < HEADER.size:
        raise PageTableError(f"page table truncated: {len(data)} bytes, header needs "
                             f"{HEADER.size}")
    (magic, page_size, flags, ram_size, n, dev_len, dev_hash, table_hash, created,
     vm) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PageTableError(f"not a recovery page table (magic {bytes(magic)!r})")
    if page_size != PAGE:
        raise PageTableError(f"page size {page_size} is not supported (only {PAGE})")
    end = HEADER.size + n * ENTRY_DTYPE.itemsize
    if len(data) < end:
        raise PageTableError(f"page table truncated: {n} entries need {end} bytes, "
                             f"got {len(data)}")
    body = data[HEADER.size:end]
    zeroed = HEADER.pack(magic, page_size, flags, ram_size, n, dev_len, dev_hash, 0, created, vm)
    if _table_hash(zeroed, body) != table_hash:
        raise PageTableError("page table does not match its hash (corrupted in transfer?)")
    entries = np.frombuffer(body, dtype=ENTRY_DTYPE).copy()
    if n and (int(entries["offset"].max()) + page_size > ram_size
              or bool(np.any(entries["offset"] % page_size))):
        raise PageTableError("page table lists a page outside its RAM region")
    return PageTable(vm.rstrip(b"\0").decode(), ram_size, entries, dev_len, dev_hash, created,
                     page_size)


def table_size(n_entries: int) -> int:
    return HEADER.size + n_entries * ENTRY_DTYPE.itemsize


def pages_of_extents(extents: Iterable[tuple[int, int]], ram_size: int) -> npt.NDArray[np.uint64]:
    """Page offsets covered by data extents ``(start, end)`` (from SEEK_DATA/SEEK_HOLE)."""
    parts = []
    for start, end in extents:
        first = start - start % PAGE
        last = min(end, ram_size)
        if last > first:
            parts.append(np.arange(first, last, PAGE, dtype=np.uint64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def gpas_of_offsets(offsets: npt.NDArray[np.uint64], ram_size: int) -> npt.NDArray[np.uint64]:
    """Guest-physical addresses of RAM-region offsets under the q35 layout (QEMU 10.0)."""
    gpas = offsets.copy()
    for region in q35_ram_layout(ram_size):
        inside = (offsets >= region.offset) & (offsets < region.offset + region.size)
        gpas[inside] = offsets[inside] - np.uint64(region.offset) + np.uint64(region.gpa)
    return gpas


def hash_pages(mem: memoryview, offsets: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """xxh3-64 of each page at ``offsets`` in ``mem``."""
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(mem[o:o + PAGE]) for o in offsets.tolist()), dtype=np.uint64,
                       count=len(offsets))


def nonzero(mem: memoryview, offsets: npt.NDArray[np.uint64], *,
            threads: int = 2) -> npt.NDArray[np.bool_]:
    """Which pages at ``offsets`` (sorted) hold a non-zero byte.

    A zero page need not travel: the destination's fresh RAM file reads as zeros there.
    """
    words = np.frombuffer(mem, dtype=np.uint64)
    keep = np.zeros(len(offsets), dtype=bool)

    def scan(run: Run) -> None:
        rows = words[run.offset // 8:(run.offset + run.length) // 8].reshape(-1, PAGE // 8)
        keep[run.first:run.last] = rows.any(axis=1)

    runs = coalesce(offsets, max_bytes=64 << 20)
    if len(runs) > 1 and threads > 1:
        # numpy drops the GIL in reductions: the scan runs on every core.
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(scan, runs))
    else:
        for run in runs:
            scan(run)
    return keep


def build(vm: str, ram_size: int, mem: memoryview, offsets: npt.NDArray[np.uint64], *,
          dev_len: int = 0, dev_hash: int = 0) -> PageTable:
    """A table of the pages at ``offsets`` of ``mem`` (the RAM region), hashed now."""
    entries = np.zeros(len(offsets), dtype=ENTRY_DTYPE)
    entries["offset"] = np.sort(offsets)
    entries["gpa"] = gpas_of_offsets(entries["offset"], ram_size)
    entries["hash"] = hash_pages(mem, entries["offset"])
    return PageTable(vm, ram_size, entries, dev_len, dev_hash, time.time_ns())


@dataclass(frozen=True)
class Run:
    """One READ: ``length`` bytes at RAM-region ``offset``, covering entries [first, last)."""

    offset: int
    length: int
    first: int
    last: int


def coalesce(offsets: npt.NDArray[np.uint64], *, max_bytes: int = 1 << 20,
             page_size: int = PAGE) -> list[Run]:
    """Merge pages at contiguous, sorted offsets into runs of at most ``max_bytes``."""
    if max_bytes < page_size:
        raise ValueError("max_bytes must hold at least one page")
    n = len(offsets)
    if n == 0:
        return []
    o = offsets.astype(np.int64)
    breaks = np.flatnonzero(np.diff(o) != page_size) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [n]))
    per = max_bytes // page_size
    runs: list[Run] = []
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        for a in range(s, e, per):
            b = min(a + per, e)
            runs.append(Run(int(o[a]), (b - a) * page_size, a, b))
    return runs


def verify_pages(mem: memoryview, table: PageTable, first: int, last: int) -> list[int]:
    """Indices of entries in [first, last) whose page in ``mem`` does not match its hash."""
    chunk = table.entries[first:last]
    got = hash_pages(mem, chunk["offset"])
    return [first + int(i) for i in np.flatnonzero(got != chunk["hash"])]

