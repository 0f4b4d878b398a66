"""The two-dimensional walk (GVA -> GPA -> HPA) over hand-built guest and EPT/NPT tables.

Layout of every test world (host-physical memory, 8 MiB):
  [0x10_0000, 0x40_0000)  second-stage tables (EPT or NPT)
  [0x40_0000, 0x60_0000)  the guest's 2 MiB of guest-physical memory, GPA g at HPA g + 0x40_0000:
                          guest page tables at GPA [0x1000, 0x10_0000), data above.

Expected codes are worked out by hand: EPT qualifications from SDM Vol. 3C Table 28-7 (read 0x1,
write 0x2, fetch 0x4, readable 0x8, writable 0x10, executable 0x20, user-exec 0x40, GLA valid
0x80, translated 0x100, user 0x200, writable 0x400, XD 0x800), #NPF EXITINFO1 from APM s15.25.6
(P 0x1, W 0x2, U 0x4, RSV 0x8, ID 0x10, final 1<<32, guest table 1<<33) and #PF error codes from
SDM Vol. 3A s4.7.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Gva
from hvtools.errors import UsageError
from hvtools.memory.buffer import BufferMemory
from hvtools.mmu import ept, paging
from hvtools.mmu.encryption import EncryptionPolicy, MktmePolicy, Role, SevPolicy, TdxPolicy
from hvtools.mmu.ept import EptBuilder, EptControls, EptFlag
from hvtools.mmu.nested import (
    EptStage,
    NestedFault,
    NestedTranslation,
    NptStage,
    Phase,
    SecondStage,
    reference_count,
    walk,
)
from hvtools.mmu.npt import NptBuilder
from hvtools.mmu.paging import Access, AccessKind, EntryFlag, PagingMode, TableBuilder
from hvtools.translation import Stage

OFF = 0x40_0000
GSIZE = 0x20_0000
P, RW, US, A, D, PS, XD = (EntryFlag.P, EntryFlag.RW, EntryFlag.US, EntryFlag.A, EntryFlag.D,
                           EntryFlag.PS, EntryFlag.XD)
URW = P | RW | US
R, W, X, XU = EptFlag.R, EptFlag.W, EptFlag.X, EptFlag.XU
CTL = EptControls(maxphyaddr=40)
MODE = PagingMode(maxphyaddr=40)
MODE57 = PagingMode(maxphyaddr=40, la57=True)
HOST = PagingMode(maxphyaddr=40)
READ, WRITE, FETCH = Access(AccessKind.READ), Access(AccessKind.WRITE), Access(AccessKind.FETCH)
UREAD, UWRITE = Access(AccessKind.READ, user=True), Access(AccessKind.WRITE, user=True)
UFETCH = Access(AccessKind.FETCH, user=True)
USER_VA = 0x7F00_0000_1000
DATA_GPA = 0x18_0000


class GuestView:
    """Guest-physical memory as the guest's own builder sees it: GPA g is HPA g + ``off``."""

    def __init__(self, host: BufferMemory, off: int = OFF) -> None:
        self.host = host
        self.off = off

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.host.contains(addr + self.off, size)

    def read(self, addr: int, size: int) -> bytes:
        return self.host.read(addr + self.off, size)

    def read_u64(self, addr: int) -> int:
        return self.host.read_u64(addr + self.off)

    def write(self, addr: int, data: bytes) -> None:
        self.host.write(addr + self.off, data)

    def write_u64(self, addr: int, value: int) -> None:
        self.host.write_u64(addr + self.off, value)


@dataclass
class World:
    host: BufferMemory
    guest: TableBuilder
    second: SecondStage
    off: int = OFF
    ept: EptBuilder | None = None
    npt: NptBuilder | None = None

    @property
    def cr3(self) -> int:
        return self.guest.cr3

    def remap(self, gpa: int, hpa: int, flags: int) -> int:
        """Point the second stage's 4K leaf for ``gpa`` somewhere with ``flags``."""
        if self.ept is not None:
            return self.ept.map(gpa, hpa, flags=flags)
        assert self.npt is not None
        return self.npt.map(gpa, hpa, flags=flags)

    def leaf(self, gpa: int) -> int:
        """The host-physical address of the second-stage 4K leaf for ``gpa``."""
        b = self.ept if self.ept is not None else self.npt
        assert b is not None
        return b.entry_address(gpa, 1)


