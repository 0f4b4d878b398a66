"""Issue 5, s3 (qtest half): hvt-pci's secure interface refuses every DMA outside its window.

One patched QEMU serves the module with two hvt-pci functions behind intel-iommu (translation
off unless a test turns it on, so bus addresses are guest-physical): 00:04.0 at
``security-level=confidential`` and 00:05.0 ``trusted``. qemu-patches/README.md: a
confidential device's DMA is allowed only if every byte of memory it reads or writes lies
inside the enabled window and its PASID tag equals WIN_PASID; anything else is refused before
any memory access with CODE 8 (BLOCKED), FAULT_ADDR the first address outside, and counted in
BLOCKED. The window is registered once and locked until reset; a trusted device ignores it.

Every crafted DMA below runs in each direction it applies to, and after each one the watched
guest memory (the window, 64 KiB on both sides of it, a far target) and the SRAM are compared
byte for byte with what they held before. Tests that need a fresh (unlocked) window reset the
machine (q35 0xCF9) first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from hvtools.control.hvt_qtest import (
    MAX_WINDOW,
    NESTED_IOMMU,
    SRAM_SIZE,
    HvtCode,
    HvtConfig,
    HvtDir,
    HvtDmaResult,
    HvtPasidReg,
    HvtPciDevice,
    HvtQtestBench,
    HvtReg,
    HvtWindow,
)
from hvtools.iommu.build import VtdTables
from hvtools.iommu.structures import FaultRecord

pytestmark = pytest.mark.integration

WIN, SIZE = 0x500_0000, 0x1_0000
TAG = 5  # the window's PASID
FAR = 0x700_0000
#: Watched guest memory: the window with 64 KiB around it, and the far target.
WATCHED = ((WIN - 0x1_0000, SIZE + 0x2_0000), (FAR, 0x1000))
M2M, M2D, D2M = HvtDir.MEM2MEM, HvtDir.MEM2DEV, HvtDir.DEV2MEM


@dataclass
class Lab:
    bench: HvtQtestBench

    @property
    def conf(self) -> HvtPciDevice:
        return self.bench.devices[0]

    @property
    def trusted(self) -> HvtPciDevice:
        return self.bench.devices[1]

    def fresh(self, *, register: bool = True, pasid: int | None = TAG) -> None:
        """Reset the machine (windows unlocked), fill the watched memory, and register
        the confidential device's window for ``pasid`` (None: requests without PASID)."""
        self.bench.reset()
        for i, (base, size) in enumerate(WATCHED):
            self.bench.memory.write(base, bytes((j * 11 + 3 + i) & 0xFF for j in range(size)))
        for dev in self.bench.devices:
            dev.sram_write(0, bytes((j * 5 + 1) & 0xFF for j in range(0x1_0000)))
        if register:
            win = self.conf.register_window(WIN, SIZE, pasid)
            assert win.enabled and (win.base, win.size) == (WIN, SIZE), win

    def snapshot(self) -> tuple[bytes, ...]:
        mem = self.bench.memory
        return (*(mem.read(base, size) for base, size in WATCHED),
                *(dev.sram_read(0, 0x1_0000) for dev in self.bench.devices))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    bench = HvtQtestBench(NESTED_IOMMU, devices=(
        HvtConfig((0, 4, 0), security_level="confidential"),
        HvtConfig((0, 5, 0), security_level="trusted")), name="hvt-secure").start()
    try:
        yield Lab(bench)
    finally:
        bench.close()


def blocked(lab: Lab, dev: HvtPciDevice, src: int, dst: int, n: int, d: int,
            tag: int | None, outside: int) -> None:
    """The DMA is refused: BLOCKED at ``outside``, counted, and nothing changes."""
    before = lab.snapshot()
    count, done = dev.counters()
    res = dev.dma(src, dst, n, d, tag)
    assert res.error and res.code == HvtCode.BLOCKED, str(res)
    assert res.fault_addr == outside and res.xferred == 0, str(res)
    assert dev.counters() == (count + 1, done)
    assert lab.snapshot() == before, "a blocked DMA changed memory or the SRAM"
    dev.clear_status()


