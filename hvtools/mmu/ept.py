"""Intel EPT (extended page tables), bit-exact: Intel SDM Vol. 3C s29.3 (s28.2 before 2022).

PURE: reads host-physical memory through :class:`~hvtools.memory.protocol.PhysMemory` and returns
values. :func:`walk` translates a guest-physical address (GPA) to a host-physical address (HPA)
and returns a :class:`~hvtools.translation.Translation` or a :class:`~hvtools.translation.Fault`;
it never raises for anything memory or the EPTP holds.

What is modelled, with its section (section names are the SDM's; numbers are those of the 2022+
editions, where EPT is s29.3 of "VMX Support for Address Translation"):

- the EPTP (s25.6.11 "Extended-Page-Table Pointer") and its VM-entry checks ("Checks on VMX
  Controls", VM-execution control fields): an EPTP that VM entry would refuse gives
  ``kind="vm-entry-failure"``, code 7 (VM-instruction error 7, "VM entry with invalid control
  field(s)"), level 0;
- 4-level and 5-level EPT (page-walk length 4 or 5), the entry formats of s29.3.2 (Tables 29-1 to
  29-6; the PML5E has the PML4E's format), 1-GByte and 2-MByte pages gated by
  IA32_VMX_EPT_VPID_CAP (Appendix A.10), reserved bits tied to MAXPHYADDR;
- EPT misconfigurations (s29.3.3.1) apart from EPT violations (s29.3.3.2), in the priority of
  s29.3.3.3: a not-present entry is a violation; a present entry is checked for misconfiguration
  before the walk goes on; access rights are checked once the leaf is reached;
- the exit qualification of an EPT violation (SDM Vol. 3C s28.2.1, Table 28-7
  "Exit Qualification for EPT Violations"), :class:`EptViolationQualification`;
- mode-based execute control (MBEC: bit 10 grants execute to user-mode linear addresses, bit 2 to
  supervisor-mode ones, and an entry with only bit 10 set is present);
- accessed and dirty flags for EPT (s29.3, "Accessed and Dirty Flags for EPT") with EPTP bit 6:
  with ``set_ad=True`` the walk writes A into every entry it uses and D into the leaf on a write,
  and processor accesses to guest paging-structure entries count as writes (s29.3.3.2: an EPT
  violation on one sets both bits 0 and 1 of the qualification).

Model choices where the SDM leaves room: an entry with A clear gets A as the walk passes it (even
when a lower level then faults), the leaf only when the access is allowed (the rule of
:mod:`hvtools.mmu.paging`); bits 63:48 (63:57 with 5 levels) of the GPA are not used by the walk
("the EPT translation mechanism uses only bits 47:0 of each guest-physical address", s29.3.2),
so they never fault here and do not reach the output. Sub-page write permissions, supervisor
shadow-stack and paging-write/guest-paging-verification checks (HLAT) are declared, not
enforced. Like :mod:`~hvtools.mmu.paging`, an entry outside the memory backing gives
``kind="unbacked"``, reason ``table-unbacked``, code 0.

Encrypted memory (MKTME KeyID bits, the SME C-bit) is the caller's ``key_bits``: bits of every
address field that name a key rather than a location; they are never reserved, and are stripped
from table pointers and from the output (the raw entries keep them, in the steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Gpa, Hpa
from hvtools.bits import BitField, BitStruct
from hvtools.errors import UsageError
from hvtools.memory.protocol import PhysMemory, WritablePhysMemory
from hvtools.mmu.paging import AccessKind
from hvtools.translation import Fault, Permissions, Stage, Translation, WalkStep

_MASK64 = (1 << 64) - 1
_ADDR_51_12 = ((1 << 52) - 1) & ~0xFFF

#: VM-instruction error number 7, "VM entry with invalid control field(s)" (SDM Vol. 3C,
#: "VM Instruction Error Numbers").
VM_ENTRY_INVALID_CONTROL = 7


class EptMemoryType(IntEnum):
    """EPT memory types (SDM Vol. 3C s29.3, "EPT and Memory Typing"); 2, 3 and 7 are reserved."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6


#: Memory types an EPT leaf may not hold (s29.3.3.1): using such a leaf is a misconfiguration.
RESERVED_MEMORY_TYPES = frozenset({2, 3, 7})


# -- the EPTP and the capability MSR ---------------------------------------------------------


