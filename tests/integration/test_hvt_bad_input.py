"""Issue 5, s4: malformed programming of hvt-pci never crashes QEMU and gets its error code.

One patched QEMU serves the module: ``hvt-pci`` at 00:04.0 with ``pasid-width=8`` (trusted),
behind intel-iommu in scalable mode with translation on. The remapping tables map two
watched RAM regions 1:1 (2 MiB second-stage pages) for requests without PASID and for every
PASID below 2^8 (user and supervisor): any DMA outside them is refused by the IOMMU, so no
byte of unwatched guest memory can change, and what the device may touch is exactly the
watched regions and its SRAM.

- Explicit cases: every malformed programming of the README's error list (zero and huge LEN,
  unaligned LEN/SRC/DST, wrapping addresses, SRAM ranges past its end, DIR=3, PASIDs at or
  above 2^pasid-width, reserved PASID bits, PRIV or a PASID without VALID, PASID/privileged
  mode not enabled in the PASID capability, bus mastering off, a doorbell while BUSY) ends in
  ERROR with its CODE, XFERRED=0, FAULT_ADDR=0, the counters unchanged, no watched byte
  changed and QEMU alive; the boundary values just inside work.
- A hypothesis fuzz over BAR0 register writes (32/64-bit, any register, doorbells, back-to-back
  doorbells, status clears, PASID-control and bus-master toggles) against :class:`Engine`, a
  model of the engine written from qemu-patches/README.md: after every step QEMU answers and
  every register equals the model's; after every example the watched RAM and the SRAM equal
  the model's shadow of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from hvtools.addr import PAGE_2M, PAGE_4K
from hvtools.control.hvt_qtest import (
    MAX_LEN,
    MAX_WINDOW,
    SRAM_SIZE,
    HvtCode,
    HvtConfig,
    HvtDir,
    HvtPciDevice,
    HvtQtestBench,
    HvtReg,
)
from hvtools.iommu.build import VtdTables
from hvtools.iommu.structures import FaultRecord, Pgtt

pytestmark = pytest.mark.integration

PASID_WIDTH = 8
#: The watched RAM regions (2 MiB aligned, mapped 1:1 by the IOMMU) and the table arena.
REGIONS = ((0x400_0000, 0x40_0000), (0x800_0000, 0x20_0000))
A, B = REGIONS[0][0], REGIONS[1][0]
ARENA = (0x100_0000, 0x140_0000)
VALID = 1 << 31
PRIV = 1 << 30
#: The interrupt address range FEE0_0000h-FEEF_FFFFh (VT-d s3.15), [first, end).
INTERRUPT_RANGE = (0xFEE0_0000, 0xFEF0_0000)
MASK64 = (1 << 64) - 1
FUZZ_EXAMPLES = int(os.environ.get("HVTOOLS_HVT_FUZZ_EXAMPLES", "150"))


# ============================================================================================
# The shadow and the engine model
# ============================================================================================


class Shadow:
    """What the watched RAM regions and the SRAM must hold."""

    def __init__(self, bench: HvtQtestBench) -> None:
        self.bench = bench
        self.ram = {base: bytearray(bench.memory.read(base, size)) for base, size in REGIONS}
        self.sram = bytearray(bench.hvt.sram_read(0, SRAM_SIZE))

    def _region(self, addr: int, n: int) -> tuple[bytearray, int] | None:
        for base, buf in self.ram.items():
            if base <= addr and addr + n <= base + len(buf):
                return buf, addr - base
        return None

    def accessible(self, addr: int, n: int) -> bool:
        """The IOMMU maps exactly the watched regions."""
        return self._region(addr, n) is not None

    def read(self, addr: int, n: int) -> bytes:
        found = self._region(addr, n)
        assert found is not None
        buf, off = found
        return bytes(buf[off:off + n])

    def write(self, addr: int, data: bytes) -> None:
        found = self._region(addr, len(data))
        assert found is not None
        buf, off = found
        buf[off:off + len(data)] = data

    def differences(self) -> list[str]:
        """Where QEMU's memory differs from the shadow (first differing byte per region)."""
        out = []
        for base, buf in self.ram.items():
            got = self.bench.memory.read(base, len(buf))
            if got != buf:
                i = next(i for i in range(len(buf)) if got[i] != buf[i])
                out.append(f"RAM {base + i:#x}: {got[i]:#04x}, model {buf[i]:#04x}")
        got = self.bench.hvt.sram_read(0, SRAM_SIZE)
        if got != self.sram:
            i = next(i for i in range(SRAM_SIZE) if got[i] != self.sram[i])
            out.append(f"SRAM {i:#x}: {got[i]:#04x}, model {self.sram[i]:#04x}")
        return out


