"""VT-d DMA translation (VT-d 4.x s3.4-s3.9, s7.1.3) over hand-built tables in a buffer."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Iova
from hvtools.errors import UsageError
from hvtools.iommu.build import VtdTables
from hvtools.iommu.regs import CapReg, EcapReg, IommuCaps
from hvtools.iommu.structures import (
    ContextEntry,
    FaultRecord,
    FsPml4e,
    FsPte,
    PasidDirEntry,
    PasidTableEntry,
    Pgtt,
    RootEntry,
    RtaddrReg,
    ScalableContextEntry,
    ScalableRootEntry,
    SsPml4e,
    Ttm,
    VtdStruct,
)
from hvtools.iommu.walk import (
    MODEL_NOTES,
    QEMU_NOTES,
    REASONS,
    Access,
    DmaRequest,
    FaultReason,
    WalkOptions,
    dump_tables,
    fault_record,
    format_source_id,
    is_recorded,
    parse_source_id,
    qemu_reason,
    source_id,
    translate,
)
from hvtools.memory.buffer import BufferMemory
from hvtools.translation import Fault, Outcome, Stage, Translation

R = FaultReason
SID = source_id(0, 3, 0)  # 00:03.0 = 0x18
SID_HI = source_id(2, 17, 1)  # devfn 0x89: upper half of a scalable root entry
MEM = 4 << 20


def caps(**fields: int) -> IommuCaps:
    """A capable unit: 39/48-bit SS, 2M/1G pages, every scalable-mode feature; overrides by
    CAP/ECAP field name."""
    cap = {"ND": 2, "SAGAW": 0b00110, "MGAW": 47, "SLLPS": 0b11, "FS1GP": 1, "PSI": 1}
    ecap = {"QI": 1, "DT": 1, "PT": 1, "SC": 1, "NEST": 1, "ERS": 1, "SRS": 1, "EAFS": 1,
            "PSS": 19, "PASID": 1, "SMTS": 1, "SSADS": 1, "SSTS": 1, "FSTS": 1, "SMPWCS": 1,
            "RPS": 1, "ADMS": 1, "RPRIVS": 1}
    for name, value in fields.items():
        target = cap if any(f.name == name for f in CapReg.FIELDS) else ecap
        target[name] = value
    return IommuCaps(CapReg.encode(cap), EcapReg.encode(ecap))


CAPS = caps()


#: The library's table builder over a test buffer (hvtools.iommu.build).
Tables = VtdTables[BufferMemory]


def new_tables(size: int = MEM) -> Tables:
    """A builder over a fresh ``size``-byte buffer, allocating pages upwards from 0x1000."""
    return VtdTables.in_buffer(size)


def req(address: int, access: Access = Access.READ, *, sid: int = SID,
        pasid: int | None = None, privileged: bool = False) -> DmaRequest:
    return DmaRequest(sid, Iova(address), access, pasid, privileged)


def ok(outcome: Outcome) -> Translation:
    assert isinstance(outcome, Translation), outcome
    return outcome


def fault(outcome: Outcome, reason: FaultReason) -> Fault:
    assert isinstance(outcome, Fault), outcome
    assert outcome.kind == "vtd"
    assert outcome.code == reason, f"{outcome.code:#x} {outcome.reason} != {reason!r}"
    assert outcome.reason.endswith(f"({REASONS[reason].condition})")
    return outcome


W, X = Access.WRITE, Access.EXECUTE


# ============================================================================================
# Legacy mode
# ============================================================================================


@dataclass
class Legacy:
    t: Tables
    rtaddr: int
    ss: int
    ce: int

    def go(self, request: DmaRequest, c: IommuCaps = CAPS, **opts: Any) -> Outcome:
        return translate(request, self.t.mem, self.rtaddr, c, WalkOptions(**opts))


def legacy(aw: int = 2, **ctx: int) -> Legacy:
    t = new_tables()
    rtaddr = t.legacy()
    ss = t.alloc()
    ce = t.legacy_device(rtaddr, SID, SSPTPTR=ss >> 12, AW=aw, **ctx)
    return Legacy(t, rtaddr, ss, ce)


def test_legacy_4k() -> None:
    lg = legacy()
    lg.t.ss_map(lg.ss, 4, 0x1234_5000, 0x7_6543_2000, W=0)
    tr = ok(lg.go(req(0x1234_5678)))
    assert tr.output == 0x7_6543_2678 and tr.page_size == PAGE_4K
    assert tr.permissions.read and not tr.permissions.write
    assert [(s.stage, s.level, s.table) for s in tr.steps] == [
        (Stage.VTD_ROOT, 0, "RootEntry"), (Stage.VTD_ROOT, 0, "ContextEntry"),
        (Stage.VTD_SECOND, 4, "SS-PML4E"), (Stage.VTD_SECOND, 3, "SS-PDPE"),
        (Stage.VTD_SECOND, 2, "SS-PDE"), (Stage.VTD_SECOND, 1, "SS-PTE")]
    rta = RtaddrReg.get(lg.rtaddr, "RTA") << 12
    assert tr.steps[0].address == rta and tr.steps[1].address == lg.ce
    assert tr.steps[1].address & 0xFFF == SID * 16
    # Indices: bits 47:39 = 0, 38:30 = 0, 29:21 = 0x91, 20:12 = 0x145.
    assert [s.address & 0xFFF for s in tr.steps[2:]] == [0, 0, 0x91 * 8, 0x145 * 8]
    assert tr.steps[2].address == lg.ss


def test_legacy_three_level_and_large_pages() -> None:
    lg = legacy(aw=1)
    lg.t.ss_map(lg.ss, 3, 0x4000_0000, 0x1_8000_0000, size=PAGE_1G)
    lg.t.ss_map(lg.ss, 3, 0x20_0000, 0x60_0000, size=PAGE_2M)
    tr = ok(lg.go(req(0x4123_4567, W)))
    assert (tr.output, tr.page_size) == (0x1_8123_4567, PAGE_1G)
    assert [s.table for s in tr.steps[2:]] == ["SS-PDPE(1G)"]
    tr = ok(lg.go(req(0x2A_BCDE)))
    assert (tr.output, tr.page_size) == (0x6A_BCDE, PAGE_2M)
    assert [s.table for s in tr.steps[2:]] == ["SS-PDPE", "SS-PDE(2M)"]
    # 39-bit AGAW: 2^39 and above are beyond the address width.
    fault(lg.go(req(1 << 39)), R.ADDRESS_BEYOND_AW)


def test_legacy_pass_through() -> None:
    lg = legacy(TT=2)
    tr = ok(lg.go(req(0xABCD_E123, W)))
    assert tr.output == 0xABCD_E123 and tr.permissions.write
    assert len(tr.steps) == 2
    fault(lg.go(req(1 << 48)), R.ADDRESS_BEYOND_AW)
    fault(legacy(TT=2).go(req(0x1000), caps(PT=0)), R.CONTEXT_INVALID)
    fault(lg.go(req(0xFEE0_0000, W)), R.INTERRUPT_ADDRESS)


def test_legacy_faults_root_and_context() -> None:
    t = new_tables()
    rtaddr = t.legacy()

    def go(r: DmaRequest) -> Outcome:
        return translate(r, t.mem, rtaddr, CAPS)

    f = fault(go(req(0x1000)), R.ROOT_NOT_PRESENT)
    assert f.stage is Stage.VTD_ROOT and f.level == 0 and len(f.steps) == 1
    t.legacy_device(rtaddr, source_id(0, 4, 0), SSPTPTR=t.alloc() >> 12)
    fault(go(req(0x1000)), R.CONTEXT_NOT_PRESENT)
    rta = RtaddrReg.get(rtaddr, "RTA") << 12
    t.mem.write_u64(rta, t.mem.read_u64(rta) | 1 << 5)
    fault(go(req(0x1000)), R.ROOT_RESERVED)
    t.mem.write_u64(rta, t.mem.read_u64(rta) & ~(1 << 5) | 1 << 50)  # CTP above HAW=48
    fault(go(req(0x1000)), R.ROOT_RESERVED)
    fault(translate(req(0x1000), t.mem, RtaddrReg.value(MEM, Ttm.LEGACY), CAPS),
          R.ROOT_TABLE_ACCESS)


@pytest.mark.parametrize(("fields", "reason"), [
    ({"DID": 1 << 15, "IGN_70_67": 0xF}, None),  # ignored and valid bits are fine
    ({"AW": 3}, R.CONTEXT_INVALID),  # 57-bit not in SAGAW
    ({"AW": 0}, R.CONTEXT_INVALID),
    ({"TT": 3}, R.CONTEXT_INVALID),
    ({"SSPTPTR": 1 << 40}, R.CONTEXT_RESERVED),  # pointer bit 52 >= HAW
])
def test_legacy_context_programming(fields: dict[str, int], reason: FaultReason | None
                                    ) -> None:
    lg = legacy()
    lg.t.ss_map(lg.ss, 4, 0x1000, 0x2000)
    ce = lg.t.get(ContextEntry, lg.ce)
    lg.t.put(ContextEntry, lg.ce, ce & ~ContextEntry.field("AW").mask
             | ContextEntry.encode({"AW": 2}) if "AW" not in fields else ce
             & ~ContextEntry.field("AW").mask)
    ce = lg.t.get(ContextEntry, lg.ce)
    for name, value in fields.items():
        ce = ContextEntry.field(name).put(ce, value)
    lg.t.put(ContextEntry, lg.ce, ce)
    outcome = lg.go(req(0x1000))
    if reason is None:
        ok(outcome)
    else:
        fault(outcome, reason)


def test_legacy_context_reserved_bit() -> None:
    lg = legacy()
    lg.t.put(ContextEntry, lg.ce, lg.t.get(ContextEntry, lg.ce) | 1 << 71)
    fault(lg.go(req(0x1000)), R.CONTEXT_RESERVED)
    lg.t.put(ContextEntry, lg.ce, lg.t.get(ContextEntry, lg.ce) & ~(1 << 71) | 1 << 100)
    fault(lg.go(req(0x1000)), R.CONTEXT_RESERVED)


def test_legacy_permissions() -> None:
    lg = legacy()
    lg.t.ss_map(lg.ss, 4, 0x1000, 0x5000, W=0)  # read-only
    lg.t.ss_map(lg.ss, 4, 0x2000, 0x6000, R=0)  # write-only
    lg.t.ss_map(lg.ss, 4, 0x3000, 0x7000, R=0, W=0)  # not present
    f = fault(lg.go(req(0x1010, W)), R.WRITE_DENIED)
    assert f.stage is Stage.VTD_SECOND and f.level == 1
    ok(lg.go(req(0x1010)))
    fault(lg.go(req(0x2010)), R.READ_DENIED)
    assert ok(lg.go(req(0x2010, W))).output == 0x6010
    fault(lg.go(req(0x3000)), R.READ_DENIED)
    fault(lg.go(req(0x3000, W)), R.WRITE_DENIED)
    # Read-only at an upper level denies writes below it.
    pml4e = lg.t.mem.read_u64(lg.ss)
    lg.t.mem.write_u64(lg.ss, pml4e & ~2)
    fault(lg.go(req(0x2010, W)), R.WRITE_DENIED)
    # R=W=0 at level 3 stops the walk there.
    pdpe_addr = (pml4e & ~0xFFF) & ((1 << 52) - 1)
    lg.t.mem.write_u64(pdpe_addr, lg.t.mem.read_u64(pdpe_addr) & ~3)
    f = fault(lg.go(req(0x1010)), R.READ_DENIED)
    assert f.level == 3 and len(f.steps) == 4


def test_legacy_reserved_bits() -> None:
    lg = legacy()
    leaf = lg.t.ss_map(lg.ss, 4, 0x1000, 0x5000)
    pte = lg.t.mem.read_u64(leaf)
    for bad in (1 << 62, 1 << 50):  # bit 62; an address bit above HAW=48
        lg.t.mem.write_u64(leaf, pte | bad)
        assert fault(lg.go(req(0x1000)), R.SS_RESERVED).level == 1
    lg.t.mem.write_u64(leaf, pte | 1 << 11)  # SNP: valid with ECAP.SC, reserved without
    ok(lg.go(req(0x1000)))
    fault(lg.go(req(0x1000), caps(SC=0)), R.SS_RESERVED)
    lg.t.mem.write_u64(leaf, pte | 0x3FF << 52 | 1 << 63 | 1 << 7)  # ignored bits
    ok(lg.go(req(0x1000)))
    lg.t.mem.write_u64(lg.ss, lg.t.mem.read_u64(lg.ss) | 1 << 7)  # PS in an SS-PML4E
    assert fault(lg.go(req(0x1000)), R.SS_RESERVED).level == 4
    # A large page where CAP.SLLPS does not offer it: PS is reserved.
    lg2 = legacy()
    lg2.t.ss_map(lg2.ss, 4, 0x20_0000, 0x40_0000, size=PAGE_2M)
    ok(lg2.go(req(0x20_0000)))
    assert fault(lg2.go(req(0x20_0000), caps(SLLPS=0b10)), R.SS_RESERVED).level == 2


def test_legacy_access_errors() -> None:
    lg = legacy()
    ce = lg.t.get(ContextEntry, lg.ce)
    lg.t.put(ContextEntry, lg.ce, ContextEntry.field("SSPTPTR").put(ce, (MEM + 0x1000) >> 12))
    f = fault(lg.go(req(0x1000)), R.CONTEXT_INVALID)  # LCT.4.3: SSPTPTR unreadable
    assert f.level == 4
    lg = legacy()
    lg.t.mem.write_u64(lg.ss, SsPml4e.encode({"R": 1, "W": 1, "ADDR": MEM >> 12}))
    assert fault(lg.go(req(0x1000)), R.SS_ENTRY_ACCESS).level == 3
    t = new_tables()
    rtaddr = t.legacy()
    rta = RtaddrReg.get(rtaddr, "RTA") << 12
    t.put(RootEntry, rta, RootEntry.encode({"P": 1, "CTP": MEM >> 12}))
    fault(translate(req(0x1000), t.mem, rtaddr, CAPS), R.CONTEXT_TABLE_ACCESS)


def test_legacy_interrupt_range_and_modes() -> None:
    lg = legacy()
    lg.t.ss_map(lg.ss, 4, 0x1000, 0xFEE0_0000)
    fault(lg.go(req(0x1004, W)), R.INTERRUPT_ADDRESS)
    fault(lg.go(req(0x1000, pasid=1)), R.SM_LEGACY_WITH_PASID)
    rta = RtaddrReg.get(lg.rtaddr, "RTA") << 12

    def go(ttm: Ttm, c: IommuCaps = CAPS) -> Outcome:
        return translate(req(0x1000), lg.t.mem, RtaddrReg.value(rta, ttm), c)

    fault(go(Ttm.RESERVED), R.SM_RTADDR_INVALID)
    fault(go(Ttm.ABORT_DMA), R.SM_ABORT_DMA)
    fault(go(Ttm.ABORT_DMA, caps(ADMS=0)), R.SM_RTADDR_INVALID)
    fault(go(Ttm.SCALABLE, caps(SMTS=0)), R.SM_RTADDR_INVALID)


# ============================================================================================
# Scalable mode
# ============================================================================================


@dataclass
class Sm:
    t: Tables
    rtaddr: int
    pdir: int

    def go(self, request: DmaRequest, c: IommuCaps = CAPS, **opts: Any) -> Outcome:
        return translate(request, self.t.mem, self.rtaddr, c, WalkOptions(**opts))

    def ce_addr(self, sid: int = SID) -> int:
        rta = RtaddrReg.get(self.rtaddr, "RTA") << 12
        re = self.t.get(ScalableRootEntry, rta + (sid >> 8) * 16)
        half = "UCTP" if sid & 0x80 else "LCTP"
        return (ScalableRootEntry.get(re, half) << 12) + (sid & 0x7F) * 32

    def edit_context(self, sid: int = SID, **fields: int) -> None:
        addr = self.ce_addr(sid)
        ce = self.t.get(ScalableContextEntry, addr)
        for name, value in fields.items():
            ce = ScalableContextEntry.field(name).put(ce, value)
        self.t.put(ScalableContextEntry, addr, ce)


def sm(sid: int = SID, **ctx: int) -> Sm:
    t = new_tables()
    rtaddr = t.scalable()
    return Sm(t, rtaddr, t.sm_device(rtaddr, sid, **ctx))


def sm_second(sid: int = SID, pasid: int = 0, aw: int = 2, **pe: int) -> tuple[Sm, int, int]:
    """Scalable mode, PGTT=second-stage for ``pasid``; returns (setup, SS root, PASID entry)."""
    s = sm(sid)
    ss = s.t.alloc()
    pe_addr = s.t.pasid_entry(s.pdir, pasid, PGTT=Pgtt.SECOND_STAGE, AW=aw,
                              SSPTPTR=ss >> 12, **pe)
    return s, ss, pe_addr


def sm_first(sid: int = SID, pasid: int = 0, **pe: int) -> tuple[Sm, int, int]:
    s = sm(sid)
    fs = s.t.alloc()
    pe_addr = s.t.pasid_entry(s.pdir, pasid, PGTT=Pgtt.FIRST_STAGE, FSPTPTR=fs >> 12,
                              PWSNP=1, **pe)
    return s, fs, pe_addr


def edit(t: Tables, struct: type[VtdStruct], addr: int, **fields: int) -> None:
    value = t.get(struct, addr)
    for name, v in fields.items():
        value = struct.field(name).put(value, v)
    t.put(struct, addr, value)


@pytest.mark.parametrize(("size", "iova", "hpa", "tables"), [
    (PAGE_4K, 0x7FFF_1234_5678, 0x3_0000_0678, ["SS-PML4E", "SS-PDPE", "SS-PDE", "SS-PTE"]),
    (PAGE_2M, 0x7FFF_1234_5678, 0x3_0014_5678, ["SS-PML4E", "SS-PDPE", "SS-PDE(2M)"]),
    (PAGE_1G, 0x7FFF_1234_5678, 0x3_1234_5678, ["SS-PML4E", "SS-PDPE(1G)"]),
])
def test_sm_second_stage_pages(size: int, iova: int, hpa: int, tables: list[str]) -> None:
    s, ss, _ = sm_second()
    s.t.ss_map(ss, 4, iova & ~(size - 1), 0x3_0000_0000, size=size)
    tr = ok(s.go(req(iova, W)))
    assert (tr.output, tr.page_size) == (hpa, size)
    assert [st.table for st in tr.steps] == [
        "ScalableRootEntry", "ScalableContextEntry", "PasidDirEntry", "PasidTableEntry",
        *tables]
    assert tr.permissions.write and tr.permissions.read


@pytest.mark.parametrize(("size", "va", "pa", "levels"), [
    (PAGE_4K, 0x7FFF_FFFF_F123, 0x1_2345_6123, 4),
    (PAGE_2M, 0xFFFF_8000_0030_0123, 0x1_2350_0123, 3),
    (PAGE_1G, 0xFFFF_8000_4000_0123, 0x1_4000_0123, 2),
])
def test_sm_first_stage_pages(size: int, va: int, pa: int, levels: int) -> None:
    s, fs, _ = sm_first()
    base = pa & ~(size - 1)
    s.t.fs_map(fs, 4, va & ~(size - 1), base, size=size)
    s.t.fs_set_ad(fs, 4, va)
    tr = ok(s.go(req(va, W)))
    assert (tr.output, tr.page_size) == (pa, size)
    assert len(tr.steps) == 4 + levels
    assert tr.permissions.user and tr.permissions.write


def test_sm_pass_through() -> None:
    s = sm()
    s.t.pasid_entry(s.pdir, 0, PGTT=Pgtt.PASS_THROUGH)
    tr = ok(s.go(req(0xDEAD_B000, W)))
    assert tr.output == 0xDEAD_B000 and tr.permissions.write
    fault(s.go(req(1 << 48)), R.SM_ADDRESS_BEYOND_HAW)
    fault(s.go(req(0xFEE0_1000, W)), R.SM_INTERRUPT_ADDRESS)
    fault(s.go(req(0x1000), caps(PT=0)), R.SM_PASID_ENTRY_INVALID)


def test_sm_rid_pasid_and_request_with_pasid() -> None:
    s, ss, _ = sm_second(pasid=5)
    s.edit_context(RID_PASID=5)
    s.t.ss_map(ss, 4, 0x1000, 0xA000)
    ss2 = s.t.alloc()
    s.t.pasid_entry(s.pdir, 0x47, PGTT=Pgtt.SECOND_STAGE, AW=2, SSPTPTR=ss2 >> 12)
    s.t.ss_map(ss2, 4, 0x1000, 0xB000)
    assert ok(s.go(req(0x1000))).output == 0xA000  # without PASID: RID_PASID=5
    tr = ok(s.go(req(0x1000, pasid=0x47)))
    assert tr.output == 0xB000
    # PASID 0x47: directory index 1, table index 7.
    assert tr.steps[2].address == s.pdir + 8 and tr.steps[3].address & 0xFFF == 7 * 64
    fault(s.go(req(0x1000, pasid=5)), R.SM_PASID_IS_RID_PASID)
    # Without ECAP.RPS the RID_PASID field is not used: requests without PASID use PASID 0.
    fault(s.go(req(0x1000), caps(RPS=0)), R.SM_PASID_ENTRY_NOT_PRESENT)


def test_sm_upper_context_half() -> None:
    s, ss, _ = sm_second(sid=SID_HI)
    s.t.ss_map(ss, 4, 0x1000, 0xC000)
    tr = ok(s.go(req(0x1000, sid=SID_HI)))
    assert tr.output == 0xC000
    rta = RtaddrReg.get(s.rtaddr, "RTA") << 12
    assert tr.steps[0].address == rta + 2 * 16
    re = tr.steps[0].entry
    assert ScalableRootEntry.get(re, "UP") == 1 and ScalableRootEntry.get(re, "LP") == 0
    assert tr.steps[1].address & 0xFFF == (0x89 & 0x7F) * 32
    fault(s.go(req(0x1000, sid=source_id(2, 1, 0))), R.SM_ROOT_NOT_PRESENT)


def test_sm_root_and_context_faults() -> None:
    t = new_tables()
    rtaddr = t.scalable()

    def go(r: DmaRequest) -> Outcome:
        return translate(r, t.mem, rtaddr, CAPS)

    fault(go(req(0x1000)), R.SM_ROOT_NOT_PRESENT)
    t.sm_device(rtaddr, source_id(0, 5, 0))
    fault(go(req(0x1000)), R.SM_CONTEXT_NOT_PRESENT)
    rta = RtaddrReg.get(rtaddr, "RTA") << 12
    re = t.get(ScalableRootEntry, rta)
    t.put(ScalableRootEntry, rta, re | 1 << 70)  # reserved bit of the upper half: UP=0
    fault(go(req(0x1000)), R.SM_CONTEXT_NOT_PRESENT)
    t.put(ScalableRootEntry, rta, re | 1 << 5)
    fault(go(req(0x1000)), R.SM_ROOT_RESERVED)
    fault(translate(req(0x1000), t.mem, RtaddrReg.value(MEM, Ttm.SCALABLE), CAPS),
          R.SM_ROOT_ACCESS)
    t.put(ScalableRootEntry, rta, ScalableRootEntry.encode({"LP": 1, "LCTP": MEM >> 12}))
    fault(go(req(0x1000)), R.SM_CONTEXT_ACCESS)


@pytest.mark.parametrize(("ctx", "request_", "reason"), [
    ({"P": 0}, req(0x1000), R.SM_CONTEXT_NOT_PRESENT),
    ({}, req(0x1000, pasid=1 << 13), R.SM_PASID_BEYOND_PDTS),  # PDTS=0: PASIDs < 2^13
    ({"PASIDE": 0}, req(0x1000, pasid=9), R.SM_PASIDE_CLEAR),
    ({"PRE": 1}, req(0x1000), R.SM_CONTEXT_INVALID),  # PRE=1 with DTE=0
    ({"RID_PASID": 1 << 13}, req(0x1000), R.SM_CONTEXT_INVALID),  # beyond PDTS
    ({"PDTS": 7, "RID_PASID": 1 << 13}, req(0x1000), R.SM_PASID_DIR_NOT_PRESENT),
])
def test_sm_context_checks(ctx: dict[str, int], request_: DmaRequest,
                           reason: FaultReason) -> None:
    s = sm()
    s.edit_context(**ctx)
    fault(s.go(request_), reason)


def test_sm_context_reserved_and_pss() -> None:
    s = sm()
    ce_addr = s.ce_addr()
    ce = s.t.get(ScalableContextEntry, ce_addr)
    for bit in (5, 8, 85, 200, 255):
        s.t.put(ScalableContextEntry, ce_addr, ce | 1 << bit)
        fault(s.go(req(0x1000)), R.SM_CONTEXT_RESERVED)
    s.t.put(ScalableContextEntry, ce_addr, ce | 1 << 84 | 1 << 2)  # RID_PRIV, DTE: valid
    fault(s.go(req(0x1000)), R.SM_PASID_DIR_NOT_PRESENT)
    s.t.put(ScalableContextEntry, ce_addr, ce)
    fault(s.go(req(0x1000, pasid=0x10), caps(PSS=3)), R.SM_PASID_BEYOND_PSS)
    fault(s.go(req(0x1000, pasid=0x10), caps(PASID=0)), R.SM_PASIDE_CLEAR)


def test_sm_pasid_directory_and_entry_faults() -> None:
    s = sm()
    fault(s.go(req(0x1000)), R.SM_PASID_DIR_NOT_PRESENT)
    pe_addr = s.t.pasid_entry(s.pdir, 0, P=0, PGTT=Pgtt.PASS_THROUGH)
    f = fault(s.go(req(0x1000)), R.SM_PASID_ENTRY_NOT_PRESENT)
    assert [st.table for st in f.steps][-1] == "PasidTableEntry"
    edit(s.t, PasidTableEntry, pe_addr, P=1)
    ok(s.go(req(0x1000)))
    s.t.mem.write_u64(s.pdir, s.t.mem.read_u64(s.pdir) | 1 << 4)
    fault(s.go(req(0x1000)), R.SM_PASID_DIR_RESERVED)
    s.t.mem.write_u64(s.pdir, PasidDirEntry.encode({"P": 1, "SMPTBLPTR": MEM >> 12}))
    fault(s.go(req(0x1000)), R.SM_PASID_ENTRY_ACCESS)
    s2 = sm(PASIDDIRPTR=MEM)
    fault(s2.go(req(0x1000)), R.SM_PASID_DIR_ACCESS)


@pytest.mark.parametrize("bit", [10, 11, 80, 86, 136, 139, 192, 300, 511])
def test_sm_pasid_entry_reserved(bit: int) -> None:
    s = sm()
    pe_addr = s.t.pasid_entry(s.pdir, 0, PGTT=Pgtt.PASS_THROUGH)
    s.t.put(PasidTableEntry, pe_addr, s.t.get(PasidTableEntry, pe_addr) | 1 << bit)
    fault(s.go(req(0x1000)), R.SM_PASID_ENTRY_RESERVED)


@pytest.mark.parametrize(("fields", "c"), [
    ({"PGTT": 0}, CAPS), ({"PGTT": 5}, CAPS), ({"PGTT": 7}, CAPS),
    ({"PGTT": Pgtt.NESTED, "AW": 2}, caps(NEST=0)),
    ({"PGTT": Pgtt.FIRST_STAGE}, caps(FSTS=0)),
    ({"PGTT": Pgtt.SECOND_STAGE, "AW": 2}, caps(SSTS=0)),
    ({"PGTT": Pgtt.SECOND_STAGE, "AW": 3}, CAPS),  # 57-bit not in SAGAW
    ({"PGTT": Pgtt.SECOND_STAGE, "AW": 0}, CAPS),
    ({"PGTT": Pgtt.FIRST_STAGE, "FSPM": 1}, caps(FS5LP=0)),
    ({"PGTT": Pgtt.FIRST_STAGE, "FSPM": 2}, CAPS),
    ({"PGTT": Pgtt.NESTED, "AW": 1, "FSPTPTR": 1 << 28}, CAPS),  # GPA 2^40 above 39 bits
])
def test_sm_bad_pasid_entry(fields: dict[str, int], c: IommuCaps) -> None:
    s = sm()
    s.t.pasid_entry(s.pdir, 0, **fields)
    fault(s.go(req(0x1000), c), R.SM_PASID_ENTRY_INVALID)


def test_sm_supervisor_and_execute_requests() -> None:
    s, fs, pe_addr = sm_first(pasid=3)
    s.t.fs_map(fs, 4, 0x1000, 0x9000, US=0)
    s.t.fs_set_ad(fs, 4, 0x1000)
    fault(s.go(req(0x1000, pasid=3, privileged=True)), R.SM_SRE_CLEAR)
    edit(s.t, PasidTableEntry, pe_addr, SRE=1)
    assert ok(s.go(req(0x1000, pasid=3, privileged=True))).output == 0x9000
    fault(s.go(req(0x1000, pasid=3, privileged=True), caps(SRS=0)), R.SM_SRE_CLEAR)
    fault(s.go(req(0x1000, pasid=3)), R.SM_PRIVILEGE)  # user request, U/S=0
    fault(s.go(req(0x1000, X, pasid=3, privileged=True)), R.SM_ERE_CLEAR)
    edit(s.t, PasidTableEntry, pe_addr, ERE=1)
    tr = ok(s.go(req(0x1000, X, pasid=3, privileged=True)))
    assert tr.permissions.execute
    fault(s.go(req(0x1000, X, pasid=3, privileged=True), caps(ERS=0)), R.SM_ERE_CLEAR)
    # RID_PRIV gives requests without PASID supervisor privilege (with ECAP.RPRIVS).
    s.t.pasid_entry(s.pdir, 0, PGTT=Pgtt.FIRST_STAGE, FSPTPTR=fs >> 12, PWSNP=1)
    fault(s.go(req(0x1000)), R.SM_PRIVILEGE)
    s.edit_context(RID_PRIV=1)
    fault(s.go(req(0x1000)), R.SM_SRE_CLEAR)
    fault(s.go(req(0x1000), caps(RPRIVS=0)), R.SM_PRIVILEGE)


def test_sm_first_stage_rights() -> None:
    s, fs, pe_addr = sm_first(pasid=1, SRE=1, ERE=1)
    s.t.fs_map(fs, 4, 0x1000, 0x9000, RW=0)
    s.t.fs_map(fs, 4, 0x2000, 0xA000, XD=1)
    s.t.fs_set_ad(fs, 4, 0x1000)

    def user(address: int, access: Access = Access.READ) -> DmaRequest:
        return req(address, access, pasid=1)

    def sup(address: int, access: Access = Access.READ) -> DmaRequest:
        return req(address, access, pasid=1, privileged=True)

    assert fault(s.go(user(0x1000, W)), R.SM_WRITE_DENIED).stage is Stage.VTD_FIRST
    tr = ok(s.go(sup(0x1000, W)))  # WPE=0: supervisor may write read-only pages
    assert tr.permissions.write
    edit(s.t, PasidTableEntry, pe_addr, WPE=1)
    fault(s.go(sup(0x1000, W)), R.SM_WRITE_DENIED)
    ok(s.go(user(0x2000, X)))  # NXE=0: XD ignored
    edit(s.t, PasidTableEntry, pe_addr, NXE=1)
    fault(s.go(user(0x2000, X)), R.SM_EXECUTE_DENIED)
    assert not ok(s.go(user(0x2000))).permissions.execute
    ok(s.go(sup(0x1000, X)))
    edit(s.t, PasidTableEntry, pe_addr, SMEP=1)  # supervisor execute of a user page
    fault(s.go(sup(0x1000, X)), R.SM_EXECUTE_DENIED)


def test_sm_first_stage_faults() -> None:
    s, fs, pe_addr = sm_first()
    leaf = s.t.fs_map(fs, 4, 0x1000, 0x9000)
    s.t.fs_set_ad(fs, 4, 0x1000)
    ok(s.go(req(0x1000)))
    f = fault(s.go(req(0x20_0000)), R.SM_FS_NOT_PRESENT)
    assert f.stage is Stage.VTD_FIRST and f.level == 2
    fault(s.go(req(0x8000_0000_0000)), R.SM_NON_CANONICAL)
    fault(s.go(req(0xFFFF_0000_0000_0000)), R.SM_NON_CANONICAL)
    assert fault(s.go(req(0xFFFF_8000_0000_0000)), R.SM_FS_NOT_PRESENT).level == 4
    pte = s.t.mem.read_u64(leaf)
    for bad in (1 << 51, 1 << 48):  # address bits at or above HAW=48
        s.t.mem.write_u64(leaf, pte | bad)
        assert fault(s.go(req(0x1000)), R.SM_FS_RESERVED).level == 1
    s.t.mem.write_u64(leaf, pte | 0x7FF << 52 | 1 << 8 | 1 << 9 | 1 << 11)  # ignored / G
    ok(s.go(req(0x1000)))
    s.t.mem.write_u64(fs, s.t.mem.read_u64(fs) | 1 << 7)  # PS in an FS-PML4E
    assert fault(s.go(req(0x1000)), R.SM_FS_RESERVED).level == 4
    s.t.mem.write_u64(fs, s.t.mem.read_u64(fs) & ~(1 << 7))
    edit(s.t, PasidTableEntry, pe_addr, FSPTPTR=MEM >> 12)
    assert fault(s.go(req(0x1000)), R.SM_FSPTPTR_ACCESS).level == 4
    edit(s.t, PasidTableEntry, pe_addr, FSPTPTR=fs >> 12)
    s.t.mem.write_u64(fs, FsPml4e.encode({"P": 1, "RW": 1, "US": 1, "A": 1,
                                          "ADDR": MEM >> 12}))
    assert fault(s.go(req(0x1000)), R.SM_FS_ENTRY_ACCESS).level == 3


def test_sm_first_stage_1g_needs_fs1gp() -> None:
    s, fs, _ = sm_first()
    s.t.fs_map(fs, 4, 0x4000_0000, 0x8000_0000, size=PAGE_1G)
    s.t.fs_set_ad(fs, 4, 0x4000_0000)
    ok(s.go(req(0x4000_0000)))
    assert fault(s.go(req(0x4000_0000), caps(FS1GP=0)), R.SM_FS_RESERVED).level == 3


def test_sm_first_stage_five_level() -> None:
    s, fs, _ = sm_first(FSPM=1)
    va = 0x00FF_FFFF_FFFF_F000  # canonical only with 57-bit addresses
    s.t.fs_map(fs, 5, va, 0x7000)
    s.t.fs_set_ad(fs, 5, va)
    tr = ok(s.go(req(va), caps(FS5LP=1)))
    assert tr.output == 0x7000 and tr.steps[4].table == "FS-PML5E"
    fault(s.go(req(0x0100_0000_0000_0000), caps(FS5LP=1)), R.SM_NON_CANONICAL)


def test_sm_second_stage_rights_and_faults() -> None:
    s, ss, pe_addr = sm_second()
    s.t.ss_map(ss, 4, 0x1000, 0x5000, W=0)
    s.t.ss_map(ss, 4, 0x2000, 0x6000, R=0)
    s.t.ss_map(ss, 4, 0x3000, 0x7000, R=0, W=0)
    leaf = s.t.ss_map(ss, 4, 0x4000, 0x8000)
    f = fault(s.go(req(0x1000, W)), R.SM_WRITE_DENIED)
    assert f.stage is Stage.VTD_SECOND
    fault(s.go(req(0x2000)), R.SM_READ_DENIED)
    assert fault(s.go(req(0x3000)), R.SM_SS_NOT_PRESENT).level == 1
    fault(s.go(req(1 << 48)), R.SM_ADDRESS_BEYOND_AW)
    s.t.mem.write_u64(leaf, s.t.mem.read_u64(leaf) | 1 << 62)
    fault(s.go(req(0x4000)), R.SM_SS_RESERVED)
    # Write-only above a read-only leaf: no right survives (SSS.2).
    pml4e = s.t.mem.read_u64(ss)
    s.t.mem.write_u64(ss, pml4e & ~1)
    fault(s.go(req(0x1000)), R.SM_SS_NOT_PRESENT)
    s.t.mem.write_u64(ss, pml4e)
    # Execute through the second stage follows read unless SSEE=1, which needs X.
    s2, ss2, pe2 = sm_second(pasid=2, ERE=1)
    s2.t.ss_map(ss2, 4, 0x1000, 0x5000)
    ok(s2.go(req(0x1000, X, pasid=2)))
    edit(s2.t, PasidTableEntry, pe2, SSEE=1)
    fault(s2.go(req(0x1000, X, pasid=2)), R.SM_EXECUTE_DENIED)
    edit(s.t, PasidTableEntry, pe_addr, SSPTPTR=MEM >> 12)
    fault(s.go(req(0x1000)), R.SM_SSPTPTR_ACCESS)
    edit(s.t, PasidTableEntry, pe_addr, SSPTPTR=ss >> 12)
    s.t.mem.write_u64(ss, SsPml4e.encode({"R": 1, "W": 1, "ADDR": MEM >> 12}))
    assert fault(s.go(req(0x1000)), R.SM_SS_ENTRY_ACCESS).level == 3


def test_sm_interrupt_range() -> None:
    s, ss, _ = sm_second()
    s.t.ss_map(ss, 4, 0x1000, 0xFEE0_0000)
    fault(s.go(req(0x1000)), R.SM_INTERRUPT_ADDRESS)
    s2, fs, _ = sm_first()
    s2.t.fs_map(fs, 4, 0x1000, 0xFEEF_F000)
    s2.t.fs_set_ad(fs, 4, 0x1000)
    fault(s2.go(req(0x1FFC)), R.SM_INTERRUPT_ADDRESS)


# -- A/D updates ------------------------------------------------------------------------------


def test_sm_first_stage_accessed_dirty() -> None:
    s, fs, pe_addr = sm_first(EAFE=1)
    leaf = s.t.fs_map(fs, 4, 0x1000, 0x9000, A=0, D=0)
    tr = ok(s.go(req(0x1000, W), set_ad=True))
    backs = [st.write_back for st in tr.steps if st.stage is Stage.VTD_FIRST]
    assert all(b is not None for b in backs)
    pte = s.t.mem.read_u64(leaf)
    assert pte >> 5 & 1 and pte >> 6 & 1 and pte >> 10 & 1  # A, D, EA
    assert backs[-1] == pte
    assert s.t.mem.read_u64(fs) >> 5 & 1 and not s.t.mem.read_u64(fs) >> 6 & 1
    # Nothing left to update: no write-back.
    tr = ok(s.go(req(0x1000, W), set_ad=True))
    assert all(st.write_back is None for st in tr.steps)
    # Without set_ad the walk reports the update but leaves memory alone.
    leaf2 = s.t.fs_map(fs, 4, 0x2000, 0xA000, A=0, D=0)
    tr = ok(s.go(req(0x2000)))
    assert tr.steps[-1].write_back == s.t.mem.read_u64(leaf2) | 1 << 5 | 1 << 10
    assert not s.t.mem.read_u64(leaf2) >> 5 & 1
    # Page walks that do not snoop cannot set A/D (SFS.9).
    edit(s.t, PasidTableEntry, pe_addr, PWSNP=0)
    fault(s.go(req(0x2000)), R.SM_FS_AD_NO_SNOOP)
    edit(s.t, PasidTableEntry, pe_addr, PWSNP=1)
    fault(s.go(req(0x2000), caps(SMPWCS=0)), R.SM_FS_AD_NO_SNOOP)


def test_sm_second_stage_accessed_dirty() -> None:
    s, ss, pe_addr = sm_second(SSADE=1, PWSNP=1)
    leaf = s.t.ss_map(ss, 4, 0x1000, 0x5000)
    tr = ok(s.go(req(0x1000, W), set_ad=True))
    pte = s.t.mem.read_u64(leaf)
    assert pte >> 8 & 1 and pte >> 9 & 1 and tr.steps[-1].write_back == pte
    assert s.t.mem.read_u64(ss) >> 8 & 1 and not s.t.mem.read_u64(ss) >> 9 & 1
    s.t.ss_map(ss, 4, 0x2000, 0x6000)
    edit(s.t, PasidTableEntry, pe_addr, PWSNP=0)
    fault(s.go(req(0x2000)), R.SM_SS_AD_NO_SNOOP)
    edit(s.t, PasidTableEntry, pe_addr, SSADE=0)
    tr = ok(s.go(req(0x2000)))
    assert all(st.write_back is None for st in tr.steps)


def test_set_ad_needs_writable_memory() -> None:
    class ReadOnly:
        def __init__(self, mem: BufferMemory) -> None:
            self.mem = mem

        def read(self, addr: int, size: int) -> bytes:
            return self.mem.read(addr, size)

        def read_u64(self, addr: int) -> int:
            return self.mem.read_u64(addr)

        def contains(self, addr: int, size: int = 1) -> bool:
            return self.mem.contains(addr, size)

    s, _, _ = sm_first()
    with pytest.raises(UsageError):
        translate(req(0x1000), ReadOnly(s.t.mem), s.rtaddr, CAPS, WalkOptions(set_ad=True))
    fault(translate(req(0x1000), ReadOnly(s.t.mem), s.rtaddr, CAPS), R.SM_FS_NOT_PRESENT)


# -- nested -----------------------------------------------------------------------------------

GPA_OFFSET = 0x8000_0000  # first-stage tables live at HPA h, addressed by GPA h + offset


@dataclass
class Nested:
    s: Sm
    fs: int  # HPA of the FS-PML4 table
    ss: int
    pe: int

    def go(self, request: DmaRequest, c: IommuCaps = CAPS, **opts: Any) -> Outcome:
        return self.s.go(request, c, **opts)

    def map_tables(self, **leaf: int) -> None:
        """Second-stage map every first-stage table page (GPA -> HPA)."""
        for hpa in range(self.fs, self.s.t.next, 0x1000):
            if hpa != self.ss:
                self.s.t.ss_map(self.ss, 4, hpa + GPA_OFFSET, hpa, **leaf)


def nested(**pe: int) -> Nested:
    s = sm()
    fs = s.t.alloc()
    ss = s.t.alloc()
    pe_addr = s.t.pasid_entry(s.pdir, 0, PGTT=Pgtt.NESTED, AW=2, SSPTPTR=ss >> 12,
                              FSPTPTR=(fs + GPA_OFFSET) >> 12, PWSNP=1, **pe)
    return Nested(s, fs, ss, pe_addr)


def test_nested_4k_counts_every_reference() -> None:
    n = nested()
    n.s.t.fs_map(n.fs, 4, 0x7F00_0000_1000, 0x4000_2000, gpa_offset=GPA_OFFSET)
    n.s.t.fs_set_ad(n.fs, 4, 0x7F00_0000_1000, GPA_OFFSET)
    n.s.t.ss_map(n.ss, 4, 0x4000_2000, 0x1_2300_0000)
    pages_before = n.s.t.next
    n.map_tables()
    assert n.s.t.next > pages_before  # SS tables were built for the FS pages
    tr = ok(n.go(req(0x7F00_0000_1ABC, W)))
    assert tr.output == 0x1_2300_0ABC and tr.page_size == PAGE_4K
    stages = [st.stage for st in tr.steps[4:]]
    # 4 FS entries, each preceded by a 4-level SS walk of its GPA, then the final SS walk.
    assert stages == ([Stage.VTD_SECOND] * 4 + [Stage.VTD_FIRST]) * 4 + [Stage.VTD_SECOND] * 4
    assert len(tr.steps) == 4 + 24
    fs_steps = [st for st in tr.steps if st.stage is Stage.VTD_FIRST]
    assert fs_steps[0].address == n.fs + 0xFE * 8  # at the HPA the second stage gave
    assert tr.permissions.write and tr.permissions.user


def test_nested_large_pages_give_the_smaller_size() -> None:
    n = nested()
    n.s.t.fs_map(n.fs, 4, 0x4000_0000, 0x20_0000, size=PAGE_2M,
                 gpa_offset=GPA_OFFSET)
    n.s.t.fs_set_ad(n.fs, 4, 0x4000_0000, GPA_OFFSET)
    n.s.t.ss_map(n.ss, 4, 0, 0x1_0000_0000, size=PAGE_1G)
    n.map_tables()
    tr = ok(n.go(req(0x4012_3456)))
    assert (tr.output, tr.page_size) == (0x1_0032_3456, PAGE_2M)


def test_nested_faults() -> None:
    n = nested()
    n.s.t.fs_map(n.fs, 4, 0x1000, 0x4000_2000, gpa_offset=GPA_OFFSET)
    n.s.t.fs_set_ad(n.fs, 4, 0x1000, GPA_OFFSET)
    n.s.t.ss_map(n.ss, 4, 0x4000_2000, 0x5000)
    # FS tables not mapped in the second stage yet: SS not present on the root's GPA.
    f = fault(n.go(req(0x1000)), R.SM_SS_NOT_PRESENT)
    assert f.address == n.fs + GPA_OFFSET
    n.map_tables(R=0)  # write-only
    fault(n.go(req(0x1000)), R.SM_FSPTPTR_READ_DENIED)
    n.map_tables()
    ok(n.go(req(0x1000)))
    # Make the page-directory-pointer table's page write-only in the second stage.
    pml4e = n.s.t.mem.read_u64(n.fs)
    pdpt_hpa = (pml4e & ((1 << 52) - 1) & ~0xFFF) - GPA_OFFSET
    n.s.t.ss_map(n.ss, 4, pdpt_hpa + GPA_OFFSET, pdpt_hpa, R=0)
    assert fault(n.go(req(0x1000)), R.SM_FS_READ_DENIED).level == 3
    n.s.t.ss_map(n.ss, 4, pdpt_hpa + GPA_OFFSET, pdpt_hpa, W=0)  # read-only: walk works
    ok(n.go(req(0x1000)))
    # ... but an A/D update to the PDPT entry needs second-stage write permission.
    pdpe = n.s.t.mem.read_u64(pdpt_hpa)
    n.s.t.mem.write_u64(pdpt_hpa, pdpe & ~(1 << 5))
    assert fault(n.go(req(0x1000)), R.SM_FS_AD_WRITE_DENIED).level == 3
    n.s.t.mem.write_u64(pdpt_hpa, pdpe)
    # A first-stage leaf pointing above the nested address width (SFS.5).
    # (HAW 52 so that the address is not simply a reserved bit.)
    leaf = n.s.t.fs_map(n.fs, 4, 0x3000, 1 << 48, gpa_offset=GPA_OFFSET)
    assert fault(n.go(req(0x3000), haw=52), R.SM_FS_BEYOND_AW).level == 1
    assert fault(n.go(req(0x3000)), R.SM_FS_RESERVED).level == 1
    # The final GPA not mapped / read-only in the second stage.
    n.s.t.mem.write_u64(leaf, FsPte.encode({"P": 1, "RW": 1, "US": 1, "A": 1, "D": 1,
                                            "ADDR": 0x7777}))
    f = fault(n.go(req(0x3000)), R.SM_SS_NOT_PRESENT)
    assert f.address == 0x7777000 and f.stage is Stage.VTD_SECOND
    n.s.t.ss_map(n.ss, 4, 0x7777000, 0x9000, W=0)
    fault(n.go(req(0x3000, W)), R.SM_WRITE_DENIED)
    ok(n.go(req(0x3000)))


# ============================================================================================
# Fault reporting, QEMU mapping, dumps, requests
# ============================================================================================


def test_fpd_suppresses_only_qualified_faults() -> None:
    s = sm()
    f = fault(s.go(req(0x1000)), R.SM_PASID_DIR_NOT_PRESENT)
    assert is_recorded(f)
    s.edit_context(FPD=1)
    f = fault(s.go(req(0x1000)), R.SM_PASID_DIR_NOT_PRESENT)
    assert not is_recorded(f)
    t = new_tables()
    rtaddr = t.scalable()
    assert is_recorded(fault(translate(req(0x1000), t.mem, rtaddr, CAPS),
                             R.SM_ROOT_NOT_PRESENT))  # not qualified
    s2 = sm()
    s2.t.mem.write_u64(s2.pdir, 1 << 1)  # FPD in a non-present PASID-directory entry
    assert not is_recorded(fault(s2.go(req(0x1000)), R.SM_PASID_DIR_NOT_PRESENT))


def test_fault_record() -> None:
    s, _, _ = sm_first(pasid=7)
    f = fault(s.go(req(0x12_3456, W, pasid=7)), R.SM_FS_NOT_PRESENT)
    rec = FaultRecord.decode(fault_record(req(0x12_3456, W, pasid=7), f))
    assert rec == {"FI": 0x123, "SID": SID, "T2": 0, "PRIV": 0, "EXE": 0, "PP": 1,
                   "FR": 0x71, "PV": 7, "AT": 0, "T1": 0, "F": 1}
    rec = FaultRecord.decode(fault_record(req(0x12_3456), f))
    assert rec["T1"] == 1 and rec["PP"] == 0 and rec["PV"] == 0


def test_qemu_reason_mapping() -> None:
    s, ss, _ = sm_second()
    s.t.ss_map(ss, 4, 0x1000, 0x5000, W=0)
    s.t.ss_map(ss, 4, 0x2000, 0x6000, R=0, W=0)
    f = fault(s.go(req(0x1000, W)), R.SM_WRITE_DENIED)
    assert qemu_reason(f, req(0x1000, W)) == 0x05
    f = fault(s.go(req(0x2000, W)), R.SM_SS_NOT_PRESENT)
    assert qemu_reason(f, req(0x2000, W)) == 0x05
    assert qemu_reason(f, req(0x2000)) == 0x06
    s2, fs, _ = sm_first()
    s2.t.fs_map(fs, 4, 0x1000, 0x5000, RW=0)
    s2.t.fs_set_ad(fs, 4, 0x1000)
    f = fault(s2.go(req(0x1000, W)), R.SM_WRITE_DENIED)
    assert qemu_reason(f, req(0x1000, W)) == 0x85
    t = new_tables()
    f = fault(translate(req(0x1000), t.mem, t.scalable(), CAPS), R.SM_ROOT_NOT_PRESENT)
    assert qemu_reason(f, req(0x1000)) == 0x01
    s3 = sm()
    f = fault(s3.go(req(0x1000)), R.SM_PASID_DIR_NOT_PRESENT)
    assert qemu_reason(f, req(0x1000)) == 0x51
    s3.edit_context(PRE=1)
    assert qemu_reason(fault(s3.go(req(0x1000)), R.SM_CONTEXT_INVALID), req(0x1000)) is None
    assert MODEL_NOTES and QEMU_NOTES


def test_every_reason_is_described() -> None:
    assert set(REASONS) == set(FaultReason)
    assert len({i.condition for i in REASONS.values()}) == len(REASONS)


def test_dump_tables() -> None:
    s, _, _ = sm_second(pasid=0)
    s.t.pasid_entry(s.pdir, 0x41, PGTT=Pgtt.PASS_THROUGH)
    s.t.sm_device(s.rtaddr, SID_HI)
    devices = dump_tables(s.t.mem, s.rtaddr, CAPS)
    assert [d.sid for d in devices] == [SID, SID_HI]
    assert [p for p, _, _ in devices[0].pasid_entries] == [0, 0x41]
    assert devices[0].context_fields["PASIDE"] == 1 and devices[0].scalable
    assert devices[1].pasid_entries == ()
    lg = legacy()
    devices = dump_tables(lg.t.mem, lg.rtaddr, CAPS)
    assert [(d.sid, d.context_address, d.scalable) for d in devices] == [(SID, lg.ce, False)]
    assert dump_tables(BufferMemory(0x1000), RtaddrReg.value(0x10_0000), CAPS) == []


def test_dump_tables_bounded() -> None:
    s = sm()
    for pasid in range(5):
        s.t.pasid_entry(s.pdir, pasid, PGTT=Pgtt.PASS_THROUGH)
    (device,) = dump_tables(s.t.mem, s.rtaddr, CAPS, max_pasid_entries=3)
    assert len(device.pasid_entries) == 3 and device.errors


def test_requests() -> None:
    assert DmaRequest((0, 3, 0), Iova(0)).sid == 0x18
    assert DmaRequest(0x1234, Iova(0)).bus == 0x12 and DmaRequest(0x1234, Iova(0)).devfn == 0x34
    assert parse_source_id("00:03.0") == 0x18 == parse_source_id("0000:00:03.0")
    assert parse_source_id("ff:1f.7") == 0xFFFF and format_source_id(0x89 | 2 << 8) == "02:11.1"
    for bad in ("00:20.0", "3.0", "00:03.8", "x"):
        with pytest.raises(UsageError):
            parse_source_id(bad)
    with pytest.raises(UsageError):
        DmaRequest(0x10000, Iova(0))
    with pytest.raises(UsageError):
        DmaRequest(0, Iova(-1))
    with pytest.raises(UsageError):
        DmaRequest(0, Iova(0), pasid=1 << 20)
    with pytest.raises(UsageError):
        DmaRequest(0, Iova(0), privileged=True)
    with pytest.raises(UsageError):
        DmaRequest(0, Iova(0), Access.EXECUTE)
    with pytest.raises(UsageError):
        source_id(256, 0, 0)


# ============================================================================================
# Properties
# ============================================================================================

_requests = st.builds(
    lambda sid, addr, access, pasid, priv: DmaRequest(
        sid, Iova(addr), access if pasid is not None else Access(access.replace(
            "execute", "read")), pasid, priv and pasid is not None),
    st.integers(0, 0xFFFF), st.integers(0, (1 << 64) - 1), st.sampled_from(list(Access)),
    st.none() | st.integers(0, (1 << 20) - 1), st.booleans())
_caps = st.builds(IommuCaps, st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))


def _check(outcome: Outcome) -> None:
    if isinstance(outcome, Fault):
        assert outcome.kind == "vtd" and outcome.code in set(FaultReason)
    else:
        assert isinstance(outcome, Translation) and outcome.steps


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=1 << 14), rtaddr=st.integers(0, (1 << 64) - 1),
       request=_requests, c=_caps | st.just(CAPS), set_ad=st.booleans())
def test_never_raises_on_random_bytes(data: bytes, rtaddr: int, request: DmaRequest,
                                      c: IommuCaps, set_ad: bool) -> None:
    mem = BufferMemory(data or b"\0")
    _check(translate(request, mem, rtaddr, c, WalkOptions(set_ad=set_ad)))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, (1 << 64) - 1),
       rta_page=st.integers(0, 3), ttm=st.integers(0, 3), request=_requests,
       c=_caps | st.just(CAPS), haw=st.none() | st.integers(0, 70))
def test_never_raises_on_random_tables(seed: int, rta_page: int, ttm: int,
                                       request: DmaRequest, c: IommuCaps, haw: int | None
                                       ) -> None:
    """Random 16 KiB of entries whose pointers all land inside the buffer, so walks go deep
    (the bytes come from a seeded PRNG: Hypothesis cannot draw 16 KiB directly)."""
    rng = random.Random(seed)
    keep = ~(((1 << 52) - 1) & ~((1 << 14) - 1))  # clear address bits 51:14
    data = b"".join((rng.getrandbits(64) & keep).to_bytes(8, "little") for _ in range(2048))
    mem = BufferMemory(data)
    small = DmaRequest(request.sid & 0x00FF, Iova(request.address & 0x3FFF_FFFF),
                       request.access, None if request.pasid is None else request.pasid & 0x7F,
                       request.privileged)
    rtaddr = RtaddrReg.value(rta_page << 12, ttm)
    for r in (request, small):
        _check(translate(r, mem, rtaddr, c, WalkOptions(haw=haw, set_ad=True)))
        _check(translate(r, mem, rtaddr, c))


@settings(max_examples=50, deadline=None)
@given(mapping=st.dictionaries(st.integers(0, (1 << 27) - 1), st.integers(1, (1 << 36) - 1),
                               max_size=12),
       probes=st.lists(st.integers(0, (1 << 27) - 1), max_size=8))
def test_second_stage_agrees_with_its_mapping(mapping: dict[int, int], probes: list[int]
                                              ) -> None:
    """Legacy 4-level, 4 KiB pages: mapped pages translate, the rest fault not-present."""
    lg = legacy()
    for page, frame in mapping.items():
        lg.t.ss_map(lg.ss, 4, page << 12, frame << 12)
    for page in [*mapping, *probes]:
        outcome = lg.go(req(page << 12 | 0x123))
        if page in mapping:
            assert ok(outcome).output == mapping[page] << 12 | 0x123
        else:
            fault(outcome, R.READ_DENIED)


def _valid_setup(kind: str) -> tuple[Tables, int, DmaRequest]:
    """A working configuration of each kind, translating 0x1000 (or a 4-level FS address)."""
    if kind == "legacy":
        lg = legacy()
        lg.t.ss_map(lg.ss, 4, 0x1000, 0x5000)
        return lg.t, lg.rtaddr, req(0x1000, W)
    if kind == "second":
        s, ss, _ = sm_second(SSADE=1, PWSNP=1)
        s.t.ss_map(ss, 4, 0x1000, 0x5000)
        return s.t, s.rtaddr, req(0x1000, W)
    if kind == "first":
        s, fs, _ = sm_first(pasid=9, SRE=1, EAFE=1)
        s.t.fs_map(fs, 4, 0x1000, 0x5000, A=0)
        return s.t, s.rtaddr, req(0x1000, W, pasid=9, privileged=True)
    if kind == "nested":
        n = nested(SSADE=1)
        n.s.t.fs_map(n.fs, 4, 0x1000, 0x4000_2000, gpa_offset=GPA_OFFSET)
        n.s.t.ss_map(n.ss, 4, 0x4000_2000, 0x5000)
        n.map_tables()
        return n.s.t, n.s.rtaddr, req(0x1000, W)
    s = sm()
    s.t.pasid_entry(s.pdir, 0, PGTT=Pgtt.PASS_THROUGH)
    return s.t, s.rtaddr, req(0x1000, W)


@pytest.mark.parametrize("kind", ["legacy", "second", "first", "nested", "pass-through"])
def test_valid_setups_translate(kind: str) -> None:
    t, rtaddr, request = _valid_setup(kind)
    tr = ok(translate(request, t.mem, rtaddr, CAPS, WalkOptions(set_ad=True)))
    assert tr.output == 0x5000 or kind == "pass-through"


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(["legacy", "second", "first", "nested", "pass-through"]),
       flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 63)), min_size=1,
                      max_size=4),
       access=st.sampled_from([Access.READ, Access.WRITE]), set_ad=st.booleans())
def test_never_raises_on_mutated_tables(kind: str, flips: list[tuple[int, int]],
                                        access: Access, set_ad: bool) -> None:
    """Valid tables with random bits flipped: every path a fault can take, and no exception."""
    t, rtaddr, request = _valid_setup(kind)
    live = [a for a in range(0x1000, t.next, 8) if t.mem.read_u64(a)]
    for index, bit in flips:
        addr = live[index % len(live)]
        t.mem.write_u64(addr, t.mem.read_u64(addr) ^ 1 << bit)
    request = DmaRequest(request.sid, request.address, access, request.pasid,
                         request.privileged)
    _check(translate(request, t.mem, rtaddr, CAPS, WalkOptions(set_ad=set_ad)))