class EptPointer(BitStruct):
    """The extended-page-table pointer (EPTP), SDM Vol. 3C s25.6.11. Bits 11:8 are reserved."""

    FIELDS = (
        BitField("MT", 0, 2, "EPT paging-structure memory type: 0 = UC, 6 = WB"),
        BitField("PWL", 3, 5, "EPT page-walk length minus 1: 3 = 4-level, 4 = 5-level"),
        BitField("AD", 6, 6, "Enable accessed and dirty flags for EPT"),
        BitField("SSS", 7, 7, "Enable access-rights enforcement for supervisor shadow-stack pages"),
        BitField("ADDR", 12, 51, "Physical address of the EPT PML4 (PML5) table (bits N-1:12)"),
        BitField("RSVD_63_52", 52, 63, "Reserved (must be 0)"),
    )


class EptVpidCap(BitStruct):
    """IA32_VMX_EPT_VPID_CAP (MSR 48CH), SDM Vol. 3D Appendix A.10: the EPT/VPID capabilities.

    Bits not declared here are reserved or report features this model does not use.
    """

    FIELDS = (
        BitField("XO", 0, 0, "Execute-only translations (bits 2:0 = 100b) are supported"),
        BitField("PWL4", 6, 6, "Page-walk length of 4 is supported"),
        BitField("PWL5", 7, 7, "Page-walk length of 5 is supported"),
        BitField("UC", 8, 8, "The EPTP may use memory type UC"),
        BitField("WB", 14, 14, "The EPTP may use memory type WB"),
        BitField("PDE_2M", 16, 16, "An EPT PDE may map a 2-MByte page (bit 7 = 1)"),
        BitField("PDPTE_1G", 17, 17, "An EPT PDPTE may map a 1-GByte page (bit 7 = 1)"),
        BitField("INVEPT", 20, 20, "INVEPT is supported"),
        BitField("AD", 21, 21, "Accessed and dirty flags for EPT are supported"),
        BitField("ADV_EXIT", 22, 22, "Advanced VM-exit information for EPT violations"),
        BitField("SSS", 23, 23, "Supervisor shadow-stack control is supported"),
        BitField("INVEPT_SINGLE", 25, 25, "Single-context INVEPT is supported"),
        BitField("INVEPT_ALL", 26, 26, "All-context INVEPT is supported"),
        BitField("INVVPID", 32, 32, "INVVPID is supported"),
        BitField("INVVPID_ADDR", 40, 40, "Individual-address INVVPID is supported"),
        BitField("INVVPID_SINGLE", 41, 41, "Single-context INVVPID is supported"),
        BitField("INVVPID_ALL", 42, 42, "All-context INVVPID is supported"),
        BitField("INVVPID_SINGLE_GLOBALS", 43, 43,
                 "Single-context-retaining-globals INVVPID is supported"),
    )


@dataclass(frozen=True)
class EptControls:
    """The processor's EPT capabilities and the VM-execution controls a walk depends on.

    ``maxphyaddr`` is the processor's physical-address width N (CPUID.80000008H:EAX[7:0]); the
    capability fields mirror :class:`EptVpidCap`. ``mbec`` is the secondary processor-based
    control "mode-based execute control for EPT" (bit 22); ``ve`` is "EPT-violation #VE"
    (bit 18). ``advanced_exit_info`` reports bits 9-11 of the qualification (else they are 0).
    """

    maxphyaddr: int
    mbec: bool = False
    ve: bool = False
    execute_only: bool = True
    page_2m: bool = True
    page_1g: bool = True
    pwl4: bool = True
    pwl5: bool = False
    uc: bool = True
    wb: bool = True
    ad: bool = True
    advanced_exit_info: bool = True
    sss: bool = False

    def __post_init__(self) -> None:
        if not 32 <= self.maxphyaddr <= 52:
            raise UsageError(f"MAXPHYADDR {self.maxphyaddr} is not in 32..52")

    @classmethod
    def from_capabilities(cls, cap: int, *, maxphyaddr: int, mbec: bool = False,
                          ve: bool = False) -> EptControls:
        """The controls of a processor whose IA32_VMX_EPT_VPID_CAP reads ``cap``."""
        c = EptVpidCap.decode(cap & _MASK64)
        return cls(maxphyaddr=maxphyaddr, mbec=mbec, ve=ve, execute_only=bool(c["XO"]),
                   page_2m=bool(c["PDE_2M"]), page_1g=bool(c["PDPTE_1G"]),
                   pwl4=bool(c["PWL4"]), pwl5=bool(c["PWL5"]), uc=bool(c["UC"]),
                   wb=bool(c["WB"]), ad=bool(c["AD"]), advanced_exit_info=bool(c["ADV_EXIT"]),
                   sss=bool(c["SSS"]))

    @property
    def addr_mask(self) -> int:
        """Bits N-1:12: the address bits of a table pointer."""
        return ((1 << self.maxphyaddr) - 1) & ~0xFFF

    @property
    def reserved_high(self) -> int:
        """Bits 51:N, reserved in every entry and in the EPTP."""
        return ((1 << 52) - 1) & ~((1 << self.maxphyaddr) - 1)