def works(lab: Lab, dev: HvtPciDevice, src: int, dst: int, n: int, d: int,
          tag: int | None, priv: bool = False) -> HvtDmaResult:
    """The DMA completes and moves its bytes."""
    mem = lab.bench.memory
    count, done = dev.counters()
    expect = (mem.read(src, n) if d != D2M else dev.sram_read(src, n))
    res = dev.dma(src, dst, n, d, tag, priv)
    assert res.ok and res.code == HvtCode.OK and res.xferred == n, str(res)
    assert dev.counters() == (count, done + 1)
    got = dev.sram_read(dst, n) if d == M2D else mem.read(dst, n)
    assert got == expect
    dev.clear_status()
    return res


#: (id, direction, SRC, DST, LEN, PASID tag, the first address outside)
Crafted = tuple[str, int, int, int, int, int | None, int]
CRAFTED: list[Crafted] = [
    ("read-before", M2D, WIN - 0x100, 0x100, 0x40, TAG, WIN - 0x100),
    ("read-straddles-start", M2D, WIN - 0x20, 0x100, 0x40, TAG, WIN - 0x20),
    ("read-after", M2D, WIN + SIZE, 0x100, 0x40, TAG, WIN + SIZE),
    ("read-straddles-end", M2D, WIN + SIZE - 0x20, 0x100, 0x40, TAG, WIN + SIZE),
    ("read-covers-window", M2D, WIN - 0x1000, 0, SIZE + 0x2000, TAG, WIN - 0x1000),
    ("read-wrong-pasid", M2D, WIN + 0x100, 0x100, 0x40, TAG + 1, WIN + 0x100),
    ("read-without-pasid", M2D, WIN + 0x100, 0x100, 0x40, None, WIN + 0x100),
    ("write-before", D2M, 0x100, WIN - 0x1000, 0x40, TAG, WIN - 0x1000),
    ("write-straddles-start", D2M, 0x100, WIN - 4, 0x40, TAG, WIN - 4),
    ("write-after", D2M, 0x100, WIN + SIZE + 0x40, 0x40, TAG, WIN + SIZE + 0x40),
    ("write-straddles-end", D2M, 0x100, WIN + SIZE - 4, 8, TAG, WIN + SIZE),
    ("write-far", D2M, 0x100, FAR, 0x40, TAG, FAR),
    ("write-wrong-pasid", D2M, 0x100, WIN, 0x40, 0xF_FFFF, WIN),
    ("write-without-pasid", D2M, 0x100, WIN, 0x40, None, WIN),
    ("copy-out-of-window", M2M, WIN + 0x100, FAR, 0x40, TAG, FAR),
    ("copy-into-window", M2M, FAR, WIN + 0x100, 0x40, TAG, FAR),
    ("copy-straddles-end", M2M, WIN, WIN + SIZE - 0x20, 0x40, TAG, WIN + SIZE),
    ("copy-wrong-pasid", M2M, WIN, WIN + 0x100, 0x40, 0, WIN),
    ("copy-without-pasid", M2M, WIN, WIN + 0x100, 0x40, None, WIN),
]


def test_no_window_yet_blocks_everything(lab: Lab) -> None:
    """Before a window is registered a confidential device reaches no memory at all."""
    lab.fresh(register=False)
    assert not lab.conf.window().enabled
    for d, src, dst in ((M2D, WIN, 0), (D2M, 0, WIN), (M2M, WIN, WIN + 0x100)):
        for tag in (TAG, None):
            blocked(lab, lab.conf, src, dst, 0x40, d, tag, WIN)


@pytest.fixture(scope="module")
def windowed(lab: Lab) -> Lab:
    lab.fresh()
    return lab


