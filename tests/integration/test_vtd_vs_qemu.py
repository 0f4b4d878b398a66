"""Issue 3, proof 2: the VT-d model against QEMU 10.0.2's intel-iommu, one edu DMA at a time.

Each case builds root/context/PASID/paging structures with :mod:`hvtools.iommu.build` straight
into QEMU's guest RAM (qtest ``b64write``), asks the model (:func:`translate`, reading the very
same bytes back through qtest), latches the root table (SRTP, global context-cache and IOTLB
invalidation), and lets the edu device (00:03.0, no PASID) DMA:

- a Translation: the bytes land exactly at ``output`` (a write) or come from there (a read),
  the identity location and the would-be targets stay untouched, and nothing is recorded;
- a Fault: the bytes go nowhere watched, and FRCD_REG[0] holds F=1, FR = ``qemu_reason``,
  the source-id, T (read/write) and FI as :func:`fault_record` says (PP/PV as QEMU fills
  them, see :func:`expected_record`) -- or nothing when FPD suppresses the fault.

Where QEMU does not detect a condition at all (``qemu_reason`` is None) there is nothing to
compare: no DMA is made (the random batch reports such cases as hypothesis events), and
:func:`test_conditions_qemu_does_not_detect` pins what QEMU does instead. Where QEMU and the
model disagree on the outcome itself, the case is a ``deviation``: an ``xfail(strict=True)``
that only a :class:`Disagreement` satisfies, so a QEMU that changes is noticed. The random
batch steers around those deviations, or (FPD, :func:`qemu_records`) expects QEMU's way.

Three QEMUs serve the module (one per mode, started on first use): ``legacy``
(intel-iommu defaults), ``scalable`` (x-scalable-mode=on: PGTT second-stage and
pass-through) and ``flts`` (x-flts=on as well: PGTT first-stage and pass-through), each
under qtest (:mod:`hvtools.qemu.qtest`; on a QEMU without the qtest accelerator, a halted
TCG machine whose clock jumps to each timer). Guest RAM (256 MiB): bench staging page at
8 MiB, tables in [16 MiB, 32 MiB), DMA targets in [32 MiB, 256 MiB).

``HVTOOLS_VTD_EXAMPLES=N`` sets the random cases per mode (default 50, a fixed set);
``HVTOOLS_VTD_EXPLORE=1`` draws new ones on every run.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Iova
from hvtools.control.vtd_qtest import DmaResult, VtdQtestBench
from hvtools.errors import StateError, UsageError, VmCrashed, VmLaunchFailure
from hvtools.iommu.build import VtdTables
from hvtools.iommu.regs import EcapReg, IommuCaps
from hvtools.iommu.structures import (
    ContextEntry,
    FaultRecord,
    PasidDirEntry,
    PasidTableEntry,
    Pgtt,
    RootEntry,
    RtaddrReg,
    ScalableContextEntry,
    ScalableRootEntry,
    Ttm,
)
from hvtools.iommu.walk import (
    Access,
    DmaRequest,
    FaultReason,
    fault_record,
    is_recorded,
    qemu_reason,
    source_id,
    translate,
)
from hvtools.qemu.qtest import QtestError, QtestMemory, QtestQemu, QtestState
from hvtools.translation import Fault, Outcome, Stage, Translation

pytestmark = pytest.mark.integration

R = FaultReason
READ, WRITE = Access.READ, Access.WRITE
SID = source_id(0, 3, 0)
MODES: dict[str, tuple[str, ...]] = {
    "legacy": (),
    "scalable": ("x-scalable-mode=on",),
    "flts": ("x-scalable-mode=on", "x-flts=on"),
}
ARENA = (0x100_0000, 0x200_0000)
TARGETS = (0x200_0000, 0x1000_0000)
#: Bus addresses edu must not use: 0xFEEx_xxxx is an interrupt (MSI) write, not DMA (s3.15).
INTERRUPT_WINDOW = range(0xFEE0_0000, 0xFEF0_0000)
#: Random cases per mode (raise with HVTOOLS_VTD_EXAMPLES to explore further).
EXAMPLES = int(os.environ.get("HVTOOLS_VTD_EXAMPLES", "50"))
#: HVTOOLS_VTD_EXPLORE=1: fresh random cases each run instead of the fixed derandomized set.
EXPLORE = os.environ.get("HVTOOLS_VTD_EXPLORE", "") == "1"


# ============================================================================================
# The oracle
# ============================================================================================


def in_targets(addr: int, size: int) -> bool:
    return TARGETS[0] <= addr and addr + size <= TARGETS[1]


def sentinel(addr: int, count: int) -> bytes:
    """What a watched location holds before a write: a function of the address alone, so
    overlapping watched ranges agree on every byte."""
    return bytes(((addr + i) * 0x9D + 0x5B) >> 3 & 0xFF for i in range(count))


def expected_record(request: DmaRequest, fault: Fault, code: int, rtaddr: int,
                    rid_pasid: int = 0) -> dict[str, int]:
    """The FRCD_REG fields QEMU records: :func:`fault_record` with FR = ``code``, except that
    QEMU marks faults found *walking* a scalable-mode PASID's tables PP=1, PV=RID_PASID even
    for a request without PASID (QEMU_NOTES; the spec has PP=0 there)."""
    rec = FaultRecord.decode(fault_record(request, fault))
    rec["FR"] = code
    if RtaddrReg.get(rtaddr, "TTM") & 1 and fault.stage is not Stage.VTD_ROOT:
        rec["PP"], rec["PV"] = 1, rid_pasid & 0xFFFF
    return rec


class Disagreement(AssertionError):
    """The model and QEMU disagree (what a deviation's strict xfail expects, and nothing
    else: a broken set-up fails with a plain AssertionError)."""


def agree(condition: bool, message: str) -> None:
    if not condition:
        raise Disagreement(message)


def deviation(reason: str) -> pytest.MarkDecorator:
    """A case where QEMU 10.0.2 departs from the specification (and the model): it must keep
    disagreeing, with a :class:`Disagreement` and nothing else."""
    return pytest.mark.xfail(strict=True, raises=Disagreement,
                             reason=f"QEMU 10.0.2 deviation: {reason}")


def qemu_records(fault: Fault) -> bool:
    """:func:`is_recorded` as QEMU 10.0.2 decides it: a fault found while fetching the
    context or PASID structures is suppressed by the context entry's FPD alone, not by an FPD
    in the PASID-directory or PASID-table entry (test_deviation_fpd_of_pasid_structures)."""
    scalable = any(s.table == ScalableContextEntry.NAME for s in fault.steps)
    if fault.stage is not Stage.VTD_ROOT or not scalable:
        return is_recorded(fault)
    pasid_tables = (PasidDirEntry.NAME, PasidTableEntry.NAME)
    return is_recorded(replace(fault, steps=tuple(s for s in fault.steps
                                                  if s.table not in pasid_tables)))


@dataclass
class Verdict:
    """One case's outcome: what the model said, what the unit showed, whether compared."""

    outcome: Outcome
    result: DmaResult | None
    compared: bool