def eptp_problems(eptp: int, controls: EptControls) -> list[str]:
    """Why VM entry would refuse ``eptp`` (SDM Vol. 3C "Checks on VMX Controls"); [] if valid."""
    if not 0 <= eptp <= _MASK64:
        return [f"EPTP {eptp:#x} is not a 64-bit value"]
    f = EptPointer.decode(eptp)
    problems = []
    if not ((f["MT"] == EptMemoryType.UC and controls.uc)
            or (f["MT"] == EptMemoryType.WB and controls.wb)):
        problems.append(f"memory type {f['MT']} is not a supported UC/WB")
    if not ((f["PWL"] == 3 and controls.pwl4) or (f["PWL"] == 4 and controls.pwl5)):
        problems.append(f"page-walk length {f['PWL'] + 1} is not supported")
    if f["AD"] and not controls.ad:
        problems.append("accessed and dirty flags are not supported")
    if f["SSS"] and not controls.sss:
        problems.append("supervisor shadow-stack control is not supported")
    if eptp & (EptPointer.reserved_mask() | controls.reserved_high):
        problems.append("reserved bits (11:8 or 63:N) are set")
    return problems


def make_eptp(root: int, *, levels: int = 4, ad: bool = False,
              memory_type: int = EptMemoryType.WB) -> int:
    """The EPTP value for a root table at ``root`` (4-KByte aligned)."""
    if root % PAGE_4K or not 0 <= root < (1 << 52):
        raise UsageError(f"EPT root {root:#x} is not a 4-KByte aligned physical address")
    if levels not in (4, 5):
        raise UsageError(f"EPT page-walk length {levels} is not 4 or 5")
    return EptPointer.encode({"MT": memory_type, "PWL": levels - 1, "AD": int(ad),
                              "ADDR": root >> 12})


# -- paging-structure entries (SDM Vol. 3C s29.3.2) ------------------------------------------
# Bits no field declares are reserved (must be 0); bits 51:N are reserved too (added by the walk).

_R = BitField("R", 0, 0, "Read access")
_W = BitField("W", 1, 1, "Write access")
_X = BitField("X", 2, 2, "Execute access (with MBEC: for supervisor-mode linear addresses)")
_A = BitField("A", 8, 8, "Accessed, if EPTP bit 6 = 1 (else ignored)")
_XU = BitField("XU", 10, 10, "Execute access for user-mode linear addresses, if MBEC = 1 "
                             "(else ignored)")
_IGN_11 = BitField("IGN_11", 11, 11, "Ignored")
_MT = BitField("MT", 3, 5, "EPT memory type of the page (EPT and Memory Typing)")
_IPAT = BitField("IPAT", 6, 6, "Ignore PAT memory type (EPT and Memory Typing)")
_D = BitField("D", 9, 9, "Dirty, if EPTP bit 6 = 1 (else ignored)")
_VGP = BitField("VGP", 57, 57, "Verify guest paging, if that control is 1 (else ignored)")
_PWA = BitField("PWA", 58, 58, "Paging-write access, if EPT paging-write control is 1")
_SSS = BitField("SSS", 60, 60, "Supervisor shadow stack, if EPTP bit 7 = 1 (else ignored)")
_SVE = BitField("SVE", 63, 63, "Suppress #VE, if EPT-violation #VE is 1 (else ignored)")
_IGN_56_52 = BitField("IGN_56_52", 52, 56, "Ignored")
_IGN_59 = BitField("IGN_59", 59, 59, "Ignored")


class EptPml5e(BitStruct):
    """EPT PML5 entry, SDM Vol. 3C s29.3.2 (the format of Table 29-1). Bits 7:3 reserved."""

    FIELDS = (
        _R, _W, _X, _A,
        BitField("IGN_9", 9, 9, "Ignored"),
        _XU, _IGN_11,
        BitField("ADDR", 12, 51, "Physical address of the EPT PML4 table (bits N-1:12)"),
        BitField("IGN_63_52", 52, 63, "Ignored"),
    )


