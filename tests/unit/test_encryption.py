"""Encrypted memory through nested tables: SME/SEV C-bits, MKTME KeyIDs, the TDX shared bit.

Each rule of :mod:`hvtools.mmu.encryption` is checked twice: on a :class:`Reference` directly
(every combination of the bits that decide it), and through a full nested walk over hand-built
guest and second-stage tables (every reference of the walk classified, the key bits stripped).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvtools.addr import Gva
from hvtools.bits import BitStruct
from hvtools.errors import UsageError
from hvtools.memory.buffer import BufferMemory
from hvtools.mmu import encryption
from hvtools.mmu.encryption import (
    Cpuid8000001FEbx,
    MktmePolicy,
    NoEncryption,
    Reference,
    Role,
    SevPolicy,
    TdxPolicy,
)
from hvtools.mmu.ept import EptBuilder, EptControls, EptFlag
from hvtools.mmu.nested import (
    EptStage,
    NestedFault,
    NestedTranslation,
    NptStage,
    Phase,
    TdxStage,
    walk,
)
from hvtools.mmu.npt import NptBuilder
from hvtools.mmu.paging import Access, AccessKind, EntryFlag, PagingMode, TableBuilder
from hvtools.translation import Stage

P, RW, US = EntryFlag.P, EntryFlag.RW, EntryFlag.US
URW = P | RW | US
RWX = EptFlag.R | EptFlag.W | EptFlag.X
OFF = 0x40_0000
GSIZE = 0x20_0000
USER_VA = 0x7F00_0000_1000
DATA_GPA = 0x18_0000
UREAD = Access(AccessKind.READ, user=True)
UFETCH = Access(AccessKind.FETCH, user=True)

C47 = 1 << 47
SEV = SevPolicy(c_bit=47, asid=5)


class GuestView:
    """Guest-physical memory for the guest's builder: GPA g is HPA g + OFF."""

    def __init__(self, host: BufferMemory) -> None:
        self.host = host

    def contains(self, addr: int, size: int = 1) -> bool:
        return self.host.contains(addr + OFF, size)

    def read(self, addr: int, size: int) -> bytes:
        return self.host.read(addr + OFF, size)

    def read_u64(self, addr: int) -> int:
        return self.host.read_u64(addr + OFF)

    def write(self, addr: int, data: bytes) -> None:
        self.host.write(addr + OFF, data)

    def write_u64(self, addr: int, value: int) -> None:
        self.host.write_u64(addr + OFF, value)


def ok(r: NestedTranslation | NestedFault) -> NestedTranslation:
    assert isinstance(r, NestedTranslation), r
    return r


# -- structures and validation ---------------------------------------------------------------


def test_every_struct_in_the_module_is_tested() -> None:
    declared = {v for v in vars(encryption).values()
                if isinstance(v, type) and issubclass(v, BitStruct) and v is not BitStruct}
    assert declared == {Cpuid8000001FEbx}


def test_cpuid_fields_round_trip() -> None:
    covered = 0
    for f in Cpuid8000001FEbx.FIELDS:
        assert f.mask & covered == 0
        covered |= f.mask
        for v in (1, (1 << f.width) - 1):
            assert Cpuid8000001FEbx.decode(Cpuid8000001FEbx.encode({f.name: v}))[f.name] == v
    assert covered | Cpuid8000001FEbx.reserved_mask() == 0xFFFF_FFFF


@given(raw=st.integers(0, 2**32 - 1))
def test_cpuid_decode_encode(raw: int) -> None:
    enc = Cpuid8000001FEbx.encode(Cpuid8000001FEbx.decode(raw))
    assert enc == raw & ~Cpuid8000001FEbx.reserved_mask()