class Lab:
    """One mode's QEMU, a table arena in its RAM, and the differential check."""

    def __init__(self, mode: str, bench: VtdQtestBench) -> None:
        self.mode = mode
        self.bench = bench
        self.mem: QtestMemory = bench.memory
        self.t = VtdTables(bench.memory, base=ARENA[0], limit=ARENA[1])
        self.rng = random.Random(0x7D)

    def tables(self) -> VtdTables[QtestMemory]:
        """The arena, emptied for a new case: the last case's pages are zeroed, so a pointer
        a mutation bends into the arena finds the same bytes on every run."""
        self.mem.fill(self.t.base, self.t.next - self.t.base)
        self.t.reset()
        return self.t

    def model(self, rtaddr: int, request: DmaRequest) -> Outcome:
        return translate(request, self.mem, rtaddr, self.bench.caps)

    def data(self, count: int) -> bytes:
        """Random bytes, none zero (a read that faults fetches zeros in QEMU)."""
        return bytes(b | 1 for b in self.rng.randbytes(count))

    def check(self, rtaddr: int, request: DmaRequest, *, count: int = 16,
              watch: tuple[int, ...] = (), program: bool = True, invalidate: bool = True,
              offset: int = 0, preloaded: bytes | None = None,
              known_deviations: bool = False) -> Verdict:
        """Run ``request`` (``count`` bytes) on the model and on QEMU; raise
        :class:`Disagreement` where they differ.

        ``watch``: guest-physical places the bytes must not reach (besides the identity
        address). ``preloaded``: for a write, edu's buffer already holds these bytes at
        ``offset`` (loading it switches translation off and on, which flushes QEMU's caches).
        ``known_deviations``: expect QEMU's own behaviour where a deviation test already pins
        it (:func:`qemu_records`) instead of failing again.
        """
        bench, mem = self.bench, self.mem
        if program:
            bench.program(rtaddr)
        outcome = self.model(rtaddr, request)
        expected = None if isinstance(outcome, Translation) else qemu_reason(
            outcome, request, bench.caps)
        if isinstance(outcome, Fault) and expected is None:
            # QEMU does not detect this condition (qemu_reason, QEMU_NOTES): there is nothing
            # to compare, and QEMU may translate where the model faults, so no DMA is made;
            # test_conditions_qemu_does_not_detect pins what QEMU does instead.
            return Verdict(outcome, None, compared=False)

        data = preloaded if preloaded is not None else self.data(count)
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
            if preloaded is None:
                bench.load_buffer(data, offset)
        else:
            bench.load_buffer(bytes(b ^ 0xA5 for b in data), offset)
            for a in watched:
                mem.write(a, data)
            if checkable and landing is not None:
                mem.write(landing, data)
            elif landing is not None and mem.contains(landing, count):
                before = mem.read(landing, count)  # tables or staging: read what is there

        result = bench.dma(request, count, offset, invalidate=invalidate)
        records = result.decoded()
        where = f"{self.mode}: {request.access} {request.address:#x} -> {outcome}; QEMU " \
                f"recorded {records}"
        if request.write:
            if checkable and landing is not None:
                agree(mem.read(landing, count) == data, f"bytes did not land: {where}")
            for a in watched:
                agree(mem.read(a, count) == sentinel(a, count),
                      f"bytes landed at {a:#x}: {where}")
        else:
            got = bench.dump_buffer(count, offset)
            if checkable:
                agree(got == data, f"the read did not fetch the output's bytes: {where}")
            elif before is not None:
                agree(got == before, f"the read did not fetch the output's bytes: {where}")
            if isinstance(outcome, Fault):
                agree(got != data, f"a faulting read fetched a watched location: {where}")

        if isinstance(outcome, Translation):
            agree(not result.faulted, f"QEMU faulted where the model translates: {where}")
        elif not (qemu_records(outcome) if known_deviations else is_recorded(outcome)):
            agree(not result.faulted, f"QEMU recorded a fault FPD suppresses: {where}")
        else:
            assert expected is not None
            want = expected_record(request, outcome, expected, rtaddr)
            agree(len(records) == 1, f"want one record {want}: {where}")
            got_rec = dict(records[0])
            if not want["PP"]:
                got_rec["PV"] = want["PV"]  # PV means nothing without PP (QEMU puts 0xFFFF)
            agree(got_rec == want, f"fault record differs from {want}: {where}")
        bench.iommu.clear_faults()
        return Verdict(outcome, result, compared=True)


class Labs:
    """The module's QEMUs, one per mode, started on first use and closed at the end."""

    def __init__(self) -> None:
        self.labs: dict[str, Lab] = {}

    def __call__(self, mode: str) -> Lab:
        if mode not in self.labs:
            bench = VtdQtestBench(MODES[mode], name=f"vtd-{mode}").start()
            self.labs[mode] = Lab(mode, bench)
        return self.labs[mode]

    def close(self) -> None:
        for lab in self.labs.values():
            lab.bench.close()


@pytest.fixture(scope="module")
def labs() -> Iterator[Labs]:
    all_labs = Labs()
    yield all_labs
    all_labs.close()


# ============================================================================================
# Set-ups
# ============================================================================================


@dataclass
class Setup:
    """A device's tables in one case: the RTADDR value and the paging root behind it."""

    t: VtdTables[QtestMemory]
    rtaddr: int
    root: int = 0  # second- or first-stage table root
    levels: int = 4
    first_stage: bool = False
    pdir: int = 0
    pe: int = 0  # PASID-table entry address (scalable mode)
    ce: int = 0  # context entry address
    extra: dict[str, int] = field(default_factory=dict)

    def map(self, iova: int, gpa: int, size: int = PAGE_4K, **leaf: int) -> int:
        """Map one page; first-stage entries on the path get A set (no A/D update needed)."""
        if self.first_stage:
            e = self.t.fs_map(self.root, self.levels, iova, gpa, size, **leaf)
            self.t.fs_set_ad(self.root, self.levels, iova)
            return e
        return self.t.ss_map(self.root, self.levels, iova, gpa, size, **leaf)

    def path(self, iova: int) -> list[int]:
        return self.t.entry_path(self.root, self.levels, iova, first_stage=self.first_stage)

    def flip(self, addr: int, bit: int) -> None:
        """Flip one bit of the entry at ``addr`` (bit numbers past 63 reach later qwords)."""
        word = addr + bit // 64 * 8
        self.t.mem.write_u64(word, self.t.mem.read_u64(word) ^ 1 << bit % 64)


def legacy(lab: Lab, aw: int = 2, **ctx: int) -> Setup:
    t = lab.tables()
    rtaddr = t.legacy()
    root = t.alloc()
    ce = t.legacy_device(rtaddr, SID, SSPTPTR=root >> 12, AW=aw, **ctx)
    return Setup(t, rtaddr, root, levels=aw + 2, ce=ce)


def scalable(lab: Lab, pgtt: int, *, aw: int = 2, ctx: dict[str, int] | None = None,
             **pe: int) -> Setup:
    """Scalable mode with a PASID-0 entry of type ``pgtt`` (RID_PASID=0). First-stage entries
    get AW=2 too: QEMU checks canonicality against it (see the AW=0 deviation)."""
    t = lab.tables()
    rtaddr = t.scalable()
    pdir = t.sm_device(rtaddr, SID, **(ctx or {}))
    root = t.alloc()
    fields = {"PGTT": pgtt, "AW": aw, "PWSNP": 1}
    if pgtt == Pgtt.FIRST_STAGE:
        fields["FSPTPTR"] = root >> 12
    else:
        fields["SSPTPTR"] = root >> 12
    pe_addr = t.pasid_entry(pdir, 0, **{**fields, **pe})
    ce = t.context_address(rtaddr, SID)
    assert ce is not None
    return Setup(t, rtaddr, root, levels=aw + 2 if pgtt != Pgtt.FIRST_STAGE else 4,
                 first_stage=pgtt == Pgtt.FIRST_STAGE, pdir=pdir, pe=pe_addr, ce=ce)


def native(lab: Lab) -> Setup:
    """The mode's own kind of translation: legacy SS, scalable PGTT=SS, or PGTT=FS."""
    if lab.mode == "legacy":
        return legacy(lab)
    return scalable(lab, Pgtt.FIRST_STAGE if lab.mode == "flts" else Pgtt.SECOND_STAGE)