class EptPml4e(BitStruct):
    """EPT PML4 entry, SDM Vol. 3C s29.3.2, Table 29-1. Bits 7:3 reserved."""

    FIELDS = (
        _R, _W, _X, _A,
        BitField("IGN_9", 9, 9, "Ignored"),
        _XU, _IGN_11,
        BitField("ADDR", 12, 51, "Physical address of the EPT page-directory-pointer table"),
        BitField("IGN_63_52", 52, 63, "Ignored"),
    )


class EptPdpte1G(BitStruct):
    """EPT PDPTE that maps a 1-GByte page, SDM Vol. 3C s29.3.2, Table 29-2. Bits 29:12 reserved."""

    FIELDS = (
        _R, _W, _X, _MT, _IPAT,
        BitField("PS", 7, 7, "Must be 1: this entry maps a 1-GByte page"),
        _A, _D, _XU, _IGN_11,
        BitField("ADDR", 30, 51, "Physical address of the 1-GByte page (bits N-1:30)"),
        _IGN_56_52, _VGP, _PWA, _IGN_59, _SSS,
        BitField("IGN_62_61", 61, 62, "Ignored"),
        _SVE,
    )


class EptPdpte(BitStruct):
    """EPT PDPTE that references an EPT page directory, SDM Vol. 3C s29.3.2, Table 29-3.

    Bits 6:3 reserved; bit 7 (0 here) selects this format.
    """

    FIELDS = (
        _R, _W, _X,
        BitField("PS", 7, 7, "Page size: 0 = this entry references an EPT page directory"),
        _A,
        BitField("IGN_9", 9, 9, "Ignored"),
        _XU, _IGN_11,
        BitField("ADDR", 12, 51, "Physical address of the EPT page directory (bits N-1:12)"),
        BitField("IGN_63_52", 52, 63, "Ignored"),
    )


class EptPde2M(BitStruct):
    """EPT PDE that maps a 2-MByte page, SDM Vol. 3C s29.3.2, Table 29-4. Bits 20:12 reserved."""

    FIELDS = (
        _R, _W, _X, _MT, _IPAT,
        BitField("PS", 7, 7, "Must be 1: this entry maps a 2-MByte page"),
        _A, _D, _XU, _IGN_11,
        BitField("ADDR", 21, 51, "Physical address of the 2-MByte page (bits N-1:21)"),
        _IGN_56_52, _VGP, _PWA, _IGN_59, _SSS,
        BitField("IGN_62_61", 61, 62, "Ignored"),
        _SVE,
    )


class EptPde(BitStruct):
    """EPT PDE that references an EPT page table, SDM Vol. 3C s29.3.2, Table 29-5.

    Bits 6:3 reserved; bit 7 (0 here) selects this format.
    """

    FIELDS = (
        _R, _W, _X,
        BitField("PS", 7, 7, "Page size: 0 = this entry references an EPT page table"),
        _A,
        BitField("IGN_9", 9, 9, "Ignored"),
        _XU, _IGN_11,
        BitField("ADDR", 12, 51, "Physical address of the EPT page table (bits N-1:12)"),
        BitField("IGN_63_52", 52, 63, "Ignored"),
    )


class EptPte(BitStruct):
    """EPT page-table entry that maps a 4-KByte page, SDM Vol. 3C s29.3.2, Table 29-6."""

    FIELDS = (
        _R, _W, _X, _MT, _IPAT,
        BitField("IGN_7", 7, 7, "Ignored"),
        _A, _D, _XU, _IGN_11,
        BitField("ADDR", 12, 51, "Physical address of the 4-KByte page (bits N-1:12)"),
        _IGN_56_52, _VGP, _PWA, _IGN_59, _SSS,
        BitField("SPP", 61, 61, "Sub-page write permissions, if that control is 1"),
        BitField("IGN_62", 62, 62, "Ignored"),
        _SVE,
    )


