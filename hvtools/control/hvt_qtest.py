"""The patched series' ``hvt-pci`` device behind intel-iommu, driven through qtest.

``hvt-pci`` (qemu-patches/README.md, patch 0003) is a PCIe root-complex integrated endpoint
with a PASID extended capability (PCIe 6.0 s7.8.8), a DMA engine programmed through BAR0 and
a 1 MiB SRAM behind BAR2. It is the only device that issues requests-with-PASID (PASID,
privileged-mode requested) into QEMU's intel-iommu, so it is what the PASID half of the VT-d
differential suite drives. Everything here is the qtest counterpart of a guest driver:

- :class:`Q35Ecam`: there is no firmware under qtest, and configuration space above 0xFF (the
  PASID capability at 0x100) is not reachable through mechanism #1 (0xCF8/0xCFC only decodes
  register bits 7:2). The q35 host bridge's PCIEXBAR (config 0x60, Intel 3 Series chipset
  datasheet s5.1.13; QEMU hw/pci-host/q35.c ``mch_update_pciexbar``) is programmed with a base
  and the enable bit, which maps the PCI Express enhanced configuration window (PCIe 6.0
  s7.2.2, "ECAM") there.
- :class:`HvtPciDevice`: finds the function, places BAR0 and BAR2, sets COMMAND, enables the
  PASID capability (PASID Enable, Privileged Mode Enable), runs DMAs (programming registers,
  doorbell, wait for DONE) and reads the result registers, accesses the SRAM through BAR2 and
  registers the secure bounce window.
- :class:`HvtQtestBench`: a q35 QEMU with ``intel-iommu`` (by default scalable mode with
  PASIDs, first stage and the series' ``x-nested=on``) and one or more ``hvt-pci`` functions,
  exposing guest RAM as a :class:`~hvtools.qemu.qtest.QtestMemory` and the remapping unit as
  :class:`~hvtools.control.vtd_qtest.IntelIommuRegs`, like
  :class:`~hvtools.control.vtd_qtest.VtdQtestBench` does for ``edu``. A translated DMA is one
  :class:`~hvtools.iommu.walk.DmaRequest`: a read moves memory into the SRAM (MEM2DEV), a
  write moves SRAM into memory (DEV2MEM); no staging or translation switching is needed to see
  the bytes, the SRAM is plain memory behind BAR2.

The patched binary: :func:`patched_qemu_binary`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from hvtools.bits import BitField, BitStruct
from hvtools.control.vtd_qtest import (
    DmaResult,
    IntelIommuRegs,
    QtestIommuBench,
    pci_config_address,
)
from hvtools.errors import DependencyError, HvTimeout, UsageError, VmError
from hvtools.iommu.walk import Access, DmaRequest, source_id
from hvtools.memory.ramfile import q35_ram_layout
from hvtools.qemu.binary import device_types, patched_installs
from hvtools.qemu.build import current_install, current_key
from hvtools.qemu.qtest import QtestMemory, QtestQemu

#: intel-iommu properties for every PGTT per PASID entry and supervisor requests (the series'
#: ``x-nested=on`` needs ``x-flts=on``; PASIDs need ``x-pasid-mode=on``).
NESTED_IOMMU = ("x-scalable-mode=on", "x-pasid-mode=on", "x-flts=on", "x-nested=on")

#: PCI vendor:device of hvt-pci as config dword 0 reads it (1234:11f0).
HVT_ID = 0x11F0_1234
#: BAR0's ID register: "hvt", version 1.
HVT_ID_VALUE = 0x6876_7401
#: Where the first hvt-pci function sits by default (bus 0: a root-complex integrated endpoint).
HVT_BDF = (0, 4, 0)
#: BAR placement in q35's 32-bit PCI hole: function i gets BAR0 at HVT_BAR_BASE + i * 2 MiB and
#: its 1 MiB BAR2 1 MiB above.
HVT_BAR_BASE = 0xE000_0000
HVT_BAR_STRIDE = 0x20_0000
#: The SRAM behind BAR2, the largest LEN and the largest secure window (README register map).
SRAM_SIZE = 1 << 20
MAX_LEN = 1 << 20
MAX_WINDOW = 64 << 20
#: Where :class:`Q35Ecam` maps the enhanced configuration window (256 buses x 1 MiB).
ECAM_BASE = 0xB000_0000
#: q35 host bridge (00:00.0) PCIEXBAR register (64-bit; bit 0 enable, bits 2:1 length 00b =
#: 256 MiB, base in bits 35:28).
PCIEXBAR = 0x60

#: PCI configuration header and capability offsets (PCI Local Bus 3.0 s6.1, PCIe 6.0 s7.8.8).
PCI_COMMAND = 0x04
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
PCI_BAR0 = 0x10
PCI_BAR2 = 0x18
EXT_CAP_START = 0x100
EXT_CAP_ID_PASID = 0x1B
PASID_CAP_REG = 0x04  # PASID Capability register (16-bit) within the capability
PASID_CTRL_REG = 0x06  # PASID Control register (16-bit)
PASID_CTRL_ENABLE = 1 << 0
PASID_CTRL_PRIV = 1 << 2


def patched_qemu_binary() -> Path:
    """The QEMU binary with the patch series (``hvt-pci``, ``x-nested``).

    ``$HVTOOLS_QEMU_PATCHED`` (``make test`` sets it), else the install of the current series
    (``hvtools qemu build``) -- never an older build of another series.
    Raises :class:`DependencyError` naming the install step when there is none.
    """
    explicit = os.environ.get("HVTOOLS_QEMU_PATCHED")
    if explicit:
        path = Path(explicit)
        if not os.access(path, os.X_OK):
            raise DependencyError(f"HVTOOLS_QEMU_PATCHED={explicit} is not an executable")
        return path
    current = current_install()
    if current is not None and "hvt-pci" in device_types(current.binary):
        return current.binary
    # Never an older build of another series: it may lack the fixes the suites pin.
    others = len(patched_installs())
    note = f" ({others} build(s) of other series exist)" if others else ""
    raise DependencyError(f"the patched QEMU of this checkout's series (key {current_key()}) is "
                          f"not built{note}: run `hvtools qemu build` (make qemu-patched), or "
                          "set HVTOOLS_QEMU_PATCHED")


class HvtReg(IntEnum):
    """BAR0 register offsets (qemu-patches/README.md, register map)."""

    ID = 0x00
    CAPS = 0x04
    SRC = 0x08
    DST = 0x10
    LEN = 0x18
    PASID = 0x1C
    CTRL = 0x20
    DOORBELL = 0x24
    STATUS = 0x28
    XFERRED = 0x2C
    FAULT_ADDR = 0x30
    BLOCKED = 0x38
    COMPLETED = 0x3C
    WIN_BASE = 0x40
    WIN_SIZE = 0x48
    WIN_CTRL = 0x4C
    WIN_PASID = 0x50


class HvtDir(IntEnum):
    """CTRL.DIR: what a DMA moves."""

    MEM2MEM = 0
    MEM2DEV = 1  # memory -> SRAM
    DEV2MEM = 2  # SRAM -> memory
    RESERVED = 3


class HvtCode(IntEnum):
    """STATUS.CODE of the last DMA."""

    OK = 0
    BAD_LEN = 1
    BAD_ALIGN = 2
    BAD_ADDR = 3
    BAD_DIR = 4
    BAD_PASID = 5
    READ_FAULT = 6
    WRITE_FAULT = 7
    BLOCKED = 8
    PASID_DISABLED = 9
    NO_BUS_MASTER = 10


class HvtStatus(BitStruct):
    """STATUS (0x28): RO, DONE/ERROR/OVERRUN write-1-to-clear (ERROR clears CODE too)."""

    WIDTH = 32
    FIELDS = (
        BitField("DONE", 0, 0, "The last DMA finished (with or without error)"),
        BitField("BUSY", 1, 1, "A DMA is pending or running"),
        BitField("ERROR", 2, 2, "The last DMA failed: see CODE"),
        BitField("OVERRUN", 3, 3, "A doorbell arrived while BUSY (the DMA in flight goes on)"),
        BitField("CODE", 8, 15, "HvtCode of the last DMA"),
    )


class HvtPasidReg(BitStruct):
    """PASID (0x1C) and WIN_PASID (0x50): the request's PASID tag. Bits 29:20 reserved."""

    WIDTH = 32
    FIELDS = (
        BitField("PASID", 0, 19, "Process address space ID"),
        BitField("PRIV", 30, 30, "Privileged-mode requested"),
        BitField("VALID", 31, 31, "The DMA is a request-with-PASID"),
    )

    @classmethod
    def tag(cls, pasid: int | None, priv: bool = False) -> int:
        """The register value for a DMA with ``pasid`` (None: a request without PASID)."""
        if pasid is None:
            if priv:
                raise UsageError("a privileged request needs a PASID")
            return 0
        return cls.encode({"PASID": pasid, "PRIV": int(priv), "VALID": 1})


