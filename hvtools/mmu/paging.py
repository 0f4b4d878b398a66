"""x86-64 paging (IA-32e 4-level and 5-level), bit-exact: Intel SDM Vol. 3A chapter 4.

PURE: reads guest-physical memory through :class:`~hvtools.memory.protocol.PhysMemory` and
returns values. A walk (:func:`walk`) returns a :class:`~hvtools.translation.Translation` or a
:class:`~hvtools.translation.Fault`; it never raises for anything memory holds.

What is modelled, with its section:

- the entry formats of s4.5 (Tables 4-14 to 4-20), one declarative struct per format, with
  4-KByte, 2-MByte and 1-GByte pages and reserved bits tied to MAXPHYADDR (a parameter: QEMU's
  TCG CPUs have 40 physical-address bits unless ``phys-bits`` says otherwise);
- canonical-address checks for 48-bit (4-level) and 57-bit (5-level, CR4.LA57) linear addresses
  (SDM Vol. 1 s3.3.7.1): a non-canonical address is a #GP, reported as ``general-protection``;
- access rights (s4.6): R/W, U/S, XD with IA32_EFER.NXE, CR0.WP, CR4.SMEP, CR4.SMAP with
  EFLAGS.AC and implicit supervisor-mode accesses, and protection keys (s4.6.2: CR4.PKE with
  PKRU for user-mode addresses, CR4.PKS with IA32_PKRS for supervisor-mode addresses);
- the page-fault error code (s4.7, Figure 4-12: P, W/R, U/S, RSVD, I/D, PK);
- accessed and dirty flags (s4.8): with ``set_ad=True`` the walk writes A into every entry it
  uses and D into the leaf on a write, as the processor does, and records what it wrote in
  :attr:`WalkStep.write_back`.

``AccessKind.LOOKUP`` is the debugger's view QEMU's ``gva2gpa`` gives (presence and page size
only); :func:`iter_mappings` enumerates a whole tree and :class:`TableBuilder` builds one.
The loop itself is :func:`walk_tables`, which reaches the tables through a :class:`TableAccess`:
:func:`walk` reads them as physical memory, :mod:`hvtools.mmu.nested` through a second stage.

Not modelled: legacy 32-bit and PAE paging, HLAT paging, shadow-stack accesses, SGX, LAM
(linear-address masking changes the canonicality check) and the TLBs.

Two outcomes are not page faults. A non-canonical address gives ``kind="general-protection"``
(#GP(0), level 0: no table was read). A paging-structure entry that lies outside the memory
backing (below MAXPHYADDR, so the architecture defines no fault: real hardware would read
whatever the bus returns) gives ``kind="unbacked"``, reason ``table-unbacked``, code 0, with the
level and the physical address of the entry that could not be read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import IntFlag, StrEnum
from functools import cached_property
from typing import ClassVar, NamedTuple

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Gpa, Gva
from hvtools.bits import BitField, BitStruct
from hvtools.errors import UsageError
from hvtools.memory.protocol import PhysMemory, WritablePhysMemory
from hvtools.translation import Fault, Permissions, Stage, Translation, WalkStep

# -- control registers ----------------------------------------------------------------------


class CR0(BitStruct):
    """Control register CR0, SDM Vol. 3A s2.5 (Figure 2-7): the bits that matter to paging."""

    WIDTH = 64
    FIELDS = (
        BitField("PE", 0, 0, "Protection enable"),
        BitField("MP", 1, 1, "Monitor coprocessor"),
        BitField("EM", 2, 2, "Emulation"),
        BitField("TS", 3, 3, "Task switched"),
        BitField("ET", 4, 4, "Extension type"),
        BitField("NE", 5, 5, "Numeric error"),
        BitField("WP", 16, 16, "Write protect: supervisor writes honour R/W (s4.6)"),
        BitField("AM", 18, 18, "Alignment mask"),
        BitField("NW", 29, 29, "Not write-through"),
        BitField("CD", 30, 30, "Cache disable"),
        BitField("PG", 31, 31, "Paging"),
    )


class CR3(BitStruct):
    """CR3 with 4-level and 5-level paging and CR4.PCIDE = 0, SDM Vol. 3A s4.5, Table 4-12."""

    WIDTH = 64
    FIELDS = (
        BitField("PWT", 3, 3, "Page-level write-through of the root table"),
        BitField("PCD", 4, 4, "Page-level cache disable of the root table"),
        BitField("ADDR", 12, 51, "Physical address of the PML4/PML5 table (bits M-1:12)"),
        BitField("LAM_U57", 61, 61, "LAM57 for user pointers (s4.4, not modelled)"),
        BitField("LAM_U48", 62, 62, "LAM48 for user pointers (s4.4, not modelled)"),
    )


class CR3PCID(BitStruct):
    """CR3 with 4-level and 5-level paging and CR4.PCIDE = 1, SDM Vol. 3A s4.5, Table 4-13."""

    WIDTH = 64
    FIELDS = (
        BitField("PCID", 0, 11, "Process-context identifier (s4.10.1)"),
        BitField("ADDR", 12, 51, "Physical address of the PML4/PML5 table (bits M-1:12)"),
        BitField("LAM_U57", 61, 61, "LAM57 for user pointers (s4.4, not modelled)"),
        BitField("LAM_U48", 62, 62, "LAM48 for user pointers (s4.4, not modelled)"),
    )


class CR4(BitStruct):
    """Control register CR4, SDM Vol. 3A s2.5 (Figure 2-7)."""

    WIDTH = 64
    FIELDS = (
        BitField("VME", 0, 0, "Virtual-8086 mode extensions"),
        BitField("PVI", 1, 1, "Protected-mode virtual interrupts"),
        BitField("TSD", 2, 2, "Time stamp disable"),
        BitField("DE", 3, 3, "Debugging extensions"),
        BitField("PSE", 4, 4, "Page size extensions (32-bit paging)"),
        BitField("PAE", 5, 5, "Physical address extension (required for 4/5-level paging)"),
        BitField("MCE", 6, 6, "Machine-check enable"),
        BitField("PGE", 7, 7, "Page global enable"),
        BitField("PCE", 8, 8, "Performance-monitoring counter enable"),
        BitField("OSFXSR", 9, 9, "OS support for FXSAVE/FXRSTOR"),
        BitField("OSXMMEXCPT", 10, 10, "OS support for unmasked SIMD FP exceptions"),
        BitField("UMIP", 11, 11, "User-mode instruction prevention"),
        BitField("LA57", 12, 12, "57-bit linear addresses: 5-level paging"),
        BitField("VMXE", 13, 13, "VMX enable"),
        BitField("SMXE", 14, 14, "SMX enable"),
        BitField("FSGSBASE", 16, 16, "RDFSBASE/WRFSBASE enable"),
        BitField("PCIDE", 17, 17, "PCID enable (CR3 Table 4-13)"),
        BitField("OSXSAVE", 18, 18, "XSAVE enable"),
        BitField("KL", 19, 19, "Key Locker enable"),
        BitField("SMEP", 20, 20, "Supervisor-mode execution prevention (s4.6)"),
        BitField("SMAP", 21, 21, "Supervisor-mode access prevention (s4.6)"),
        BitField("PKE", 22, 22, "Protection keys for user-mode pages (s4.6.2)"),
        BitField("CET", 23, 23, "Control-flow enforcement technology"),
        BitField("PKS", 24, 24, "Protection keys for supervisor-mode pages (s4.6.2)"),
        BitField("UINTR", 25, 25, "User interrupts enable"),
        BitField("LAM_SUP", 28, 28, "LAM for supervisor pointers (not modelled)"),
    )


class EFER(BitStruct):
    """IA32_EFER (MSR C000_0080H), SDM Vol. 3A s2.2.1 (Table 2-1); SVME from AMD APM Vol. 2."""

    WIDTH = 64
    FIELDS = (
        BitField("SCE", 0, 0, "SYSCALL enable"),
        BitField("LME", 8, 8, "IA-32e mode enable"),
        BitField("LMA", 10, 10, "IA-32e mode active"),
        BitField("NXE", 11, 11, "Execute-disable bit enable: XD is honoured, else reserved"),
        BitField("SVME", 12, 12, "Secure virtual machine enable (AMD)"),
    )


# -- paging-structure entries (SDM Vol. 3A s4.5, Figure 4-11) ---------------------------------
# Bits no field declares are reserved (must be 0). Bits 51:MAXPHYADDR of the address and, with
# IA32_EFER.NXE = 0, XD are reserved too; the walk adds those (they depend on the mode).

_P = BitField("P", 0, 0, "Present")
_RW = BitField("RW", 1, 1, "Read/write: 0 = writes not allowed to the region it controls")
_US = BitField("US", 2, 2, "User/supervisor: 0 = user-mode accesses not allowed")
_PWT = BitField("PWT", 3, 3, "Page-level write-through (s4.9)")
_PCD = BitField("PCD", 4, 4, "Page-level cache disable (s4.9)")
_A = BitField("A", 5, 5, "Accessed (s4.8)")
_XD = BitField("XD", 63, 63, "Execute-disable if IA32_EFER.NXE = 1 (else reserved)")


class PML5E(BitStruct):
    """PML5 entry that references a PML4 table, SDM Vol. 3A s4.5, Table 4-14. Bit 7 reserved."""

    FIELDS = (
        _P, _RW, _US, _PWT, _PCD, _A,
        BitField("IGN_6", 6, 6, "Ignored"),
        BitField("IGN_11_8", 8, 11, "Ignored (bit 11: HLAT restart, not modelled)"),
        BitField("ADDR", 12, 51, "Physical address of the PML4 table (bits M-1:12)"),
        BitField("IGN_62_52", 52, 62, "Ignored"),
        _XD,
    )


class PML4E(BitStruct):
    """PML4 entry that references a PDPT, SDM Vol. 3A s4.5, Table 4-15. Bit 7 (PS) reserved."""

    FIELDS = (
        _P, _RW, _US, _PWT, _PCD, _A,
        BitField("IGN_6", 6, 6, "Ignored"),
        BitField("IGN_11_8", 8, 11, "Ignored (bit 11: HLAT restart, not modelled)"),
        BitField("ADDR", 12, 51, "Physical address of the page-directory-pointer table"),
        BitField("IGN_62_52", 52, 62, "Ignored"),
        _XD,
    )


class PDPTE1G(BitStruct):
    """PDPTE that maps a 1-GByte page, SDM Vol. 3A s4.5, Table 4-16. Bits 29:13 reserved."""

    FIELDS = (
        _P, _RW, _US, _PWT, _PCD, _A,
        BitField("D", 6, 6, "Dirty (s4.8)"),
        BitField("PS", 7, 7, "Page size: 1 = this entry maps a 1-GByte page"),
        BitField("G", 8, 8, "Global (CR4.PGE)"),
        BitField("IGN_11_9", 9, 11, "Ignored (bit 11: HLAT restart, not modelled)"),
        BitField("PAT", 12, 12, "PAT memory-type index bit (s4.9.2)"),
        BitField("ADDR", 30, 51, "Physical address of the 1-GByte page (bits M-1:30)"),
        BitField("IGN_58_52", 52, 58, "Ignored"),
        BitField("PK", 59, 62, "Protection key (s4.6.2)"),
        _XD,
    )


class PDPTE(BitStruct):
    """PDPTE that references a page directory, SDM Vol. 3A s4.5, Table 4-17."""

    FIELDS = (
        _P, _RW, _US, _PWT, _PCD, _A,
        BitField("IGN_6", 6, 6, "Ignored"),
        BitField("PS", 7, 7, "Page size: 0 = this entry references a page directory"),
        BitField("IGN_11_8", 8, 11, "Ignored (bit 11: HLAT restart, not modelled)"),
        BitField("ADDR", 12, 51, "Physical address of the page directory (bits M-1:12)"),
        BitField("IGN_62_52", 52, 62, "Ignored"),
        _XD,
    )


class PDE2M(BitStruct):
    """PDE that maps a 2-MByte page, SDM Vol. 3A s4.5, Table 4-18. Bits 20:13 reserved."""

    FIELDS = (
        _P, _RW, _US, _PWT, _PCD, _A,
        BitField("D", 6, 6, "Dirty (s4.8)"),
        BitField("PS", 7, 7, "Page size: 1 = this entry maps a 2-MByte page"),
        BitField("G", 8, 8, "Global (CR4.PGE)"),
        BitField("IGN_11_9", 9, 11, "Ignored (bit 11: HLAT restart, not modelled)"),
        BitField("PAT", 12, 12, "PAT memory-type index bit (s4.9.2)"),
        BitField("ADDR", 21, 51, "Physical address of the 2-MByte page (bits M-1:21)"),
        BitField("IGN_58_52", 52, 58, "Ignored"),
        BitField("PK", 59, 62, "Protection key (s4.6.2)"),
        _XD,
    )


class PDE(BitStruct):
    """PDE that references a page table, SDM Vol. 3A s4.5, Table 4-19."""

    FIELDS = (
        _P, _RW, _US, _PWT, _PCD, _A,
        BitField("IGN_6", 6, 6, "Ignored"),
        BitField("PS", 7, 7, "Page size: 0 = this entry references a page table"),
        BitField("IGN_11_8", 8, 11, "Ignored (bit 11: HLAT restart, not modelled)"),
        BitField("ADDR", 12, 51, "Physical address of the page table (bits M-1:12)"),
        BitField("IGN_62_52", 52, 62, "Ignored"),
        _XD,
    )


class PTE(BitStruct):
    """Page-table entry that maps a 4-KByte page, SDM Vol. 3A s4.5, Table 4-20."""

    FIELDS = (
        _P, _RW, _US, _PWT, _PCD, _A,
        BitField("D", 6, 6, "Dirty (s4.8)"),
        BitField("PAT", 7, 7, "PAT memory-type index bit (s4.9.2)"),
        BitField("G", 8, 8, "Global (CR4.PGE)"),
        BitField("IGN_11_9", 9, 11, "Ignored (bit 11: HLAT restart, not modelled)"),
        BitField("ADDR", 12, 51, "Physical address of the 4-KByte page (bits M-1:12)"),
        BitField("IGN_58_52", 52, 58, "Ignored"),
        BitField("PK", 59, 62, "Protection key (s4.6.2)"),
        _XD,
    )


class PageFaultErrorCode(BitStruct):
    """The #PF error code, SDM Vol. 3A s4.7 (Figure 4-12)."""

    WIDTH = 32
    FIELDS = (
        BitField("P", 0, 0, "0 = non-present page; 1 = protection or reserved-bit violation"),
        BitField("WR", 1, 1, "1 = the access was a write"),
        BitField("US", 2, 2, "1 = a user-mode access (CPL 3, not implicit)"),
        BitField("RSVD", 3, 3, "1 = a reserved bit was set in some paging-structure entry"),
        BitField("ID", 4, 4, "1 = instruction fetch (only when NXE = 1 or SMEP = 1)"),
        BitField("PK", 5, 5, "1 = protection-key violation"),
        BitField("SS", 6, 6, "1 = shadow-stack access (not modelled)"),
        BitField("HLAT", 7, 7, "1 = HLAT paging (not modelled)"),
        BitField("SGX", 15, 15, "1 = SGX access-control violation (not modelled)"),
    )