DONE, BUSY, ERROR, OVERRUN = 1, 2, 4, 8
CODE_MASK = 0xFF << 8
_REG64 = (HvtReg.SRC, HvtReg.DST, HvtReg.FAULT_ADDR, HvtReg.WIN_BASE)


@dataclass
class Engine:
    """hvt-pci's DMA engine as qemu-patches/README.md describes it, trusted level.

    Validation order (the README lists the codes, not their order; this is the order of
    hw/misc/hvt_pci.c ``hvt_validate``): bus master, DIR, LEN, alignment, addresses, PASID
    tag, PASID capability. Memory moves in chunks that never cross a 4 KiB page of bus
    address; a refused chunk stops the DMA and leaves its destination as it was (a refused
    MEM2DEV read too: test_hvt_pasid_vs_model.py::test_regression_read_fault_clobbers_sram).
    """

    pasid_width: int
    regs: dict[int, int] = field(default_factory=dict)
    pasid_ctrl: int = 0b101
    bme: bool = True
    job: tuple[int, int, int, int, int] | None = None

    @classmethod
    def sync(cls, dev: HvtPciDevice) -> Engine:
        """A model in the device's current state (nothing pending)."""
        regs = {int(r): dev.reg(r) for r in HvtReg if r not in _REG64}
        for r in _REG64:
            regs[int(r)] = dev.reg64(r)
        eng = cls(dev.pasid_width, regs)
        eng.pasid_ctrl = dev.pasid_control()
        eng.bme = bool(dev.config_read(0x04, 2) & 4)
        return eng

    @property
    def locked(self) -> bool:
        return bool(self.regs[HvtReg.WIN_CTRL] & 1)

    def write32(self, off: int, val: int) -> bool:
        """One 32-bit register write; returns whether it rang the doorbell."""
        val &= 0xFFFF_FFFF
        base = off & ~7
        if base in _REG64:
            if base == HvtReg.FAULT_ADDR or (base == HvtReg.WIN_BASE and self.locked):
                return False
            old = self.regs[base]
            self.regs[base] = (old & 0xFFFF_FFFF | val << 32) if off & 4 else \
                (old & ~0xFFFF_FFFF | val)
            return False
        r = self.regs
        if off in (HvtReg.LEN, HvtReg.PASID):
            r[off] = val
        elif off == HvtReg.CTRL:
            r[off] = val & 3
        elif off == HvtReg.DOORBELL:
            if val & 1:
                self.doorbell()
                return True
        elif off == HvtReg.STATUS:
            if val & ERROR:
                r[off] &= ~(ERROR | CODE_MASK)
            r[off] &= ~(val & (DONE | OVERRUN))
        elif off in (HvtReg.WIN_SIZE, HvtReg.WIN_PASID):
            if not self.locked:
                r[off] = val
        elif off == HvtReg.WIN_CTRL:
            wb, ws = r[HvtReg.WIN_BASE], r[HvtReg.WIN_SIZE]
            if (not self.locked and val & 1 and ws and ws <= MAX_WINDOW
                    and not (wb | ws) & (PAGE_4K - 1) and wb + ws - 1 <= MASK64):
                r[off] = 1
        return False

    def doorbell(self) -> None:
        r = self.regs
        if r[HvtReg.STATUS] & BUSY:
            r[HvtReg.STATUS] |= OVERRUN
            return
        self.job = (r[HvtReg.SRC], r[HvtReg.DST], r[HvtReg.LEN], r[HvtReg.PASID],
                    r[HvtReg.CTRL] & 3)
        r[HvtReg.STATUS] = r[HvtReg.STATUS] & ~(DONE | ERROR | CODE_MASK) | BUSY

    def validate(self, src: int, dst: int, n: int, tag: int, d: int) -> int:
        if not self.bme:
            return HvtCode.NO_BUS_MASTER
        if d == HvtDir.RESERVED:
            return HvtCode.BAD_DIR
        if n == 0 or n > MAX_LEN:
            return HvtCode.BAD_LEN
        if (n | src | dst) & 3:
            return HvtCode.BAD_ALIGN
        if (src + n > SRAM_SIZE) if d == HvtDir.DEV2MEM else (src + n - 1 > MASK64):
            return HvtCode.BAD_ADDR
        if (dst + n > SRAM_SIZE) if d == HvtDir.MEM2DEV else (dst + n - 1 > MASK64):
            return HvtCode.BAD_ADDR
        if tag & VALID:
            if tag & 0x3FF0_0000 or (tag & 0xF_FFFF) >> self.pasid_width:
                return HvtCode.BAD_PASID
            if not self.pasid_ctrl & 1 or (tag & PRIV and not self.pasid_ctrl & 4):
                return HvtCode.PASID_DISABLED
        elif tag:
            return HvtCode.BAD_PASID
        return HvtCode.OK

    def run(self, mem: Shadow) -> None:
        """The bottom half: the pending job, if any."""
        r = self.regs
        if not r[HvtReg.STATUS] & BUSY or self.job is None:
            return
        src, dst, n, tag, d = self.job
        self.job = None
        r[HvtReg.XFERRED] = 0
        r[HvtReg.FAULT_ADDR] = 0
        code = self.validate(src, dst, n, tag, d)
        if code == HvtCode.OK:
            code = self.move(mem, src, dst, n, d)
        r[HvtReg.STATUS] = r[HvtReg.STATUS] & ~(BUSY | ERROR | CODE_MASK) | DONE
        if code:
            r[HvtReg.STATUS] |= ERROR | code << 8
        else:
            r[HvtReg.COMPLETED] = (r[HvtReg.COMPLETED] + 1) & 0xFFFF_FFFF

    def move(self, mem: Shadow, src: int, dst: int, n: int, d: int) -> int:
        r = self.regs

        def chunk(addr: int, left: int) -> int:
            return min(PAGE_4K - (addr & (PAGE_4K - 1)), left)

        off = 0
        while off < n:
            s, t = src + off, dst + off
            if d == HvtDir.MEM2DEV:
                c = chunk(s, n - off)
                if not mem.accessible(s, c):
                    r[HvtReg.FAULT_ADDR] = s
                    return HvtCode.READ_FAULT
                mem.sram[t:t + c] = mem.read(s, c)
            elif d == HvtDir.DEV2MEM:
                c = chunk(t, n - off)
                if not mem.accessible(t, c):
                    r[HvtReg.FAULT_ADDR] = t
                    return HvtCode.WRITE_FAULT
                mem.write(t, bytes(mem.sram[s:s + c]))
            else:
                c = min(chunk(s, n - off), chunk(t, n - off))
                if not mem.accessible(s, c):
                    r[HvtReg.FAULT_ADDR] = s
                    return HvtCode.READ_FAULT
                data = mem.read(s, c)
                if not mem.accessible(t, c):
                    r[HvtReg.FAULT_ADDR] = t
                    return HvtCode.WRITE_FAULT
                mem.write(t, data)
            off += c
            r[HvtReg.XFERRED] = off
        return HvtCode.OK