class HvtCaps(BitStruct):
    """CAPS (0x04)."""

    WIDTH = 32
    FIELDS = (
        BitField("PASID_WIDTH", 0, 4, "PASID width in bits (the pasid-width property)"),
        BitField("SECURE", 8, 8, "Secure interface present"),
        BitField("LEVEL", 16, 17, "Security level: 0 trusted, 1 confidential"),
    )


@dataclass(frozen=True)
class HvtDmaResult:
    """STATUS, XFERRED and FAULT_ADDR after one DMA."""

    status: int
    xferred: int
    fault_addr: int

    @property
    def code(self) -> int:
        return HvtStatus.field("CODE").get(self.status)

    @property
    def done(self) -> bool:
        return bool(self.status & 1)

    @property
    def busy(self) -> bool:
        return bool(HvtStatus.field("BUSY").get(self.status))

    @property
    def error(self) -> bool:
        return bool(HvtStatus.field("ERROR").get(self.status))

    @property
    def overrun(self) -> bool:
        return bool(HvtStatus.field("OVERRUN").get(self.status))

    @property
    def ok(self) -> bool:
        """Finished without error."""
        return self.done and not self.error and not self.busy

    def __str__(self) -> str:
        try:
            code = HvtCode(self.code).name
        except ValueError:
            code = f"{self.code:#x}"
        return (f"STATUS={self.status:#x} ({code}) XFERRED={self.xferred:#x} "
                f"FAULT_ADDR={self.fault_addr:#x}")