#: The SDM's name of the entry at each level, and the page a leaf at that level maps.
ENTRY_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
PAGE_SIZES = {3: PAGE_1G, 2: PAGE_2M, 1: PAGE_4K}
#: The format of each level's entry: the table-referencing form, or (PS = 1) the page form.
_TABLE_FORMAT: dict[int, type[BitStruct]] = {5: PML5E, 4: PML4E, 3: PDPTE, 2: PDE}
_PAGE_FORMAT: dict[int, type[BitStruct]] = {3: PDPTE1G, 2: PDE2M, 1: PTE}

_STRUCT_RESERVED: dict[type[BitStruct], int] = {
    fmt: fmt.reserved_mask() for fmt in (PML5E, PML4E, PDPTE1G, PDPTE, PDE2M, PDE, PTE)}

_BIT_P = _P.mask
_BIT_RW = _RW.mask
_BIT_US = _US.mask
_BIT_A = _A.mask
_BIT_D = PTE.field("D").mask
_BIT_PS = PDE2M.field("PS").mask
_BIT_XD = _XD.mask
_ADDR_51_12 = PTE.field("ADDR").mask
_PK = PTE.field("PK")
_MASK64 = (1 << 64) - 1

_ERR_P = PageFaultErrorCode.field("P").mask
_ERR_WR = PageFaultErrorCode.field("WR").mask
_ERR_US = PageFaultErrorCode.field("US").mask
_ERR_RSVD = PageFaultErrorCode.field("RSVD").mask
_ERR_ID = PageFaultErrorCode.field("ID").mask
_ERR_PK = PageFaultErrorCode.field("PK").mask


