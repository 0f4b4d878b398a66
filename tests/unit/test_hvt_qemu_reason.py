"""qemu_reason(patched=True): what the patched intel-iommu (qemu-patches/ 0002) records.

Pure: tables in a buffer, the model's faults, and the code the patched QEMU reports for
each, next to what stock QEMU 10.0.2 reports (unchanged by the patched mode). The integration
suite (tests/integration/test_hvt_pasid_vs_model.py) checks the same against the real binary.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hvtools.addr import PAGE_2M, PAGE_4K, Iova
from hvtools.control.hvt_qtest import HvtDmaResult, HvtPasidReg, HvtStatus
from hvtools.errors import UsageError
from hvtools.iommu.build import VtdTables
from hvtools.iommu.regs import CapReg, EcapReg, IommuCaps
from hvtools.iommu.structures import PasidTableEntry, Pgtt
from hvtools.iommu.walk import (
    QEMU_NOTES,
    QEMU_PATCHED_NOTES,
    Access,
    DmaRequest,
    FaultReason,
    qemu_reason,
    source_id,
    translate,
)
from hvtools.memory.buffer import BufferMemory
from hvtools.translation import Fault, Outcome, Translation

R = FaultReason
SID = source_id(0, 4, 0)
PASID = 0x45
READ, WRITE = Access.READ, Access.WRITE
#: What the patched QEMU advertises with x-scalable-mode,x-pasid-mode,x-flts,x-nested=on.
PATCHED = IommuCaps(
    CapReg.encode({"ND": 2, "SAGAW": 0b00110, "MGAW": 47, "SLLPS": 0b11, "FS1GP": 1,
                   "FRO": 0x22, "PSI": 1}),
    EcapReg.encode({"QI": 1, "IR": 1, "PT": 1, "IRO": 15, "MHMV": 15, "NEST": 1, "SRS": 1,
                    "PSS": 19, "PASID": 1, "SMTS": 1, "SSTS": 1, "FSTS": 1}))
TABLE_GPA = 0x4000_0000  # nested: FS tables at HPA + this
OUT_GPA = 0x8000_0000  # nested: FS output
OUT_HPA = 0x30_0000
IOVA = 0x1_2345_6000


@dataclass
class Case:
    t: VtdTables[BufferMemory]
    rtaddr: int
    pe: int
    fs: int
    ss: int

    def go(self, address: int, access: Access = READ, pasid: int | None = PASID,
           priv: bool = False) -> tuple[Outcome, DmaRequest]:
        request = DmaRequest(SID, Iova(address), access, pasid, priv)
        return translate(request, self.t.mem, self.rtaddr, PATCHED), request

    def fs_path(self) -> list[int]:
        off = TABLE_GPA if PasidTableEntry.get(self.t.get(PasidTableEntry, self.pe),
                                               "PGTT") == Pgtt.NESTED else 0
        return self.t.entry_path(self.fs, 4, IOVA, first_stage=True, gpa_offset=off)


def case(pgtt: Pgtt, **pe: int) -> Case:
    t = VtdTables.in_buffer(4 << 20)
    rtaddr = t.scalable()
    pdir = t.sm_device(rtaddr, SID)
    fs, ss = t.alloc(), t.alloc()
    t.pasid_entry(pdir, 0, PGTT=Pgtt.SECOND_STAGE, AW=2, SSPTPTR=t.alloc() >> 12)
    nested = pgtt == Pgtt.NESTED
    fields = {"PGTT": pgtt, "AW": 2, "SRE": 1, "FSPTPTR": (fs + (TABLE_GPA if nested else 0))
              >> 12, "SSPTPTR": ss >> 12, **pe}
    pe_addr = t.pasid_entry(pdir, PASID, **fields)
    if nested:
        for g in range(0, 4 << 20, PAGE_2M):
            t.ss_map(ss, 4, TABLE_GPA + g, g, PAGE_2M)
        t.fs_map(fs, 4, IOVA, OUT_GPA, gpa_offset=TABLE_GPA)
        t.fs_set_ad(fs, 4, IOVA, gpa_offset=TABLE_GPA)
        t.ss_map(ss, 4, OUT_GPA, OUT_HPA)
    elif pgtt == Pgtt.FIRST_STAGE:
        t.fs_map(fs, 4, IOVA, OUT_HPA)
        t.fs_set_ad(fs, 4, IOVA)
    else:
        t.ss_map(ss, 4, IOVA, OUT_HPA)
    return Case(t, rtaddr, pe_addr, fs, ss)


def reasons(c: Case, want: FaultReason, access: Access = READ, pasid: int | None = PASID,
            priv: bool = False) -> tuple[int | None, int | None]:
    """(patched, stock) codes for the model's fault, which must be ``want``."""
    outcome, request = c.go(IOVA + 0x40, access, pasid, priv)
    assert isinstance(outcome, Fault) and outcome.code == want, outcome
    return (qemu_reason(outcome, request, PATCHED, patched=True),
            qemu_reason(outcome, request, PATCHED))


def edit(c: Case, addr: int, clear: int = 0, set_: int = 0) -> None:
    c.t.mem.write_u64(addr, c.t.mem.read_u64(addr) & ~clear | set_)


def test_nested_walks_report_the_spec_codes() -> None:
    """SSS/SGN codes of nested walks are not renumbered; stock rejects nested (0x5B)."""
    c = case(Pgtt.NESTED)
    outcome, _ = c.go(IOVA + 0x40, WRITE)
    assert isinstance(outcome, Translation) and outcome.output == OUT_HPA + 0x40
    out_leaf = c.t.entry_path(c.ss, 4, OUT_GPA)[-1]
    edit(c, out_leaf, clear=2)
    assert reasons(c, R.SM_WRITE_DENIED, WRITE) == (0x85, 0x5B)
    edit(c, out_leaf, clear=1, set_=2)
    assert reasons(c, R.SM_READ_DENIED) == (0x86, 0x5B)
    edit(c, out_leaf, clear=3)
    assert reasons(c, R.SM_SS_NOT_PRESENT) == (0x79, 0x5B)
    edit(c, out_leaf, set_=3 | 1 << 62)
    assert reasons(c, R.SM_SS_RESERVED, WRITE) == (0x7A, 0x5B)