# ============================================================================================
# The bench
# ============================================================================================


def identity_tables(bench: HvtQtestBench) -> int:
    """Scalable-mode tables mapping REGIONS 1:1 for RID_PASID and PASIDs 0..2^8-1 (PGTT
    second-stage, SRE=1); returns RTADDR."""
    t = VtdTables(bench.memory, base=ARENA[0], limit=ARENA[1])
    bench.memory.fill(ARENA[0], ARENA[1] - ARENA[0])
    rtaddr = t.scalable()
    pdir = t.sm_device(rtaddr, bench.hvt.sid)
    root = t.alloc()
    for base, size in REGIONS:
        for off in range(0, size, PAGE_2M):
            t.ss_map(root, 4, base + off, base + off, PAGE_2M)
    for pasid in range(1 << PASID_WIDTH):
        t.pasid_entry(pdir, pasid, PGTT=Pgtt.SECOND_STAGE, AW=2, SRE=1, SSPTPTR=root >> 12)
    return rtaddr


@dataclass
class Lab:
    bench: HvtQtestBench
    rtaddr: int
    shadow: Shadow | None = None

    @property
    def dev(self) -> HvtPciDevice:
        return self.bench.hvt


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    bench = HvtQtestBench(devices=(HvtConfig(pasid_width=PASID_WIDTH),),
                          name="hvt-bad-input").start()
    try:
        rtaddr = identity_tables(bench)
        bench.program(rtaddr)
        for i, (base, size) in enumerate(REGIONS):
            bench.memory.write(base, bytes((j * 7 + i * 0x31) & 0xFF for j in range(size)))
        bench.hvt.sram_write(0, bytes((j * 13 + 5) & 0xFF for j in range(SRAM_SIZE)))
        yield Lab(bench, rtaddr)
    finally:
        bench.close()