def test_sev_policy_from_cpuid() -> None:
    # An EPYC (Rome) value: C-bit 47, physical-address reduction 5, no VMPLs.
    ebx = 0x16F
    assert Cpuid8000001FEbx.decode(ebx) == {"CBIT": 47, "PHYS_ADDR_REDUCTION": 5,
                                            "NUM_VMPL": 0}
    p = SevPolicy.from_cpuid(ebx, asid=3)
    assert (p.c_bit, p.asid, p.guest_key_bits, p.host_key_bits) == (47, 3, C47, C47)
    assert SevPolicy(c_bit=51, sev=False, sme=False).guest_key_bits == 0
    assert SevPolicy(c_bit=51, sev=False, sme=False).host_key_bits == 0


@pytest.mark.parametrize("make", [
    lambda: SevPolicy(c_bit=5),
    lambda: SevPolicy(c_bit=47, asid=0),
    lambda: MktmePolicy(maxphyaddr=40, keyid_bits=16),
    lambda: MktmePolicy(maxphyaddr=60, keyid_bits=2),
    lambda: TdxPolicy(gpaw=50, maxphyaddr=46, keyid_bits=6, private_keyid=33),
    lambda: TdxPolicy(gpaw=48, maxphyaddr=46, keyid_bits=6, private_keyid=0),
    lambda: TdxPolicy(gpaw=48, maxphyaddr=46, keyid_bits=6, private_keyid=64),
])
def test_policies_refuse_impossible_parameters(make: object) -> None:
    assert callable(make)
    with pytest.raises(UsageError):
        make()


def test_no_encryption() -> None:
    p = NoEncryption()
    c = p.classify(Reference(Role.DATA, Stage.EPT, 0, 0, 0))
    assert not c.encryption.encrypted and (p.guest_key_bits, p.host_key_bits) == (0, 0)
    assert p.guest_refusal(Reference(Role.GUEST_TABLE, Stage.EPT, 1 << 47, 0)) is None


# -- SEV: every combination on a reference -----------------------------------------------------


@pytest.mark.parametrize(("guest_c", "nested_c", "fetch"),
                         list(itertools.product((0, 1), (0, 1), (False, True))))
def test_sev_data_rule(guest_c: int, nested_c: int, fetch: bool) -> None:
    """APM s15.34.5: guest C=1 (or a fetch): guest key, nested C-bit ignored; guest C=0: the
    nested C-bit picks the host key or plaintext."""
    ref = Reference(Role.DATA, Stage.NPT, 0x5000, host_pointer=0x9000 | nested_c << 47 | URW,
                    guest_pointer=0x5000 | guest_c << 47 | URW, fetch=fetch)
    c = SEV.classify(ref)
    e = c.encryption
    if guest_c or fetch:
        assert (e.encrypted, e.key_id, e.decided_by) == (True, 5, Stage.GUEST)
        assert [(s.stage, s.value) for s in c.stages] == [(Stage.GUEST, guest_c),
                                                         (Stage.NPT, nested_c)]
        assert c.stages[1].effect.startswith("ignored")
        assert ("forced" in c.stages[0].effect) == fetch
    else:
        assert (e.encrypted, e.key_id, e.decided_by) == (
            bool(nested_c), 0 if nested_c else None, Stage.NPT)
        assert c.stages[-1].effect == ("host key" if nested_c else "plaintext")


@pytest.mark.parametrize(("pointer_c", "nested_c"), list(itertools.product((0, 1), (0, 1))))
def test_sev_guest_tables_are_always_private(pointer_c: int, nested_c: int) -> None:
    ref = Reference(Role.GUEST_TABLE, Stage.NPT, 0x1000, host_pointer=nested_c << 47,
                    guest_pointer=0x1000 | pointer_c << 47)
    e = SEV.classify(ref).encryption
    assert (e.encrypted, e.key_id, e.decided_by) == (True, 5, Stage.GUEST)
    assert "always private" in e.detail


@pytest.mark.parametrize("c", [0, 1])
def test_sme_nested_tables_follow_their_pointer(c: int) -> None:
    ref = Reference(Role.SECOND_TABLE, Stage.NPT, 0x1000, host_pointer=0x3000 | c << 47)
    e = SEV.classify(ref).encryption
    assert (e.encrypted, e.decided_by) == (bool(c), Stage.NPT)
    # Without SME the bit is not a C-bit at all.
    e = SevPolicy(c_bit=47, sme=False).classify(ref).encryption
    assert not e.encrypted