@dataclass(frozen=True)
class HvtWindow:
    """The secure bounce window registers."""

    base: int
    size: int
    ctrl: int
    pasid: int

    @property
    def enabled(self) -> bool:
        return bool(self.ctrl & 1)


class Q35Ecam:
    """q35's PCI Express enhanced configuration window (ECAM), set up without firmware."""

    def __init__(self, qemu: QtestQemu, base: int = ECAM_BASE) -> None:
        if base & ((1 << 28) - 1) or not 0 < base < 1 << 32:
            raise UsageError(f"ECAM base {base:#x} is not a 256 MiB-aligned 32-bit address")
        self.qemu = qemu
        self.base = base

    def enable(self) -> None:
        """PCIEXBAR = base | 256 MiB | enable, through mechanism #1 on the host bridge."""
        q = self.qemu
        q.outl(0xCF8, pci_config_address(0, 0, 0, PCIEXBAR + 4))
        q.outl(0xCFC, 0)
        q.outl(0xCF8, pci_config_address(0, 0, 0, PCIEXBAR))
        q.outl(0xCFC, self.base | 1)
        if q.readl(self.address(0, 0, 0, 0)) & 0xFFFF != 0x8086:
            raise VmError(f"ECAM at {self.base:#x} does not show the q35 host bridge")

    def address(self, bus: int, dev: int, fn: int, reg: int) -> int:
        """Where ``reg`` of ``bus:dev.fn`` is mapped (PCIe 6.0 s7.2.2, table 7-1)."""
        if not (0 <= bus < 256 and 0 <= dev < 32 and 0 <= fn < 8 and 0 <= reg < 4096):
            raise UsageError(f"no configuration register {bus:02x}:{dev:02x}.{fn} {reg:#x}")
        return self.base | bus << 20 | dev << 15 | fn << 12 | reg


