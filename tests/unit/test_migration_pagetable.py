"""The recovery page table: layout, integrity checks, q35 placement, run coalescing."""

from __future__ import annotations

import numpy as np
import pytest

from hvtools.migration import pagetable as pt

GiB = 1 << 30
MiB = 1 << 20


def _mem(size: int, seed: int = 1) -> memoryview:
    rng = np.random.default_rng(seed)
    return memoryview(bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes()))


def test_round_trip_keeps_every_field() -> None:
    mem = _mem(64 * pt.PAGE)
    offsets = np.array([5, 1, 2, 3, 40], dtype=np.uint64) * pt.PAGE
    table = pt.build("vm-a", 64 * pt.PAGE * 4096, mem, offsets, dev_len=700_000, dev_hash=0x1234)
    back = pt.parse(table.to_bytes())
    assert back.vm == "vm-a"
    assert back.ram_size == table.ram_size and back.dev_len == 700_000 and back.dev_hash == 0x1234
    assert back.created_ns == table.created_ns
    assert back.entries["offset"].tolist() == [o * pt.PAGE for o in (1, 2, 3, 5, 40)]
    assert np.array_equal(back.entries, table.entries)
    assert len(table.to_bytes()) == pt.table_size(5)


@pytest.mark.parametrize("where", [pt.HEADER.size + 30,   # an entry
                                   16, 32, 40, 56, 64])     # ram_size, dev_len/hash, time, vm
def test_a_flipped_bit_in_the_header_or_body_is_caught(where: int) -> None:
    mem = _mem(8 * pt.PAGE)
    data = bytearray(pt.build("v", GiB, mem, np.arange(8, dtype=np.uint64) * pt.PAGE,
                              dev_len=5, dev_hash=9).to_bytes())
    data[where] ^= 0x10
    with pytest.raises(pt.PageTableError, match="does not match its hash"):
        pt.parse(data)


@pytest.mark.parametrize("cut", [0, 50, pt.HEADER.size + 10])
def test_truncated_tables_are_rejected(cut: int) -> None:
    mem = _mem(4 * pt.PAGE)
    data = pt.build("v", GiB, mem, np.arange(4, dtype=np.uint64) * pt.PAGE).to_bytes()
    with pytest.raises(pt.PageTableError, match="truncated"):
        pt.parse(data[:cut])


def test_wrong_magic_is_rejected() -> None:
    with pytest.raises(pt.PageTableError, match="not a recovery page table"):
        pt.parse(b"X" * 200)


def test_entry_outside_the_ram_region_is_rejected() -> None:
    mem = _mem(4 * pt.PAGE)
    table = pt.build("v", 2 * pt.PAGE, mem, np.array([0, 3 * pt.PAGE], dtype=np.uint64))
    with pytest.raises(pt.PageTableError, match="outside its RAM region"):
        pt.parse(table.to_bytes())


def test_q35_placement_of_offsets() -> None:
    # 1 GiB: all below the split, GPA == offset.  3 GiB: split at 2 GiB, the rest at 4 GiB.
    offs = np.array([0, 0x1000, 2 * GiB - 0x1000, 2 * GiB, 3 * GiB - 0x1000], dtype=np.uint64)
    assert pt.gpas_of_offsets(offs[:2], GiB).tolist() == [0, 0x1000]
    assert pt.gpas_of_offsets(offs, 3 * GiB).tolist() == [
        0, 0x1000, 2 * GiB - 0x1000, 4 * GiB, 5 * GiB - 0x1000]


def test_pages_of_extents_rounds_to_pages_and_clips() -> None:
    pages = pt.pages_of_extents([(0, 8192), (10000, 12289), (20 * pt.PAGE, 99 * pt.PAGE)],
                                21 * pt.PAGE)
    assert pages.tolist() == [0, 4096, 8192, 12288, 20 * pt.PAGE]


def test_coalesce_merges_contiguous_pages_and_caps_run_length() -> None:
    pages = np.array([0, 1, 2, 3, 7, 8, 20, *list(range(100, 700))], dtype=np.uint64) * pt.PAGE
    runs = pt.coalesce(pages, max_bytes=256 * pt.PAGE)
    assert [(r.offset // pt.PAGE, r.length // pt.PAGE, r.first, r.last) for r in runs] == [
        (0, 4, 0, 4), (7, 2, 4, 6), (20, 1, 6, 7),
        (100, 256, 7, 263), (356, 256, 263, 519), (612, 88, 519, 607)]
    assert sum(r.length for r in runs) == len(pages) * pt.PAGE
    assert pt.coalesce(np.zeros(0, dtype=np.uint64)) == []


def test_verify_pages_names_the_corrupted_entries() -> None:
    mem = _mem(16 * pt.PAGE)
    table = pt.build("v", GiB, mem, np.arange(16, dtype=np.uint64) * pt.PAGE)
    copy = bytearray(mem)
    copy[5 * pt.PAGE + 7] ^= 1
    copy[11 * pt.PAGE] ^= 0x80
    assert pt.verify_pages(memoryview(copy), table, 0, 16) == [5, 11]
    assert pt.verify_pages(memoryview(copy), table, 6, 11) == []
    assert pt.verify_pages(mem, table, 0, 16) == []


def test_relocated_table_keeps_hashes_and_changes_locations() -> None:
    mem = _mem(4 * pt.PAGE)
    table = pt.build("v", GiB, mem, np.arange(4, dtype=np.uint64) * pt.PAGE)
    moved = table.relocated(np.arange(4, dtype=np.uint64) * pt.PAGE + MiB)
    assert moved.entries["offset"].tolist() == [MiB + i * pt.PAGE for i in range(4)]
    assert np.array_equal(moved.entries["hash"], table.entries["hash"])
    with pytest.raises(pt.PageTableError):
        table.relocated(np.zeros(3, dtype=np.uint64))


def test_nonzero_finds_pages_with_any_set_byte() -> None:
    mem = bytearray(16 * pt.PAGE)
    mem[3 * pt.PAGE + 4095] = 1       # last byte of page 3
    mem[8 * pt.PAGE] = 0x80           # first byte of page 8
    mem[15 * pt.PAGE + 2048] = 7
    offsets = np.array([0, 3, 4, 8, 9, 15], dtype=np.uint64) * pt.PAGE
    assert pt.nonzero(memoryview(mem), offsets).tolist() == [False, True, False, True, False,
                                                               True]