def make_world(*, second: str = "ept", la57: bool = False, levels: int = 4,
               page: int = PAGE_4K, ad: bool = False, controls: EptControls = CTL,
               ept_flags: int = R | W | X | XU, npt_flags: int = URW) -> World:
    host = BufferMemory(8 << 20)
    # With 1-GByte second-stage pages the guest's memory is at HPA = GPA (1-GByte aligned), and
    # the second-stage tables move above it.
    off, tables = (0, (OFF, 2 * OFF)) if page == PAGE_1G else (OFF, (0x10_0000, OFF))
    guest = TableBuilder(GuestView(host, off), la57=la57, first_table=0x1000,
                         table_limit=0x10_0000)
    if second == "ept":
        eb = EptBuilder(host, levels=levels, first_table=tables[0], table_limit=tables[1])
        for gpa in range(0, GSIZE, min(page, GSIZE)):
            eb.map(gpa, gpa + off, page, flags=ept_flags)
        return World(host, guest, EptStage(eb.eptp(ad=ad), controls), off, ept=eb)
    nb = NptBuilder(host, la57=levels == 5, first_table=tables[0], table_limit=tables[1])
    for gpa in range(0, GSIZE, min(page, GSIZE)):
        nb.map(gpa, gpa + off, page, flags=npt_flags)
    host_mode = PagingMode(maxphyaddr=40, la57=levels == 5)
    return World(host, guest, NptStage(nb.ncr3, host_mode), off, npt=nb)


def ok(r: NestedTranslation | NestedFault) -> NestedTranslation:
    assert isinstance(r, NestedTranslation), r
    return r


def bad(r: NestedTranslation | NestedFault, kind: str) -> NestedFault:
    assert isinstance(r, NestedFault), r
    assert r.kind == kind, r
    return r


def stages(r: NestedTranslation | NestedFault) -> str:
    return "".join("g" if s.stage is Stage.GUEST else "h" for s in r.steps)


# -- the reference count ---------------------------------------------------------------------


def test_24_references_for_4_level_on_4_level_with_4k_pages() -> None:
    w = make_world()
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    t = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA + 0x123), UREAD, second=w.second))
    assert len(t.steps) == 24 == reference_count(4, 4)
    assert stages(t) == "hhhhg" * 4 + "hhhh"
    assert (t.gpa, t.output, t.page_size) == (DATA_GPA + 0x123, DATA_GPA + OFF + 0x123, PAGE_4K)
    assert [r.role for r in t.references] == ([Role.SECOND_TABLE] * 4 + [Role.GUEST_TABLE]) * 4 \
        + [Role.SECOND_TABLE] * 4
    guest_refs = [r for r in t.references if r.role is Role.GUEST_TABLE]
    # Each guest entry is read at the HPA its GPA translates to; the GPA is on the reference.
    assert all(r.step.address == r.gpa + OFF for r in guest_refs)
    assert guest_refs[0].gpa == w.cr3 + 0xFE * 8  # PML4 index of USER_VA
    # Each second-stage walk translates the next guest entry's GPA, then the data's.
    walks = [t.references[i * 5].gpa for i in range(5)]
    assert walks == [r.gpa for r in guest_refs] + [DATA_GPA + 0x123]
    assert all(s.stage is Stage.EPT for s in t.steps if s.stage is not Stage.GUEST)


@pytest.mark.parametrize(("la57", "levels", "count"), [(True, 5, 35), (False, 5, 29),
                                                      (True, 4, 29)])