class HvtPciDevice:
    """One ``hvt-pci`` function driven over qtest (qemu-patches/README.md)."""

    def __init__(self, qemu: QtestQemu, ecam: Q35Ecam, bdf: tuple[int, int, int] = HVT_BDF,
                 bar0: int = HVT_BAR_BASE, bar2: int | None = None) -> None:
        self.qemu = qemu
        self.ecam = ecam
        self.bdf = bdf
        self.bar0 = bar0
        self.bar2 = bar0 + SRAM_SIZE if bar2 is None else bar2
        if self.bar0 & 0xFFF or self.bar2 & (SRAM_SIZE - 1):
            raise UsageError(f"BAR0 {self.bar0:#x} / BAR2 {self.bar2:#x} misaligned")
        self.pasid_cap: int | None = None
        self.pasid_width = 0
        self.level = 0

    @property
    def sid(self) -> int:
        return source_id(*self.bdf)

    # -- configuration space ----------------------------------------------------------------

    def config_read(self, reg: int, size: int = 4) -> int:
        addr = self.ecam.address(*self.bdf, reg)
        if size == 4:
            return self.qemu.readl(addr)
        if size == 2:
            return self.qemu.readw(addr)
        if size == 1:
            return self.qemu.readb(addr)
        raise UsageError(f"config read of {size} bytes")

    def config_write(self, reg: int, value: int, size: int = 4) -> None:
        addr = self.ecam.address(*self.bdf, reg)
        if size == 4:
            self.qemu.writel(addr, value)
        elif size == 2:
            self.qemu.writew(addr, value)
        elif size == 1:
            self.qemu.writeb(addr, value)
        else:
            raise UsageError(f"config write of {size} bytes")

    def find_ext_capability(self, cap_id: int) -> int | None:
        """The offset of extended capability ``cap_id`` (PCIe 6.0 s7.6.3 list), or None."""
        offset, seen = EXT_CAP_START, set()
        while offset and offset not in seen:
            seen.add(offset)
            header = self.config_read(offset)
            if header & 0xFFFF == cap_id:
                return offset
            offset = header >> 20 & 0xFFC
        return None

    def setup(self, *, bus_master: bool = True, pasid: bool = True, priv: bool = True) -> None:
        """Check the function is hvt-pci, place BAR0 and BAR2, enable memory space (and bus
        mastering), and set the PASID capability's control (PASID Enable, Privileged Mode
        Enable) as asked."""
        ident = self.config_read(0)
        if ident != HVT_ID:
            raise VmError(f"PCI {self.bdf} is {ident:#010x}, not hvt-pci ({HVT_ID:#010x})")
        self.config_write(PCI_BAR0, self.bar0)
        self.config_write(PCI_BAR2, self.bar2)
        self.set_command(bus_master=bus_master)
        if self.reg(HvtReg.ID) != HVT_ID_VALUE:
            raise VmError(f"hvt-pci BAR0 at {self.bar0:#x} does not answer with its ID")
        self.pasid_cap = self.find_ext_capability(EXT_CAP_ID_PASID)
        if self.pasid_cap is None:
            raise VmError(f"hvt-pci at {self.bdf} has no PASID extended capability")
        caps = HvtCaps.decode(self.reg(HvtReg.CAPS))
        self.pasid_width, self.level = caps["PASID_WIDTH"], caps["LEVEL"]
        self.set_pasid_control(enable=pasid, priv=priv)

    def set_command(self, *, bus_master: bool) -> None:
        """COMMAND: memory space on, bus master as asked."""
        self.config_write(PCI_COMMAND, COMMAND_MEMORY | (COMMAND_BUS_MASTER if bus_master
                                                         else 0), size=2)

    def pasid_capability(self) -> int:
        """The PASID Capability register (Max PASID Width in 12:8, Privileged Mode in 2)."""
        if self.pasid_cap is None:
            raise UsageError("setup() first")
        return self.config_read(self.pasid_cap + PASID_CAP_REG, size=2)

    def pasid_control(self) -> int:
        if self.pasid_cap is None:
            raise UsageError("setup() first")
        return self.config_read(self.pasid_cap + PASID_CTRL_REG, size=2)

    def set_pasid_control(self, *, enable: bool, priv: bool) -> None:
        if self.pasid_cap is None:
            raise UsageError("setup() first")
        value = (PASID_CTRL_ENABLE if enable else 0) | (PASID_CTRL_PRIV if priv else 0)
        self.config_write(self.pasid_cap + PASID_CTRL_REG, value, size=2)

    # -- BAR0 registers ---------------------------------------------------------------------

    def reg(self, offset: int) -> int:
        """A 32-bit register."""
        return self.qemu.readl(self.bar0 + offset)

    def reg64(self, offset: int) -> int:
        """A 64-bit register (low half first)."""
        return self.reg(offset) | self.reg(offset + 4) << 32

    def set_reg(self, offset: int, value: int) -> None:
        self.qemu.writel(self.bar0 + offset, value)

    def set_reg64(self, offset: int, value: int) -> None:
        self.set_reg(offset, value & 0xFFFF_FFFF)
        self.set_reg(offset + 4, value >> 32 & 0xFFFF_FFFF)

    def program(self, src: int, dst: int, length: int, direction: int, pasid_reg: int = 0
                ) -> None:
        """Write SRC, DST, LEN, PASID and CTRL (raw values: nothing is checked here)."""
        self.set_reg64(HvtReg.SRC, src)
        self.set_reg64(HvtReg.DST, dst)
        self.set_reg(HvtReg.LEN, length)
        self.set_reg(HvtReg.PASID, pasid_reg)
        self.set_reg(HvtReg.CTRL, direction)

    def doorbell(self) -> None:
        self.set_reg(HvtReg.DOORBELL, 1)

    def status(self) -> int:
        return self.reg(HvtReg.STATUS)

    def clear_status(self) -> None:
        """Write 1 to DONE, ERROR and OVERRUN."""
        self.set_reg(HvtReg.STATUS, HvtStatus.encode({"DONE": 1, "ERROR": 1, "OVERRUN": 1}))

    def wait(self, timeout: float = 5.0) -> HvtDmaResult:
        """Wait while BUSY (the DMA runs in a bottom half), then read the result registers."""
        deadline = time.monotonic() + timeout
        while HvtStatus.field("BUSY").get(status := self.status()):
            if time.monotonic() > deadline:
                raise HvTimeout(f"hvt-pci {self.bdf}: still BUSY after {timeout:.0f}s")
            self.qemu.clock_step()
        return HvtDmaResult(status, self.reg(HvtReg.XFERRED), self.reg64(HvtReg.FAULT_ADDR))

    def dma(self, src: int, dst: int, length: int, direction: int, pasid: int | None = None,
            priv: bool = False, *, pasid_reg: int | None = None) -> HvtDmaResult:
        """Program one DMA, ring the doorbell and wait for it. ``pasid_reg`` overrides the
        PASID register value built from ``pasid``/``priv`` (for malformed tags)."""
        tag = HvtPasidReg.tag(pasid, priv) if pasid_reg is None else pasid_reg
        self.program(src, dst, length, direction, tag)
        self.doorbell()
        return self.wait()

    def counters(self) -> tuple[int, int]:
        """(BLOCKED, COMPLETED)."""
        return self.reg(HvtReg.BLOCKED), self.reg(HvtReg.COMPLETED)

    # -- SRAM (BAR2) ------------------------------------------------------------------------

    def _sram_check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > SRAM_SIZE:
            raise UsageError(f"[{offset:#x}, +{size:#x}) is not inside the 1 MiB SRAM")

    def sram_read(self, offset: int, size: int) -> bytes:
        self._sram_check(offset, size)
        return self.qemu.memread(self.bar2 + offset, size) if size else b""

    def sram_write(self, offset: int, data: bytes) -> None:
        self._sram_check(offset, len(data))
        if data:
            self.qemu.memwrite(self.bar2 + offset, data)

    # -- secure interface -------------------------------------------------------------------

    def window(self) -> HvtWindow:
        return HvtWindow(self.reg64(HvtReg.WIN_BASE), self.reg(HvtReg.WIN_SIZE),
                         self.reg(HvtReg.WIN_CTRL), self.reg(HvtReg.WIN_PASID))

    def register_window(self, base: int, size: int, pasid: int | None = None, *,
                        priv: bool = False, enable: bool = True) -> HvtWindow:
        """Write WIN_BASE, WIN_SIZE, WIN_PASID and (with ``enable``) WIN_CTRL.ENABLE; returns
        what the registers hold afterwards (a locked window ignores the writes)."""
        self.set_reg64(HvtReg.WIN_BASE, base)
        self.set_reg(HvtReg.WIN_SIZE, size)
        self.set_reg(HvtReg.WIN_PASID, HvtPasidReg.tag(pasid, priv))
        if enable:
            self.set_reg(HvtReg.WIN_CTRL, 1)
        return self.window()