class EntryFlag(IntFlag):
    """Single-bit entry flags, for building tables (the masks of the declared fields)."""

    P = _BIT_P
    RW = _BIT_RW
    US = _BIT_US
    PWT = _PWT.mask
    PCD = _PCD.mask
    A = _BIT_A
    D = _BIT_D
    PS = _BIT_PS
    G = PTE.field("G").mask
    XD = _BIT_XD


def entry_format(level: int, entry: int) -> type[BitStruct]:
    """The struct that describes ``entry`` at ``level`` (5 = PML5E .. 1 = PTE)."""
    if level == 1:
        return PTE
    if level in (2, 3) and entry & _BIT_PS:
        return _PAGE_FORMAT[level]
    if level not in _TABLE_FORMAT:
        raise UsageError(f"paging level {level} is not 1..5")
    return _TABLE_FORMAT[level]


def is_canonical(gva: int, la57: bool) -> bool:
    """Whether bits 63:47 (63:56 with LA57) are all equal: SDM Vol. 1 s3.3.7.1."""
    top = gva >> (56 if la57 else 47)
    return top == 0 or top == (1 << (8 if la57 else 17)) - 1


def canonical(gva: int, la57: bool) -> Gva:
    """Sign-extend a 48-bit (57-bit) linear address to 64 bits."""
    bits = 57 if la57 else 48
    gva &= (1 << bits) - 1
    if gva >> (bits - 1):
        gva |= _MASK64 ^ ((1 << bits) - 1)
    return Gva(gva)