def test_nested_first_stage_table_through_a_read_denied_second_stage() -> None:
    c = case(Pgtt.NESTED)
    alias = c.t.entry_path(c.ss, 4, TABLE_GPA)[-1]  # the 2 MiB page of every FS table
    edit(c, alias, clear=1)
    assert reasons(c, R.SM_FSPTPTR_READ_DENIED) == (0x75, 0x5B)


def test_nested_ad_update_is_denied_before_the_output_walk() -> None:
    """QEMU decides SFS.8 at the leaf, before translating the output: with the leaf's A clear
    on a read-only table page and the output unmapped, the model (rights and output first)
    says SSS.2, the patched QEMU 0x77."""
    c = case(Pgtt.NESTED)
    leaf = c.fs_path()[-1]
    table_gpa = (leaf & ~0xFFF) + TABLE_GPA
    c.t.mem.write_u64(c.t.entry_path(c.ss, 4, table_gpa)[-1], 0)  # split the 2 MiB alias
    for off in range(0, PAGE_2M, PAGE_4K):
        c.t.ss_map(c.ss, 4, TABLE_GPA + off, off, W=0 if off == leaf & ~0xFFF else 1)
    edit(c, leaf, clear=1 << 5)
    assert reasons(c, R.SM_FS_AD_WRITE_DENIED)[0] == 0x77
    edit(c, c.t.entry_path(c.ss, 4, OUT_GPA)[-1], clear=3)
    assert reasons(c, R.SM_SS_NOT_PRESENT) == (0x77, 0x5B)


def test_supervisor_requests() -> None:
    """U/S is not required of a supervisor request; R/W only with WPE."""
    c = case(Pgtt.FIRST_STAGE)
    path = c.fs_path()
    edit(c, path[1], clear=4)  # PDPE: supervisor-only
    edit(c, path[-1], set_=1 << 50)  # and a reserved bit below it
    assert reasons(c, R.SM_FS_RESERVED) == (0x81, 0x81)  # user: stops at the PDPE
    assert reasons(c, R.SM_FS_RESERVED, priv=True) == (0x72, 0x81)
    edit(c, path[-1], clear=1 << 50)
    edit(c, path[0], clear=2)  # PML4E read-only
    outcome, _ = c.go(IOVA, WRITE, priv=True)
    assert isinstance(outcome, Translation)
    c.t.edit(PasidTableEntry, c.pe, WPE=1)
    assert reasons(c, R.SM_WRITE_DENIED, WRITE, priv=True) == (0x85, 0x85)
    c.t.edit(PasidTableEntry, c.pe, SRE=0)
    assert reasons(c, R.SM_SRE_CLEAR, priv=True) == (0x5D, None)


def test_legacy_mode_request_with_pasid() -> None:
    t = VtdTables.in_buffer(1 << 20)
    rtaddr = t.legacy()
    request = DmaRequest(SID, Iova(IOVA), WRITE, PASID, True)
    outcome = translate(request, t.mem, rtaddr, PATCHED)
    assert isinstance(outcome, Fault) and outcome.code == R.SM_LEGACY_WITH_PASID
    assert qemu_reason(outcome, request, PATCHED, patched=True) == 0x31
    assert qemu_reason(outcome, request, PATCHED) is None


def test_second_stage_only_keeps_the_stock_codes() -> None:
    c = case(Pgtt.SECOND_STAGE)
    edit(c, c.t.entry_path(c.ss, 4, IOVA)[-1], clear=2)
    assert reasons(c, R.SM_WRITE_DENIED, WRITE) == (0x05, 0x05)
    edit(c, c.t.entry_path(c.ss, 4, IOVA)[-1], clear=1)
    assert reasons(c, R.SM_SS_NOT_PRESENT, priv=True) == (0x06, 0x06)


def test_paside_and_pdts_are_detected_by_the_patched_qemu_only() -> None:
    """SCT.6/SCT.7 for requests-with-PASID: the series checks them, stock QEMU does not."""
    c = case(Pgtt.SECOND_STAGE)
    ce = c.t.context_address(c.rtaddr, SID)
    assert ce is not None
    c.t.mem.write_u64(ce, c.t.mem.read_u64(ce) & ~(1 << 3))  # PASIDE=0
    assert reasons(c, R.SM_PASIDE_CLEAR) == (0x45, None)
    c.t.mem.write_u64(ce, c.t.mem.read_u64(ce) | 1 << 3)
    assert reasons(c, R.SM_PASID_BEYOND_PDTS, pasid=1 << 19) == (0x46, None)
    assert QEMU_PATCHED_NOTES and QEMU_NOTES


def test_hvt_register_encodings() -> None:
    assert HvtPasidReg.tag(None) == 0
    with pytest.raises(UsageError):
        HvtPasidReg.tag(None, priv=True)
    assert HvtPasidReg.tag(0x45) == 1 << 31 | 0x45
    assert HvtPasidReg.tag(0xF_FFFF, priv=True) == 0xC00F_FFFF
    res = HvtDmaResult(HvtStatus.encode({"DONE": 1, "ERROR": 1, "CODE": 8}), 0, 0x1000)
    assert res.code == 8 and res.error and res.done and not res.ok and not res.busy
    assert "BLOCKED" in str(res)
    assert HvtDmaResult(1, 4, 0).ok
