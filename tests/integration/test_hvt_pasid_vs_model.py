"""Issue 5, s2/s3: the VT-d model against the patched intel-iommu, one hvt-pci DMA at a time.

The PASID half of the VT-d differential suite (the edu half is test_vtd_vs_qemu.py). One
patched QEMU (``intel-iommu,x-scalable-mode=on,x-pasid-mode=on,x-flts=on,x-nested=on`` and
``hvt-pci`` at 00:04.0, :class:`~hvtools.control.hvt_qtest.HvtQtestBench`) serves the module.
Each case builds root/context/PASID-directory/PASID-table and first-/second-stage structures
with :mod:`hvtools.iommu.build` straight into guest RAM, asks the model
(:func:`~hvtools.iommu.walk.translate`, reading those very bytes back through qtest), latches
the root table and lets hvt-pci DMA with the request's PASID and privilege:

- a Translation: the bytes land exactly at ``output`` (a write, DEV2MEM from the SRAM) or come
  from there (a read, MEM2DEV into the SRAM); the identity address, the nested walk's
  guest-physical address and the other would-be targets stay untouched; the device reports
  DONE with every byte moved; nothing is recorded;
- a Fault: no watched byte changes, the device stops with READ_FAULT/WRITE_FAULT at the
  request's address, and FRCD_REG[0] holds F=1, FR = ``qemu_reason(..., patched=True)``,
  SID, T, FI, PP/PV/PRIV as :func:`fault_record` says (requests without PASID: PP/PV as stock
  QEMU fills them) -- or nothing when an FPD suppresses the fault.

Where the patched QEMU and the model disagree and the specification sides with the model,
the C is wrong: the six such findings so far were fixed in the series and are kept as
regression tests, like the four findings of the series' review (requests-with-PASID into the
interrupt range, PASID-cache invalidation, nested IOTLB invalidation, address spaces per
PASID without bound; fixed in c7ad054) and the two after it (pass-through requests into the
interrupt range). Stock departures that the series leaves alone are
in ``QEMU_NOTES`` and are steered around (or pinned) by test_vtd_vs_qemu.py.

Guest RAM (256 MiB): the invalidation queue and its status dword at 15 MiB, tables in
[16 MiB, 32 MiB) (nested: seen by the first stage at +2 GiB through 2 MiB second-stage
pages), DMA targets in [32 MiB, 256 MiB); nested outputs are guest-physical
``HPA + 16 MiB`` before the second stage (also RAM, and watched).

``HVTOOLS_HVT_EXAMPLES=N`` sets the random cases (default 300, a fixed set);
``HVTOOLS_VTD_EXPLORE=1`` draws new ones on every run.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Iova
from hvtools.control.hvt_qtest import (
    HVT_ID_VALUE,
    HvtCode,
    HvtDir,
    HvtQtestBench,
    HvtReg,
    HvtVtdResult,
)
from hvtools.control.vtd_qtest import (
    INV_DESCRIPTORS,
    InvalidationQueue,
    InvDescType,
    IotlbInvDesc,
    PasidCacheInvDesc,
    PasidIotlbInvDesc,
)
from hvtools.iommu.build import VtdTables
from hvtools.iommu.regs import IommuCaps
from hvtools.iommu.structures import (
    FaultRecord,
    PasidDirEntry,
    PasidTableEntry,
    Pgtt,
    RtaddrReg,
    ScalableContextEntry,
    Ttm,
)
from hvtools.iommu.walk import (
    QEMU_PATCHED_NOTES,
    Access,
    DmaRequest,
    FaultReason,
    fault_record,
    is_recorded,
    qemu_reason,
    source_id,
    translate,
)
from hvtools.qemu.qtest import QtestMemory
from hvtools.translation import Fault, Outcome, Stage, Translation

pytestmark = pytest.mark.integration

R = FaultReason
READ, WRITE = Access.READ, Access.WRITE
FS, SS, NESTED, PT = Pgtt.FIRST_STAGE, Pgtt.SECOND_STAGE, Pgtt.NESTED, Pgtt.PASS_THROUGH
SID = source_id(0, 4, 0)
ARENA = (0x100_0000, 0x200_0000)
TARGETS = (0x200_0000, 0x1000_0000)
#: Nested: the first stage sees its tables at HPA + TABLE_GPA (2 MiB SS pages map them back)
#: and its outputs are HPA + DATA_GPA (RAM too: a walk that skipped the SS would land there).
TABLE_GPA = 0x8000_0000
DATA_GPA = 0x100_0000
#: Nested 1 GiB first-stage pages output GPAs from here (second-stage mapped page by page).
GIB_GPA = 0x4000_0000
IOVA = 0x1_2345_6000
HPA = 0x300_0000
PASID = 0x45  # beyond the first PASID table (PASID 0's) on purpose
SRAM = 0x800
#: The queued-invalidation interface's queue (4 KiB) and status dword, below the arena.
IQ_BASE, IQ_STATUS = 0xF0_0000, 0xF0_1000
INTERRUPT_WINDOW = range(0xFEE0_0000, 0xFEF0_0000)
EXAMPLES = int(os.environ.get("HVTOOLS_HVT_EXAMPLES", "300"))
EXPLORE = os.environ.get("HVTOOLS_VTD_EXPLORE", "") == "1"


# ============================================================================================
# The oracle
# ============================================================================================


def in_targets(addr: int, size: int) -> bool:
    return TARGETS[0] <= addr and addr + size <= TARGETS[1]


def sentinel(addr: int, count: int) -> bytes:
    """What a watched location holds before a write: a function of the address alone."""
    return bytes(((addr + i) * 0x9D + 0x5B) >> 3 & 0xFF for i in range(count))


class Disagreement(AssertionError):
    """The model and QEMU disagree (a broken set-up fails with a plain AssertionError)."""


def agree(condition: bool, message: str) -> None:
    if not condition:
        raise Disagreement(message)


def expected_record(request: DmaRequest, fault: Fault, code: int, rtaddr: int,
                    caps: IommuCaps) -> dict[str, int]:
    """FRCD_REG as the patched QEMU records it: :func:`fault_record` with FR = ``code``;
    requests without PASID keep the stock quirk (PP=1, PV=RID_PASID for faults found walking
    the PASID's paging structures, QEMU_NOTES) -- which includes a nested entry's first-stage
    root beyond the second-stage width (SPT.4, found by QEMU's walk, not its type check)."""
    rec = FaultRecord.decode(fault_record(request, fault))
    rec["FR"] = code
    walked = fault.stage is not Stage.VTD_ROOT or (
        fault.code == R.SM_PASID_ENTRY_INVALID
        and not any(s.table == PasidTableEntry.NAME and pgtt_rejected(s.entry, caps)
                    for s in fault.steps))
    if request.pasid is None and RtaddrReg.get(rtaddr, "TTM") & 1 and walked:
        rec["PP"], rec["PV"] = 1, 0
    return rec


def pgtt_rejected(pte: int, caps: IommuCaps) -> bool:
    """Whether QEMU's PASID-entry type check refuses the entry (0x5B before P and FPD)."""
    pe = PasidTableEntry.decode(pte)
    need = {FS: "FSTS", SS: "SSTS", NESTED: "NEST", PT: "PT"}.get(pe["PGTT"])
    if need is None or not caps.get(need):
        return True
    if pe["PGTT"] in (SS, NESTED) and not caps.get("SAGAW") >> pe["AW"] & 1:
        return True
    return pe["PGTT"] in (FS, NESTED) and pe["FSPM"] != 0


def qemu_records(fault: Fault, request: DmaRequest, caps: IommuCaps) -> bool:
    """:func:`is_recorded` as the patched QEMU decides it. Requests without PASID (and with
    PASID 0 = RID_PASID): the PASID structures are fetched with the context entry, whose FPD
    alone counts there (stock, test_vtd_vs_qemu.py). Other PASIDs: their directory and table
    entries' FPD count, except that an entry QEMU's type check refuses faults 0x5B before its
    FPD is read."""
    pasid_tables = (PasidDirEntry.NAME, PasidTableEntry.NAME)
    drop: tuple[str, ...] = ()
    if fault.stage is Stage.VTD_ROOT:
        if request.pasid in (None, 0):
            drop = pasid_tables
        elif fault.code == R.SM_PASID_ENTRY_INVALID and any(
                s.table == PasidTableEntry.NAME and pgtt_rejected(s.entry, caps)
                for s in fault.steps):
            drop = (PasidTableEntry.NAME,)
    return is_recorded(replace(fault, steps=tuple(s for s in fault.steps
                                                  if s.table not in drop)))


@dataclass
class Verdict:
    outcome: Outcome
    result: HvtVtdResult | None
    compared: bool


class Lab:
    """The module's QEMU, a table arena in its RAM, and the differential check."""

    def __init__(self, bench: HvtQtestBench) -> None:
        self.bench = bench
        self.mem: QtestMemory = bench.memory
        self.t = VtdTables(bench.memory, base=ARENA[0], limit=ARENA[1])
        self.rng = random.Random(0x5A5)

    @property
    def caps(self) -> IommuCaps:
        return self.bench.caps

    def tables(self) -> VtdTables[QtestMemory]:
        """The arena, emptied for a new case."""
        self.mem.fill(self.t.base, self.t.next - self.t.base)
        self.t.reset()
        return self.t

    def model(self, rtaddr: int, request: DmaRequest) -> Outcome:
        return translate(request, self.mem, rtaddr, self.caps)

    def data(self, count: int) -> bytes:
        return bytes(b | 1 for b in self.rng.randbytes(count))

    def check(self, rtaddr: int, request: DmaRequest, *, count: int = 16,
              watch: tuple[int, ...] = (), program: bool = True, invalidate: bool = True,
              spec: bool = False) -> Verdict:
        """Run ``request`` (``count`` bytes) on the model and through hvt-pci; raise
        :class:`Disagreement` where they differ. ``watch``: guest-physical places the bytes
        must not reach (besides the identity address). ``spec``: expect the specification's
        own reason code (the model's) even where ``qemu_reason`` says QEMU does not see the
        condition (the regressions below)."""
        bench, mem, dev = self.bench, self.mem, self.bench.hvt
        if program:
            bench.program(rtaddr)
        outcome = self.model(rtaddr, request)
        expected = None if isinstance(outcome, Translation) else outcome.code if spec \
            else qemu_reason(outcome, request, self.caps, patched=True)
        if isinstance(outcome, Fault) and expected is None:
            return Verdict(outcome, None, compared=False)

        data = self.data(count)
        marker = bytes(b ^ 0xA5 for b in data)
        landing = outcome.output if isinstance(outcome, Translation) else None
        checkable = landing is not None and in_targets(landing, count)
        if request.write and landing is not None and mem.contains(landing, count):
            assert checkable, f"a write to {landing:#x} would overwrite the bench's memory"
        watched = sorted({a for a in (request.address, *watch) if in_targets(a, count)
                          and (landing is None or abs(a - landing) >= count)})
        before = None
        if request.write:
            for a in watched + ([landing] if checkable and landing is not None else []):
                mem.write(a, sentinel(a, count))
            dev.sram_write(SRAM, data)
        else:
            dev.sram_write(SRAM, marker)
            for a in watched:
                mem.write(a, data)
            if checkable and landing is not None:
                mem.write(landing, data)
            elif landing is not None and mem.contains(landing, count):
                before = mem.read(landing, count)

        result = bench.dma(request, count, SRAM, invalidate=invalidate)
        records = result.iommu.decoded()
        where = (f"{request} -> {outcome}; hvt-pci {result.dma}; QEMU recorded {records}")
        if request.write:
            if checkable and landing is not None:
                agree(mem.read(landing, count) == data, f"bytes did not land: {where}")
            for a in watched:
                agree(mem.read(a, count) == sentinel(a, count),
                      f"bytes landed at {a:#x}: {where}")
        else:
            got = dev.sram_read(SRAM, count)
            if checkable:
                agree(got == data, f"the read did not fetch the output's bytes: {where}")
            elif before is not None:
                agree(got == before, f"the read did not fetch the output's bytes: {where}")
            if isinstance(outcome, Fault):
                # A refused MEM2DEV read leaves the SRAM as it was.
                agree(got == marker,
                      f"a faulting read changed the SRAM to {got.hex()}: {where}")

        if isinstance(outcome, Translation):
            if landing is not None and mem.contains(landing, count):
                agree(result.dma.ok and result.dma.xferred == count,
                      f"hvt-pci did not complete where the model translates: {where}")
            agree(not result.iommu.faulted, f"QEMU faulted where the model translates: {where}")
        else:
            code = HvtCode.WRITE_FAULT if request.write else HvtCode.READ_FAULT
            agree(result.dma.error and result.dma.code == code and result.dma.xferred == 0
                  and result.dma.fault_addr == request.address,
                  f"hvt-pci did not stop at the request's address with {code.name}: {where}")
            if not qemu_records(outcome, request, self.caps):
                agree(not result.iommu.faulted, f"QEMU recorded a fault FPD suppresses: {where}")
            else:
                assert expected is not None
                want = expected_record(request, outcome, expected, rtaddr, self.caps)
                agree(len(records) == 1, f"want one record {want}: {where}")
                got_rec = dict(records[0])
                if not want["PP"]:
                    got_rec["PV"] = want["PV"]  # PV means nothing without PP
                agree(got_rec == want, f"fault record differs from {want}: {where}")
        bench.iommu.clear_faults()
        dev.clear_status()
        return Verdict(outcome, result, compared=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    bench = HvtQtestBench(name="hvt-pasid").start()
    try:
        yield Lab(bench)
    finally:
        bench.close()


# ============================================================================================
# Set-ups
# ============================================================================================


@dataclass
class Setup:
    """One case's tables: a scalable-mode device whose PASID ``pasid`` (None: RID_PASID, the
    PASID-0 entry) has type ``pgtt``; PASID 0 always has a valid entry (QEMU validates it
    while fetching the context entry, QEMU_NOTES)."""

    t: VtdTables[QtestMemory]
    rtaddr: int
    pgtt: Pgtt
    pasid: int | None
    pdir: int
    pe: int
    ce: int
    fs_root: int = 0
    ss_root: int = 0
    ss_levels: int = 4
    extra: dict[str, int] = field(default_factory=dict)

    def req(self, address: int, access: Access = READ, priv: bool = False) -> DmaRequest:
        return DmaRequest(SID, Iova(address), access, self.pasid, priv)

    def gpa(self, hpa: int, size: int) -> int:
        """Nested: the guest-physical address the first stage outputs for ``hpa``."""
        return GIB_GPA if size == PAGE_1G else hpa + DATA_GPA

    def map(self, iova: int, hpa: int, size: int = PAGE_4K, *, ss_size: int | None = None,
            probe: int = 0, ss: dict[str, int] | None = None, **leaf: int) -> None:
        """Map the ``size`` page at ``iova`` to ``hpa`` (``leaf``: the FS leaf's bits for
        FS/nested, the SS leaf's for SS). Nested: FS iova -> :meth:`gpa`, and one SS page of
        ``ss_size`` (default ``size``) around ``gpa + probe`` -> ``hpa + probe`` (``ss``: that
        leaf's bits)."""
        t = self.t
        if self.pgtt == SS:
            t.ss_map(self.ss_root, self.ss_levels, iova, hpa, size, **leaf)
        elif self.pgtt == FS:
            t.fs_map(self.fs_root, 4, iova, hpa, size, **leaf)
            t.fs_set_ad(self.fs_root, 4, iova)
        elif self.pgtt == NESTED:
            gpa = self.gpa(hpa, size)
            t.fs_map(self.fs_root, 4, iova, gpa, size, gpa_offset=TABLE_GPA, **leaf)
            t.fs_set_ad(self.fs_root, 4, iova, gpa_offset=TABLE_GPA)
            ss_size = ss_size or size
            mask = ~(ss_size - 1)
            t.ss_map(self.ss_root, self.ss_levels, (gpa + probe) & mask, (hpa + probe) & mask,
                     ss_size, **(ss or {}))

    def fs_path(self, iova: int) -> list[int]:
        """HPAs of the first-stage entries on ``iova``'s path."""
        return self.t.entry_path(self.fs_root, 4, iova, first_stage=True,
                                 gpa_offset=TABLE_GPA if self.pgtt == NESTED else 0)

    def ss_path(self, gpa: int) -> list[int]:
        return self.t.entry_path(self.ss_root, self.ss_levels, gpa)

    def flip(self, addr: int, bit: int) -> None:
        word = addr + bit // 64 * 8
        self.t.mem.write_u64(word, self.t.mem.read_u64(word) ^ 1 << bit % 64)

    def edit(self, addr: int, clear: int = 0, set_: int = 0) -> None:
        self.t.mem.write_u64(addr, self.t.mem.read_u64(addr) & ~clear | set_)


def setup(lab: Lab, pgtt: Pgtt, pasid: int | None = PASID, *, aw: int = 2, sre: int = 1,
          wpe: int = 0, pdts: int = 0, ctx: dict[str, int] | None = None, **pe: int) -> Setup:
    t = lab.tables()
    rtaddr = t.scalable()
    pdir = t.alloc()
    for _ in range(max(1, (8 << (pdts + 7)) // PAGE_4K) - 1):
        t.alloc()  # the directory's further pages, contiguous
    t.sm_device(rtaddr, SID, PASIDDIRPTR=pdir, PDTS=pdts, **(ctx or {}))
    target = 0 if pasid is None else pasid
    if target:
        t.pasid_entry(pdir, 0, PGTT=SS, AW=2, SSPTPTR=t.alloc() >> 12)
    levels = aw + 2
    fs_root = t.alloc() if pgtt in (FS, NESTED) else 0
    ss_root = t.alloc() if pgtt in (SS, NESTED) else 0
    if pgtt == NESTED:
        for g in range(ARENA[0] & ~(PAGE_2M - 1), ARENA[1], PAGE_2M):
            t.ss_map(ss_root, levels, g + TABLE_GPA, g, PAGE_2M)
    fields = {"PGTT": pgtt, "AW": aw, "PWSNP": 1, "SRE": sre, "WPE": wpe}
    if fs_root:
        fields["FSPTPTR"] = (fs_root + (TABLE_GPA if pgtt == NESTED else 0)) >> 12
    if ss_root:
        fields["SSPTPTR"] = ss_root >> 12
    pe_addr = t.pasid_entry(pdir, target, **{**fields, **pe})
    ce = t.context_address(rtaddr, SID)
    assert ce is not None
    return Setup(t, rtaddr, pgtt, pasid, pdir, pe_addr, ce, fs_root, ss_root, levels)


def translates(v: Verdict, output: int | None = None) -> None:
    assert v.compared and isinstance(v.outcome, Translation), v.outcome
    if output is not None:
        assert v.outcome.output == output, f"{v.outcome.output:#x} != {output:#x}"


def faults(v: Verdict, model: FaultReason, qemu: int | None) -> None:
    """The model found ``model``; QEMU recorded exactly ``qemu`` (None: nothing)."""
    assert isinstance(v.outcome, Fault), v.outcome
    assert v.outcome.code == model, f"model: {v.outcome.code:#x} {v.outcome.reason}"
    assert v.compared and v.result is not None
    assert [FaultRecord.get(r, "FR") for r in v.result.iommu.records] == (
        [] if qemu is None else [qemu])


PGTTS = [FS, SS, NESTED, PT]
PGTT_IDS = ["fs", "ss", "nested", "pt"]
PASIDS = [None, 1, PASID, 0xF_FFFF]
PASID_IDS = ["rid-pasid", "pasid-1", "pasid-45", "pasid-fffff"]


# ============================================================================================
# Translations: every PGTT, PASIDs and RID_PASID, reads and writes, user and supervisor
# ============================================================================================


@pytest.mark.parametrize("pasid", PASIDS, ids=PASID_IDS)
@pytest.mark.parametrize("pgtt", PGTTS, ids=PGTT_IDS)
def test_pgtt_translates(lab: Lab, pgtt: Pgtt, pasid: int | None) -> None:
    """Each PGTT per PASID entry, for PASID-tagged requests and requests without PASID, user
    and (with PASID, SRE=1) supervisor, read and write: the bytes land at the model's output
    and nowhere else watched (the identity address, the nested GPA)."""
    s = setup(lab, pgtt, pasid, pdts=7 if pasid == 0xF_FFFF else 0)
    iova = HPA + 0x5000 if pgtt == PT else IOVA
    s.map(iova, HPA)
    watch = (HPA + DATA_GPA + 0x40,) if pgtt == NESTED else (HPA + 0x40,)
    for priv in ([False, True] if pasid is not None else [False]):
        for access in (READ, WRITE):
            v = lab.check(s.rtaddr, s.req(iova + 0x40, access, priv), watch=watch)
            translates(v, (iova if pgtt == PT else HPA) + 0x40)


@pytest.mark.parametrize("pgtt", [FS, SS], ids=["fs", "ss"])
@pytest.mark.parametrize("size", [PAGE_4K, PAGE_2M, PAGE_1G], ids=["4K", "2M", "1G"])
def test_page_sizes(lab: Lab, pgtt: Pgtt, size: int) -> None:
    s = setup(lab, pgtt)
    iova = IOVA & ~(size - 1)
    hpa = 0 if size == PAGE_1G else 0x400_0000
    s.map(iova, hpa, size)
    for off in (0x10, 0xFF0, 0x5_6010, 0x1F_FF00, 0x345_6010, 0xFFF_F000):
        if off >= size or not in_targets(hpa + off, 16):
            continue
        for access in (READ, WRITE):
            v = lab.check(s.rtaddr, s.req(iova + off, access, priv=access is WRITE))
            translates(v, hpa + off)
            assert v.outcome.page_size == size  # type: ignore[union-attr]


@pytest.mark.parametrize(("fs_size", "ss_size", "page"), [
    (PAGE_4K, PAGE_4K, PAGE_4K), (PAGE_4K, PAGE_2M, PAGE_4K), (PAGE_2M, PAGE_4K, PAGE_4K),
    (PAGE_2M, PAGE_2M, PAGE_2M), (PAGE_1G, PAGE_2M, PAGE_2M), (PAGE_1G, PAGE_4K, PAGE_4K)],
    ids=["4K-4K", "4K-2M", "2M-4K", "2M-2M", "1G-2M", "1G-4K"])
def test_nested_page_sizes(lab: Lab, fs_size: int, ss_size: int, page: int) -> None:
    """Nested: the combined page is the smaller of the two stages' (s3.8)."""
    s = setup(lab, NESTED)
    hpa = 0 if fs_size == PAGE_1G else 0x400_0000
    probe = 0x600_0000 if fs_size == PAGE_1G else 0x1_2340 & (fs_size - 1)
    iova = IOVA & ~(fs_size - 1)
    s.map(iova, hpa, fs_size, ss_size=ss_size, probe=probe)
    for access in (READ, WRITE):
        v = lab.check(s.rtaddr, s.req(iova + probe, access))
        translates(v, hpa + probe)
        assert v.outcome.page_size == page  # type: ignore[union-attr]


def test_supervisor_requests_first_stage(lab: Lab) -> None:
    """s3.6.2: a supervisor request needs no U/S; its writes ignore R/W unless WPE=1."""
    for pgtt in (FS, NESTED):
        s = setup(lab, pgtt)
        s.map(IOVA, HPA, US=0, RW=0)
        translates(lab.check(s.rtaddr, s.req(IOVA + 8, READ, priv=True)), HPA + 8)
        translates(lab.check(s.rtaddr, s.req(IOVA + 8, WRITE, priv=True)), HPA + 8)
        faults(lab.check(s.rtaddr, s.req(IOVA + 8, READ)), R.SM_PRIVILEGE, 0x81)
        faults(lab.check(s.rtaddr, s.req(IOVA + 8, WRITE)), R.SM_PRIVILEGE, 0x81)
        lab.t.edit(PasidTableEntry, s.pe, WPE=1)
        faults(lab.check(s.rtaddr, s.req(IOVA + 8, WRITE, priv=True)), R.SM_WRITE_DENIED, 0x85)
        translates(lab.check(s.rtaddr, s.req(IOVA + 8, READ, priv=True)), HPA + 8)


def test_multi_page_dma_stops_at_the_fault(lab: Lab) -> None:
    """A 12 KiB write over three IOVA pages whose third is unmapped: the device moves the
    first two pages (to their own frames), stops at the third page's address, and the unit
    records that address."""
    s = setup(lab, FS)
    frames = (0x500_0000, 0x480_0000)
    for i, frame in enumerate(frames):
        s.map(IOVA + i * PAGE_4K, frame)
    bench, dev = lab.bench, lab.bench.hvt
    bench.program(s.rtaddr)
    data = lab.data(3 * PAGE_4K)
    dev.sram_write(0, data)
    lab.mem.fill(0x480_0000, 2 * PAGE_4K, 0x11)
    lab.mem.fill(0x500_0000, 2 * PAGE_4K, 0x11)
    outcome = lab.model(s.rtaddr, s.req(IOVA + 2 * PAGE_4K, WRITE))
    assert isinstance(outcome, Fault) and outcome.code == R.SM_FS_NOT_PRESENT
    res = dev.dma(0, IOVA, 3 * PAGE_4K, HvtDir.DEV2MEM, PASID)
    assert res.code == HvtCode.WRITE_FAULT and res.xferred == 2 * PAGE_4K
    assert res.fault_addr == IOVA + 2 * PAGE_4K
    assert lab.mem.read(0x500_0000, PAGE_4K) == data[:PAGE_4K]
    assert lab.mem.read(0x480_0000, PAGE_4K) == data[PAGE_4K:2 * PAGE_4K]
    assert lab.mem.read(0x500_1000, PAGE_4K) == b"\x11" * PAGE_4K
    assert lab.mem.read(0x480_1000, PAGE_4K) == b"\x11" * PAGE_4K
    recs = bench.iommu.pending_records()
    want = expected_record(s.req(IOVA + 2 * PAGE_4K, WRITE), outcome, 0x71, s.rtaddr,
                           lab.caps)
    assert [FaultRecord.decode(r) for r in recs] == [want]
    bench.iommu.clear_faults()
    dev.clear_status()


def test_mem2mem_translates_both_sides(lab: Lab) -> None:
    """MEM2MEM with a PASID: the source is read through its translation, the destination
    written through its own; a read-only destination stops the DMA at the write with
    FAULT_ADDR = DST and a write record, after the read."""
    s = setup(lab, NESTED)
    src_iova, dst_iova = IOVA, IOVA + 0x20_0000
    s.map(src_iova, 0x500_0000, RW=0)
    s.map(dst_iova, 0x600_0000)
    bench, dev = lab.bench, lab.bench.hvt
    bench.program(s.rtaddr)
    data = lab.data(64)
    lab.mem.write(0x500_0040, data)
    lab.mem.fill(0x600_0040, 64, 0x22)
    res = dev.dma(src_iova + 0x40, dst_iova + 0x40, 64, HvtDir.MEM2MEM, PASID)
    assert res.ok and res.xferred == 64, res
    assert lab.mem.read(0x600_0040, 64) == data
    lab.mem.fill(0x500_0040, 64, 0x33)
    bench.invalidate()  # the first DMA cached the read-only source (a stock IOTLB quirk)
    res = dev.dma(dst_iova + 0x40, src_iova + 0x40, 64, HvtDir.MEM2MEM, PASID)
    assert res.code == HvtCode.WRITE_FAULT and res.fault_addr == src_iova + 0x40, res
    assert lab.mem.read(0x500_0040, 64) == b"\x33" * 64
    outcome = lab.model(s.rtaddr, s.req(src_iova + 0x40, WRITE))
    assert isinstance(outcome, Fault) and outcome.code == R.SM_WRITE_DENIED
    assert [FaultRecord.decode(r) for r in bench.iommu.pending_records()] == [
        expected_record(s.req(src_iova + 0x40, WRITE), outcome, 0x85, s.rtaddr, lab.caps)]
    bench.iommu.clear_faults()
    dev.clear_status()


def test_privileged_requests_bypass_the_iotlb(lab: Lab) -> None:
    """IOTLB entries do not record the privilege: a supervisor write (WPE=0) to a read-only
    page must not leave a writable entry for a later user write, and a user read caching the
    read-only page must not stop a later supervisor write (no invalidation in between)."""
    s = setup(lab, FS)
    s.map(IOVA, HPA, RW=0)
    translates(lab.check(s.rtaddr, s.req(IOVA + 0x10, WRITE, priv=True)), HPA + 0x10)
    faults(lab.check(s.rtaddr, s.req(IOVA + 0x10, WRITE), program=False, invalidate=False),
           R.SM_WRITE_DENIED, 0x85)
    translates(lab.check(s.rtaddr, s.req(IOVA + 0x10), program=False, invalidate=False),
               HPA + 0x10)
    translates(lab.check(s.rtaddr, s.req(IOVA + 0x10, WRITE, priv=True), program=False,
                         invalidate=False), HPA + 0x10)


# ============================================================================================
# Faults
# ============================================================================================

Mutator = Callable[[Lab, Setup], None]
#: (id, PGTT, PASID, what to break, access, privileged, the model's fault, what the patched
#: QEMU records (None: nothing, an FPD suppresses it))
FaultCase = tuple[str, Pgtt, int | None, Mutator, Access, bool, FaultReason, int | None]


def _fs(index: int, clear: int = 0, set_: int = 0) -> Mutator:
    return lambda lab, s: s.edit(s.fs_path(IOVA)[index], clear, set_)


def _ss_out(index: int, clear: int = 0, set_: int = 0) -> Mutator:
    """Nested: an entry of the second-stage walk of the output GPA (SS: of the IOVA)."""
    def mutate(lab: Lab, s: Setup) -> None:
        gpa = s.gpa(HPA, PAGE_4K) if s.pgtt == NESTED else IOVA
        s.edit(s.ss_path(gpa)[index], clear, set_)
    return mutate


def _ss_table(fs_level_index: int, ss_index: int, clear: int = 0, set_: int = 0,
              page: int = PAGE_2M) -> Mutator:
    """Nested: remap the FS table page that holds path entry ``fs_level_index`` through its
    own 4K SS page (``page``=PAGE_4K) and change that SS walk's entry ``ss_index``."""
    def mutate(lab: Lab, s: Setup) -> None:
        table_hpa = s.fs_path(IOVA)[fs_level_index] & ~0xFFF
        gpa = table_hpa + TABLE_GPA
        if page == PAGE_4K:
            # Split the 2 MiB alias into 4 KiB pages with the same mapping, then edit one.
            base = gpa & ~(PAGE_2M - 1)
            lab.t.mem.write_u64(s.ss_path(gpa)[-1], 0)
            for off in range(0, PAGE_2M, PAGE_4K):
                lab.t.ss_map(s.ss_root, s.ss_levels, base + off, base - TABLE_GPA + off)
        s.edit(s.ss_path(gpa)[ss_index], clear, set_)
    return mutate


def _pe(**fields: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        lab.t.edit(PasidTableEntry, s.pe, **fields)
    return mutate


def _pe_zero(lab: Lab, s: Setup) -> None:
    lab.t.put(PasidTableEntry, s.pe, 0)


def _pdir_clear(lab: Lab, s: Setup) -> None:
    lab.t.mem.write_u64(lab.t.pasid_dir_entry_address(s.pdir, s.pasid or 0), 0)


def _pdir_fpd(lab: Lab, s: Setup) -> None:
    lab.t.mem.write_u64(lab.t.pasid_dir_entry_address(s.pdir, s.pasid or 0),
                        PasidDirEntry.encode({"FPD": 1}))


def _ctx(**fields: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        lab.t.edit(ScalableContextEntry, s.ce, **fields)
    return mutate


def _no_device(lab: Lab, s: Setup) -> None:
    lab.t.mem.write(RtaddrReg.get(s.rtaddr, "RTA") << 12, bytes(16))


def _iova(address: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        s.extra["iova"] = address
    return mutate


def _both(*mutators: Mutator) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        for m in mutators:
            m(lab, s)
    return mutate


def _ss_root_at(addr: int) -> Mutator:
    return _pe(SSPTPTR=addr >> 12)


def _ss_next_at(addr: int, gpa: int | None = None) -> Mutator:
    """Point the top SS entry of the output GPA's walk (nested) at ``addr``."""
    def mutate(lab: Lab, s: Setup) -> None:
        top = s.ss_path(s.gpa(HPA, PAGE_4K) if gpa is None else gpa)[0]
        e = lab.t.mem.read_u64(top)
        lab.t.mem.write_u64(top, e & ~(((1 << 52) - 1) & ~0xFFF) | addr)
    return mutate


def _fs_next_at(gpa: int) -> Mutator:
    """Point the FS PML4E on IOVA's path at table GPA ``gpa``."""
    def mutate(lab: Lab, s: Setup) -> None:
        top = s.fs_path(IOVA)[0]
        e = lab.t.mem.read_u64(top)
        lab.t.mem.write_u64(top, e & ~(((1 << 52) - 1) & ~0xFFF) | gpa)
    return mutate


def _fs_leaf_to(gpa: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        leaf = s.fs_path(IOVA)[-1]
        e = lab.t.mem.read_u64(leaf)
        lab.t.mem.write_u64(leaf, e & ~(((1 << 52) - 1) & ~0xFFF) | gpa)
    return mutate


BEYOND_RAM = 0x1_0000_0000
P, RW_, US_, A_, D_ = 1, 2, 4, 1 << 5, 1 << 6
FAULT_CASES: list[FaultCase] = [
    # -- context level: PP=1/PV for requests with PASID, PP=0 without -------------------
    ("root-not-present", FS, PASID, _no_device, READ, False, R.SM_ROOT_NOT_PRESENT, 0x01),
    ("root-not-present-priv", SS, PASID, _no_device, WRITE, True,
     R.SM_ROOT_NOT_PRESENT, 0x01),
    ("root-not-present-rid-pasid", FS, None, _no_device, READ, False,
     R.SM_ROOT_NOT_PRESENT, 0x01),
    ("context-not-present", NESTED, PASID, _ctx(P=0), WRITE, False,
     R.SM_CONTEXT_NOT_PRESENT, 0x02),
    ("context-not-present-rid-pasid", SS, None, _ctx(P=0), WRITE, False,
     R.SM_CONTEXT_NOT_PRESENT, 0x02),
    ("context-fpd", FS, PASID, _ctx(P=0, FPD=1), READ, False, R.SM_CONTEXT_NOT_PRESENT, None),
    # -- PASID directory and table ----------------------------------------------------------
    ("pasid-dir-not-present", FS, PASID, _pdir_clear, READ, False,
     R.SM_PASID_DIR_NOT_PRESENT, 0x51),
    ("pasid-dir-not-present-priv", NESTED, 0x1234, _pdir_clear, WRITE, True,
     R.SM_PASID_DIR_NOT_PRESENT, 0x51),
    ("pasid-dir-fpd", SS, PASID, _pdir_fpd, READ, False, R.SM_PASID_DIR_NOT_PRESENT, None),
    ("pasid-entry-not-present", FS, PASID, _pe(P=0), WRITE, False,
     R.SM_PASID_ENTRY_NOT_PRESENT, 0x59),
    ("pasid-entry-not-present-fpd", NESTED, PASID, _pe(P=0, FPD=1), WRITE, False,
     R.SM_PASID_ENTRY_NOT_PRESENT, None),
    ("pasid-entry-zero", SS, PASID, _pe_zero, READ, True,
     R.SM_PASID_ENTRY_NOT_PRESENT, 0x5B),  # the type check comes first (QEMU_NOTES)
    ("pasid-entry-not-present-rid-pasid", FS, None, _pe(P=0), WRITE, False,
     R.SM_PASID_ENTRY_NOT_PRESENT, 0x59),
    ("pgtt-reserved", FS, PASID, _pe(PGTT=5), READ, False, R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("nested-fspm-5-level", NESTED, PASID, _pe(FSPM=1), READ, False,
     R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("nested-aw-57", NESTED, PASID, _pe(AW=3), WRITE, False, R.SM_PASID_ENTRY_INVALID, 0x5B),
    # -- supervisor requests: SRE (SPT.6) ----------------------------------------------------
    ("sre-clear-fs", FS, PASID, _pe(SRE=0), READ, True, R.SM_SRE_CLEAR, 0x5D),
    ("sre-clear-ss", SS, PASID, _pe(SRE=0), WRITE, True, R.SM_SRE_CLEAR, 0x5D),
    ("sre-clear-nested", NESTED, 0x7, _pe(SRE=0), WRITE, True, R.SM_SRE_CLEAR, 0x5D),
    ("sre-clear-fpd", FS, PASID, _pe(SRE=0, FPD=1), WRITE, True, R.SM_SRE_CLEAR, None),
    # -- first stage (FS and nested) ------------------------------------------------------------
    ("fs-leaf-not-present", FS, PASID, _fs(-1, P), READ, False, R.SM_FS_NOT_PRESENT, 0x71),
    ("fs-pml4e-not-present", FS, PASID, _fs(0, P), WRITE, True, R.SM_FS_NOT_PRESENT, 0x71),
    ("fs-leaf-not-present-rid-pasid", FS, None, _fs(-1, P), READ, False,
     R.SM_FS_NOT_PRESENT, 0x71),
    ("fs-write-read-only", FS, PASID, _fs(-1, RW_), WRITE, False, R.SM_WRITE_DENIED, 0x85),
    ("fs-write-read-only-wpe", FS, PASID, _both(_fs(1, RW_), _pe(WPE=1)), WRITE, True,
     R.SM_WRITE_DENIED, 0x85),
    ("fs-user-supervisor-page", FS, PASID, _fs(-1, US_), READ, False, R.SM_PRIVILEGE, 0x81),
    ("fs-user-supervisor-pdpe", FS, 1, _fs(1, US_), WRITE, False, R.SM_PRIVILEGE, 0x81),
    ("fs-reserved", FS, PASID, _fs(-1, 0, 1 << 50), READ, True, R.SM_FS_RESERVED, 0x72),
    ("fs-reserved-below-supervisor", FS, PASID, _both(_fs(1, US_), _fs(-1, 0, 1 << 50)),
     READ, False, R.SM_FS_RESERVED, 0x81),
    ("fs-reserved-below-supervisor-priv", FS, PASID, _both(_fs(1, US_), _fs(-1, 0, 1 << 50)),
     READ, True, R.SM_FS_RESERVED, 0x72),
    ("fs-non-canonical", FS, PASID, _iova(0x8000_0000_0000), WRITE, True,
     R.SM_NON_CANONICAL, 0x80),
    ("fs-fsptptr-beyond-ram", FS, PASID, _pe(FSPTPTR=BEYOND_RAM >> 12), READ, False,
     R.SM_FSPTPTR_ACCESS, 0x73),
    ("nested-fs-leaf-not-present", NESTED, PASID, _fs(-1, P), WRITE, False,
     R.SM_FS_NOT_PRESENT, 0x71),
    ("nested-fs-user-supervisor", NESTED, PASID, _fs(2, US_), READ, False,
     R.SM_PRIVILEGE, 0x81),
    ("nested-fs-write-read-only", NESTED, PASID, _fs(0, RW_), WRITE, False,
     R.SM_WRITE_DENIED, 0x85),
    ("nested-fs-reserved", NESTED, PASID, _fs(1, 0, 1 << 7 | 1 << 13), READ, False,
     R.SM_FS_RESERVED, 0x72),
    # -- nested: the second stage (SFS.5-8, SSS.1-4, SGN.6/7) --------------------------------
    ("nested-output-ss-not-present", NESTED, PASID, _ss_out(-1, 3), READ, False,
     R.SM_SS_NOT_PRESENT, 0x79),
    ("nested-output-ss-pdpe-not-present", NESTED, PASID, _ss_out(1, 3), WRITE, True,
     R.SM_SS_NOT_PRESENT, 0x79),
    ("nested-output-ss-read-only", NESTED, PASID, _ss_out(-1, 2), WRITE, False,
     R.SM_WRITE_DENIED, 0x85),
    ("nested-output-ss-read-only-priv", NESTED, PASID, _ss_out(0, 2), WRITE, True,
     R.SM_WRITE_DENIED, 0x85),
    ("nested-output-ss-write-only", NESTED, PASID, _ss_out(-1, 1), READ, False,
     R.SM_READ_DENIED, 0x86),
    ("nested-output-ss-reserved", NESTED, PASID, _ss_out(-1, 0, 1 << 62), READ, False,
     R.SM_SS_RESERVED, 0x7A),
    ("nested-output-ss-table-beyond-ram", NESTED, PASID, _ss_next_at(BEYOND_RAM), WRITE,
     False, R.SM_SS_ENTRY_ACCESS, 0x78),
    ("nested-ssptptr-beyond-ram", NESTED, PASID, _ss_root_at(BEYOND_RAM), READ, False,
     R.SM_SSPTPTR_ACCESS, 0x7B),
    ("nested-fs-root-ss-read-denied", NESTED, PASID, _ss_table(0, -1, 1), READ, False,
     R.SM_FSPTPTR_READ_DENIED, 0x75),
    ("nested-fs-table-ss-read-denied", NESTED, PASID, _ss_table(2, -1, 1, page=PAGE_4K),
     WRITE, False, R.SM_FS_READ_DENIED, 0x76),
    ("nested-fs-table-ss-not-present", NESTED, PASID, _ss_table(3, -1, 3, page=PAGE_4K),
     READ, False, R.SM_SS_NOT_PRESENT, 0x79),
    ("nested-fs-table-ss-reserved", NESTED, PASID, _ss_table(1, 1, 0, 1 << 62), READ, False,
     R.SM_SS_RESERVED, 0x7A),
    ("nested-fs-ad-ss-read-only", NESTED, PASID,
     _both(_ss_table(3, -1, 2, page=PAGE_4K), _fs(-1, A_)), READ, False,
     R.SM_FS_AD_WRITE_DENIED, 0x77),
    ("nested-fs-dirty-ss-read-only", NESTED, PASID,
     _both(_ss_table(3, -1, 2, page=PAGE_4K), _fs(-1, D_)), WRITE, True,
     R.SM_FS_AD_WRITE_DENIED, 0x77),
    ("nested-fs-output-ss-unmapped-fpd", NESTED, PASID, _both(_ss_out(-1, 3), _pe(FPD=1)),
     READ, False, R.SM_SS_NOT_PRESENT, None),
    # -- second stage only (stock codes remain) ----------------------------------------------
    ("ss-leaf-not-present", SS, PASID, _ss_out(-1, 3), WRITE, True, R.SM_SS_NOT_PRESENT, 0x05),
    ("ss-write-read-only", SS, PASID, _ss_out(-1, 2), WRITE, False, R.SM_WRITE_DENIED, 0x05),
    ("ss-beyond-aw", SS, PASID, _iova(1 << 48), READ, True, R.SM_ADDRESS_BEYOND_AW, 0x04),
]


@pytest.mark.parametrize(("name", "pgtt", "pasid", "mutate", "access", "priv", "reason",
                          "qemu"), FAULT_CASES, ids=[c[0] for c in FAULT_CASES])
def test_faults(lab: Lab, name: str, pgtt: Pgtt, pasid: int | None, mutate: Mutator,
                access: Access, priv: bool, reason: FaultReason, qemu: int | None) -> None:
    """A working mapping IOVA -> HPA under ``pgtt`` for ``pasid``, then one thing broken: the
    model finds the intended fault, QEMU records ``qemu`` (worked out by hand from the spec
    and QEMU_NOTES) with PP/PV/PRIV as the model says, and nothing lands."""
    s = setup(lab, pgtt, pasid)
    s.map(IOVA, HPA)
    mutate(lab, s)
    address = s.extra.get("iova", IOVA) + 0x40
    watch = (HPA + 0x40, HPA + DATA_GPA + 0x40)
    faults(lab.check(s.rtaddr, s.req(address, access, priv), watch=watch), reason, qemu)


@pytest.mark.parametrize("level", [0, 1, 2, 3], ids=["pml4e", "pdpe", "pde", "pte"])
@pytest.mark.parametrize(("pgtt", "stage", "reason"), [
    (FS, "fs", R.SM_FS_NOT_PRESENT), (SS, "ss", R.SM_SS_NOT_PRESENT),
    (NESTED, "fs", R.SM_FS_NOT_PRESENT), (NESTED, "ss", R.SM_SS_NOT_PRESENT)],
    ids=["fs", "ss", "nested-fs", "nested-ss-output"])
def test_not_present_at_each_level(lab: Lab, pgtt: Pgtt, stage: str, reason: FaultReason,
                                   level: int) -> None:
    """A non-present entry at each paging level, user and supervisor, read and write: the
    model's fault and the record QEMU makes (FS 0x71; SS-only the stock 0x05/0x06; nested
    second stage 0x79), with PP/PV/PRIV."""
    s = setup(lab, pgtt)
    s.map(IOVA, HPA)
    mutate = _fs(level, P) if stage == "fs" else _ss_out(level, 3)
    mutate(lab, s)
    for priv in (False, True):
        for access in (READ, WRITE):
            qemu = 0x71 if stage == "fs" else 0x79 if pgtt == NESTED else (
                0x05 if access is WRITE else 0x06)
            faults(lab.check(s.rtaddr, s.req(IOVA + 0x40, access, priv),
                             watch=(HPA + 0x40, HPA + DATA_GPA + 0x40)), reason, qemu)


@pytest.mark.parametrize("pasid", [PASID, None], ids=["pasid", "rid-pasid"])
def test_nested_three_level_second_stage(lab: Lab, pasid: int | None) -> None:
    """AW=1 (39-bit, 3-level second stage): first-stage table and output GPAs at or above
    2^39 fault SFS.5 (0x74), a first-stage root there SPT.4 (0x5B, s9.6); below, nested
    translation works (IOVAs stay below 2^38: QEMU checks first-stage canonicality against
    AW, QEMU_NOTES)."""
    beyond = 1 << 40  # beyond the SS width, below HAW (48): not a reserved address bit
    cases: list[tuple[Mutator, Access, FaultReason, int]] = [
        (_fs_next_at(beyond), READ, R.SM_FS_BEYOND_AW, 0x74),
        (_fs_leaf_to(beyond), WRITE, R.SM_FS_BEYOND_AW, 0x74),
        (_pe(FSPTPTR=beyond >> 12), READ, R.SM_PASID_ENTRY_INVALID, 0x5B),
    ]
    for priv in ([False, True] if pasid is not None else [False]):
        s = setup(lab, NESTED, pasid, aw=1)
        s.map(IOVA, HPA)
        translates(lab.check(s.rtaddr, s.req(IOVA + 0x40, WRITE, priv)), HPA + 0x40)
        for mutate, access, reason, qemu in cases:
            s = setup(lab, NESTED, pasid, aw=1)
            s.map(IOVA, HPA)
            mutate(lab, s)
            faults(lab.check(s.rtaddr, s.req(IOVA + 0x40, access, priv),
                             watch=(HPA + 0x40, HPA + DATA_GPA + 0x40)), reason, qemu)


def test_legacy_mode_request_with_pasid(lab: Lab) -> None:
    """RTA.2: a request-with-PASID under a legacy root table (TTM=00b) faults 0x31, recorded
    with PP, PV and PRIV; the same device's requests without PASID still translate."""
    t = lab.tables()
    rtaddr = t.legacy()
    root = t.alloc()
    t.legacy_device(rtaddr, SID, SSPTPTR=root >> 12)
    t.ss_map(root, 4, IOVA, HPA)
    for pasid, priv in ((PASID, False), (0xF_FFFF, True), (0, False)):
        for access in (READ, WRITE):
            v = lab.check(rtaddr, DmaRequest(SID, Iova(IOVA + 0x40), access, pasid, priv),
                          watch=(HPA + 0x40,))
            faults(v, R.SM_LEGACY_WITH_PASID, 0x31)
    translates(lab.check(rtaddr, DmaRequest(SID, Iova(IOVA + 0x40), WRITE)), HPA + 0x40)


# ============================================================================================
# Regressions: disagreements this suite found in the series, fixed in 0002/0003
# ============================================================================================


# Was a finding of this suite; fixed in 0002 (vtd_as_pt_enabled: no fast path for supervisor ASes).
@pytest.mark.parametrize("access", [READ, WRITE])
def test_regression_pass_through_supervisor_without_sre(lab: Lab, access: Access) -> None:
    s = setup(lab, PT, sre=0)
    faults(lab.check(s.rtaddr, s.req(HPA + 0x40, access, priv=True)), R.SM_SRE_CLEAR, 0x5D)


# Was a finding of this suite; fixed in 0002 (vtd_as_pt_enabled: no fast path for legacy PASID).
@pytest.mark.parametrize("priv", [False, True])
def test_regression_legacy_pass_through_request_with_pasid(lab: Lab, priv: bool) -> None:
    t = lab.tables()
    rtaddr = t.legacy()
    t.legacy_device(rtaddr, SID, TT=2)
    faults(lab.check(rtaddr, DmaRequest(SID, Iova(HPA + 0x40), WRITE, PASID, priv)),
           R.SM_LEGACY_WITH_PASID, 0x31)


# Was a finding of this suite; fixed in 0002 (vtd_ce_pasid_check: SCT.6).
def test_regression_paside_clear(lab: Lab) -> None:
    s = setup(lab, SS, ctx={"PASIDE": 0})
    s.map(IOVA, HPA)
    lab.check(s.rtaddr, s.req(IOVA + 0x40, WRITE), watch=(HPA + 0x40,), spec=True)


# The first SCT.6 fix also refused requests-without-PASID once they had become RID_PASID
# requests, so no guest with a scalable-mode vIOMMU booted; PASIDE concerns tagged ones only.
@pytest.mark.parametrize("pgtt", [SS, FS])
def test_regression_paside_clear_leaves_requests_without_pasid_alone(lab: Lab,
                                                                     pgtt: Pgtt) -> None:
    s = setup(lab, pgtt, None, ctx={"PASIDE": 0})
    s.map(IOVA, HPA)
    translates(lab.check(s.rtaddr, s.req(IOVA + 0x40, WRITE)), HPA + 0x40)


# Was a finding of this suite; fixed in 0002 (vtd_ce_pasid_check: SCT.7).
def test_regression_pasid_beyond_pdts(lab: Lab) -> None:
    s = setup(lab, SS, 0x2000)  # PDTS=0: 128 directory entries, PASIDs up to 0x1FFF
    s.map(IOVA, HPA)
    lab.check(s.rtaddr, s.req(IOVA + 0x40, WRITE), watch=(HPA + 0x40,), spec=True)


# Was a finding of this suite; fixed in 0003 (hvt_run: MEM2DEV reads through a buffer).
def test_regression_read_fault_clobbers_sram(lab: Lab) -> None:
    s = setup(lab, FS)
    lab.bench.program(s.rtaddr)
    dev = lab.bench.hvt
    dev.sram_write(SRAM, b"\x5a" * 64)
    res = dev.dma(IOVA, SRAM, 64, HvtDir.MEM2DEV, PASID)
    assert res.code == HvtCode.READ_FAULT and res.xferred == 0
    lab.bench.iommu.clear_faults()
    dev.clear_status()
    agree(dev.sram_read(SRAM, 64) == b"\x5a" * 64, "a refused read changed the SRAM")


# ============================================================================================
# Regressions: findings of the series' review, fixed in 0002 (c7ad054)
# ============================================================================================

#: Pages in the interrupt range FEE0_0000h-FEEF_FFFFh (its first and last) and one between.
IRQ_FIRST, IRQ_LAST, IRQ_UNMAPPED = 0xFEE0_0000, 0xFEEF_F000, 0xFEE0_1000
#: Where the mappings under test move to (a page no other mapping of these tests uses).
NEW_HPA = 0x500_0000


def invalidation_queue(lab: Lab) -> InvalidationQueue:
    """The unit's queued-invalidation interface on [IQ_BASE, +4 KiB) (below the arena)."""
    return InvalidationQueue(lab.bench.iommu, IQ_BASE, IQ_STATUS)


def pasid_iotlb(pasid: int, *, address: int | None = None, am: int = 0) -> int:
    """A PASID-based-IOTLB invalidation of DID 1 (every set-up's domain): PASID-selective,
    or page-selective for ``address`` (2^``am`` pages)."""
    if address is None:
        return PasidIotlbInvDesc.encode({"TYPE": InvDescType.PASID_IOTLB, "G": 0b10,
                                         "DID": 1, "PASID": pasid})
    return PasidIotlbInvDesc.encode({"TYPE": InvDescType.PASID_IOTLB, "G": 0b11, "DID": 1,
                                     "PASID": pasid, "ADDR": address >> 12, "AM": am})


def vm_rss(lab: Lab) -> int:
    """QEMU's resident set (VmRSS of /proc/<pid>/status), in bytes."""
    pid = lab.bench.qemu.pid
    assert pid is not None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


# The build before the fix aborted QEMU (an assertion in vtd_do_iommu_translate).
@pytest.mark.parametrize("pgtt", [FS, SS, NESTED], ids=["fs", "ss", "nested"])
def test_regression_pasid_request_in_interrupt_range(lab: Lab, pgtt: Pgtt) -> None:
    """s3.15: a request-with-PASID whose input address lies in FEEx_xxxxh is translated like
    any other. Mapped (the range's first and last page), reads and writes, user and
    supervisor land at the model's output; unmapped, the model's fault is recorded (FS and
    nested 0x71, SS the stock 0x05/0x06) and QEMU goes on answering."""
    s = setup(lab, pgtt)
    s.map(IRQ_FIRST, HPA)
    s.map(IRQ_LAST, HPA + PAGE_4K)
    nested_gpas = (HPA + DATA_GPA + 0x40, HPA + DATA_GPA + PAGE_4K + 0xFC0)
    for priv in (False, True):
        for access in (READ, WRITE):
            translates(lab.check(s.rtaddr, s.req(IRQ_FIRST + 0x40, access, priv),
                                 watch=nested_gpas), HPA + 0x40)
            translates(lab.check(s.rtaddr, s.req(IRQ_LAST + 0xFC0, access, priv),
                                 watch=nested_gpas), HPA + PAGE_4K + 0xFC0)
            qemu = 0x71 if pgtt != SS else 0x05 if access is WRITE else 0x06
            reason = R.SM_FS_NOT_PRESENT if pgtt != SS else R.SM_SS_NOT_PRESENT
            faults(lab.check(s.rtaddr, s.req(IRQ_UNMAPPED + 0x80, access, priv),
                             watch=(HPA + 0x80, HPA + DATA_GPA + 0x80)), reason, qemu)
    assert lab.bench.hvt.reg(HvtReg.ID) == HVT_ID_VALUE, "QEMU stopped answering"


# Both cases were findings of this suite in the review round: FI held the offset inside the
# interrupt window (vtd_report_ir_illegal_access), and a supervisor pass-through request was
# not blocked at all (the slow path's pass-through had no interrupt-range check). Fixed in
# 0002.
@pytest.mark.parametrize("priv", [False, True], ids=["user", "supervisor"])
def test_pass_through_pasid_request_in_interrupt_range(lab: Lab, priv: bool) -> None:
    """s3.15: a request-with-PASID into FEEx_xxxxh processed with pass-through translation is
    blocked with SGN.8 (0x87), user or supervisor, and nothing is written."""
    s = setup(lab, PT)
    try:
        for access in (WRITE, READ):
            faults(lab.check(s.rtaddr, s.req(0xFEE0_5040, access, priv)),
                   R.SM_INTERRUPT_ADDRESS, 0x87)
    finally:
        lab.bench.iommu.clear_faults()
        lab.bench.hvt.clear_status()


# The build before the fix kept the pass-through path until a context-cache invalidation.
def test_regression_pasid_cache_invalidation_leaves_pass_through(lab: Lab) -> None:
    """A PASID entry rewritten from pass-through to second-stage (IOVA X -> Y), then
    invalidated as Linux does (PASID-cache invalidation PASID-selective, PASID-based IOTLB
    invalidation PASID-selective, a wait; queued, no context-cache invalidation): the next
    DMA to X lands at Y, not at X. And back to pass-through the same way: at X again. (User
    requests: supervisor address spaces never take the pass-through path, 0002.)"""
    priv = False
    s = setup(lab, PT)
    x = HPA + 0x5000
    translates(lab.check(s.rtaddr, s.req(x + 0x40, WRITE, priv)), x + 0x40)
    ss_root = lab.t.alloc()
    lab.t.ss_map(ss_root, 4, x, NEW_HPA)
    pc = PasidCacheInvDesc.encode({"TYPE": InvDescType.PASID_CACHE, "G": 0b01, "DID": 1,
                                   "PASID": PASID})
    with invalidation_queue(lab).enabled() as queue:
        lab.t.edit(PasidTableEntry, s.pe, PGTT=SS, SSPTPTR=ss_root >> 12)
        queue.submit(pc, pasid_iotlb(PASID))
        for access in (WRITE, READ):
            translates(lab.check(s.rtaddr, s.req(x + 0x40, access, priv), program=False,
                                 invalidate=False), NEW_HPA + 0x40)
        lab.t.edit(PasidTableEntry, s.pe, PGTT=PT, SSPTPTR=0)
        queue.submit(pc, pasid_iotlb(PASID))
        translates(lab.check(s.rtaddr, s.req(x + 0x40, WRITE, priv), program=False,
                             invalidate=False, watch=(NEW_HPA + 0x40,)), x + 0x40)


# The build before the fix left nested IOTLB entries in place (only first-stage ones went).
@pytest.mark.parametrize("how", ["piotlb-page", "piotlb-2m-range", "iotlb-psi-in-domain"])
def test_regression_nested_iotlb_invalidation(lab: Lab, how: str) -> None:
    """Nested IOVA -> HPA, one DMA (QEMU caches the combined translation), the first-stage
    leaf moved to NEW_HPA, then one queued invalidation: a page-selective PASID-based IOTLB
    invalidation of that page (AM=0) or of its 2 MiB range (AM=9), or an IOTLB
    page-selective-within-domain invalidation of another page, which drops every first-stage
    and nested entry of the domain (s6.5.2). The next reads and writes follow the new leaf."""
    s = setup(lab, NESTED)
    s.map(IOVA, HPA)
    translates(lab.check(s.rtaddr, s.req(IOVA + 0x40, WRITE)), HPA + 0x40)
    s.map(IOVA, NEW_HPA)
    desc = {
        "piotlb-page": pasid_iotlb(PASID, address=IOVA),
        "piotlb-2m-range": pasid_iotlb(PASID, address=IOVA & ~(PAGE_2M - 1), am=9),
        "iotlb-psi-in-domain": IotlbInvDesc.encode({
            "TYPE": InvDescType.IOTLB, "G": 0b11, "DID": 1, "ADDR": (IOVA + PAGE_1G) >> 12}),
    }[how]
    with invalidation_queue(lab).enabled() as queue:
        queue.submit(desc)
        for access in (WRITE, READ):
            translates(lab.check(s.rtaddr, s.req(IOVA + 0x40, access), program=False,
                                 invalidate=False, watch=(HPA + 0x40, HPA + DATA_GPA + 0x40)),
                       NEW_HPA + 0x40)


# The build before the fix kept every (PASID, privilege) address space: its RSS grew by
# 150-250 MiB over these 300 PASIDs (superlinearly; this build's: not at all).
def test_regression_many_pasids_stay_bounded(lab: Lab) -> None:
    """One device, PASIDs 1-300, each with first- or second-stage tables of its own mapping
    IOVA to a page of its own; user and supervisor, reads and writes. The device keeps at
    most 16 PASID address spaces (the least recently used re-keyed): every DMA lands at its
    PASID's page, also PASIDs 1-20 again once 280 others have evicted them, and QEMU's RSS
    grows by less than 100 MiB from 20 PASIDs to 300."""
    t = lab.tables()
    rtaddr = t.scalable()
    pdir = t.sm_device(rtaddr, SID)
    t.pasid_entry(pdir, 0, PGTT=SS, AW=2, SSPTPTR=t.alloc() >> 12)
    pasids = range(1, 301)

    def page(pasid: int) -> int:
        return 0x400_0000 + pasid * PAGE_4K

    for pasid in pasids:
        root = t.alloc()
        if pasid % 2:
            t.fs_map(root, 4, IOVA, page(pasid))
            t.fs_set_ad(root, 4, IOVA)
            t.pasid_entry(pdir, pasid, PGTT=FS, AW=2, PWSNP=1, SRE=1, FSPTPTR=root >> 12)
        else:
            t.ss_map(root, 4, IOVA, page(pasid))
            t.pasid_entry(pdir, pasid, PGTT=SS, AW=2, SRE=1, SSPTPTR=root >> 12)
    lab.bench.program(rtaddr)

    def run(some: range) -> None:
        for pasid in some:
            request = DmaRequest(SID, Iova(IOVA + 0x40), WRITE if pasid % 3 else READ, pasid,
                                 pasid % 4 == 0)
            translates(lab.check(rtaddr, request, program=False, invalidate=False,
                                 watch=(page(pasid - 1) + 0x40, page(pasid + 1) + 0x40)),
                       page(pasid) + 0x40)

    run(pasids[:20])
    rss_20 = vm_rss(lab)
    run(pasids[20:])
    rss_all = vm_rss(lab)
    run(pasids[:20])
    assert rss_all - rss_20 < 100 << 20, (
        f"QEMU's RSS grew by {(rss_all - rss_20) >> 20} MiB from 20 PASIDs to {len(pasids)}")


def test_invalidation_descriptors_round_trip() -> None:
    """Each declared descriptor field encodes and decodes exactly its own bits."""
    for struct in INV_DESCRIPTORS:
        seen = 0
        for f in struct.FIELDS:
            assert not seen & f.mask, f"{struct.__name__}.{f.name} overlaps"
            seen |= f.mask
            ones = (1 << f.width) - 1
            value = struct.encode({f.name: ones})
            assert value == f.mask and struct.decode(value)[f.name] == ones
            assert struct.from_bytes(struct.to_bytes(value)) == value


# ============================================================================================
# Random tables (hypothesis)
# ============================================================================================


@dataclass(frozen=True)
class Mapping:
    iova: int
    hpa: int
    size: int
    ss_size: int
    probe: int
    leaf: tuple[tuple[str, int], ...]
    ss_leaf: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Probe:
    iova: int
    access: Access
    priv: bool
    count: int


@dataclass(frozen=True)
class Scenario:
    pgtt: Pgtt
    pasid: int | None
    sre: int
    wpe: int
    mappings: tuple[Mapping, ...]
    probes: tuple[Probe, ...]
    mutation: tuple[str, int, int] | None  # (structure, path index, bit)


#: PASID-entry bits random flips leave alone: AW (first-stage canonicality follows it,
#: QEMU_NOTES) and RID_PASID-entry-wide effects are out of reach (only the case's PASID).
PASID_AW_BITS = range(2, 5)


def _avoid_interrupts(iova: int, pasid: int | None) -> int:
    """Requests without PASID to FEEx_xxxxh are interrupt messages (the interrupt-remapping
    window catches them), not DMA; requests-with-PASID there are translated (s3.15)."""
    return iova ^ 1 << 36 if pasid is None and iova in INTERRUPT_WINDOW else iova


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """One PGTT for one PASID (or RID_PASID), 1-3 mappings in distinct 1 GiB regions, 1-3
    probes (user or supervisor, read or write) and at most one flipped bit on the way."""
    pgtt = draw(st.sampled_from([FS, FS, SS, NESTED, NESTED, PT]))
    pasid = draw(st.sampled_from([None, 0, 1, 0x3F, 0x40, PASID, 0x1FFF]))
    sre, wpe = draw(st.sampled_from([1, 1, 1, 0])), draw(st.sampled_from([0, 0, 1]))
    regions = draw(st.lists(st.integers(0, (1 << 18) - 1), min_size=1, max_size=3,
                            unique=True))
    mappings = []
    for region in regions:
        sizes = [PAGE_4K, PAGE_4K, PAGE_2M] + ([PAGE_1G] if pgtt != NESTED else [])
        size = draw(st.sampled_from(sizes))
        ss_size = draw(st.sampled_from([PAGE_4K, PAGE_2M])) if pgtt == NESTED else size
        inner = draw(st.integers(0, PAGE_1G // size - 1)) * size
        if size == PAGE_1G:
            hpa = 0
        else:
            lo = TARGETS[0] // size
            hi = (TARGETS[1] - (DATA_GPA if pgtt == NESTED else 0)) // size - 1
            hpa = draw(st.integers(lo, hi)) * size
        probe = draw(st.integers(0, size // PAGE_4K - 1)) * PAGE_4K if size != PAGE_1G \
            else draw(st.integers(TARGETS[0] // PAGE_4K, TARGETS[1] // PAGE_4K - 1)) * PAGE_4K
        if pgtt == SS:
            leaf = {"R": draw(st.sampled_from([1, 1, 1, 1, 0])),
                    "W": draw(st.sampled_from([1, 1, 1, 0]))}
        else:
            leaf = {"RW": draw(st.sampled_from([1, 1, 1, 0])),
                    "US": draw(st.sampled_from([1, 1, 1, 1, 0]))}
        ss_leaf = {"R": draw(st.sampled_from([1, 1, 1, 1, 0])),
                   "W": draw(st.sampled_from([1, 1, 1, 0]))} if pgtt == NESTED else {}
        iova = region << 30 | inner
        if pgtt != SS and iova >> 47:
            iova |= 0xFFFF << 48
        mappings.append(Mapping(iova, hpa, size, ss_size, probe, tuple(leaf.items()),
                                tuple(ss_leaf.items())))
    probes = []
    for _ in range(draw(st.integers(1, 3))):
        m = draw(st.sampled_from(mappings))
        count = draw(st.sampled_from([4, 8, 64]))
        where = draw(st.sampled_from(["probe"] * 4 + ["next-page", "identity"]))
        if where == "identity" or pgtt == PT:
            page = draw(st.integers(TARGETS[0] // PAGE_4K, TARGETS[1] // PAGE_4K - 1))
            iova = page * PAGE_4K
        else:
            iova = (m.iova + m.probe + (PAGE_4K if where == "next-page" else 0)) % (1 << 64)
        iova += draw(st.integers(0, (PAGE_4K - count) // 4)) * 4
        access = draw(st.sampled_from([READ, WRITE]))
        priv = pasid is not None and draw(st.booleans())
        probes.append(Probe(_avoid_interrupts(iova, pasid), access, priv, count))
    mutation = None
    if draw(st.integers(0, 2)) == 0:
        kinds = ["pasid-entry", "pasid-dir"]
        kinds += {FS: ["fs"] * 4, SS: ["ss"] * 4, NESTED: ["fs", "fs", "ss", "ss", "ss-table"],
                  PT: []}[pgtt]
        kind = draw(st.sampled_from(kinds))
        width_bits = 192 if kind == "pasid-entry" else 64
        interesting = [0, 1, 2, 5, 6, 7, 11, 13, 48, 50, 52, 62, 63]
        if kind == "pasid-entry":
            interesting = [0, 1, 6, 7, 8, 128, 132, 130, 140, 160, 13, 40]
        bit = draw(st.sampled_from(interesting) | st.integers(0, width_bits - 1))
        if kind == "pasid-entry" and pgtt in (FS, NESTED) and bit in PASID_AW_BITS:
            bit = 5
        mutation = (kind, draw(st.integers(0, 4)), bit % width_bits)
    return Scenario(pgtt, pasid, sre, wpe, tuple(mappings), tuple(probes), mutation)


def _random_case(lab: Lab, sc: Scenario) -> None:
    s = setup(lab, sc.pgtt, sc.pasid, sre=sc.sre, wpe=sc.wpe)
    for m in sc.mappings if sc.pgtt != PT else ():
        s.map(m.iova, m.hpa, m.size, ss_size=m.ss_size, probe=m.probe, ss=dict(m.ss_leaf),
              **dict(m.leaf))
    if sc.mutation is not None:
        kind, index, bit = sc.mutation
        first = sc.probes[0].iova
        if kind == "fs":
            path = s.fs_path(first)
            s.flip(path[index % len(path)], bit)
        elif kind == "ss":
            m = sc.mappings[0]
            gpa = (s.gpa(m.hpa, m.size) + m.probe) if sc.pgtt == NESTED else first
            path = s.ss_path(gpa)
            s.flip(path[index % len(path)], bit)
        elif kind == "ss-table":
            table = s.fs_path(first)[index % len(s.fs_path(first))] & ~0xFFF
            path = s.ss_path(table + TABLE_GPA)
            s.flip(path[index % len(path)], bit)
        elif kind == "pasid-entry":
            s.flip(s.pe, bit)
        else:
            s.flip(lab.t.pasid_dir_entry_address(s.pdir, sc.pasid or 0), bit)
    lab.bench.program(s.rtaddr)
    targets = tuple(m.hpa + (p.iova - m.iova) % m.size for m in sc.mappings
                    for p in sc.probes if m.size != PAGE_1G)
    nested_gpas = tuple(t + DATA_GPA for t in targets) if sc.pgtt == NESTED else ()
    for p in sc.probes:
        request = s.req(p.iova, p.access, p.priv)
        outcome = lab.model(s.rtaddr, request)
        if isinstance(outcome, Translation) and not in_targets(outcome.output, p.count) \
                and p.access is WRITE:
            request = s.req(p.iova, READ, p.priv)
        v = lab.check(s.rtaddr, request, count=p.count, watch=targets + nested_gpas,
                      program=False)
        if isinstance(v.outcome, Translation):
            event(f"{sc.pgtt.name}: translation")
        elif v.compared:
            event(f"{sc.pgtt.name}: fault {v.outcome.code:#x}")
        else:
            event(f"{sc.pgtt.name}: not comparable {v.outcome.code:#x} (QEMU does not see it)")


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_random_pasid_tables(lab: Lab, sc: Scenario) -> None:
    _random_case(lab, sc)


# ============================================================================================
# The bench
# ============================================================================================


def test_bench_reports_patched_caps(lab: Lab) -> None:
    """x-nested=on: FLTS, SLTS, NEST and SRS together; 20-bit PASIDs (ECAP.PSS=19)."""
    caps = lab.caps
    for name in ("SMTS", "FSTS", "SSTS", "NEST", "SRS", "PASID", "PT"):
        assert caps.get(name), name
    assert caps.pasid_bits == 20
    assert not caps.get("RPS") and not caps.get("SMPWCS")
    assert QEMU_PATCHED_NOTES


def test_hvt_device_identity(lab: Lab) -> None:
    """The function, its PASID capability (width 20, privileged mode supported) and the
    control bits the bench enabled."""
    dev = lab.bench.hvt
    assert dev.pasid_cap == 0x100
    assert dev.pasid_capability() == 20 << 8 | 1 << 2
    assert dev.pasid_control() == 0b101
    assert dev.pasid_width == 20 and dev.level == 0
    assert RtaddrReg.get(RtaddrReg.value(0x1000, Ttm.SCALABLE), "TTM") == Ttm.SCALABLE
