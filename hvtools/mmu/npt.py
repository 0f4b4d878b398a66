"""AMD nested paging (NPT): AMD64 APM Vol. 2 s15.25 "Nested Paging".

PURE: :func:`walk` translates a guest-physical address (GPA) through the nested page tables at
nCR3 to a host-physical address (HPA) and returns a :class:`~hvtools.translation.Translation` or
a :class:`~hvtools.translation.Fault` (``kind="npf"``); it never raises for anything memory holds.

The nested tables have the host's paging format (s15.25: the host's CR4.PAE/LA57, EFER.LMA
and EFER.NXE at VMRUN select it). Only long mode is modelled, 4-level or 5-level, so the entry
formats are exactly those of :mod:`hvtools.mmu.paging` (APM Vol. 2 s5.3 and s5.4, Intel SDM
Vol. 3A Tables 4-14 to 4-20), reused here: :data:`ENTRY_FORMATS`.

The nested-walk rules (s15.25.5 "Nested Table Walk"):

- every nested access is a *user* access: each nested entry used needs U/S = 1;
- a guest page-table access (reading a guest entry, or updating its A/D flags) is checked as a
  user **write** by default (``guest_table_writes=True``). The APM text available here does not
  settle this point; QEMU 10.0.2's TCG (``ptw_translate`` probes the nested tables with
  ``MMU_DATA_STORE``) and KVM's nested-NPT walker (``nested_access = PFERR_WRITE_MASK |
  PFERR_USER_MASK`` for tables with A/D flags) both do it, so a guest under TCG sees it. With
  ``guest_table_writes=False`` table reads are checked as reads;
- the final GPA is checked with the access's own kind (read, write or fetch);
- protection keys, SMEP, SMAP and CR0.WP of the host do not apply (every access is user-mode);
  XD is honoured with the host's EFER.NXE; reserved bits are tied to the host MAXPHYADDR.

The #NPF EXITINFO1 (s15.25.6 "Nested versus Guest Page Faults, Fault Ordering") is the #PF error
code of the failed nested access (P, R/W, U/S = 1, RSV, I/D) with bit 32 set when the fault hit
the final GPA and bit 33 when it hit a guest page-table access: :class:`NptExitInfo1`.
EXITINFO2 is the faulting GPA (the fault's ``address``).

As in :mod:`~hvtools.mmu.paging`, A is set on each entry the walk passes and the leaf gets A
(and D on a write) only when the access is allowed, with ``set_ad=True``. Bits above the walk's
reach (63:48, or 63:57 with 5 levels) of a GPA are not used by the walk (QEMU's nested walk does
not check them either). ``key_bits`` (the SME C-bit, s7.10) are not reserved and are stripped
from every pointer and from the output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hvtools.addr import PAGE_4K
from hvtools.bits import BitField, BitStruct
from hvtools.errors import UsageError
from hvtools.memory.protocol import PhysMemory, WritablePhysMemory
from hvtools.mmu import paging
from hvtools.mmu.paging import (
    PAGE_SIZES,
    PDE,
    PDE2M,
    PDPTE,
    PDPTE1G,
    PML4E,
    PML5E,
    PTE,
    Access,
    AccessKind,
    EntryFlag,
    PagingMode,
)
from hvtools.translation import Fault, Permissions, Stage, Translation, WalkStep

_MASK64 = (1 << 64) - 1
_ADDR_51_12 = ((1 << 52) - 1) & ~0xFFF


class NptExitInfo1(BitStruct):
    """EXITINFO1 of a #VMEXIT(NPF), AMD64 APM Vol. 2 s15.25.6 (bits 31 and 34-36: SEV-SNP).

    Bits 5:0 are the #PF error code of the nested access (s8.4.2): RSV is a reserved bit in a
    nested entry, U/S is always 1 (nested accesses are user accesses).
    """

    FIELDS = (
        BitField("P", 0, 0, "0 = not present; 1 = protection or reserved-bit violation"),
        BitField("RW", 1, 1, "1 = the nested access was a write"),
        BitField("US", 2, 2, "1 = a user access (every nested access is)"),
        BitField("RSV", 3, 3, "1 = a reserved bit was set in a nested entry"),
        BitField("ID", 4, 4, "1 = instruction fetch (with the host's EFER.NXE = 1)"),
        BitField("SS", 6, 6, "1 = shadow-stack access (not modelled)"),
        BitField("RMP", 31, 31, "SEV-SNP: RMP check failed (not modelled)"),
        BitField("FINAL", 32, 32, "1 = the fault hit the final guest-physical address"),
        BitField("GPT", 33, 33, "1 = the fault hit a guest page-table access"),
        BitField("ENC", 34, 34, "SEV-SNP: the access was encrypted (not modelled)"),
        BitField("SIZEM", 35, 35, "SEV-SNP: RMP page-size mismatch (not modelled)"),
        BitField("VMPL", 36, 36, "SEV-SNP: VMPL permission violation (not modelled)"),
    )


_FINAL = NptExitInfo1.field("FINAL").mask
_GPT = NptExitInfo1.field("GPT").mask

#: The entry formats of the nested tables: exactly long-mode paging's (see the module docstring).
ENTRY_FORMATS: tuple[type[BitStruct], ...] = (PML5E, PML4E, PDPTE1G, PDPTE, PDE2M, PDE, PTE)
#: The name of the nested entry at each level.
ENTRY_NAMES = {level: f"NPT {name}" for level, name in paging.ENTRY_NAMES.items()}

_BIT_P, _BIT_RW, _BIT_US = EntryFlag.P, EntryFlag.RW, EntryFlag.US
_BIT_A, _BIT_D, _BIT_PS, _BIT_XD = EntryFlag.A, EntryFlag.D, EntryFlag.PS, EntryFlag.XD


def nested_mode(host: PagingMode) -> PagingMode:
    """The paging mode of the nested walk: the host's format with nothing that a user-mode
    access ignores (SMEP, SMAP, protection keys) or that does not apply (CR0.WP)."""
    return dataclasses.replace(host, smep=False, smap=False, pke=False, pks=False, wp=True,
                               pkru=0, pkrs=0)


@dataclass(frozen=True)
class NptAccess:
    """One guest-physical access: its kind, and whether it is a guest page-table access (the
    walk of the guest's own tables, EXITINFO1 bit 33) or the final GPA (bit 32)."""

    kind: AccessKind = AccessKind.READ
    guest_table: bool = False

    def __post_init__(self) -> None:
        if self.guest_table and self.kind is AccessKind.FETCH:
            raise UsageError("a guest page-table access is a read or a write, not a fetch")


NPT_READ = NptAccess(AccessKind.READ)
NPT_WRITE = NptAccess(AccessKind.WRITE)
NPT_FETCH = NptAccess(AccessKind.FETCH)
NPT_LOOKUP = NptAccess(AccessKind.LOOKUP)


def exit_info1(reason: str, mode: PagingMode, access: NptAccess, *,
               guest_table_writes: bool = True) -> int:
    """EXITINFO1 for a #NPF of ``reason`` on ``access`` (s15.25.6)."""
    kind = effective_kind(access, guest_table_writes)
    code = paging.error_code(reason, nested_mode(mode), Access(kind, user=True))
    return code | (_GPT if access.guest_table else _FINAL)


def effective_kind(access: NptAccess, guest_table_writes: bool = True) -> AccessKind:
    """The kind the nested tables check ``access`` as (guest table accesses: a write by
    default, see the module docstring)."""
    if access.guest_table and guest_table_writes and access.kind is AccessKind.READ:
        return AccessKind.WRITE
    return access.kind


def _read_entry(memory: PhysMemory, addr: int) -> int | None:
    try:
        if not memory.contains(addr, 8):
            return None
        return memory.read_u64(addr)
    except UsageError:
        return None


def walk(memory: PhysMemory, ncr3: int, mode: PagingMode, gpa: int,
         access: NptAccess = NPT_READ, *, set_ad: bool = False, key_bits: int = 0,
         guest_table_writes: bool = True) -> Translation | Fault:
    """Translate ``gpa`` through the nested tables at ``ncr3`` (APM Vol. 2 s15.25.5).

    ``mode`` is the host's paging state at VMRUN (its ``maxphyaddr``, ``la57``, ``nxe`` and
    ``page_1g`` matter). Returns a :class:`Translation` (``permissions`` of a user access:
    R/W, U/S and XD AND-ed over the levels) or a :class:`Fault` of kind ``npf`` (``code`` is
    EXITINFO1, ``address`` the GPA, i.e. EXITINFO2) or ``unbacked``.
    """
    if not 0 <= gpa <= _MASK64:
        raise UsageError(f"guest-physical address {gpa:#x} is not a 64-bit value")
    nmode = nested_mode(mode)
    kind = effective_kind(access, guest_table_writes)
    lookup = kind is AccessKind.LOOKUP
    user_access = Access(kind, user=True)
    writer: WritablePhysMemory | None = None
    if set_ad and not lookup:
        if not isinstance(memory, WritablePhysMemory):
            raise UsageError("set_ad=True needs a WritablePhysMemory")
        writer = memory
    addr_mask = (_ADDR_51_12 if lookup else nmode.addr_mask) & ~key_bits
    steps: list[WalkStep] = []

    def fault(reason: str, level: int) -> Fault:
        code = 0 if lookup else exit_info1(reason, mode, access,
                                           guest_table_writes=guest_table_writes)
        return Fault(input=gpa, kind="npf", reason=reason, code=code, level=level,
                     stage=Stage.NPT, address=gpa, steps=tuple(steps))

    table = (ncr3 & _MASK64) & addr_mask
    rw = us = True
    xd = False
    level = nmode.levels
    while True:
        addr = table + (((gpa >> (12 + 9 * (level - 1))) & 0x1FF) << 3)
        entry = _read_entry(memory, addr)
        if entry is None:
            return Fault(input=gpa, kind="unbacked", reason="table-unbacked", code=0,
                         level=level, stage=Stage.NPT, address=addr, steps=tuple(steps))
        name = ENTRY_NAMES[level]
        step = WalkStep(Stage.NPT, level, name, addr, entry)
        if not entry & _BIT_P:
            steps.append(step)
            return fault("not-present", level)
        leaf = level == 1 or (level <= 3 and bool(entry & _BIT_PS))
        if not lookup:
            if leaf and level == 3 and not nmode.page_1g:
                rsvd = int(_BIT_PS)
            else:
                rsvd = nmode.reserved_mask(paging.entry_format(level, entry)) & ~key_bits
            if entry & rsvd:
                steps.append(step)
                return fault("reserved-bit", level)
        rw = rw and bool(entry & _BIT_RW)
        us = us and bool(entry & _BIT_US)
        xd = xd or (nmode.nxe and bool(entry & _BIT_XD))
        if leaf:
            break
        new = entry | _BIT_A
        if writer is not None and new != entry:
            writer.write_u64(addr, new)
            step = WalkStep(Stage.NPT, level, name, addr, entry, new)
        steps.append(step)
        table = entry & addr_mask
        level -= 1

    perms = Permissions(read=True, write=rw, execute=not xd, user=us)
    reason = paging.denied(nmode, user_access, perms)
    if reason is not None:
        steps.append(step)
        return fault(reason, level)
    new = entry | _BIT_A | (_BIT_D if kind is AccessKind.WRITE else 0)
    if writer is not None and new != entry:
        writer.write_u64(addr, new)
        step = WalkStep(Stage.NPT, level, name, addr, entry, new)
    steps.append(step)
    size = PAGE_SIZES[level]
    hpa = (entry & addr_mask & ~(size - 1)) | (gpa & (size - 1))
    return Translation(input=gpa, output=hpa, page_size=size, permissions=perms,
                       steps=tuple(steps))


class NptBuilder(paging.TableBuilder):
    """Builds nested page tables: :class:`~hvtools.mmu.paging.TableBuilder` with the nested
    defaults (entries above a leaf P | RW | US, leaves P | RW | US: nested accesses are user
    accesses, so a nested leaf without U/S denies everything)."""

    def map(self, gva: int, gpa: int, size: int = PAGE_4K, *,
            flags: int = EntryFlag.P | EntryFlag.RW | EntryFlag.US, pkey: int = 0,
            upper: int | None = None) -> int:
        """Map guest-physical ``gva`` (the input address) to host-physical ``gpa``."""
        return super().map(gva, gpa, size, flags=flags, pkey=pkey, upper=upper)

    @property
    def ncr3(self) -> int:
        return self.root