@dataclass(frozen=True)
class HvtConfig:
    """One hvt-pci function of a bench: where it sits and its properties."""

    bdf: tuple[int, int, int] = HVT_BDF
    pasid_width: int = 20
    security_level: str = "trusted"

    def device_arg(self) -> str:
        bus, dev, fn = self.bdf
        if bus != 0:
            raise UsageError("hvt-pci must sit on the root bus (no bridge is set up here)")
        return (f"hvt-pci,addr={dev:02x}.{fn},pasid-width={self.pasid_width},"
                f"security-level={self.security_level}")


@dataclass(frozen=True)
class HvtVtdResult:
    """One DMA through the remapping unit: the device's result and the unit's records."""

    dma: HvtDmaResult
    iommu: DmaResult


class HvtQtestBench(QtestIommuBench):
    """A q35 QEMU (the patched binary) with ``intel-iommu,<iommu_props>`` and hvt-pci
    functions under qtest; ``iommu_props=None`` leaves the IOMMU out.

    The first function (:attr:`hvt`) runs the translated DMAs of :meth:`dma`; every function
    is in :attr:`devices`, set up by :meth:`start` (and again by :meth:`reset`).
    """

    def __init__(self, iommu_props: Sequence[str] | None = NESTED_IOMMU, *,
                 devices: Sequence[HvtConfig] = (HvtConfig(),), memory_mib: int = 256,
                 binary: Path | None = None, name: str = "hvt-qtest") -> None:
        if not devices:
            raise UsageError("an hvt bench needs at least one hvt-pci function")
        if memory_mib > 2048:
            raise UsageError("the bench keeps RAM below the ECAM window: at most 2 GiB")
        self.iommu_props = None if iommu_props is None else list(iommu_props)
        self.configs = tuple(devices)
        args: list[str] = []
        if self.iommu_props is not None:
            # The IOMMU must exist before the devices behind it.
            args += ["-device", ",".join(["intel-iommu", *self.iommu_props])]
        for config in self.configs:
            args += ["-device", config.device_arg()]
        self.qemu = QtestQemu(args, memory_mib=memory_mib, name=name,
                              binary=binary or patched_qemu_binary())
        self.memory = QtestMemory(self.qemu, [(r.gpa, r.size)
                                              for r in q35_ram_layout(memory_mib << 20)])
        self.ecam = Q35Ecam(self.qemu)
        self.devices = [HvtPciDevice(self.qemu, self.ecam, c.bdf,
                                     HVT_BAR_BASE + i * HVT_BAR_STRIDE)
                        for i, c in enumerate(self.configs)]
        self.iommu = IntelIommuRegs(self.qemu)

    @property
    def hvt(self) -> HvtPciDevice:
        return self.devices[0]

    # -- life cycle -------------------------------------------------------------------------

    def _setup(self) -> None:
        self.ecam.enable()
        for dev in self.devices:
            dev.setup()
        if self.iommu_props is not None:
            self.iommu.clear_faults()

    def reset(self, timeout: float = 5.0) -> None:
        """A machine reset (q35 Reset Control Register 0xCF9 = 06h: hard reset) and the
        set-up again: the devices' windows are unlocked, counters and IOMMU state cleared."""
        self.qemu.outb(0xCF9, 0x06)
        deadline = time.monotonic() + timeout
        while self._ecam_on():
            if time.monotonic() > deadline:
                raise HvTimeout("q35 reset did not happen")
        self._setup()

    def _ecam_on(self) -> bool:
        """Whether PCIEXBAR still has its enable bit (a reset clears it)."""
        self.qemu.outl(0xCF8, pci_config_address(0, 0, 0, PCIEXBAR))
        return bool(self.qemu.inl(0xCFC) & 1)

    # -- DMA --------------------------------------------------------------------------------

    def dma(self, request: DmaRequest, count: int, sram_offset: int = 0, *,
            invalidate: bool = True, device: HvtPciDevice | None = None) -> HvtVtdResult:
        """Run ``request`` (``count`` bytes at its address) as one hvt-pci DMA: a read moves
        memory into the SRAM at ``sram_offset`` (MEM2DEV), a write moves the SRAM there into
        memory (DEV2MEM); the request's PASID and privilege become the PASID register. With
        ``invalidate`` the IOTLB and context cache are flushed first. Returns the device's
        result, FSTS and the pending fault records (the caller clears them)."""
        dev = device or self.hvt
        if request.sid != dev.sid:
            raise UsageError(f"hvt-pci {dev.bdf} issues requests as {dev.sid:#06x}, not "
                             f"{request.sid:#06x}")
        if request.access is Access.EXECUTE:
            raise UsageError("hvt-pci issues no execute requests")
        if self.iommu_props is not None and invalidate:
            self.invalidate()
        if request.write:
            src, dst, direction = sram_offset, int(request.address), HvtDir.DEV2MEM
        else:
            src, dst, direction = int(request.address), sram_offset, HvtDir.MEM2DEV
        result = dev.dma(src, dst, count, direction, request.pasid, request.privileged)
        if self.iommu_props is None:
            return HvtVtdResult(result, DmaResult(0, ()))
        return HvtVtdResult(result, DmaResult(self.iommu.fault_status(),
                                              tuple(self.iommu.pending_records())))
