"""The EPT model (Intel SDM Vol. 3C s29.3) on hand-built tables, plus property tests.

Every expected exit qualification below is worked out by hand from SDM Vol. 3C Table 28-7:
read=0x1, write=0x2, fetch=0x4, readable=0x8, writable=0x10, executable=0x20,
user-executable=0x40, GLA valid=0x80, GLA translated=0x100, user linear=0x200,
writable linear=0x400, XD linear=0x800.
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
from hvtools.mmu import ept
from hvtools.mmu.ept import (
    EPT_FETCH,
    EPT_LOOKUP,
    EPT_READ,
    EPT_WRITE,
    RWX,
    EptAccess,
    EptBuilder,
    EptControls,
    EptFlag,
    EptPde,
    EptPde2M,
    EptPdpte,
    EptPdpte1G,
    EptPml4e,
    EptPml5e,
    EptPointer,
    EptPte,
    EptViolationQualification,
    EptVpidCap,
    convertible_to_ve,
    eptp_problems,
    make_eptp,
    walk,
)
from hvtools.mmu.paging import AccessKind
from hvtools.translation import Fault, Stage, Translation

R, W, X, XU, A, D, PS = EptFlag.R, EptFlag.W, EptFlag.X, EptFlag.XU, EptFlag.A, EptFlag.D, \
    EptFlag.PS
CTL = EptControls(maxphyaddr=40)
MBEC = EptControls(maxphyaddr=40, mbec=True)
GPA = 0x40_0000_3000  # 256 GiB + 12 KiB: PML4 index 0, PDPT index 0x100, PD 0, PT 3


def build(levels: int = 4, size: int = 2 << 20) -> tuple[BufferMemory, EptBuilder]:
    mem = BufferMemory(size)
    return mem, EptBuilder(mem, levels=levels, first_table=0x1000, table_limit=0x100000)


def ok(r: Translation | Fault) -> Translation:
    assert isinstance(r, Translation), r
    return r


def bad(r: Translation | Fault, kind: str) -> Fault:
    assert isinstance(r, Fault), r
    assert r.kind == kind, r
    return r


# -- structures ------------------------------------------------------------------------------

ALL_STRUCTS: tuple[type[BitStruct], ...] = (
    EptPointer, EptVpidCap, EptPml5e, EptPml4e, EptPdpte1G, EptPdpte, EptPde2M, EptPde, EptPte,
    EptViolationQualification)


def test_every_struct_in_the_module_is_tested() -> None:
    declared = {v for v in vars(ept).values()
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
            decoded = fmt.decode(fmt.encode({f.name: v}))
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


def bits(lo: int, hi: int) -> int:
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


def test_reserved_bits_are_the_sdms() -> None:
    """Bits no field declares are exactly the always-reserved bits of SDM Tables 29-1..29-6."""
    assert EptPml5e.reserved_mask() == EptPml4e.reserved_mask() == bits(3, 7)
    assert EptPdpte.reserved_mask() == EptPde.reserved_mask() == bits(3, 6)
    assert EptPdpte1G.reserved_mask() == bits(12, 29)
    assert EptPde2M.reserved_mask() == bits(12, 20)
    assert EptPte.reserved_mask() == 0
    assert EptPointer.reserved_mask() == bits(8, 11)
    assert EptViolationQualification.reserved_mask() == bits(17, 63)
    assert CTL.reserved_high == bits(40, 51)


def test_entry_format_and_names() -> None:
    assert ept.entry_format(1, 0) is EptPte
    assert ept.entry_format(2, PS) is EptPde2M and ept.entry_format(2, 0) is EptPde
    assert ept.entry_format(3, PS) is EptPdpte1G and ept.entry_format(3, 0) is EptPdpte
    assert ept.entry_format(4, PS) is EptPml4e and ept.entry_format(5, 0) is EptPml5e
    with pytest.raises(UsageError):
        ept.entry_format(6, 0)


def test_controls_from_the_capability_msr() -> None:
    # A Skylake server's value: XO, PWL4, UC, WB, 2M, 1G, INVEPT, AD, advanced exit info,
    # INVEPT single/all, INVVPID and its four types.
    cap = 0xF0106734141
    assert cap == EptVpidCap.encode({n: 1 for n in (
        "XO", "PWL4", "UC", "WB", "PDE_2M", "PDPTE_1G", "INVEPT", "AD", "ADV_EXIT",
        "INVEPT_SINGLE", "INVEPT_ALL", "INVVPID", "INVVPID_ADDR", "INVVPID_SINGLE",
        "INVVPID_ALL", "INVVPID_SINGLE_GLOBALS")})
    c = EptControls.from_capabilities(cap, maxphyaddr=46)
    assert (c.execute_only, c.pwl4, c.pwl5, c.uc, c.wb, c.page_2m, c.page_1g, c.ad,
            c.advanced_exit_info) == (True, True, False, True, True, True, True, True, True)
    assert not EptControls.from_capabilities(0, maxphyaddr=46).page_1g
    with pytest.raises(UsageError):
        EptControls(maxphyaddr=60)


# -- EPTP ------------------------------------------------------------------------------------


def test_eptp_checks_of_vm_entry() -> None:
    root = 0x5000
    assert eptp_problems(make_eptp(root), CTL) == []
    assert eptp_problems(make_eptp(root, memory_type=0), CTL) == []
    assert "memory type 4" in eptp_problems(make_eptp(root, memory_type=4), CTL)[0]
    assert "page-walk length 5" in eptp_problems(make_eptp(root, levels=5), CTL)[0]
    assert eptp_problems(make_eptp(root, levels=5), EptControls(maxphyaddr=40, pwl5=True)) == []
    assert "accessed and dirty" in eptp_problems(
        make_eptp(root, ad=True), EptControls(maxphyaddr=40, ad=False))[0]
    assert "reserved" in eptp_problems(make_eptp(root) | 1 << 9, CTL)[0]
    assert "reserved" in eptp_problems(make_eptp(root) | 1 << 45, CTL)[0]
    assert "shadow-stack" in eptp_problems(make_eptp(root) | 1 << 7, CTL)[0]
    with pytest.raises(UsageError):
        make_eptp(0x1234)


def test_bad_eptp_is_a_vm_entry_failure() -> None:
    mem, b = build()
    b.map(GPA, 0x80000)
    f = bad(walk(mem, b.eptp() | 0x300, GPA, controls=CTL), "vm-entry-failure")
    assert (f.code, f.level, f.steps) == (7, 0, ())
    # A debugger's lookup does not check the EPTP.
    assert ok(walk(mem, b.eptp() | 0x300, GPA, EPT_LOOKUP, controls=CTL)).output == 0x80000


# -- translation -------------------------------------------------------------------------------


def test_4k_page_four_levels() -> None:
    mem, b = build()
    leaf = b.map(GPA, 0x1234_5000)
    t = ok(walk(mem, b.eptp(), GPA + 0xABC, controls=CTL))
    assert (t.output, t.page_size) == (0x1234_5ABC, PAGE_4K)
    assert [s.table for s in t.steps] == ["EPT PML4E", "EPT PDPTE", "EPT PDE", "EPT PTE"]
    assert all(s.stage is Stage.EPT for s in t.steps)
    assert t.steps[-1].address == leaf and t.steps[0].address == b.root  # index 0
    assert t.steps[1].address & 0xFFF == 0x100 * 8 and t.steps[3].address & 0xFFF == 3 * 8
    p = t.permissions
    assert (p.read, p.write, p.execute, p.execute_user) == (True, True, True, None)


def test_2m_and_1g_pages() -> None:
    mem, b = build()
    b.map(0x4000_0000, 0x8000_0000, PAGE_1G, flags=R | X)
    b.map(0x20_0000, 0x60_0000, PAGE_2M, flags=R)
    t1 = ok(walk(mem, b.eptp(), 0x4123_4567, controls=CTL))
    assert (t1.output, t1.page_size, len(t1.steps)) == (0x8123_4567, PAGE_1G, 2)
    assert (t1.permissions.write, t1.permissions.execute) == (False, True)
    t2 = ok(walk(mem, b.eptp(), 0x2F_FFFF, controls=CTL))
    assert (t2.output, t2.page_size, len(t2.steps)) == (0x6F_FFFF, PAGE_2M, 3)


def test_5_level_ept() -> None:
    mem, b = build(levels=5)
    gpa = 0xF_0000_0000_0000 | GPA  # PML5 index (bits 56:48) 0xF
    b.map(gpa, 0x7000)
    ctl = EptControls(maxphyaddr=52, pwl5=True)
    t = ok(walk(mem, b.eptp(), gpa | 0x10, controls=ctl))
    assert t.output == 0x7010 and len(t.steps) == 5 and t.steps[0].table == "EPT PML5E"
    assert t.steps[0].address == b.root + 0xF * 8
    bad(walk(mem, b.eptp(), gpa, controls=CTL), "vm-entry-failure")  # no 5-level support


def test_gpa_bits_above_the_walk_are_not_used() -> None:
    mem, b = build()
    b.map(GPA, 0x9000)
    t = ok(walk(mem, b.eptp(), GPA | 0xF << 48, controls=EptControls(maxphyaddr=52)))
    assert t.output == 0x9000


def test_tables_outside_memory_are_an_unbacked_fault() -> None:
    mem, b = build()
    b.set_entry(GPA, 3, 0x7FFF_F000 | RWX)
    f = bad(walk(mem, b.eptp(), GPA, controls=CTL), "unbacked")
    assert (f.level, f.address, len(f.steps)) == (2, 0x7FFF_F000, 2)


# -- violations ------------------------------------------------------------------------------


def test_not_present_violation_qualification() -> None:
    mem, b = build()
    b.entry_address(GPA, 1)  # tables down to the PT; the PTE is 0
    f = bad(walk(mem, b.eptp(), GPA, EPT_READ, controls=CTL), "ept-violation")
    assert (f.reason, f.level, f.address, f.stage) == ("not-present", 1, GPA, Stage.EPT)
    assert f.code == 0x1  # read; no rights (the AND includes the non-present entry)
    f = bad(walk(mem, b.eptp(), GPA, EPT_WRITE, controls=CTL), "ept-violation")
    assert f.code == 0x2
    f = bad(walk(mem, b.eptp(), GPA, EPT_FETCH, controls=CTL), "ept-violation")
    assert f.code == 0x4
    # Not present at the PDPTE: the walk stops there.
    mem2, b2 = build()
    f = bad(walk(mem2, b2.eptp(), GPA, controls=CTL), "ept-violation")
    assert (f.level, len(f.steps)) == (4, 1)


def test_rights_violations_report_the_anded_rights() -> None:
    mem, b = build()
    b.map(GPA, 0x9000, flags=R | X, upper=R | W | X)
    f = bad(walk(mem, b.eptp(), GPA, EPT_WRITE, controls=CTL), "ept-violation")
    assert (f.reason, f.level) == ("write-denied", 1)
    assert f.code == 0x2 | 0x8 | 0x20  # write; readable, executable
    b.map(GPA, 0x9000, flags=R | W, upper=R | W | X)
    f = bad(walk(mem, b.eptp(), GPA, EPT_FETCH, controls=CTL), "ept-violation")
    assert (f.reason, f.code) == ("execute-denied", 0x4 | 0x8 | 0x10)
    # An upper entry without W takes W away from the AND even though the leaf has it.
    b.set_entry(GPA, 2, (mem.read_u64(b.entry_address(GPA, 2)) & ~W))
    f = bad(walk(mem, b.eptp(), GPA, EPT_WRITE, controls=CTL), "ept-violation")
    assert f.code == 0x2 | 0x8
    ok(walk(mem, b.eptp(), GPA, EPT_READ, controls=CTL))


def test_execute_only_leaf_denies_reads() -> None:
    mem, b = build()
    b.map(GPA, 0x9000, flags=X)
    f = bad(walk(mem, b.eptp(), GPA, EPT_READ, controls=CTL), "ept-violation")
    assert (f.reason, f.code) == ("read-denied", 0x1 | 0x20)
    assert ok(walk(mem, b.eptp(), GPA, EPT_FETCH, controls=CTL)).output == 0x9000


def test_linear_address_bits_of_the_qualification() -> None:
    mem, b = build()
    b.entry_address(GPA, 1)
    # A data write to the translation of a user-mode, writable, executable linear address.
    acc = EptAccess(AccessKind.WRITE, gva=0x7000, linear_user=True, linear_writable=True,
                    linear_executable=True)
    f = bad(walk(mem, b.eptp(), GPA, acc, controls=CTL), "ept-violation")
    assert f.code == 0x2 | 0x80 | 0x100 | 0x200 | 0x400
    # Supervisor, read-only, execute-disable linear address.
    acc = EptAccess(AccessKind.READ, gva=0x7000, linear_user=False, linear_writable=False,
                    linear_executable=False)
    f = bad(walk(mem, b.eptp(), GPA, acc, controls=CTL), "ept-violation")
    assert f.code == 0x1 | 0x80 | 0x100 | 0x800
    # Without advanced VM-exit information bits 9-11 are not reported.
    noadv = EptControls(maxphyaddr=40, advanced_exit_info=False)
    f = bad(walk(mem, b.eptp(), GPA, acc, controls=noadv), "ept-violation")
    assert f.code == 0x1 | 0x80 | 0x100
    # A guest paging-structure access: GLA valid, not the translation (bit 8 = 0).
    acc = EptAccess(AccessKind.READ, guest_paging=True, gva=0x7000)
    f = bad(walk(mem, b.eptp(), GPA, acc, controls=CTL), "ept-violation")
    assert f.code == 0x1 | 0x80


def test_guest_paging_accesses_count_as_writes_with_ad() -> None:
    """SDM s29.3.3.2: with EPTP bit 6, guest paging-structure accesses are writes, and an EPT
    violation on one sets both bits 0 and 1."""
    mem, b = build()
    b.map(GPA, 0x9000, flags=R | X)
    acc = EptAccess(AccessKind.READ, guest_paging=True, gva=0x1000)
    ok(walk(mem, b.eptp(ad=False), GPA, acc, controls=CTL))
    f = bad(walk(mem, b.eptp(ad=True), GPA, acc, controls=CTL), "ept-violation")
    assert (f.reason, f.code) == ("write-denied", 0x1 | 0x2 | 0x8 | 0x20 | 0x80)
    # The A/D update of a guest entry is a write: bit 1 alone without EPT A/D.
    acc = EptAccess(AccessKind.WRITE, guest_paging=True, gva=0x1000)
    f = bad(walk(mem, b.eptp(ad=False), GPA, acc, controls=CTL), "ept-violation")
    assert f.code == 0x2 | 0x8 | 0x20 | 0x80
    with pytest.raises(UsageError):
        EptAccess(AccessKind.FETCH, guest_paging=True)


def test_mode_based_execute_control() -> None:
    mem, b = build()
    b.map(GPA, 0x9000, flags=R | XU)  # user-executable only
    user = EptAccess(AccessKind.FETCH, gva=0x1000, linear_user=True, linear_writable=True,
                     linear_executable=True)
    sup = EptAccess(AccessKind.FETCH, gva=0x1000, linear_user=False, linear_writable=True,
                    linear_executable=True)
    t = ok(walk(mem, b.eptp(), GPA, user, controls=MBEC))
    assert (t.permissions.execute, t.permissions.execute_user) == (False, True)
    f = bad(walk(mem, b.eptp(), GPA, sup, controls=MBEC), "ept-violation")
    assert f.code == 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x400  # bit 6: user-executable
    # Without MBEC bit 10 is ignored and bit 2 decides for every linear address.
    f = bad(walk(mem, b.eptp(), GPA, user, controls=CTL), "ept-violation")
    assert f.code == 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
    b.map(GPA, 0x9000, flags=R | X)
    f = bad(walk(mem, b.eptp(), GPA, user, controls=MBEC), "ept-violation")
    assert f.code == 0x4 | 0x8 | 0x20 | 0x80 | 0x100 | 0x200 | 0x400
    ok(walk(mem, b.eptp(), GPA, sup, controls=MBEC))


def test_an_entry_with_only_bit_10_is_present_under_mbec() -> None:
    mem, b = build()
    b.map(GPA, 0x9000, flags=XU)
    user = EptAccess(AccessKind.FETCH, linear_user=True)
    assert ok(walk(mem, b.eptp(), GPA, user, controls=MBEC)).output == 0x9000
    f = bad(walk(mem, b.eptp(), GPA, user, controls=CTL), "ept-violation")
    assert (f.reason, f.code) == ("not-present", 0x4)
    f = bad(walk(mem, b.eptp(), GPA, EPT_READ, controls=MBEC), "ept-violation")
    assert (f.reason, f.code) == ("read-denied", 0x1 | 0x40)


# -- misconfigurations -----------------------------------------------------------------------


@pytest.mark.parametrize(("leaf", "reason"), [
    (W, "write-without-read"),
    (W | X, "write-without-read"),
    (R | W | (2 << 3), "memory-type"),
    (R | W | (3 << 3), "memory-type"),
    (R | W | (7 << 3), "memory-type"),
    (R | W | (6 << 3) | (1 << 45), "reserved-bit"),
])
def test_leaf_misconfigurations(leaf: int, reason: str) -> None:
    mem, b = build()
    b.set_entry(GPA, 1, 0x9000 | leaf)
    for access in (EPT_READ, EPT_WRITE, EPT_FETCH):
        f = bad(walk(mem, b.eptp(), GPA, access, controls=CTL), "ept-misconfig")
        assert (f.reason, f.level, f.code, f.address) == (reason, 1, 0, GPA)
    ok(walk(mem, b.eptp(), GPA, EPT_LOOKUP, controls=CTL))  # a lookup checks presence only


def test_execute_only_needs_support() -> None:
    mem, b = build()
    b.map(GPA, 0x9000, flags=X)
    f = bad(walk(mem, b.eptp(), GPA, EPT_FETCH,
                 controls=EptControls(maxphyaddr=40, execute_only=False)), "ept-misconfig")
    assert f.reason == "execute-only-unsupported"


def test_reserved_bits_in_tables_and_large_pages() -> None:
    mem, b = build()
    b.map(GPA, 0x9000)
    pml4e_addr = b.root
    pml4e = mem.read_u64(pml4e_addr)
    for bit in (3, 7):  # bits 7:3 of a PML4E are reserved
        mem.write_u64(pml4e_addr, pml4e | 1 << bit)
        f = bad(walk(mem, b.eptp(), GPA, controls=CTL), "ept-misconfig")
        assert (f.reason, f.level) == ("reserved-bit", 4)
    mem.write_u64(pml4e_addr, pml4e)
    pde_addr = b.entry_address(GPA, 2)
    pde = mem.read_u64(pde_addr)
    mem.write_u64(pde_addr, pde | 1 << 6)  # bits 6:3 of a table-referencing PDE
    assert bad(walk(mem, b.eptp(), GPA, controls=CTL), "ept-misconfig").level == 2
    mem.write_u64(pde_addr, pde)
    # 2M and 1G pages: reserved 20:12 and 29:12; unsupported page sizes.
    b.map(0x4000_0000, 0x4000_0000, PAGE_1G)
    b.set_entry(0x4000_0000, 3, 0x4000_0000 | RWX | PS | 6 << 3 | 1 << 20)
    assert bad(walk(mem, b.eptp(), 0x4000_0000, controls=CTL), "ept-misconfig").level == 3
    b.set_entry(0x4000_0000, 3, 0x4000_0000 | RWX | PS | 6 << 3)
    ok(walk(mem, b.eptp(), 0x4000_0000, controls=CTL))
    no1g = EptControls(maxphyaddr=40, page_1g=False)
    f = bad(walk(mem, b.eptp(), 0x4000_0000, controls=no1g), "ept-misconfig")
    assert (f.reason, f.level) == ("reserved-bit", 3)
    b.map(0x60_0000, 0x60_0000, PAGE_2M)
    no2m = EptControls(maxphyaddr=40, page_2m=False)
    assert bad(walk(mem, b.eptp(), 0x60_0000, controls=no2m), "ept-misconfig").level == 2
    ok(walk(mem, b.eptp(), 0x60_0000, controls=EptControls(maxphyaddr=40)))


def test_misconfig_below_beats_a_rights_violation_above() -> None:
    """s29.3.3.3: misconfigurations are found as the walk goes; rights only at the end."""
    mem, b = build()
    b.map(GPA, 0x9000, upper=R | W)  # no X above
    b.set_entry(GPA, 1, 0x9000 | R | W | X | 2 << 3)  # bad memory type in the leaf
    assert bad(walk(mem, b.eptp(), GPA, EPT_FETCH, controls=CTL), "ept-misconfig")
    b.set_entry(GPA, 1, 0x9000 | R | W | X | 6 << 3)
    bad(walk(mem, b.eptp(), GPA, EPT_FETCH, controls=CTL), "ept-violation")


def test_not_present_beats_a_misconfiguration_below() -> None:
    mem, b = build()
    b.map(GPA, 0x9000)
    b.set_entry(GPA, 1, 0x9000 | W)  # misconfigured leaf
    b.set_entry(GPA, 2, mem.read_u64(b.entry_address(GPA, 2)) & ~RWX)  # PDE not present
    assert bad(walk(mem, b.eptp(), GPA, controls=CTL), "ept-violation").level == 2


def test_key_bits_are_not_reserved_and_not_address() -> None:
    keyid = 0x3 << 38  # two KeyID bits just below MAXPHYADDR 40
    mem, b = build()
    b.map(GPA, 0x9000 | keyid)
    t = ok(walk(mem, b.eptp(), GPA, controls=CTL, key_bits=keyid))
    assert t.output == 0x9000 and t.steps[-1].entry & keyid == keyid
    # Without declaring them, they are address bits.
    assert ok(walk(mem, b.eptp(), GPA, controls=CTL)).output == 0x9000 | keyid


# -- accessed and dirty flags ----------------------------------------------------------------


def test_ad_write_back_on_write() -> None:
    mem, b = build()
    leaf = b.map(GPA, 0x9000)
    t = ok(walk(mem, b.eptp(ad=True), GPA, EPT_WRITE, controls=CTL, set_ad=True))
    assert all(s.write_back == s.entry | A for s in t.steps[:-1])
    assert t.steps[-1].write_back == t.steps[-1].entry | A | D
    assert mem.read_u64(leaf) & (A | D) == A | D
    t = ok(walk(mem, b.eptp(ad=True), GPA, EPT_WRITE, controls=CTL, set_ad=True))
    assert all(s.write_back is None for s in t.steps)  # nothing left to set


def test_ad_on_read_guest_paging_and_without_eptp_ad() -> None:
    mem, b = build()
    leaf = b.map(GPA, 0x9000)
    ok(walk(mem, b.eptp(ad=False), GPA, EPT_WRITE, controls=CTL, set_ad=True))
    assert mem.read_u64(leaf) & (A | D) == 0  # EPTP bit 6 = 0: A/D are ignored bits
    t = ok(walk(mem, b.eptp(ad=True), GPA, EPT_READ, controls=CTL, set_ad=True))
    assert mem.read_u64(leaf) & (A | D) == A and t.steps[-1].write_back == t.steps[-1].entry | A
    # A guest paging-structure read is a write under EPT A/D: it sets D.
    acc = EptAccess(AccessKind.READ, guest_paging=True, gva=0)
    t = ok(walk(mem, b.eptp(ad=True), GPA, acc, controls=CTL, set_ad=True))
    assert mem.read_u64(leaf) & D


def test_ad_on_faults_and_misuse() -> None:
    mem, b = build()
    leaf = b.map(GPA, 0x9000, flags=R)
    bad(walk(mem, b.eptp(ad=True), GPA, EPT_WRITE, controls=CTL, set_ad=True), "ept-violation")
    assert mem.read_u64(leaf) & A == 0  # the leaf only when the access is allowed
    assert mem.read_u64(b.root) & A  # the upper entries as the walk passed them

    class ReadOnly:
        def read(self, addr: int, size: int) -> bytes:
            return mem.read(addr, size)

        def read_u64(self, addr: int) -> int:
            return mem.read_u64(addr)

        def contains(self, addr: int, size: int = 1) -> bool:
            return mem.contains(addr, size)

    with pytest.raises(UsageError):
        walk(ReadOnly(), b.eptp(ad=True), GPA, controls=CTL, set_ad=True)
    with pytest.raises(UsageError):
        walk(mem, b.eptp(), -1, controls=CTL)


def test_suppress_ve() -> None:
    mem, b = build()
    b.entry_address(GPA, 1)
    ve = EptControls(maxphyaddr=40, ve=True)
    f = bad(walk(mem, b.eptp(), GPA, controls=ve), "ept-violation")
    assert convertible_to_ve(f, ve) and not convertible_to_ve(f, CTL)
    b.set_entry(GPA, 1, EptFlag.SVE)  # not present, suppress #VE
    f = bad(walk(mem, b.eptp(), GPA, controls=ve), "ept-violation")
    assert not convertible_to_ve(f, ve)


def test_builder_refuses_misuse() -> None:
    mem, b = build()
    b.map(0x20_0000, 0x20_0000, PAGE_2M)
    with pytest.raises(UsageError):
        b.map(0x20_1000, 0x1000)  # below a large page
    with pytest.raises(UsageError):
        b.map(0x1000, 0x1800)
    with pytest.raises(UsageError):
        b.map(0x1000, 0x1000, 0x3000)
    with pytest.raises(UsageError):
        EptBuilder(mem, levels=3)
    small = EptBuilder(BufferMemory(0x3000), first_table=0x1000, table_limit=0x3000)
    with pytest.raises(UsageError):
        small.map(0, 0)


def test_translate_convenience() -> None:
    mem, b = build()
    b.map(GPA, 0x9000)
    assert ept.translate(mem, b.eptp(), ept.Gpa(GPA + 1), controls=CTL) == 0x9001
    assert ept.translate(mem, b.eptp(), ept.Gpa(0), controls=CTL) is None


# -- property tests --------------------------------------------------------------------------

NPAGES = 16
u64 = st.integers(0, 2**64 - 1)
controls = st.builds(EptControls, maxphyaddr=st.sampled_from([36, 40, 46, 52]),
                     mbec=st.booleans(), execute_only=st.booleans(), page_1g=st.booleans(),
                     page_2m=st.booleans(), pwl5=st.booleans())
accesses = st.builds(EptAccess, kind=st.sampled_from(list(AccessKind)),
                     gva=st.none() | u64, linear_user=st.none() | st.booleans(),
                     linear_writable=st.none() | st.booleans(),
                     linear_executable=st.none() | st.booleans())


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32), patch=st.binary(max_size=512),
       where=st.integers(0, NPAGES * 4096 - 512), eptp=u64, gpa=u64, ctl=controls,
       access=accesses, set_ad=st.booleans(), key_bits=st.sampled_from([0, 3 << 34]))
def test_walk_never_raises_on_random_bytes(seed: int, patch: bytes, where: int, eptp: int,
                                           gpa: int, ctl: EptControls, access: EptAccess,
                                           set_ad: bool, key_bits: int) -> None:
    mem = BufferMemory(random.Random(seed).randbytes(NPAGES * 4096))
    mem.write(where, patch)
    for pointer in (eptp, (eptp & ~0xFFF) % (NPAGES * 4096) | 0x1E, eptp & 0xFF):
        r = walk(mem, pointer, gpa, access, controls=ctl, set_ad=set_ad, key_bits=key_bits)
        assert isinstance(r, (Translation, Fault))
        if isinstance(r, Fault):
            assert r.kind in ("ept-violation", "ept-misconfig", "vm-entry-failure", "unbacked")
            assert r.kind == "ept-violation" or r.code in (0, 7)


@settings(max_examples=200, deadline=None)
@given(pages=st.lists(st.tuples(st.integers(0, 2**36 - 1), st.integers(0, 2**28 - 1),
                                st.sampled_from([PAGE_4K, PAGE_2M, PAGE_1G]),
                                st.integers(1, 7)), max_size=8))
def test_built_mappings_translate_back(pages: list[tuple[int, int, int, int]]) -> None:
    """Whatever the builder maps (and is not overwritten later) translates to what it maps."""
    mem, b = build(size=1 << 20)
    done: dict[int, tuple[int, int, int]] = {}
    for gpa, hpa, size, rights in pages:
        gpa, hpa = gpa & ~(size - 1), (hpa << 12) & ~(size - 1)
        if rights in (2, 6):  # W without R: a misconfiguration by design
            rights |= 1
        try:
            b.map(gpa, hpa, size, flags=rights)
        except UsageError:
            continue
        done = {g: v for g, v in done.items() if not (g <= gpa < g + v[1] or
                                                      gpa <= g < gpa + size)}
        done[gpa] = (hpa, size, rights)
    for gpa, (hpa, size, rights) in done.items():
        t = ok(walk(mem, b.eptp(), gpa + size - 1, EPT_LOOKUP, controls=CTL))
        assert (t.output, t.page_size) == (hpa + size - 1, size)
        assert t.permissions.read == bool(rights & 1)
