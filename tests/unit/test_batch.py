"""The batch walker (hvtools.mmu.batch) against the scalar one (SDM Vol. 3A s4.5-s4.7).

Differential: every lane of :func:`translate_batch` must equal :func:`walk` on the same memory,
CR3, mode and access (``Translation``/``Fault`` compared field by field, steps aside), on
hypothesis-drawn tables (random entries with stray and reserved bits, large pages, tables
outside memory) and builder-made ones, with guided, random and non-canonical addresses. Hand
cases pin the #PF error codes (P=0x1, W/R=0x2, U/S=0x4, RSVD=0x8, I/D=0x10, PK=0x20).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Gva
from hvtools.errors import UsageError
from hvtools.memory.buffer import BufferMemory
from hvtools.memory.protocol import PhysMemory
from hvtools.memory.ramfile import MappedMemory, RamFile, RamRegion
from hvtools.mmu import batch
from hvtools.mmu.batch import (
    KINDS,
    REASONS,
    BatchResult,
    PhysImage,
    translate_batch,
)
from hvtools.mmu.paging import (
    LOOKUP,
    Access,
    AccessKind,
    EntryFlag,
    PagingMode,
    TableBuilder,
    canonical,
    walk,
)
from hvtools.translation import Translation

P, RW, US, A, D, PS, XD = (EntryFlag.P, EntryFlag.RW, EntryFlag.US, EntryFlag.A, EntryFlag.D,
                           EntryFlag.PS, EntryFlag.XD)
URW = P | RW | US
ADDR_51_12 = ((1 << 52) - 1) & ~0xFFF
MASK64 = (1 << 64) - 1
MODE = PagingMode(maxphyaddr=40)
READ = Access(AccessKind.READ)
WRITE = Access(AccessKind.WRITE)
FETCH = Access(AccessKind.FETCH)
UREAD = Access(AccessKind.READ, user=True)
UWRITE = Access(AccessKind.WRITE, user=True)
UFETCH = Access(AccessKind.FETCH, user=True)


def compare(mem: PhysMemory, cr3: int, mode: PagingMode, access: Access,
            gvas: Iterable[int]) -> BatchResult:
    """Assert every lane of the batch equals walk(); returns the batch result."""
    g = np.array(list(gvas), dtype=np.uint64)
    res = translate_batch(mem, cr3, mode, g, access)
    assert len(res) == len(g)
    for i, gva in enumerate(g):
        want = dataclasses.replace(walk(mem, cr3, mode, Gva(int(gva)), access), steps=())
        got = res.outcome(i)
        assert got == want, f"lane {i} gva={int(gva):#x} cr3={cr3:#x} {mode} {access}"
        assert bool(res.ok[i]) == isinstance(want, Translation)
    return res


# -- random tables -----------------------------------------------------------------------------

NPAGES = 32


def random_tables(seed: int, density: float, base: int) -> BufferMemory:
    """NPAGES pages of entries at physical ``base``: most point back into the buffer, with
    random flags (PS, R/W, U/S, XD, PK), stray address bits, wild pointers and pure noise."""
    rng = np.random.default_rng(seed)
    n = NPAGES * 512
    u64 = np.uint64
    page0 = (base + 0xFFF) >> 12
    frame = rng.integers(page0, page0 + NPAGES, n, dtype=np.uint64)
    wild = rng.random(n) < 0.04
    frame[wild] = rng.integers(0, 1 << 28, int(wild.sum()), dtype=np.uint64)
    low = rng.integers(0, 1 << 12, n, dtype=np.uint64) | u64(P)
    low |= np.where(rng.random(n) < 0.85, u64(RW | US), u64(0))  # mostly permissive
    low &= np.where(rng.random(n) < 0.7, ~u64(PS), ~u64(0))  # PS in ~15% of entries
    entry = (frame << u64(12)) | low
    entry |= np.where(rng.random(n) < 0.15, u64(XD), u64(0))
    entry |= np.where(rng.random(n) < 0.3, rng.integers(0, 16, n, dtype=np.uint64) << u64(59),
                      u64(0))
    stray = rng.random(n) < 0.1
    entry[stray] |= u64(1) << rng.integers(12, 52, int(stray.sum()), dtype=np.uint64)
    noise = rng.random(n) < 0.03
    entry[noise] = rng.integers(0, 1 << 64, int(noise.sum()), dtype=np.uint64,
                                endpoint=False)
    absent = rng.random(n) > density
    entry[absent] = np.where(rng.random(int(absent.sum())) < 0.1,
                             entry[absent] & ~u64(P), u64(0))
    raw = entry.astype("<u8").tobytes()
    skip = (page0 << 12) - base
    return BufferMemory(bytes(skip) + raw, base=base)


def guided_gvas(mem: BufferMemory, cr3: int, mode: PagingMode, rng: random.Random,
                n: int) -> list[int]:
    """Addresses that follow present entries down the tree (so every level and page size is
    reached), some with a random index at a random level, some made non-canonical."""
    skip = -mem.base % 8
    raw = mem.to_bytes()[skip:]
    words = np.frombuffer(raw[:len(raw) // 8 * 8], dtype="<u8")
    start = mem.base + skip
    present: dict[int, list[int]] = {}

    def present_in(table: int) -> list[int]:
        if table not in present:
            lo = (table - start) // 8
            if table < start or lo + 512 > len(words):
                present[table] = []
            else:
                present[table] = [int(i) for i in np.flatnonzero(words[lo:lo + 512] & 1)]
        return present[table]

    out = []
    for _ in range(n):
        table, gva = cr3 & ADDR_51_12, 0
        for level in range(mode.levels, 0, -1):
            shift = 12 + 9 * (level - 1)
            idxs = present_in(table)
            idx = rng.choice(idxs) if idxs and rng.random() < 0.9 else rng.randrange(512)
            gva |= idx << shift
            if not mem.contains(table + 8 * idx, 8):
                break
            entry = mem.read_u64(table + 8 * idx)
            if not entry & P or level == 1 or (level <= 3 and entry & PS):
                break
            table = entry & ADDR_51_12
        gva |= rng.getrandbits(shift)
        la57 = mode.la57 if rng.random() < 0.9 else not mode.la57
        gva = canonical(gva, la57)
        if rng.random() < 0.05:
            gva ^= 1 << rng.randrange(47, 64)
        out.append(gva)
    return out


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

GUIDED, RANDOM = 160, 32


@settings(max_examples=250, deadline=None)
@given(seed=st.integers(0, 2**32), density=st.sampled_from([0.02, 0.1, 0.5, 0.95]),
       base=st.sampled_from([0, 0x3000, 0x1004]), cr3_extra=st.integers(0, 2**64 - 1),
       mode=modes, access=accesses)
def test_random_tables_every_lane_equals_walk(seed: int, density: float, base: int,
                                             cr3_extra: int, mode: PagingMode,
                                             access: Access) -> None:
    mem = random_tables(seed, density, base)
    rng = random.Random(seed)
    cr3 = (((base + 0xFFF) >> 12) + seed % NPAGES) << 12
    if cr3_extra % 4 == 0:  # stray CR3 bits: PCID, PWT/PCD, beyond MAXPHYADDR, LAM
        cr3 |= cr3_extra & ~ADDR_51_12 | (cr3_extra & (1 << 51))
    gvas = guided_gvas(mem, cr3, mode, rng, GUIDED)
    gvas += [rng.getrandbits(64) for _ in range(RANDOM // 2)]
    gvas += [canonical(rng.getrandbits(57), mode.la57) for _ in range(RANDOM // 2)]
    compare(mem, cr3, mode, access, gvas)


REGION_BASES = (0x0000_0000_0040_0000, 0x0000_7F00_0000_0000, 0xFFFF_8880_0000_0000,
                0xFFFF_FFFF_8000_0000, 0xFF11_0000_0000_0000)
mappings = st.lists(st.tuples(
    st.integers(0, len(REGION_BASES) - 1),  # region
    st.integers(0, 40),  # slot in the region, in pages of the mapping's size
    st.sampled_from([PAGE_4K, PAGE_4K, PAGE_4K, PAGE_2M, PAGE_1G]),
    st.integers(0, (1 << 30) - 1),  # frame number (beyond MAXPHYADDR at times)
    st.integers(0, 0xFFF),  # leaf flags (P forced unless the draw says otherwise)
    st.booleans(),  # leaf XD
    st.integers(0, 15),  # protection key
    st.sampled_from([URW, P | RW, P | US, URW | XD, P]),  # the upper entries' flags
), max_size=20)
corruptions = st.lists(st.tuples(st.integers(0, 19), st.integers(1, 5), st.integers(0, 63)),
                       max_size=4)


@settings(max_examples=150, deadline=None)
@given(maps=mappings, flips=corruptions, mode=modes, access=accesses,
       seed=st.integers(0, 2**32), absent=st.booleans())
def test_builder_tables_every_lane_equals_walk(
        maps: list[tuple[int, int, int, int, int, bool, int, int]],
        flips: list[tuple[int, int, int]], mode: PagingMode, access: Access, seed: int,
        absent: bool) -> None:
    mem = BufferMemory(2 << 20)
    tb = TableBuilder(mem, la57=mode.la57, first_table=0x1000, table_limit=2 << 20)
    placed = []
    for region, slot, size, frame, flags, xd, pkey, upper in maps:
        gva = (REGION_BASES[region] + slot * size) & MASK64
        if not mode.la57 and gva >> 56:
            gva = canonical(gva, False)
        leaf = (flags | (0 if absent and flags & 0x100 else P)) & ~PS
        leaf |= XD if xd else 0
        try:
            tb.map(gva, (frame * size) % (1 << 52), size, flags=leaf, pkey=pkey, upper=upper)
        except UsageError:  # already covered by a large page
            continue
        placed.append((gva, size))
    for which, level, bit in flips:  # flip a bit at some level on some mapping's path
        if placed:
            gva = placed[which % len(placed)][0]
            try:  # an earlier flip may have sent the path out of the buffer
                addr = tb.entry_address(gva, min(level, tb.levels), create=False)
                mem.write_u64(addr, mem.read_u64(addr) ^ (1 << bit))
            except UsageError:
                continue
    rng = random.Random(seed)
    gvas = [gva | rng.randrange(size) for gva, size in placed for _ in range(3)]
    gvas += [canonical(rng.getrandbits(57), mode.la57) for _ in range(8)]
    gvas += [rng.getrandbits(64) for _ in range(4)]
    compare(mem, tb.cr3, mode, access, gvas)


# -- hand cases ------------------------------------------------------------------------------

USER_VA = 0x7F00_0000_1000
USER_RO = 0x7F00_0000_2000
USER_PK = 0x7F00_0000_3000
USER_RSVD = 0x7F00_0000_4000
KERNEL_VA = 0xFFFF_FFFF_8100_0000
KERNEL_2M = 0xFFFF_8880_0020_0000
KERNEL_1G = 0xFFFF_8881_0000_0000
UNBACKED_VA = 0x0000_5000_0000_0000
HOLE_VA = 0x7F00_0000_5000


def linux_like(la57: bool = False) -> tuple[BufferMemory, TableBuilder]:
    mem = BufferMemory(1 << 20)
    tb = TableBuilder(mem, la57=la57, first_table=0x1000, table_limit=1 << 20)
    tb.map(USER_VA, 0x12_3000, flags=URW)
    tb.map(USER_RO, 0x12_4000, flags=P | US | XD)
    tb.map(USER_PK, 0x12_5000, flags=URW, pkey=3)
    tb.map(USER_RSVD, 0x12_6000, flags=URW)
    tb.set_entry(USER_RSVD, 1, 0x12_6000 | URW | (1 << 45))  # bit 45 >= MAXPHYADDR 40
    tb.map(KERNEL_VA, 0x20_0000, flags=P | RW | XD)
    tb.map(KERNEL_2M, 0x40_0000, PAGE_2M, flags=P | RW)
    tb.map(KERNEL_1G, 0x4000_0000, PAGE_1G, flags=P)
    # A PML4E whose page-directory-pointer table lies beyond the 1 MiB buffer.
    tb.set_entry(UNBACKED_VA, 4, 0x8000_0000 | URW)
    return mem, tb


HAND = [
    # (gva, access, mode, gpa or None, #PF code / reason, level)
    (USER_VA + 0x234, UREAD, MODE, 0x12_3234, "", 0),
    (USER_VA + 8, UWRITE, MODE, 0x12_3008, "", 0),
    (USER_RO, UWRITE, MODE, None, "write-protect", 1),
    (USER_RO, WRITE, PagingMode(maxphyaddr=40, wp=False), 0x12_4000, "", 0),
    (USER_RO, UFETCH, MODE, None, "execute-disable", 1),
    (USER_VA, FETCH, PagingMode(maxphyaddr=40, smep=True), None, "smep", 1),
    (USER_VA, READ, PagingMode(maxphyaddr=40, smap=True), None, "smap", 1),
    (USER_VA, Access(AccessKind.READ, ac=True), PagingMode(maxphyaddr=40, smap=True),
     0x12_3000, "", 0),
    (USER_VA, Access(AccessKind.READ, implicit=True, ac=True),
     PagingMode(maxphyaddr=40, smap=True), None, "smap", 1),
    (USER_PK, UREAD, PagingMode(maxphyaddr=40, pke=True, pkru=1 << 6), None,
     "protection-key", 1),
    (USER_PK, UWRITE, PagingMode(maxphyaddr=40, pke=True, pkru=1 << 7), None,
     "protection-key", 1),
    (USER_PK, UFETCH, PagingMode(maxphyaddr=40, pke=True, pkru=3 << 6), 0x12_5000, "", 0),
    (USER_RSVD, UREAD, MODE, None, "reserved-bit", 1),
    (USER_RSVD, LOOKUP, MODE, 0x2000_0012_6000, "", 0),
    (KERNEL_VA, UREAD, MODE, None, "user-supervisor", 1),
    (KERNEL_VA + 0x10, WRITE, MODE, 0x20_0010, "", 0),
    (KERNEL_2M + 0x1_2345, READ, MODE, 0x41_2345, "", 0),
    (KERNEL_1G + 0x1234_5678, FETCH, MODE, 0x5234_5678, "", 0),
    (KERNEL_1G, WRITE, MODE, None, "write-protect", 3),
    (KERNEL_1G, READ, PagingMode(maxphyaddr=40, page_1g=False), None, "reserved-bit", 3),
    (KERNEL_1G, READ, PagingMode(maxphyaddr=40, nxe=False), 0x4000_0000, "", 0),
    (KERNEL_VA, READ, PagingMode(maxphyaddr=40, nxe=False), None, "reserved-bit", 1),
    (HOLE_VA, UWRITE, MODE, None, "not-present", 1),
    (UNBACKED_VA, UREAD, MODE, None, "table-unbacked", 3),
    (0x0000_8000_0000_0000, READ, MODE, None, "non-canonical", 0),
    (0xFFF0_0000_0000_0000, LOOKUP, MODE, None, "non-canonical", 0),
]


@pytest.mark.parametrize("case", range(len(HAND)))
def test_hand_cases(case: int) -> None:
    gva, access, mode, gpa, reason, level = HAND[case]
    mem, tb = linux_like()
    res = compare(mem, tb.cr3, mode, access, [gva])
    assert res.ok[0] == (gpa is not None)
    if gpa is not None:
        assert int(res.gpa[0]) == gpa
    else:
        assert REASONS[res.fault_reason[0]] == reason
        assert int(res.fault_level[0]) == level


def test_hand_error_codes_and_arrays() -> None:
    mem, tb = linux_like()
    gvas = [USER_VA, USER_RO, KERNEL_VA, HOLE_VA, USER_RSVD, KERNEL_2M, KERNEL_1G,
            UNBACKED_VA, 0x0000_8000_0000_0000]
    res = compare(mem, tb.cr3, MODE, UWRITE, gvas)
    assert res.ok.tolist() == [True] + [False] * 8
    # P|W|U = 7 (R/W), 7 (U/S), W|U = 6 (not present), P|W|U|RSVD = 0xF, then U/S again.
    assert res.fault_code.tolist() == [0, 7, 7, 6, 0xF, 7, 7, 0, 0]
    assert [KINDS[k] for k in res.fault_kind] == [
        "", *["page-fault"] * 6, "unbacked", "general-protection"]
    assert res.fault_level.tolist() == [0, 1, 1, 1, 1, 2, 3, 3, 0]
    assert int(res.fault_address[7]) == 0x8000_0000 + 8 * ((UNBACKED_VA >> 30) & 0x1FF)
    assert res.page_size.tolist() == [PAGE_4K] + [0] * 8
    assert (res.write[0], res.execute[0], res.user[0], res.pkey[0]) == (True, True, True, -1)
    fetch = compare(mem, tb.cr3, MODE, UFETCH, [USER_RO, KERNEL_2M])
    assert fetch.fault_code.tolist() == [0x15, 0x15]  # P|U|I/D
    pk = compare(mem, tb.cr3, PagingMode(maxphyaddr=40, pke=True, pkru=1 << 7), UWRITE,
                 [USER_PK, USER_VA])
    assert pk.fault_code.tolist() == [0x27, 0]  # P|W|U|PK
    assert pk.pkey.tolist() == [-1, 0]


def test_large_pages_and_5_level() -> None:
    mem, tb = linux_like(la57=True)
    mode = PagingMode(maxphyaddr=46, la57=True)
    la57_va = 0xFF11_2222_0000_0000
    tb.map(la57_va, 0x8000_0000, PAGE_1G, flags=P | RW)
    gvas = [USER_VA, KERNEL_VA, KERNEL_2M + 5, KERNEL_1G + 7, la57_va + 0x123,
            0x0000_8000_0000_0000, 0xFF00_0000_0000_0000, UNBACKED_VA, 0x0100_0000_0000_0000]
    res = compare(mem, tb.cr3, mode, READ, gvas)
    assert res.ok.tolist() == [True] * 5 + [False] * 4
    assert res.page_size.tolist()[:5] == [PAGE_4K, PAGE_4K, PAGE_2M, PAGE_1G, PAGE_1G]
    assert int(res.gpa[4]) == 0x8000_0123
    # Canonical only with LA57: PML4E 256 and PML5E 256 are not present.
    assert [REASONS[r] for r in res.fault_reason[5:]] == [
        "not-present", "not-present", "table-unbacked", "non-canonical"]
    assert res.fault_level.tolist()[5:] == [4, 5, 3, 0]


def test_chunk_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    mem, tb = linux_like()
    gvas = [USER_VA, KERNEL_1G, HOLE_VA, 1 << 63, UNBACKED_VA, KERNEL_2M, USER_RO] * 5
    expect = compare(mem, tb.cr3, MODE, UREAD, gvas)
    monkeypatch.setattr(batch, "CHUNK", 3)
    small = compare(mem, tb.cr3, MODE, UREAD, gvas)
    for f in dataclasses.fields(BatchResult):
        assert np.array_equal(getattr(small, f.name), getattr(expect, f.name)), f.name


def test_empty_batch_and_inputs() -> None:
    mem, tb = linux_like()
    assert len(translate_batch(mem, tb.cr3, MODE, np.zeros(0, np.uint64), READ)) == 0
    as_list = translate_batch(mem, tb.cr3, MODE, [USER_VA, KERNEL_1G, 2**64 - 1], READ)
    assert as_list.ok.tolist() == [True, True, False]
    signed = translate_batch(mem, tb.cr3, MODE, np.array([USER_VA], np.int64), READ)
    assert signed.gpa.tolist() == [0x12_3000]
    with pytest.raises(UsageError, match="negative"):
        translate_batch(mem, tb.cr3, MODE, np.array([-1]), READ)
    with pytest.raises(UsageError, match="64-bit"):
        translate_batch(mem, tb.cr3, MODE, [2**64], READ)
    with pytest.raises(UsageError, match="1-D"):
        translate_batch(mem, tb.cr3, MODE, np.zeros((2, 2), np.uint64), READ)
    with pytest.raises(UsageError, match="integers"):
        translate_batch(mem, tb.cr3, MODE, np.zeros(2), READ)


# -- memory images ---------------------------------------------------------------------------


def test_image_from_raw_buffers() -> None:
    mem, tb = linux_like()
    raw = mem.to_bytes()
    gvas = [USER_VA, KERNEL_2M, HOLE_VA, UNBACKED_VA]
    want = translate_batch(mem, tb.cr3, MODE, gvas, READ)
    for backing in (raw, bytearray(raw), memoryview(raw), np.frombuffer(raw, np.uint8),
                    PhysImage.from_buffer(raw), PhysImage.of(mem)):
        got = translate_batch(backing, tb.cr3, MODE, gvas, READ)
        assert np.array_equal(got.fault_reason, want.fault_reason)
        assert np.array_equal(got.gpa, want.gpa)
    with pytest.raises(UsageError, match="no numpy view"):
        translate_batch(object(), tb.cr3, MODE, gvas, READ)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="overlap"):
        PhysImage([(0, bytes(16)), (8, bytes(16))])


def test_image_is_zero_copy_and_unaligned_bases() -> None:
    mem = BufferMemory(0x4000, base=0x1004)
    image = PhysImage.of(mem)
    assert [(s.gpa, len(s.words)) for s in image.segments] == [(0x1008, 0x7FF)]
    mem.write_u64(0x2000, 0xDEAD_BEEF)
    entries, backed = image.read_u64(np.array([0x2000, 0x1000, 0x1008, 0x5000, 0x4FF8],
                                              np.uint64))
    assert backed.tolist() == [True, False, True, False, True]
    assert int(entries[0]) == 0xDEAD_BEEF  # written after the image was made
    image.release()
    assert image.read_u64(np.array([0x2000], np.uint64))[1].tolist() == [False]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), mode=modes, access=accesses)
def test_unaligned_base_tables_equal_walk(seed: int, mode: PagingMode, access: Access) -> None:
    mem = random_tables(seed, 0.5, 0x1004)  # a buffer that starts mid-entry
    cr3 = (2 + seed % NPAGES) << 12
    compare(mem, cr3, mode, access, guided_gvas(mem, cr3, mode, random.Random(seed), 64))


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_q35_ram_file_high_region(tmp_path: Path) -> None:
    """A 3 GiB q35 RAM file: GPA [0, 2G) at offset 0, [4G, 5G) at offset 2G, a hole between.

    Tables in both regions; one PDPTE points into the hole (unbacked), as walk() sees it.
    """
    path = _sparse(tmp_path / "ram", 3 << 30)
    ram = RamFile(path, writable=True)
    assert [(r.gpa, r.offset) for r in ram.regions] == [(0, 0), (4 << 30, 2 << 30)]
    high = 4 << 30
    pml4, pdpt, pd, pt = 0x1000, high + 0x1000, 0x2000, high + 0x2000
    ram.write_u64(pml4 + 8 * 0xFE, pdpt | URW)  # user half: 0x7F00_0000_0000
    ram.write_u64(pdpt + 0, pd | URW)
    ram.write_u64(pdpt + 8, (3 << 30) | URW)  # a page directory in the PCI hole
    ram.write_u64(pd + 0, pt | URW)
    ram.write_u64(pd + 8, (high + PAGE_2M * 3) | URW | PS)
    ram.write_u64(pt + 8, (high + 0x7000) | URW)
    gvas = [0x7F00_0000_1000, 0x7F00_0000_1ABC, 0x7F00_0020_1234, 0x7F00_4000_0000,
            0x7F00_0000_2000]
    res = compare(ram, pml4, MODE, UWRITE, gvas)
    assert res.ok.tolist() == [True, True, True, False, False]
    assert int(res.gpa[1]) == high + 0x7ABC
    assert KINDS[res.fault_kind[3]] == "unbacked"
    image = PhysImage.of(ram)
    assert [s.gpa for s in image.segments] == [0, high]
    entries, _ = image.read_u64(np.array([pdpt], np.uint64))
    with path.open("rb") as f:  # the high region's bytes sit right after the low ones
        f.seek((2 << 30) + 0x1000)
        assert int(entries[0]) == int.from_bytes(f.read(8), "little")
    image.release()
    del image, entries
    ram.close()  # no view pins the mapping any more


def test_mapped_memory_custom_regions(tmp_path: Path) -> None:
    """Regions out of file order, both directions, each read at its own offset."""
    path = _sparse(tmp_path / "dump", 0x20000)
    regions = (RamRegion(0x10_0000, 0x10000, 0x10000), RamRegion(0, 0x10000, 0))
    mem = MappedMemory(path, regions, writable=True)
    tb = TableBuilder(mem, first_table=0x10_0000, table_limit=0x11_0000)
    tb.map(USER_VA, 0x5000, flags=URW)
    tb.set_entry(KERNEL_VA, 2, 0x8000 | URW)  # PD entry -> a page table in the low region
    mem.write_u64(0x8000 + 8 * ((KERNEL_VA >> 12) & 0x1FF), 0x9000 | P | RW)
    res = compare(mem, tb.cr3, MODE, WRITE, [USER_VA, KERNEL_VA, HOLE_VA])
    assert res.gpa.tolist() == [0x5000, 0x9000, 0]
    mem.close()


@pytest.mark.slow  # 768k lanes, about 30 s: runs with HVTOOLS_SLOW=1 make test
@settings(max_examples=3000, deadline=None)
@given(seed=st.integers(0, 2**32), density=st.sampled_from([0.02, 0.1, 0.5, 0.95]),
       mode=modes, access=accesses)
def test_soak_random_tables(seed: int, density: float, mode: PagingMode,
                            access: Access) -> None:
    mem = random_tables(seed, density, 0)
    cr3 = (seed % NPAGES) << 12
    compare(mem, cr3, mode, access, guided_gvas(mem, cr3, mode, random.Random(seed), 256))