@pytest.mark.parametrize(("name", "d", "src", "dst", "n", "tag", "outside"), CRAFTED,
                         ids=[c[0] for c in CRAFTED])
def test_crafted_dma_is_blocked(windowed: Lab, name: str, d: int, src: int, dst: int, n: int,
                                tag: int | None, outside: int) -> None:
    blocked(windowed, windowed.conf, src, dst, n, d, tag, outside)


def test_inside_the_window_works(windowed: Lab) -> None:
    """Every direction inside the window with the window's tag (privileged too: PRIV is the
    request's privilege, not part of its tag), up to the window's last byte."""
    lab, dev = windowed, windowed.conf
    works(lab, dev, WIN + 0x100, 0x200, 0x40, M2D, TAG)
    works(lab, dev, 0x200, WIN + 0x800, 0x40, D2M, TAG)
    works(lab, dev, WIN + 0x800, WIN + 0x1000, 0x40, M2M, TAG)
    works(lab, dev, WIN, 0, SIZE, M2D, TAG)  # the whole window
    works(lab, dev, 0x300, WIN + SIZE - 8, 8, D2M, TAG)  # its last bytes
    works(lab, dev, WIN + 0x40, WIN + 0x2000, 0x40, M2M, TAG, priv=True)


def test_window_is_locked_once_enabled(windowed: Lab) -> None:
    """WIN_BASE, WIN_SIZE, WIN_PASID and WIN_CTRL ignore writes (32- and 64-bit) until reset;
    the DMAs are still judged by the window first registered."""
    lab, dev = windowed, windowed.conf
    before = dev.window()
    assert before.enabled and before.pasid == HvtPasidReg.tag(TAG)
    dev.register_window(FAR, MAX_WINDOW, None)
    dev.set_reg(HvtReg.WIN_CTRL, 0)
    lab.bench.qemu.writeq(dev.bar0 + HvtReg.WIN_BASE, 0)
    lab.bench.qemu.writeq(dev.bar0 + HvtReg.WIN_SIZE, 0xFFFF_FFFF_FFFF_FFFF)
    assert dev.window() == before
    blocked(lab, dev, 0x100, FAR, 0x40, D2M, None, FAR)
    works(lab, dev, 0x100, WIN + 0x40, 0x40, D2M, TAG)


def test_trusted_device_ignores_the_window(windowed: Lab) -> None:
    """``trusted``: the crafted DMAs all go through, a window registered or not."""
    lab, dev = windowed, windowed.trusted
    for registered in (False, True):
        if registered:
            assert dev.register_window(WIN, SIZE, TAG).enabled
        for _name, d, src, dst, n, tag, _outside in CRAFTED:
            if d == M2D and n > 0x1_0000:
                continue  # the snapshot keeps the first 64 KiB of SRAM: stay within it
            works(lab, dev, src, dst, n, d, tag)
    assert dev.counters()[0] == 0


def test_blocked_dma_reaches_no_iommu(lab: Lab) -> None:
    """A blocked DMA is refused before any memory access: with translation on and no table
    for the device, it leaves no fault record; the same DMA inside the window reaches the
    IOMMU and faults there (READ_FAULT/WRITE_FAULT with a record)."""
    lab.fresh()
    bench = lab.bench
    t = VtdTables(bench.memory, base=0x100_0000, limit=0x110_0000)
    bench.memory.fill(0x100_0000, 0x10_0000)
    bench.program(t.scalable())  # an empty root table: every translated request faults
    try:
        blocked(lab, lab.conf, 0x100, FAR, 0x40, D2M, TAG, FAR)
        blocked(lab, lab.conf, WIN - 0x40, 0x100, 0x40, M2D, TAG, WIN - 0x40)
        assert not bench.iommu.pending_records()
        res = lab.conf.dma(0x100, WIN, 0x40, D2M, TAG)
        assert res.code == HvtCode.WRITE_FAULT and res.fault_addr == WIN, str(res)
        recs = [FaultRecord.decode(r) for r in bench.iommu.pending_records()]
        assert [(r["SID"], r["PP"], r["PV"], r["FI"]) for r in recs] == [
            (lab.conf.sid, 1, TAG, WIN >> 12)]
    finally:
        bench.iommu.clear_faults()
        bench.iommu.set_translation(False)
        lab.conf.clear_status()