@pytest.mark.parametrize(("guest_c", "nested_c"), list(itertools.product((0, 1), (0, 1))))
def test_a_guest_without_sev(guest_c: int, nested_c: int) -> None:
    """Without SEV the guest's C-bit position is an address bit: only the nested table decides
    (for table reads and fetches too)."""
    p = SevPolicy(c_bit=47, sev=False)
    assert p.guest_key_bits == 0
    for role, fetch in ((Role.DATA, False), (Role.DATA, True), (Role.GUEST_TABLE, False)):
        c = p.classify(Reference(role, Stage.NPT, 0, host_pointer=nested_c << 47,
                                 guest_pointer=guest_c << 47, fetch=fetch))
        assert (c.encryption.encrypted, c.encryption.decided_by) == (bool(nested_c), Stage.NPT)
        assert c.stages[0].effect.startswith("ignored")


# -- SEV through a nested walk ---------------------------------------------------------------


def sev_world(*, guest_c: bool, nested_c: bool, ncr3_c: bool = True, c_bit: int = 47,
              ) -> tuple[BufferMemory, int, NptStage, int]:
    """A guest whose CR3 and table pointers carry the C-bit, on NPT whose entries carry it too
    (except the data leaf's, set by ``nested_c``); returns host memory, guest CR3, the stage and
    the guest leaf's GPA."""
    c = 1 << c_bit
    host = BufferMemory(8 << 20)
    g = TableBuilder(GuestView(host), first_table=0x1000, table_limit=0x10_0000)
    leaf = g.map(USER_VA, DATA_GPA | (c if guest_c else 0), flags=URW)
    view = GuestView(host)
    # Guest table pointers: C = 1, as an SEV guest's kernel sets them (addresses taken before
    # the builder could no longer follow them).
    for addr in [g.entry_address(USER_VA, level, create=False) for level in (4, 3, 2)]:
        view.write_u64(addr, view.read_u64(addr) | c)
    n = NptBuilder(host, first_table=0x10_0000, table_limit=OFF)
    for gpa in range(0, GSIZE, 0x1000):
        n.map(gpa, gpa + OFF)
    nleaf = n.entry_address(DATA_GPA, 1)
    host.write_u64(nleaf, host.read_u64(nleaf) | (c if nested_c else 0))
    # The NPT's own table pointers: C = 1 (every walk shares them: one PML4E, PDPTE, PDE).
    for addr in [n.entry_address(DATA_GPA, level) for level in (4, 3, 2)]:
        host.write_u64(addr, host.read_u64(addr) | c)
    host_mode = PagingMode(maxphyaddr=48)
    return host, g.cr3 | c, NptStage(n.ncr3 | (c if ncr3_c else 0), host_mode), leaf


@pytest.mark.parametrize(("guest_c", "nested_c"), list(itertools.product((0, 1), (0, 1))))
def test_sev_nested_walk(guest_c: int, nested_c: int) -> None:
    host, cr3, stage, _ = sev_world(guest_c=bool(guest_c), nested_c=bool(nested_c))
    mode = PagingMode(maxphyaddr=48)
    t = ok(walk(host, cr3, mode, Gva(USER_VA + 8), UREAD, second=stage, policy=SEV))
    assert len(t.steps) == 24
    assert (t.gpa, t.output) == (DATA_GPA + 8, DATA_GPA + OFF + 8)  # both C-bits stripped
    e = t.encryption
    if guest_c:
        assert (e.encrypted, e.key_id, e.decided_by) == (True, 5, Stage.GUEST)
    else:
        assert (e.encrypted, e.key_id, e.decided_by) == (bool(nested_c),
                                                         0 if nested_c else None, Stage.NPT)
    assert t.data.stages[0].stage is Stage.GUEST and t.data.stages[1].stage is Stage.NPT
    for ref in t.references:
        enc = ref.classification.encryption
        if ref.role is Role.GUEST_TABLE:  # always private
            assert (enc.encrypted, enc.key_id, enc.decided_by) == (True, 5, Stage.GUEST)
        else:  # NPT tables: their pointers (nCR3 and the NPT entries above) all carry C = 1
            assert (ref.role, enc.encrypted, enc.key_id) == (Role.SECOND_TABLE, True, 0)
    # A fetch is always private, whatever the guest's C-bit.
    t = ok(walk(host, cr3, mode, Gva(USER_VA), UFETCH, second=stage, policy=SEV))
    assert (t.encryption.key_id, t.encryption.decided_by) == (5, Stage.GUEST)