def req(address: int, access: Access = READ) -> DmaRequest:
    return DmaRequest(SID, Iova(address), access)


def translates(v: Verdict, output: int | None = None) -> None:
    assert v.compared and isinstance(v.outcome, Translation), v.outcome
    if output is not None:
        assert v.outcome.output == output, f"{v.outcome.output:#x} != {output:#x}"


def faults(v: Verdict, model: FaultReason, qemu: int | None) -> None:
    """The model found ``model``; QEMU recorded exactly ``qemu`` (None: nothing)."""
    assert isinstance(v.outcome, Fault), v.outcome
    assert v.outcome.code == model, f"model: {v.outcome.code:#x} {v.outcome.reason}"
    assert v.compared and v.result is not None
    assert [FaultRecord.get(r, "FR") for r in v.result.records] == ([] if qemu is None
                                                                    else [qemu])


IOVA = 0x1_2345_6000  # 4-level address; 3-level cases use addresses below 2^39
GPA = 0x300_0000


# ============================================================================================
# Translations: every mode, every page size, reads and writes
# ============================================================================================


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", [PAGE_4K, PAGE_2M, PAGE_1G], ids=["4K", "2M", "1G"])
def test_pages_translate(labs: Labs, mode: str, size: int) -> None:
    lab = labs(mode)
    s = native(lab)
    iova = IOVA & ~(size - 1)
    gpa = 0 if size == PAGE_1G else 0x400_0000  # the only 1 GiB-aligned RAM is at 0
    s.map(iova, gpa, size)
    for off in (0x10, 0xFF0, 0x5_6010, 0x1F_FF00, 0x345_6010, 0xFFF_F000):
        if off >= size or not in_targets(gpa + off, 16):
            continue
        for access in (READ, WRITE):
            v = lab.check(s.rtaddr, req(iova + off, access), watch=(gpa + off + PAGE_4K,))
            translates(v, gpa + off)
            assert v.outcome.page_size == size  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["legacy", "scalable"])
def test_three_level_second_stage(labs: Labs, mode: str) -> None:
    lab = labs(mode)
    s = legacy(lab, aw=1) if mode == "legacy" else scalable(lab, Pgtt.SECOND_STAGE, aw=1)
    s.map(0x7F_FFFF_F000, GPA)
    s.map(0x40_0000, 0x500_0000, PAGE_2M)
    translates(lab.check(s.rtaddr, req(0x7F_FFFF_F123, WRITE)), GPA + 0x123)
    translates(lab.check(s.rtaddr, req(0x41_2340)), 0x501_2340)
    faults(lab.check(s.rtaddr, req(1 << 39)),
           R.ADDRESS_BEYOND_AW if mode == "legacy" else R.SM_ADDRESS_BEYOND_AW, 0x04)


@pytest.mark.parametrize("mode", list(MODES))
def test_pass_through(labs: Labs, mode: str) -> None:
    lab = labs(mode)
    s = legacy(lab, TT=2) if mode == "legacy" else scalable(lab, Pgtt.PASS_THROUGH)
    for access in (READ, WRITE):
        translates(lab.check(s.rtaddr, req(0x567_8010, access)), 0x567_8010)
    # Back to translated tables in the same QEMU: the pass-through fast path must be undone
    # by the invalidation, or this DMA would land at its identity address.
    s2 = native(lab)
    s2.map(0x567_8000, GPA)
    translates(lab.check(s2.rtaddr, req(0x567_8010, WRITE)), GPA + 0x10)


def test_legacy_tables_on_a_scalable_unit(labs: Labs) -> None:
    """TTM=00b on a unit with ECAP.SMTS: legacy root and context entries (s11.4.5)."""
    lab = labs("scalable")
    s = legacy(lab)
    s.map(IOVA, GPA, W=0)
    translates(lab.check(s.rtaddr, req(IOVA + 8)), GPA + 8)
    faults(lab.check(s.rtaddr, req(IOVA + 8, WRITE), watch=(GPA + 8,)), R.WRITE_DENIED, 0x05)


def test_several_mappings_and_neighbours(labs: Labs) -> None:
    """Pages side by side in one table: each lands in its own frame, the gaps fault."""
    for mode in MODES:
        lab = labs(mode)
        s = native(lab)
        frames = {IOVA + i * PAGE_4K: 0x600_0000 + (7 - i) * PAGE_4K for i in range(0, 8, 2)}
        for iova, gpa in frames.items():
            s.map(iova, gpa)
        for iova, gpa in frames.items():
            translates(lab.check(s.rtaddr, req(iova + 0x80, WRITE), watch=(*frames.values(),)),
                       gpa + 0x80)
            v = lab.check(s.rtaddr, req(iova + PAGE_4K, WRITE), watch=(*frames.values(),))
            assert isinstance(v.outcome, Fault) and v.compared


# ============================================================================================
# Faults
# ============================================================================================

Mutator = Callable[[Lab, Setup], None]
#: (id, mode, what to break, access, the model's fault, what QEMU 10.0.2 records or None
#: when the fault is suppressed)
FaultCase = tuple[str, str, Mutator, Access, FaultReason, int | None]


def _no_device(lab: Lab, s: Setup) -> None:
    rta = RtaddrReg.get(s.rtaddr, "RTA") << 12
    lab.t.mem.write(rta, bytes(16))  # bus 0's root entry (both halves in scalable mode)


def _context_clear(lab: Lab, s: Setup) -> None:
    s.flip(s.ce, 0)


def _leaf(bit: int) -> Mutator:
    return lambda lab, s: s.flip(s.path(IOVA)[-1], bit)


def _level(index: int, bit: int) -> Mutator:
    return lambda lab, s: s.flip(s.path(IOVA)[index], bit)


def _leaf_clear_rw(lab: Lab, s: Setup) -> None:
    leaf = s.path(IOVA)[-1]
    lab.t.mem.write_u64(leaf, lab.t.mem.read_u64(leaf) & ~3)


def _mid_clear(lab: Lab, s: Setup) -> None:
    e = s.path(IOVA)[2]
    lab.t.mem.write_u64(e, lab.t.mem.read_u64(e) & ~(1 if s.first_stage else 3))