def alive(dev: HvtPciDevice) -> None:
    assert dev.reg(HvtReg.ID) == 0x6876_7401, "hvt-pci (or QEMU) stopped answering"


# ============================================================================================
# Explicit malformed programmings
# ============================================================================================

#: (id, SRC, DST, LEN, DIR, PASID register, the CODE)
M2M, M2D, D2M = HvtDir.MEM2MEM, HvtDir.MEM2DEV, HvtDir.DEV2MEM
BadCase = tuple[str, int, int, int, int, int, HvtCode]
BAD_CASES: list[BadCase] = [
    ("len-zero", A, B, 0, M2M, 0, HvtCode.BAD_LEN),
    ("len-zero-dev2mem", 0, A, 0, D2M, 0, HvtCode.BAD_LEN),
    ("len-above-1mib", A, B, MAX_LEN + 4, M2M, 0, HvtCode.BAD_LEN),
    ("len-huge", A, 0, 0xFFFF_FFFC, M2D, 0, HvtCode.BAD_LEN),
    ("len-unaligned", A, B, 6, M2M, 0, HvtCode.BAD_ALIGN),
    ("len-one", A, 0, 1, M2D, 0, HvtCode.BAD_ALIGN),
    ("src-unaligned", A + 2, B, 16, M2M, 0, HvtCode.BAD_ALIGN),
    ("dst-unaligned", A, B + 1, 16, M2M, 0, HvtCode.BAD_ALIGN),
    ("sram-offset-unaligned", 0x102, A, 16, D2M, 0, HvtCode.BAD_ALIGN),
    ("src-wraps", MASK64 - 7, B, 16, M2M, 0, HvtCode.BAD_ADDR),
    ("dst-wraps", A, MASK64 - 3, 8, M2M, 0, HvtCode.BAD_ADDR),
    ("mem2dev-src-wraps", 1 << 63 | (MASK64 >> 1) & ~0xFFF, 0, 0x2000, M2D, 0,
     HvtCode.BAD_ADDR),
    ("dev2mem-dst-wraps", 0, MASK64 - 0xFFF, 0x2000, D2M, 0, HvtCode.BAD_ADDR),
    ("sram-dst-past-end", A, SRAM_SIZE - 4, 8, M2D, 0, HvtCode.BAD_ADDR),
    ("sram-src-past-end", SRAM_SIZE, A, 4, D2M, 0, HvtCode.BAD_ADDR),
    ("sram-src-huge", 1 << 63, A, 4, D2M, 0, HvtCode.BAD_ADDR),
    ("sram-dst-wraps", A, MASK64 - 3, 8, M2D, 0, HvtCode.BAD_ADDR),
    ("dir-reserved", A, B, 16, HvtDir.RESERVED, 0, HvtCode.BAD_DIR),
    ("pasid-at-width", A, B, 16, M2M, VALID | 1 << PASID_WIDTH, HvtCode.BAD_PASID),
    ("pasid-max", A, B, 16, M2M, VALID | 0xF_FFFF, HvtCode.BAD_PASID),
    ("pasid-reserved-bit-20", A, B, 16, M2M, VALID | 1 << 20 | 5, HvtCode.BAD_PASID),
    ("pasid-reserved-bit-29", 0, B, 16, D2M, VALID | PRIV | 1 << 29, HvtCode.BAD_PASID),
    ("priv-without-pasid", A, 0, 16, M2D, PRIV, HvtCode.BAD_PASID),
    ("pasid-without-valid", A, B, 16, M2M, 5, HvtCode.BAD_PASID),
]