def test_sev_nested_tables_without_c_bit_in_ncr3() -> None:
    host, cr3, stage, _ = sev_world(guest_c=True, nested_c=False, ncr3_c=False)
    t = ok(walk(host, cr3, PagingMode(maxphyaddr=48), Gva(USER_VA), UREAD, second=stage,
                policy=SEV))
    first_of_each_walk = [r for i, r in enumerate(t.references) if i % 5 == 0]
    assert all(not r.classification.encryption.encrypted for r in first_of_each_walk)
    assert all(r.classification.encryption.encrypted for i, r in enumerate(t.references)
               if i % 5 in (1, 2, 3))


def test_sev_c_bit_above_maxphyaddr_is_not_reserved() -> None:
    """C-bit 51 with a guest MAXPHYADDR of 48: a key bit for an SEV guest, a reserved bit for
    a guest without SEV."""
    host, cr3, stage, _ = sev_world(guest_c=True, nested_c=False, c_bit=51)
    mode = PagingMode(maxphyaddr=48)
    sev51 = SevPolicy(c_bit=51, asid=2)
    t = ok(walk(host, cr3, mode, Gva(USER_VA), UREAD, second=stage, policy=sev51))
    assert (t.gpa, t.encryption.key_id) == (DATA_GPA, 2)
    plain = SevPolicy(c_bit=51, sev=False)
    f = walk(host, cr3, mode, Gva(USER_VA), UREAD, second=stage, policy=plain)
    assert isinstance(f, NestedFault)
    assert (f.kind, f.reason, f.stage, f.code) == ("page-fault", "reserved-bit", Stage.GUEST,
                                                   0xD)


def test_without_sev_the_c_bit_position_is_a_gpa_bit() -> None:
    host, cr3, stage, _ = sev_world(guest_c=False, nested_c=False)
    mode = PagingMode(maxphyaddr=48)
    f = walk(host, cr3, mode, Gva(USER_VA), UREAD, second=stage,
             policy=SevPolicy(c_bit=47, sev=False))
    # The guest CR3 carries bit 47: as an address bit it takes the walk to an unmapped GPA.
    assert isinstance(f, NestedFault)
    assert (f.kind, f.phase, f.address) == ("npf", Phase.GUEST_TABLE, cr3 + 0xFE * 8)


# -- MKTME ---------------------------------------------------------------------------------------

MK = MktmePolicy(maxphyaddr=40, keyid_bits=2)  # KeyID in bits 39:38


@pytest.mark.parametrize(("kid", "tme"), list(itertools.product(range(4), (False, True))))
def test_mktme_keyid_rule(kid: int, tme: bool) -> None:
    p = MktmePolicy(maxphyaddr=40, keyid_bits=2, tme=tme)
    for role in Role:
        c = p.classify(Reference(role, Stage.EPT, 0x1000, host_pointer=0x5000 | kid << 38,
                                 guest_pointer=0x1000 | 3 << 38))
        e = c.encryption
        assert (e.encrypted, e.key_id, e.decided_by) == (kid != 0 or tme, kid, Stage.EPT)
        assert c.stages[-1].name == "KeyID" and c.stages[-1].value == kid
    assert p.host_key_bits == 3 << 38 and p.guest_key_bits == 0


