"""Guest-memory backends: one conformance suite over buffer, RAM file and pmemsave dump."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvtools.addr import Gva
from hvtools.errors import UsageError
from hvtools.memory.buffer import BufferMemory
from hvtools.memory.protocol import PhysMemory, WritablePhysMemory
from hvtools.memory.ramfile import MappedMemory, PmemDump, RamFile, RamRegion, q35_ram_layout
from hvtools.mmu.paging import EntryFlag, PagingMode, TableBuilder, walk
from hvtools.translation import Translation

MiB, GiB = 1 << 20, 1 << 30
SIZE = 8 * MiB


def _file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # sparse
    return path


@pytest.fixture(params=["buffer", "ramfile", "pmemdump"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WritablePhysMemory]:
    """An 8-MiB memory at GPA 0 from each backend (all below the q35 split)."""
    if request.param == "buffer":
        yield BufferMemory(SIZE)
        return
    path = _file(tmp_path / "mem.bin", SIZE)
    mem: MappedMemory = (RamFile(path, writable=True) if request.param == "ramfile"
                         else PmemDump(path, writable=True))
    yield mem
    mem.close()


def test_conformance(backend: WritablePhysMemory) -> None:
    assert isinstance(backend, PhysMemory) and isinstance(backend, WritablePhysMemory)
    assert backend.contains(0) and backend.contains(SIZE - 8, 8)
    assert not backend.contains(SIZE - 4, 8) and not backend.contains(SIZE)
    assert backend.read(0x1000, 4) == b"\0\0\0\0"
    backend.write(0x1000, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert backend.read_u64(0x1000) == 0x0807060504030201  # little-endian
    backend.write_u64(SIZE - 8, 0xFEDCBA9876543210)
    assert backend.read(SIZE - 8, 8) == bytes.fromhex("1032547698badcfe")
    for bad in (lambda: backend.read(SIZE - 4, 8), lambda: backend.read_u64(SIZE),
                lambda: backend.write(SIZE, b"x"), lambda: backend.write_u64(SIZE - 7, 0),
                lambda: backend.write_u64(0, 1 << 64)):
        with pytest.raises(UsageError):
            bad()


def test_walk_is_the_same_on_every_backend(backend: WritablePhysMemory) -> None:
    tb = TableBuilder(backend, first_table=0x10000)
    tb.map(0x7F00_0000_0000, 0x200000, flags=EntryFlag.P | EntryFlag.RW | EntryFlag.US)
    r = walk(backend, tb.cr3, PagingMode(maxphyaddr=40), Gva(0x7F00_0000_0123))
    assert isinstance(r, Translation) and r.output == 0x200123


def test_buffer_base_and_views() -> None:
    mem = BufferMemory(b"\xaa" * 16, base=0x1000)
    assert mem.contains(0x1000, 16) and not mem.contains(0xFFF) and not mem.contains(0x1008, 9)
    v = mem.view(0x1004, 4)
    v[:] = b"abcd"  # zero-copy: writes through
    assert mem.read(0x1004, 4) == b"abcd"
    with pytest.raises(UsageError):
        BufferMemory(0)


@pytest.mark.parametrize(("ram", "regions"), [
    (512 * MiB, [(0, 512 * MiB, 0)]),
    (2560 * MiB, [(0, 2560 * MiB, 0)]),  # below 0xB0000000: all low
    (0xB0000000, [(0, 2 * GiB, 0), (4 * GiB, 0x30000000, 2 * GiB)]),  # at the threshold
    (3 * GiB, [(0, 2 * GiB, 0), (4 * GiB, GiB, 2 * GiB)]),
    (8 * GiB, [(0, 2 * GiB, 0), (4 * GiB, 6 * GiB, 2 * GiB)]),
])
def test_q35_layout(ram: int, regions: list[tuple[int, int, int]]) -> None:
    """QEMU 10.0 pc_q35_init: split at 2 GiB from 0xB0000000 of RAM up, else at 0xB0000000."""
    assert q35_ram_layout(ram) == tuple(RamRegion(*r) for r in regions)


def test_q35_layout_honours_max_ram_below_4g() -> None:
    assert q35_ram_layout(2 * GiB, max_ram_below_4g=GiB) == (
        RamRegion(0, GiB, 0), RamRegion(4 * GiB, GiB, GiB))


def test_ramfile_maps_the_high_part_above_4g(tmp_path: Path) -> None:
    path = _file(tmp_path / "vm.ram", 3 * GiB)
    with open(path, "r+b") as f:  # what the guest would have written
        f.seek(2 * GiB - 8)
        f.write((0x1111).to_bytes(8, "little"))
        f.seek(2 * GiB)
        f.write((0x2222).to_bytes(8, "little"))
    with RamFile(path) as ram:
        assert ram.ram_size == 3 * GiB
        assert ram.read_u64(2 * GiB - 8) == 0x1111
        assert ram.read_u64(4 * GiB) == 0x2222  # file offset 2 GiB
        assert not ram.contains(2 * GiB) and not ram.contains(4 * GiB - 8, 8)
        assert ram.contains(5 * GiB - 8, 8) and not ram.contains(5 * GiB - 4, 8)
        assert not ram.contains(2 * GiB - 4, 8), "no read straddles the hole"
        with pytest.raises(UsageError, match="not in"):
            ram.read(3 * GiB, 1)
        with pytest.raises(UsageError, match="read-only"):
            ram.write_u64(0, 1)
        # Zero-copy and live: a write by someone else (the guest) shows at once.
        view = ram.view(4 * GiB, 8)
        with open(path, "r+b") as f:
            f.seek(2 * GiB)
            f.write((0x3333).to_bytes(8, "little"))
        assert int.from_bytes(view, "little") == 0x3333
        view.release()


def test_ramfile_walk_with_tables_above_4g(tmp_path: Path) -> None:
    """Tables in the high part: the walk must go through the q35 layout to find them."""
    path = _file(tmp_path / "vm.ram", 3 * GiB)
    with RamFile(path, writable=True) as ram:
        tb = TableBuilder(ram, first_table=4 * GiB + 0x1000)
        tb.map(0xFFFF_8880_0000_0000, 0x1_2345_6000, flags=EntryFlag.P | EntryFlag.RW)
        r = walk(ram, tb.cr3, PagingMode(maxphyaddr=40), Gva(0xFFFF_8880_0000_0042))
        assert isinstance(r, Translation) and r.output == 0x1_2345_6042
        assert all(s.address >= 4 * GiB for s in r.steps)
    with open(path, "rb") as f:  # and they landed at file offset 2 GiB + 0x1000
        f.seek(2 * GiB + 0x1000 + 0x111 * 8)
        assert int.from_bytes(f.read(8), "little") == 4 * GiB + 0x2000 | 0x7


def test_pmemdump_offsets_are_gpas(tmp_path: Path) -> None:
    path = tmp_path / "dump.bin"
    path.write_bytes(bytes(range(256)) * 64)
    with PmemDump(path) as dump:
        assert dump.read(0x105, 3) == b"\x05\x06\x07"
        assert dump.regions == (RamRegion(0, 0x4000, 0),)
        assert not dump.contains(0x4000)


def test_files_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot open"):
        PmemDump(tmp_path / "missing")
    with pytest.raises(UsageError, match="empty"):
        PmemDump(_file(tmp_path / "empty", 0))
    small = _file(tmp_path / "small.ram", MiB)
    with pytest.raises(UsageError, match="fewer than the layout needs"):
        RamFile(small, ram_size=3 * GiB)
    ro = _file(tmp_path / "ro.ram", MiB)
    os.chmod(ro, 0o444)
    with RamFile(ro) as ram:  # read-only mapping of a read-only file works
        assert ram.read_u64(0) == 0