class EptViolationQualification(BitStruct):
    """Exit qualification of an EPT violation, SDM Vol. 3C s28.2.1, Table 28-7.

    Bits 9-11 are defined only with bits 7 and 8 set and advanced VM-exit information for EPT
    violations supported (IA32_VMX_EPT_VPID_CAP bit 22); elsewhere this model reports them 0.
    """

    FIELDS = (
        BitField("READ", 0, 0, "The access was a data read"),
        BitField("WRITE", 1, 1, "The access was a data write"),
        BitField("FETCH", 2, 2, "The access was an instruction fetch"),
        BitField("READABLE", 3, 3, "AND of bit 0 of the EPT entries used (the GPA was readable)"),
        BitField("WRITABLE", 4, 4, "AND of bit 1 of the EPT entries used (writable)"),
        BitField("EXECUTABLE", 5, 5, "AND of bit 2 of the EPT entries used (with MBEC: "
                                     "executable for supervisor-mode linear addresses)"),
        BitField("USER_EXECUTABLE", 6, 6, "With MBEC: AND of bit 10 (executable for user-mode "
                                          "linear addresses); else 0"),
        BitField("GLA_VALID", 7, 7, "The guest linear-address field is valid"),
        BitField("GLA_TRANSLATED", 8, 8, "1 = the access is to the translation of a linear "
                                         "address; 0 = to a guest paging-structure entry"),
        BitField("USER_LINEAR", 9, 9, "Advanced info: the linear address is user-mode"),
        BitField("WRITABLE_LINEAR", 10, 10, "Advanced info: paging maps it read/write"),
        BitField("XD_LINEAR", 11, 11, "Advanced info: paging maps it execute-disable"),
        BitField("NMI_UNBLOCKING", 12, 12, "NMI unblocking due to IRET"),
        BitField("SHADOW_STACK", 13, 13, "The access was a shadow-stack access"),
        BitField("SSS_PAGE", 14, 14, "With EPTP bit 7: bit 60 of the leaf (supervisor shadow "
                                     "stack)"),
        BitField("GUEST_PAGING_VERIFY", 15, 15, "Caused by guest-paging verification"),
        BitField("ASYNC", 16, 16, "The access was asynchronous to instruction execution"),
    )


#: The SDM's name of the EPT entry at each level.
ENTRY_NAMES = {5: "EPT PML5E", 4: "EPT PML4E", 3: "EPT PDPTE", 2: "EPT PDE", 1: "EPT PTE"}
PAGE_SIZES = {3: PAGE_1G, 2: PAGE_2M, 1: PAGE_4K}
_TABLE_FORMAT: dict[int, type[BitStruct]] = {5: EptPml5e, 4: EptPml4e, 3: EptPdpte, 2: EptPde}
_PAGE_FORMAT: dict[int, type[BitStruct]] = {3: EptPdpte1G, 2: EptPde2M, 1: EptPte}
_STRUCT_RESERVED: dict[type[BitStruct], int] = {fmt: fmt.reserved_mask()
                    for fmt in (EptPml5e, EptPml4e, EptPdpte1G, EptPdpte, EptPde2M, EptPde,
                                EptPte)}

_BIT_R, _BIT_W, _BIT_X = _R.mask, _W.mask, _X.mask
_BIT_XU = _XU.mask
_BIT_A, _BIT_D = _A.mask, _D.mask
_BIT_PS = 1 << 7
_BIT_SVE = _SVE.mask
_Q = EptViolationQualification


class EptFlag(IntFlag):
    """Single-bit EPT entry flags, for building tables (the masks of the declared fields)."""

    R = _BIT_R
    W = _BIT_W
    X = _BIT_X
    IPAT = _IPAT.mask
    PS = _BIT_PS
    A = _BIT_A
    D = _BIT_D
    XU = _BIT_XU
    SVE = _BIT_SVE


RWX = EptFlag.R | EptFlag.W | EptFlag.X


def entry_format(level: int, entry: int) -> type[BitStruct]:
    """The struct that describes ``entry`` at ``level`` (5 = PML5E .. 1 = PTE)."""
    if level == 1:
        return EptPte
    if level in (2, 3) and entry & _BIT_PS:
        return _PAGE_FORMAT[level]
    if level not in _TABLE_FORMAT:
        raise UsageError(f"EPT level {level} is not 1..5")
    return _TABLE_FORMAT[level]


def is_present(entry: int, mbec: bool) -> bool:
    """Whether an EPT entry is present: any of bits 2:0, or bit 10 with MBEC (s29.3.2)."""
    return bool(entry & 0b111) or (mbec and bool(entry & _BIT_XU))