def test_mktme_through_a_nested_walk() -> None:
    host = BufferMemory(8 << 20)
    g = TableBuilder(GuestView(host), first_table=0x1000, table_limit=0x10_0000)
    g.map(USER_VA, DATA_GPA, flags=URW)
    e = EptBuilder(host, first_table=0x10_0000, table_limit=OFF)
    for gpa in range(0, GSIZE, 0x1000):
        kid = 2 if gpa == DATA_GPA else 1  # data with KeyID 2, the guest's tables with 1
        e.map(gpa, gpa + OFF | kid << 38, flags=RWX)
    eptp = e.eptp() | 3 << 38  # the EPT root table itself with KeyID 3
    stage = EptStage(eptp, EptControls(maxphyaddr=40))
    t = ok(walk(host, g.cr3, PagingMode(maxphyaddr=40), Gva(USER_VA), UREAD, second=stage,
                policy=MK))
    assert (t.output, t.encryption.key_id, t.encryption.decided_by) == (DATA_GPA + OFF, 2,
                                                                         Stage.EPT)
    kinds = [(r.role, r.classification.encryption.key_id) for r in t.references]
    # Each EPT walk: the root read with the EPTP's KeyID 3, the rest with KeyID 0 (the EPT's
    # own entries carry none); each guest table read with its EPT leaf's KeyID 1.
    assert kinds == ([(Role.SECOND_TABLE, 3)] + [(Role.SECOND_TABLE, 0)] * 3
                     + [(Role.GUEST_TABLE, 1)]) * 4 + [(Role.SECOND_TABLE, 3)] + \
        [(Role.SECOND_TABLE, 0)] * 3
    # Without declaring the KeyID bits they are address bits: the EPT root is out of memory.
    f = walk(host, g.cr3, PagingMode(maxphyaddr=40), Gva(USER_VA), UREAD, second=stage)
    assert isinstance(f, NestedFault) and f.kind == "unbacked" and f.stage is Stage.EPT


# -- TDX -------------------------------------------------------------------------------------

TDX = TdxPolicy(gpaw=48, maxphyaddr=40, keyid_bits=4, private_keyid=9)  # KeyID bits 39:36
SHARED = 1 << 47


@pytest.mark.parametrize(("shared", "kid", "role"),
                         list(itertools.product((False, True), (0, 5), list(Role))))
def test_tdx_rule(shared: bool, kid: int, role: Role) -> None:
    gpa = 0x1000 | (SHARED if shared else 0)
    c = TDX.classify(Reference(role, Stage.EPT, gpa, host_pointer=0x5000 | kid << 36,
                               guest_pointer=gpa))
    e = c.encryption
    assert e.shared is shared
    if not shared:
        assert (e.encrypted, e.key_id) == (True, 9)
        assert e.decided_by is (Stage.EPT if role is Role.SECOND_TABLE else Stage.GUEST)
        assert c.stages[-1].effect.startswith("ignored")
    else:
        assert (e.encrypted, e.key_id, e.decided_by) == (True, kid, Stage.EPT)
    plain = TdxPolicy(gpaw=48, maxphyaddr=40, keyid_bits=4, private_keyid=9, tme=False)
    e = plain.classify(Reference(role, Stage.EPT, gpa, host_pointer=0x5000))
    assert e.encryption.encrypted is not shared  # shared KeyID 0 without TME: plaintext


def test_tdx_refuses_shared_walks_and_fetches() -> None:
    assert TDX.guest_refusal(Reference(Role.GUEST_TABLE, Stage.EPT, SHARED, 0)) is not None
    assert TDX.guest_refusal(Reference(Role.DATA, Stage.EPT, SHARED, 0, fetch=True)) is not None
    assert TDX.guest_refusal(Reference(Role.DATA, Stage.EPT, SHARED, 0)) is None
    assert TDX.guest_refusal(Reference(Role.GUEST_TABLE, Stage.EPT, 0x1000, 0)) is None
    lax = TdxPolicy(gpaw=48, maxphyaddr=40, keyid_bits=4, private_keyid=9,
                    refuse_shared_walks=False)
    assert lax.guest_refusal(Reference(Role.GUEST_TABLE, Stage.EPT, SHARED, 0)) is None
    assert TDX.shared_bit == 47 and TdxPolicy(gpaw=52, maxphyaddr=52, keyid_bits=6,
                                              private_keyid=40).shared_bit == 51