def _expect_error(lab: Lab, code: int, run: tuple[int, int, int, int, int]) -> None:
    """Program ``run`` (SRC, DST, LEN, DIR, PASID), ring, and check the refusal."""
    dev, mem = lab.dev, lab.bench.memory
    before = [mem.read(base, size) for base, size in REGIONS], dev.sram_read(0, SRAM_SIZE)
    counters = dev.counters()
    dev.clear_status()
    src, dst, n, d, tag = run
    res = dev.dma(src, dst, n, d, pasid_reg=tag)
    alive(dev)
    assert res.error and res.done and not res.busy and res.code == code, str(res)
    assert res.xferred == 0 and res.fault_addr == 0, str(res)
    assert dev.counters() == counters
    after = [mem.read(base, size) for base, size in REGIONS], dev.sram_read(0, SRAM_SIZE)
    assert after == before, "a refused DMA changed memory"
    dev.clear_status()
    assert dev.status() == 0
    lab.bench.iommu.clear_faults()


@pytest.mark.parametrize(("name", "src", "dst", "length", "direction", "tag", "code"),
                         BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_malformed_programming(lab: Lab, name: str, src: int, dst: int, length: int,
                               direction: int, tag: int, code: HvtCode) -> None:
    _expect_error(lab, code, (src, dst, length, direction, tag))


@pytest.mark.parametrize(("src", "dst", "length", "direction", "tag"), [
    (A, B, MAX_LEN, M2M, 0),  # the largest LEN
    (A, SRAM_SIZE - 4, 4, M2D, 0),  # the last SRAM word
    (SRAM_SIZE - 8, B + 0x100, 8, D2M, VALID | PRIV | (1 << PASID_WIDTH) - 1),
    (A + 0xFFC, B + 0x1FF8, 0x10, M2M, VALID),  # chunks split at both sides' pages
], ids=["len-1mib", "sram-last-word", "pasid-width-max-priv", "page-splits"])
def test_boundary_values_work(lab: Lab, src: int, dst: int, length: int, direction: int,
                              tag: int) -> None:
    """The values just inside each limit are accepted and move every byte."""
    dev = lab.dev
    shadow = Shadow(lab.bench)
    eng = Engine.sync(dev)
    eng.write32(HvtReg.STATUS, DONE | ERROR | OVERRUN)
    for off, val in ((HvtReg.SRC, src), (HvtReg.SRC + 4, src >> 32), (HvtReg.DST, dst),
                     (HvtReg.DST + 4, dst >> 32), (HvtReg.LEN, length), (HvtReg.PASID, tag),
                     (HvtReg.CTRL, direction)):
        eng.write32(off, val)
    eng.doorbell()
    eng.run(shadow)
    dev.clear_status()
    res = dev.dma(src, dst, length, direction, pasid_reg=tag)
    assert res.ok and res.xferred == length, str(res)
    assert not shadow.differences()
    dev.clear_status()


def test_pasid_capability_controls(lab: Lab) -> None:
    """PASID Enable off: a request-with-PASID is PASID_DISABLED, one without still works;
    Privileged Mode Enable off: a privileged one is PASID_DISABLED, a user one works."""
    dev = lab.dev
    try:
        dev.set_pasid_control(enable=False, priv=False)
        _expect_error(lab, HvtCode.PASID_DISABLED, (A, B, 16, M2M, VALID | 3))
        _expect_error(lab, HvtCode.PASID_DISABLED, (A, B, 16, M2M, VALID | PRIV | 3))
        assert dev.dma(A, B + 0x40, 16, M2M).ok
        dev.set_pasid_control(enable=True, priv=False)
        _expect_error(lab, HvtCode.PASID_DISABLED, (A, B, 16, M2M, VALID | PRIV | 3))
        assert dev.dma(A, B + 0x40, 16, M2M, pasid=3).ok
        dev.set_pasid_control(enable=False, priv=True)  # privileged alone enables nothing
        _expect_error(lab, HvtCode.PASID_DISABLED, (A, B, 16, M2M, VALID | PRIV | 3))
    finally:
        dev.set_pasid_control(enable=True, priv=True)
        dev.clear_status()
    assert dev.dma(A, B + 0x40, 16, M2M, pasid=3, priv=True).ok
    dev.clear_status()


def test_bus_master_off(lab: Lab) -> None:
    """COMMAND.BME clear: every DMA is NO_BUS_MASTER, whatever else is wrong with it."""
    dev = lab.dev
    try:
        dev.set_command(bus_master=False)
        for run in ((A, B, 16, M2M, 0), (0, A, 64, D2M, VALID | 1),
                    (A, B, 0, HvtDir.RESERVED, PRIV)):
            _expect_error(lab, HvtCode.NO_BUS_MASTER, run)
    finally:
        dev.set_command(bus_master=True)
    assert dev.dma(A, B + 0x40, 16, M2M).ok
    dev.clear_status()


def test_doorbell_while_busy_is_an_overrun(lab: Lab) -> None:
    """Two doorbells in one socket write: the second arrives while the first DMA is pending
    (its bottom half has not run): OVERRUN, the DMA in flight finishes with the registers it
    latched (a SRC rewritten in between is not used), and only one DMA counts."""
    dev, q = lab.dev, lab.bench.qemu
    dev.clear_status()
    done = dev.counters()[1]
    data = bytes(range(64))
    lab.bench.memory.write(A + 0x3000, data)
    dev.program(A + 0x3000, 0x4000, 64, M2D)
    door = f"writel {dev.bar0 + HvtReg.DOORBELL:#x} 0x1"
    q.batch([door, f"writel {dev.bar0 + HvtReg.SRC:#x} {B:#x}", door])
    res = dev.wait()
    assert res.overrun and res.done and not res.error and res.xferred == 64, str(res)
    assert dev.counters()[1] == done + 1
    assert dev.sram_read(0x4000, 64) == data
    dev.set_reg(HvtReg.STATUS, OVERRUN)
    assert dev.status() == DONE
    q.batch([door, door, door])  # SRC is B now: a second, single DMA
    res = dev.wait()
    assert res.overrun and res.ok and dev.counters()[1] == done + 2, str(res)
    dev.clear_status()
    assert dev.status() == 0


def test_status_write_one_to_clear(lab: Lab) -> None:
    """ERROR clears CODE with it; DONE and OVERRUN clear alone; BUSY and CODE are RO."""
    dev = lab.dev
    dev.clear_status()
    dev.dma(A, B, 0, M2M)
    assert dev.status() == DONE | ERROR | HvtCode.BAD_LEN << 8
    dev.set_reg(HvtReg.STATUS, DONE | BUSY | CODE_MASK)
    assert dev.status() == ERROR | HvtCode.BAD_LEN << 8
    dev.set_reg(HvtReg.STATUS, ERROR)
    assert dev.status() == 0


# The build before 0002's fix (c7ad054) aborted QEMU here (an assertion in intel-iommu).
@pytest.mark.parametrize(("src", "dst", "direction", "pasid", "priv"), [
    (INTERRUPT_RANGE[0], 0x100, M2D, 3, False),
    (0x200, INTERRUPT_RANGE[1] - 0x40, D2M, 0xFF, True),
    (INTERRUPT_RANGE[0] + 0x1000, B + 0x100, M2M, 0, False),
    (A + 0x100, INTERRUPT_RANGE[0] + 0xFC0, M2M, 7, True),
], ids=["read", "write-last-page", "mem2mem-source", "mem2mem-destination"])
def test_pasid_request_into_interrupt_range(lab: Lab, src: int, dst: int, direction: int,
                                            pasid: int, priv: bool) -> None:
    """A request-with-PASID whose bus address is in FEEx_xxxxh is translated like any other
    (VT-d s3.15); no mapping covers it here, so the DMA stops there with READ_FAULT or
    WRITE_FAULT as the engine model says, the unit records the second-stage fault (0x06
    read / 0x05 write, the stock codes) with PP and the PASID, no byte changes beyond what
    the model moves, and QEMU answers."""
    dev = lab.dev
    shadow = Shadow(lab.bench)
    eng = Engine.sync(dev)
    dev.clear_status()
    eng.write32(HvtReg.STATUS, DONE | ERROR | OVERRUN)
    tag = VALID | (PRIV if priv else 0) | pasid
    _apply(lab, eng, shadow, ("dma", (src, dst, 64, direction, tag)))
    alive(dev)
    got = Engine.sync(dev)
    assert got.regs == eng.regs, {HvtReg(k).name: (hex(v), hex(eng.regs[k]))
                                  for k, v in got.regs.items() if eng.regs[k] != v}
    assert eng.regs[HvtReg.FAULT_ADDR] >> 20 == INTERRUPT_RANGE[0] >> 20
    assert not shadow.differences()
    write = HvtCode(got.regs[HvtReg.STATUS] >> 8 & 0xFF) is HvtCode.WRITE_FAULT
    records = [FaultRecord.decode(r) for r in lab.bench.iommu.pending_records()]
    assert [(r["FR"], r["PP"], r["PV"], r["FI"] << 12, r["SID"]) for r in records] == [
        (0x05 if write else 0x06, 1, pasid, eng.regs[HvtReg.FAULT_ADDR] & ~0xFFF, dev.sid)]
    lab.bench.iommu.clear_faults()
    dev.clear_status()


# ============================================================================================
# Fuzz: BAR0 register writes against the engine model
# ============================================================================================

REGS = [int(r) for r in HvtReg] + [0x0C, 0x14, 0x34, 0x44, 0x54, 0x58, 0xFFC]


def _off_interrupts(addr: int, tag: int) -> int:
    """0xFEEx_xxxx is an interrupt (MSI) write for a request without PASID, not DMA; a
    request-with-PASID there is translated like any other (VT-d s3.15) and stays."""
    if tag & VALID:
        return addr
    return addr ^ 1 << 36 if INTERRUPT_RANGE[0] <= addr < INTERRUPT_RANGE[1] else addr


def _mem_addr() -> st.SearchStrategy[int]:
    inside = st.tuples(st.sampled_from([A, B]), st.integers(0, 0x1F_FFFF)).map(sum)
    return st.one_of(
        inside.map(lambda a: a & ~3), inside.map(lambda a: a & ~3), inside,
        st.sampled_from([A + REGIONS[0][1] - 0x10, B + REGIONS[1][1] - 0x1000, B - 0x1000,
                         0x2_0000_0000, 0xD000_0000, 0x10_0000, MASK64 - 0xF, MASK64 & ~0xFFF,
                         1 << 63, INTERRUPT_RANGE[0], INTERRUPT_RANGE[1] - 0x10]),
        st.integers(0, MASK64))


def _sram_off() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, SRAM_SIZE // 4).map(lambda x: x * 4),
                     st.sampled_from([SRAM_SIZE - 4, SRAM_SIZE, SRAM_SIZE - 0x1000, 2]),
                     st.integers(0, MASK64))