# -- mode and access -----------------------------------------------------------------------


@dataclass(frozen=True)
class PagingMode:
    """The processor state a 4-level or 5-level walk depends on (SDM Vol. 3A s4.1.1, s4.5).

    ``maxphyaddr`` is CPUID.80000008H:EAX[7:0]; there is deliberately no default (QEMU's TCG
    CPUs report 40, a KVM guest usually its host's value). ``page_1g`` is
    CPUID.80000001H:EDX.Page1GB: without it a PDPTE with PS = 1 has a reserved bit set.
    """

    maxphyaddr: int
    la57: bool = False  # CR4.LA57
    nxe: bool = True  # IA32_EFER.NXE
    wp: bool = True  # CR0.WP
    smep: bool = False  # CR4.SMEP
    smap: bool = False  # CR4.SMAP
    pke: bool = False  # CR4.PKE
    pks: bool = False  # CR4.PKS
    pkru: int = 0  # PKRU: AD = bit 2i, WD = bit 2i+1 for key i
    pkrs: int = 0  # IA32_PKRS, same layout
    page_1g: bool = True

    def __post_init__(self) -> None:
        if not 32 <= self.maxphyaddr <= 52:
            raise UsageError(f"MAXPHYADDR {self.maxphyaddr} is not in 32..52")
        for name in ("pkru", "pkrs"):
            if not 0 <= getattr(self, name) < (1 << 32):
                raise UsageError(f"{name} {getattr(self, name):#x} does not fit in 32 bits")

    @classmethod
    def from_registers(cls, *, cr0: int, cr4: int, efer: int, maxphyaddr: int,
                       pkru: int = 0, pkrs: int = 0, page_1g: bool = True) -> PagingMode:
        """The mode of a vCPU from its control registers; it must use 4- or 5-level paging.

        4-level and 5-level paging need CR0.PG = 1, CR4.PAE = 1 and IA32_EFER.LME = 1
        (SDM Vol. 3A s4.1.1, Table 4-1); anything else is a :class:`UsageError`.
        """
        c0, c4, ef = CR0.decode(cr0 & _MASK64), CR4.decode(cr4 & _MASK64), EFER.decode(
            efer & _MASK64)
        if not (c0["PG"] and c4["PAE"] and ef["LME"]):
            raise UsageError(
                f"the vCPU does not use 4-level or 5-level paging (CR0.PG={c0['PG']}, "
                f"CR4.PAE={c4['PAE']}, EFER.LME={ef['LME']}): only IA-32e paging is modelled")
        return cls(maxphyaddr=maxphyaddr, la57=bool(c4["LA57"]), nxe=bool(ef["NXE"]),
                   wp=bool(c0["WP"]), smep=bool(c4["SMEP"]), smap=bool(c4["SMAP"]),
                   pke=bool(c4["PKE"]), pks=bool(c4["PKS"]), pkru=pkru, pkrs=pkrs,
                   page_1g=page_1g)

    @property
    def levels(self) -> int:
        return 5 if self.la57 else 4

    @property
    def va_bits(self) -> int:
        return 57 if self.la57 else 48

    @cached_property
    def addr_mask(self) -> int:
        """Bits MAXPHYADDR-1:12: the address bits of a table pointer."""
        return ((1 << self.maxphyaddr) - 1) & ~0xFFF

    @cached_property
    def reserved_high(self) -> int:
        """Bits 51:MAXPHYADDR (reserved in every entry) and XD when NXE = 0."""
        mask = ((1 << 52) - 1) & ~((1 << self.maxphyaddr) - 1)
        return mask if self.nxe else mask | _BIT_XD

    def reserved_mask(self, fmt: type[BitStruct]) -> int:
        """Every bit of ``fmt`` that must be 0 under this mode."""
        return _STRUCT_RESERVED[fmt] | self.reserved_high

    def root_table(self, cr3: int) -> int:
        """The physical address of the PML4 (PML5) table: CR3 bits M-1:12."""
        return cr3 & self.addr_mask