def tdx_world() -> tuple[BufferMemory, TableBuilder, TdxStage, int]:
    """A TD: its private GPAs [0, 2 MiB) through the Secure EPT (KeyID 9 in every leaf), and
    one shared page, GPA SHARED | DATA_GPA, through the shared EPT with KeyID 5."""
    host = BufferMemory(8 << 20)
    g = TableBuilder(GuestView(host), first_table=0x1000, table_limit=0x10_0000)
    sept = EptBuilder(host, first_table=0x10_0000, table_limit=0x30_0000)
    for gpa in range(0, GSIZE, 0x1000):
        sept.map(gpa, gpa + OFF | 9 << 36, flags=RWX)
    shared = EptBuilder(host, first_table=0x30_0000, table_limit=OFF)
    shared.map(SHARED | DATA_GPA, DATA_GPA + OFF | 5 << 36, flags=RWX)
    ctl = EptControls(maxphyaddr=40)
    stage = TdxStage(EptStage(sept.eptp(), ctl), EptStage(shared.eptp() | 1 << 36, ctl))
    return host, g, stage, shared.root


def test_tdx_private_and_shared_through_a_nested_walk() -> None:
    host, g, stage, shared_root = tdx_world()
    mode = PagingMode(maxphyaddr=48)
    g.map(USER_VA, DATA_GPA, flags=URW)
    t = ok(walk(host, g.cr3, mode, Gva(USER_VA), UREAD, second=stage, policy=TDX))
    e = t.encryption
    assert (e.encrypted, e.key_id, e.shared, e.decided_by) == (True, 9, False, Stage.GUEST)
    assert t.output == DATA_GPA + OFF
    assert all(r.classification.encryption.key_id == 9 for r in t.references)
    g.map(USER_VA, SHARED | DATA_GPA, flags=URW)  # the guest marks the page shared
    t = ok(walk(host, g.cr3, mode, Gva(USER_VA), UREAD, second=stage, policy=TDX))
    e = t.encryption
    assert (e.encrypted, e.key_id, e.shared, e.decided_by) == (True, 5, True, Stage.EPT)
    assert (t.gpa, t.output) == (SHARED | DATA_GPA, DATA_GPA + OFF)
    final = t.references[-4:]  # the shared EPT's tables, reached from the shared EPTP
    assert final[0].step.address & ~0xFFF == shared_root
    assert [r.classification.encryption.key_id for r in final] == [1, 0, 0, 0]
    assert all(r.classification.encryption.shared for r in final)
    f = walk(host, g.cr3, mode, Gva(USER_VA), UFETCH, second=stage, policy=TDX)
    assert isinstance(f, NestedFault)
    assert (f.kind, f.reason, f.code, f.stage) == ("page-fault", "tdx-shared-fetch", 0x1D,
                                                   Stage.GUEST)


def test_tdx_guest_table_in_shared_memory_is_refused() -> None:
    host, g, stage, _ = tdx_world()
    g.map(USER_VA, DATA_GPA, flags=URW)
    pdpte = g.entry_address(USER_VA, 4, create=False)
    view = GuestView(host)
    view.write_u64(pdpte, view.read_u64(pdpte) | SHARED)  # the PDPT "moved" to shared memory
    f = walk(host, g.cr3, PagingMode(maxphyaddr=48), Gva(USER_VA), UREAD, second=stage,
             policy=TDX)
    assert isinstance(f, NestedFault)
    assert (f.reason, f.code, f.level, len(f.steps)) == ("tdx-shared-paging-structure", 0xD,
                                                         3, 5)
    lax = TdxPolicy(gpaw=48, maxphyaddr=40, keyid_bits=4, private_keyid=9,
                    refuse_shared_walks=False)
    f = walk(host, g.cr3, PagingMode(maxphyaddr=48), Gva(USER_VA), UREAD, second=stage,
             policy=lax)
    assert isinstance(f, NestedFault) and f.kind == "ept-violation"  # not in the shared EPT
    assert f.phase is Phase.GUEST_TABLE
