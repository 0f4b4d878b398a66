"""Build VT-d translation structures in physical memory, as a driver would program them.

PURE: works on any :class:`~hvtools.memory.protocol.WritablePhysMemory` (a test buffer, or a
live guest's RAM through an adapter) and writes the bit-exact encodings of
:mod:`hvtools.iommu.structures`. Intel VT-d Architecture Specification rev. 4.x:

- root tables (s9.1 legacy, s9.2 scalable mode: lower half for devfn 0-127, upper for
  128-255) reached from RTADDR_REG (s11.4.5);
- context entries (s9.3 legacy, s9.4 scalable mode);
- scalable-mode PASID directories and PASID tables (s9.5, s9.6), any PGTT;
- second-stage (s9.8) and first-stage (s9.7) paging structures with 4 KiB, 2 MiB and 1 GiB
  leaves.

Tables are 4 KiB pages handed out upwards from ``base`` by :meth:`VtdTables.alloc`. Nothing
here checks that a programming is *valid*: building invalid structures on purpose is how
faults are provoked, and the walker (:mod:`hvtools.iommu.walk`) is what judges them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K
from hvtools.errors import UsageError
from hvtools.iommu.structures import (
    ContextEntry,
    FsPde2M,
    FsPdpe1G,
    FsPml4e,
    FsPte,
    PasidDirEntry,
    PasidTableEntry,
    RootEntry,
    RtaddrReg,
    ScalableContextEntry,
    ScalableRootEntry,
    SsPde2M,
    SsPdpe1G,
    SsPml4e,
    SsPte,
    Ttm,
    VtdStruct,
)
from hvtools.memory.buffer import BufferMemory
from hvtools.memory.protocol import WritablePhysMemory

M = TypeVar("M", bound=WritablePhysMemory)

#: Leaf level of each page size (1 = PTE, 2 = PDE, 3 = PDPE).
LEAF_LEVEL: Mapping[int, int] = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}
_ADDR_51_12 = ((1 << 52) - 1) & ~0xFFF
_SS_LEAF: Mapping[int, type[VtdStruct]] = {1: SsPte, 2: SsPde2M, 3: SsPdpe1G}
_FS_LEAF: Mapping[int, type[VtdStruct]] = {1: FsPte, 2: FsPde2M, 3: FsPdpe1G}


def level_index(address: int, level: int) -> int:
    """The 9-bit table index of ``address`` at paging ``level`` (1 = PTE .. 5 = PML5E)."""
    return address >> (12 + 9 * (level - 1)) & 0x1FF


class VtdTables(Generic[M]):
    """VT-d structures in ``memory``, on 4 KiB pages allocated upwards from ``base``.

    ``limit`` (exclusive) bounds the allocator; ``zero_pages`` clears every page it hands out
    (leave it on when the memory may hold older tables).
    """

    def __init__(self, memory: M, *, base: int = 0x1000, limit: int, zero_pages: bool = True
                 ) -> None:
        if base & 0xFFF or limit & 0xFFF or limit <= base:
            raise UsageError(f"table arena [{base:#x}, {limit:#x}) is not a 4 KiB-aligned range")
        self.mem = memory
        self.base = base
        self.limit = limit
        self.next = base
        self.zero_pages = zero_pages

    @staticmethod
    def in_buffer(size: int = 4 << 20, *, base: int = 0x1000) -> VtdTables[BufferMemory]:
        """A builder over a fresh zeroed :class:`BufferMemory` of ``size`` bytes at GPA 0."""
        return VtdTables(BufferMemory(size), base=base, limit=size, zero_pages=False)

    # -- raw access -------------------------------------------------------------------------

    def alloc(self) -> int:
        """The next free 4 KiB page (zeroed when ``zero_pages``)."""
        if self.next + 0x1000 > self.limit:
            raise UsageError(f"VT-d table arena [{self.base:#x}, {self.limit:#x}) is full")
        addr = self.next
        self.next += 0x1000
        if self.zero_pages:
            self.mem.write(addr, bytes(0x1000))
        return addr

    def reset(self) -> None:
        """Start allocating from ``base`` again (old tables are overwritten as pages go out)."""
        self.next = self.base

    def put(self, struct: type[VtdStruct], addr: int, value: int) -> None:
        """Store ``value`` as ``struct`` at ``addr``."""
        self.mem.write(addr, struct.to_bytes(value))

    def get(self, struct: type[VtdStruct], addr: int) -> int:
        """The ``struct`` stored at ``addr``."""
        return struct.from_bytes(self.mem.read(addr, struct.size()))

    def edit(self, struct: type[VtdStruct], addr: int, **fields: int) -> int:
        """Rewrite named fields of the ``struct`` at ``addr``; returns the new value."""
        value = self.get(struct, addr)
        for name, v in fields.items():
            value = struct.field(name).put(value, v)
        self.put(struct, addr, value)
        return value

    # -- root and context (s9.1-s9.4) -------------------------------------------------------

    def legacy(self) -> int:
        """A new, empty legacy root table; returns the RTADDR_REG value (TTM=00b)."""
        return RtaddrReg.value(self.alloc(), Ttm.LEGACY)

    def scalable(self) -> int:
        """A new, empty scalable-mode root table; returns the RTADDR_REG value (TTM=01b)."""
        return RtaddrReg.value(self.alloc(), Ttm.SCALABLE)

    def legacy_device(self, rtaddr: int, sid: int, **fields: int) -> int:
        """Point ``sid``'s legacy context entry somewhere: P=1, AW=2 (48-bit), DID=1 and
        ``fields`` (e.g. ``SSPTPTR``, ``TT``). Makes the bus's root entry present if needed.
        Returns the context entry's address."""
        rta = RtaddrReg.get(rtaddr, "RTA") << 12
        re_addr = rta + (sid >> 8) * RootEntry.size()
        re = self.get(RootEntry, re_addr)
        if not re & 1:
            re = RootEntry.encode({"P": 1, "CTP": self.alloc() >> 12})
            self.put(RootEntry, re_addr, re)
        ce_addr = (RootEntry.get(re, "CTP") << 12) + (sid & 0xFF) * ContextEntry.size()
        self.put(ContextEntry, ce_addr, ContextEntry.encode(
            {"P": 1, "AW": 2, "DID": 1, **fields}))
        return ce_addr

    def sm_device(self, rtaddr: int, sid: int, **fields: int) -> int:
        """A scalable-mode context entry for ``sid``: P=1, PASIDE=1, PDTS=0 (a 128-entry PASID
        directory, new unless ``PASIDDIRPTR`` names one) and ``fields``. Makes the root entry's
        half for ``sid`` present if needed. Returns the PASID directory's address."""
        rta = RtaddrReg.get(rtaddr, "RTA") << 12
        re_addr = rta + (sid >> 8) * ScalableRootEntry.size()
        re = self.get(ScalableRootEntry, re_addr)
        p, ctp = ("UP", "UCTP") if sid & 0x80 else ("LP", "LCTP")
        if not ScalableRootEntry.get(re, p):
            re |= ScalableRootEntry.encode({p: 1, ctp: self.alloc() >> 12})
            self.put(ScalableRootEntry, re_addr, re)
        ce_addr = (ScalableRootEntry.get(re, ctp) << 12) + (sid & 0x7F) * 32
        pdir = fields.pop("PASIDDIRPTR", None)
        pdir = self.alloc() if pdir is None else pdir
        self.put(ScalableContextEntry, ce_addr, ScalableContextEntry.encode(
            {"P": 1, "PASIDE": 1, "PASIDDIRPTR": pdir >> 12, **fields}))
        return pdir

    def context_address(self, rtaddr: int, sid: int) -> int | None:
        """Where ``sid``'s context entry lives under ``rtaddr`` (either mode), or None when the
        root entry (half) for it is not present."""
        rta = RtaddrReg.get(rtaddr, "RTA") << 12
        if RtaddrReg.get(rtaddr, "TTM") == Ttm.SCALABLE:
            re = self.get(ScalableRootEntry, rta + (sid >> 8) * 16)
            p, ctp = ("UP", "UCTP") if sid & 0x80 else ("LP", "LCTP")
            if not ScalableRootEntry.get(re, p):
                return None
            return (ScalableRootEntry.get(re, ctp) << 12) + (sid & 0x7F) * 32
        re = self.get(RootEntry, rta + (sid >> 8) * 16)
        if not re & 1:
            return None
        return (RootEntry.get(re, "CTP") << 12) + (sid & 0xFF) * 16

    # -- PASID structures (s9.5, s9.6) ------------------------------------------------------

    def pasid_dir_entry_address(self, pdir: int, pasid: int) -> int:
        """The PASID-directory entry for ``pasid`` (indexed by PASID[19:6])."""
        return pdir + (pasid >> 6) * PasidDirEntry.size()

    def pasid_entry(self, pdir: int, pasid: int, **fields: int) -> int:
        """A PASID-table entry for ``pasid``: P=1, DID=1 and ``fields`` (PGTT, AW, SSPTPTR,
        FSPTPTR, ...). Makes the directory entry present with a new table if needed. Returns
        the entry's address."""
        de_addr = self.pasid_dir_entry_address(pdir, pasid)
        de = self.get(PasidDirEntry, de_addr)
        if not de & 1:
            de = PasidDirEntry.encode({"P": 1, "SMPTBLPTR": self.alloc() >> 12})
            self.put(PasidDirEntry, de_addr, de)
        pe_addr = (PasidDirEntry.get(de, "SMPTBLPTR") << 12) + (
            pasid & 0x3F) * PasidTableEntry.size()
        self.put(PasidTableEntry, pe_addr, PasidTableEntry.encode({"P": 1, "DID": 1,
                                                                   **fields}))
        return pe_addr

    # -- paging structures (s9.7, s9.8) -----------------------------------------------------

    def ss_map(self, root: int, levels: int, iova: int, hpa: int, size: int = PAGE_4K,
               **leaf: int) -> int:
        """Map ``iova`` -> ``hpa`` with one ``size`` page in the second-stage tables at
        ``root`` (``levels`` = 3, 4 or 5). Missing tables are allocated and reached through
        R=W=X=1 entries; the leaf has R=W=1 (and PS for large pages) overridden by ``leaf``
        (e.g. ``W=0``). Returns the leaf entry's address."""
        leaf_level = _leaf_level(size)
        table = root
        for level in range(levels, leaf_level, -1):
            e_addr = table + level_index(iova, level) * 8
            e = self.get(SsPml4e, e_addr)
            if not e & 3:
                e = SsPml4e.encode({"R": 1, "W": 1, "X": 1, "ADDR": self.alloc() >> 12})
                self.put(SsPml4e, e_addr, e)
            table = e & _ADDR_51_12
        bits = {"R": 1, "W": 1, "ADDR": hpa >> (12 + 9 * (leaf_level - 1))}
        if leaf_level > 1:
            bits["PS"] = 1
        bits.update(leaf)
        e_addr = table + level_index(iova, leaf_level) * 8
        self.mem.write_u64(e_addr, _SS_LEAF[leaf_level].encode(bits))
        return e_addr

    def fs_map(self, root: int, levels: int, va: int, pa: int, size: int = PAGE_4K,
               gpa_offset: int = 0, **leaf: int) -> int:
        """Map ``va`` -> ``pa`` with one ``size`` page in the first-stage tables at ``root``
        (``levels`` = 4 or 5). Missing tables are allocated and reached through P=R/W=U/S=1
        entries; the leaf has P, R/W, U/S, A and D set (and PS for large pages), overridden by
        ``leaf``. Tables are stored at HPAs but their pointers hold ``hpa + gpa_offset`` (GPAs,
        for nested walks). Returns the leaf entry's HPA."""
        leaf_level = _leaf_level(size)
        table = root
        for level in range(levels, leaf_level, -1):
            e_addr = table + level_index(va, level) * 8
            e = self.get(FsPml4e, e_addr)
            if not e & 1:
                e = FsPml4e.encode({"P": 1, "RW": 1, "US": 1,
                                    "ADDR": (self.alloc() + gpa_offset) >> 12})
                self.put(FsPml4e, e_addr, e)
            table = (e & _ADDR_51_12) - gpa_offset
        bits = {"P": 1, "RW": 1, "US": 1, "A": 1, "D": 1,
                "ADDR": pa >> (12 + 9 * (leaf_level - 1))}
        if leaf_level > 1:
            bits["PS"] = 1
        bits.update(leaf)
        e_addr = table + level_index(va, leaf_level) * 8
        self.mem.write_u64(e_addr, _FS_LEAF[leaf_level].encode(bits))
        return e_addr

    def fs_set_ad(self, root: int, levels: int, va: int, gpa_offset: int = 0) -> None:
        """Pre-set A in every non-leaf first-stage entry on ``va``'s path (as Linux does), so
        that a walk has no accessed-flag update to make there (s3.6.2)."""
        table = root
        for level in range(levels, 1, -1):
            e_addr = table + level_index(va, level) * 8
            e = self.mem.read_u64(e_addr)
            if not e & 1 or e >> 7 & 1:
                return
            self.mem.write_u64(e_addr, e | 1 << 5)
            table = (e & _ADDR_51_12) - gpa_offset

    def entry_path(self, root: int, levels: int, address: int, *, first_stage: bool = False,
                   gpa_offset: int = 0) -> list[int]:
        """Addresses of the paging entries on ``address``'s path from ``root`` down to the
        first leaf or non-present entry (top level first): where to inject a fault."""
        present = 1 if first_stage else 3
        path: list[int] = []
        table = root
        for level in range(levels, 0, -1):
            e_addr = table + level_index(address, level) * 8
            path.append(e_addr)
            e = self.mem.read_u64(e_addr)
            if not e & present or level == 1 or (level <= 3 and e >> 7 & 1):
                break
            table = (e & _ADDR_51_12) - gpa_offset
        return path


def _leaf_level(size: int) -> int:
    try:
        return LEAF_LEVEL[size]
    except KeyError:
        raise UsageError(f"page size {size:#x} is not 4 KiB, 2 MiB or 1 GiB") from None