# -- the access ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EptAccess:
    """One guest-physical access to translate, with what its exit qualification reports.

    ``guest_paging`` marks a processor access to a guest paging-structure entry (reading it,
    ``READ``, or updating its A/D flags, ``WRITE``): qualification bit 8 is then 0, and with
    EPTP bit 6 = 1 the access counts as a write (s29.3.3.2). ``gva`` is the guest linear address
    being translated (bit 7, "guest linear-address field valid"; None for accesses that report
    none, e.g. PDPTE loads). ``linear_user`` says paging maps that linear address user-mode
    (U/S = 1 at every level): it selects bit 2 or bit 10 under MBEC for a fetch, and with
    ``linear_writable`` / ``linear_executable`` fills the advanced bits 9-11.
    """

    kind: AccessKind = AccessKind.READ
    guest_paging: bool = False
    gva: int | None = None
    linear_user: bool | None = None
    linear_writable: bool | None = None
    linear_executable: bool | None = None

    def __post_init__(self) -> None:
        if self.guest_paging and self.kind is AccessKind.FETCH:
            raise UsageError("a guest paging-structure access is a read or a write, not a fetch")
        if self.gva is not None and not 0 <= self.gva <= _MASK64:
            raise UsageError(f"linear address {self.gva:#x} is not a 64-bit value")


EPT_READ = EptAccess(AccessKind.READ)
EPT_WRITE = EptAccess(AccessKind.WRITE)
EPT_FETCH = EptAccess(AccessKind.FETCH)
EPT_LOOKUP = EptAccess(AccessKind.LOOKUP)


def _read_entry(memory: PhysMemory, addr: int) -> int | None:
    try:
        if not memory.contains(addr, 8):
            return None
        return memory.read_u64(addr)
    except UsageError:
        return None


def qualification(access: EptAccess, controls: EptControls, *, ad: bool, r: bool, w: bool,
                  x: bool, xu: bool) -> int:
    """The EPT-violation exit qualification (Table 28-7) for ``access`` when the EPT entries
    used had the AND-ed rights ``r``/``w``/``x``/``xu`` (``ad`` is EPTP bit 6)."""
    q = 0
    if access.guest_paging and ad:
        q |= _Q.field("READ").mask | _Q.field("WRITE").mask
    elif access.kind is AccessKind.WRITE:
        q |= _Q.field("WRITE").mask
    elif access.kind is AccessKind.FETCH:
        q |= _Q.field("FETCH").mask
    else:
        q |= _Q.field("READ").mask
    q |= (_Q.field("READABLE").mask if r else 0) | (_Q.field("WRITABLE").mask if w else 0)
    q |= _Q.field("EXECUTABLE").mask if x else 0
    if controls.mbec and xu:
        q |= _Q.field("USER_EXECUTABLE").mask
    if access.gva is not None:
        q |= _Q.field("GLA_VALID").mask
        if not access.guest_paging:
            q |= _Q.field("GLA_TRANSLATED").mask
            if controls.advanced_exit_info:
                q |= _Q.field("USER_LINEAR").mask if access.linear_user else 0
                q |= _Q.field("WRITABLE_LINEAR").mask if access.linear_writable else 0
                q |= (_Q.field("XD_LINEAR").mask
                      if access.linear_executable is False else 0)
    return q


def convertible_to_ve(fault: Fault, controls: EptControls) -> bool:
    """Whether an EPT violation may be delivered as a #VE (SDM Vol. 3C "Virtualization
    Exceptions"): the "EPT-violation #VE" control is 1 and the entry that caused it (the
    not-present entry or the leaf) has suppress-#VE (bit 63) clear. The #VE information area's
    busy word is not modelled."""
    if fault.kind != "ept-violation" or not controls.ve or not fault.steps:
        return False
    last = fault.steps[-1]
    return last.stage is Stage.EPT and not last.entry & _BIT_SVE