def test_reference_counts_for_5_level(la57: bool, levels: int, count: int) -> None:
    w = make_world(la57=la57, levels=levels,
                   controls=EptControls(maxphyaddr=40, pwl5=True))
    mode = MODE57 if la57 else MODE
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    t = ok(walk(w.host, w.cr3, mode, Gva(USER_VA), UREAD, second=w.second))
    g = 5 if la57 else 4
    assert len(t.steps) == count == reference_count(g, levels)
    assert stages(t) == ("h" * levels + "g") * g + "h" * levels


@pytest.mark.parametrize(("guest_page", "second_page", "count"), [
    (PAGE_2M, PAGE_4K, 4 * 4 + 3),  # 3 guest reads, 4 second-stage walks of 4
    (PAGE_1G, PAGE_4K, 3 * 4 + 2),
    (PAGE_4K, PAGE_2M, 5 * 3 + 4),  # every second-stage walk stops at the PDE
    (PAGE_4K, PAGE_1G, 5 * 2 + 4),
    (PAGE_2M, PAGE_2M, 4 * 3 + 3),
    (PAGE_1G, PAGE_1G, 3 * 2 + 2),
])
def test_reference_counts_with_large_pages(guest_page: int, second_page: int,
                                           count: int) -> None:
    for second in ("ept", "npt"):
        w = make_world(second=second, page=second_page)
        gva = 0x40_0000_0000 if guest_page == PAGE_1G else 0x4000_0000
        w.guest.map(gva, 0 if guest_page != PAGE_4K else DATA_GPA, guest_page, flags=URW)
        t = ok(walk(w.host, w.cr3, MODE, Gva(gva + 0x234), UREAD, second=w.second))
        assert len(t.steps) == count, second
        assert (t.guest_page_size, t.host_page_size) == (guest_page, second_page)
        assert t.page_size == min(guest_page, second_page)


def test_npt_second_stage_makes_the_same_24_references() -> None:
    w = make_world(second="npt")
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    t = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UWRITE, second=w.second))
    assert len(t.steps) == 24 and stages(t) == "hhhhg" * 4 + "hhhh"
    assert {s.stage for s in t.steps} == {Stage.GUEST, Stage.NPT}
    assert t.output == DATA_GPA + OFF and t.permissions.write


# -- guest faults ----------------------------------------------------------------------------


def test_guest_page_fault_is_a_guest_fault() -> None:
    w = make_world()
    w.guest.entry_address(USER_VA, 2)  # PML4E and PDPTE exist, the PDE is 0
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UWRITE, second=w.second), "page-fault")
    assert (f.stage, f.level, f.code, f.address, f.phase) == (Stage.GUEST, 2, 0x6, USER_VA,
                                                              None)
    assert stages(f) == "hhhhg" * 3  # the not-present PDE was read, through the EPT
    w.guest.map(USER_VA, DATA_GPA, flags=P | US)
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UWRITE, second=w.second), "page-fault")
    assert (f.reason, f.code) == ("write-protect", 0x7)
    w.guest.map(USER_VA, DATA_GPA, flags=URW | XD)
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UFETCH, second=w.second), "page-fault")
    assert (f.reason, f.code, len(f.steps)) == ("execute-disable", 0x15, 20)


def test_guest_reserved_bits_and_non_canonical() -> None:
    w = make_world()
    w.guest.set_entry(USER_VA, 1, DATA_GPA | URW | 1 << 45)
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=w.second), "page-fault")
    assert (f.reason, f.code) == ("reserved-bit", 0xD)
    f = bad(walk(w.host, w.cr3, MODE, Gva(0x8000_0000_0000), READ, second=w.second),
            "general-protection")
    assert f.steps == ()


def test_guest_entry_outside_memory_is_unbacked() -> None:
    """A second stage that maps a guest table beyond host memory."""
    w = make_world()
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    pdpt = w.guest.entry_address(USER_VA, 3) & ~0xFFF
    w.remap(pdpt, 0x7FFF_0000, R | W | X)
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), READ, second=w.second), "unbacked")
    assert (f.stage, f.level, f.address) == (Stage.GUEST, 3, 0x7FFF_0000 + 0x0)