def test_window_for_requests_without_pasid(lab: Lab) -> None:
    """WIN_PASID.VALID=0: the window serves requests without PASID, and any PASID-tagged
    DMA is a wrong tag."""
    lab.fresh(pasid=None)
    works(lab, lab.conf, 0x100, WIN + 0x40, 0x40, D2M, None)
    works(lab, lab.conf, WIN + 0x40, 0x100, 0x40, M2D, None)
    blocked(lab, lab.conf, 0x100, WIN + 0x40, 0x40, D2M, 0, WIN + 0x40)
    blocked(lab, lab.conf, WIN + 0x40, 0x100, 0x40, M2D, TAG, WIN + 0x40)


@pytest.mark.parametrize(("base", "size"), [
    (WIN + 0x10, SIZE), (WIN, SIZE + 0x10), (WIN, 0), (WIN, MAX_WINDOW + 0x1000),
    (0xFFFF_FFFF_FFFF_0000, 0x2_0000)], ids=["base-unaligned", "size-unaligned", "size-zero",
                                            "size-above-64mib", "wraps"])
def test_invalid_window_is_not_enabled(lab: Lab, base: int, size: int) -> None:
    """WIN_CTRL.ENABLE only takes a page-granular, non-wrapping window of at most 64 MiB;
    until one is enabled nothing is locked and nothing is allowed."""
    lab.fresh(register=False)
    win = lab.conf.register_window(base, size, TAG)
    assert not win.enabled and (win.base, win.size) == (base, size), win
    blocked(lab, lab.conf, 0x100, WIN + 0x40, 0x40, D2M, TAG, WIN + 0x40)
    assert lab.conf.register_window(WIN, SIZE, TAG).enabled
    works(lab, lab.conf, 0x100, WIN + 0x40, 0x40, D2M, TAG)


def test_reset_unlocks_the_window(lab: Lab) -> None:
    lab.fresh()
    count = lab.conf.counters()[0]
    blocked(lab, lab.conf, 0x100, FAR, 0x40, D2M, TAG, FAR)
    assert lab.conf.counters()[0] == count + 1
    lab.fresh(register=False)
    assert lab.conf.window() == HvtWindow(0, 0, 0, 0)
    assert lab.conf.counters() == (0, 0)
    assert lab.conf.register_window(FAR, 0x1000, None).enabled
    works(lab, lab.conf, 0x100, FAR, 0x40, D2M, None)


# Regression: hvt_in_window() once computed the window's end as base + size, which wraps
# to 0 for a window ending at 2^64 (fixed in 0003).
def test_regression_window_at_the_top_of_the_address_space(lab: Lab) -> None:
    lab.fresh(register=False)
    top = (1 << 64) - SIZE
    assert lab.conf.register_window(top, SIZE, TAG).enabled
    res = lab.conf.dma(0, top + 0x100, 0x40, D2M, TAG)
    lab.conf.clear_status()
    assert res.code == HvtCode.WRITE_FAULT and res.fault_addr == top + 0x100, str(res)


def test_sram_is_not_guest_memory(lab: Lab) -> None:
    """The SRAM side of MEM2DEV/DEV2MEM is the device's own: only the memory side is judged
    (a DMA from the SRAM's end into the window works)."""
    lab.fresh()
    works(lab, lab.conf, SRAM_SIZE - 0x40, WIN, 0x40, D2M, TAG)