def walk(memory: PhysMemory, eptp: int, gpa: int, access: EptAccess = EPT_READ, *,
         controls: EptControls, set_ad: bool = False, key_bits: int = 0) -> Translation | Fault:
    """Translate ``gpa`` through the EPT at ``eptp`` as the processor would (SDM s29.3).

    Returns a :class:`Translation` (``output`` the HPA, ``permissions`` the AND-ed rights:
    ``read``/``write``/``execute`` from bits 0-2, ``execute_user`` from bit 10 under MBEC) or a
    :class:`Fault` of kind ``ept-violation`` (``code`` the exit qualification),
    ``ept-misconfig`` (code 0: no qualification is saved), ``vm-entry-failure`` (a bad EPTP) or
    ``unbacked``; ``address`` is the GPA. ``set_ad`` writes the A/D flags into ``memory`` (which
    must then be writable) when EPTP bit 6 is 1; the values written are in ``write_back``.
    """
    if not 0 <= gpa <= _MASK64:
        raise UsageError(f"guest-physical address {gpa:#x} is not a 64-bit value")
    lookup = access.kind is AccessKind.LOOKUP
    problems = [] if lookup else eptp_problems(eptp, controls)
    if problems:
        return Fault(input=gpa, kind="vm-entry-failure", reason="invalid EPTP: "
                     + "; ".join(problems), code=VM_ENTRY_INVALID_CONTROL, level=0,
                     stage=Stage.EPT, address=gpa)
    eptp &= _MASK64
    ad = bool(EptPointer.field("AD").get(eptp))
    writer: WritablePhysMemory | None = None
    if set_ad and ad and not lookup:
        if not isinstance(memory, WritablePhysMemory):
            raise UsageError("set_ad=True needs a WritablePhysMemory")
        writer = memory
    write = access.kind is AccessKind.WRITE or (access.guest_paging and ad)
    addr_mask = (_ADDR_51_12 if lookup else controls.addr_mask) & ~key_bits
    steps: list[WalkStep] = []
    r = w = x = xu = True

    def violation(reason: str, level: int) -> Fault:
        code = 0 if lookup else qualification(access, controls, ad=ad, r=r, w=w, x=x, xu=xu)
        return Fault(input=gpa, kind="ept-violation", reason=reason, code=code, level=level,
                     stage=Stage.EPT, address=gpa, steps=tuple(steps))

    def misconfig(reason: str, level: int) -> Fault:
        return Fault(input=gpa, kind="ept-misconfig", reason=reason, code=0, level=level,
                     stage=Stage.EPT, address=gpa, steps=tuple(steps))

    table = EptPointer.field("ADDR").mask & eptp & addr_mask
    level = EptPointer.field("PWL").get(eptp) + 1 if not lookup else (
        5 if EptPointer.field("PWL").get(eptp) == 4 else 4)
    while True:
        addr = table + (((gpa >> (12 + 9 * (level - 1))) & 0x1FF) << 3)
        entry = _read_entry(memory, addr)
        if entry is None:
            return Fault(input=gpa, kind="unbacked", reason="table-unbacked", code=0,
                         level=level, stage=Stage.EPT, address=addr, steps=tuple(steps))
        name = ENTRY_NAMES[level]
        step = WalkStep(Stage.EPT, level, name, addr, entry)
        r, w, x = r and bool(entry & _BIT_R), w and bool(entry & _BIT_W), x and bool(
            entry & _BIT_X)
        xu = xu and bool(entry & _BIT_XU)
        if not is_present(entry, controls.mbec):
            steps.append(step)
            return violation("not-present", level)
        leaf = level == 1 or (level <= 3 and bool(entry & _BIT_PS))
        if not lookup:
            reason = _misconfiguration(entry, level, leaf, controls, key_bits)
            if reason is not None:
                steps.append(step)
                return misconfig(reason, level)
        if leaf:
            break
        new = entry | _BIT_A
        if writer is not None and new != entry:
            writer.write_u64(addr, new)
            step = WalkStep(Stage.EPT, level, name, addr, entry, new)
        steps.append(step)
        table = entry & addr_mask
        level -= 1

    if not lookup:
        if write:
            allowed = w
        elif access.kind is AccessKind.FETCH:
            allowed = (xu if access.linear_user else x) if controls.mbec else x
        else:
            allowed = r
        if not allowed:
            steps.append(step)
            return violation("write-denied" if write else "execute-denied"
                             if access.kind is AccessKind.FETCH else "read-denied", level)
    new = entry | _BIT_A | (_BIT_D if write else 0)
    if writer is not None and new != entry:
        writer.write_u64(addr, new)
        step = WalkStep(Stage.EPT, level, name, addr, entry, new)
    steps.append(step)
    size = PAGE_SIZES[level]
    hpa = (entry & addr_mask & ~(size - 1)) | (gpa & (size - 1))
    perms = Permissions(read=r, write=w, execute=x, user=False,
                        execute_user=xu if controls.mbec else None)
    return Translation(input=gpa, output=hpa, page_size=size, permissions=perms,
                       steps=tuple(steps))


def _misconfiguration(entry: int, level: int, leaf: bool, controls: EptControls,
                      key_bits: int) -> str | None:
    """Why a present entry is an EPT misconfiguration (s29.3.3.1), or None."""
    rwx = entry & 0b111
    if rwx in (0b010, 0b110):
        return "write-without-read"
    if rwx == 0b100 and not controls.execute_only:
        return "execute-only-unsupported"
    if leaf and level == 3 and not controls.page_1g:
        return "reserved-bit"  # bit 7 of a PDPTE is reserved without 1-GByte page support
    if leaf and level == 2 and not controls.page_2m:
        return "reserved-bit"
    rsvd = (_STRUCT_RESERVED[entry_format(level, entry)] | controls.reserved_high) & ~key_bits
    if entry & rsvd:
        return "reserved-bit"
    if leaf and _MT.get(entry) in RESERVED_MEMORY_TYPES:
        return "memory-type"
    return None