def _root_at(addr: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        s.rtaddr = RtaddrReg.value(addr, RtaddrReg.get(s.rtaddr, "TTM"))
    return mutate


def _context_table_at(addr: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        rta = RtaddrReg.get(s.rtaddr, "RTA") << 12
        if RtaddrReg.get(s.rtaddr, "TTM") == Ttm.SCALABLE:
            lab.t.put(ScalableRootEntry, rta, ScalableRootEntry.encode(
                {"LP": 1, "LCTP": addr >> 12}))
        else:
            lab.t.put(RootEntry, rta, RootEntry.encode({"P": 1, "CTP": addr >> 12}))
    return mutate


def _paging_root_at(addr: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        if s.pe:
            lab.t.edit(PasidTableEntry, s.pe,
                       **{"FSPTPTR" if s.first_stage else "SSPTPTR": addr >> 12})
        else:
            lab.t.edit(ContextEntry, s.ce, SSPTPTR=addr >> 12)
    return mutate


def _next_table_at(addr: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        top = s.path(IOVA)[0]
        e = lab.t.mem.read_u64(top)
        lab.t.mem.write_u64(top, e & ~(((1 << 52) - 1) & ~0xFFF) | addr)
    return mutate


def _context(**fields: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        struct = ScalableContextEntry if s.pe else ContextEntry
        lab.t.edit(struct, s.ce, **fields)
    return mutate


def _pasid(**fields: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        lab.t.edit(PasidTableEntry, s.pe, **fields)
    return mutate


def _pasid_zero(lab: Lab, s: Setup) -> None:
    lab.t.put(PasidTableEntry, s.pe, 0)


def _pdir_clear(lab: Lab, s: Setup) -> None:
    lab.t.mem.write_u64(s.pdir, 0)


def _pdir_at(addr: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        lab.t.edit(ScalableContextEntry, s.ce, PASIDDIRPTR=addr >> 12)
    return mutate


def _pasid_table_at(addr: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        lab.t.put(PasidDirEntry, s.pdir, PasidDirEntry.encode({"P": 1,
                                                               "SMPTBLPTR": addr >> 12}))
    return mutate


def _map(size: int = PAGE_4K, gpa: int = GPA, **leaf: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        s.map(IOVA & ~(size - 1), gpa, size, **leaf)
    return mutate


def _iova(address: int) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        s.extra["iova"] = address
    return mutate


def _both(*mutators: Mutator) -> Mutator:
    def mutate(lab: Lab, s: Setup) -> None:
        for m in mutators:
            m(lab, s)
    return mutate


BEYOND_RAM = 0x1_0000_0000  # no RAM at 4 GiB with 256 MiB
HOLE = 0xD000_0000  # nothing mapped there in the PCI hole
FAULT_CASES: list[FaultCase] = [
    # -- legacy mode (s3.4.2; LRT/LCT/LSS/LGN conditions) --------------------------------
    ("root-not-present", "legacy", _no_device, READ, R.ROOT_NOT_PRESENT, 0x01),
    ("context-not-present", "legacy", _context_clear, READ, R.CONTEXT_NOT_PRESENT, 0x02),
    ("root-reserved", "legacy", lambda lab, s: s.flip(RtaddrReg.get(s.rtaddr, "RTA") << 12, 5),
     READ, R.ROOT_RESERVED, 0x0A),
    ("root-reserved-high", "legacy",
     lambda lab, s: s.flip(RtaddrReg.get(s.rtaddr, "RTA") << 12, 100), READ,
     R.ROOT_RESERVED, 0x0A),
    ("context-reserved", "legacy", lambda lab, s: s.flip(s.ce, 71), WRITE,
     R.CONTEXT_RESERVED, 0x0B),
    ("context-tt-reserved", "legacy", _context(TT=3), READ, R.CONTEXT_INVALID, 0x03),
    ("context-tt-device-tlb", "legacy", _context(TT=1), READ, R.CONTEXT_INVALID, 0x03),
    ("context-aw-57", "legacy", _context(AW=3), READ, R.CONTEXT_INVALID, 0x03),
    ("root-table-beyond-ram", "legacy", _root_at(BEYOND_RAM), READ,
     R.ROOT_TABLE_ACCESS, 0x08),
    ("root-table-in-hole", "legacy", _root_at(HOLE), WRITE, R.ROOT_TABLE_ACCESS, 0x08),
    ("context-table-beyond-ram", "legacy", _context_table_at(BEYOND_RAM), READ,
     R.CONTEXT_TABLE_ACCESS, 0x09),
    ("ssptptr-beyond-ram", "legacy", _paging_root_at(BEYOND_RAM), READ,
     R.CONTEXT_INVALID, 0x03),
    ("ss-table-beyond-ram", "legacy", _next_table_at(BEYOND_RAM), READ,
     R.SS_ENTRY_ACCESS, 0x07),
    ("leaf-not-present-read", "legacy", _leaf_clear_rw, READ, R.READ_DENIED, 0x06),
    ("leaf-not-present-write", "legacy", _leaf_clear_rw, WRITE, R.WRITE_DENIED, 0x05),
    ("pde-not-present", "legacy", _mid_clear, WRITE, R.WRITE_DENIED, 0x05),
    ("unmapped", "legacy", _iova(IOVA + PAGE_2M), READ, R.READ_DENIED, 0x06),
    ("write-read-only", "legacy", _leaf(1), WRITE, R.WRITE_DENIED, 0x05),
    ("read-write-only", "legacy", _leaf(0), READ, R.READ_DENIED, 0x06),
    ("write-read-only-pml4e", "legacy", _level(0, 1), WRITE, R.WRITE_DENIED, 0x05),
    ("leaf-reserved-62", "legacy", _leaf(62), READ, R.SS_RESERVED, 0x0C),
    ("leaf-reserved-haw", "legacy", _leaf(50), WRITE, R.SS_RESERVED, 0x0C),
    ("leaf-snp-reserved", "legacy", _leaf(11), READ, R.SS_RESERVED, 0x0C),
    ("pml4e-ps-reserved", "legacy", _level(0, 7), READ, R.SS_RESERVED, 0x0C),
    ("pde-2m-reserved", "legacy", _both(_map(PAGE_2M, 0x400_0000), _leaf(13)),
     READ, R.SS_RESERVED, 0x0C),
    ("reserved-below-read-only", "legacy", _both(_level(0, 1), _leaf(62)), WRITE,
     R.SS_RESERVED, 0x05),  # QEMU stops at the read-only PML4E: 0x5 (qemu_reason)
    ("beyond-aw", "legacy", _iova(1 << 48), READ, R.ADDRESS_BEYOND_AW, 0x04),
    ("interrupt-range-output", "legacy", _map(gpa=0xFEE0_0000), WRITE,
     R.INTERRUPT_ADDRESS, 0x0E),
    # -- scalable mode, PGTT second-stage (s3.4.3, s3.7; SRT/SCT/SPD/SPT/SSS/SGN) --------
    ("sm-root-not-present", "scalable", _no_device, READ, R.SM_ROOT_NOT_PRESENT, 0x01),
    ("sm-context-not-present", "scalable", _context_clear, WRITE,
     R.SM_CONTEXT_NOT_PRESENT, 0x02),
    ("sm-root-reserved", "scalable",
     lambda lab, s: s.flip(RtaddrReg.get(s.rtaddr, "RTA") << 12, 3), READ,
     R.SM_ROOT_RESERVED, 0x0A),
    ("sm-context-reserved", "scalable", lambda lab, s: s.flip(s.ce, 5), READ,
     R.SM_CONTEXT_RESERVED, 0x0B),
    ("sm-context-reserved-high", "scalable", lambda lab, s: s.flip(s.ce, 200), READ,
     R.SM_CONTEXT_RESERVED, 0x0B),
    ("sm-root-table-beyond-ram", "scalable", _root_at(BEYOND_RAM), READ,
     R.SM_ROOT_ACCESS, 0x08),
    ("sm-context-table-beyond-ram", "scalable", _context_table_at(BEYOND_RAM), READ,
     R.SM_CONTEXT_ACCESS, 0x09),
    ("pasid-dir-not-present", "scalable", _pdir_clear, READ,
     R.SM_PASID_DIR_NOT_PRESENT, 0x51),
    ("pasid-dir-beyond-ram", "scalable", _pdir_at(BEYOND_RAM), READ,
     R.SM_PASID_DIR_ACCESS, 0x50),
    ("pasid-table-beyond-ram", "scalable", _pasid_table_at(BEYOND_RAM), WRITE,
     R.SM_PASID_ENTRY_ACCESS, 0x58),
    ("pasid-entry-not-present", "scalable", _pasid(P=0), READ,
     R.SM_PASID_ENTRY_NOT_PRESENT, 0x59),
    ("pasid-entry-all-zero", "scalable", _pasid_zero, READ,
     R.SM_PASID_ENTRY_NOT_PRESENT, 0x5B),  # QEMU checks PGTT first: 0x5B (qemu_reason)
    ("pgtt-zero", "scalable", _pasid(PGTT=0), READ, R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("pgtt-reserved-5", "scalable", _pasid(PGTT=5), WRITE, R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("pgtt-reserved-7", "scalable", _pasid(PGTT=7), READ, R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("pgtt-nested", "scalable", _pasid(PGTT=Pgtt.NESTED), READ,
     R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("pgtt-first-stage-without-flts", "scalable", _pasid(PGTT=Pgtt.FIRST_STAGE), READ,
     R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("pasid-aw-57", "scalable", _pasid(AW=3), READ, R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("sm-ssptptr-beyond-ram", "scalable", _paging_root_at(BEYOND_RAM), READ,
     R.SM_SSPTPTR_ACCESS, 0x03),
    ("sm-ss-table-beyond-ram", "scalable", _next_table_at(BEYOND_RAM), WRITE,
     R.SM_SS_ENTRY_ACCESS, 0x07),
    ("sm-leaf-not-present-read", "scalable", _leaf_clear_rw, READ,
     R.SM_SS_NOT_PRESENT, 0x06),
    ("sm-leaf-not-present-write", "scalable", _leaf_clear_rw, WRITE,
     R.SM_SS_NOT_PRESENT, 0x05),
    ("sm-pde-not-present", "scalable", _mid_clear, READ, R.SM_SS_NOT_PRESENT, 0x06),
    ("sm-write-read-only", "scalable", _leaf(1), WRITE, R.SM_WRITE_DENIED, 0x05),
    ("sm-read-write-only", "scalable", _leaf(0), READ, R.SM_READ_DENIED, 0x06),
    ("sm-leaf-reserved-62", "scalable", _leaf(62), WRITE, R.SM_SS_RESERVED, 0x0C),
    ("sm-pdpe-1g-reserved", "scalable", _both(_map(PAGE_1G, 0), _leaf(20)), READ,
     R.SM_SS_RESERVED, 0x0C),
    ("sm-reserved-below-read-only", "scalable", _both(_level(1, 1), _leaf(62)),
     WRITE, R.SM_SS_RESERVED, 0x05),
    ("sm-beyond-aw", "scalable", _iova(1 << 48), WRITE, R.SM_ADDRESS_BEYOND_AW, 0x04),
    ("sm-interrupt-range-output", "scalable", _map(gpa=0xFEEF_F000), READ,
     R.SM_INTERRUPT_ADDRESS, 0x87),
    ("sm-fpd-in-pasid-entry", "scalable", _both(_pasid(FPD=1), _leaf(0)), READ,
     R.SM_READ_DENIED, None),  # qualified: suppressed by the PASID entry's FPD (s7.1.1)
    ("sm-fpd-in-context", "scalable", _both(_context(FPD=1), _pdir_clear), READ,
     R.SM_PASID_DIR_NOT_PRESENT, None),
    # -- scalable mode, PGTT first-stage (s3.6; SFS/SGN) ----------------------------------
    ("fs-leaf-not-present", "flts", _leaf(0), READ, R.SM_FS_NOT_PRESENT, 0x71),
    ("fs-pdpe-not-present", "flts", _level(1, 0), WRITE, R.SM_FS_NOT_PRESENT, 0x71),
    ("fs-unmapped", "flts", _iova(IOVA + PAGE_1G), READ, R.SM_FS_NOT_PRESENT, 0x71),
    ("fs-write-read-only", "flts", _leaf(1), WRITE, R.SM_WRITE_DENIED, 0x85),
    ("fs-write-read-only-pml4e", "flts", _level(0, 1), WRITE, R.SM_WRITE_DENIED, 0x85),
    ("fs-supervisor-page", "flts", _leaf(2), READ, R.SM_PRIVILEGE, 0x81),
    ("fs-supervisor-pde", "flts", _level(2, 2), WRITE, R.SM_PRIVILEGE, 0x81),
    ("fs-leaf-reserved-haw", "flts", _leaf(50), READ, R.SM_FS_RESERVED, 0x72),
    ("fs-pml4e-ps-reserved", "flts", _level(0, 7), WRITE, R.SM_FS_RESERVED, 0x72),
    ("fs-pde-2m-reserved", "flts", _both(_map(PAGE_2M, 0x400_0000), _leaf(13)), READ,
     R.SM_FS_RESERVED, 0x72),
    ("fs-pdpe-1g-reserved", "flts", _both(_map(PAGE_1G, 0), _leaf(29)), READ,
     R.SM_FS_RESERVED, 0x72),
    ("fs-reserved-below-supervisor", "flts", _both(_level(1, 2), _leaf(50)), READ,
     R.SM_FS_RESERVED, 0x81),  # QEMU stops at the supervisor PDPE: 0x81 (qemu_reason)
    ("fs-not-present-below-read-only", "flts", _both(_level(0, 1), _level(2, 0)),
     WRITE, R.SM_FS_NOT_PRESENT, 0x85),  # QEMU stops at the read-only PML4E: 0x85
    ("fs-non-canonical", "flts", _iova(0x8000_0000_0000), READ, R.SM_NON_CANONICAL, 0x80),
    ("fs-non-canonical-high", "flts", _iova(0xFFFF_0000_0000_0000), WRITE,
     R.SM_NON_CANONICAL, 0x80),
    ("fs-fsptptr-beyond-ram", "flts", _paging_root_at(BEYOND_RAM), READ,
     R.SM_FSPTPTR_ACCESS, 0x73),
    ("fs-table-beyond-ram", "flts", _next_table_at(BEYOND_RAM), READ,
     R.SM_FS_ENTRY_ACCESS, 0x70),
    ("fs-five-level-unsupported", "flts", _pasid(FSPM=1), READ,
     R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("pgtt-second-stage-with-flts", "flts", _pasid(PGTT=Pgtt.SECOND_STAGE), READ,
     R.SM_PASID_ENTRY_INVALID, 0x5B),
    ("fs-interrupt-range-output", "flts", _map(gpa=0xFEE0_0000), WRITE,
     R.SM_INTERRUPT_ADDRESS, 0x87),
    ("fs-fpd-in-pasid-entry", "flts", _both(_pasid(FPD=1), _leaf(0)), WRITE,
     R.SM_FS_NOT_PRESENT, None),
]


@pytest.mark.parametrize(("name", "mode", "mutate", "access", "reason", "qemu"), FAULT_CASES,
                         ids=[c[0] for c in FAULT_CASES])
def test_faults(labs: Labs, name: str, mode: str, mutate: Mutator, access: Access,
                reason: FaultReason, qemu: int | None) -> None:
    """A working mapping IOVA -> GPA, then one thing broken: the model's fault must be the
    intended one, QEMU must record what ``qemu_reason`` says (``qemu``, worked out by hand),
    or nothing when FPD suppresses it, and nothing may land at the mapping's target."""
    lab = labs(mode)
    s = native(lab)
    s.map(IOVA, GPA)
    mutate(lab, s)
    address = s.extra.get("iova", IOVA) + 0x40
    v = lab.check(s.rtaddr, req(address, access), watch=(GPA + 0x40,))
    faults(v, reason, qemu)


# ============================================================================================
# Random mappings and mutations (hypothesis)
# ============================================================================================


@dataclass(frozen=True)
class Mapping:
    iova: int
    gpa: int
    size: int
    leaf: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Probe:
    iova: int
    access: Access
    count: int


@dataclass(frozen=True)
class Scenario:
    aw: int
    mappings: tuple[Mapping, ...]
    probes: tuple[Probe, ...]
    mutation: tuple[str, int, int] | None  # (structure, path index, bit)
    pass_through: bool = False  # legacy TT=10b / PGTT=100b: the mappings are not used


#: The scalable-mode context entry's RID_PASID field, which QEMU uses without ECAP.RPS
#: (test_deviation_rid_pasid_without_rps): random flips leave it alone.
RID_PASID_BITS = range(64, 84)
#: The PASID-table entry's AW field, which QEMU's first stage uses for canonicality
#: (test_deviation_first_stage_aw_zero).
PASID_AW_BITS = range(2, 5)


def _avoid_interrupts(iova: int) -> int:
    """Move a bus address off the interrupt window (an edu write there would be an MSI)."""
    return iova ^ 1 << 36 if iova in INTERRUPT_WINDOW else iova


@st.composite
def scenarios(draw: st.DrawFn, mode: str) -> Scenario:
    """1-3 mappings in distinct 1 GiB regions (so paths never collide with a large page),
    1-2 probes into them or next to them, and at most one flipped bit somewhere on the way."""
    aw = draw(st.sampled_from([1, 2])) if mode != "flts" else 2
    width = 12 + 9 * (aw + 2)
    regions = draw(st.lists(st.integers(0, (1 << (width - 30)) - 1), min_size=1, max_size=3,
                            unique=True))
    mappings = []
    for region in regions:
        size = draw(st.sampled_from([PAGE_4K, PAGE_4K, PAGE_2M, PAGE_1G]))
        inner = draw(st.integers(0, PAGE_1G // size - 1)) * size
        if size == PAGE_1G:
            gpa = 0
        else:
            lo, hi = TARGETS[0] // size, TARGETS[1] // size - 1
            gpa = draw(st.integers(lo, hi)) * size
        if mode == "flts":
            leaf = {"RW": draw(st.sampled_from([1, 1, 1, 0])),
                    "US": draw(st.sampled_from([1, 1, 1, 1, 0]))}
        else:
            leaf = {"R": draw(st.sampled_from([1, 1, 1, 1, 0])),
                    "W": draw(st.sampled_from([1, 1, 1, 0]))}
        iova = region << 30 | inner
        if mode == "flts" and iova >> 47:
            iova |= 0xFFFF << 48  # the upper canonical half
        mappings.append(Mapping(iova, gpa, size, tuple(leaf.items())))
    pass_through = draw(st.integers(0, 9)) == 0
    probes = []
    for _ in range(draw(st.integers(1, 2)) if not pass_through else 0):
        m = draw(st.sampled_from(mappings))
        where = draw(st.sampled_from(["inside"] * 4 + ["next-page", "next-2m"]))
        if where == "inside":
            if m.size == PAGE_1G:  # stay inside RAM targets through the 1 GiB page at 0
                page = draw(st.integers(TARGETS[0] // PAGE_4K, TARGETS[1] // PAGE_4K - 1))
                off = page * PAGE_4K
            else:
                off = draw(st.integers(0, m.size // PAGE_4K - 1)) * PAGE_4K
        else:
            off = m.size if where == "next-page" else max(m.size, PAGE_2M)
        count = draw(st.sampled_from([1, 8, 64]))
        off += draw(st.integers(0, PAGE_4K - count))
        iova = _avoid_interrupts((m.iova + off) % (1 << 64))
        probes.append(Probe(iova, draw(st.sampled_from([READ, WRITE])), count))
    if pass_through:  # identity: aim at the targets (now and then beyond RAM, or 2^48)
        for _ in range(draw(st.integers(1, 2))):
            count = draw(st.sampled_from([1, 8, 64]))
            page = draw(st.integers(TARGETS[0] // PAGE_4K, TARGETS[1] // PAGE_4K - 1))
            iova = page * PAGE_4K + draw(st.integers(0, PAGE_4K - count))
            iova |= draw(st.sampled_from([0] * 8 + [1 << 32, 1 << 48]))
            probes.append(Probe(_avoid_interrupts(iova), draw(st.sampled_from([READ, WRITE])),
                                count))
    mutation = None
    if draw(st.integers(0, 2)) == 0:
        kinds = ["paging", "paging", "paging", "context", "root"]
        if mode != "legacy":
            kinds += ["pasid-entry", "pasid-dir"]
        kind = draw(st.sampled_from(kinds))
        width_bits = {"paging": 64, "context": 128 if mode == "legacy" else 256, "root": 128,
                      "pasid-entry": 192, "pasid-dir": 64}[kind]
        interesting = [0, 1, 2, 5, 6, 7, 11, 13, 48, 50, 52, 62, 63]
        bit = draw(st.sampled_from(interesting) | st.integers(0, width_bits - 1))
        if kind == "context" and mode != "legacy" and bit in RID_PASID_BITS:
            bit = 84  # RID_PRIV instead: RID_PASID is a known deviation (see below)
        if kind == "root" and mode != "legacy":
            bit %= 64  # edu's half: QEMU checks the absent half too (a known deviation)
        if kind == "pasid-entry" and mode == "flts" and bit in PASID_AW_BITS:
            bit = 5  # SSEE instead: QEMU's first stage depends on AW (a known deviation)
        mutation = (kind, draw(st.integers(0, 4)), bit % width_bits)
    return Scenario(aw, tuple(mappings), tuple(probes), mutation, pass_through)


def _random_case(lab: Lab, sc: Scenario) -> None:
    if lab.mode == "legacy":
        s = legacy(lab, aw=sc.aw, TT=2 if sc.pass_through else 0)
    else:
        pgtt = Pgtt.FIRST_STAGE if lab.mode == "flts" else Pgtt.SECOND_STAGE
        s = scalable(lab, Pgtt.PASS_THROUGH if sc.pass_through else pgtt, aw=sc.aw)
    for m in sc.mappings if not sc.pass_through else ():
        s.map(m.iova, m.gpa, m.size, **dict(m.leaf))
    if sc.mutation is not None:
        kind, index, bit = sc.mutation
        if kind == "paging":
            path = s.path(sc.probes[0].iova)
            s.flip(path[index % len(path)], bit)
        elif kind == "context":
            s.flip(s.ce, bit)
        elif kind == "root":
            s.flip(RtaddrReg.get(s.rtaddr, "RTA") << 12, bit)
        elif kind == "pasid-entry":
            s.flip(s.pe, bit)
        else:
            s.flip(s.pdir, bit)
    lab.bench.program(s.rtaddr)
    targets = tuple(m.gpa + (p.iova - m.iova) % m.size for m in sc.mappings
                    for p in sc.probes if m.size != PAGE_1G)
    for p in sc.probes:
        request = req(p.iova, p.access)
        outcome = lab.model(s.rtaddr, request)
        if isinstance(outcome, Translation) and not in_targets(outcome.output, p.count) \
                and p.access is WRITE:
            # A flipped address bit sent the write into the tables, the staging page or low
            # memory: read instead, so the case cannot rewrite what it is checking.
            request = req(p.iova, READ)
        v = lab.check(s.rtaddr, request, count=p.count, watch=targets, program=False,
                      known_deviations=True)
        if isinstance(v.outcome, Translation):
            event("translation")
        elif v.compared and is_recorded(v.outcome) != qemu_records(v.outcome):
            event("known deviation: FPD of a PASID structure ignored")
        elif v.compared:
            event(f"fault {v.outcome.code:#x}")
        else:
            event(f"not comparable: {v.outcome.code:#x} (QEMU does not detect it)")


def _random_test(mode: str) -> Callable[[Labs], None]:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=not EXPLORE,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(sc=scenarios(mode))
    def run(labs: Labs, sc: Scenario) -> None:
        _random_case(labs(mode), sc)
    return run


test_random_legacy = _random_test("legacy")
test_random_scalable = _random_test("scalable")
test_random_flts = _random_test("flts")


# ============================================================================================
# Where QEMU does not detect a condition (qemu_reason is None): pin what it does instead
# ============================================================================================

UNDETECTED: list[tuple[str, str, Mutator, Access, FaultReason]] = [
    # QEMU 10.0.2 sets first-stage A/D but advertises no ECAP.SMPWCS: the model then faults
    # SFS.9 (A/D update without snooped page walks), QEMU translates (what it writes back is
    # compared in test_first_stage_accessed_dirty).
    ("fs-accessed-clear", "flts", _leaf(5), READ, R.SM_FS_AD_NO_SNOOP),
    ("fs-dirty-clear", "flts", _leaf(6), WRITE, R.SM_FS_AD_NO_SNOOP),
    # SNP is reserved without ECAP.SC (s9.8); QEMU accepts it whenever x-scalable-mode=on.
    ("sm-leaf-snp", "scalable", _leaf(11), WRITE, R.SM_SS_RESERVED),
    # QEMU checks no reserved bit of PASID-directory or PASID-table entries (SPD.3, SPT.3).
    ("pasid-dir-reserved", "scalable", lambda lab, s: s.flip(s.pdir, 4), WRITE,
     R.SM_PASID_DIR_RESERVED),
    ("pasid-entry-reserved", "scalable", lambda lab, s: s.flip(s.pe, 10), WRITE,
     R.SM_PASID_ENTRY_RESERVED),
    ("pasid-entry-reserved-high", "flts", lambda lab, s: s.flip(s.pe, 136), WRITE,
     R.SM_PASID_ENTRY_RESERVED),
]


@pytest.mark.parametrize(("name", "mode", "mutate", "access", "reason"), UNDETECTED,
                         ids=[c[0] for c in UNDETECTED])
def test_conditions_qemu_does_not_detect(labs: Labs, name: str, mode: str, mutate: Mutator,
                                         access: Access, reason: FaultReason) -> None:
    """The model faults, ``qemu_reason`` says QEMU does not see the condition, and QEMU
    indeed records nothing and translates as if the entry were valid."""
    lab = labs(mode)
    s = native(lab)
    s.map(IOVA, GPA)
    mutate(lab, s)
    _undetected(lab, s, access, reason)


def test_snp_accepted_for_legacy_tables_on_a_scalable_unit(labs: Labs) -> None:
    """QEMU's SNP exemption follows x-scalable-mode, not the table format (TTM=00b here)."""
    lab = labs("scalable")
    s = legacy(lab)
    s.map(IOVA, GPA, SNP=1)
    _undetected(lab, s, WRITE, R.SS_RESERVED)


@pytest.mark.parametrize(("ttm", "tables"), [(Ttm.ABORT_DMA, "scalable"),
                                             (Ttm.RESERVED, "legacy")])
def test_rtaddr_ttm_is_one_bit_in_qemu(labs: Labs, ttm: Ttm, tables: str) -> None:
    """TTM=11b (abort-DMA, without ECAP.ADMS) and TTM=10b (reserved) are RTA.1 faults for the
    model (0x30); QEMU reads only bit 10 and walks the tables as scalable (11b) or legacy
    (10b) ones."""
    lab = labs("scalable")
    s = scalable(lab, Pgtt.SECOND_STAGE) if tables == "scalable" else legacy(lab)
    s.map(IOVA, GPA)
    s.rtaddr = RtaddrReg.value(RtaddrReg.get(s.rtaddr, "RTA") << 12, ttm)
    _undetected(lab, s, WRITE, R.SM_RTADDR_INVALID)


def _undetected(lab: Lab, s: Setup, access: Access, reason: FaultReason) -> None:
    lab.bench.program(s.rtaddr)
    request = req(IOVA + 0x40, access)
    outcome = lab.model(s.rtaddr, request)
    assert isinstance(outcome, Fault) and outcome.code == reason, outcome
    assert qemu_reason(outcome, request, lab.bench.caps) is None
    data = lab.data(8)
    lab.mem.write(GPA + 0x40, bytes(8) if access is WRITE else data)
    lab.bench.load_buffer(data if access is WRITE else bytes(8))
    result = lab.bench.dma(request, 8)
    assert not result.faulted, result.decoded()
    got = lab.mem.read(GPA + 0x40, 8) if access is WRITE else lab.bench.dump_buffer(8)
    assert got == data


def _ad_case(lab: Lab, clear: dict[int, int], access: Access) -> None:
    """First-stage A/D: the entries QEMU rewrites must hold what the model writes back when
    its A/D update is allowed (ECAP.SMPWCS added, as QEMU updates them regardless), and no
    other entry may change (s3.6.2). ``clear``: path index -> bits to clear first."""
    s = scalable(lab, Pgtt.FIRST_STAGE)
    s.map(IOVA, GPA)
    path = s.path(IOVA)
    for index, bits in clear.items():
        lab.mem.write_u64(path[index], lab.mem.read_u64(path[index]) & ~bits)
    lab.bench.program(s.rtaddr)
    request = req(IOVA + 0x40, access)
    caps = lab.bench.caps
    coherent = IommuCaps(caps.cap, caps.ecap | EcapReg.field("SMPWCS").mask)
    outcome = translate(request, lab.mem, s.rtaddr, coherent)
    assert isinstance(outcome, Translation)
    before = {a: lab.mem.read_u64(a) for a in path}
    want = {**before, **{st.address: st.write_back for st in outcome.steps
                         if st.write_back is not None}}
    assert want != before
    lab.bench.load_buffer(bytes(8))
    assert not lab.bench.dma(request, 8).faulted
    got = {a: lab.mem.read_u64(a) for a in path}
    agree(got == want, "first-stage A/D after the DMA: " + ", ".join(
        f"{a:#x}: {got[a]:#x} (model {want[a]:#x})" for a in path if got[a] != want[a]))


A, D = 1 << 5, 1 << 6


@pytest.mark.parametrize(("clear", "access"), [
    ({3: A}, READ), ({3: A | D}, WRITE), ({0: A, 1: A, 2: A, 3: A | D}, WRITE),
    ({1: A}, READ)], ids=["leaf-A-read", "leaf-AD-write", "all-AD-write", "pdpe-A-read"])
def test_first_stage_accessed_dirty(labs: Labs, clear: dict[int, int], access: Access
                                    ) -> None:
    _ad_case(labs("flts"), clear, access)


@deviation("a first-stage write through a leaf with A=1, D=0 leaves D clear "
            "(vtd_set_flag_in_pte skips the update when any of A|D is already set; s3.6.2 "
            "sets D on every write)")
def test_deviation_first_stage_dirty_with_accessed_set(labs: Labs) -> None:
    _ad_case(labs("flts"), {3: D}, WRITE)


def test_legacy_pass_through_ignores_the_address_width(labs: Labs) -> None:
    """Legacy TT=10b: the model faults 0x4 above the host address width (LGN.1, as for
    scalable-mode pass-through's SGN.4); QEMU passes the address through unchecked."""
    lab = labs("legacy")
    s = legacy(lab, TT=2)
    lab.bench.program(s.rtaddr)
    request = req(1 << 48, WRITE)
    outcome = lab.model(s.rtaddr, request)
    assert isinstance(outcome, Fault) and outcome.code == R.ADDRESS_BEYOND_AW
    assert qemu_reason(outcome, request, lab.bench.caps) is None
    assert not lab.bench.dma(request, 8).faulted


# ============================================================================================
# Where QEMU and the model disagree on the outcome (strict xfail: noticed when QEMU changes)
# ============================================================================================


@deviation("canonicality of first-stage input is checked against the PASID entry's AW "
            "(ignored for PGTT=001b, s9.6): AW=0 makes every IOVA >= 2^29 non-canonical")
def test_deviation_first_stage_aw_zero(labs: Labs) -> None:
    lab = labs("flts")
    s = scalable(lab, Pgtt.FIRST_STAGE, aw=0)
    s.map(0x4000_0000, GPA)
    lab.bench.program(s.rtaddr)
    assert isinstance(lab.model(s.rtaddr, req(0x4000_0010, WRITE)), Translation)
    lab.check(s.rtaddr, req(0x4000_0010, WRITE))


@deviation("RID_PASID is used for requests without PASID although ECAP.RPS=0 (s9.4: the "
            "field then does not apply and PASID 0 is used)")
def test_deviation_rid_pasid_without_rps(labs: Labs) -> None:
    lab = labs("scalable")
    assert not lab.bench.caps.get("RPS")
    s = scalable(lab, Pgtt.SECOND_STAGE, ctx={"RID_PASID": 5})
    s.map(IOVA, GPA)
    other = lab.t.alloc()
    lab.t.pasid_entry(s.pdir, 5, PGTT=Pgtt.SECOND_STAGE, AW=2, SSPTPTR=other >> 12)
    lab.t.ss_map(other, 4, IOVA, 0x700_0000)
    lab.bench.program(s.rtaddr)
    outcome = lab.model(s.rtaddr, req(IOVA + 0x10, WRITE))
    assert isinstance(outcome, Translation) and outcome.output == GPA + 0x10
    lab.check(s.rtaddr, req(IOVA + 0x10, WRITE), watch=(0x700_0010,))


@deviation("the interrupt-range check (s3.15) covers the whole output page: a 2 MiB page "
            "at 0xFEE00000 faults 0x87 even for outputs at 0xFEF00000 and above")
def test_deviation_interrupt_check_whole_page(labs: Labs) -> None:
    lab = labs("scalable")
    s = scalable(lab, Pgtt.SECOND_STAGE)
    s.map(0x4000_0000, 0xFEE0_0000, PAGE_2M)
    lab.bench.program(s.rtaddr)
    outcome = lab.model(s.rtaddr, req(0x4010_0000, WRITE))
    assert isinstance(outcome, Translation) and outcome.output == 0xFEF0_0000
    lab.check(s.rtaddr, req(0x4010_0000, WRITE))


@deviation("FPD in the PASID-directory or PASID-table entry does not suppress the faults "
            "found while fetching that entry (SPD.2, SPT.2, SPT.4 are qualified, s7.1.1)")
@pytest.mark.parametrize("where", ["pasid-dir", "pasid-entry", "pasid-entry-pgtt"])
def test_deviation_fpd_of_pasid_structures(labs: Labs, where: str) -> None:
    lab = labs("scalable")
    s = scalable(lab, Pgtt.SECOND_STAGE)
    s.map(IOVA, GPA)
    if where == "pasid-dir":
        lab.t.mem.write_u64(s.pdir, PasidDirEntry.encode({"FPD": 1}))
    elif where == "pasid-entry":
        lab.t.edit(PasidTableEntry, s.pe, P=0, FPD=1)
    else:
        lab.t.edit(PasidTableEntry, s.pe, PGTT=0, FPD=1)
    lab.bench.program(s.rtaddr)
    outcome = lab.model(s.rtaddr, req(IOVA))
    assert isinstance(outcome, Fault) and not is_recorded(outcome)
    lab.check(s.rtaddr, req(IOVA))


@deviation("a cached read-only translation makes a later write fail silently: no fault "
            "is recorded (s6.2: IOTLB entries cache the permissions; a request they do not "
            "allow faults)")
@pytest.mark.parametrize("mode", list(MODES))
def test_deviation_iotlb_permission_fault(labs: Labs, mode: str) -> None:
    lab = labs(mode)
    s = native(lab)
    s.map(IOVA, GPA, **({"RW": 0} if s.first_stage else {"W": 0}))
    lab.bench.program(s.rtaddr)
    data = lab.data(16)
    lab.bench.load_buffer(data, 0x800)  # before the IOTLB fills: TE switches flush it
    assert not lab.bench.dma(req(IOVA), 16, invalidate=False).faulted  # caches R-only
    outcome = lab.model(s.rtaddr, req(IOVA, WRITE))
    assert isinstance(outcome, Fault) and is_recorded(outcome)
    lab.check(s.rtaddr, req(IOVA, WRITE), program=False, invalidate=False, offset=0x800,
              preloaded=data, watch=(GPA,))


@deviation("reserved bits of a scalable-mode root entry's non-present half are checked "
            "(s9.2: the half of a root entry with UP/LP=0 is not used)")
def test_deviation_root_reserved_bit_in_absent_half(labs: Labs) -> None:
    lab = labs("scalable")
    s = scalable(lab, Pgtt.SECOND_STAGE)
    s.map(IOVA, GPA)
    s.flip(RtaddrReg.get(s.rtaddr, "RTA") << 12, 70)  # upper half (devfn 128-255), UP=0
    lab.bench.program(s.rtaddr)
    assert isinstance(lab.model(s.rtaddr, req(IOVA + 0x10, WRITE)), Translation)
    lab.check(s.rtaddr, req(IOVA + 0x10, WRITE))


# ============================================================================================
# The bench itself
# ============================================================================================


def test_bench_reports_qemu_caps(labs: Labs) -> None:
    """The model runs on the capabilities QEMU advertises (read from CAP_REG/ECAP_REG)."""
    legacy_caps = labs("legacy").bench.caps
    sm_caps = labs("scalable").bench.caps
    fl_caps = labs("flts").bench.caps
    assert legacy_caps.address_widths == [39, 48] and legacy_caps.get("SLLPS") == 0b11
    assert not legacy_caps.get("SMTS") and legacy_caps.get("PT")
    assert sm_caps.get("SMTS") and sm_caps.get("SSTS") and not sm_caps.get("FSTS")
    assert fl_caps.get("SMTS") and fl_caps.get("FSTS") and not fl_caps.get("SSTS")
    assert fl_caps.get("FS1GP") and not fl_caps.get("SMPWCS")
    for c in (legacy_caps, sm_caps, fl_caps):
        assert c.get("NFR") == 0 and c.get("FRO") * 16 == 0x220


def test_untranslated_buffer_round_trip(labs: Labs) -> None:
    lab = labs("legacy")
    data = bytes(range(256)) * 16
    lab.bench.load_buffer(data)
    assert lab.bench.dump_buffer(len(data)) == data


def test_qtest_failures_are_hv_errors() -> None:
    """A QEMU that cannot start, a command QEMU refuses, a QEMU that dies: each is an
    HvError carrying what a user needs, and nothing is left behind."""
    with pytest.raises(VmLaunchFailure) as launch:
        QtestQemu(["-device", "no-such-device"]).start()
    assert launch.value.exit_code == 1 and "no-such-device" in "\n".join(launch.value.log_tail)
    assert "-qtest" in launch.value.command
    q = QtestQemu(["-device", "edu"]).start()
    workdir = q.command_line[q.command_line.index("-qtest") + 1].removeprefix("unix:")
    assert not os.path.exists(workdir)  # the socket goes as soon as QEMU is connected
    with pytest.raises(QtestError) as refused:
        q.command("no_such_command 1")
    assert refused.value.reply.startswith("FAIL")
    memory = QtestMemory(q, [(0, q.ram_size)])
    with pytest.raises(UsageError):
        memory.read(q.ram_size - 4, 8)
    assert q.pid is not None
    os.kill(q.pid, signal.SIGKILL)
    with pytest.raises(VmCrashed):
        q.readq(0)
    assert q.state is QtestState.CLOSED
    with pytest.raises(StateError):
        q.readq(0)
    assert q.close() is not None
    assert not [d for d in os.listdir("/tmp") if d.startswith("hvtools-qtest-")
                and os.path.exists(f"/tmp/{d}/qtest.sock")]
