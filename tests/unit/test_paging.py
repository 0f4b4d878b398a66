"""The x86-64 paging model (SDM Vol. 3A ch. 4) on hand-built tables, plus property tests.

Every expected #PF error code below is worked out by hand from SDM s4.7 (Figure 4-12):
P=0x1, W/R=0x2, U/S=0x4, RSVD=0x8, I/D=0x10, PK=0x20.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Gva
from hvtools.bits import BitStruct
from hvtools.errors import UsageError
from hvtools.memory.buffer import BufferMemory
from hvtools.mmu import paging
from hvtools.mmu.paging import (
    CR0,
    CR3,
    CR3PCID,
    CR4,
    EFER,
    LOOKUP,
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
    PageFaultErrorCode,
    PagingMode,
    TableBuilder,
    TreeStats,
    coalesce,
    is_canonical,
    iter_mappings,
    summarize,
    walk,
)
from hvtools.translation import Fault, Stage, Translation

P, RW, US, A, D, PS, XD = (EntryFlag.P, EntryFlag.RW, EntryFlag.US, EntryFlag.A, EntryFlag.D,
                           EntryFlag.PS, EntryFlag.XD)
URW = P | RW | US

#: A Linux-like mode on QEMU TCG: MAXPHYADDR 40, NXE, WP; SMEP/SMAP/PKE off unless a test says.
MODE = PagingMode(maxphyaddr=40)
READ = Access(AccessKind.READ)
WRITE = Access(AccessKind.WRITE)
FETCH = Access(AccessKind.FETCH)
UREAD = Access(AccessKind.READ, user=True)
UWRITE = Access(AccessKind.WRITE, user=True)
UFETCH = Access(AccessKind.FETCH, user=True)

USER_VA = 0x7F00_0000_1000  # PML4 index 0xFE, PDPT 0, PD 0, PT 1
KERNEL_VA = 0xFFFF_FFFF_8100_0000  # PML4 0x1FF, PDPT 0x1FE, PD 8, PT 0


def build(la57: bool = False, size: int = 4 << 20) -> tuple[BufferMemory, TableBuilder]:
    mem = BufferMemory(size)
    return mem, TableBuilder(mem, la57=la57, first_table=0x1000, table_limit=0x100000)


def ok(r: Translation | Fault) -> Translation:
    assert isinstance(r, Translation), r
    return r


def fault(r: Translation | Fault) -> Fault:
    assert isinstance(r, Fault), r
    return r


# -- structures ------------------------------------------------------------------------------

ALL_STRUCTS: tuple[type[BitStruct], ...] = (
    CR0, CR3, CR3PCID, CR4, EFER, PML5E, PML4E, PDPTE1G, PDPTE, PDE2M, PDE, PTE,
    PageFaultErrorCode)


def test_every_struct_in_the_module_is_tested() -> None:
    declared = {v for v in vars(paging).values()
                if isinstance(v, type) and issubclass(v, BitStruct) and v is not BitStruct}
    assert declared == set(ALL_STRUCTS)


@pytest.mark.parametrize("fmt", ALL_STRUCTS, ids=lambda f: f.__name__)
def test_every_declared_field_round_trips(fmt: type[BitStruct]) -> None:
    """A field that is declared but wrong (overlap, typo in its range) fails here."""
    names = [f.name for f in fmt.FIELDS]
    assert len(set(names)) == len(names), "duplicate field names"
    covered = 0
    for f in fmt.FIELDS:
        assert f.mask & covered == 0, f"{fmt.__name__}.{f.name} overlaps another field"
        covered |= f.mask
        for v in {1, (1 << f.width) - 1, (0x5A5A5A5A5A5A5A5A >> (64 - f.width)) or 1}:
            encoded = fmt.encode({f.name: v})
            decoded = fmt.decode(encoded)
            assert decoded[f.name] == v
            assert all(val == 0 for name, val in decoded.items() if name != f.name)
    assert covered | fmt.reserved_mask() == (1 << fmt.WIDTH) - 1


@pytest.mark.parametrize("fmt", ALL_STRUCTS, ids=lambda f: f.__name__)
@given(data=st.data())
def test_structs_round_trip(fmt: type[BitStruct], data: st.DataObject) -> None:
    fields = {f.name: data.draw(st.integers(0, (1 << f.width) - 1), label=f.name)
              for f in fmt.FIELDS}
    value = fmt.encode(fields)
    assert fmt.decode(value) == fields
    raw = data.draw(st.integers(0, (1 << fmt.WIDTH) - 1), label="raw")
    assert fmt.encode(fmt.decode(raw)) == raw & ~fmt.reserved_mask()


def test_reserved_bits_are_the_sdms() -> None:
    """Bits no field declares are exactly the always-reserved bits of Tables 4-14..4-20."""
    bit7 = 1 << 7
    assert PML5E.reserved_mask() == bit7
    assert PML4E.reserved_mask() == bit7
    assert PDPTE1G.reserved_mask() == ((1 << 30) - 1) & ~((1 << 13) - 1)  # 29:13
    assert PDE2M.reserved_mask() == ((1 << 21) - 1) & ~((1 << 13) - 1)  # 20:13
    assert PDPTE.reserved_mask() == PDE.reserved_mask() == PTE.reserved_mask() == 0
    m40 = PagingMode(maxphyaddr=40)
    assert m40.reserved_mask(PTE) == ((1 << 52) - 1) & ~((1 << 40) - 1)
    assert PagingMode(maxphyaddr=40, nxe=False).reserved_mask(PTE) & (1 << 63)


def test_mode_from_registers_as_a_linux_guest_sets_them() -> None:
    # What `info registers` showed for a Debian 6.1 guest under QEMU 10 TCG -cpu max.
    mode = PagingMode.from_registers(cr0=0x80050033, cr4=0x00751EB0, efer=0xD01, maxphyaddr=40)
    assert (mode.la57, mode.nxe, mode.wp, mode.smep, mode.smap, mode.pke, mode.pks) == (
        True, True, True, True, True, True, False)
    assert PagingMode.from_registers(cr0=0x80050033, cr4=0x00750EB0, efer=0xD01,
                                     maxphyaddr=40).levels == 4
    with pytest.raises(UsageError, match="4-level or 5-level"):
        PagingMode.from_registers(cr0=0x11, cr4=0, efer=0, maxphyaddr=40)
    with pytest.raises(UsageError, match="MAXPHYADDR"):
        PagingMode(maxphyaddr=53)
    with pytest.raises(UsageError):
        Access(AccessKind.READ, user=True, implicit=True)


# -- translations ----------------------------------------------------------------------------


def test_4k_page_four_levels() -> None:
    mem, tb = build()
    leaf = tb.map(USER_VA, 0x345000, flags=URW)
    r = ok(walk(mem, tb.cr3, MODE, Gva(USER_VA + 0xABC), UREAD))
    assert (r.output, r.page_size) == (0x345ABC, PAGE_4K)
    assert [s.table for s in r.steps] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert [s.level for s in r.steps] == [4, 3, 2, 1]
    assert all(s.stage is Stage.GUEST for s in r.steps)
    # The builder took tables 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT).
    assert [s.address for s in r.steps] == [0x1000 + 0xFE * 8, 0x2000, 0x3000, 0x4000 + 8]
    assert r.steps[-1].address == leaf
    assert r.steps[-1].entry == 0x345000 | URW
    assert r.permissions.write and r.permissions.user and r.permissions.execute
    assert r.permissions.protection_key is None  # CR4.PKE = 0


def test_2m_and_1g_pages() -> None:
    mem, tb = build()
    tb.map(KERNEL_VA, 0x4_0000_0000 - PAGE_2M, PAGE_2M, flags=P | RW)
    tb.map(0xFFFF_8880_0000_0000, PAGE_1G * 3, PAGE_1G, flags=P | RW | XD)
    r = ok(walk(mem, tb.cr3, MODE, Gva(KERNEL_VA + 0x12_3456)))
    assert (r.output, r.page_size, len(r.steps)) == (0x3_FFF2_3456, PAGE_2M, 3)
    assert r.steps[-1].table == "PDE" and r.steps[-1].entry & PS
    r = ok(walk(mem, tb.cr3, MODE, Gva(0xFFFF_8880_3FFF_FFFF)))
    assert (r.output, r.page_size, len(r.steps)) == (0xFFFF_FFFF, PAGE_1G, 2)
    assert not r.permissions.execute and not r.permissions.user


def test_5_level_paging() -> None:
    mem, tb = build(la57=True)
    mode = PagingMode(maxphyaddr=40, la57=True)
    gva = 0x00AB_CDEF_1234_5000  # canonical only with 57 bits: bit 56 clear, 55:48 used
    tb.map(gva, 0x777000, flags=URW)
    r = ok(walk(mem, tb.cr3, mode, Gva(gva + 0x10), UREAD))
    assert r.output == 0x777010
    assert [s.table for s in r.steps] == ["PML5E", "PML4E", "PDPTE", "PDE", "PTE"]
    assert r.steps[0].address == 0x1000 + ((gva >> 48) & 0x1FF) * 8
    # The same address is non-canonical for 4-level paging: #GP, nothing read.
    g = fault(walk(mem, tb.cr3, MODE, Gva(gva), UREAD))
    assert (g.kind, g.reason, g.code, g.level, g.steps) == (
        "general-protection", "non-canonical", 0, 0, ())
    top = 0xFF00_0000_0000_0000  # canonical 57-bit kernel half, not mapped
    assert fault(walk(mem, tb.cr3, mode, Gva(top))).reason == "not-present"


def test_canonical_checks() -> None:
    for gva, c48, c57 in [(0, True, True), (0x7FFF_FFFF_FFFF, True, True),
                          (0x8000_0000_0000, False, True), (0xFFFF_8000_0000_0000, True, True),
                          (0xFFFF_7FFF_FFFF_FFFF, False, True),
                          (0x00FF_FFFF_FFFF_FFFF, False, True),
                          (0x0100_0000_0000_0000, False, False),
                          (0xFF00_0000_0000_0000, False, True),
                          (0xFEFF_FFFF_FFFF_FFFF, False, False)]:
        assert is_canonical(gva, False) is c48, hex(gva)
        assert is_canonical(gva, True) is c57, hex(gva)


def test_cr3_low_bits_and_bits_above_maxphyaddr_are_not_an_address() -> None:
    mem, tb = build()
    tb.map(USER_VA, 0x345000, flags=URW)
    pcid_cr3 = tb.cr3 | 0x5 | (1 << 45)  # PCID 5 and a bit above MAXPHYADDR 40
    assert ok(walk(mem, pcid_cr3, MODE, Gva(USER_VA), UREAD)).output == 0x345000


# -- faults, each error code by hand -----------------------------------------------------------


def test_not_present_codes() -> None:
    mem, tb = build()
    tb.map(USER_VA, 0x345000, flags=URW)
    hole = USER_VA + PAGE_4K  # PTE index 2 is zero
    f = fault(walk(mem, tb.cr3, MODE, Gva(hole), READ))
    assert (f.kind, f.reason, f.code, f.level, f.address) == ("page-fault", "not-present", 0x0,
                                                                 1, hole)
    assert len(f.steps) == 4 and f.steps[-1].entry == 0
    assert fault(walk(mem, tb.cr3, MODE, Gva(hole), UWRITE)).code == 0x6  # W|U
    assert fault(walk(mem, tb.cr3, MODE, Gva(hole), FETCH)).code == 0x10  # I/D (NXE=1)
    no_nx = PagingMode(maxphyaddr=40, nxe=False)
    assert fault(walk(mem, tb.cr3, no_nx, Gva(hole), FETCH)).code == 0x0  # I/D reserved
    smep_only = PagingMode(maxphyaddr=40, nxe=False, smep=True)
    assert fault(walk(mem, tb.cr3, smep_only, Gva(hole), UFETCH)).code == 0x14  # U|I/D
    f = fault(walk(mem, tb.cr3, MODE, Gva(0x1234_5678_9000)))  # PML4 index 0x24: empty
    assert (f.level, len(f.steps)) == (4, 1)


def test_user_supervisor_and_write_protect() -> None:
    mem, tb = build()
    tb.map(KERNEL_VA, 0x200000, flags=P | RW)  # supervisor, writable
    tb.map(USER_VA, 0x345000, flags=P | US)  # user, read-only
    f = fault(walk(mem, tb.cr3, MODE, Gva(KERNEL_VA), UREAD))
    assert (f.reason, f.code, f.level) == ("user-supervisor", 0x5, 1)  # P|U
    assert fault(walk(mem, tb.cr3, MODE, Gva(KERNEL_VA), UWRITE)).code == 0x7  # P|W|U
    f = fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), UWRITE))
    assert (f.reason, f.code) == ("write-protect", 0x7)  # P|W|U
    f = fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), WRITE))  # supervisor, CR0.WP=1
    assert (f.reason, f.code) == ("write-protect", 0x3)  # P|W
    no_wp = PagingMode(maxphyaddr=40, wp=False)
    assert ok(walk(mem, tb.cr3, no_wp, Gva(USER_VA), WRITE)).output == 0x345000
    assert fault(walk(mem, tb.cr3, no_wp, Gva(USER_VA), UWRITE)).code == 0x7  # WP is moot
    # R/W = 0 in an upper level write-protects everything below it.
    mem2, tb2 = build()
    tb2.map(USER_VA, 0x345000, flags=URW, upper=P | US)
    assert not ok(walk(mem2, tb2.cr3, MODE, Gva(USER_VA), UREAD)).permissions.write
    assert fault(walk(mem2, tb2.cr3, MODE, Gva(USER_VA), UWRITE)).code == 0x7
    # U/S = 0 in an upper level makes the address supervisor-mode.
    mem3, tb3 = build()
    tb3.map(USER_VA, 0x345000, flags=URW, upper=P | RW)
    assert fault(walk(mem3, tb3.cr3, MODE, Gva(USER_VA), UREAD)).code == 0x5


def test_execute_disable_and_smep() -> None:
    mem, tb = build()
    tb.map(USER_VA, 0x345000, flags=URW | XD)
    tb.map(USER_VA + PAGE_4K, 0x346000, flags=URW)
    f = fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), UFETCH))
    assert (f.reason, f.code) == ("execute-disable", 0x15)  # P|U|I/D
    assert fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), FETCH)).code == 0x11  # P|I/D
    assert ok(walk(mem, tb.cr3, MODE, Gva(USER_VA + PAGE_4K), FETCH)).output == 0x346000
    smep = PagingMode(maxphyaddr=40, smep=True)
    f = fault(walk(mem, tb.cr3, smep, Gva(USER_VA + PAGE_4K), FETCH))
    assert (f.reason, f.code) == ("smep", 0x11)  # P|I/D
    assert ok(walk(mem, tb.cr3, smep, Gva(USER_VA + PAGE_4K), UFETCH)).output == 0x346000
    # XD in a PML4E disables execution for everything below it.
    mem2, tb2 = build()
    tb2.map(USER_VA, 0x345000, flags=URW, upper=URW | XD)
    assert fault(walk(mem2, tb2.cr3, MODE, Gva(USER_VA), UFETCH)).code == 0x15


def test_smap() -> None:
    mem, tb = build()
    tb.map(USER_VA, 0x345000, flags=URW)
    smap = PagingMode(maxphyaddr=40, smap=True)
    f = fault(walk(mem, tb.cr3, smap, Gva(USER_VA), READ))
    assert (f.reason, f.code) == ("smap", 0x1)  # P
    assert fault(walk(mem, tb.cr3, smap, Gva(USER_VA), WRITE)).code == 0x3  # P|W
    stac = Access(AccessKind.READ, ac=True)
    assert ok(walk(mem, tb.cr3, smap, Gva(USER_VA), stac)).output == 0x345000
    implicit = Access(AccessKind.READ, implicit=True, ac=True)  # AC does not help implicit
    assert fault(walk(mem, tb.cr3, smap, Gva(USER_VA), implicit)).code == 0x1
    assert ok(walk(mem, tb.cr3, smap, Gva(USER_VA), UREAD)).output == 0x345000
    assert ok(walk(mem, tb.cr3, MODE, Gva(USER_VA), implicit)).output == 0x345000  # SMAP=0


def test_protection_keys() -> None:
    mem, tb = build()
    tb.map(USER_VA, 0x345000, flags=URW, pkey=5)
    tb.map(KERNEL_VA, 0x200000, flags=P | RW, pkey=5)
    ad5, wd5 = 1 << 10, 1 << 11
    pke = PagingMode(maxphyaddr=40, pke=True, pkru=ad5)
    r = ok(walk(mem, tb.cr3, PagingMode(maxphyaddr=40, pke=True), Gva(USER_VA), UREAD))
    assert r.permissions.protection_key == 5
    f = fault(walk(mem, tb.cr3, pke, Gva(USER_VA), UREAD))
    assert (f.reason, f.code) == ("protection-key", 0x25)  # P|U|PK
    assert fault(walk(mem, tb.cr3, pke, Gva(USER_VA), READ)).code == 0x21  # P|PK, supervisor
    assert ok(walk(mem, tb.cr3, pke, Gva(USER_VA), UFETCH)).output == 0x345000  # not fetches
    assert ok(walk(mem, tb.cr3, pke, Gva(KERNEL_VA), READ)).output == 0x200000  # PKS=0
    wd = PagingMode(maxphyaddr=40, pke=True, pkru=wd5)
    assert ok(walk(mem, tb.cr3, wd, Gva(USER_VA), UREAD)).output == 0x345000
    assert fault(walk(mem, tb.cr3, wd, Gva(USER_VA), UWRITE)).code == 0x27  # P|W|U|PK
    assert fault(walk(mem, tb.cr3, wd, Gva(USER_VA), WRITE)).code == 0x23  # P|W|PK, WP=1
    wd_nowp = PagingMode(maxphyaddr=40, pke=True, pkru=wd5, wp=False)
    assert ok(walk(mem, tb.cr3, wd_nowp, Gva(USER_VA), WRITE)).output == 0x345000
    other_key = PagingMode(maxphyaddr=40, pke=True, pkru=0xFFFFFFFF & ~(ad5 | wd5))
    assert ok(walk(mem, tb.cr3, other_key, Gva(USER_VA), UWRITE)).output == 0x345000
    pks = PagingMode(maxphyaddr=40, pks=True, pkrs=ad5)
    f = fault(walk(mem, tb.cr3, pks, Gva(KERNEL_VA), READ))
    assert (f.reason, f.code) == ("protection-key", 0x21)  # P|PK
    assert ok(walk(mem, tb.cr3, pks, Gva(USER_VA), UREAD)).output == 0x345000  # PKE=0
    # A user access to a supervisor page is a plain U/S violation, keys or not.
    assert fault(walk(mem, tb.cr3, pks, Gva(KERNEL_VA), UREAD)).code == 0x5


def test_reserved_bits_by_maxphyaddr_and_format() -> None:
    mem, tb = build()
    leaf = tb.map(USER_VA, 0x345000, flags=URW)
    mem.write_u64(leaf, 0x345000 | URW | (1 << 40))
    f = fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), READ))
    assert (f.reason, f.code, f.level) == ("reserved-bit", 0x9, 1)  # P|RSVD
    assert fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), UWRITE)).code == 0xF  # P|W|U|RSVD
    assert fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), UFETCH)).code == 0x1D  # P|U|RSVD|I/D
    m41 = PagingMode(maxphyaddr=41)
    assert ok(walk(mem, tb.cr3, m41, Gva(USER_VA), READ)).output == 0x100_0034_5000
    # A lookup ignores reserved bits and takes address bits 51:12 as QEMU's gva2gpa does.
    assert ok(walk(mem, tb.cr3, MODE, Gva(USER_VA), LOOKUP)).output == 0x100_0034_5000
    # XD with IA32_EFER.NXE = 0 is reserved.
    mem.write_u64(leaf, 0x345000 | URW | XD)
    no_nx = PagingMode(maxphyaddr=40, nxe=False)
    assert fault(walk(mem, tb.cr3, no_nx, Gva(USER_VA), READ)).code == 0x9
    assert ok(walk(mem, tb.cr3, MODE, Gva(USER_VA), READ)).output == 0x345000
    # PS in a PML4E is reserved; the walk stops at level 4.
    pml4e = tb.entry_address(USER_VA, 4)
    mem.write_u64(pml4e, mem.read_u64(pml4e) | PS)
    f = fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), READ))
    assert (f.reason, f.code, f.level, len(f.steps)) == ("reserved-bit", 0x9, 4, 1)


def test_reserved_bits_of_large_pages() -> None:
    mem, tb = build()
    pde = tb.map(KERNEL_VA, 0x400000, PAGE_2M, flags=P | RW)
    pdpte = tb.map(0xFFFF_8880_0000_0000, PAGE_1G, PAGE_1G, flags=P | RW)
    assert ok(walk(mem, tb.cr3, MODE, Gva(KERNEL_VA))).page_size == PAGE_2M
    mem.write_u64(pde, 0x400000 | P | RW | PS | (1 << 12))  # PAT bit: fine
    assert ok(walk(mem, tb.cr3, MODE, Gva(KERNEL_VA))).output == 0x400000
    mem.write_u64(pde, 0x400000 | P | RW | PS | (1 << 20))  # bit 20: reserved (20:13)
    f = fault(walk(mem, tb.cr3, MODE, Gva(KERNEL_VA)))
    assert (f.reason, f.code, f.level) == ("reserved-bit", 0x9, 2)
    mem.write_u64(pdpte, PAGE_1G | P | RW | PS | (1 << 13))  # bit 13: reserved (29:13)
    f = fault(walk(mem, tb.cr3, MODE, Gva(0xFFFF_8880_0000_0000)))
    assert (f.reason, f.code, f.level) == ("reserved-bit", 0x9, 3)
    mem.write_u64(pdpte, PAGE_1G | P | RW | PS)
    no_1g = PagingMode(maxphyaddr=40, page_1g=False)
    f = fault(walk(mem, tb.cr3, no_1g, Gva(0xFFFF_8880_0000_0000)))
    assert (f.reason, f.code, f.level) == ("reserved-bit", 0x9, 3)


def test_tables_outside_memory_are_an_unbacked_fault() -> None:
    mem, tb = build()
    pml4e = tb.entry_address(USER_VA, 4)
    mem.write_u64(pml4e, 0x80_0000_0000 | URW)  # a PDPT far beyond the 4-MiB buffer
    f = fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), UREAD))
    assert (f.kind, f.reason, f.code, f.level) == ("unbacked", "table-unbacked", 0, 3)
    assert f.address == 0x80_0000_0000 + 0  # PDPT index 0
    assert fault(walk(mem, 0x8000_0000, MODE, Gva(USER_VA))).level == 4


def test_lookup_ignores_rights() -> None:
    mem, tb = build()
    tb.map(USER_VA, 0x345000, flags=P | XD)
    r = ok(walk(mem, tb.cr3, PagingMode(maxphyaddr=40, smap=True, smep=True), Gva(USER_VA),
                LOOKUP))
    assert r.output == 0x345000 and not r.permissions.write and not r.permissions.execute
    f = fault(walk(mem, tb.cr3, MODE, Gva(USER_VA + PAGE_4K), LOOKUP))
    assert (f.reason, f.code) == ("not-present", 0)


# -- accessed and dirty flags (s4.8) ---------------------------------------------------------


def test_ad_write_back_on_write() -> None:
    mem, tb = build()
    leaf = tb.map(USER_VA, 0x345000, flags=URW)
    r = ok(walk(mem, tb.cr3, MODE, Gva(USER_VA), UWRITE, set_ad=True))
    for s in r.steps:
        want = s.entry | A | (D if s.level == 1 else 0)
        assert s.write_back == want
        assert mem.read_u64(s.address) == want
    assert mem.read_u64(leaf) == 0x345000 | URW | A | D
    again = ok(walk(mem, tb.cr3, MODE, Gva(USER_VA), UWRITE, set_ad=True))
    assert all(s.write_back is None for s in again.steps)


def test_ad_write_back_on_read_sets_only_a() -> None:
    mem, tb = build()
    leaf = tb.map(KERNEL_VA, 0x400000, PAGE_2M, flags=P | RW)
    r = ok(walk(mem, tb.cr3, MODE, Gva(KERNEL_VA), READ, set_ad=True))
    assert mem.read_u64(leaf) == 0x400000 | P | RW | PS | A
    assert r.steps[-1].write_back == 0x400000 | P | RW | PS | A


def test_ad_on_faults_and_lookups() -> None:
    mem, tb = build()
    leaf = tb.map(USER_VA, 0x345000, flags=P | US)  # read-only
    upper = [tb.entry_address(USER_VA, lv) for lv in (4, 3, 2)]
    before = [mem.read_u64(a) for a in upper]
    f = fault(walk(mem, tb.cr3, MODE, Gva(USER_VA), UWRITE, set_ad=True))
    assert f.reason == "write-protect"
    assert [mem.read_u64(a) for a in upper] == [b | A for b in before]  # as the walk passed
    assert mem.read_u64(leaf) == 0x345000 | P | US  # no A or D on a denied access
    assert [s.write_back for s in f.steps] == [b | A for b in before] + [None]
    # A not-present fault at level 1: the three upper entries were used, so they got A.
    mem2, tb2 = build()
    tb2.map(USER_VA, 0x345000, flags=URW)
    f = fault(walk(mem2, tb2.cr3, MODE, Gva(USER_VA + PAGE_4K), UREAD, set_ad=True))
    assert [s.write_back is not None for s in f.steps] == [True, True, True, False]
    mem3, tb3 = build()
    tb3.map(USER_VA, 0x345000, flags=URW)
    snapshot = mem3.to_bytes()
    ok(walk(mem3, tb3.cr3, MODE, Gva(USER_VA), LOOKUP, set_ad=True))
    assert mem3.to_bytes() == snapshot  # a lookup is not an access


def test_set_ad_needs_writable_memory() -> None:
    class ReadOnly:
        def __init__(self, inner: BufferMemory) -> None:
            self.inner = inner

        def read(self, addr: int, size: int) -> bytes:
            return self.inner.read(addr, size)

        def read_u64(self, addr: int) -> int:
            return self.inner.read_u64(addr)

        def contains(self, addr: int, size: int = 1) -> bool:
            return self.inner.contains(addr, size)

    mem, tb = build()
    tb.map(USER_VA, 0x345000, flags=URW)
    assert ok(walk(ReadOnly(mem), tb.cr3, MODE, Gva(USER_VA), UREAD)).output == 0x345000
    with pytest.raises(UsageError, match="WritablePhysMemory"):
        walk(ReadOnly(mem), tb.cr3, MODE, Gva(USER_VA), UREAD, set_ad=True)


# -- enumerating a tree ----------------------------------------------------------------------


def test_iter_mappings_and_coalesce() -> None:
    mem, tb = build()
    for i in range(3):
        tb.map(USER_VA + i * PAGE_4K, 0x345000 + i * PAGE_4K, flags=URW)
    tb.map(USER_VA + 3 * PAGE_4K, 0x999000, flags=URW)  # not contiguous in GPA
    tb.map(KERNEL_VA, 0x400000, PAGE_2M, flags=P | RW)
    tb.map(KERNEL_VA + PAGE_2M, 0x600000, PAGE_2M, flags=P | RW)
    tb.map(0xFFFF_8880_0000_0000, 0, PAGE_1G, flags=P | RW | XD)
    bad = tb.map(0xFFFF_8880_4000_0000, PAGE_1G, PAGE_1G, flags=P | RW)
    mem.write_u64(bad, mem.read_u64(bad) | (1 << 45))  # reserved with MAXPHYADDR 40
    stats = TreeStats()
    maps = list(iter_mappings(mem, tb.cr3, MODE, stats=stats))
    assert [(m.gva, m.gpa, m.size) for m in maps] == [
        (USER_VA, 0x345000, PAGE_4K), (USER_VA + 0x1000, 0x346000, PAGE_4K),
        (USER_VA + 0x2000, 0x347000, PAGE_4K), (USER_VA + 0x3000, 0x999000, PAGE_4K),
        (0xFFFF_8880_0000_0000, 0, PAGE_1G),
        (KERNEL_VA, 0x400000, PAGE_2M), (KERNEL_VA + PAGE_2M, 0x600000, PAGE_2M)]
    assert stats.pages == {PAGE_4K: 4, PAGE_2M: 2, PAGE_1G: 1}
    assert stats.reserved == {3: 1}
    assert stats.tables == {4: 1, 3: 3, 2: 2, 1: 1}
    assert stats.present == {4: 3, 3: 4, 2: 3, 1: 4}
    ranges = list(coalesce(maps))
    assert [(r.gva, r.gpa, r.length, r.pages) for r in ranges] == [
        (USER_VA, 0x345000, 3 * PAGE_4K, ((PAGE_4K, 3),)),
        (USER_VA + 0x3000, 0x999000, PAGE_4K, ((PAGE_4K, 1),)),
        (0xFFFF_8880_0000_0000, 0, PAGE_1G, ((PAGE_1G, 1),)),
        (KERNEL_VA, 0x400000, 2 * PAGE_2M, ((PAGE_2M, 2),))]
    summary = summarize(mem, tb.cr3, MODE)
    assert summary.mapped_bytes == 4 * PAGE_4K + PAGE_1G + 2 * PAGE_2M
    for m in maps:
        assert ok(walk(mem, tb.cr3, MODE, m.gva, LOOKUP)).output == m.gpa


def test_iter_mappings_5_level_sign_extends() -> None:
    mem, tb = build(la57=True)
    mode = PagingMode(maxphyaddr=40, la57=True)
    tb.map(0xFF11_0000_0000_0000, 0x200000, PAGE_2M, flags=P | RW)
    tb.map(0x0000_1000_0000_0000, 0x1000, flags=URW)
    assert [(m.gva, m.size) for m in iter_mappings(mem, tb.cr3, mode, with_steps=True)] == [
        (0x0000_1000_0000_0000, PAGE_4K), (0xFF11_0000_0000_0000, PAGE_2M)]
    m = next(iter_mappings(mem, tb.cr3, mode, with_steps=True))
    assert [s.table for s in m.steps] == ["PML5E", "PML4E", "PDPTE", "PDE", "PTE"]


# -- properties --------------------------------------------------------------------------------

modes = st.builds(PagingMode, maxphyaddr=st.integers(32, 52), la57=st.booleans(),
                  nxe=st.booleans(), wp=st.booleans(), smep=st.booleans(), smap=st.booleans(),
                  pke=st.booleans(), pks=st.booleans(), pkru=st.integers(0, 2**32 - 1),
                  pkrs=st.integers(0, 2**32 - 1), page_1g=st.booleans())
accesses = st.one_of(
    st.just(LOOKUP),
    st.builds(Access, kind=st.sampled_from(list(AccessKind)), user=st.booleans(),
              ac=st.booleans()),
    st.builds(Access, kind=st.sampled_from(list(AccessKind)), implicit=st.just(True),
              ac=st.booleans()))
u64 = st.integers(0, 2**64 - 1)
NPAGES = 16


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), patch=st.binary(max_size=512),
       where=st.integers(0, NPAGES * 4096 - 512), cr3=u64, gva=u64, mode=modes,
       access=accesses, set_ad=st.booleans())
def test_walk_never_raises_on_random_bytes(seed: int, patch: bytes, where: int, cr3: int,
                                           gva: int, mode: PagingMode, access: Access,
                                           set_ad: bool) -> None:
    """Any bytes at all (seeded noise with a drawn patch), any CR3, any address, any mode."""
    mem = BufferMemory(random.Random(seed).randbytes(NPAGES * 4096))
    mem.write(where, patch)
    for root in (cr3, cr3 % (NPAGES * 4096)):
        r = walk(mem, root, mode, Gva(gva), access, set_ad=set_ad)
        assert isinstance(r, (Translation, Fault))
    list(iter_mappings(mem, cr3 % (NPAGES * 4096), mode))


def random_tables(seed: int, density: float) -> BufferMemory:
    """Tables whose entries point back into the buffer, with random flags and stray bits."""
    rng = random.Random(seed)
    mem = BufferMemory(NPAGES * 4096)
    for i in range(NPAGES * 512):
        if rng.random() > density:
            continue
        kind = rng.random()
        entry = rng.randrange(NPAGES) << 12 | rng.getrandbits(12) | 1
        entry |= rng.getrandbits(4) << 59 if rng.random() < 0.3 else 0
        entry |= 1 << 63 if rng.random() < 0.3 else 0
        entry |= 1 << rng.randrange(12, 52) if rng.random() < 0.1 else 0
        if kind > 0.97:
            entry = rng.getrandbits(64)
        mem.write_u64(i * 8, entry)
    return mem


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32), density=st.sampled_from([0.003, 0.006, 0.01, 0.4]),
       mode=modes, access=accesses, gvas=st.lists(u64, max_size=20), set_ad=st.booleans())
def test_walks_on_random_tables_agree_with_the_enumeration(
        seed: int, density: float, mode: PagingMode, access: Access, gvas: list[int],
        set_ad: bool) -> None:
    """Every enumerated leaf translates to its GPA; every architected translation is a leaf."""
    mem = random_tables(seed, density)
    cr3 = (seed % NPAGES) << 12
    pages: dict[tuple[int, int], int] = {}
    for n, m in enumerate(iter_mappings(mem, cr3, mode)):
        pages[(m.size, m.gva)] = m.gpa
        r = walk(mem, cr3, mode, m.gva, LOOKUP)
        assert isinstance(r, Translation) and (r.output, r.page_size) == (m.gpa, m.size)
        if n > 300:
            break
    else:  # the enumeration is complete: every architected translation is in it
        for gva in gvas + [m for (_, m) in list(pages)[:20]]:
            r = walk(mem, cr3, mode, Gva(gva), access, set_ad=set_ad)
            assert isinstance(r, (Translation, Fault))
            if isinstance(r, Translation) and access.kind is not AccessKind.LOOKUP \
                    and not set_ad:
                base = gva & ~(r.page_size - 1) & ((1 << 64) - 1)
                assert pages[(r.page_size, base)] == r.output & ~(r.page_size - 1)


# -- the CLI over a dump file ------------------------------------------------------------------

_RUN = "import sys; from hvtools.cli.main import run; run(sys.argv[1:])"


def hv(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The CLI through its real error boundary."""
    return subprocess.run([sys.executable, "-c", _RUN, *args], input=stdin, text=True,
                          capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def dump_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    mem, tb = build()
    tb.map(USER_VA, 0x345000, flags=URW)
    tb.map(KERNEL_VA, 0x400000, PAGE_2M, flags=P | RW)
    path = tmp_path_factory.mktemp("mmu") / "pmem.bin"
    path.write_bytes(mem.to_bytes())
    return path, tb.cr3


def test_cli_translate_offline(dump_file: tuple[Path, int]) -> None:
    path, cr3 = dump_file
    res = hv("mmu", "translate", "--memory", str(path), "--cr3", hex(cr3), f"{USER_VA + 5:x}",
             hex(KERNEL_VA))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines == [f"{USER_VA + 5:#018x} -> 0x345005 4K rwx user",
                     f"{KERNEL_VA:#018x} -> 0x400000 2M rwx supervisor"]


def test_cli_translate_json_stdin_and_exit_status(dump_file: tuple[Path, int]) -> None:
    path, cr3 = dump_file
    stdin = f"{USER_VA:#x}\n# a comment\n\n0x1000\n{KERNEL_VA:x}\n0x0000800000000000\n"
    res = hv("mmu", "translate", "--memory", str(path), "--cr3", hex(cr3), "--json", "-v",
             stdin=stdin)
    assert res.returncode == 1, res.stderr  # some faulted
    objs = [json.loads(line) for line in res.stdout.splitlines()]
    assert [list(o) for o in objs] == [["gva", "gpa", "fault", "page_size", "steps"]] * 4
    assert [(o["gva"], o["gpa"], o["fault"], o["page_size"]) for o in objs] == [
        (hex(USER_VA), "0x345000", None, 4096), ("0x1000", None, "not-present", None),
        (hex(KERNEL_VA), "0x400000", None, 2097152),
        ("0x800000000000", None, "non-canonical", None)]
    assert [s["table"] for s in objs[0]["steps"]] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert objs[3]["steps"] == []
    res = hv("mmu", "translate", "--memory", str(path), "--cr3", hex(cr3), "--json",
             hex(USER_VA))
    assert "steps" not in json.loads(res.stdout)


def test_cli_translate_access_and_bad_usage(dump_file: tuple[Path, int]) -> None:
    path, cr3 = dump_file
    res = hv("mmu", "translate", "--memory", str(path), "--cr3", hex(cr3), "--access", "read",
             "--user", hex(KERNEL_VA))
    assert res.returncode == 1
    assert res.stdout.strip() == (f"{KERNEL_VA:#018x} -> fault user-supervisor "
                                  "(#PF error code 0x5 at level 2)")
    for args in (["--memory", str(path), "zz"],  # no --cr3
                 ["--memory", str(path), "--cr3", hex(cr3), "not-hex"],
                 ["--cr3", "0x1000", "0x1000"],  # neither --vm nor --memory
                 ["--vm", "x", "--memory", str(path), "--cr3", "1", "0"],
                 ["--vm", "x", "--la57", "0"],
                 ["--memory", str(path), "--cr3", hex(cr3), "--user", "0"],
                 ["--memory", str(path), "--cr3", hex(cr3), "0x1" + "0" * 16]):
        res = hv("mmu", "translate", *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.startswith("error:"), res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    res = hv("mmu", "translate", "--memory", "/nonexistent/dump", "--cr3", "0", "0")
    assert res.returncode == 2 and "cannot open" in res.stderr


# -- reading a live vCPU: the monitor's text ------------------------------------------------

INFO_REGISTERS_A = (
    "\r\nCPU#0\r\nRAX=ffffffff926178a0 RBX=0000000000000000 RCX=0000000000000001 "
    "RDX=4000000000000000\r\nR8 =0000000000000000 R9 =00000000313b264e\r\n"
    "RIP=ffffffff92617a0b RFL=00000212 [----A--] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
    "ES =0000 0000000000000000 00000000 00000000\r\n"
    "GDT=     fffffe0000001000 0000007f\r\n"
    "CR0=80050033 CR2=00007ffed6e2c458 CR3=0000000100954000 CR4=00751eb0\r\n"
    "DR0=0000000000000000 DR1=0000000000000000\r\nEFER=0000000000000d01\r\n"
    "FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80\r\n"
    "\r\nCPU#1\r\nRIP=0000000000401000 RFL=00000246 [---Z-P-] CPL=3 II=0 A20=1 SMM=0 HLT=0\r\n"
    "RSP=00007ffd43417020\r\n"
    "CR0=80050033 CR2=0000000000000000 CR3=0000000100962000 CR4=00750eb0\r\n"
    "EFER=0000000000000d01\r\n")


def test_parse_info_registers() -> None:
    from hvtools.control.mmu_live import parse_info_registers

    v0, v1 = parse_info_registers(INFO_REGISTERS_A)
    assert (v0.index, v0.cr0, v0.cr3, v0.cr4, v0.efer) == (0, 0x80050033, 0x100954000,
                                                           0x751EB0, 0xD01)
    assert (v0.rip, v0.rflags, v0.cpl, v0.halted) == (0xFFFFFFFF92617A0B, 0x212, 0, True)
    assert (v1.index, v1.cpl, v1.rsp, v1.cr3, v1.halted) == (1, 3, 0x7FFD43417020,
                                                             0x100962000, False)
    # One vCPU without the CPU# header, 32-bit layout (EIP/ESP/EFL), LF line ends.
    (v,) = parse_info_registers("EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1\n"
                                "CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000\n"
                                "EFER=0000000000000000\n")
    assert (v.rip, v.cr0, v.efer) == (0xFFF0, 0x60000010, 0)
    with pytest.raises(UsageError, match="4-level or 5-level"):
        PagingMode.from_registers(cr0=v.cr0, cr4=v.cr4, efer=v.efer, maxphyaddr=40)
    from hvtools.errors import VmError

    with pytest.raises(VmError, match="CR3, CR4"):
        parse_info_registers("CPU#0\nCR0=80050033\nEFER=d01\n")


class _Hooked(paging.TableAccess):
    """The bare-metal hooks, but through the method calls a second stage would override."""

    __slots__ = ()


@pytest.mark.parametrize("set_ad", [False, True])
@pytest.mark.parametrize("access", [READ, WRITE, LOOKUP, Access(AccessKind.FETCH, user=True),
                                    Access(AccessKind.WRITE, user=True)])
def test_walk_tables_through_hooks_equals_walk(access: Access, set_ad: bool) -> None:
    """walk() skips the hook calls for bare metal; the hooked loop must give the same."""
    results = []
    for hooked in (False, True):
        mem = BufferMemory(1 << 22)
        tb = TableBuilder(mem)
        tb.map(0x40_0000, 0x20_0000, PAGE_2M, flags=P | RW)
        tb.map(0x7F00_0000_1000, 0x30_1000, flags=URW | XD, pkey=3)
        tb.map(0x7F00_0000_2000, 0x30_2000, flags=P | US)
        tb.set_entry(0x7F00_0000_3000, 1, 0x30_3000 | URW | (1 << 51))  # reserved bit
        for gva in (0x40_0123, 0x7F00_0000_1008, 0x7F00_0000_2010, 0x7F00_0000_3000,
                    0x7F00_0000_4000, 0x8000_0000_0000):
            if not hooked:
                results.append(walk(mem, tb.cr3, MODE, Gva(gva), access, set_ad=set_ad))
                continue
            writer = paging.writer_for(mem, set_ad, access)
            tables = _Hooked(mem, writer)
            leaf = paging.walk_tables(tables, tb.cr3, MODE, gva, access)
            if isinstance(leaf, Fault):
                results.append(leaf)
                continue
            new = paging.leaf_update(leaf.entry, access)
            if writer is not None and new != leaf.entry:
                assert tables.write_entry(leaf.address, new) is None
            results.append(Translation(input=gva, output=leaf.output,
                                       page_size=paging.PAGE_SIZES[leaf.level],
                                       permissions=leaf.permissions, steps=tables.steps()))
        results.append(mem.read(0, 0x10_000))
    half = len(results) // 2
    assert results[:half] == results[half:]
    assert any(isinstance(r, Translation) for r in results[:half])