# -- building tables -------------------------------------------------------------------------


class EptBuilder:
    """Builds 4-level or 5-level EPT structures in writable memory (tests, reference set-ups).

    Tables are taken from ``[first_table, table_limit)`` in 4-KByte steps and zeroed. Entries
    above a leaf get ``upper`` (default R | W | X | XU, so that the leaf decides the rights).
    """

    _UPPER_DEFAULT: ClassVar[int] = RWX | EptFlag.XU

    def __init__(self, memory: WritablePhysMemory, *, levels: int = 4,
                 first_table: int = 0x1000, table_limit: int | None = None) -> None:
        if levels not in (4, 5):
            raise UsageError(f"EPT page-walk length {levels} is not 4 or 5")
        if first_table % PAGE_4K:
            raise UsageError(f"first_table {first_table:#x} is not 4-KByte aligned")
        self.memory = memory
        self.levels = levels
        self._next = first_table
        self._limit = table_limit
        self.root = self.new_table()

    def eptp(self, *, ad: bool = False, memory_type: int = EptMemoryType.WB) -> int:
        """The EPTP that points at this builder's root table."""
        return make_eptp(self.root, levels=self.levels, ad=ad, memory_type=memory_type)

    def new_table(self) -> int:
        """A zeroed 4-KByte table; returns its physical address."""
        addr = self._next
        if self._limit is not None and addr + PAGE_4K > self._limit:
            raise UsageError(f"no room for another EPT table below {self._limit:#x}")
        self.memory.write(addr, bytes(PAGE_4K))
        self._next += PAGE_4K
        return addr

    def entry_address(self, gpa: int, level: int, *, upper: int | None = None) -> int:
        """Physical address of the level-``level`` entry for ``gpa``, creating tables above."""
        upper_flags = self._UPPER_DEFAULT if upper is None else upper
        table = self.root
        for lv in range(self.levels, level, -1):
            addr = table + (((gpa >> (12 + 9 * (lv - 1))) & 0x1FF) << 3)
            entry = self.memory.read_u64(addr)
            if not entry & 0b111 and not entry & _BIT_XU:
                entry = self.new_table() | upper_flags
                self.memory.write_u64(addr, entry)
            elif lv <= 3 and entry & _BIT_PS:
                raise UsageError(f"{gpa:#x} is already mapped by a large page at level {lv}")
            table = entry & _ADDR_51_12
        return table + (((gpa >> (12 + 9 * (level - 1))) & 0x1FF) << 3)

    def map(self, gpa: int, hpa: int, size: int = PAGE_4K, *, flags: int = RWX,
            memory_type: int = EptMemoryType.WB, upper: int | None = None) -> int:
        """Map one page ``gpa`` -> ``hpa``; returns the physical address of its leaf entry.

        ``flags`` are the leaf's bits (PS is added for large pages); ``memory_type`` goes in
        bits 5:3. ``hpa`` may carry key bits (a KeyID or a C-bit) above the page frame.
        """
        level = {PAGE_4K: 1, PAGE_2M: 2, PAGE_1G: 3}.get(size)
        if level is None:
            raise UsageError(f"page size {size:#x} is not 4K, 2M or 1G")
        if gpa % size or hpa % size:
            raise UsageError(f"{gpa:#x} -> {hpa:#x} is not aligned to {size:#x}")
        addr = self.entry_address(gpa, level, upper=upper)
        entry = hpa | flags | (_BIT_PS if level > 1 else 0)
        self.memory.write_u64(addr, _MT.put(entry, memory_type))
        return addr

    def set_entry(self, gpa: int, level: int, value: int) -> int:
        """Overwrite the raw entry at ``level`` for ``gpa``; returns its address."""
        addr = self.entry_address(gpa, level)
        self.memory.write_u64(addr, value & _MASK64)
        return addr


def translate(memory: PhysMemory, eptp: int, gpa: Gpa, *, controls: EptControls) -> Hpa | None:
    """The HPA ``gpa`` reads from, or None: a convenience over :func:`walk` for a data read."""
    r = walk(memory, eptp, gpa, EPT_READ, controls=controls)
    return Hpa(r.output) if isinstance(r, Translation) else None