_LEN = st.one_of(st.integers(1, 0x400).map(lambda x: x * 4),
                 st.integers(1, 0x400).map(lambda x: x * 4),
                 st.sampled_from([0, 1, 4, 8, 6, 0x1000, 0x1004, 0x2000, 0x10_0000, MAX_LEN,
                                  MAX_LEN + 4, 0xFFFF_FFFC]),
                 st.integers(0, 0xFFFF_FFFF))
_TAG = st.one_of(st.just(0), st.integers(0, 0xFF).map(lambda p: VALID | p),
                 st.integers(0, 0xFF).map(lambda p: VALID | PRIV | p),
                 st.sampled_from([VALID | 0x100, VALID | 0xF_FFFF, PRIV, 7, VALID | 1 << 25]),
                 st.integers(0, 0xFFFF_FFFF))


@st.composite
def _dma_op(draw: st.DrawFn) -> tuple[str, tuple[int, ...]]:
    d = draw(st.sampled_from([0, 0, 1, 1, 2, 2, 3]))
    src = draw(_sram_off() if d == HvtDir.DEV2MEM else _mem_addr())
    dst = draw(_sram_off() if d == HvtDir.MEM2DEV else _mem_addr())
    kind = draw(st.sampled_from(["dma", "dma", "dma", "overrun"]))
    n, tag = draw(_LEN), draw(_TAG)
    return kind, (_off_interrupts(src, tag), _off_interrupts(dst, tag), n, d, tag)