# -- second-stage faults ---------------------------------------------------------------------


def test_ept_violation_during_the_guest_walk() -> None:
    w = make_world()
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    pd = w.guest.entry_address(USER_VA, 2) & ~0xFFF
    w.ept.set_entry(pd, 1, 0) if w.ept else None  # the guest's page directory is unmapped
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UWRITE, second=w.second), "ept-violation")
    assert (f.stage, f.phase, f.level, f.address) == (Stage.EPT, Phase.GUEST_TABLE, 1, pd)
    assert f.code == 0x1 | 0x80  # a read of a guest entry; GLA valid; not the translation
    assert stages(f) == "hhhhg" * 2 + "hhhh"


def test_ept_violation_on_the_final_translation() -> None:
    w = make_world()
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    assert w.ept is not None
    w.ept.map(DATA_GPA, DATA_GPA + OFF, flags=R | X)
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UWRITE, second=w.second), "ept-violation")
    assert (f.phase, f.address, len(f.steps)) == (Phase.FINAL, DATA_GPA, 24)
    # write; readable, executable; GLA valid and translated; user, writable, executable linear.
    assert f.code == 0x2 | 0x8 | 0x20 | 0x80 | 0x100 | 0x200 | 0x400
    w.guest.map(USER_VA, DATA_GPA, flags=P | RW | XD)  # supervisor, execute-disable
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), WRITE, second=w.second), "ept-violation")
    assert f.code == 0x2 | 0x8 | 0x20 | 0x80 | 0x100 | 0x400 | 0x800


def test_ept_misconfig_during_the_guest_walk() -> None:
    w = make_world()
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    assert w.ept is not None
    w.ept.set_entry(w.cr3, 1, (w.cr3 + OFF) | W)  # write-only: misconfigured
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), READ, second=w.second), "ept-misconfig")
    assert (f.phase, f.code, f.reason, len(f.steps)) == (Phase.GUEST_TABLE, 0,
                                                         "write-without-read", 4)


def test_ept_ad_makes_guest_table_reads_writes() -> None:
    """EPTP bit 6: guest page tables on read-only EPT pages fault; qualification 0x1 | 0x2."""
    for ad in (False, True):
        w = make_world(ad=ad)
        w.guest.map(USER_VA, DATA_GPA, flags=URW)
        assert w.ept is not None
        w.ept.map(w.cr3, w.cr3 + OFF, flags=R | X)  # the guest's PML4 page: read-only
        r = walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=w.second)
        if not ad:
            ok(r)
            continue
        f = bad(r, "ept-violation")
        assert (f.phase, f.address, f.code) == (Phase.GUEST_TABLE, w.cr3 + 0xFE * 8,
                                                0x1 | 0x2 | 0x8 | 0x20 | 0x80)


def test_npf_during_the_guest_walk_and_on_the_final_gpa() -> None:
    w = make_world(second="npt")
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    assert w.npt is not None
    w.npt.set_entry(w.cr3, 1, 0)
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=w.second), "npf")
    assert (f.phase, f.address, f.code) == (Phase.GUEST_TABLE, w.cr3 + 0xFE * 8, 0x2_0000_0006)
    w.npt.map(w.cr3, w.cr3 + OFF, flags=P | US)  # read-only: a guest table access is a write
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=w.second), "npf")
    assert f.code == 0x2_0000_0007
    relaxed = NptStage(w.npt.ncr3, HOST, guest_table_writes=False)
    ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=relaxed))
    w.npt.map(w.cr3, w.cr3 + OFF)
    w.npt.set_entry(DATA_GPA, 1, 0)
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UFETCH, second=w.second), "npf")
    assert (f.phase, f.address, f.code) == (Phase.FINAL, DATA_GPA, 0x1_0000_0014)


