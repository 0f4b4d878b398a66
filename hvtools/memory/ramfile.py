"""Guest memory from files, mapped with mmap: a live VM's shared RAM file, or a pmemsave dump.

A RAM file is the VM's ``memory-backend-file`` (``share=on``): offset ``o`` holds RAM byte
``o``, which the q35 machine places in guest-physical space in two pieces (QEMU 10.0
``pc_q35_init``): RAM below 4 GiB up to the low-memory split, the rest from 4 GiB upward. A
``pmemsave`` dump holds guest-physical ``[0, size)`` at offsets equal to the GPA.

Both are zero-copy (``view`` returns a memoryview of the mapping) and read-only unless opened
``writable=True``; a writable RamFile writes straight into the running guest's memory.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from hvtools.errors import UsageError

GiB = 1 << 30
_U64 = struct.Struct("<Q")

#: q35: with this much RAM or more the low part is cut at 2 GiB, else at 0xB0000000 (QEMU 10.0
#: hw/i386/pc_q35.c, leaving room below 4 GiB for the PCI hole and the MMCONFIG window).
Q35_SPLIT_THRESHOLD = 0xB0000000
Q35_LOWMEM_LARGE = 0x80000000
Q35_LOWMEM_SMALL = 0xB0000000
ABOVE_4G = 4 * GiB


@dataclass(frozen=True)
class RamRegion:
    """``size`` bytes of guest-physical space at ``gpa``, held at file ``offset``."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def q35_ram_layout(ram_size: int, *, max_ram_below_4g: int = ABOVE_4G) -> tuple[RamRegion, ...]:
    """Where q35 puts ``ram_size`` bytes of RAM in guest-physical space (QEMU 10.0).

    The low-memory split is 2 GiB when RAM is at least 0xB0000000 bytes, else 0xB0000000,
    never above the machine's ``max-ram-below-4g`` (default 4 GiB). RAM up to the split is at
    GPA 0; the rest starts at 4 GiB. (AMD CPUs whose RAM would reach the HyperTransport hole
    below 1 TiB get the high part moved above 1 TiB; guests that large are not handled.)
    The legacy windows below 1 MiB (VGA, option ROMs, BIOS) may show ROM or MMIO instead of
    this RAM to the guest; page tables never live there.
    """
    if ram_size <= 0:
        raise UsageError(f"RAM size {ram_size} is not positive")
    lowmem = Q35_LOWMEM_LARGE if ram_size >= Q35_SPLIT_THRESHOLD else Q35_LOWMEM_SMALL
    lowmem = min(lowmem, max_ram_below_4g)
    if ram_size <= lowmem:
        return (RamRegion(0, ram_size, 0),)
    return (RamRegion(0, lowmem, 0), RamRegion(ABOVE_4G, ram_size - lowmem, lowmem))


class MappedMemory:
    """Physical memory backed by regions of one mmap'd file (base of RamFile and PmemDump)."""

    def __init__(self, path: Path | str, regions: tuple[RamRegion, ...] | None = None, *,
                 writable: bool = False) -> None:
        self.path = Path(path)
        self.writable = writable
        try:
            fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as err:
            raise UsageError(f"cannot open guest memory file {self.path}: {err}") from err
        try:
            file_size = os.fstat(fd).st_size
            if file_size == 0:
                raise UsageError(f"guest memory file {self.path} is empty")
            if regions is None:
                regions = (RamRegion(0, file_size, 0),)
            for r in regions:
                if r.offset + r.size > file_size:
                    raise UsageError(f"{self.path} holds {file_size:#x} bytes, fewer than the "
                                     f"layout needs ({r.offset + r.size:#x})")
            self._mm = mmap.mmap(fd, file_size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
        finally:
            os.close(fd)
        self.regions = tuple(sorted(regions, key=lambda r: r.gpa))
        self._starts = [r.gpa for r in self.regions]

    # -- PhysMemory --------------------------------------------------------------------------
    def _find(self, addr: int, size: int) -> RamRegion | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or size < 0:
            return None
        r = self.regions[i]
        return r if addr + size <= r.end else None

    def contains(self, addr: int, size: int = 1) -> bool:
        return self._find(addr, size) is not None

    def _offset(self, addr: int, size: int) -> int:
        r = self._find(addr, size)
        if r is None:
            raise UsageError(f"guest-physical [{addr:#x}, +{size:#x}) is not in {self.path} "
                             f"(regions {self.describe()})")
        return r.offset + (addr - r.gpa)

    def read(self, addr: int, size: int) -> bytes:
        off = self._offset(addr, size)
        return self._mm[off:off + size]

    def read_u64(self, addr: int) -> int:
        value: int = _U64.unpack_from(self._mm, self._offset(addr, 8))[0]
        return value

    def view(self, addr: int, size: int) -> memoryview:
        """A zero-copy view of ``[addr, addr + size)``; release it before :meth:`close`."""
        off = self._offset(addr, size)
        return memoryview(self._mm)[off:off + size]

    # -- WritablePhysMemory -------------------------------------------------------------------
    def _require_writable(self) -> None:
        if not self.writable:
            raise UsageError(f"{self.path} is mapped read-only (open it with writable=True)")

    def write(self, addr: int, data: bytes) -> None:
        self._require_writable()
        off = self._offset(addr, len(data))
        self._mm[off:off + len(data)] = data

    def write_u64(self, addr: int, value: int) -> None:
        self._require_writable()
        if not 0 <= value < (1 << 64):
            raise UsageError(f"{value:#x} is not a 64-bit value")
        _U64.pack_into(self._mm, self._offset(addr, 8), value)

    # -- lifetime -----------------------------------------------------------------------------
    def describe(self) -> str:
        return ", ".join(f"[{r.gpa:#x}, {r.end:#x}) @ file {r.offset:#x}" for r in self.regions)

    def close(self) -> None:
        self._mm.close()

    def __enter__(self) -> MappedMemory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RamFile(MappedMemory):
    """A live VM's shared RAM file with the q35 layout (see :func:`q35_ram_layout`).

    ``ram_size`` defaults to the file's size (a ``memory-backend-file`` is exactly the RAM).
    """

    def __init__(self, path: Path | str, *, ram_size: int | None = None,
                 writable: bool = False) -> None:
        p = Path(path)
        if ram_size is None:
            try:
                ram_size = p.stat().st_size
            except OSError as err:
                raise UsageError(f"cannot open guest RAM file {p}: {err}") from err
        self.ram_size = ram_size
        super().__init__(p, q35_ram_layout(ram_size) if ram_size > 0 else None,
                         writable=writable)


class PmemDump(MappedMemory):
    """A file written by QMP ``pmemsave`` of guest-physical ``[0, size)``: offset = GPA."""

    def __init__(self, path: Path | str, *, writable: bool = False) -> None:
        super().__init__(path, None, writable=writable)