class AccessKind(StrEnum):
    """What a linear-address access does (SDM Vol. 3A s4.6)."""

    LOOKUP = "lookup"  # a debugger's view: no access rights, no reserved bits, no A/D
    READ = "read"
    WRITE = "write"
    FETCH = "fetch"


@dataclass(frozen=True)
class Access:
    """One access to translate: its kind and the privilege it is made with (SDM s4.6).

    ``user`` is a user-mode access (CPL 3). ``implicit`` is an implicit supervisor-mode
    access (to the GDT, IDT, TSS ... at any CPL): supervisor-mode, and SMAP blocks it whatever
    EFLAGS.AC says. ``ac`` is EFLAGS.AC for explicit supervisor-mode accesses (SMAP override).

    ``AccessKind.LOOKUP`` is what QEMU's ``gva2gpa`` and a debugger report: it follows P and
    PS only, ignores access rights and reserved bits (taking address bits 51:12 as they are)
    and never sets A/D. Its not-present fault carries error code 0.
    """

    kind: AccessKind = AccessKind.READ
    user: bool = False
    implicit: bool = False
    ac: bool = False

    def __post_init__(self) -> None:
        if self.user and self.implicit:
            raise UsageError("an implicit access is a supervisor-mode access: not user=True")

    @property
    def supervisor(self) -> bool:
        return not self.user


LOOKUP = Access(AccessKind.LOOKUP)
SUPERVISOR_READ = Access()


# -- the walk ------------------------------------------------------------------------------


def _read_entry(memory: PhysMemory, addr: int) -> int | None:
    """The 8-byte entry at ``addr``, or None when the backing does not hold it."""
    try:
        if not memory.contains(addr, 8):
            return None
        return memory.read_u64(addr)
    except UsageError:
        return None


def error_code(reason: str, mode: PagingMode, access: Access) -> int:
    """The #PF error code for a fault of ``reason`` on ``access`` (SDM s4.7, Figure 4-12)."""
    code = 0 if reason == "not-present" else _ERR_P
    if access.kind is AccessKind.WRITE:
        code |= _ERR_WR
    if access.user:
        code |= _ERR_US
    if reason == "reserved-bit":
        code |= _ERR_RSVD
    if access.kind is AccessKind.FETCH and (mode.nxe or mode.smep):
        code |= _ERR_ID
    if reason == "protection-key":
        code |= _ERR_PK
    return code


def denied(mode: PagingMode, access: Access, perms: Permissions) -> str | None:
    """Why ``access`` may not use a translation with ``perms``, or None (SDM s4.6, s4.6.2).

    When several rules deny an access the first of this order is reported: a user-mode access
    to a supervisor-mode address; protection keys (data accesses only); SMAP / SMEP; R/W; XD.
    That is the order QEMU's TCG MMU checks in, so its #PF error codes agree with the model.
    """
    kind = access.kind
    if kind is AccessKind.LOOKUP:
        return None
    user_addr = perms.user
    if access.user and not user_addr:
        return "user-supervisor"
    if kind is not AccessKind.FETCH and perms.protection_key is not None:
        keys = mode.pkru if user_addr else mode.pkrs
        ad = (keys >> (2 * perms.protection_key)) & 1
        wd = (keys >> (2 * perms.protection_key + 1)) & 1
        if ad or (kind is AccessKind.WRITE and wd and (access.user or mode.wp)):
            return "protection-key"
    smap_blocks = (user_addr and access.supervisor and mode.smap
                   and (access.implicit or not access.ac))
    if kind is AccessKind.READ:
        return "smap" if smap_blocks else None
    if kind is AccessKind.WRITE:
        if smap_blocks:
            return "smap"
        if not perms.write and (access.user or mode.wp):
            return "write-protect"
        return None
    if user_addr and access.supervisor and mode.smep:
        return "smep"
    if not perms.execute:
        return "execute-disable"
    return None


def _permissions(mode: PagingMode, rw: bool, us: bool, xd: bool, leaf: int) -> Permissions:
    keyed = (mode.pke and us) or (mode.pks and not us)
    return Permissions(read=True, write=rw, execute=not xd, user=us,
                       protection_key=_PK.get(leaf) if keyed else None)