_VALUE = st.one_of(st.sampled_from([0, 1, 3, 0xF, 0xFFFF_FFFF, 0x1000, VALID | 1, A, B]),
                   st.integers(0, 0xFFFF_FFFF))
_OP = st.one_of(
    _dma_op(), _dma_op(), _dma_op(),
    st.tuples(st.just("w32"), st.tuples(st.sampled_from(REGS), _VALUE)),
    st.tuples(st.just("w64"), st.tuples(st.sampled_from([r & ~3 for r in REGS]),
                                        st.integers(0, MASK64))),
    st.tuples(st.just("doorbell"), st.just(())),
    st.tuples(st.just("clear"), st.tuples(st.integers(0, 0xFFFF_FFFF))),
    st.tuples(st.just("pasidctl"), st.tuples(st.integers(0, 7))),
    st.tuples(st.just("bme"), st.tuples(st.booleans())),
)


def _apply(lab: Lab, eng: Engine, shadow: Shadow, op: tuple[str, tuple[int, ...]]) -> None:
    """One step on QEMU and on the model."""
    dev, q = lab.dev, lab.bench.qemu
    kind, args = op
    rang = False
    if kind in ("dma", "overrun"):
        src, dst, n, d, tag = args
        dev.program(src, dst, n, d, tag)
        for off, val in ((HvtReg.SRC, src), (HvtReg.SRC + 4, src >> 32), (HvtReg.DST, dst),
                         (HvtReg.DST + 4, dst >> 32), (HvtReg.LEN, n), (HvtReg.PASID, tag),
                         (HvtReg.CTRL, d)):
            eng.write32(off, val)
        door = f"writel {dev.bar0 + HvtReg.DOORBELL:#x} 0x1"
        q.batch([door] * (2 if kind == "overrun" else 1))
        for _ in range(2 if kind == "overrun" else 1):
            eng.write32(HvtReg.DOORBELL, 1)
        rang = True
    elif kind == "w32":
        off, val = args
        q.writel(dev.bar0 + off, val)
        rang = eng.write32(off, val)
    elif kind == "w64":
        off, val = args
        q.writeq(dev.bar0 + off, val)
        rang = eng.write32(off, val & 0xFFFF_FFFF)
        rang = eng.write32(off + 4, val >> 32) or rang
    elif kind == "doorbell":
        dev.doorbell()
        rang = eng.write32(HvtReg.DOORBELL, 1)
    elif kind == "clear":
        dev.set_reg(HvtReg.STATUS, args[0])
        eng.write32(HvtReg.STATUS, args[0])
    elif kind == "pasidctl":
        dev.set_pasid_control(enable=bool(args[0] & 1), priv=bool(args[0] & 4))
        eng.pasid_ctrl = args[0] & 0b101
    elif kind == "bme":
        dev.set_command(bus_master=bool(args[0]))
        eng.bme = bool(args[0])
    if rang:
        res = dev.wait()
        eng.run(shadow)
        if currently_in_test_context():  # also run by explicit tests
            event(f"{HvtCode(res.code).name}{' (overrun)' if res.overrun else ''}")


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          derandomize=os.environ.get("HVTOOLS_VTD_EXPLORE", "") != "1",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_OP, min_size=1, max_size=12))
def test_fuzz_register_writes(lab: Lab, ops: list[tuple[str, tuple[int, ...]]]) -> None:
    """Any sequence of register writes: QEMU stays up, every register is what the engine
    model says after every step, and only the bytes the model moves change."""
    if lab.shadow is None:
        lab.shadow = Shadow(lab.bench)
    shadow = lab.shadow
    dev = lab.dev
    eng = Engine.sync(dev)
    for i, op in enumerate(ops):
        _apply(lab, eng, shadow, op)
        alive(dev)
        got = Engine.sync(dev)
        assert (got.regs, got.pasid_ctrl, got.bme) == (eng.regs, eng.pasid_ctrl, eng.bme), (
            f"after step {i} {op}: registers "
            + ", ".join(f"{HvtReg(k).name}={v:#x} (model {eng.regs[k]:#x})"
                        for k, v in got.regs.items() if eng.regs[k] != v))
    diffs = shadow.differences()
    if diffs:
        lab.shadow = None  # re-read on the next example, after this one fails
    assert not diffs, f"memory differs from the model after {ops}: {diffs}"
    dev.set_pasid_control(enable=True, priv=True)
    dev.set_command(bus_master=True)
    lab.bench.iommu.clear_faults()
