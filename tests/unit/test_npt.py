"""AMD nested paging (APM Vol. 2 s15.25) on hand-built tables, plus property tests.

Every expected EXITINFO1 below is worked out by hand from APM s15.25.6: the #PF error code of
the nested access (P=0x1, R/W=0x2, U/S=0x4 always, RSV=0x8, I/D=0x10) with bit 32
(0x1_0000_0000, final GPA) or bit 33 (0x2_0000_0000, guest page-table access).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K
from hvtools.bits import BitStruct
from hvtools.errors import UsageError
from hvtools.memory.buffer import BufferMemory
from hvtools.mmu import npt, paging
from hvtools.mmu.npt import (
    NPT_FETCH,
    NPT_LOOKUP,
    NPT_READ,
    NPT_WRITE,
    NptAccess,
    NptBuilder,
    NptExitInfo1,
    exit_info1,
    walk,
)
from hvtools.mmu.paging import AccessKind, EntryFlag, PagingMode
from hvtools.translation import Fault, Stage, Translation

P, RW, US, A, D, PS, XD = (EntryFlag.P, EntryFlag.RW, EntryFlag.US, EntryFlag.A, EntryFlag.D,
                           EntryFlag.PS, EntryFlag.XD)
URW = P | RW | US
HOST = PagingMode(maxphyaddr=48)
FINAL, GPT = 1 << 32, 1 << 33
GPA = 0x1_2345_6000
GPT_READ = NptAccess(AccessKind.READ, guest_table=True)


def build(la57: bool = False) -> tuple[BufferMemory, NptBuilder]:
    mem = BufferMemory(2 << 20)
    return mem, NptBuilder(mem, la57=la57, first_table=0x1000, table_limit=0x100000)


def ok(r: Translation | Fault) -> Translation:
    assert isinstance(r, Translation), r
    return r


def npf(r: Translation | Fault) -> Fault:
    assert isinstance(r, Fault) and r.kind == "npf", r
    assert r.stage is Stage.NPT
    return r


# -- structures ------------------------------------------------------------------------------


def test_every_struct_in_the_module_is_tested() -> None:
    declared = {v for v in vars(npt).values()
                if isinstance(v, type) and issubclass(v, BitStruct) and v is not BitStruct}
    assert declared == {NptExitInfo1} | set(npt.ENTRY_FORMATS)
    # The entry formats are paging's own (APM: the nested tables use the host's format).
    assert npt.ENTRY_FORMATS == (paging.PML5E, paging.PML4E, paging.PDPTE1G, paging.PDPTE,
                                 paging.PDE2M, paging.PDE, paging.PTE)


def test_exit_info1_fields_round_trip() -> None:
    covered = 0
    for f in NptExitInfo1.FIELDS:
        assert f.mask & covered == 0
        covered |= f.mask
        assert NptExitInfo1.decode(NptExitInfo1.encode({f.name: 1}))[f.name] == 1
    assert covered | NptExitInfo1.reserved_mask() == (1 << 64) - 1
    assert NptExitInfo1.field("FINAL").mask == FINAL and NptExitInfo1.field("GPT").mask == GPT


@given(raw=st.integers(0, 2**64 - 1))
def test_exit_info1_decode_encode(raw: int) -> None:
    assert NptExitInfo1.encode(NptExitInfo1.decode(raw)) == raw & ~NptExitInfo1.reserved_mask()


# -- translation -------------------------------------------------------------------------------


def test_4k_2m_1g_and_names() -> None:
    mem, b = build()
    b.map(GPA, 0x77_7000)
    b.map(0x4000_0000, 0xC000_0000, PAGE_1G)
    b.map(0x20_0000, 0x40_0000, PAGE_2M)
    t = ok(walk(mem, b.ncr3, HOST, GPA + 0x10))
    assert (t.output, t.page_size) == (0x77_7010, PAGE_4K)
    assert [s.table for s in t.steps] == ["NPT PML4E", "NPT PDPTE", "NPT PDE", "NPT PTE"]
    assert all(s.stage is Stage.NPT for s in t.steps)
    assert (t.permissions.user, t.permissions.write, t.permissions.execute) == (True, True, True)
    t = ok(walk(mem, b.ncr3, HOST, 0x7FFF_FFFF))
    assert (t.output, t.page_size, len(t.steps)) == (0xFFFF_FFFF, PAGE_1G, 2)
    t = ok(walk(mem, b.ncr3, HOST, 0x20_0001))
    assert (t.output, t.page_size, len(t.steps)) == (0x40_0001, PAGE_2M, 3)


def test_5_level_nested_tables() -> None:
    mem, b = build(la57=True)
    gpa = 0xA_0000_0000_0000 | GPA
    b.map(gpa, 0x5000)
    host = PagingMode(maxphyaddr=52, la57=True)
    t = ok(walk(mem, b.ncr3, host, gpa))
    assert t.output == 0x5000 and len(t.steps) == 5 and t.steps[0].table == "NPT PML5E"


def test_gpa_bits_above_the_walk_are_not_used() -> None:
    mem, b = build()
    b.map(GPA, 0x5000)
    assert ok(walk(mem, b.ncr3, PagingMode(maxphyaddr=52), GPA | 0xF << 48)).output == 0x5000


# -- #NPF and EXITINFO1 ----------------------------------------------------------------------


def test_not_present() -> None:
    mem, b = build()
    b.entry_address(GPA, 1)
    f = npf(walk(mem, b.ncr3, HOST, GPA, NPT_READ))
    assert (f.reason, f.level, f.address, f.code) == ("not-present", 1, GPA, 0x1_0000_0004)
    assert npf(walk(mem, b.ncr3, HOST, GPA, NPT_WRITE)).code == 0x1_0000_0006
    assert npf(walk(mem, b.ncr3, HOST, GPA, NPT_FETCH)).code == 0x1_0000_0014
    # A guest page-table access is a user write by default (QEMU TCG and KVM agree).
    assert npf(walk(mem, b.ncr3, HOST, GPA, GPT_READ)).code == 0x2_0000_0006
    assert npf(walk(mem, b.ncr3, HOST, GPA, GPT_READ,
                    guest_table_writes=False)).code == 0x2_0000_0004


def test_nested_accesses_are_user_accesses() -> None:
    mem, b = build()
    b.map(GPA, 0x5000, flags=P | RW)  # a supervisor-only nested leaf
    f = npf(walk(mem, b.ncr3, HOST, GPA, NPT_READ))
    assert (f.reason, f.code) == ("user-supervisor", 0x1_0000_0005)
    mem, b = build()
    b.map(GPA, 0x5000, upper=P | RW)  # the leaf allows, the upper entries do not
    f = npf(walk(mem, b.ncr3, HOST, GPA, NPT_READ))
    assert (f.level, f.code) == (1, 0x1_0000_0005)


def test_write_and_execute_protection() -> None:
    mem, b = build()
    b.map(GPA, 0x5000, flags=P | US)
    f = npf(walk(mem, b.ncr3, HOST, GPA, NPT_WRITE))
    assert (f.reason, f.code) == ("write-protect", 0x1_0000_0007)
    ok(walk(mem, b.ncr3, HOST, GPA, NPT_READ))
    # A guest table on a read-only nested page: refused as a write by default.
    assert npf(walk(mem, b.ncr3, HOST, GPA, GPT_READ)).code == 0x2_0000_0007
    ok(walk(mem, b.ncr3, HOST, GPA, GPT_READ, guest_table_writes=False))
    b.map(GPA, 0x5000, flags=URW | XD)
    f = npf(walk(mem, b.ncr3, HOST, GPA, NPT_FETCH))
    assert (f.reason, f.code) == ("execute-disable", 0x1_0000_0015)
    # Without the host's EFER.NXE bit 63 is reserved, and a fetch is not reported as one.
    f = npf(walk(mem, b.ncr3, PagingMode(maxphyaddr=48, nxe=False), GPA, NPT_FETCH))
    assert (f.reason, f.code) == ("reserved-bit", 0x1_0000_000D)


def test_host_smep_smap_and_keys_do_not_apply() -> None:
    mem, b = build()
    b.map(GPA, 0x5000, flags=URW, pkey=3)
    host = PagingMode(maxphyaddr=48, smep=True, smap=True, pke=True, pkru=0xFFFF_FFFF)
    for access in (NPT_READ, NPT_WRITE, NPT_FETCH, GPT_READ):
        ok(walk(mem, b.ncr3, host, GPA, access))
    assert ok(walk(mem, b.ncr3, host, GPA)).permissions.protection_key is None


def test_reserved_bits() -> None:
    mem, b = build()
    b.set_entry(GPA, 1, 0x5000 | URW | 1 << 50)  # above MAXPHYADDR 48
    f = npf(walk(mem, b.ncr3, HOST, GPA))
    assert (f.reason, f.level, f.code) == ("reserved-bit", 1, 0x1_0000_000D)
    assert npf(walk(mem, b.ncr3, HOST, GPA, GPT_READ)).code == 0x2_0000_000F
    mem2, b2 = build()
    b2.map(0x4000_0000, 0x4000_0000, PAGE_1G)
    no1g = PagingMode(maxphyaddr=48, page_1g=False)
    f = npf(walk(mem2, b2.ncr3, no1g, 0x4000_0000))
    assert (f.reason, f.level) == ("reserved-bit", 3)
    ok(walk(mem2, b2.ncr3, no1g, 0x4000_0000, NPT_LOOKUP))


def test_exit_info1_helper() -> None:
    assert exit_info1("not-present", HOST, NPT_READ) == 0x1_0000_0004
    assert exit_info1("reserved-bit", HOST, GPT_READ) == 0x2_0000_000F
    assert exit_info1("reserved-bit", HOST, GPT_READ, guest_table_writes=False) == 0x2_0000_000D
    with pytest.raises(UsageError):
        NptAccess(AccessKind.FETCH, guest_table=True)


def test_c_bit_as_key_bit() -> None:
    """SME: the C-bit (here 51, above MAXPHYADDR 48) is not reserved and not an address bit."""
    c = 1 << 51
    mem, b = build()
    b.map(GPA, 0x5000)
    b.set_entry(GPA, 1, 0x5000 | c | URW)
    npf(walk(mem, b.ncr3, HOST, GPA))  # a reserved bit unless declared a key bit
    t = ok(walk(mem, b.ncr3 | c, HOST, GPA, key_bits=c))
    assert t.output == 0x5000 and t.steps[-1].entry & c


def test_tables_outside_memory() -> None:
    mem, b = build()
    b.set_entry(GPA, 2, 0xF000_0000 | URW)
    f = walk(mem, b.ncr3, HOST, GPA)
    assert isinstance(f, Fault) and (f.kind, f.level, f.address) == ("unbacked", 1,
                                                                    0xF000_0000 + 0x56 * 8)


# -- accessed and dirty flags ----------------------------------------------------------------


def test_ad_write_back() -> None:
    mem, b = build()
    leaf = b.map(GPA, 0x5000)
    t = ok(walk(mem, b.ncr3, HOST, GPA, NPT_READ, set_ad=True))
    assert [s.write_back for s in t.steps] == [s.entry | A for s in t.steps]
    assert mem.read_u64(leaf) & (A | D) == A
    t = ok(walk(mem, b.ncr3, HOST, GPA, GPT_READ, set_ad=True))  # a write: sets D
    assert t.steps[-1].write_back == t.steps[-1].entry | D and mem.read_u64(leaf) & D
    t = ok(walk(mem, b.ncr3, HOST, GPA, NPT_WRITE, set_ad=True))
    assert all(s.write_back is None for s in t.steps)
    b.map(GPA, 0x5000, flags=P | US)
    npf(walk(mem, b.ncr3, HOST, GPA, NPT_WRITE, set_ad=True))
    assert mem.read_u64(leaf) & A == 0  # refused: the leaf keeps A clear


def test_misuse() -> None:
    mem, b = build()
    with pytest.raises(UsageError):
        walk(mem, b.ncr3, HOST, 1 << 64)

    class ReadOnly:
        def read(self, addr: int, size: int) -> bytes:
            return mem.read(addr, size)

        def read_u64(self, addr: int) -> int:
            return mem.read_u64(addr)

        def contains(self, addr: int, size: int = 1) -> bool:
            return mem.contains(addr, size)

    with pytest.raises(UsageError):
        walk(ReadOnly(), b.ncr3, HOST, 0, set_ad=True)


# -- property tests --------------------------------------------------------------------------

NPAGES = 16
u64 = st.integers(0, 2**64 - 1)
modes = st.builds(PagingMode, maxphyaddr=st.sampled_from([36, 40, 48, 52]), la57=st.booleans(),
                  nxe=st.booleans(), page_1g=st.booleans())
accesses = st.builds(NptAccess, kind=st.sampled_from(list(AccessKind)), guest_table=st.just(False)
                     ) | st.builds(NptAccess, kind=st.sampled_from(
                         [AccessKind.READ, AccessKind.WRITE, AccessKind.LOOKUP]),
                         guest_table=st.just(True))


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), patch=st.binary(max_size=512),
       where=st.integers(0, NPAGES * 4096 - 512), ncr3=u64, gpa=u64, mode=modes,
       access=accesses, set_ad=st.booleans(), gtw=st.booleans(),
       key_bits=st.sampled_from([0, 1 << 47, 1 << 51]))
def test_walk_never_raises_on_random_bytes(seed: int, patch: bytes, where: int, ncr3: int,
                                           gpa: int, mode: PagingMode, access: NptAccess,
                                           set_ad: bool, gtw: bool, key_bits: int) -> None:
    mem = BufferMemory(random.Random(seed).randbytes(NPAGES * 4096))
    mem.write(where, patch)
    for root in (ncr3, ncr3 % (NPAGES * 4096)):
        r = walk(mem, root, mode, gpa, access, set_ad=set_ad, key_bits=key_bits,
                 guest_table_writes=gtw)
        assert isinstance(r, (Translation, Fault))
        if isinstance(r, Fault) and r.kind == "npf" and access.kind is not AccessKind.LOOKUP:
            info = NptExitInfo1.decode(r.code)
            assert info["US"] == 1 and info["FINAL"] + info["GPT"] == 1