class TableAccess:
    """How a guest walk reaches its paging structures: bare metal, and the hooks a second stage
    overrides (:mod:`hvtools.mmu.nested`, SDM Vol. 3C s29.3.1; AMD APM Vol. 2 s15.25.5).

    Here a table address is a physical address read as it is, and A/D updates are plain
    writes. A subclass may translate each table address before it is read (and stop the walk
    with a fault), gate each A/D write, and keep its own record of the references.
    """

    __slots__ = ("_steps", "key_bits", "memory", "writer")

    def __init__(self, memory: PhysMemory, writer: WritablePhysMemory | None,
                 key_bits: int = 0) -> None:
        self.memory = memory
        self.writer = writer  # None: no A/D flag is modelled
        self.key_bits = key_bits  # not reserved, stripped from every pointer and the output
        self._steps: list[WalkStep] = []

    def read_table(self, level: int, gpa: int, pointer: int) -> int | Fault:
        """The physical address to read the level-``level`` entry at ``gpa`` from, or a
        :class:`Fault` that ends the walk; ``pointer`` is the CR3 or entry that led here."""
        return gpa

    def record(self, step: WalkStep) -> None:
        """Note an entry just read (``step.address`` is where it was read from)."""
        self._steps.append(step)

    def write_entry(self, gpa: int, new: int) -> Fault | None:
        """Write ``new`` (A/D set) over the entry last read, or a :class:`Fault` that ends the
        walk instead; only called when :attr:`writer` is set."""
        assert self.writer is not None
        last = self._steps[-1]
        self.writer.write_u64(last.address, new)
        self._steps[-1] = replace(last, write_back=new)
        return None

    def steps(self) -> tuple[WalkStep, ...]:
        return tuple(self._steps)


class GuestLeaf(NamedTuple):
    """Where :func:`walk_tables` stopped, the access allowed: the leaf at ``level`` (read at
    guest-physical ``address``), the rights the walk gathered and the translated address."""

    level: int
    address: int
    entry: int
    permissions: Permissions
    output: int


def leaf_update(entry: int, access: Access) -> int:
    """The leaf entry once ``access`` used it: A set, and D on a write (SDM Vol. 3A s4.8)."""
    return entry | _BIT_A | (_BIT_D if access.kind is AccessKind.WRITE else 0)


def writer_for(memory: PhysMemory, set_ad: bool, access: Access) -> WritablePhysMemory | None:
    """The memory A/D updates go to: None when ``set_ad`` is off or for a lookup."""
    if not set_ad or access.kind is AccessKind.LOOKUP:
        return None
    if not isinstance(memory, WritablePhysMemory):
        raise UsageError("set_ad=True needs a WritablePhysMemory")
    return memory


def walk_tables(tables: TableAccess, cr3: int, mode: PagingMode, gva: int,
                access: Access) -> GuestLeaf | Fault:
    """The guest paging loop of :func:`walk` (SDM Vol. 3A s4.5-s4.8) through ``tables``: from
    the canonical check down to the leaf and its access rights. Every non-leaf entry gets A
    (when ``tables.writer`` is set); the leaf's A/D update is the caller's, as is any fault
    returned by a hook (returned as it is)."""
    if not is_canonical(gva, mode.la57):
        return Fault(input=gva, kind="general-protection", reason="non-canonical", code=0,
                     level=0, stage=Stage.GUEST, address=gva)
    lookup = access.kind is AccessKind.LOOKUP
    keys = tables.key_bits
    addr_mask = (_ADDR_51_12 if lookup else mode.addr_mask) & ~keys
    set_ad = tables.writer is not None
    pointer = cr3 & _MASK64
    table = pointer & addr_mask
    rw = us = True
    xd = False
    level = mode.levels
    memory, read_table = tables.memory, tables.read_table
    bare = type(tables) is TableAccess  # no hook calls on the hot path of :func:`walk`
    record = tables._steps.append if bare else tables.record
    while True:
        gpa = table + (((gva >> (12 + 9 * (level - 1))) & 0x1FF) << 3)
        if bare:
            addr = gpa
        else:
            hooked = read_table(level, gpa, pointer)
            if isinstance(hooked, Fault):
                return hooked
            addr = hooked
        entry = _read_entry(memory, addr)
        if entry is None:
            return Fault(input=gva, kind="unbacked", reason="table-unbacked", code=0,
                         level=level, stage=Stage.GUEST, address=addr, steps=tables.steps())
        record(WalkStep(Stage.GUEST, level, ENTRY_NAMES[level], addr, entry))
        if not entry & _BIT_P:
            reason = "not-present"
            break
        leaf = level == 1 or (level <= 3 and bool(entry & _BIT_PS))
        if not lookup:
            if leaf and level == 3 and not mode.page_1g:
                rsvd = _BIT_PS  # PS is reserved in a PDPTE without 1-GByte page support
            else:
                rsvd = mode.reserved_mask(entry_format(level, entry)) & ~keys
            if entry & rsvd:
                reason = "reserved-bit"
                break
        rw = rw and bool(entry & _BIT_RW)
        us = us and bool(entry & _BIT_US)
        xd = xd or (mode.nxe and bool(entry & _BIT_XD))
        if leaf:
            perms = _permissions(mode, rw, us, xd, entry)
            denial = denied(mode, access, perms)
            if denial is not None:
                reason = denial
                break
            size = PAGE_SIZES[level]
            return GuestLeaf(level, gpa, entry, perms,
                             (entry & addr_mask & ~(size - 1)) | (gva & (size - 1)))
        if set_ad and not entry & _BIT_A:
            stop = tables.write_entry(gpa, entry | _BIT_A)
            if stop is not None:
                return stop
        pointer = entry
        table = entry & addr_mask
        level -= 1
    return Fault(input=gva, kind="page-fault", reason=reason,
                 code=0 if lookup else error_code(reason, mode, access), level=level,
                 stage=Stage.GUEST, address=gva, steps=tables.steps())