def test_mode_based_execute_control_through_the_guest_u_s() -> None:
    mbec = EptControls(maxphyaddr=40, mbec=True)
    w = make_world(controls=mbec)
    assert w.ept is not None
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    w.ept.map(DATA_GPA, DATA_GPA + OFF, flags=R | XU)  # user-executable only
    t = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UFETCH, second=w.second))
    assert t.permissions.execute
    kva = 0xFFFF_FFFF_8000_0000
    w.guest.map(kva, DATA_GPA, flags=P | RW)  # the same page as a supervisor address
    f = bad(walk(w.host, w.cr3, MODE, Gva(kva), FETCH, second=w.second), "ept-violation")
    assert f.code == 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x400
    assert not ok(walk(w.host, w.cr3, MODE, Gva(kva), READ, second=w.second)).permissions.execute


def test_permissions_combine_both_stages() -> None:
    w = make_world()
    assert w.ept is not None
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    w.ept.map(DATA_GPA, DATA_GPA + OFF, flags=R)
    p = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=w.second)).permissions
    assert (p.read, p.write, p.execute, p.user) == (True, False, False, True)


def test_lookup_follows_presence_only() -> None:
    w = make_world()
    w.guest.map(USER_VA, DATA_GPA, flags=P)  # supervisor, read-only
    t = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), paging.LOOKUP, second=w.second))
    assert t.output == DATA_GPA + OFF and len(t.steps) == 24
    w.guest.set_entry(USER_VA, 1, 0)
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), paging.LOOKUP, second=w.second),
            "page-fault")
    assert f.code == 0


# -- accessed and dirty flags ----------------------------------------------------------------


def test_guest_and_ept_ad_write_back() -> None:
    w = make_world(ad=True)
    leaf = w.guest.map(USER_VA, DATA_GPA, flags=URW)
    assert w.ept is not None
    t = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UWRITE, second=w.second, set_ad=True))
    guest = [s for s in t.steps if s.stage is Stage.GUEST]
    assert [s.write_back for s in guest[:-1]] == [s.entry | A for s in guest[:-1]]
    assert guest[-1].write_back == guest[-1].entry | A | D
    assert w.host.read_u64(leaf + OFF) & (A | D) == A | D
    # EPT A/D: every EPT leaf mapping a guest table got D (table accesses are writes), and the
    # data page's leaf too (a data write).
    for gpa in (*(r.gpa for r in t.references if r.role is Role.GUEST_TABLE), DATA_GPA):
        assert w.host.read_u64(w.leaf(gpa)) & (EptFlag.A | EptFlag.D) == EptFlag.A | EptFlag.D
    # A second walk finds every flag set: nothing is written.
    t = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UWRITE, second=w.second, set_ad=True))
    assert all(s.write_back is None for s in t.steps)


def test_guest_ad_update_needs_second_stage_write_access() -> None:
    """SDM s29.3.3.2: updating a guest entry's A/D flags is a data write through EPT."""
    w = make_world()  # EPTP bit 6 = 0: table reads are reads
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    assert w.ept is not None
    w.ept.map(w.cr3, w.cr3 + OFF, flags=R | X)
    ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=w.second))  # no A/D modelled
    f = bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=w.second, set_ad=True),
            "ept-violation")
    assert (f.phase, f.address, len(f.steps)) == (Phase.GUEST_TABLE, w.cr3 + 0xFE * 8, 5)
    assert f.code == 0x2 | 0x8 | 0x20 | 0x80
    pml4e = w.cr3 + 0xFE * 8
    w.host.write_u64(pml4e + OFF, w.host.read_u64(pml4e + OFF) | A)  # A already set
    t = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=w.second, set_ad=True))
    assert t.steps[4].write_back is None and t.steps[9].write_back is not None


def test_guest_leaf_ad_waits_for_the_final_translation() -> None:
    w = make_world()
    leaf = w.guest.map(USER_VA, DATA_GPA, flags=URW)
    assert w.ept is not None
    w.ept.set_entry(DATA_GPA, 1, 0)
    bad(walk(w.host, w.cr3, MODE, Gva(USER_VA), UWRITE, second=w.second, set_ad=True),
        "ept-violation")
    assert w.host.read_u64(leaf + OFF) & (A | D) == 0
    assert w.host.read_u64(w.cr3 + 0xFE * 8 + OFF) & A  # the upper entries got A on the way


