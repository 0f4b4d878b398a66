"""Shadow EPT (EPT02 from EPT12 and EPT01) and reverse shadow tables (L2 GVA -> L1 GPA).

Layout of every test world (host-physical memory, 8 MiB):
  HPA [0x1000, 0x10_0000)    EPT01 (L0's EPT for L1): L1 GPA g -> HPA g + 0x40_0000, 2M pages
  HPA [0x10_0000, 0x20_0000) EPT02 tables (ShadowEpt)
  L1  [0x1000, 0x4_0000)     EPT12 tables (L1's EPT for L2), root at 0x1000, then 0x2000 ...
  L1  [0x4_0000, 0x8_0000)   the reverse shadow's tables
  L1  [0x10_0000, 0x40_0000) L2's RAM: EPT12 maps L2 GPA g -> L1 GPA g + 0x10_0000 (4K pages)
  L2  [0x1000, 0x1_0000)     L2's page tables, data above

So L2 GPA g reads HPA g + 0x50_0000. EPT12 tables are built in order: the first map makes the
PDPT at 0x2000, the PD at 0x3000 and the PT at 0x4000 (L1 GPAs); every L2 GPA below 2 MiB uses
that one EPT12 PT. Counter values are worked out in the comments.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_2M, PAGE_4K, Gva
from hvtools.errors import UsageError
from hvtools.memory.buffer import BufferMemory
from hvtools.mmu import ept, nested
from hvtools.mmu.ept import EptBuilder, EptControls, EptFlag
from hvtools.mmu.nested import NestedFault, NestedTranslation
from hvtools.mmu.paging import Access, AccessKind, EntryFlag, PagingMode, TableBuilder
from hvtools.mmu.shadow import (
    L1Memory,
    L2Memory,
    ReverseShadow,
    ShadowCounters,
    ShadowEpt,
    agree,
    fault_place,
)
from hvtools.translation import Fault, Stage, Translation

CTL = EptControls(maxphyaddr=40)
MODE = PagingMode(maxphyaddr=40)
L1_OFF = 0x40_0000  # L1 GPA -> HPA
L2_OFF = 0x10_0000  # L2 GPA -> L1 GPA
L2_PAGES = 0x40  # EPT12 maps L2 GPA [0, 0x4_0000)
R, W, X = EptFlag.R, EptFlag.W, EptFlag.X
RWX = R | W | X
WB = 6 << 3  # EPT memory type WB in bits 5:3
P, RW, US, XD, PS = EntryFlag.P, EntryFlag.RW, EntryFlag.US, EntryFlag.XD, EntryFlag.PS
URW = P | RW | US
VA = 0x4000_0000  # PML4 index 0, PDPT index 1, PD index 0, PT index 0
READ, WRITE, FETCH = (Access(AccessKind.READ), Access(AccessKind.WRITE, user=True),
                      Access(AccessKind.FETCH, user=True))
EPT_RD, EPT_WR, EPT_EX = ept.EPT_READ, ept.EPT_WRITE, ept.EPT_FETCH


@dataclass
class World:
    host: BufferMemory
    l1: L1Memory
    ept12: EptBuilder

    @property
    def eptp12(self) -> int:
        return self.ept12.eptp()


def make_world(*, ept12_flags: dict[int, int] | None = None) -> World:
    host = BufferMemory(8 << 20)
    ept01 = EptBuilder(host, first_table=0x1000, table_limit=0x10_0000)
    for gpa in range(0, L1_OFF, PAGE_2M):
        ept01.map(gpa, gpa + L1_OFF, PAGE_2M, flags=RWX)
    l1 = L1Memory(host, ept01.eptp(), CTL)
    ept12 = EptBuilder(l1, first_table=0x1000, table_limit=0x4_0000)
    flags = ept12_flags or {}
    for page in range(L2_PAGES):
        ept12.map(page << 12, (page << 12) + L2_OFF, flags=flags.get(page, RWX))
    return World(host, l1, ept12)


def hpa(l2_gpa: int) -> int:
    return l2_gpa + L2_OFF + L1_OFF


def ok(r: Translation | Fault) -> Translation:
    assert isinstance(r, Translation), r
    return r


def bad(r: Translation | Fault) -> Fault:
    assert isinstance(r, Fault), r
    return r


def counts(c: ShadowCounters) -> tuple[int, ...]:
    """(traps, updates, zaps, faults_in, prefills, invalidations, hits, misses)"""
    return (c.traps, c.updates, c.zaps, c.faults_in, c.prefills, c.invalidations, c.hits,
            c.misses)


EPT12_PT = 0x4000  # L1 GPA of the EPT12 PT that maps L2 GPA [0, 2M)
EPT12_PD = 0x3000


def ept12_leaf(l2_gpa: int) -> int:
    return EPT12_PT + ((l2_gpa >> 12) & 0x1FF) * 8


# -- agreement ----------------------------------------------------------------------------------


def test_agree_compares_output_and_rights_or_the_fault_place() -> None:
    w = make_world()
    s = ShadowEpt(w.l1, w.eptp12, ept02_tables=(0x10_0000, 0x20_0000))
    a, b = ok(s.reference(0x2000)), ok(s.reference(0x2008))
    assert agree(a, a) and not agree(a, b)
    f1, f2 = bad(s.reference(0x50_0000)), bad(s.reference(0x50_0000, EPT_WR))
    assert agree(f1, f1) and not agree(f1, f2) and not agree(a, f1)
    assert fault_place(f1)[:5] == ("ept-violation", "not-present", 0x1, 2, Stage.EPT)


# -- shadow EPT: hand-worked --------------------------------------------------------------------


def test_shadow_ept_faults_in_then_hits() -> None:
    w = make_world()
    s = ShadowEpt(w.l1, w.eptp12, ept02_tables=(0x10_0000, 0x20_0000))
    t = ok(s.translate_gpa(0x2_0123))  # EPT02 empty: a miss, filled
    assert t.output == hpa(0x2_0123) and s.entries == {0x2_0000}
    t = ok(s.translate_gpa(0x2_0456, EPT_WR))  # the same page: a hit, through EPT02
    assert t.output == hpa(0x2_0456) and all(st.address >= 0x10_0000 for st in t.steps)
    # The EPT12 walk read one entry in each of the four EPT12 tables.
    assert s.write_protected == {0x1000, 0x2000, 0x3000, 0x4000}
    assert counts(s.counters) == (0, 0, 0, 1, 0, 0, 1, 1)


def test_shadow_ept_traps_update_zap_and_invept() -> None:
    w = make_world()
    s = ShadowEpt(w.l1, w.eptp12, ept02_tables=(0x10_0000, 0x20_0000))
    ok(s.translate_gpa(0x2_0123))  # misses 1, faults_in 1
    # L1 moves the page: a store to a write-protected EPT12 PT -> trap 1, the entry derived
    # from it is re-derived and still translates -> update 1.
    assert s.l1_write(ept12_leaf(0x2_0000), 0x30_0000 | RWX | WB) is None
    assert ok(s.translate_gpa(0x2_0123)).output == 0x30_0123 + L1_OFF  # hits 1
    # A store to another entry of the same page: trap 2, nothing derived from it.
    assert s.l1_write(ept12_leaf(0x3_0000), 0x13_0000 | R | WB) is None
    # Read-only in EPT12 now: the shadow answers with EPT12's violation, not EPT02's.
    ok(s.translate_gpa(0x2_0000))  # hits 2
    # L1 unmaps the page: trap 3, the fresh walk faults -> zap 1; write protection lifted.
    assert s.l1_write(ept12_leaf(0x2_0000), 0) is None
    assert s.entries == frozenset() and s.write_protected == frozenset()
    f = bad(s.translate_gpa(0x2_0123))  # misses 2; not filled
    assert fault_place(f) == ("ept-violation", "not-present", 0x1, 1, Stage.EPT, 0x2_0123,
                              None)
    assert s.l1_write(ept12_leaf(0x2_0000), 0) is None  # nothing protected: no trap
    assert counts(s.counters) == (3, 1, 1, 1, 0, 0, 2, 2)
    # Two pages under one EPT12 PDE; clearing the PDE zaps both (trap 4, zaps 2 and 3).
    ok(s.translate_gpa(0x1_0000))
    ok(s.translate_gpa(0x1_1000))  # misses 4, faults_in 3
    assert s.l1_write(EPT12_PD, 0) is None
    assert s.entries == frozenset()
    assert counts(s.counters) == (4, 1, 3, 3, 0, 0, 2, 4)
    # INVEPT zaps what is there (zaps 5) and counts once.
    assert s.l1_write(EPT12_PD, EPT12_PT | RWX) is None  # not protected any more: no trap
    ok(s.translate_gpa(0x1_0000))
    ok(s.translate_gpa(0x5000))  # misses 6, faults_in 5
    assert s.invept() == 2
    assert s.write_protected == frozenset()
    assert counts(s.counters) == (4, 1, 5, 5, 0, 1, 2, 6)


def test_shadow_ept_permission_fault_is_ept12s_and_ept01_refusals_are_ept01s() -> None:
    w = make_world(ept12_flags={0x10: R})
    s = ShadowEpt(w.l1, w.eptp12, ept02_tables=(0x10_0000, 0x20_0000))
    ok(s.translate_gpa(0x1_0000))  # filled read-only
    f = bad(s.translate_gpa(0x1_0000, EPT_WR))  # EPT02 refuses; the fresh walk says why
    assert agree(f, s.reference(0x1_0000, EPT_WR))
    assert (f.kind, f.reason, f.address) == ("ept-violation", "write-denied", 0x1_0000)
    # EPT12 maps an L2 page to an L1 GPA EPT01 does not map: EPT01's fault, at the L1 GPA.
    assert s.l1_write(ept12_leaf(0x2_0000), 0x80_0000 | RWX | WB) is None
    f = bad(s.translate_gpa(0x2_0000))
    assert (f.kind, f.address) == ("ept-violation", 0x80_0000)
    assert agree(f, s.reference(0x2_0000))
    # L1 stores outside its memory: EPT01 refuses the store.
    f3 = s.l1_write(0x80_0000, 1)
    assert f3 is not None and (f3.kind, f3.address) == ("ept-violation", 0x80_0000)


def test_shadow_ept_as_second_stage_of_a_nested_walk() -> None:
    w = make_world()
    guest = TableBuilder(L2Memory(w.l1, w.eptp12), first_table=0x1000, table_limit=0x1_0000)
    guest.map(VA, 0x2_0000, flags=URW)  # L2 tables at L2 GPA 0x1000..0x4000
    s = ShadowEpt(w.l1, w.eptp12, ept02_tables=(0x10_0000, 0x20_0000))
    t = nested.walk(w.host, guest.cr3, MODE, Gva(VA + 0x10), READ, second=s)
    ref = nested.walk(w.host, guest.cr3, MODE, Gva(VA + 0x10), READ, second=s.composed)
    assert isinstance(t, NestedTranslation) and agree(t, ref) and t.output == hpa(0x2_0010)
    # Four L2 table pages and the data page: five misses, five fault-ins.
    assert counts(s.counters) == (0, 0, 0, 5, 0, 0, 0, 5)
    t = nested.walk(w.host, guest.cr3, MODE, Gva(VA + 0x20), WRITE, second=s)
    assert agree(t, nested.walk(w.host, guest.cr3, MODE, Gva(VA + 0x20), WRITE,
                                second=s.composed))
    assert len(t.steps) == 24 and counts(s.counters) == (0, 0, 0, 5, 0, 0, 5, 5)


def test_shadow_ept_refuses_ept_ad_and_mbec() -> None:
    w = make_world()
    with pytest.raises(UsageError):
        ShadowEpt(w.l1, w.ept12.eptp(ad=True), ept02_tables=(0x10_0000, 0x20_0000))
    l1 = L1Memory(w.host, w.l1.eptp01, EptControls(maxphyaddr=40, mbec=True))
    with pytest.raises(UsageError):
        ShadowEpt(l1, w.eptp12, ept02_tables=(0x10_0000, 0x20_0000))


# -- reverse shadow: hand-worked ----------------------------------------------------------------


def make_reverse(**kw: int | bool) -> tuple[World, ReverseShadow]:
    w = make_world(ept12_flags={0x3C: R, 0x3D: R | X, 0x3E: X})
    rs = ReverseShadow(w.l1, w.eptp12, MODE, l2_tables=(0x1000, 0x1_0000),
                       shadow_tables=(0x4_0000, 0x8_0000), fill_on_miss=bool(kw.get("fill", 1)))
    return w, rs


def test_reverse_shadow_hand_worked() -> None:
    w, rs = make_reverse()
    leaf = rs.map(VA, 0x2_0000, URW)  # L2 tables: root 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000
    assert leaf == 0x4000 and rs.l2_cr3 == 0x1000
    ref = rs.reference(VA + 0x10, READ)
    t0 = ok(rs.translate(VA + 0x10, READ))  # misses 1, faults_in 1 (the fresh walk returned)
    assert agree(t0, ref) and t0.output == hpa(0x2_0010)
    t = rs.translate(VA + 0x10, READ)  # hits 1: the shadow maps GVA -> L1 GPA directly
    assert isinstance(t, NestedTranslation) and agree(t, ref) and t.gpa == 0x2_0010 + L2_OFF
    assert len(t.steps) == 5 * 3 + 4  # a 4-level shadow nested under a 3-level EPT01 (2M)
    # Protected: the L1 pages of L2's four tables and of the four EPT12 tables.
    assert rs.write_protected == {0x1000, 0x2000, 0x3000, 0x4000, *(
        L2_OFF + a for a in (0x1000, 0x2000, 0x3000, 0x4000))}
    assert counts(rs.counters) == (0, 0, 0, 1, 0, 0, 1, 1)
    # L2 write-protects its PTE: trap 1, the shadow PTE is re-derived (update 1), now read-only.
    assert rs.protect(VA, P | US)
    f = rs.translate(VA, WRITE)  # misses 2 (shadow refuses), already shadowed: no fill
    assert isinstance(f, NestedFault) and agree(f, rs.reference(VA, WRITE))
    assert (f.kind, f.code, f.level) == ("page-fault", 0x7, 1)
    assert counts(rs.counters) == (1, 1, 0, 1, 0, 0, 1, 2)
    # Mapping the next page writes the same PT page: trap 2, nothing derived from that entry.
    rs.map(VA + PAGE_4K, 0x3_D000, URW)
    # Protecting it traps (3) and L1 shadows it at once (prefill 1). EPT12 maps 0x3_D000 R|X:
    # the shadow PTE gets RW = 0 though L2's says RW = 1.
    assert rs.protect(VA + PAGE_4K, URW)
    assert counts(rs.counters) == (3, 1, 0, 1, 1, 0, 1, 2)
    f = rs.translate(VA + PAGE_4K + 8, WRITE)  # misses 3: the shadow refuses the write ...
    assert isinstance(f, NestedFault) and (f.kind, f.reason) == ("ept-violation", "write-denied")
    assert agree(f, rs.reference(VA + PAGE_4K + 8, WRITE))  # ... and EPT12 says why
    assert agree(rs.translate(VA + PAGE_4K, FETCH), rs.reference(VA + PAGE_4K, FETCH))  # hits 2
    # L2 unmaps the first page: trap 4, the fresh walk faults -> zap 1.
    assert rs.unmap(VA) and not rs.unmap(VA + 5 * PAGE_4K)
    f = rs.translate(VA, READ)  # misses 4, fill fails
    assert isinstance(f, NestedFault) and (f.kind, f.reason, f.level) == ("page-fault",
                                                                          "not-present", 1)
    assert counts(rs.counters) == (4, 1, 1, 1, 1, 0, 2, 4)
    # An ordinary data store: not a protected page, no trap.
    assert rs.l2_write(0x2_0008, 0xDEAD) is None
    assert w.host.read_u64(hpa(0x2_0008)) == 0xDEAD
    # A store EPT12 refuses (0x3_C000 is read-only there) is EPT12's fault; nothing written.
    f2 = rs.l2_write(0x3_C000, 1)
    assert f2 is not None and (f2.reason, f2.address) == ("write-denied", 0x3_C000)
    # A flush zaps the one shadow PTE left (zap 2).
    assert rs.invalidate() == 1 and rs.entries == frozenset()
    assert counts(rs.counters) == (4, 1, 2, 1, 1, 1, 2, 4)


def test_reverse_shadow_non_leaf_write_updates_every_derived_pte() -> None:
    _, rs = make_reverse()
    for i in range(3):
        rs.map(VA + i * PAGE_4K, 0x2_0000 + i * PAGE_4K, URW)
    for i in range(3):
        rs.translate(VA + i * PAGE_4K)  # misses 3, faults_in 3
    # L2 points its PDE at a copy of the PT (at L2 GPA 0x8000) that maps page 1 elsewhere and
    # page 2 not at all: one trap (the PD page), PTEs 0 and 1 updated, PTE 2 zapped.
    for i, value in enumerate((0x2_0000 | URW, 0x3_0000 | URW)):
        assert rs.l2_write(0x8000 + 8 * i, value) is None  # not protected: no trap
    assert rs.l2_write(0x3000, 0x8000 | URW) is None
    assert counts(rs.counters) == (1, 2, 1, 3, 0, 0, 0, 3)
    assert rs.entries == {VA, VA + PAGE_4K}
    for i in range(3):
        for a in (READ, WRITE, FETCH):
            assert agree(rs.translate(VA + i * PAGE_4K, a), rs.reference(VA + i * PAGE_4K, a))
    assert ok(rs.translate(VA + PAGE_4K)).output == hpa(0x3_0000)


def test_reverse_shadow_without_fill_on_miss_shadows_protected_gvas_only() -> None:
    _, rs = make_reverse(fill=False)
    rs.map(VA, 0x2_0000, URW)
    rs.translate(VA)
    rs.translate(VA)  # misses 2: never shadowed
    assert rs.entries == frozenset()
    assert rs.protect(VA, P | US)  # prefill 1
    assert agree(rs.translate(VA), rs.reference(VA))  # hits 1
    assert counts(rs.counters) == (0, 0, 0, 0, 1, 0, 1, 2)


def test_reverse_shadow_refuses_modes_it_cannot_express() -> None:
    w = make_world()
    for mode in (PagingMode(maxphyaddr=40, wp=False), PagingMode(maxphyaddr=40, nxe=False)):
        with pytest.raises(UsageError):
            ReverseShadow(w.l1, w.eptp12, mode, l2_tables=(0x1000, 0x1_0000),
                          shadow_tables=(0x4_0000, 0x8_0000))


# -- properties -------------------------------------------------------------------------------

Op = tuple[str, int, int, int]  # (operation, three integer arguments; unused ones are 0)
NONE = st.just(0)


def op(name: str, a: st.SearchStrategy[int] = NONE, b: st.SearchStrategy[int] = NONE,
       c: st.SearchStrategy[int] = NONE) -> st.SearchStrategy[Op]:
    return st.tuples(st.just(name), a, b, c)


EPT12_VALUES = st.sampled_from([
    0, R | WB, RWX | WB, X | WB, R | X | WB, W | WB,  # W without R: a misconfiguration
    0x3000 | RWX, 0x4000 | RWX, 0x5000 | R,  # table pointers (or, as leaves, frames)
    0x20_0000 | RWX | WB | EptFlag.PS,  # a 2M leaf at the PDE level
    0x80_0000 | RWX | WB,  # beyond L1's memory (EPT01 does not map it)
    (1 << 45) | RWX | WB,  # a reserved bit above MAXPHYADDR
])
EPT12_ENTRIES = st.sampled_from([0x1000, 0x2000, EPT12_PD, EPT12_PD + 8, *(
    ept12_leaf(p << 12) for p in range(8))])
EPT_KINDS = (EPT_RD, EPT_WR, EPT_EX)
EPT_SAMPLE = [p << 12 for p in range(10)] + [0x20_0000 + 0x5000, 0x50_0000]
EPT_FLAGS = st.sampled_from([R, R | W, RWX, X, R | X])
PAGE = st.integers(0, 9)

ept_ops = st.one_of(
    op("map", PAGE, st.integers(0, 0x2F), st.one_of(EPT_FLAGS, NONE)),
    op("unmap", PAGE), op("protect", PAGE, EPT_FLAGS), op("write", EPT12_ENTRIES, EPT12_VALUES),
    op("access", PAGE, st.integers(0, 2)), op("invept"))


def check_shadow_ept(s: ShadowEpt, guest: TableBuilder) -> None:
    for gpa in EPT_SAMPLE:
        for a in EPT_KINDS:
            ref = s.reference(gpa, a)
            assert agree(s.translate_gpa(gpa, a), ref), (hex(gpa), a)
            assert agree(s.translate_gpa(gpa, a), ref), (hex(gpa), a)  # now maybe a hit
    for gva in (VA, VA + PAGE_4K):
        t = nested.walk(s.host, guest.cr3, MODE, Gva(gva), WRITE, second=s)
        assert agree(t, nested.walk(s.host, guest.cr3, MODE, Gva(gva), WRITE,
                                    second=s.composed))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ept_ops, max_size=10))
def test_shadow_ept_always_agrees_with_a_fresh_walk(ops: list[Op]) -> None:
    w = make_world()
    guest = TableBuilder(L2Memory(w.l1, w.eptp12), first_table=0x1000, table_limit=0x1_0000)
    guest.map(VA, 0x8000, flags=URW)  # L2 tables at L2 GPA 0x1000..0x4000
    guest.map(VA + PAGE_4K, 0x9000, flags=P | US)
    s = ShadowEpt(w.l1, w.eptp12, ept02_tables=(0x10_0000, 0x20_0000))
    w.ept12.map(0x20_0000, 0x20_0000, PAGE_2M, flags=RWX)  # through the watched view: no trap
    check_shadow_ept(s, guest)
    for name, a, b, c in ops:
        if name == "map":  # L1 (re)maps L2 page a to L1 page b with rights c (0: not present)
            s.l1_write(ept12_leaf(a << 12), c and ((b << 12) + L2_OFF) | c | WB)
        elif name == "unmap":
            s.l1_write(ept12_leaf(a << 12), 0)
        elif name == "protect":  # L1 changes the rights of L2 page a's EPT12 leaf
            old = w.l1.read_u64(ept12_leaf(a << 12))
            s.l1_write(ept12_leaf(a << 12), (old & ~0x7) | b if old else 0)
        elif name == "write":  # any store of L1 into its EPT12 tables
            s.l1_write(a, b)
        elif name == "access":
            s.translate_gpa(a << 12, EPT_KINDS[b])
        else:
            s.invept()
        check_shadow_ept(s, guest)


L2_VALUES = st.sampled_from([
    0, 0x2_0000 | URW, 0x3_C000 | URW, 0x3_E000 | URW | XD, 0x2_1000 | P | US,
    0x4000 | URW, 0x8000 | URW,  # table pointers (or, as leaves, frames)
    URW | PS,  # a 2M page at L2 GPA 0 (EPT12 maps only its first 256 KiB)
    0x5_0000 | URW,  # an L2 GPA EPT12 does not map
    (1 << 45) | URW,  # a reserved bit above MAXPHYADDR
])
L2_ENTRIES = st.sampled_from([0x1000, 0x2000 + 8, 0x3000, 0x3000 + 8,
                              *(0x4000 + 8 * i for i in range(4))])
GVAS = [VA + i * PAGE_4K for i in range(4)] + [VA + PAGE_2M, 0x7F00_0000_0000, 1 << 47]
DATA = st.sampled_from([0x2_0000, 0x2_1000, 0x3_C000, 0x3_D000, 0x3_E000, 0x5_0000])
PROT = st.sampled_from([P | US, URW, P | US | XD, P | RW, P])
GVA_I = st.integers(0, 3)
rev_ops = st.one_of(
    op("map", GVA_I, DATA, PROT), op("unmap", GVA_I), op("protect", GVA_I, PROT),
    op("write", L2_ENTRIES, L2_VALUES), op("access", GVA_I, st.integers(0, 2)),
    op("invalidate", st.integers(-1, 3)))


def check_reverse(rs: ReverseShadow) -> None:
    for gva in GVAS:
        for a in (READ, WRITE, FETCH):
            ref = rs.reference(gva, a)
            assert agree(rs.translate(gva, a), ref), (hex(gva), a)
            assert agree(rs.translate(gva, a), ref), (hex(gva), a)  # now maybe a hit


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(rev_ops, max_size=10), st.booleans())
def test_reverse_shadow_always_agrees_with_a_fresh_walk(ops: list[Op], fill: bool) -> None:
    _, rs = make_reverse(fill=fill)
    for i in range(3):
        rs.map(VA + i * PAGE_4K, 0x2_0000 + i * PAGE_4K, URW)  # PT at L2 GPA 0x4000
    rs.map(VA + PAGE_2M, 0x2_8000, URW)  # a second PT (0x5000) under PD entry 1
    check_reverse(rs)
    for name, a, b, c in ops:
        gva = VA + a * PAGE_4K
        if name == "map":
            # L2's tables may be broken (a large page, an unmapped table): L2's problem.
            with contextlib.suppress(UsageError):
                rs.map(gva, b, c)
        elif name == "unmap":
            rs.unmap(gva)
        elif name == "protect":
            rs.protect(gva, b)
        elif name == "write":  # any store of L2 into its page tables
            rs.l2_write(a, b)
        elif name == "access":
            rs.translate(gva, (READ, WRITE, FETCH)[b])
        else:
            rs.invalidate(None if a == -1 else gva)
        check_reverse(rs)


def test_shadow_ept_splits_a_2m_ept12_page_into_4k_ept02_entries() -> None:
    w = make_world()
    w.ept12.map(0x20_0000, 0x20_0000, PAGE_2M, flags=R | X)  # L2 [2M, 4M) -> L1 [2M, 4M)
    s = ShadowEpt(w.l1, w.eptp12, ept02_tables=(0x10_0000, 0x20_0000))
    for gpa in (0x20_0010, 0x3F_F008, 0x20_0020):  # misses 2, faults_in 2, then hits 1
        t = ok(s.translate_gpa(gpa))
        assert agree(t, s.reference(gpa)) and t.output == gpa + L1_OFF
    assert t.page_size == PAGE_4K and ok(s.reference(0x20_0000)).page_size == PAGE_2M
    assert s.entries == {0x20_0000, 0x3F_F000}
    # Both derive from the one EPT12 PDE: making it writable traps once and updates both.
    assert s.l1_write(EPT12_PD + 8, 0x20_0000 | RWX | WB | EptFlag.PS) is None
    assert agree(s.translate_gpa(0x3F_F000, EPT_WR), s.reference(0x3F_F000, EPT_WR))  # hits 2
    assert counts(s.counters) == (1, 2, 0, 2, 0, 0, 2, 2)


def test_reverse_shadow_with_5_level_paging() -> None:
    w = make_world()
    mode = PagingMode(maxphyaddr=40, la57=True)
    rs = ReverseShadow(w.l1, w.eptp12, mode, l2_tables=(0x1000, 0x1_0000),
                       shadow_tables=(0x4_0000, 0x8_0000))
    gva = 0xFF10_0000_0000_0000 | VA  # a canonical 57-bit address (bit 56 set)
    rs.map(gva, 0x2_0000, URW)
    for _ in range(2):  # a miss filled, then a hit
        t = ok(rs.translate(gva + 8, WRITE))
        assert agree(t, rs.reference(gva + 8, WRITE)) and t.output == hpa(0x2_0008)
    assert rs.entries == {gva} and counts(rs.counters) == (0, 0, 0, 1, 0, 0, 1, 1)