def walk(memory: PhysMemory, cr3: int, mode: PagingMode, gva: Gva,
         access: Access = SUPERVISOR_READ, *, set_ad: bool = False) -> Translation | Fault:
    """Translate ``gva`` as the processor would (SDM Vol. 3A s4.5-s4.8).

    ``cr3`` is the register value (only bits M-1:12 are used). With ``set_ad`` the walk sets
    A in each entry it uses and D in the leaf on a write, in ``memory`` (which must then be a
    :class:`WritablePhysMemory`); the values written are in each step's ``write_back``. A
    paging-structure entry with P = 1 and no reserved bits gets its A bit as the walk passes
    it, even when a lower level then faults; the leaf only when the access is allowed.
    """
    if not 0 <= gva <= _MASK64:
        raise UsageError(f"linear address {gva:#x} is not a 64-bit value")
    tables = TableAccess(memory, writer_for(memory, set_ad, access))
    leaf = walk_tables(tables, cr3, mode, gva, access)
    if isinstance(leaf, Fault):
        return leaf
    if tables.writer is not None:
        new = leaf_update(leaf.entry, access)
        if new != leaf.entry:
            stop = tables.write_entry(leaf.address, new)
            if stop is not None:
                return stop
    return Translation(input=gva, output=leaf.output, page_size=PAGE_SIZES[leaf.level],
                       permissions=leaf.permissions, steps=tables.steps())


# -- enumerating a tree ----------------------------------------------------------------------


@dataclass(frozen=True)
class PageMapping:
    """One present leaf: ``size`` bytes of linear space at ``gva`` map ``gpa``."""

    gva: Gva
    gpa: Gpa
    size: int
    permissions: Permissions
    steps: tuple[WalkStep, ...] = ()


@dataclass
class TreeStats:
    """What :func:`iter_mappings` saw, per level (5..1) and page size."""

    tables: dict[int, int] = field(default_factory=dict)  # tables read, by level of entries
    present: dict[int, int] = field(default_factory=dict)  # entries with P = 1, by level
    reserved: dict[int, int] = field(default_factory=dict)  # present, with reserved bits
    pages: dict[int, int] = field(default_factory=dict)  # leaf mappings by page size
    unbacked: int = 0  # tables outside the memory backing

    def _bump(self, counter: dict[int, int], key: int, n: int = 1) -> None:
        counter[key] = counter.get(key, 0) + n


_UNPACK_TABLE = struct.Struct("<512Q")


def iter_mappings(memory: PhysMemory, cr3: int, mode: PagingMode, *,
                  stats: TreeStats | None = None,
                  with_steps: bool = False) -> Iterator[PageMapping]:
    """Every present leaf mapping of the tree at ``cr3``, in increasing linear address.

    An entry only counts if an access could use it: P = 1 and no reserved bits (entries with
    reserved bits are counted in ``stats.reserved`` and not followed). Tables outside the
    memory backing are counted in ``stats.unbacked``. Never raises on memory contents; a table
    referenced twice is enumerated twice (as the processor would walk it).
    """
    st = stats if stats is not None else TreeStats()
    top = mode.levels

    def visit(table: int, level: int, base: int, rw: bool, us: bool, xd: bool,
              path: tuple[WalkStep, ...]) -> Iterator[PageMapping]:
        try:
            raw = memory.read(table, PAGE_4K) if memory.contains(table, PAGE_4K) else None
        except UsageError:
            raw = None
        if raw is None:
            st.unbacked += 1
            return
        st._bump(st.tables, level)
        shift = 12 + 9 * (level - 1)
        name = ENTRY_NAMES[level]
        for idx, entry in enumerate(_UNPACK_TABLE.unpack(raw)):
            if not entry & _BIT_P:
                continue
            st._bump(st.present, level)
            leaf = level == 1 or (level <= 3 and bool(entry & _BIT_PS))
            if leaf and level == 3 and not mode.page_1g:
                rsvd = _BIT_PS
            else:
                rsvd = mode.reserved_mask(entry_format(level, entry))
            if entry & rsvd:
                st._bump(st.reserved, level)
                continue
            e_rw = rw and bool(entry & _BIT_RW)
            e_us = us and bool(entry & _BIT_US)
            e_xd = xd or (mode.nxe and bool(entry & _BIT_XD))
            gva = base | (idx << shift)
            step = (WalkStep(Stage.GUEST, level, name, table + 8 * idx, entry),) \
                if with_steps else ()
            if leaf:
                size = PAGE_SIZES[level]
                st._bump(st.pages, size)
                yield PageMapping(
                    gva=canonical(gva, mode.la57),
                    gpa=Gpa(entry & mode.addr_mask & ~(size - 1)), size=size,
                    permissions=_permissions(mode, e_rw, e_us, e_xd, entry),
                    steps=path + step)
            else:
                yield from visit(entry & mode.addr_mask, level - 1, gva, e_rw, e_us, e_xd,
                                 path + step)

    yield from visit(mode.root_table(cr3), top, 0, True, True, False, ())


@dataclass(frozen=True)
class MappedRange:
    """Adjacent leaf mappings merged: linear [gva, gva+length) maps physical [gpa, ...)."""

    gva: Gva
    gpa: Gpa
    length: int
    permissions: Permissions
    pages: tuple[tuple[int, int], ...]  # (page size, count), smallest size first

    @property
    def gva_end(self) -> int:
        return self.gva + self.length