def test_npt_ad_write_back_for_guest_table_updates() -> None:
    """NPT with table reads checked as reads: the A update's write sets D on its NPT leaf."""
    w = make_world(second="npt")
    w.guest.map(USER_VA, DATA_GPA, flags=URW)
    assert w.npt is not None
    relaxed = NptStage(w.npt.ncr3, HOST, guest_table_writes=False)
    t = ok(walk(w.host, w.cr3, MODE, Gva(USER_VA), UREAD, second=relaxed, set_ad=True))
    pml4_leaf = t.steps[3]  # the NPT leaf mapping the guest's PML4 page
    assert pml4_leaf.write_back == pml4_leaf.entry | A | D
    assert w.host.read_u64(w.leaf(w.cr3)) & D
    assert w.host.read_u64(w.leaf(DATA_GPA)) & (A | D) == A  # data was only read


def test_misuse() -> None:
    w = make_world()
    with pytest.raises(UsageError):
        walk(w.host, w.cr3, MODE, Gva(-1), READ, second=w.second)

    class ReadOnly:
        def read(self, addr: int, size: int) -> bytes:
            return w.host.read(addr, size)

        def read_u64(self, addr: int) -> int:
            return w.host.read_u64(addr)

        def contains(self, addr: int, size: int = 1) -> bool:
            return w.host.contains(addr, size)

    with pytest.raises(UsageError):
        walk(ReadOnly(), w.cr3, MODE, Gva(0), READ, second=w.second, set_ad=True)


# -- property tests --------------------------------------------------------------------------

NPAGES = 64  # guest-physical pages in the random worlds


_BASE: dict[bool, tuple[bytes, SecondStage]] = {}


def random_guest(seed: int, density: float) -> tuple[BufferMemory, SecondStage]:
    """Random guest tables in GPA [0, 256 KiB) over a second stage that maps it 1:1 + OFF."""
    ad = bool(seed & 1)
    if ad not in _BASE:
        w = make_world(ad=ad)
        _BASE[ad] = (w.host.to_bytes(), w.second)
    image, second = _BASE[ad]
    host = BufferMemory(image)
    view = GuestView(host)
    rng = random.Random(seed)
    for i in rng.sample(range(NPAGES * 512), int(NPAGES * 512 * density)):
        entry = rng.randrange(NPAGES) << 12 | rng.getrandbits(12) | 1
        entry |= rng.getrandbits(4) << 59 if rng.random() < 0.3 else 0
        entry |= 1 << 63 if rng.random() < 0.3 else 0
        entry |= 1 << rng.randrange(12, 52) if rng.random() < 0.1 else 0
        if rng.random() > 0.97:
            entry = rng.getrandbits(64)
        view.write_u64(i * 8, entry)
    return host, second


modes = st.builds(PagingMode, maxphyaddr=st.just(40), la57=st.booleans(), nxe=st.booleans(),
                  wp=st.booleans(), smep=st.booleans(), smap=st.booleans())
accesses = st.sampled_from([READ, WRITE, FETCH, UREAD, UWRITE, UFETCH, paging.LOOKUP])
u64 = st.integers(0, 2**64 - 1)


#: The GPA bits a 4-level EPT walk uses: 47:0 (SDM Vol. 3C s29.3.2).
EPT4_GPA_BITS = (1 << 48) - 1


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), density=st.sampled_from([0.004, 0.02, 0.4]), mode=modes,
       access=accesses, gvas=st.lists(u64, min_size=1, max_size=6), set_ad=st.booleans())
# A lookup's guest PDE maps a 2-MByte page at GPA 1 << 51 (reserved bits are ignored); the EPT
# walk uses bits 47:0 of it, i.e. GPA 0, which the second stage maps.
@example(seed=274, density=0.4, mode=PagingMode(maxphyaddr=40), access=paging.LOOKUP,
         gvas=[0], set_ad=False)