def coalesce(mappings: Iterable[PageMapping]) -> Iterator[MappedRange]:
    """Merge mappings that are contiguous in both spaces and have equal permissions.

    ``mappings`` must come in increasing linear-address order, as :func:`iter_mappings` gives.
    """
    cur: tuple[int, int, int, Permissions, dict[int, int]] | None = None
    for m in mappings:
        if (cur is not None and cur[0] + cur[2] == m.gva and cur[1] + cur[2] == m.gpa
                and cur[3] == m.permissions):
            cur[4][m.size] = cur[4].get(m.size, 0) + 1
            cur = (cur[0], cur[1], cur[2] + m.size, cur[3], cur[4])
            continue
        if cur is not None:
            yield _range(cur)
        cur = (m.gva, m.gpa, m.size, m.permissions, {m.size: 1})
    if cur is not None:
        yield _range(cur)


def _range(cur: tuple[int, int, int, Permissions, dict[int, int]]) -> MappedRange:
    return MappedRange(gva=Gva(cur[0]), gpa=Gpa(cur[1]), length=cur[2], permissions=cur[3],
                       pages=tuple(sorted(cur[4].items())))


@dataclass(frozen=True)
class TreeSummary:
    """A tree walked end to end: its counters and its leaf mappings, coalesced."""

    cr3: int
    mode: PagingMode
    stats: TreeStats
    ranges: tuple[MappedRange, ...]

    @property
    def mapped_bytes(self) -> int:
        return sum(r.length for r in self.ranges)


def summarize(memory: PhysMemory, cr3: int, mode: PagingMode) -> TreeSummary:
    """Walk the whole tree at ``cr3`` (:func:`iter_mappings`) and coalesce its mappings."""
    stats = TreeStats()
    ranges = tuple(coalesce(iter_mappings(memory, cr3, mode, stats=stats)))
    return TreeSummary(cr3=cr3, mode=mode, stats=stats, ranges=ranges)


# -- building tables -----------------------------------------------------------------------


class TableBuilder:
    """Builds 4-level or 5-level paging structures in writable memory (tests, reference set-ups).

    Tables are taken from ``[first_table, table_limit)`` in 4-KByte steps and zeroed. Entries
    above a leaf get ``upper`` (default P | RW | US, so that the leaf decides the rights).
    """

    _UPPER_DEFAULT: ClassVar[int] = EntryFlag.P | EntryFlag.RW | EntryFlag.US

    def __init__(self, memory: WritablePhysMemory, *, la57: bool = False,
                 first_table: int = 0x1000, table_limit: int | None = None) -> None:
        if first_table % PAGE_4K:
            raise UsageError(f"first_table {first_table:#x} is not 4-KByte aligned")
        self.memory = memory
        self.la57 = la57
        self._next = first_table
        self._limit = table_limit
        self.root = self.new_table()

    @property
    def levels(self) -> int:
        return 5 if self.la57 else 4

    @property
    def cr3(self) -> int:
        return self.root

    def new_table(self) -> int:
        """A zeroed 4-KByte table; returns its physical address."""
        addr = self._next
        if self._limit is not None and addr + PAGE_4K > self._limit:
            raise UsageError(f"no room for another table below {self._limit:#x}")
        self.memory.write(addr, bytes(PAGE_4K))
        self._next += PAGE_4K
        return addr

    def entry_address(self, gva: int, level: int, *, create: bool = True,
                      upper: int | None = None) -> int:
        """Physical address of the level-``level`` entry for ``gva``, creating tables above."""
        upper_flags = self._UPPER_DEFAULT if upper is None else upper
        table = self.root
        for lv in range(self.levels, level, -1):
            addr = table + (((gva >> (12 + 9 * (lv - 1))) & 0x1FF) << 3)
            entry = self.memory.read_u64(addr)
            if not entry & _BIT_P:
                if not create:
                    raise UsageError(f"no table at level {lv - 1} for {gva:#x}")
                entry = self.new_table() | upper_flags
                self.memory.write_u64(addr, entry)
            elif lv <= 3 and entry & _BIT_PS:
                raise UsageError(f"{gva:#x} is already mapped by a large page at level {lv}")
            table = entry & _ADDR_51_12
        return table + (((gva >> (12 + 9 * (level - 1))) & 0x1FF) << 3)

    def map(self, gva: int, gpa: int, size: int = PAGE_4K, *,
            flags: int = EntryFlag.P | EntryFlag.RW, pkey: int = 0,
            upper: int | None = None) -> int:
        """Map one page; returns the physical address of its leaf entry.

        ``flags`` are the leaf's bits (PS is added for large pages); ``pkey`` goes in 62:59.
        """
        level = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}.get(size)
        if level is None:
            raise UsageError(f"page size {size:#x} is not 4K, 2M or 1G")
        if gva % size or gpa % size:
            raise UsageError(f"{gva:#x} -> {gpa:#x} is not aligned to {size:#x}")
        addr = self.entry_address(gva, level, upper=upper)
        entry = gpa | flags | (_BIT_PS if level > 1 else 0)
        entry = _PK.put(entry, pkey)
        self.memory.write_u64(addr, entry)
        return addr

    def set_entry(self, gva: int, level: int, value: int) -> int:
        """Overwrite the raw entry at ``level`` for ``gva``; returns its address."""
        addr = self.entry_address(gva, level)
        self.memory.write_u64(addr, value & _MASK64)
        return addr