def test_nested_walk_agrees_with_paging_walk_over_a_permissive_second_stage(
        seed: int, density: float, mode: PagingMode, access: Access, gvas: list[int],
        set_ad: bool) -> None:
    """With a second stage that maps everything R/W/X, the nested walk is the guest's walk:
    the same GPA or the same #PF, and (with A/D) the same bytes written to guest memory.

    The second stage is a 4-level EPT, which uses only GPA bits 47:0 (SDM Vol. 3C s29.3.2).
    Only a lookup, which ignores reserved bits, can reach a GPA above them (any other access
    faults on a bit at or above MAXPHYADDR first); such a GPA translates as its bits 47:0."""
    cr3 = (seed % NPAGES) << 12
    (h1, second), (h2, _) = random_guest(seed, density), random_guest(seed, density)
    for gva in gvas:
        r = walk(h1, cr3, mode, Gva(gva), access, second=second, set_ad=set_ad)
        expect = paging.walk(GuestView(h2), cr3, mode, Gva(gva), access, set_ad=set_ad)
        if isinstance(expect, paging.Translation):
            seen = expect.output & EPT4_GPA_BITS  # the GPA the EPT walk translates
            assert seen == expect.output or access.kind is AccessKind.LOOKUP
            if seen >= GSIZE:  # beyond the mapped guest-physical memory
                assert isinstance(r, NestedFault) and r.phase is Phase.FINAL, r
                continue
            t = ok(r)
            assert (t.gpa, t.guest_page_size) == (expect.output, expect.page_size)
            assert t.output == seen + OFF
            assert [s.entry for s in t.steps if s.stage is Stage.GUEST] == \
                [s.entry for s in expect.steps]
        else:
            if isinstance(r, NestedFault) and r.phase is not None:
                continue  # a guest table beyond mapped memory: the second stage stops first
            if expect.kind == "unbacked":
                continue  # beyond the view; a lookup's EPT walk ignores GPA bits 63:48
            f = bad(r, expect.kind)
            assert (f.reason, f.code, f.level) == (expect.reason, expect.code, expect.level)
        assert h1.read(OFF, GSIZE // 8) == h2.read(OFF, GSIZE // 8)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32), patch=st.binary(max_size=1024),
       where=st.integers(0, (1 << 20) - 1024), cr3=u64, gva=u64, mode=modes, access=accesses,
       set_ad=st.booleans(), second=st.sampled_from(["ept", "npt"]), pointer=u64,
       policy=st.sampled_from([None, SevPolicy(c_bit=47), SevPolicy(c_bit=51, sev=False),
                               MktmePolicy(maxphyaddr=40, keyid_bits=3),
                               TdxPolicy(gpaw=48, maxphyaddr=40, keyid_bits=2,
                                         private_keyid=1)]))
def test_walk_never_raises_on_random_bytes(seed: int, patch: bytes, where: int, cr3: int,
                                           gva: int, mode: PagingMode, access: Access,
                                           set_ad: bool, second: str, pointer: int,
                                           policy: EncryptionPolicy | None) -> None:
    host = BufferMemory(random.Random(seed).randbytes(1 << 20))
    host.write(where, patch)
    stages_: list[SecondStage] = [
        EptStage(pointer, EptControls(maxphyaddr=40, mbec=bool(seed & 2))),
        EptStage(ept.make_eptp((pointer % (1 << 20)) & ~0xFFF, ad=bool(seed & 4)), CTL),
    ] if second == "ept" else [
        NptStage(pointer, HOST), NptStage(pointer % (1 << 20), HOST, bool(seed & 8))]
    for stage in stages_:
        for root in (cr3, cr3 % (1 << 20)):
            r = walk(host, root, mode, Gva(gva), access, second=stage, set_ad=set_ad,
                     policy=policy)
            assert isinstance(r, (NestedTranslation, NestedFault))
            assert r.steps == tuple(ref.step for ref in r.references)
